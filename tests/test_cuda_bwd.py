"""The CuTe backward (``dmattn._cuda.bwd`` through ``dmattn.cuda_ext.backward``) against the float64
reference gradients, on both key-visiting paths (DENSE and LIST). GPU only: skipped without a CUDA
device or without a module that has the backward.

The forward whose out and lse the backward consumes is the CUDA forward (tests/test_cuda_fwd.py
holds it to the reference). dq, dk and dv start as NaN, so an element the kernels forget fails
(on the LIST path dk and dv are zero-filled by the wrapper: keys in no list get no gradient and no
thread block visits them). Tolerance: the FlashAttention rule of ``cases.assert_close_to_reference``
(kernel error <= 2x the same-precision PyTorch error + floor), for dq, dk, dv and dbias.

The first tests are the simplest calls: a failure there points at the kernels themselves.
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
    if not cuda_ext.has_backward():
        return False, f"dmattn._cuda has no backward ({cuda_ext.LOAD_ERROR or 'module built without it'})"
    if torch.cuda.get_device_capability() < (8, 0):
        return False, "the CUDA backward needs compute capability >= 8.0"
    return True, ""


_OK, _WHY = _can_run()
pytestmark = pytest.mark.skipif(not _OK, reason=_WHY)


def _built_head_dims() -> set[int]:
    text = cuda_ext.info().get("bwd_head_dims", "") if _OK else ""
    return {int(x) for x in text.replace(",", " ").split()}


def _need_head_dim(D: int) -> None:
    if D not in _built_head_dims():
        pytest.skip(f"head dim {D} not compiled in this build ({cuda_ext.info().get('bwd_head_dims')})")


def _grads(case: Case, dtype, inputs, *, path: str, scale=None, need_dbias=None, need_dq=True, need_dkdv=True,
           dout_seed: int = 1):
    """Forward then backward with the CUDA kernels; returns (dq, dk, dv, dbias, dout)."""
    q, k, v, bias, mask = inputs
    idx = counts = None
    kernel_mask = mask
    if path == "list":
        meta = cuda_ext.list_selection(bias, mask, window=case.window, Q=case.Q, head_dim=case.D,
                                       is_causal=case.causal)
        assert meta is not None, "the case does not take the LIST path"
        idx, counts = meta
        kernel_mask = None
    out, lse = cuda_ext.forward(q, k, v, bias, kernel_mask, scale=scale, softcap=case.softcap, is_causal=case.causal,
                                idx=idx, counts=counts)
    g = torch.Generator(device="cuda").manual_seed(dout_seed)
    dout = torch.randn(out.shape, device="cuda", generator=g).to(dtype)
    nan = lambda shape: torch.full(shape, math.nan, dtype=dtype, device="cuda")  # noqa: E731
    dq = nan(q.shape) if need_dq else None
    dk = nan(k.shape) if need_dkdv else None
    dv = nan(v.shape) if need_dkdv else None
    got = cuda_ext.backward(dout, q, k, v, out, lse, bias, kernel_mask, scale=scale, softcap=case.softcap,
                            is_causal=case.causal, idx=idx, need_dq=need_dq, need_dkdv=need_dkdv,
                            need_dbias=need_dbias, dq=dq, dk=dk, dv=dv)
    torch.cuda.synchronize()  # a launch or memory fault surfaces here, inside this test
    return (*got, dout)


def _run(case: Case, dtype, *, path: str = "dense", scale=None, bias_dtype=None, seed: int = 0, inputs=None,
         need_dbias=None, need_dq=True, need_dkdv=True):
    """Runs forward + backward on the case's inputs and checks dq, dk, dv and dbias against the
    float64 reference. path "dense": bias and mask go to the kernels, no window. path "list": the
    case's window with global scope, LIST metadata from ``cuda_ext.list_selection``."""
    _need_head_dim(case.D)
    inputs = inputs if inputs is not None else make_inputs(case, dtype, "cuda", seed, bias_dtype)
    q, k, v, bias, mask = inputs
    dq, dk, dv, dbias, dout = _grads(case, dtype, inputs, path=path, scale=scale, need_dbias=need_dbias,
                                     need_dq=need_dq, need_dkdv=need_dkdv)
    window = case.window if path == "list" else None
    opts = dict(window=window, topk_scope="global", is_causal=case.causal, scale=scale, softcap=case.softcap)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    truth = reference.attention_backward(f64(q), f64(k), f64(v), f64(bias), mask, f64(dout), **opts)
    low = reference.attention_backward(q, k, v, bias, mask, dout, **opts)
    keep = (need_dq, need_dkdv, need_dkdv, bias is not None and need_dbias is not False)
    pick = lambda grads: tuple(x if w else None for x, w in zip(grads, keep))  # noqa: E731
    assert_close_to_reference((None, None, dq, dk, dv, dbias), (None, None, *pick(low)), (None, None, *pick(truth)),
                              dtype, label=f"[{path} {case} {dtype}] ")
    return dq, dk, dv, dbias


# ---------------------------------------------------------------- smoke tests first

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_smoke_dense_no_bias(dtype):
    _run(Case(B=1, Q=128, K=128, H=1, H_kv=1, D=128, bias=None), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_smoke_dense_bias_causal(dtype):
    _run(Case(B=1, Q=128, K=128, H=2, H_kv=1, D=128, causal=True), dtype)


def test_smoke_list():
    _run(Case(B=1, Q=128, K=256, H=2, H_kv=1, D=128, window=64, scope="global", causal=True), torch.bfloat16,
         path="list")


def test_matches_autograd_of_the_reference():
    """The reference's written-out backward is what the other tests compare with; here autograd of
    the reference forward is the judge once, on a case with most features."""
    case = Case(B=1, Q=70, K=90, H=4, H_kv=2, D=128, bias="b_h_q", mask="b_hkv_1", causal=True, softcap=10.0)
    _need_head_dim(case.D)
    q, k, v, bias, mask = make_inputs(case, torch.float16, "cuda")
    dq, dk, dv, dbias, dout = _grads(case, torch.float16, (q, k, v, bias, mask), path="dense")
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, bias)]
    out, _ = reference.attention(*leaves, mask, is_causal=True, softcap=10.0)
    want = torch.autograd.grad(out, leaves, dout.double())
    for name, got, ref in zip(("dq", "dk", "dv", "dbias"), (dq, dk, dv, dbias), want):
        torch.testing.assert_close(got.double(), ref, atol=3e-2, rtol=3e-2, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------- DENSE path

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
    """Query-broadcast forms take the (B, H, K) dbias partial of the dk/dv kernel, per-query forms
    the (B, H, Q, K) dS buffer of the dq kernel."""
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


def test_softcap_per_query_bias():
    _run(Case(Q=65, K=100, D=128, bias="b_h_q", causal=True, softcap=8.0), torch.bfloat16)


def test_scale_given():
    _run(Case(Q=65, K=65, D=64, causal=True), torch.bfloat16, scale=0.3)


def test_empty_rows_from_a_per_query_mask():
    case = Case(B=2, Q=70, K=90, H=4, H_kv=2, D=64, mask="b_h_q")
    q, k, v, bias, mask = make_inputs(case, torch.bfloat16, "cuda")
    mask[:, :, ::7] = False  # whole rows with nothing to see
    dq, *_ = _run(case, torch.bfloat16, inputs=(q, k, v, bias, mask))
    assert (dq[:, ::7] == 0).all()


def test_empty_rows_from_a_key_mask():
    case = Case(B=2, Q=70, K=90, H=4, H_kv=2, D=128, mask="b_hkv_1")
    q, k, v, bias, mask = make_inputs(case, torch.float16, "cuda")
    mask[1, 0] = False  # batch 1, kv head 0: query heads 0 and 1 see nothing
    dq, dk, dv, dbias = _run(case, torch.float16, inputs=(q, k, v, bias, mask))
    assert (dq[1, :, :2] == 0).all() and (dk[1, :, 0] == 0).all() and (dv[1, :, 0] == 0).all()
    assert (dbias[1, 0] == 0).all()


def test_empty_blocks_causal_q_longer_than_k():
    dq, *_ = _run(Case(B=1, Q=300, K=10, H=2, H_kv=1, D=64, causal=True), torch.bfloat16)
    assert (dq[:, :290] == 0).all()


def test_minus_inf_bias_is_an_empty_key():
    case = Case(B=1, Q=33, K=40, H=2, H_kv=1, D=64, bias="b_hkv_1")
    q, k, v, bias, mask = make_inputs(case, torch.bfloat16, "cuda", bias_dtype=torch.float32)
    bias[..., ::3] = -math.inf
    _run(case, torch.bfloat16, inputs=(q, k, v, bias, mask))


# A per-query bias never takes the LIST path, so it has only the DENSE case.
@pytest.mark.parametrize("form, path", [("b_hkv_1", "dense"), ("b_hkv_1", "list"), ("b_h_q", "dense")])
def test_dbias_only(form, path):
    """Training only the bias: no dq, dk or dv is computed or written."""
    case = Case(B=2, Q=90, K=150, H=4, H_kv=2, D=128, bias=form, causal=True,
                window=40 if path == "list" else None, scope="global")
    dq, dk, dv, dbias = _run(case, torch.bfloat16, path=path, need_dq=False, need_dkdv=False)
    assert dq is None and dk is None and dv is None and dbias is not None


def test_dq_only_and_dkdv_only():
    case = Case(B=1, Q=100, K=120, H=4, H_kv=2, D=128, bias="b_h_q", causal=True)
    _run(case, torch.float16, need_dkdv=False, need_dbias=False)
    _run(case, torch.float16, need_dq=False, need_dbias=False)


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
    """b_h_1 gives one list per query head (H > H_kv): float32 per-head dk/dv partials."""
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


def test_list_per_head_lists_mqa():
    _run(Case(B=1, Q=130, K=300, H=4, H_kv=1, D=128, bias="b_h_1", window=50, scope="global", causal=True),
         torch.float16, path="list")


SPLIT_CASES = [
    Case(B=2, Q=129, K=257, H=4, H_kv=2, D=64, bias="b_hkv_1", window=100, scope="global", causal=True),
    Case(B=1, Q=200, K=400, H=8, H_kv=1, D=128, bias="1_1_1", window=64, scope="global"),  # MQA, one list
    # ~70% of the keys allowed, w = 190 of 200: every list ends in padding entries (key K)
    Case(B=2, Q=90, K=200, H=4, H_kv=2, D=64, mask="b_hkv_1", window=190, scope="global", causal=True),
    Case(B=1, Q=70, K=300, H=6, H_kv=2, D=96, window=130, scope="global", causal=True, softcap=10.0),
]


@pytest.mark.parametrize("waves", [0, 2], ids=["per-kv-head", "split"])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=str)
def test_list_split_dkdv(case, waves, monkeypatch):
    """GQA/MQA on the LIST path with one list per kv head (or one for all): the dk/dv kernel per kv
    head looping over its query heads (waves 0), or per query head with float32 partials by list
    position summed per kv head by a second kernel (``cuda_ext.split_dkdv``), both against the
    reference; the split is also bitwise deterministic."""
    _need_head_dim(case.D)
    monkeypatch.setattr(cuda_ext, "SPLIT_DKDV_WAVES", waves)
    W = min(case.window, case.K)
    assert cuda_ext.split_dkdv(case.B, case.H, case.H_kv, W, case.D, torch.cuda.current_device()) == (waves > 0)
    inputs = make_inputs(case, torch.bfloat16, "cuda")
    first = _run(case, torch.bfloat16, path="list", inputs=inputs)
    if waves:
        again = _grads(case, torch.bfloat16, inputs, path="list")[:4]
        for name, a, b in zip(("dq", "dk", "dv", "dbias"), first, again):
            assert torch.equal(a, b), f"{name} differs between two runs"


# Lists of several key tiles (128 keys each), so that the sm_90a dq kernel reuses its stages (2 at
# D = 128, 4 at D = 64) and its 128-row items take the longer prefix of their two count blocks, and
# the sm_90a dk/dv kernel streams many query blocks through its two stages; GQA/MQA with one list per
# kv head (dk/dv per query head with partials, or per kv head looping over its heads: waves 0), one
# list per query head (float32 per-head dk/dv), a key mask (keys in a list that no query sees),
# softcap, and no causality.
SM90_BWD_CASES = [
    Case(B=1, Q=1500, K=1500, H=4, H_kv=2, D=128, window=700, scope="global", causal=True),
    Case(B=2, Q=1100, K=1300, H=4, H_kv=1, D=64, bias="1_hkv_1", window=1000, scope="global", causal=True,
         softcap=15.0),
    Case(B=1, Q=300, K=900, H=2, H_kv=2, D=128, bias="1_1_1", window=600, scope="global"),
    Case(B=2, Q=257, K=700, H=4, H_kv=2, D=64, mask="b_hkv_1", window=650, scope="global", causal=True),
    Case(B=1, Q=700, K=650, H=4, H_kv=2, D=128, bias="b_h_1", window=400, scope="global", causal=True),
]


@pytest.mark.parametrize("waves", [2, 0], ids=["split", "per-kv-head"])
@pytest.mark.parametrize("sm90", [True, False], ids=["sm90", "sm80"])
@pytest.mark.parametrize("case", SM90_BWD_CASES, ids=str)
def test_list_backward_kernels(case, sm90, waves, monkeypatch):
    """The LIST backward on both sets of kernels: the sm_90a dq and dk/dv kernels
    (``cuda_ext.SM90_BACKWARD``; H100/H200, D 64 and 128, reading the forward's compact copy) and the
    sm_80 ones, each against the reference in float16 and bfloat16."""
    _need_head_dim(case.D)
    monkeypatch.setattr(cuda_ext, "SM90_BACKWARD", sm90)
    monkeypatch.setattr(cuda_ext, "SPLIT_DKDV_WAVES", waves)
    if sm90 and not cuda_ext.uses_sm90(case.D):
        pytest.skip("the sm_90a backward needs compute capability 9.0 and a build with sm_90a code")
    for dtype in DTYPES:
        _run(case, dtype, path="list")


def test_list_softcap():
    _run(Case(B=1, Q=200, K=200, H=2, H_kv=1, D=128, window=64, scope="global", causal=True, softcap=20.0),
         torch.float16, path="list")


def test_list_longer_sequence():
    _run(Case(B=1, Q=2048, K=2048, H=4, H_kv=2, D=128, window=256, scope="global", causal=True),
         torch.bfloat16, path="list")


# ---------------------------------------------------------------- layouts, determinism, errors

def test_strided_inputs():
    """k and v as slices of one packed tensor, q with head-major storage: read through strides."""
    case = Case(B=2, Q=65, K=80, H=4, H_kv=2, D=64, causal=True)
    q, k, v, bias, mask = make_inputs(case, torch.bfloat16, "cuda")
    kv = torch.stack([k, v], dim=2)
    q_in = q.transpose(1, 2).contiguous().transpose(1, 2)
    _run(case, torch.bfloat16, inputs=(q_in, kv[:, :, 0], kv[:, :, 1], bias, mask))


@pytest.mark.parametrize("path,form", [("dense", "b_hkv_1"), ("dense", "b_h_q"), ("list", "b_hkv_1"),
                                       ("list", "b_h_1")])
def test_deterministic(path, form):
    """Two runs give bitwise equal gradients (no atomics anywhere)."""
    case = Case(B=2, Q=300, K=300, H=4, H_kv=2, D=128, bias=form, window=64 if path == "list" else None,
                scope="global", causal=True)
    _need_head_dim(case.D)
    inputs = make_inputs(case, torch.bfloat16, "cuda")
    runs = [_grads(case, torch.bfloat16, inputs, path=path) for _ in range(2)]
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), runs[0][:4], runs[1][:4]):
        assert torch.equal(a, b), f"{name} differs between two runs"


def _small(dtype=torch.bfloat16, D=128):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, 2, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(1, 8, 1, D, device="cuda", generator=g).to(dtype)
    return q, k, k.clone()


def _raw_bwd(q, k, v, bias=None, **over):
    """The binding called directly, with some arguments replaced by ``over``."""
    B, Q, H, D = q.shape
    args = dict(q=q, k=k, v=v, out=torch.zeros_like(q), lse=torch.zeros(B, H, Q, device="cuda"),
                dout=torch.zeros_like(q), bias=bias, mask=None, idx=None, counts=None,
                delta=torch.empty(B, H, Q, device="cuda"), dq=torch.empty_like(q), dk=torch.empty_like(k),
                dv=torch.empty_like(v), dbias_keys=None, ds=None)
    extra = {name: over.pop(name) for name in ("dkdv_part",) if name in over}
    args.update(over)
    stream = torch.cuda.current_stream().cuda_stream
    cuda_ext._cuda.bwd(*args.values(), scale=D ** -0.5, softcap=0.0, causal=False, stream=stream, **extra)


@pytest.mark.parametrize("over, exc, words", [
    (dict(delta=(1, 2, 7)), ValueError, ["delta", "shape"]),
    (dict(dq_dtype=torch.float32), TypeError, ["dq", "dtype"]),
    (dict(dk=(1, 8, 2, 128)), ValueError, ["dk", "shape"]),
    (dict(dbias_keys=(1, 2, 8)), ValueError, ["dbias_keys", "query-broadcast"]),
    (dict(ds=(1, 2, 8, 8)), ValueError, ["ds", "per-query"]),
    (dict(dv=None), ValueError, ["dk and dv"]),
], ids=["delta-shape", "dq-dtype", "dk-shape", "dbias-keys-without-bias", "ds-without-per-query-bias", "dv-alone"])
def test_errors_name_the_argument(over, exc, words):
    q, k, v = _small()
    _need_head_dim(q.shape[-1])
    args = {}
    for name, value in over.items():
        if name == "dq_dtype":
            args["dq"] = torch.empty(q.shape, device="cuda", dtype=value)
        elif isinstance(value, tuple):
            args[name] = torch.empty(value, device="cuda", dtype=q.dtype if name in ("dk", "dv") else torch.float32)
        else:
            args[name] = value
    with pytest.raises(exc) as err:
        _raw_bwd(q, k, v, **args)
    for w in words:
        assert w in str(err.value), f"{w!r} not in {err.value!s}"


def test_per_head_lists_need_float32_partials():
    q, k, v = _small()
    _need_head_dim(q.shape[-1])
    bias = torch.zeros(1, 2, 1, 8, device="cuda")
    idx = torch.arange(4, device="cuda", dtype=torch.int32).view(1, 1, 4).expand(1, 2, 4).contiguous()
    counts = torch.full((1, 2, 1), 4, device="cuda", dtype=torch.int32)
    wrong = dict(dk=torch.empty(1, 8, 2, 128, device="cuda", dtype=q.dtype),
                 dv=torch.empty(1, 8, 2, 128, device="cuda", dtype=q.dtype))
    with pytest.raises(TypeError) as err:
        _raw_bwd(q, k, v, bias, idx=idx, counts=counts, **wrong)
    assert "float32" in str(err.value) and "per-head" in str(err.value)


def test_dkdv_part_refusals():
    """The split dk/dv's partials: LIST only, with lists per kv head, in the exact layout."""
    q, k, v = _small()  # H 2, H_kv 1, K 8
    _need_head_dim(q.shape[-1])
    idx = torch.arange(4, device="cuda", dtype=torch.int32).view(1, 1, 4)
    counts = torch.full((1, 1, 1), 4, device="cuda", dtype=torch.int32)
    part = torch.empty(2, 1, 2, 4, 128, device="cuda")
    with pytest.raises(ValueError, match="dkdv_part is for the LIST path"):
        _raw_bwd(q, k, v, dkdv_part=part)  # no idx
    with pytest.raises(ValueError, match="dkdv_part"):
        _raw_bwd(q, k, v, idx=idx, counts=counts, dkdv_part=part[:, :, :, :3])
    with pytest.raises(TypeError, match="dkdv_part"):
        _raw_bwd(q, k, v, idx=idx, counts=counts, dkdv_part=part.to(torch.bfloat16))


def test_block_m_matches_the_counts_layout():
    for D in sorted(_built_head_dims()):
        assert cuda_ext.bwd_dq_block_m(D) in (64, 128), D


@pytest.mark.parametrize("path", ["dense", "list"])
def test_matches_triton_backward(path):
    """Same problem, two implementations: the CUDA and Triton gradients agree (a diagnostic when the
    reference comparison fails for a reason both would share)."""
    pytest.importorskip("triton")
    import dmattn

    case = Case(B=1, Q=513, K=513, H=4, H_kv=2, D=128, window=96 if path == "list" else None, scope="global",
                causal=True)
    _need_head_dim(case.D)
    inputs = make_inputs(case, torch.bfloat16, "cuda")
    dq, dk, dv, dbias, dout = _grads(case, torch.bfloat16, inputs, path=path)
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs[:4]]
    out = dmattn.dma_attention(*leaves, window=case.window, topk_scope="global", is_causal=True, backend="triton")
    want = torch.autograd.grad(out, leaves, dout)
    for name, got, ref in zip(("dq", "dk", "dv", "dbias"), (dq, dk, dv, dbias), want):
        torch.testing.assert_close(got.float(), ref.float(), atol=3e-2, rtol=3e-2, msg=lambda m, n=name: f"{n}: {m}")
