"""The CUDA radix select (``kernels/cuda/select.h``, through ``cuda_ext.select_lists``) against the
reference, bit for bit: the LIST metadata of the cuda backend (each selection row's kept keys,
ascending, int32, padded with K) and its per-query-block counts.

Cases: float16/bfloat16/float32/float64 biases; heavy ties with -0.0 next to +0.0 and -inf; the
paper's bias form (values in (0, 1), few distinct high bytes); masks that leave fewer than w
candidates or none; w = 1, w >= K; K that is no multiple of anything; long rows cut into many
chunks (the split plan, also forced with ``chunk``); broadcast batch and heads, key strides > 1 and
zero strides; capture in a CUDA graph. Outputs start poisoned (conftest) and the workspace starts as
garbage, so an unwritten slot or a workspace entry read before it is written shows up."""

from __future__ import annotations

import pytest
import torch

from dmattn import cuda_ext, reference

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and cuda_ext.available() and hasattr(cuda_ext._cuda, "select_lists")),
    reason="needs a CUDA device and a dmattn._cuda module with select_lists")

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
TILE = 1024  # select_tile(): a forced chunk is a multiple of it


@pytest.fixture(autouse=True)
def garbage_workspace(monkeypatch):
    """Every uint8 ``torch.empty`` (the select's workspace) starts as 0xA5 bytes."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(0xA5) if t.dtype == torch.uint8 else t

    monkeypatch.setattr(torch, "empty", poisoned)


def _bias(shape, dtype, kind: str, seed: int, key_stride: int = 1) -> torch.Tensor:
    """(B, H, 1, K) on the GPU. ``random``: normal values. ``ties``: three values, -0.0 next to
    +0.0 and -inf among them. ``doge``: exp(-softplus(x)), many ties in 16-bit types.
    ``key_stride`` > 1: a view whose keys are interleaved with others."""
    g = torch.Generator().manual_seed(seed)
    B, H, _, K = shape
    if kind == "ties":
        t = torch.tensor([-1.5, 0.0, 2.0])[torch.randint(0, 3, (B, H, 1, K * key_stride), generator=g)]
        t[..., 1::5] = -0.0
        t[..., 3::7] = float("-inf")
    else:
        t = torch.randn(B, H, 1, K * key_stride, generator=g)
        if kind == "doge":
            t = torch.exp(-torch.nn.functional.softplus(t))
    return t.to(dtype).cuda()[..., ::key_stride]


def _mask(shape, kind: str, seed: int):
    """``random``: 60 % allowed; ``few``: 5 %; ``empty_rows``: random with head 0 all False.
    Stored transposed (non-contiguous)."""
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    B, H, _, K = shape
    m = (torch.rand(B, K, H, generator=g) < (0.05 if kind == "few" else 0.6)).permute(0, 2, 1).unsqueeze(2)
    if kind == "empty_rows":
        m[:, 0] = False
    return m.cuda()


def _expand(t, B_s, H_s):
    """A (B|1, heads, 1, K) tensor as the (B_s, H_s, 1, K) rows the kernels read (head h_s reads
    head h_s * heads // H_s), on the CPU."""
    if t is None:
        return None
    return reference.expand_heads(t.cpu(), B_s, H_s, 1, t.shape[-1])


def _want_idx(bias, mask, window, rows):
    """The reference's lists as the select writes them: int32, padded with K."""
    B_s, H_s = rows
    K = bias.shape[-1]
    want = reference.topk_indices(_expand(bias, B_s, H_s), window, _expand(mask, B_s, H_s)).squeeze(2)
    return torch.where(want < 0, K, want).to(torch.int32)


def _want_counts(idx, Q, K, block_m, causal):
    n = -(-Q // block_m)
    out = torch.empty(idx.shape[:2] + (n,), dtype=torch.int32)
    for m in range(n):
        last = min((m + 1) * block_m, Q) - 1
        limit = min(max(last + K - Q, -1), K - 1) if causal else K - 1
        out[..., m] = (idx <= limit).sum(-1)
    return out


def _check(bias, mask, window, rows=None, chunk=None, Q=None, block_m=64, causal=True):
    if rows is None:
        rows = tuple(max(t.shape[d] for t in (bias, mask) if t is not None) for d in range(2))
    K = bias.shape[-1]
    Q = K if Q is None else Q
    idx, counts = cuda_ext.select_lists(bias, mask, window, rows, Q=Q, block_m=block_m, is_causal=causal,
                                        chunk=chunk)
    torch.cuda.synchronize()
    assert idx.dtype == torch.int32 and idx.is_contiguous() and idx.shape == rows + (min(window, K),)
    want = _want_idx(bias, mask, window, rows)
    got = idx.cpu()
    assert torch.equal(got, want), (window, chunk, (got != want).nonzero()[:5].tolist())
    assert torch.equal(counts.cpu(), _want_counts(want, Q, K, block_m, causal))
    return idx


def _windows(K):
    return sorted({1, max(1, K // 3), max(1, K - 1), K, K + 5})


# (bias shape, values, key stride, mask shape or None, mask kind, selection rows)
CASES = [
    ((1, 1, 1, 1), "random", 1, None, None, (1, 1)),
    ((1, 2, 1, 63), "ties", 1, (1, 4, 1, 63), "random", (1, 4)),
    ((2, 1, 1, 577), "doge", 3, (1, 1, 1, 577), "few", (2, 2)),
    ((1, 2, 1, 1000), "ties", 1, (2, 2, 1, 1000), "empty_rows", (2, 2)),
    ((2, 2, 1, 4099), "random", 2, None, None, (2, 2)),
    ((1, 3, 1, 3001), "ties", 1, (1, 3, 1, 3001), "few", (1, 3)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"K{c[0][3]}-{c[1]}-{c[4]}")
@pytest.mark.parametrize("chunk", [None, TILE], ids=["plan", "chunk1024"])
def test_select_matches_reference(case, dtype, chunk):
    bshape, kind, stride, mshape, mkind, rows = case
    bias = _bias(bshape, dtype, kind, 0, stride)
    mask = _mask(mshape, mkind, 1) if mshape else None
    for window in _windows(bshape[3]):
        _check(bias, mask, window, rows, chunk=chunk)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_select_matches_selected_lists(dtype):
    """Also equal to the Triton backend's torch lists (``selection.selected_lists``)."""
    sel = pytest.importorskip("dmattn.kernels.triton.selection")
    bias = _bias((2, 2, 1, 2500), dtype, "ties", 3)
    mask = _mask((1, 2, 1, 2500), "random", 4)
    for window in (1, 700, 2500):
        idx = _check(bias, mask, window, chunk=TILE)
        assert torch.equal(idx, sel.selected_lists(bias, mask, window).squeeze(2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["random", "doge", "ties"])
@pytest.mark.parametrize("shape,window", [((1, 8, 1, 32768), 2048), ((1, 8, 1, 131072), 2048),
                                          ((1, 8, 1, 8192), 1024)], ids=["T32k", "D128k", "T8k"])
def test_long_rows_take_the_split_plan(shape, window, kind, dtype):
    """The benchmark shapes: few long rows, cut into chunks by the plan (and into 1024-key chunks)."""
    bias = _bias(shape, dtype, kind, 5)
    rows = shape[0] * shape[1]
    chunk, chunks, _ = cuda_ext._select_plan(rows, shape[3], 16 if dtype.itemsize == 2 else 32,
                                             bias.device.index, 0)
    assert chunks > 1, "the plan should cut these rows"
    _check(bias, None, window, Q=shape[3], block_m=128)
    _check(bias, _mask(shape, "random", 6), window, chunk=TILE, Q=1, block_m=1, causal=False)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Q,block_m", [(1, 64), (63, 64), (577, 128), (3000, 112), (5000, 64)])
def test_counts(Q, block_m, causal):
    """Per-query-block counts for Q < K, Q = K and Q > K (causal limits below 0)."""
    bias = _bias((2, 2, 1, 3000), torch.bfloat16, "random", 8)
    _check(bias, _mask((2, 1, 1, 3000), "random", 9), 700, Q=Q, block_m=block_m, causal=causal)
    idx, _ = cuda_ext.select_lists(bias, None, 700)
    counts = cuda_ext.list_counts(idx, Q=Q, K=3000, block_m=block_m, is_causal=causal)
    assert torch.equal(counts.cpu(), _want_counts(idx.cpu(), Q, 3000, block_m, causal))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Q,block_m", [(3000, 16), (5000, 7), (40, 16), (1, 1)])
def test_counts_of_clustered_lists(Q, block_m, causal):
    """Lists whose keys sit together (all early, all late, one key, only sentinels, every key): one
    entry's run of equal counts can span most query blocks, and blocks that see no key get 0."""
    K, W = 3000, 800
    rows = [list(range(700)), list(range(2300, 3000)), [1500], [], list(range(K - W, K))]
    idx = torch.tensor([r + [K] * (W - len(r)) for r in rows], dtype=torch.int32).reshape(1, len(rows), W)
    counts = cuda_ext.list_counts(idx.cuda(), Q=Q, K=K, block_m=block_m, is_causal=causal)
    assert torch.equal(counts.cpu(), _want_counts(idx, Q, K, block_m, causal))


def test_broadcast_strides():
    """Zero strides (an expanded bias), a batch of 1 shared by every row, heads read through
    h * heads // H_s, a transposed (B, K, H) storage."""
    base = _bias((1, 1, 1, 2000), torch.float16, "ties", 10)
    _check(base.expand(1, 4, 1, 2000), None, 300, (3, 4), chunk=TILE)
    _check(base, _mask((3, 2, 1, 2000), "random", 11), 300, (3, 4))
    t = torch.randn(2, 2000, 4, device="cuda").to(torch.bfloat16).permute(0, 2, 1).unsqueeze(2)
    _check(t, None, 999, (2, 8), chunk=2 * TILE)


def test_determinism_and_backend_lists():
    """Two runs agree bit for bit; ``list_selection`` (the cuda backend's call) returns the same lists
    with counts per block of the forward's query rows, or None off the LIST path."""
    bias = _bias((1, 4, 1, 9000), torch.bfloat16, "doge", 12)
    a = cuda_ext.select_lists(bias, None, 1500)[0]
    b = cuda_ext.select_lists(bias, None, 1500)[0]
    assert torch.equal(a, b)
    idx, counts = cuda_ext.list_selection(bias, None, window=1500, Q=9000, head_dim=128, is_causal=True)
    assert torch.equal(idx, a)
    block_m = cuda_ext.fwd_block_m(128)
    assert torch.equal(counts.cpu(), _want_counts(a.cpu(), 9000, 9000, block_m, True))
    assert cuda_ext.list_selection(bias, None, window=9000, Q=9000, head_dim=128, is_causal=True) is None
    per_query = bias.expand(1, 4, 3, 9000)
    assert cuda_ext.list_selection(per_query, None, window=10, Q=3, head_dim=128, is_causal=False) is None


def test_cuda_graph_capture():
    """The select allocates nothing outside torch and never synchronises: capture, change the bias in
    place, replay, and get the new bias's lists."""
    bias = _bias((1, 8, 1, 32768), torch.bfloat16, "random", 13)
    mask = _mask((1, 8, 1, 32768), "random", 14)

    def step():
        return cuda_ext.select_lists(bias, mask, 2048, Q=32768, block_m=128, is_causal=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    bias.copy_(_bias((1, 8, 1, 32768), torch.bfloat16, "doge", 15))
    graph.replay()
    torch.cuda.synchronize()
    want = step()
    assert torch.equal(captured[0], want[0]) and torch.equal(captured[1], want[1])
    assert torch.equal(want[0].cpu(), _want_idx(bias, mask, 2048, (1, 8)))


def test_argument_errors_name_the_argument():
    bias = _bias((1, 2, 1, 100), torch.float32, "random", 16)
    idx = torch.empty(1, 2, 10, dtype=torch.int32, device="cuda")
    counts = torch.empty(1, 2, 2, dtype=torch.int32, device="cuda")
    ws = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    call = dict(window=10, Q=100, block_m=64, causal=False, chunk=0, stream=stream)
    run = cuda_ext._cuda.select_lists
    with pytest.raises(ValueError, match="window"):
        run(bias, None, idx, counts, ws, **{**call, "window": 0})
    with pytest.raises(TypeError, match="bias"):
        run(bias.to(torch.int32), None, idx, counts, ws, **call)
    with pytest.raises(ValueError, match="bias"):
        run(bias.expand(1, 2, 3, 100), None, idx, counts, ws, **call)
    with pytest.raises(TypeError, match="idx"):
        run(bias, None, idx.long(), counts, ws, **call)
    with pytest.raises(ValueError, match="idx"):
        run(bias, None, idx[..., :9], counts, ws, **call)
    with pytest.raises(ValueError, match="mask"):
        run(bias, torch.ones(1, 2, 1, 99, dtype=torch.bool, device="cuda"), idx, counts, ws, **call)
    with pytest.raises(TypeError, match="mask"):
        run(bias, torch.ones(1, 2, 1, 100, device="cuda"), idx, counts, ws, **call)
    with pytest.raises(ValueError, match="counts"):
        run(bias, None, idx, counts[..., :1], ws, **call)
    with pytest.raises(ValueError, match="workspace"):
        run(bias, None, idx, counts, ws[:16], **call)
    with pytest.raises(ValueError, match="chunk"):
        run(bias, None, idx, counts, ws, **{**call, "chunk": 1000})
    with pytest.raises(ValueError, match="block_m"):
        run(bias, None, idx, counts, ws, **{**call, "block_m": 0})
