"""The CUDA visible-scope metadata (``kernels/cuda/visible.h``, through ``cuda_ext.visible_death`` and
``cuda_ext.visible_lists``): each key's death position against a brute force written from the SPEC
(``cases.brute_death``), and each query block's alive-key lists against their definition; then the
cuda backend's PREFIX path end to end (forward and every gradient) against the float64 reference,
and the binding's refusals.

Cases: float16/bfloat16/float32 biases, ties with -0.0 next to +0.0 and -inf, masks (one row with
no candidate at all), w = 1 and w >= K, K of one rank chunk, several, and a search over many
buckets, other bucket sizes, broadcast batch and heads with a key stride of 2, Q < K and Q > K.
Outputs start poisoned (conftest) and every int32 workspace starts as garbage, so an entry read
before it is written shows up. GPU only."""

from __future__ import annotations

import itertools

import pytest
import torch

from cases import (Case, assert_close_to_reference, backend_fn, brute_death, make_inputs, ranking_values,
                   reference_fn, run_with_grads)
from dmattn import cuda_ext
from dmattn.backends import cuda as cuda_backend

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and cuda_ext.available() and cuda_ext.has_visible()),
    reason="needs a CUDA device and a dmattn._cuda module with the visible-scope kernels")


@pytest.fixture(autouse=True)
def garbage_workspaces(monkeypatch):
    """Every int32/int64 ``torch.empty`` (the workspaces) starts as garbage."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(-123457) if t.dtype in (torch.int32, torch.int64) else t

    monkeypatch.setattr(torch, "empty", poisoned)


def _death(values, allowed, w, **kw):
    """visible_death of (rows, K) values as a (1, rows, 1, K) bias, back as (rows, K) on the CPU."""
    bias = values.view(1, *values.shape[:1], 1, -1).cuda()
    mask = None if allowed is None else allowed.view(1, *allowed.shape[:1], 1, -1).cuda()
    return cuda_ext.visible_death(bias, mask, w, **kw)[0].cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_death_matches_brute_force(kind, dtype):
    g = torch.Generator().manual_seed(7)
    for K, w, masked in itertools.product([1, 2, 31, 33, 300, 1100, 4099], [1, 2, 17, 64, 500], [False, True]):
        if w > K:
            continue
        values = ranking_values(3, K, kind, dtype, g)
        allowed = torch.rand(3, K, generator=g) < 0.55 if masked else None
        if masked:
            allowed[0] = False  # a row with no candidate at all
        got = _death(values, allowed, w)
        for r in range(3):
            want = brute_death(values[r], None if allowed is None else allowed[r], w)
            assert torch.equal(got[r], want), (K, w, masked, r)


@pytest.mark.parametrize("bucket", [32, 64, 256])
def test_death_other_buckets(bucket):
    g = torch.Generator().manual_seed(11)
    for K, w, masked in [(1100, 17, True), (1100, 500, False), (300, 1, False), (65, 2, True), (20000, 700, False)]:
        values = ranking_values(2, K, "ties" if masked else "random", torch.bfloat16, g)
        allowed = torch.rand(2, K, generator=g) < 0.55 if masked else None
        got = _death(values, allowed, w, bucket=bucket)
        for r in range(2):
            want = brute_death(values[r], None if allowed is None else allowed[r], w)
            assert torch.equal(got[r], want), (bucket, K, w, masked, r)


def test_broadcast_rows_and_strides():
    """Two batch rows, four selection heads reading two bias heads through a key stride of 2, and
    a mask shared by the batch: each selection row is its bias head's death."""
    g = torch.Generator().manual_seed(5)
    K, w = 777, 40
    wide = torch.randn(2, 2, 1, 2 * K, generator=g).to(torch.bfloat16)
    allowed = torch.rand(1, 4, 1, K, generator=g) < 0.7
    bias = wide.cuda()[..., ::2]
    death = cuda_ext.visible_death(bias, allowed.cuda(), w, rows=(2, 4)).cpu()
    assert death.shape == (2, 4, K)
    for b, h in itertools.product(range(2), range(4)):
        want = brute_death(wide[b, h // 2, 0, ::2], allowed[0, h, 0], w)
        assert torch.equal(death[b, h], want), (b, h)


def test_float64_bias_is_refused():
    with pytest.raises(TypeError, match="float64"):
        cuda_ext.visible_death(torch.zeros(1, 1, 1, 8, dtype=torch.float64, device="cuda"), None, 2)


@pytest.mark.parametrize("Q, K, w, bm", [(200, 200, 17, 32), (77, 300, 40, 16), (300, 120, 9, 64), (5, 5, 2, 16),
                                         (64, 1100, 100, 32), (3000, 3000, 256, 128)])
def test_block_lists(Q, K, w, bm):
    g = torch.Generator().manual_seed(3)
    values = torch.randn(2, K, generator=g).to(torch.bfloat16)
    allowed = torch.rand(2, K, generator=g) < 0.8
    death = cuda_ext.visible_death(values.view(1, 2, 1, K).cuda(), allowed.view(1, 2, 1, K).cuda(), w)
    idx, cnt, ever, before = cuda_ext.visible_lists(death, Q=Q, window=w, block_m=bm)
    nblk = -(-Q // bm)
    assert idx.shape == (1, 2, nblk, min(K, w + bm)) and cnt.shape == (1, 2, nblk, 2)
    idx, cnt, d = idx[0].cpu(), cnt[0].cpu(), death[0].cpu()
    j = torch.arange(K)
    for r in range(2):  # the dk/dv kernel's keys: the ever-alive ones, ascending, and their counts
        ever_r = j[d[r] > j]
        assert torch.equal(before[0, r].cpu().long(), (d[r] > j).long().cumsum(0))
        assert torch.equal(ever[0, r, :len(ever_r)].cpu().long(), ever_r)
    for r, b in itertools.product(range(2), range(nblk)):
        c_lo = b * bm + K - Q
        c_hi = min(b * bm + bm, Q) - 1 + K - Q
        alive = (j <= c_hi) & (d[r] > j) & (d[r] > c_lo)
        whole = alive & (j <= c_lo) & (d[r] > c_hi)  # seen by every query of the block
        n, n_full = (int(x) for x in cnt[r, b])
        got = idx[r, b, :n].long()
        assert n <= w + bm and n_full == int(whole.sum()), (Q, K, w, bm, r, b)
        assert torch.equal(got[:n_full], j[whole]) and torch.equal(got[n_full:], j[alive & ~whole]), (r, b)


def test_capture_in_a_cuda_graph():
    """No host synchronisation: the whole metadata path replays from a CUDA graph."""
    K, w, Q, bm = 2048, 128, 2048, 64
    bias = torch.randn(1, 2, 1, K, device="cuda").to(torch.bfloat16)
    want_death = cuda_ext.visible_death(bias, None, w)
    want = cuda_ext.visible_lists(want_death, Q=Q, window=w, block_m=bm)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on the side stream, as capture wants
        cuda_ext.visible_lists(cuda_ext.visible_death(bias, None, w), Q=Q, window=w, block_m=bm)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        death = cuda_ext.visible_death(bias, None, w)
        got = cuda_ext.visible_lists(death, Q=Q, window=w, block_m=bm)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(death, want_death)
    assert torch.equal(got[1], want[1])
    for r, b in itertools.product(range(2), range(Q // bm)):
        n = int(want[1][0, r, b, 0])
        assert torch.equal(got[0][0, r, b, :n], want[0][0, r, b, :n])


PREFIX_CASES = [
    Case(B=2, Q=100, K=130, H=4, H_kv=2, D=64, window=20, scope="visible", causal=True),  # Q < K, bias (B, H_kv)
    Case(B=1, Q=150, K=150, H=4, H_kv=1, D=128, window=33, scope="visible", causal=True, bias="b_h_1",
         softcap=5.0),  # a list per query head: per-head dk/dv partials
    Case(B=1, Q=90, K=70, H=2, H_kv=2, D=32, window=9, scope="visible", causal=True, bias="1_1_1",
         mask="b_hkv_1"),  # Q > K: empty rows; a mask folded into death
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", PREFIX_CASES, ids=str)
def test_prefix_path_matches_reference(case, dtype):
    if case.D not in cuda_backend.CudaBackend.head_dims:
        pytest.skip(f"head dim {case.D} not compiled")
    q, k, v, bias, mask = make_inputs(case, dtype, "cuda")
    got = run_with_grads(backend_fn(case, "cuda"), q, k, v, bias, mask)
    low = run_with_grads(reference_fn(case, dtype), q, k, v, bias, mask)
    truth = run_with_grads(reference_fn(case, torch.float64), q, k, v, bias, mask)
    assert_close_to_reference(got, low, truth, dtype, label=f"[{case} {dtype}] ")


def test_prefix_binding_refusals():
    """The binding names what is wrong with PREFIX arguments before any launch."""
    D = 64
    if D not in cuda_backend.CudaBackend.head_dims:
        pytest.skip("head dim 64 not compiled")
    q = torch.randn(1, 64, 2, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 64, 1, D, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16)
    meta = cuda_ext.visible_selection(bias, None, window=8, Q=64, block_m=cuda_ext.fwd_block_m(D))
    fwd = dict(idx=meta["idx"], counts=meta["counts"], death=meta["death"])
    with pytest.raises(ValueError, match="causal"):
        cuda_ext.forward(q, k, k, bias, None, is_causal=False, **fwd)
    with pytest.raises(ValueError, match="split"):
        cuda_ext.forward(q, k, k, bias, None, is_causal=True, splits=2, **fwd)
    with pytest.raises(ValueError, match="4-D"):
        cuda_ext.forward(q, k, k, bias, None, is_causal=True, idx=meta["idx"][:, :, 0], counts=meta["counts"][..., 0],
                         death=meta["death"])
    with pytest.raises(ValueError, match="mask"):
        cuda_ext.forward(q, k, k, bias, torch.ones(1, 1, 1, 64, device="cuda", dtype=torch.bool), is_causal=True,
                         **fwd)
    with pytest.raises(ValueError, match="death"):
        cuda_ext.forward(q, k, k, bias, None, is_causal=True, idx=meta["idx"], counts=meta["counts"],
                         death=meta["death"][..., :32])
