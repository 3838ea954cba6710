"""The CuTe forward (``dmattn._cuda.fwd`` through ``dmattn.cuda_ext.forward``) against the float64
reference, on both key-visiting paths (DENSE and LIST). GPU only: skipped without a CUDA device or
without a module that has the forward.

Outputs start as NaN, so an element the kernel forgets fails. Tolerance: the FlashAttention rule of
``cases.assert_close_to_reference`` (kernel error <= 2x the same-precision PyTorch error + floor).
"""

from __future__ import annotations

import math

import pytest
import torch

from cases import FORMS, Case, assert_close_to_reference, make_inputs
from dmattn import cuda_ext, reference

HEAD_DIMS = (32, 64, 96, 128, 256)
DTYPES = (torch.float16, torch.bfloat16)


def _can_run() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "needs a CUDA device"
    if not cuda_ext.has_forward():
        return False, f"dmattn._cuda has no forward ({cuda_ext.LOAD_ERROR or 'module built without it'})"
    if torch.cuda.get_device_capability() < (8, 0):
        return False, "the CUDA forward needs compute capability >= 8.0"
    return True, ""


_OK, _WHY = _can_run()
pytestmark = pytest.mark.skipif(not _OK, reason=_WHY)


def _built_head_dims() -> set[int]:
    text = cuda_ext.info().get("fwd_head_dims", "") if _OK else ""
    return {int(x) for x in text.replace(",", " ").split()}


def _need_head_dim(D: int) -> None:
    if D not in _built_head_dims():
        pytest.skip(f"head dim {D} not compiled in this build ({cuda_ext.info().get('fwd_head_dims')})")


def _run(case: Case, dtype, *, path: str = "dense", scale=None, bias_dtype=None, seed: int = 0, inputs=None):
    """Runs the kernel on the case's inputs and checks out and lse against the reference.

    path "dense": bias and mask go to the kernel, no window. path "list": the case's window with
    global scope, LIST metadata from ``cuda_ext.list_selection`` (the mask folded into it)."""
    _need_head_dim(case.D)
    q, k, v, bias, mask = inputs if inputs is not None else make_inputs(case, dtype, "cuda", seed, bias_dtype)
    idx = counts = None
    kernel_mask = mask
    window = None
    if path == "list":
        window = case.window
        meta = cuda_ext.list_selection(bias, mask, window=window, Q=case.Q, head_dim=case.D, is_causal=case.causal)
        assert meta is not None, "the case does not take the LIST path"
        idx, counts = meta
        kernel_mask = None
    out = torch.full((case.B, case.Q, case.H, case.D), math.nan, dtype=dtype, device="cuda")
    lse = torch.full((case.B, case.H, case.Q), math.nan, dtype=torch.float32, device="cuda")
    # splits=0: the one-block-per-query-block kernels even at Q <= 16 (tests/test_cuda_decode.py
    # tests the split forward those calls take by default).
    got_out, got_lse = cuda_ext.forward(q, k, v, bias, kernel_mask, scale=scale, softcap=case.softcap,
                                        is_causal=case.causal, idx=idx, counts=counts, out=out, lse=lse, splits=0)
    torch.cuda.synchronize()  # a launch or memory fault surfaces here, inside this test
    assert got_out is out and got_lse is lse

    opts = dict(window=window, topk_scope="global", is_causal=case.causal, scale=scale, softcap=case.softcap)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    truth = reference.attention(f64(q), f64(k), f64(v), f64(bias), mask, **opts)
    low = reference.attention(q, k, v, bias, mask, **opts)
    assert_close_to_reference((out, lse), low, truth, dtype, label=f"[{path} {case} {dtype}] ")
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_smoke(dtype):
    """The simplest call first: a fault here points at the kernel itself, not at a feature."""
    _run(Case(B=1, Q=128, K=128, H=1, H_kv=1, D=64, bias=None), dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_head_dims(D, dtype, causal):
    _run(Case(B=2, Q=65, K=65, H=4, H_kv=2, D=D, causal=causal), dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("QK", [(1, 1), (1, 577), (577, 1), (63, 65), (65, 63), (577, 577), (130, 61),
                                (17, 200), (128, 128), (129, 33), (300, 10)], ids=str)
def test_lengths(QK, D, causal):
    Q, K = QK
    _run(Case(B=1, Q=Q, K=K, H=2, H_kv=1, D=D, causal=causal), torch.bfloat16)


@pytest.mark.parametrize("H_kv", [8, 4, 1])
def test_gqa_mqa(H_kv):
    _run(Case(B=2, Q=97, K=131, H=8, H_kv=H_kv, D=128, causal=True), torch.float16)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_bias_forms(form):
    _run(Case(Q=63, K=65, D=64, bias=form, causal=True), torch.bfloat16)


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("form", ["b_hkv_1", "b_h_q"])
def test_bias_dtypes(form, bias_dtype):
    _run(Case(Q=65, K=70, D=128, bias=form, causal=True), torch.float16, bias_dtype=bias_dtype)


@pytest.mark.parametrize("bias", [None, "b_hkv_1"], ids=["no-bias", "bias"])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_mask_forms(form, bias):
    _run(Case(Q=64, K=77, D=64, bias=bias, mask=form, causal=False), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("softcap", [5.0, 30.0])
def test_softcap(softcap, D, dtype):
    _run(Case(Q=65, K=129, D=D, causal=True, softcap=softcap), dtype)


def test_scale_given():
    _run(Case(Q=65, K=65, D=64, causal=True), torch.bfloat16, scale=0.3)


def test_empty_rows_from_a_per_query_mask():
    case = Case(B=2, Q=70, K=90, H=4, H_kv=2, D=64, mask="b_h_q")
    q, k, v, bias, mask = make_inputs(case, torch.bfloat16, "cuda")
    mask[:, :, ::7] = False  # whole rows with nothing to see
    out, lse = _run(case, torch.bfloat16, inputs=(q, k, v, bias, mask))
    assert torch.isneginf(lse[:, :, ::7]).all() and (out[:, ::7] == 0).all()


def test_empty_rows_from_a_key_mask():
    case = Case(B=2, Q=70, K=90, H=4, H_kv=2, D=128, mask="b_hkv_1")
    q, k, v, bias, mask = make_inputs(case, torch.float16, "cuda")
    mask[1, 0] = False  # batch 1, kv head 0: query heads 0 and 1 see nothing
    out, lse = _run(case, torch.float16, inputs=(q, k, v, bias, mask))
    assert torch.isneginf(lse[1, :2]).all() and (out[1, :, :2] == 0).all()


def test_empty_blocks_causal_q_longer_than_k():
    # Q - K = 290 rows see nothing; the first two 128-row blocks are empty as a whole.
    out, lse = _run(Case(B=1, Q=300, K=10, H=2, H_kv=1, D=64, causal=True), torch.bfloat16)
    assert torch.isneginf(lse[:, :, :290]).all() and (out[:, :290] == 0).all()


def test_minus_inf_bias_is_an_empty_key():
    case = Case(B=1, Q=33, K=40, H=2, H_kv=1, D=64, bias="b_hkv_1")
    q, k, v, bias, mask = make_inputs(case, torch.bfloat16, "cuda", bias_dtype=torch.float32)
    bias[..., ::3] = -math.inf
    _run(case, torch.bfloat16, inputs=(q, k, v, bias, mask))


# ---------------------------------------------------------------- LIST path

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_list_head_dims(D, causal, dtype):
    _run(Case(B=2, Q=150, K=300, H=4, H_kv=2, D=D, window=100, scope="global", causal=causal), dtype, path="list")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("form", ["b_hkv_1", "1_hkv_1", "b_h_1", "1_1_1"])
@pytest.mark.parametrize("window", [1, 16, 100])
def test_list_bias_forms(window, form, causal):
    _run(Case(B=2, Q=129, K=257, H=4, H_kv=2, D=64, bias=form, window=window, scope="global", causal=causal),
         torch.bfloat16, path="list")


@pytest.mark.parametrize("QK", [(1, 577), (577, 577), (65, 63), (63, 65), (300, 40), (1000, 1000)], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_list_lengths(QK, causal):
    Q, K = QK
    _run(Case(B=1, Q=Q, K=K, H=2, H_kv=1, D=128, window=min(32, K - 1), scope="global", causal=causal),
         torch.bfloat16, path="list")


@pytest.mark.parametrize("mask", ["b_hkv_1", "1_1_1", "b_h_1"])
def test_list_with_key_mask(mask):
    _run(Case(B=2, Q=90, K=200, H=4, H_kv=2, D=64, mask=mask, window=48, scope="global", causal=True),
         torch.float16, path="list")


def test_list_with_ties_and_gqa():
    _run(Case(B=1, Q=200, K=400, H=8, H_kv=2, D=128, window=64, scope="global", causal=True, ties=True),
         torch.bfloat16, path="list")


def test_list_softcap():
    _run(Case(B=1, Q=200, K=200, H=2, H_kv=1, D=128, window=64, scope="global", causal=True, softcap=20.0),
         torch.float16, path="list")


def test_list_longer_sequence():
    _run(Case(B=1, Q=2048, K=2048, H=4, H_kv=2, D=128, window=256, scope="global", causal=True),
         torch.bfloat16, path="list")


# ---------------------------------------------------------------- layouts, determinism, errors

@pytest.mark.parametrize("q_layout", ["head-major", "misaligned"])
def test_strided_inputs(q_layout):
    """k and v as slices of one packed tensor (row stride 2 * H_kv * D), q with head-major storage
    (both read in place through their strides), or q 2 bytes off 16-byte alignment (copied by the
    wrapper)."""
    case = Case(B=2, Q=65, K=80, H=4, H_kv=2, D=64, causal=True)
    q, k, v, bias, mask = make_inputs(case, torch.bfloat16, "cuda")
    kv = torch.stack([k, v], dim=2)  # (B, K, 2, H_kv, D)
    if q_layout == "head-major":
        q_in = q.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        q_in = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")[1:].view(q.shape)
        q_in.copy_(q)
    _run(case, torch.bfloat16, inputs=(q_in, kv[:, :, 0], kv[:, :, 1], bias, mask))


@pytest.mark.parametrize("path", ["dense", "list"])
def test_deterministic(path):
    case = Case(B=2, Q=300, K=300, H=4, H_kv=2, D=128, window=64 if path == "list" else None, scope="global",
                causal=True)
    _need_head_dim(case.D)
    q, k, v, bias, _ = make_inputs(case, torch.bfloat16, "cuda")
    meta = cuda_ext.list_selection(bias, None, window=64, Q=case.Q, head_dim=case.D, is_causal=True) \
        if path == "list" else (None, None)
    runs = [cuda_ext.forward(q, k, v, bias, None, is_causal=True, idx=meta[0], counts=meta[1]) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def _small(dtype=torch.bfloat16, D=64):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, 2, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(1, 8, 1, D, device="cuda", generator=g).to(dtype)
    return q, k, k.clone()


@pytest.mark.parametrize("bad, exc, words", [
    (dict(D=48), ValueError, ["head dim", "48"]),
    (dict(dtype=torch.float32), TypeError, ["float16", "bfloat16"]),
    (dict(bias=(1, 3, 1, 8)), ValueError, ["bias", "(1|1, 2|1|1, 8|1, 8)"]),
    (dict(mask_dtype=torch.float32), TypeError, ["mask", "bool"]),
    (dict(counts=(1, 1, 5)), ValueError, ["counts", "shape"]),
    (dict(idx_dtype=torch.int64), TypeError, ["int32"]),
], ids=["head-dim", "dtype", "bias-shape", "mask-dtype", "counts-shape", "idx-dtype"])
def test_errors_name_the_argument(bad, exc, words):
    q, k, v = _small(bad.get("dtype", torch.bfloat16), bad.get("D", 64))
    bias = torch.zeros(bad.get("bias", (1, 1, 1, 8)), device="cuda")
    mask = torch.ones(1, 1, 1, 8, device="cuda", dtype=bad.get("mask_dtype", torch.bool))
    idx = counts = None
    if "counts" in bad or "idx_dtype" in bad:
        idx = torch.arange(4, device="cuda", dtype=bad.get("idx_dtype", torch.int32)).view(1, 1, 4)
        counts = torch.full(bad.get("counts", (1, 1, 1)), 4, device="cuda", dtype=torch.int32)
        mask = None
    with pytest.raises(exc) as err:
        cuda_ext.forward(q, k, v, bias, mask, idx=idx, counts=counts)
    for w in words:
        assert w in str(err.value), f"{w!r} not in {err.value!s}"


def test_block_m_matches_the_counts_layout():
    for D in sorted(_built_head_dims()):
        bm = cuda_ext.fwd_block_m(D)
        assert bm in (64, 128), (D, bm)


@pytest.mark.parametrize("D", [64, 128])
def test_matches_triton_forward(D):
    """Same metadata, two kernels: the CUDA and Triton forwards agree (a diagnostic when the
    reference comparison fails for a reason both would share)."""
    _need_head_dim(D)
    pytest.importorskip("triton")
    import dmattn

    case = Case(B=1, Q=513, K=513, H=4, H_kv=2, D=D, window=96, scope="global", causal=True)
    q, k, v, bias, _ = make_inputs(case, torch.bfloat16, "cuda")
    idx, counts = cuda_ext.list_selection(bias, None, window=96, Q=case.Q, head_dim=D, is_causal=True)
    out, lse = cuda_ext.forward(q, k, v, bias, None, is_causal=True, idx=idx, counts=counts)
    t_out, t_lse = dmattn.dma_attention(q, k, v, bias, window=96, topk_scope="global", is_causal=True,
                                        return_lse=True, backend="triton")
    torch.testing.assert_close(out.float(), t_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, t_lse, atol=1e-3, rtol=1e-3)

