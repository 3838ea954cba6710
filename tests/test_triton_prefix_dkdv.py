"""The Triton dk/dv kernel on the PREFIX path (causal, visible scope, query-broadcast bias): each
tile of ever-alive keys (``prefix.alive_order``) walks its query blocks as a tested head where
keys are still being born, a FULL middle where every key is visible to every query, and a tested
tail where keys have died. The cases are chosen so that, under the interpreter's 32 x 32 tiles,
tiles with all three parts exist, and are scaled with the tile size elsewhere (a GPU's 64 x 64 dk/dv
tiles for D = 16: twice the lengths and window); gradients are checked against the float64
reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cases import (Case, SELECTION_DEVICES, assert_close_to_reference, backend_fn, make_inputs, reference_fn,
                   run_with_grads)
from dmattn.kernels.triton import attention
from dmattn.problem import make_problem

# Lengths and window for 32 x 32 dk/dv tiles, scaled by the launch's own tile size (the float32
# config; float16 at D = 16 gets the same tiles).
_SCALE = max(attention.launch_config(16, 4, "dkdv")[key] for key in ("BLOCK_M", "BLOCK_N")) // 32
CASES = [dataclasses.replace(c, Q=c.Q * _SCALE, K=c.K * _SCALE, window=c.window * _SCALE) for c in [
    Case(B=1, Q=512, K=512, D=16, window=128, causal=True),                      # GQA 4/2, bias (B, H_kv, 1, K)
    Case(B=1, Q=400, K=640, D=16, window=128, causal=True),                      # Q < K
    Case(B=1, Q=600, K=520, D=16, window=128, causal=True),                      # Q > K: empty rows first
    Case(B=1, Q=512, K=512, D=16, bias="b_h_1", mask="1_hkv_1", window=128, causal=True, softcap=2.5),
]]


def _block_ranges(order, n_alive, death, Q, K, bm, bn):
    """Per complete tile of ``order``: (m_lo, m_full, m_full_end, m_hi) as the dk/dv kernel derives
    them, written out from the visibility rule ``j <= i + K - Q < death_j``."""
    off = K - Q
    out = []
    for t in range(0, n_alive - bn + 1, bn):
        keys = order[t:t + bn].long()
        d = death[keys]
        m_lo = max(int(keys.min()) - off, 0) // bm * bm
        m_hi = min(max(int(d.max()) - off, 0), Q)
        full = -(-max(int(keys.max()) - off, 0) // bm) * bm
        end = int(d.min()) - off
        full_end = m_hi if end >= Q else max(end, 0) // bm * bm
        full = min(max(full, m_lo), m_hi)
        out.append((m_lo, full, min(max(full_end, full), m_hi), m_hi))
    return out


@pytest.mark.parametrize("device", SELECTION_DEVICES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_prefix_dkdv_full_range_matches_reference(device, case):
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    for dtype in dtypes:
        q, k, v, bias, mask = make_inputs(case, dtype, device)
        if dtype == dtypes[0]:
            _assert_tiles_have_three_parts(case, q, k, v, bias, mask)
        got = run_with_grads(backend_fn(case, "triton"), q, k, v, bias, mask)
        low = run_with_grads(reference_fn(case, dtype), q, k, v, bias, mask)
        truth = run_with_grads(reference_fn(case, torch.float64), q, k, v, bias, mask)
        assert_close_to_reference(got, low, truth, dtype, label=f"[triton prefix dkdv {dtype}] ")


def _assert_tiles_have_three_parts(case, q, k, v, bias, mask):
    """The case reaches what it is meant to test: on the PREFIX path, some tiles have a tested head,
    a FULL middle and a tested tail, with the launch's own tile sizes and key order."""
    opts = dict(window=case.window, topk_scope=case.scope, is_causal=case.causal)
    p = make_problem(q, k, v, bias, mask, **opts)
    a = attention._Launch(p, q, k, v, bias, mask)
    assert a.sel.path == attention.PREFIX
    cfg = attention.launch_config(p.D, q.element_size(), "dkdv", attention.PREFIX)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    tiles, _ = a.key_tiles(bm, bn)
    death = a.sel.death.view(-1, p.K).cpu()
    three = 0
    for r in range(death.shape[0]):
        n = int(tiles["Cnt"][r])
        for m_lo, full, full_end, m_hi in _block_ranges(tiles["Idx"][r].cpu(), n, death[r], p.Q, p.K, bm, bn):
            three += m_lo < full < full_end < m_hi
    assert three >= 2, three


@pytest.mark.parametrize("device", SELECTION_DEVICES)
def test_prefix_dkdv_full_range_is_bitwise_reproducible(device):
    case = CASES[0]
    inputs = make_inputs(case, torch.float32, device)
    fn = backend_fn(case, "triton", deterministic=True)
    first = run_with_grads(fn, *inputs)
    again = run_with_grads(fn, *inputs)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
