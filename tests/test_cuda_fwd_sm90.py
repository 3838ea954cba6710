"""The sm_90a (wgmma) CUDA forward against the float64 reference, and the sm_80 forward when the
sm_90a one is switched off (``cuda_ext.set_sm90_enabled(False)``). GPU only: skipped unless the
current device is compute capability 9.0 and the module was built with sm_90a code.

The sm_90a kernel is on by default; the fixtures switch it on (or off) per test and restore the
previous state. Every test first asserts which kernel the
dispatch picks (``cuda_ext.uses_sm90``), so a pass here is a pass of the kernel named in the test.
Outputs start as NaN (``test_cuda_fwd._run``), so an element the kernel forgets fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from cases import Case, make_inputs
from dmattn import cuda_ext
from test_cuda_fwd import _OK, _WHY, _run

SM90_HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)


def _sm90_ready() -> tuple[bool, str]:
    if not _OK:
        return False, _WHY
    if not cuda_ext.has_sm90_switch():
        return False, "dmattn._cuda predates the sm_90a forward"
    if torch.cuda.get_device_capability() != (9, 0):
        return False, "the sm_90a forward needs a compute capability 9.0 GPU (H100/H200)"
    if not cuda_ext.info().get("fwd_sm90a"):
        return False, "dmattn._cuda was built without an sm_90a target (DMATTN_CUDA_ARCHS)"
    return True, ""


_READY, _NOT_READY = _sm90_ready()
pytestmark = pytest.mark.skipif(not _READY, reason=_NOT_READY)


@pytest.fixture(params=["sm90", "sm80"])
def kernel(request):
    """Runs a test once with the sm_90a kernel selected and once with it switched off."""
    before = cuda_ext.sm90_enabled()
    cuda_ext.set_sm90_enabled(request.param == "sm90")
    yield request.param
    cuda_ext.set_sm90_enabled(before)


@pytest.fixture
def sm90():
    before = cuda_ext.sm90_enabled()
    cuda_ext.set_sm90_enabled(True)
    yield
    cuda_ext.set_sm90_enabled(before)


def _need_sm90_head_dim(D: int) -> None:
    if D not in {int(x) for x in cuda_ext.info()["fwd_sm90_head_dims"].replace(",", " ").split()}:
        pytest.skip(f"head dim {D} has no sm_90a kernel in this build")


def _check(case: Case, dtype, kernel: str = "sm90", per_query: bool = False, **kw):
    """_run after asserting that the dispatch picks `kernel` for this case."""
    _need_sm90_head_dim(case.D)
    assert cuda_ext.uses_sm90(case.D, per_query) == (kernel == "sm90"), (kernel, case.D, per_query)
    return _run(case, dtype, **kw)


@pytest.mark.parametrize("D", SM90_HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_smoke(dtype, D, kernel):
    _check(Case(B=1, Q=128, K=128, H=1, H_kv=1, D=D, bias=None), dtype, kernel)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", SM90_HEAD_DIMS)
@pytest.mark.parametrize("path", ["dense", "list"])
def test_paths(path, D, dtype, causal, kernel):
    window = 100 if path == "list" else None
    _check(Case(B=2, Q=150, K=300, H=4, H_kv=2, D=D, window=window, scope="global", causal=causal), dtype,
           kernel, path=path)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", SM90_HEAD_DIMS)
@pytest.mark.parametrize("QK", [(1, 1), (1, 577), (577, 1), (63, 65), (65, 63), (577, 577), (130, 61), (17, 200),
                                (129, 33), (300, 10), (128, 1000)], ids=str)
def test_dense_lengths(QK, D, causal, sm90):
    Q, K = QK
    _check(Case(B=1, Q=Q, K=K, H=2, H_kv=1, D=D, causal=causal), torch.bfloat16)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("QK", [(1, 577), (577, 577), (65, 63), (63, 65), (300, 40), (1000, 1000)], ids=str)
def test_list_lengths(QK, causal, sm90):
    Q, K = QK
    _check(Case(B=1, Q=Q, K=K, H=2, H_kv=1, D=128, window=min(300, K - 1), scope="global", causal=causal),
           torch.float16, path="list")


@pytest.mark.parametrize("path", ["dense", "list"])
@pytest.mark.parametrize("H_kv", [8, 4, 1])
def test_gqa_mqa(H_kv, path, sm90):
    _check(Case(B=2, Q=197, K=331, H=8, H_kv=H_kv, D=128, window=150 if path == "list" else None, scope="global",
                causal=True), torch.float16, path=path)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", SM90_HEAD_DIMS)
@pytest.mark.parametrize("softcap", [5.0, 30.0])
@pytest.mark.parametrize("path", ["dense", "list"])
def test_softcap(path, softcap, D, dtype, sm90):
    _check(Case(Q=165, K=329, D=D, causal=True, softcap=softcap, window=200 if path == "list" else None,
                scope="global"), dtype, path=path)


@pytest.mark.parametrize("form", ["b_hkv_1", "1_hkv_1", "b_h_1", "1_1_1"])
@pytest.mark.parametrize("path", ["dense", "list"])
def test_bias_forms(form, path, sm90):
    _check(Case(B=2, Q=129, K=257, H=4, H_kv=2, D=64, bias=form, causal=True,
                window=100 if path == "list" else None, scope="global"), torch.bfloat16, path=path)


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_bias_dtypes(bias_dtype, sm90):
    _check(Case(Q=65, K=270, D=128, causal=True), torch.float16, bias_dtype=bias_dtype)


@pytest.mark.parametrize("bias", [None, "b_hkv_1"], ids=["no-bias", "bias"])
@pytest.mark.parametrize("form", ["b_hkv_1", "1_hkv_1", "b_h_1", "1_1_1"])
def test_key_mask_forms(form, bias, sm90):
    _check(Case(Q=64, K=277, D=64, bias=bias, mask=form, causal=False), torch.bfloat16)


def test_scale_given(sm90):
    _check(Case(Q=65, K=165, D=64, causal=True), torch.bfloat16, scale=0.3)


@pytest.mark.parametrize("D", SM90_HEAD_DIMS)
def test_empty_rows_from_a_key_mask(D, sm90):
    case = Case(B=2, Q=70, K=290, H=4, H_kv=2, D=D, mask="b_hkv_1")
    q, k, v, bias, mask = make_inputs(case, torch.float16, "cuda")
    mask[1, 0] = False  # batch 1, kv head 0: query heads 0 and 1 see nothing
    out, lse = _check(case, torch.float16, inputs=(q, k, v, bias, mask))
    assert torch.isneginf(lse[1, :2]).all() and (out[1, :, :2] == 0).all()


@pytest.mark.parametrize("path", ["dense", "list"])
def test_empty_blocks_causal_q_longer_than_k(path, sm90):
    # Q - K = 290 rows see nothing; the first two 128-row blocks are empty as a whole, the third
    # partly (rows with a visible key next to rows without).
    case = Case(B=1, Q=300, K=10, H=2, H_kv=1, D=64, causal=True, window=4 if path == "list" else None,
                scope="global")
    out, lse = _check(case, torch.bfloat16, path=path)
    assert torch.isneginf(lse[:, :, :290]).all() and (out[:, :290] == 0).all()
    assert not torch.isnan(out).any()


def test_minus_inf_bias_is_an_empty_key(sm90):
    case = Case(B=1, Q=33, K=140, H=2, H_kv=1, D=64, bias="b_hkv_1")
    q, k, v, bias, mask = make_inputs(case, torch.bfloat16, "cuda", bias_dtype=torch.float32)
    bias[..., ::3] = -math.inf
    _check(case, torch.bfloat16, inputs=(q, k, v, bias, mask))


def test_list_with_ties_and_gqa(sm90):
    _check(Case(B=1, Q=200, K=400, H=8, H_kv=2, D=128, window=64, scope="global", causal=True, ties=True),
           torch.bfloat16, path="list")


@pytest.mark.parametrize("D", SM90_HEAD_DIMS)
def test_list_longer_sequence(D, sm90):
    # 2048 keys in the list: 16 tiles per late block, both shared-memory stages reused many times.
    _check(Case(B=1, Q=4096, K=4096, H=4, H_kv=2, D=D, window=2048, scope="global", causal=True),
           torch.bfloat16, path="list")


@pytest.mark.parametrize("softcap", [None, 20.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", SM90_HEAD_DIMS)
def test_dense_longer_sequence(D, causal, softcap, sm90):
    # 2100 keys: 17 tiles, the last partial. The producer's full/empty mbarriers of every stage
    # (2 at D = 128, 4 at D = 64) go through several phases of both parities, and the consumer
    # warpgroups hand the turn to each other 18 times per block.
    _check(Case(B=1, Q=2100, K=2100, H=4, H_kv=2, D=D, causal=causal, softcap=softcap), torch.bfloat16)


@pytest.mark.parametrize("D", SM90_HEAD_DIMS)
def test_many_blocks_per_sm(D, sm90):
    # More thread blocks than an H200 runs at once (one per SM), with blocks of 1 to 9 tiles: every
    # block sets up its own barriers, and no state of the previous block on that SM may leak in.
    _check(Case(B=4, Q=1100, K=1100, H=16, H_kv=4, D=D, causal=True), torch.float16)


def test_strided_kv(sm90):
    """k and v as slices of one packed tensor (row stride 2 * H_kv * D), read in place."""
    case = Case(B=2, Q=65, K=180, H=4, H_kv=2, D=64, causal=True)
    q, k, v, bias, mask = make_inputs(case, torch.bfloat16, "cuda")
    kv = torch.stack([k, v], dim=2)
    _check(case, torch.bfloat16, inputs=(q, kv[:, :, 0], kv[:, :, 1], bias, mask))


def test_per_query_bias_stays_on_sm80(sm90):
    """A bias that differs per query row is not this kernel's: the dispatch sends it to sm_80."""
    _check(Case(Q=63, K=165, D=128, bias="b_h_q", causal=True), torch.bfloat16, kernel="sm80", per_query=True)


def test_switch_off_sends_to_sm80():
    before = cuda_ext.sm90_enabled()
    try:
        cuda_ext.set_sm90_enabled(False)
        assert not cuda_ext.sm90_enabled() and not cuda_ext.uses_sm90(128)
        cuda_ext.set_sm90_enabled(True)
        assert cuda_ext.sm90_enabled() and cuda_ext.uses_sm90(128)
    finally:
        cuda_ext.set_sm90_enabled(before)


@pytest.mark.parametrize("path", ["dense", "list"])
def test_deterministic_and_close_to_sm80(path):
    """Bitwise the same from run to run, and within rounding of the sm_80 kernel."""
    case = Case(B=2, Q=600, K=700, H=4, H_kv=2, D=128, causal=True)
    q, k, v, bias, _ = make_inputs(case, torch.bfloat16, "cuda")
    meta = cuda_ext.list_selection(bias, None, window=300, Q=case.Q, head_dim=case.D, is_causal=True) \
        if path == "list" else (None, None)
    before = cuda_ext.sm90_enabled()
    try:
        runs = {}
        for name in ("sm90", "sm80"):
            cuda_ext.set_sm90_enabled(name == "sm90")
            runs[name] = [cuda_ext.forward(q, k, v, bias, None, is_causal=True, idx=meta[0], counts=meta[1])
                          for _ in range(2)]
    finally:
        cuda_ext.set_sm90_enabled(before)
    a, b = runs["sm90"]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0].float(), runs["sm80"][0][0].float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(a[1], runs["sm80"][0][1], atol=1e-3, rtol=1e-3)


def _compact_bytes_by_layout(B: int, compact_heads: int, W: int, D: int) -> int:
    """The compact copy's size from its documented layout (FwdParams::compact): per (batch, compact
    head) and tile of 128 list entries, a K and a V image of 128 x D 16-bit elements, then 128 int32
    keys and 128 float32 bias values."""
    return B * compact_heads * -(-W // 128) * 128 * (2 * D * 2 + 8)


@pytest.mark.parametrize("bias, H_kv, compact_heads", [("b_hkv_1", 2, 2), ("b_h_1", 2, 4), ("1_1_1", 1, 1),
                                                       ("1_hkv_1", 4, 4)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_list_takes_the_compact_copy(bias, H_kv, compact_heads, causal, sm90):
    """A LIST call on this kernel gathers the listed rows once into tile images (one copy per kv
    head, or per query head when the selection is per query head) and loads them whole: the size
    asked for follows the layout, and the result matches the reference. W = 150 leaves a partial
    last tile, whose entries past a block's count belong to later blocks (causal) or are padding."""
    case = Case(B=2, Q=300, K=400, H=4, H_kv=H_kv, D=128, bias=bias, window=150, scope="global", causal=causal)
    q, k, v, b, _ = make_inputs(case, torch.bfloat16, "cuda")
    idx, _ = cuda_ext.list_selection(b, None, window=150, Q=case.Q, head_dim=case.D, is_causal=causal)
    assert cuda_ext.compact_bytes(q, k, b, None, idx) == _compact_bytes_by_layout(2, compact_heads, 150, 128)
    _check(case, torch.bfloat16, path="list", inputs=(q, k, v, b, None))


def test_heads_that_cannot_share_a_copy_gather_rows(sm90):
    """Lists per kv head with a mask per query head: a compact head would mix mask heads, so the
    call takes no copy (compact_bytes 0) and the kernel gathers rows itself; it still matches the
    sm_80 kernel on the same lists and mask."""
    case = Case(B=1, Q=200, K=300, H=4, H_kv=2, D=128, bias="b_hkv_1", mask="b_h_1", causal=True)
    _need_sm90_head_dim(case.D)
    q, k, v, b, mask = make_inputs(case, torch.bfloat16, "cuda")
    idx, counts = cuda_ext.list_selection(b, None, window=100, Q=case.Q, head_dim=case.D, is_causal=True)
    assert cuda_ext.compact_bytes(q, k, b, mask, idx) == 0
    before = cuda_ext.sm90_enabled()
    try:
        runs = {}
        for name in ("sm90", "sm80"):
            cuda_ext.set_sm90_enabled(name == "sm90")
            out = torch.full_like(q, math.nan)
            lse = torch.full((1, 4, case.Q), math.nan, device="cuda")
            runs[name] = cuda_ext.forward(q, k, v, b, mask, is_causal=True, idx=idx, counts=counts, out=out, lse=lse)
    finally:
        cuda_ext.set_sm90_enabled(before)
    torch.testing.assert_close(runs["sm90"][0].float(), runs["sm80"][0].float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(runs["sm90"][1], runs["sm80"][1], atol=1e-3, rtol=1e-3)


def test_small_compact_workspace_is_refused(sm90):
    from dmattn.backends.base import dlpack

    _need_sm90_head_dim(128)
    q = torch.randn(1, 256, 4, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 512, 2, 128, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(1, 2, 1, 512, device="cuda", dtype=torch.bfloat16)
    idx, counts = cuda_ext.list_selection(bias, None, window=200, Q=256, head_dim=128, is_causal=True)
    need = cuda_ext.compact_bytes(q, k, bias, None, idx)
    assert need == _compact_bytes_by_layout(1, 2, 200, 128)
    out, lse = torch.empty_like(q), torch.empty(1, 4, 256, device="cuda")
    small = torch.empty(need // 4 - 1, device="cuda")
    with pytest.raises(ValueError, match="workspace must hold at least"):
        cuda_ext._cuda.fwd(*dlpack(q, k, k, bias, None, out, lse, idx, counts), scale=0.1, softcap=0.0, causal=True,
                           stream=cuda_ext.current_stream(q.device), workspace=dlpack(small)[0])


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("path", ["dense", "list"])
def test_persistent_blocks_take_many_items(path, D, sm90):
    """The kernel is persistent (at most one block per SM, each walking several work items of 128
    query rows): 2 x 32 heads x 8 query blocks = 512 items for the H100/H200's 132 SMs, so blocks
    carry key tiles, stage phases and Q buffers from item to item (D = 64 has 4 stages, D = 128 two).
    Q > K with causality leaves the first query blocks without keys (items that take no tile)
    between items that have some."""
    case = Case(B=2, Q=1000, K=700, H=32, H_kv=8, D=D, window=300, scope="global", causal=True)
    _check(case, torch.bfloat16, path=path)
