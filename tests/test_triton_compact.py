"""The Triton forward over compact copies of the selected keys (``attention.COMPACT_LIST``, on by
default): out and lse against the float64 reference on the LIST path (query-broadcast bias and
mask, global scope), through contiguous pointer loads and through tensor descriptors (the
interpreter runs both), and bitwise equal to the gathering forward (COMPACT_LIST off)."""

from __future__ import annotations

import pytest
import torch

from cases import (LIST_BASE, LIST_CASES, Case, assert_close_to_reference, backend_fn, list_inputs, reference_fn,
                   unavailable)
from dmattn.kernels.triton import attention

pytestmark = pytest.mark.skipif(unavailable("triton") is not None, reason=str(unavailable("triton")))

BASE, CASES, _inputs = LIST_BASE, LIST_CASES, list_inputs


def _compact(monkeypatch, desc):
    """Turns the compact forward on (descriptors forced on or off) and counts its uses."""
    calls = []
    real = attention._compact_lists

    def spy(a, bn):
        r = real(a, bn)
        calls.append(r["USE_DESC"])
        return r

    monkeypatch.setattr(attention, "COMPACT_LIST", True)
    monkeypatch.setattr(attention, "COMPACT_DESC", desc)
    monkeypatch.setattr(attention, "_compact_lists", spy)
    return calls


def _check_reference(case, dtype, desc, monkeypatch, used_desc=None):
    """The compact forward (descriptors asked for or not) against the reference; it must have run
    once, with descriptors iff ``used_desc`` (default: as asked)."""
    calls = _compact(monkeypatch, desc)
    inputs = _inputs(case, dtype)
    got = backend_fn(case, "triton")(*inputs)
    assert calls == [desc if used_desc is None else used_desc], f"the compact forward did not run as asked: {calls}"
    truth = reference_fn(case, torch.float64)(*inputs)
    low = reference_fn(case, dtype)(*inputs)
    assert_close_to_reference(got, low, truth, dtype, label=f"{case}: ")


@pytest.mark.parametrize("desc", [False, True], ids=["pointers", "descriptors"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_compact_matches_reference(case, desc, monkeypatch):
    _check_reference(case, torch.float32, desc, monkeypatch)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[11]], ids=str)
def test_compact_float16(case, monkeypatch):
    _check_reference(case, torch.float16, True, monkeypatch)


def test_padded_head_dim(monkeypatch):
    """D = 40 pads to 64: descriptors need the block to span the row, so the call takes the pointer
    loads (masked along D) even when descriptors are asked for."""
    case = Case(**{**BASE, "D": 40, "mask": "b_hkv_1"}, causal=True)
    _check_reference(case, torch.float32, True, monkeypatch, used_desc=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[11], CASES[13]], ids=str)
def test_compact_is_bitwise_equal_to_gathering(case, dtype, monkeypatch):
    """Same values (the copies are exact, in the input and bias dtypes), same tiles and the same
    arithmetic in the same order, so out and lse agree to the bit. Positions past a tested tile's
    limit differ (zeros from masked gathers against real rows or padding of the copy) but their
    scores are -inf and their probabilities exactly 0 either way."""
    inputs = _inputs(case, dtype)
    monkeypatch.setattr(attention, "COMPACT_LIST", False)
    want = backend_fn(case, "triton")(*inputs)
    for desc in (False, True):
        _compact(monkeypatch, desc)
        got = backend_fn(case, "triton")(*inputs)
        for name, g, w in zip(("out", "lse"), got, want):
            assert torch.equal(g, w), f"{name} differs (descriptors {desc})"


def test_compact_buffers(monkeypatch):
    """The copies themselves: row (b, compact head) holds its list's key and value rows and bias
    values, zeros at the padding, WC rows per list."""
    case = Case(**{**BASE, "mask": "b_hkv_1", "window": 150}, causal=True)
    q, k, v, bias, mask = _inputs(case, torch.float32)
    got = {}
    real = attention._compact_lists

    def spy(a, bn):
        r = real(a, bn)
        got.update(r, idx=a.sel.idx.clone(), bn=bn)
        return r

    monkeypatch.setattr(attention, "COMPACT_LIST", True)
    monkeypatch.setattr(attention, "COMPACT_DESC", False)
    monkeypatch.setattr(attention, "_compact_lists", spy)
    backend_fn(case, "triton")(q, k, v, bias, mask)
    ch, wc, idx = got["CH"], got["WC"], got["idx"]
    assert ch == case.H_kv and wc % got["bn"] == 0 and wc >= idx.shape[-1]
    kc = got["KC"].view(case.B, ch, wc, case.D)
    vc = got["VC"].view(case.B, ch, wc, case.D)
    bc = got["BC"].view(case.B, ch, wc)
    for b in range(case.B):
        for g in range(ch):
            keys = idx[b, g].long()
            real_keys = keys[keys < case.K]
            n = real_keys.numel()
            assert torch.equal(kc[b, g, :n], k[b, real_keys, g]) and torch.equal(vc[b, g, :n], v[b, real_keys, g])
            assert torch.equal(bc[b, g, :n], bias[b, g, 0, real_keys])
            assert not kc[b, g, n:].any() and not vc[b, g, n:].any() and not bc[b, g, n:].any()
    assert not kc[0, 0].any()  # the row with no allowed key is all padding
