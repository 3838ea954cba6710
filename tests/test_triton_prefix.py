"""The visible-scope metadata of the Triton backend (``dmattn.kernels.triton.prefix``): each key's
death position against a brute force written from the SPEC, the per-query-block alive lists, and
the dk/dv key order. Triton kernels: CPU tensors under the interpreter, CUDA tensors when present."""

from __future__ import annotations

import itertools

import pytest
import torch

from cases import SELECTION_DEVICES, brute_death, ranking_values
from dmattn.kernels.triton import prefix

DEVICES = SELECTION_DEVICES


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_death_matches_brute_force(kind, dtype, device):
    g = torch.Generator().manual_seed(7)
    # K spans one chunk, several chunks with a partial last one, and a search over many buckets.
    for K, w, masked in itertools.product([1, 2, 63, 65, 300, 1100], [1, 2, 17, 64, 500], [False, True]):
        if w >= K:
            continue
        values = ranking_values(3, K, kind, dtype, g)
        allowed = torch.rand(3, K, generator=g) < 0.55 if masked else None
        if masked:
            allowed[0] = False  # a row with no candidate at all
        got = prefix.death_positions(values.to(device), None if allowed is None else allowed.to(device), w)
        for r in range(3):
            want = brute_death(values[r], None if allowed is None else allowed[r], w)
            assert torch.equal(got[r].cpu(), want), (K, w, masked, r)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tiles", [(16, 128), (32, 64), (64, 32)], ids=str)
def test_death_other_tiles_match_brute_force(tiles, device):
    """The death kernel's rank chunk R and position bucket P apart (the default has R = P = 32
    at these K): bucket picks in several slices, chunks wider than buckets and the reverse."""
    g = torch.Generator().manual_seed(11)
    for K, w, masked in [(1100, 17, True), (1100, 500, False), (300, 1, False), (300, 64, True), (65, 2, False)]:
        values = ranking_values(2, K, "ties" if masked else "random", torch.bfloat16, g)
        allowed = torch.rand(2, K, generator=g) < 0.55 if masked else None
        got = prefix.death_positions(values.to(device), None if allowed is None else allowed.to(device), w,
                                     tiles=tiles)
        for r in range(2):
            want = brute_death(values[r], None if allowed is None else allowed[r], w)
            assert torch.equal(got[r].cpu(), want), (tiles, K, w, masked, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("K", [1, 7, 32768, 32769])
def test_rank_order_is_the_stable_sort(K, dtype):
    """``rank_order``'s packed keys (int32 up to K = 32768 for 16-bit values, int64 above and for
    float32) order keys as a stable descending sort of the values does, masked keys last."""
    g = torch.Generator().manual_seed(5)
    values = ranking_values(2, K, "ties", dtype, g)
    values[1] = torch.randn(K, generator=g).to(dtype)
    for allowed in (None, torch.rand(2, K, generator=g) < 0.5):
        got = prefix.rank_order(values, allowed)
        keys = prefix._order_keys(values)
        if allowed is not None:
            keys = torch.where(allowed, keys, prefix._INT64_MIN)
        want = keys.sort(dim=-1, descending=True, stable=True).indices
        n = K if allowed is None else allowed.sum(-1)
        for r in range(2):
            m = int(n) if allowed is None else int(n[r])
            assert torch.equal(got[r, :m].long(), want[r, :m]), (K, dtype, r)
            assert torch.equal(got[r, m:].long().sort().values, want[r, m:].sort().values)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("K", [1, 7, 1100, 32768, 32769])
def test_keys_kernel_matches_the_definition(K, dtype, device):
    """``packed_keys`` (one kernel) gives ``packed_keys_reference``'s keys bit for bit: int32 and
    int64 layouts, ties, -0.0 and -inf, a mask per row and one shared by the rows (stride 0), and
    values read through a key stride of 2."""
    g = torch.Generator().manual_seed(13)
    wide = ranking_values(2, 2 * K, "ties", dtype, g)
    wide[1] = torch.randn(2 * K, generator=g).to(dtype)
    for values in (wide[:, :K], wide[:, ::2]):
        for allowed in (None, torch.rand(2, K, generator=g) < 0.5, (torch.rand(1, K, generator=g) < 0.5).expand(2, K)):
            want = prefix.packed_keys_reference(values, allowed)
            got = prefix.packed_keys(values.to(device), None if allowed is None else allowed.to(device))
            assert got.dtype == want.dtype and torch.equal(got.cpu(), want), (K, dtype, allowed is None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tile", [16, None], ids=["tile16", "default"])
def test_block_lists_and_order(device, tile, monkeypatch):
    if tile is not None:  # many scan steps per block
        monkeypatch.setattr(prefix, "LISTS_TILE", tile)
    g = torch.Generator().manual_seed(3)
    for Q, K, w, bm in [(200, 200, 17, 32), (77, 300, 40, 16), (300, 120, 9, 64), (5, 5, 2, 16), (64, 1100, 100, 32)]:
        values = torch.randn(2, K, generator=g)
        death = prefix.death_positions(values.to(device), None, w)
        # The bias values ride along: two heads for the two rows, and one head shared by both read
        # through a key stride of 2.
        two = torch.randn(1, 2, 1, K, generator=g, dtype=torch.float64).to(torch.bfloat16)
        # The stride-2 view is taken on the device: ``.to`` of a strided CPU view makes it contiguous.
        one = torch.randn(1, 1, 1, 2 * K, generator=g).to(device)[..., ::2]
        idx, cnt, bl = prefix.block_lists(death, Q, w, bm, bias=(two.to(device), 0, K, 1, 2))
        idx1, cnt1, bl1 = prefix.block_lists(death, Q, w, bm, bias=(one, 0, 2 * K, 2, 2))
        assert torch.equal(cnt1, cnt) and prefix.block_lists(death, Q, w, bm)[2] is None
        assert idx.shape == (2, -(-Q // bm), min(K, w + bm)) and cnt.shape == (2, idx.shape[1], 2)
        assert bl.shape == idx.shape and bl.dtype == torch.bfloat16 and bl1.dtype == torch.float32
        j = torch.arange(K)
        d = death.cpu()
        for r, b in itertools.product(range(2), range(idx.shape[1])):
            c_lo = b * bm + K - Q
            c_hi = min(b * bm + bm, Q) - 1 + K - Q
            alive = (j <= c_hi) & (d[r] > j) & (d[r] > c_lo)
            whole = alive & (j <= c_lo) & (d[r] > c_hi)  # seen by every query of the block
            n, n_full = (int(x) for x in cnt[r, b])
            got = idx[r, b, :n].cpu().long()
            assert n <= w + bm and n_full == int(whole.sum()), (Q, K, w, bm, r, b)
            assert torch.equal(got[:n_full], j[whole]) and torch.equal(got[n_full:], j[alive & ~whole])
            assert torch.equal(idx1[r, b, :n].cpu().long(), got)
            assert torch.equal(bl[r, b, :n].cpu(), two[0, r, 0, got])
            assert torch.equal(bl1[r, b, :n].cpu(), one[0, 0, 0, got].cpu())
        for bn in (16, 32):
            order, alive = prefix.alive_order(death, w, bn)
            chunk = prefix.order_chunk(w, bn)
            for r in range(2):
                n = int(alive[r])
                keys = order[r, :n].cpu().long()
                assert torch.equal(keys.sort().values, j[d[r] > j])
                chunks = keys.split(chunk)
                for c, nxt in zip(chunks, chunks[1:]):  # chunks by death, descending
                    assert int(d[r][c].min()) >= int(d[r][nxt].max())
                for c in chunks:  # each by position
                    assert (c.diff() > 0).all()
