"""Tile skipping for per-query (4-D) masks and windows over a per-query bias or mask (Triton's
TILES mode): the per-tile occupancy against the reference's ``visible`` mask, and attention with
gradients on block-sparse per-query masks, where most tiles are empty, against the reference."""

from __future__ import annotations

import pytest
import torch

from cases import (Case, SELECTION_DEVICES, assert_close_to_reference, backend_fn, make_inputs, reference_fn,
                   run_with_grads)
from dmattn import reference
from dmattn.kernels.triton import attention
from dmattn.problem import make_problem


def _launch(q, k, v, bias, mask, **options):
    p = make_problem(q, k, v, bias, mask, **options)
    return p, attention._Launch(p, q, k, v, bias, mask)


def _block_sparse_mask(B, H, Q, K, block, seed):
    """A per-query mask that allows whole (block x block) squares at random, so many tiles of any
    tiling are empty, plus a few single pairs so some tiles hold one visible pair only."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(B, H, -(-Q // block), -(-K // block), generator=g) < 0.3
    mask = coarse.repeat_interleave(block, 2).repeat_interleave(block, 3)[:, :, :Q, :K].clone()
    singles = torch.rand(B, H, Q, K, generator=g) < 0.002
    return mask | singles


@pytest.mark.parametrize("device", SELECTION_DEVICES)
@pytest.mark.parametrize("window, causal, mask_heads",
                         [(None, True, "H"), (None, False, "H"), (13, True, "H"), (13, False, "H"),
                          (None, True, "H_kv"), (None, False, "1"), (13, True, "1")])
@pytest.mark.parametrize("tiling", [(32, 32), (16, 64)])
def test_occupancy_matches_reference(device, window, causal, mask_heads, tiling):
    """One occupancy row per class of query heads that read the same mask, bias and threshold
    rows: H rows for a per-head mask or a window over a per-head bias, H_kv or 1 for a shared mask
    without a window; each row equals the reference's tiles for the first head of its class."""
    B, H, H_kv, Q, K, D = 2, 4, 2, 70, 90, 16
    g = torch.Generator().manual_seed(Q * K)
    q = torch.randn(B, Q, H, D, generator=g).to(device)
    k = torch.randn(B, K, H_kv, D, generator=g).to(device)
    v = torch.randn(B, K, H_kv, D, generator=g).to(device)
    bias = torch.randn(B, H, Q, K, generator=g).to(device)
    HM = dict(H=H, H_kv=H_kv)[mask_heads] if mask_heads != "1" else 1
    mask = _block_sparse_mask(B if HM > 1 else 1, HM, Q, K, 16, seed=1).to(device)
    opts = dict(window=window, is_causal=causal, topk_scope="visible")
    p, a = _launch(q, k, v, bias, mask, **opts)
    assert a.flags["TILES"]
    occ_h = H if window is not None else HM
    assert a.sizes["OCC_H"] == occ_h
    bm, bn = tiling
    got = a.occupancy(bm, bn).cpu().bool()
    vis = reference.visible_mask(bias.cpu(), mask.cpu(), B=B, H=H, Q=Q, K=K, window=window, topk_scope="visible",
                                 is_causal=causal).expand(B, H, Q, K)
    nblk, nt = -(-Q // bm), -(-K // bn)
    padded = torch.zeros(B, H, nblk * bm, nt * bn, dtype=torch.bool)
    padded[:, :, :Q, :K] = vis
    want = padded.view(B, H, nblk, bm, nt, bn).any(5).any(3)[:, ::H // occ_h].reshape(B * occ_h, nblk, nt)
    assert torch.equal(got, want)
    assert not want.all()  # the case has empty tiles to skip


@pytest.mark.parametrize("device", SELECTION_DEVICES)
@pytest.mark.parametrize("case", [Case(Q=97, K=97, bias="b_h_q", mask="b_h_q", window=None, causal=True),
                                  Case(Q=97, K=120, bias="b_hkv_1", mask="1_hkv_q", window=None, causal=False),
                                  Case(Q=80, K=80, bias="b_h_q", mask="b_h_q", window=11, scope="visible",
                                       causal=True),
                                  Case(Q=64, K=100, bias="b_1_q", mask="b_h_q", window=9, scope="global",
                                       causal=True, softcap=2.5)], ids=str)
def test_block_sparse_masks_match_reference(device, case):
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    for dtype in dtypes:
        q, k, v, bias, _ = make_inputs(case, dtype, device)
        shape = (case.B, case.H if case.mask == "b_h_q" else case.H_kv, case.Q, case.K)
        mask = _block_sparse_mask(*shape, 24, seed=3).to(device)
        if case.mask == "b_h_q":
            mask = mask[:, :case.H]
        p, a = _launch(q, k, v, bias, mask, window=case.window, topk_scope=case.scope, is_causal=case.causal)
        assert a.flags["TILES"] and not a.occupancy(32, 32).bool().all()
        got = run_with_grads(backend_fn(case, "triton"), q, k, v, bias, mask)
        low = run_with_grads(reference_fn(case, dtype), q, k, v, bias, mask)
        truth = run_with_grads(reference_fn(case, torch.float64), q, k, v, bias, mask)
        assert_close_to_reference(got, low, truth, dtype, label=f"[triton tiles {dtype}] ")
