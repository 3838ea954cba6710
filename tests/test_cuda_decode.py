"""The split (decode) forward of the CUDA module (``kernels/cuda/fwd_split.h``, through
``dmattn.cuda_ext.forward``) against the float64 reference: few queries (Q <= 16), LIST and DENSE
keys, GQA/MQA, odd lengths, softcap, every bias and mask broadcast form, empty rows, both dtypes,
every built head dim, forced split counts (one split writes out itself; uneven splits are merged),
determinism, the backend taking it, and CUDA graph capture. Then the same forward with its
selection in one call (``cuda_ext.decode``: the select and split kernels as one chain that overlaps
its launches, launch.h): against the reference and bitwise against the two-call path, over the
same shapes and forms, after kernels that rewrite its inputs, and when it declines. GPU only:
skipped without a CUDA device or without a module that has the split forward.

Every call records the splits the module ran (``_cuda.fwd`` and ``_cuda.decode`` return them), so
a test cannot pass on the one-block-per-query-block kernel by accident. Outputs start as NaN (and
so does the workspace, through ``DMATTN_POISON_OUTPUTS``), so an element nobody writes fails.
"""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import pytest
import torch

import dmattn
from cases import Case, assert_close_to_reference, make_inputs
from dmattn import cuda_ext, reference
from test_cuda_fwd import _OK, _WHY, _built_head_dims, _need_head_dim

_SPLIT = _OK and cuda_ext.has_split()
pytestmark = pytest.mark.skipif(not _SPLIT, reason=_WHY or "dmattn._cuda was built without the split forward")

DTYPES = (torch.float16, torch.bfloat16)


class _Spy:
    """``dmattn._cuda`` with ``fwd`` and ``decode`` recording the splits each call ran (0: not the
    split forward), and ``calls`` the names of those called."""

    def __init__(self, module):
        self._module = module
        self.runs: list[int] = []
        self.calls: list[str] = []

    def __getattr__(self, name):
        return getattr(self._module, name)

    def fwd(self, *args, **kwargs):
        n = self._module.fwd(*args, **kwargs)
        self.runs.append(int(n))
        self.calls.append("fwd")
        return n

    def decode(self, *args, **kwargs):
        n = self._module.decode(*args, **kwargs)
        self.runs.append(int(n))
        self.calls.append("decode")
        return n


@contextlib.contextmanager
def _spy():
    spy = _Spy(cuda_ext._cuda)
    with mock.patch.object(cuda_ext, "_cuda", spy):
        yield spy


@pytest.fixture(autouse=True, params=["tensor-cores", "cuda-cores"])
def split_kernel(request):
    """Every test runs twice: with the tensor-core split kernel where it applies (head dim 64 or
    128, no softcap, no mask in the kernel, one bias row per thread block; the CUDA-core kernel
    elsewhere) and with the CUDA-core kernel forced (``set_split_mma_enabled(False)``)."""
    before = cuda_ext.split_mma_enabled()
    cuda_ext.set_split_mma_enabled(request.param == "tensor-cores")
    yield request.param
    cuda_ext.set_split_mma_enabled(before)


def _run(case: Case, dtype, *, splits=None, inputs=None, bias_dtype=None, seed: int = 0):
    """Runs the forward on the case's inputs (LIST when the case's window selects, else DENSE with
    bias and mask per element) and checks out and lse against the reference. Returns
    ``(out, lse, splits run)``; fails unless the split forward ran."""
    _need_head_dim(case.D)
    q, k, v, bias, mask = inputs if inputs is not None else make_inputs(case, dtype, "cuda", seed, bias_dtype)
    idx = counts = None
    kernel_mask = mask
    if case.window is not None:
        meta = cuda_ext.list_selection(bias, mask, window=case.window, Q=case.Q, head_dim=case.D,
                                       is_causal=case.causal)
        if meta is not None:
            idx, counts = meta
            kernel_mask = None
    out = torch.full((case.B, case.Q, case.H, case.D), math.nan, dtype=dtype, device="cuda")
    lse = torch.full((case.B, case.H, case.Q), math.nan, dtype=torch.float32, device="cuda")
    with _spy() as spy:
        cuda_ext.forward(q, k, v, bias, kernel_mask, softcap=case.softcap, is_causal=case.causal, idx=idx,
                         counts=counts, out=out, lse=lse, splits=splits)
    torch.cuda.synchronize()
    assert len(spy.runs) == 1 and spy.runs[0] > 0, f"the split forward did not run ({spy.runs})"
    if splits:
        assert spy.runs[0] <= splits

    opts = dict(window=case.window, topk_scope="global", is_causal=case.causal, softcap=case.softcap)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    truth = reference.attention(f64(q), f64(k), f64(v), f64(bias), mask, **opts)
    low = reference.attention(q, k, v, bias, mask, **opts)
    assert_close_to_reference((out, lse), low, truth, dtype, label=f"[{case} {dtype} splits={splits}] ")
    return out, lse, spy.runs[0]


@pytest.mark.parametrize("HH", [(8, 8), (8, 2), (16, 2), (8, 1), (12, 1)], ids=lambda h: f"H{h[0]}-Hkv{h[1]}")
@pytest.mark.parametrize("Q", [1, 2, 3, 5, 16])
def test_queries_and_groups(Q, HH):
    """Past 32 query rows per kv head the split forward is not picked (fwd_split_count), but it
    still computes them when told (here 5 splits)."""
    H, H_kv = HH
    splits = None if Q * H // H_kv <= 32 else 5
    _run(Case(B=2, Q=Q, K=1000, H=H, H_kv=H_kv, D=128, window=100, scope="global"), torch.bfloat16,
         splits=splits)


@pytest.mark.parametrize("window", [64, 1000, 4097, 5000, None], ids=lambda w: f"w{w}")
@pytest.mark.parametrize("K", [1000, 4097])
def test_lengths_and_windows(K, window):
    """window < K: LIST; window >= K or none: DENSE (every key, bias per element)."""
    _run(Case(B=2, Q=1, K=K, H=8, H_kv=2, D=128, window=window, scope="global"), torch.float16)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("window", [50, None], ids=["list", "dense"])
@pytest.mark.parametrize("Q", [2, 7])
def test_causal_few_queries(Q, window, causal):
    _run(Case(B=2, Q=Q, K=301, H=8, H_kv=2, D=64, window=window, scope="global", causal=causal), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [32, 64, 96, 128, 256])
def test_head_dims(D, dtype):
    _run(Case(B=2, Q=1, K=777, H=8, H_kv=2, D=D, window=200, scope="global"), dtype)


@pytest.mark.parametrize("window", [40, None], ids=["list", "dense"])
@pytest.mark.parametrize("softcap", [5.0, 30.0])
def test_softcap(softcap, window):
    _run(Case(B=2, Q=3, K=500, H=8, H_kv=2, D=128, window=window, scope="global", softcap=softcap), torch.float16)


@pytest.mark.parametrize("form", ["b_hkv_1", "1_hkv_1", "b_h_1", "1_1_1"])
@pytest.mark.parametrize("window", [70, None], ids=["list", "dense"])
def test_bias_forms(form, window):
    _run(Case(B=2, Q=2, K=333, H=8, H_kv=2, D=64, bias=form, window=window, scope="global"), torch.bfloat16)


@pytest.mark.parametrize("form", ["b_h_q", "1_hkv_q", "b_1_q", "1_1_q"])
def test_per_query_bias_dense(form):
    """A bias that differs between query rows (no window: the LIST path needs query-broadcast ones):
    every row of a block reads its own."""
    _run(Case(B=2, Q=3, K=300, H=8, H_kv=2, D=64, bias=form, causal=True), torch.float16)


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [90, None], ids=["list", "dense"])
def test_bias_dtypes(window, bias_dtype):
    _run(Case(B=2, Q=1, K=400, H=8, H_kv=2, D=128, window=window, scope="global"), torch.bfloat16,
         bias_dtype=bias_dtype)


def test_no_bias_dense():
    _run(Case(B=2, Q=2, K=300, H=8, H_kv=2, D=128, bias=None, mask="b_hkv_1"), torch.bfloat16)


@pytest.mark.parametrize("mask", ["b_hkv_1", "1_1_1", "b_h_1"])
@pytest.mark.parametrize("window", [60, None], ids=["list", "dense"])
def test_mask_with_empty_rows(window, mask):
    """Selection rows (LIST: folded into the lists) or key rows (DENSE) that allow no key: their
    rows end as out 0, lse -inf, and nothing else is disturbed."""
    case = Case(B=2, Q=2, K=500, H=8, H_kv=2, D=128, mask=mask, window=window, scope="global")
    q, k, v, bias, m = make_inputs(case, torch.float16, "cuda")
    m[-1, 0] = False  # the last mask batch (every batch when broadcast), mask head 0
    out, lse, _ = _run(case, torch.float16, inputs=(q, k, v, bias, m))
    heads = case.H // m.shape[1]  # the query heads that read mask head 0
    batches = [1] if m.shape[0] == 2 else [0, 1]
    assert torch.isneginf(lse[batches, :heads]).all() and (out[batches, :, :heads] == 0).all()
    if heads < case.H:
        assert torch.isfinite(lse[:, heads:]).all()


def test_per_query_mask_with_empty_rows():
    case = Case(B=2, Q=5, K=200, H=8, H_kv=2, D=64, mask="b_h_q")
    q, k, v, bias, m = make_inputs(case, torch.bfloat16, "cuda")
    m[:, :, ::2] = False  # queries 0, 2 and 4 see nothing
    out, lse, _ = _run(case, torch.bfloat16, inputs=(q, k, v, bias, m))
    assert torch.isneginf(lse[:, :, ::2]).all() and (out[:, ::2] == 0).all()


def test_minus_inf_bias_keys():
    case = Case(B=1, Q=1, K=300, H=8, H_kv=2, D=128, window=100, scope="global")
    q, k, v, bias, m = make_inputs(case, torch.bfloat16, "cuda", bias_dtype=torch.float32)
    bias[..., ::3] = -math.inf
    _run(case, torch.bfloat16, inputs=(q, k, v, bias, m))


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 256])
@pytest.mark.parametrize("keys", ["list", "list-padded", "dense"])
def test_forced_split_counts(keys, splits):
    """1: the split kernel writes out and lse itself; 3 and 7: uneven chunks; 256: capped by the
    list length. list-padded: a mask leaves ~780 candidates for a window of 900, so the lists end in
    padding and the last splits see no entry."""
    window = {"list": 300, "list-padded": 900, "dense": None}[keys]
    mask = "b_hkv_1" if keys == "list-padded" else None
    _run(Case(B=2, Q=3, K=1111, H=8, H_kv=2, D=128, mask=mask, window=window, scope="global", causal=True),
         torch.bfloat16, splits=splits)


def _split_kernels(fn) -> list[str]:
    """The names of the split kernels ``fn`` launched (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sorted({"mma" if "split_mma_kernel" in n else "cores" for n in names if "dma_fwd_split" in n
                   and "merge" not in n})


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("form", ["plain", "softcap", "dense-mask", "bias-per-head-inside-group", "per-query-bias"])
def test_which_split_kernel_runs(form, D, split_kernel):
    """The tensor-core kernel takes exactly the calls it applies to, when it is switched on; the
    CUDA-core kernel takes the rest (and everything when it is off). Both match the reference."""
    # DENSE (no window) for the forms the LIST path never has: a mask in the kernel, a block of
    # heads (one GQA group) reading several bias heads, a bias row per query.
    window = 200 if form in ("plain", "softcap") else None
    bias = {"bias-per-head-inside-group": "b_h_1", "per-query-bias": "1_hkv_q"}.get(form, "b_hkv_1")
    case = Case(B=2, Q=2 if form == "per-query-bias" else 1, K=1500, H=8, H_kv=2, D=D, bias=bias,
                mask="b_hkv_1" if form == "dense-mask" else None, window=window, scope="global",
                softcap=5.0 if form == "softcap" else None)
    _need_head_dim(D)
    got = _split_kernels(lambda: _run(case, torch.bfloat16))
    want = "mma" if split_kernel == "tensor-cores" and form == "plain" else "cores"
    assert got == [want], (form, got)


def test_deterministic():
    case = Case(B=2, Q=1, K=5000, H=32, H_kv=8, D=128, window=2048, scope="global")
    q, k, v, bias, _ = make_inputs(case, torch.bfloat16, "cuda")
    idx, counts = cuda_ext.list_selection(bias, None, window=2048, Q=1, head_dim=128, is_causal=False)
    runs = [cuda_ext.forward(q, k, v, bias, None, idx=idx, counts=counts) for _ in range(3)]
    for out, lse in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(lse, runs[0][1])


def test_decode_workload_shape():
    """D128k's shape (H=32, H_kv=8, D=128, w=2048, bf16, Q=1) at K=131072."""
    _run(Case(B=1, Q=1, K=131072, H=32, H_kv=8, D=128, window=2048, scope="global"), torch.bfloat16)


def test_split_count_decides():
    q = torch.empty(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.empty(1, 131072, 8, 128, device="cuda", dtype=torch.bfloat16)
    idx = torch.empty(1, 8, 2048, device="cuda", dtype=torch.int32)
    n = cuda_ext.split_count(q, k, idx)
    assert n > 1, n  # 8 thread blocks per split cannot fill a GPU
    assert cuda_ext.split_count(q.expand(1, 17, 32, 128), k, idx) == 0  # Q > 16: the other kernel
    assert cuda_ext.split_count(q.expand(1, 8, 32, 128), k, idx) > 0  # 32 rows per kv head
    assert cuda_ext.split_count(q.expand(1, 16, 32, 128), k, idx) == 0  # 64 rows: the other kernel
    mqa = k[:, :, :1]
    assert cuda_ext.split_count(q, mqa, idx) > 0  # MQA, Q = 1: 32 rows
    assert cuda_ext.split_count(q.expand(1, 2, 32, 128), mqa, idx) == 0  # 64 rows per kv head
    with mock.patch.object(cuda_ext, "SPLIT_DECODE", False):
        assert cuda_ext.split_count(q, k, idx) == 0


@pytest.mark.parametrize("split_decode", [True, False], ids=["split", "no-split"])
def test_backend_takes_the_split_path(split_decode):
    """``dma_attention(backend="cuda")`` on a decode call runs the split forward (and, with
    ``SPLIT_DECODE`` off, the one-block kernel); both match the reference."""
    case = Case(B=1, Q=1, K=16384, H=32, H_kv=8, D=128, window=2048, scope="global")
    _need_head_dim(case.D)
    q, k, v, bias, _ = make_inputs(case, torch.bfloat16, "cuda")
    with _spy() as spy, mock.patch.object(cuda_ext, "SPLIT_DECODE", split_decode):
        out, lse = dmattn.dma_attention(q, k, v, bias, window=2048, topk_scope="global", return_lse=True,
                                        backend="cuda")
    torch.cuda.synchronize()
    assert len(spy.runs) == 1 and (spy.runs[0] > 1 if split_decode else spy.runs[0] == 0), spy.runs
    assert spy.calls == ["decode" if split_decode else "fwd"], spy.calls
    opts = dict(window=2048, topk_scope="global")
    truth = reference.attention(q.double(), k.double(), v.double(), bias.double(), None, **opts)
    low = reference.attention(q, k, v, bias, None, **opts)
    assert_close_to_reference((out, lse), low, truth, torch.bfloat16)


def test_cuda_graph_capture_decode():
    """A decode call (selection + split forward + merge) captured once and replayed on new inputs
    gives what eager gives, bitwise."""
    case = Case(B=2, Q=1, K=8192, H=32, H_kv=8, D=128, window=1024, scope="global")
    _need_head_dim(case.D)
    q, k, v, bias = (t.clone() for t in make_inputs(case, torch.bfloat16, "cuda")[:4])

    def step():
        return dmattn.dma_attention(q, k, v, bias, window=1024, topk_scope="global", return_lse=True,
                                    backend="cuda")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with _spy() as spy, torch.cuda.graph(graph):
        captured = step()
    assert spy.runs and spy.runs[0] > 1 and spy.calls == ["decode"], (spy.runs, spy.calls)

    fresh = make_inputs(case, torch.bfloat16, "cuda", seed=7)
    for dst, src in zip((q, k, v, bias), fresh):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    want = step()
    assert torch.equal(captured[0], want[0]) and torch.equal(captured[1], want[1])


@pytest.mark.parametrize("bad, words", [
    (dict(Q=17, splits=4), ["Q <= 16", "17"]),
    (dict(splits=300), ["splits", "256"]),
    (dict(workspace=7), ["workspace", "at least"]),
], ids=["too-many-queries", "too-many-splits", "small-workspace"])
def test_errors_name_the_argument(bad, words):
    _need_head_dim(64)
    Q = bad.get("Q", 1)
    q = torch.randn(1, Q, 2, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 40, 1, 64, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    lse = torch.empty(1, 2, Q, device="cuda")
    workspace = torch.empty(bad.get("workspace", 4096), device="cuda")
    from dmattn.backends.base import dlpack

    with pytest.raises(ValueError) as err:
        cuda_ext._cuda.fwd(*dlpack(q, k, k, None, None, out, lse, None, None), scale=0.125, softcap=0.0,
                           causal=False, stream=cuda_ext.current_stream(q.device), splits=bad.get("splits", 2),
                           workspace=dlpack(workspace)[0])
    for w in words:
        assert w in str(err.value), f"{w!r} not in {err.value!s}"


def test_built_head_dims_have_the_split_forward():
    for D in sorted(_built_head_dims()):
        q = torch.randn(1, 1, 4, D, device="cuda", dtype=torch.float16)
        k = torch.randn(1, 100, 1, D, device="cuda", dtype=torch.float16)
        out, lse = cuda_ext.forward(q, k, k, splits=2)
        ref_out, ref_lse = reference.attention(q.double(), k.double(), k.double(), None, None)
        torch.testing.assert_close(out.double(), ref_out, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- cuda_ext.decode


def _decode(case: Case, dtype, *, inputs=None, bias_dtype=None, seed: int = 0):
    """Runs ``cuda_ext.decode`` on a LIST case, checks out and lse against the reference and
    bitwise against ``list_selection`` + ``forward`` (the same kernels in two calls, so the same
    bits). Returns ``(out, lse)``."""
    _need_head_dim(case.D)
    q, k, v, bias, mask = inputs if inputs is not None else make_inputs(case, dtype, "cuda", seed, bias_dtype)
    out = torch.full((case.B, case.Q, case.H, case.D), math.nan, dtype=dtype, device="cuda")
    lse = torch.full((case.B, case.H, case.Q), math.nan, dtype=torch.float32, device="cuda")
    with _spy() as spy:
        got = cuda_ext.decode(q, k, v, bias, mask, window=case.window, softcap=case.softcap, is_causal=case.causal,
                              out=out, lse=lse)
    torch.cuda.synchronize()
    assert got is not None and got[0] is out and got[1] is lse
    assert spy.calls == ["decode"] and spy.runs[0] > 0, (spy.calls, spy.runs)

    idx, counts = cuda_ext.list_selection(bias, mask, window=case.window, Q=case.Q, head_dim=case.D,
                                          is_causal=case.causal)
    two_out, two_lse = cuda_ext.forward(q, k, v, bias, None, softcap=case.softcap, is_causal=case.causal, idx=idx,
                                        counts=counts)
    assert torch.equal(out, two_out) and torch.equal(lse, two_lse), f"[{case}] decode differs from select + forward"

    opts = dict(window=case.window, topk_scope="global", is_causal=case.causal, softcap=case.softcap)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    truth = reference.attention(f64(q), f64(k), f64(v), f64(bias), mask, **opts)
    low = reference.attention(q, k, v, bias, mask, **opts)
    assert_close_to_reference((out, lse), low, truth, dtype, label=f"[decode {case} {dtype}] ")
    return out, lse


# Q x H / H_kv <= 32 query rows per kv head (more: decode declines, test_decode_declines).
@pytest.mark.parametrize("Q, H, H_kv", [(Q, H, H_kv) for Q in (1, 3, 8) for H, H_kv in ((8, 8), (8, 2), (32, 8), (8, 1))
                                        if Q * H // H_kv <= 32], ids=lambda x: str(x))
def test_decode_queries_and_groups(Q, H, H_kv):
    _decode(Case(B=2, Q=Q, K=1000, H=H, H_kv=H_kv, D=128, window=100, scope="global"), torch.bfloat16)


# window < K (a window that keeps every key selects nothing: test_decode_declines).
@pytest.mark.parametrize("K, window", [(K, w) for K in (1000, 4097, 20000) for w in (1, 64, 999, 4096) if w < K])
def test_decode_lengths_and_windows(K, window):
    _decode(Case(B=2, Q=1, K=K, H=8, H_kv=2, D=128, window=window, scope="global"), torch.float16)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Q", [2, 7])
def test_decode_causal(Q, causal):
    _decode(Case(B=2, Q=Q, K=301, H=8, H_kv=2, D=64, window=50, scope="global", causal=causal), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [32, 64, 96, 128, 256])
def test_decode_head_dims(D, dtype):
    _decode(Case(B=2, Q=1, K=777, H=8, H_kv=2, D=D, window=200, scope="global"), dtype)


def test_decode_softcap():
    _decode(Case(B=2, Q=3, K=500, H=8, H_kv=2, D=128, window=40, scope="global", softcap=5.0), torch.float16)


@pytest.mark.parametrize("form", ["b_hkv_1", "1_hkv_1", "b_h_1", "1_1_1"])
def test_decode_bias_forms(form):
    _decode(Case(B=2, Q=2, K=333, H=8, H_kv=2, D=64, bias=form, window=70, scope="global"), torch.bfloat16)


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_decode_bias_dtypes(bias_dtype):
    """16-, 32- and 64-bit selection keys (two, four and eight radix passes in the chain)."""
    _decode(Case(B=2, Q=1, K=5000, H=8, H_kv=2, D=128, window=90, scope="global"), torch.bfloat16,
            bias_dtype=bias_dtype)


def test_decode_ties():
    """Biases of three values: the kept keys equal to the threshold are the earliest ones."""
    _decode(Case(B=2, Q=1, K=9000, H=8, H_kv=2, D=64, window=1000, scope="global", ties=True), torch.bfloat16,
            bias_dtype=torch.float32)


@pytest.mark.parametrize("mask", ["b_hkv_1", "1_1_1", "b_h_1"])
def test_decode_mask_with_empty_rows(mask):
    case = Case(B=2, Q=2, K=500, H=8, H_kv=2, D=128, mask=mask, window=60, scope="global")
    q, k, v, bias, m = make_inputs(case, torch.float16, "cuda")
    m[-1, 0] = False
    out, lse = _decode(case, torch.float16, inputs=(q, k, v, bias, m))
    heads = case.H // m.shape[1]
    batches = [1] if m.shape[0] == 2 else [0, 1]
    assert torch.isneginf(lse[batches, :heads]).all() and (out[batches, :, :heads] == 0).all()


def test_decode_workload_shape():
    """D128k's shape (H=32, H_kv=8, D=128, w=2048, bf16, Q=1) at K=131072."""
    _decode(Case(B=1, Q=1, K=131072, H=32, H_kv=8, D=128, window=2048, scope="global"), torch.bfloat16)


def test_decode_after_kernels_that_write_its_inputs():
    """Each call follows kernels that rewrite q, k, v and bias in place: the chain's first kernel
    must wait for them (only the later ones overlap their predecessor, launch.h)."""
    case = Case(B=1, Q=1, K=65536, H=32, H_kv=8, D=128, window=2048, scope="global")
    _need_head_dim(case.D)
    q, k, v, bias, _ = (t.clone() if t is not None else None for t in make_inputs(case, torch.bfloat16, "cuda"))
    for seed in (1, 2, 3):
        fresh = make_inputs(case, torch.bfloat16, "cuda", seed=seed)
        for dst, src in zip((q, k, v, bias), fresh):
            dst.copy_(src)
        out, lse = cuda_ext.decode(q, k, v, bias, None, window=2048)
        truth = reference.attention(q.double(), k.double(), v.double(), bias.double(), None, window=2048,
                                    topk_scope="global")
        low = reference.attention(q, k, v, bias, None, window=2048, topk_scope="global")
        assert_close_to_reference((out, lse), low, truth, torch.bfloat16, label=f"[seed {seed}] ")


def test_decode_deterministic():
    case = Case(B=2, Q=1, K=5000, H=32, H_kv=8, D=128, window=2048, scope="global")
    _need_head_dim(case.D)
    q, k, v, bias, _ = make_inputs(case, torch.bfloat16, "cuda")
    runs = [cuda_ext.decode(q, k, v, bias, None, window=2048) for _ in range(3)]
    for out, lse in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(lse, runs[0][1])


def test_decode_same_bits_without_overlapping_launches():
    """``set_pdl_enabled(False)`` launches every kernel of the chain plainly: the same bits. (The
    switch came with ``decode``: a module without it fails here.)"""
    case = Case(B=2, Q=2, K=20000, H=16, H_kv=4, D=128, window=1500, scope="global", causal=True)
    _need_head_dim(case.D)
    q, k, v, bias, _ = make_inputs(case, torch.bfloat16, "cuda")
    on = cuda_ext.decode(q, k, v, bias, None, window=1500, is_causal=True)
    try:
        cuda_ext.set_pdl_enabled(False)
        assert not cuda_ext.pdl_enabled()
        off = cuda_ext.decode(q, k, v, bias, None, window=1500, is_causal=True)
    finally:
        cuda_ext.set_pdl_enabled(True)
    assert cuda_ext.pdl_enabled()
    assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])


@pytest.mark.parametrize("why", ["window>=K", "per-query-bias", "per-query-mask", "no-bias", "too-many-rows",
                                 "SPLIT_DECODE-off", "takes-it"])
def test_decode_declines(why):
    """Calls off its path: None, and nothing launched (the spy sees no module call). With Q = 2 and
    no such reason the same shapes take it (the last case)."""
    _need_head_dim(64)
    # 5 queries x 8 heads per kv head = 40 rows > 32; a per-query bias or mask needs Q > 1 (2 x 8 rows).
    Q = {"too-many-rows": 5, "per-query-bias": 2, "per-query-mask": 2, "takes-it": 2}.get(why, 1)
    q = torch.randn(1, Q, 8, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 100, 1, 64, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(1, 1, Q if why == "per-query-bias" else 1, 100, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(1, 1, Q, 100, device="cuda", dtype=torch.bool) if why == "per-query-mask" else None
    window = 100 if why == "window>=K" else 10
    with _spy() as spy, mock.patch.object(cuda_ext, "SPLIT_DECODE", why != "SPLIT_DECODE-off"):
        got = cuda_ext.decode(q, k, k, None if why == "no-bias" else bias, mask, window=window)
    if why == "takes-it":
        assert got is not None and spy.calls == ["decode"], spy.calls
    else:
        assert got is None and spy.calls == [], spy.calls


@pytest.mark.parametrize("bad, words", [
    (dict(window=0), ["window", ">= 1"]),
    (dict(window=40), ["window < K"]),
    (dict(splits=0), ["splits", "256"]),
    (dict(workspace=7), ["workspace", "at least"]),
    (dict(Q=17), ["Q <= 16", "17"]),
    (dict(bias_heads=3), ["bias"]),
], ids=["window-zero", "window-all-keys", "no-splits", "small-workspace", "too-many-queries", "bias-heads"])
def test_decode_errors_name_the_argument(bad, words):
    _need_head_dim(64)
    Q = bad.get("Q", 1)
    q = torch.randn(1, Q, 2, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 40, 1, 64, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(1, bad.get("bias_heads", 1), 1, 40, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    lse = torch.empty(1, 2, Q, device="cuda")
    workspace = torch.empty(bad.get("workspace", 1 << 20), device="cuda", dtype=torch.uint8)
    from dmattn.backends.base import dlpack

    with pytest.raises(ValueError) as err:
        cuda_ext._cuda.decode(*dlpack(q, k, k, bias, None, out, lse, workspace), window=bad.get("window", 10),
                              scale=0.125, softcap=0.0, causal=False, splits=bad.get("splits", 2),
                              stream=cuda_ext.current_stream(q.device))
    for w in words:
        assert w in str(err.value), f"{w!r} not in {err.value!s}"
