"""The Triton visible-scope forward over compact super-block copies (``attention.COMPACT_PREFIX``):
the super-block lists and each query block's ranges in them (``prefix.superblock_lists``) against
the visibility rule ``j <= c_i < death_j``, the copies themselves, and out and lse against the
float64 reference, with the launch's own tile sizes: the cases are scaled so that blocks with a
tested head, a FULL middle and a tested tail exist under the GPU's 128 x 64 tiles as under the
interpreter's 32 x 32 ones (the test asserts it, so it cannot pass on another path)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from cases import (Case, SELECTION_DEVICES, assert_close_to_reference, backend_fn, device_for, make_inputs,
                   reference_fn, unavailable)
from dmattn.kernels.triton import attention, prefix

pytestmark = pytest.mark.skipif(unavailable("triton") is not None, reason=str(unavailable("triton")))

_CFG = attention.launch_config(32, 4, "fwd")
_SCALE = _CFG["BLOCK_M"] // 32
# Lengths and windows for 32-query blocks, scaled with the launch's block size; PREFIX_SUPERBLOCK
# (queries per super-block) is set per case so super-blocks span several blocks.
CASES = [(dataclasses.replace(c, Q=c.Q * _SCALE, K=c.K * _SCALE, window=c.window * _SCALE), sbq * _SCALE)
         for c, sbq in [
    (Case(B=1, Q=300, K=300, H=4, H_kv=2, D=32, window=40, causal=True), 128),   # GQA, odd lengths
    (Case(B=2, Q=180, K=290, H=4, H_kv=2, D=32, window=50, causal=True), 64),    # Q < K
    (Case(B=1, Q=290, K=170, H=2, H_kv=1, D=32, window=48, causal=True), 128),   # Q > K: empty rows
    (Case(B=1, Q=256, K=256, H=4, H_kv=2, D=32, bias="1_1_1", mask="b_hkv_1", window=64, causal=True,
          softcap=2.5), 128),
    (Case(B=1, Q=300, K=300, H=4, H_kv=2, D=32, bias="b_h_1", window=60, causal=True), 96),  # a row per head
    (Case(B=1, Q=200, K=200, H=4, H_kv=4, D=32, window=190, causal=True), 64),  # window near K
]]


def _inputs(case, dtype):
    q, k, v, bias, mask = make_inputs(case, dtype, device_for("triton"))
    if mask is not None:
        mask[0, 0] = False  # a selection row with no allowed key: its rows are empty
    return q, k, v, bias, mask


def _spy(monkeypatch, sbq, desc=None):
    """COMPACT_PREFIX on with ``sbq`` queries per super-block; records each call's lists."""
    calls = []
    real = attention._compact_prefix

    def spy(a, bm, bn):
        lists, compact = real(a, bm, bn)
        death = a.sel.death.view(-1, a.p.K)
        # The counts, which the wrapper does not return: the same lists again.
        _, nl, _ = prefix.superblock_lists(death, a.p.Q, a.p.effective_window, bm, compact["SBG"])
        calls.append(dict(lists=lists, compact=compact, death=death.clone(), nl=nl, bm=bm, bn=bn, Q=a.p.Q, K=a.p.K))
        return dict(lists), compact

    monkeypatch.setattr(attention, "COMPACT_PREFIX", True)
    monkeypatch.setattr(attention, "PREFIX_SUPERBLOCK", sbq)
    monkeypatch.setattr(attention, "COMPACT_DESC", desc)
    monkeypatch.setattr(attention, "_compact_prefix", spy)
    return calls


def _check_ranges(idx, nl, meta, death, Q, K, bm, g, bn=None):
    """Every block's ranges against the rule; returns how many blocks have a tested head, a FULL
    middle of at least one ``bn`` tile and a tested tail."""
    off = K - Q
    j = torch.arange(K)
    nblk = meta.shape[1]
    three = 0
    for r, blk in itertools.product(range(death.shape[0]), range(nblk)):
        d = death[r].cpu().long()
        sb = blk // g
        n = int(nl[r, sb])
        lst = idx[r, sb, :n].cpu().long()
        assert n <= idx.shape[-1] and len(set(lst.tolist())) == n
        t0, f0, f1, t1, r0, r1 = (int(x) for x in meta[r, blk])
        assert 0 <= t0 <= f0 <= f1 <= t1 <= r0 <= r1 <= n or (r0 == r1 and t1 <= r1), (r, blk, meta[r, blk], n)
        i = torch.arange(blk * bm, min(blk * bm + bm, Q)) + off  # the block's causal limits
        vis = (j[None, :] <= i[:, None]) & (d[None, :] > i[:, None])  # [rows, K]
        seen = j[vis.any(0)]
        inside = torch.cat([lst[t0:t1], lst[r0:r1]])
        assert set(seen.tolist()) <= set(inside.tolist()), (r, blk)  # nothing visible is left out
        assert len(set(inside.tolist())) == inside.numel()  # nor visited twice
        full = lst[f0:f1]
        assert vis[:, full].all(), (r, blk)  # FULL keys are visible to every query of the block
        if bn is not None and t0 < f0 and f1 - f0 >= bn and t1 > f0 + (f1 - f0) // bn * bn and len(i):
            three += 1
    return three


@pytest.mark.parametrize("device", SELECTION_DEVICES)
def test_superblock_lists(device):
    g_ = torch.Generator().manual_seed(5)
    for (Q, K, w, bm, g), masked in itertools.product(
            [(200, 200, 17, 16, 4), (77, 300, 40, 16, 2), (300, 120, 9, 32, 4), (5, 5, 2, 16, 1),
             (64, 700, 100, 16, 8), (129, 129, 128, 32, 2)], [False, True]):
        values = torch.randn(3, K, generator=g_)
        allowed = torch.rand(3, K, generator=g_) < 0.6 if masked else None
        if masked:
            allowed[1] = False
        death = prefix.death_positions(values.to(device), None if allowed is None else allowed.to(device), w)
        idx, nl, meta = prefix.superblock_lists(death, Q, w, bm, g)
        assert idx.shape[:2] == nl.shape and meta.shape == (3, -(-Q // bm), 6)
        assert idx.shape[-1] == min(K, min(w, K) + g * bm)
        d = death.cpu()
        _check_ranges(idx, nl, meta, d, Q, K, bm, g)
        off = K - Q
        for r, sb in itertools.product(range(3), range(idx.shape[1])):  # the two runs, in order
            n = int(nl[r, sb])
            lst = idx[r, sb, :n].cpu().long()
            c0 = sb * g * bm + off
            c1 = min(sb * g * bm + g * bm, Q) - 1 + off
            j = torch.arange(K)
            run1 = (j <= c0) & (d[r] > c0)
            run2 = (j > c0) & (j <= c1) & (d[r] > c1)
            run3 = (j > c0) & (d[r] > j) & (d[r] <= c1)
            n1, n2 = int(run1.sum()), int(run1.sum() + run2.sum())
            assert n == n2 + int(run3.sum())
            assert set(lst[:n1].tolist()) == set(j[run1].tolist()) and (d[r][lst[:n1]].diff() >= 0).all()
            assert torch.equal(lst[n1:n2], j[run2]) and torch.equal(lst[n2:], j[run3])


@pytest.mark.parametrize("desc", [False, True], ids=["pointers", "descriptors"])
@pytest.mark.parametrize("case, sbq", CASES, ids=[str(c) for c, _ in CASES])
def test_compact_prefix_matches_reference(case, sbq, desc, monkeypatch):
    calls = _spy(monkeypatch, sbq, desc)
    inputs = _inputs(case, torch.float32)
    got = backend_fn(case, "triton")(*inputs)
    assert len(calls) == 1, "the compact PREFIX forward did not run"
    c = calls[0]
    assert c["compact"]["USE_DESC"] == (desc and case.D == attention._head_block(case.D))
    g = c["compact"]["SBG"]
    assert g > 1, "super-blocks of one block do not test the ranges"
    three = _check_ranges(c["lists"]["Idx"], c["nl"], c["lists"]["Cnt"], c["death"], c["Q"], c["K"], c["bm"], g,
                          c["bn"])
    if case.window < case.K // 2:
        assert three >= 1, "no block has a tested head, a FULL tile and a tested tail"
    truth = reference_fn(case, torch.float64)(*inputs)
    low = reference_fn(case, torch.float32)(*inputs)
    assert_close_to_reference(got, low, truth, torch.float32, label=f"{case}: ")


def test_compact_prefix_float16(monkeypatch):
    case, sbq = CASES[0]
    calls = _spy(monkeypatch, sbq, None)
    inputs = _inputs(case, torch.float16)
    got = backend_fn(case, "triton")(*inputs)
    assert len(calls) == 1
    truth = reference_fn(case, torch.float64)(*inputs)
    low = reference_fn(case, torch.float16)(*inputs)
    assert_close_to_reference(got, low, truth, torch.float16, label=f"{case}: ")


def test_compact_prefix_agrees_with_gathering(monkeypatch):
    """Against the gathering PREFIX forward (COMPACT_PREFIX off): the same keys in another order,
    so out agrees to rounding and lse's infinities (empty rows) match exactly."""
    case, sbq = CASES[2]
    inputs = _inputs(case, torch.float32)
    monkeypatch.setattr(attention, "COMPACT_PREFIX", False)
    want = backend_fn(case, "triton")(*inputs)
    calls = _spy(monkeypatch, sbq, False)
    got = backend_fn(case, "triton")(*inputs)
    assert len(calls) == 1
    for g, w in zip(got, want):
        fin = torch.isfinite(w)
        assert torch.equal(torch.isfinite(g), fin)
        assert (g[fin] - w[fin]).abs().max() < 1e-4
    assert not torch.isfinite(want[1]).all(), "the case should have empty rows"


def test_compact_prefix_buffers(monkeypatch):
    """The copies: list s of (batch, compact head) holds its keys' key and value rows and bias
    values, and the ``bn`` rows after its count are zero."""
    case, sbq = CASES[1]
    calls = _spy(monkeypatch, sbq, False)
    q, k, v, bias, mask = _inputs(case, torch.float32)
    backend_fn(case, "triton")(q, k, v, bias, mask)
    c = calls[0]
    cp, idx = c["compact"], c["lists"]["Idx"]
    ch, nsb, wc, bn = cp["CH"], cp["NSB"], cp["WC"], c["bn"]
    assert ch == case.H_kv and wc % bn == 0 and wc >= idx.shape[-1]
    nl = c["nl"]
    kc = cp["KC"].view(case.B, ch, nsb, wc, case.D)
    vc = cp["VC"].view(case.B, ch, nsb, wc, case.D)
    bc = cp["BC"].view(case.B, ch, nsb, wc)
    for b, g, s in itertools.product(range(case.B), range(ch), range(nsb)):
        row = b * ch + g  # bias (B, H_kv, 1, K): one selection row per (batch, kv head)
        n = int(nl[row, s])
        keys = idx[row, s, :n].long()
        assert torch.equal(kc[b, g, s, :n], k[b, keys, g]) and torch.equal(vc[b, g, s, :n], v[b, keys, g])
        assert torch.equal(bc[b, g, s, :n], bias[b, g, 0, keys])
        end = min(n + bn, wc)
        assert not kc[b, g, s, n:end].any() and not vc[b, g, s, n:end].any() and not bc[b, g, s, n:end].any()
