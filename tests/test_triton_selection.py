"""The Triton backend's selection metadata (``dmattn.kernels.triton.selection``) against the
reference: index lists, per-query thresholds (also when computed in several chunks), the per-block
list prefixes, and the choice of path. Plain torch code: runs without the interpreter or a GPU."""

from __future__ import annotations

import itertools

import pytest
import torch

from cases import SELECTION_DEVICES
from dmattn import reference
from dmattn.kernels.triton import selection as sel

DEVICES = SELECTION_DEVICES
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _bias(shape, dtype, seed, special: bool):
    """Random values; with ``special``, many ties, -0.0 next to +0.0 and some -inf."""
    g = torch.Generator().manual_seed(seed)
    if not special:
        return torch.randn(shape, generator=g).to(dtype)
    t = (torch.randint(-2, 3, shape, generator=g) * 0.5).to(dtype)
    t[..., 1::4] = -0.0
    t[..., 2::7] = float("-inf")
    return t


# (B, H, Q, K, bias shape, mask shape or None, window)
SHAPES = [
    (2, 4, 9, 13, (2, 2, 1, 13), None, 5),
    (2, 4, 9, 13, (1, 4, 1, 13), (2, 1, 1, 13), 3),
    (1, 2, 17, 11, (1, 2, 17, 11), (1, 1, 1, 11), 4),
    (2, 3, 6, 20, (1, 1, 1, 20), (2, 3, 6, 20), 7),
    (1, 1, 30, 30, (1, 1, 1, 30), None, 1),
    (1, 2, 5, 8, (1, 2, 1, 8), (1, 2, 5, 8), 7),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_metadata_gives_reference_visible_mask(shape, dtype, special, device, monkeypatch):
    B, H, Q, K, bshape, mshape, window = shape
    bias = _bias(bshape, dtype, seed=len(bshape) + K, special=special).to(device)
    mask = None if mshape is None else (torch.rand(mshape, generator=torch.Generator().manual_seed(1)) < 0.6).to(device)
    B_s, H_s = sel.selection_rows(bias, mask)
    # Chunks of a few query rows: the chunked threshold loop must agree with one pass.
    monkeypatch.setattr(sel, "_CHUNK_ELEMENTS", 3 * B_s * H_s * K)
    for scope, causal, w in itertools.product(["visible", "global"], [False, True], [window, None, K, K + 3]):
        got = sel.visible_mask(bias, mask, B=B_s, H=H_s, Q=Q, K=K, window=w, scope=scope, is_causal=causal)
        want = reference.visible_mask(bias.cpu(), None if mask is None else mask.cpu(), B=B_s, H=H_s, Q=Q, K=K,
                                      window=w, topk_scope=scope, is_causal=causal)
        assert torch.equal(got.cpu(), want), (scope, causal, w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_lists_are_reference_topk_indices(shape, dtype, device):
    *_, K, bshape, mshape, window = shape
    bias = _bias(bshape, dtype, seed=K, special=True).to(device)
    mask = None if mshape is None else (torch.rand(mshape, generator=torch.Generator().manual_seed(2)) < 0.4).to(device)
    for w in (window, 1, K - 1, K, K + 5):
        got = sel.selected_lists(bias, mask, w)
        assert got.dtype == torch.int32 and got.is_contiguous()
        got = got.long().cpu()
        got[got == K] = -1
        assert torch.equal(got, reference.topk_indices(bias.cpu(), w, None if mask is None else mask.cpu())), w


def test_threshold_pairs_follow_the_tie_rule():
    """Ties at the threshold value go to the earlier keys; a row with too few candidates passes all."""
    bias = torch.tensor([[[[1.0, 2.0, 1.0, 2.0, 1.0, -0.0, 0.0]]]])
    tv, ti = sel.thresholds(bias, None, 3, 1, 1, 1, causal_candidates=False)
    assert tv.item() == 1.0 and ti.item() == 0  # keys 1 and 3, then the first 1.0
    tv, ti = sel.thresholds(bias, None, 6, 1, 1, 1, causal_candidates=False)
    assert tv.item() == 0.0 and ti.item() == 5  # -0.0 and +0.0 tie: the earlier one wins
    mask = torch.tensor([[[[True, False, True, False, False, False, False]]]])
    tv, ti = sel.thresholds(bias, mask, 3, 1, 1, 1, causal_candidates=False)
    assert tv.item() == float("-inf") and ti.item() == sel.INT32_MAX


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Q, K, block_m", [(10, 10, 4), (5, 12, 2), (12, 5, 4), (1, 9, 16), (9, 1, 2)])
def test_block_counts_are_visible_prefixes(Q, K, block_m, causal):
    g = torch.Generator().manual_seed(Q * K)
    bias = torch.randn(2, 3, 1, K, generator=g)
    mask = torch.rand(2, 3, 1, K, generator=g) < 0.7
    idx = sel.selected_lists(bias, mask, max(1, K // 2)).squeeze(2)
    counts = sel.block_counts(idx, Q, K, block_m, causal)
    for m in range(-(-Q // block_m)):
        last = min((m + 1) * block_m, Q) - 1
        limit = last + K - Q if causal else K - 1
        want = ((idx <= limit) & (idx < K)).sum(-1)
        assert torch.equal(counts[..., m].long(), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Q, K, w, block_m", [(10, 10, 5, 4), (5, 12, 6, 2), (12, 5, 3, 4), (1, 9, 4, 16),
                                              (300, 1000, 100, 32), (1000, 700, 257, 128), (70, 70, 70, 16)])
def test_list_counts_kernel_matches_block_counts(device, Q, K, w, block_m, causal):
    from dmattn.kernels.triton import topk
    g = torch.Generator().manual_seed(Q + K + w)
    bias = torch.randn(2, 3, 1, K, generator=g)
    mask = torch.rand(2, 3, 1, K, generator=g) < 0.7  # lists padded with the sentinel K
    idx = sel.selected_lists(bias, mask, w).squeeze(2).to(device)
    got = topk.list_counts(idx, Q, K, block_m, causal)
    assert torch.equal(got.cpu(), sel.block_counts(idx, Q, K, block_m, causal).cpu())


def test_path_choice():
    from dmattn.problem import ranks_prefixes
    assert sel.choose_path(None, 10, True, True) == sel.DENSE
    assert sel.choose_path(10, 10, False, True) == sel.DENSE
    assert sel.choose_path(3, 10, True, False) == sel.LIST
    assert sel.choose_path(3, 10, True, True) == sel.PREFIX
    assert sel.choose_path(3, 10, False, False) == sel.THRESHOLD
    assert sel.choose_path(3, 10, False, True) == sel.THRESHOLD
    # Only the visible scope with causality and several queries ranks per-query prefixes.
    assert ranks_prefixes("visible", True, 2) and not ranks_prefixes("visible", True, 1)
    assert not ranks_prefixes("global", True, 2) and not ranks_prefixes("visible", False, 2)
