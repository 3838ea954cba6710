"""The Triton dq kernel over compact copies of the selected keys (``attention.COMPACT_DQ``, on by
default): all gradients against the float64 reference on the LIST path
(query-broadcast bias and mask, global scope), through contiguous pointer loads and through tensor
descriptors (the interpreter runs both), and bitwise equal to the gathering dq (COMPACT_DQ off),
with dk, dv and dbias untouched."""

from __future__ import annotations

import sys

import pytest
import torch

from cases import (LIST_BASE, LIST_CASES, Case, assert_close_to_reference, backend_fn, list_inputs, reference_fn,
                   run_with_grads, unavailable)
from dmattn.kernels.triton import attention

pytestmark = pytest.mark.skipif(unavailable("triton") is not None, reason=str(unavailable("triton")))

BASE, CASES, _inputs = LIST_BASE, LIST_CASES, list_inputs


def _compact_dq(monkeypatch, desc, on=True):
    """Sets COMPACT_DQ (descriptors forced on or off) and records the compact copies the backward
    builds: (USE_DESC, BLOCK_N) per call of ``_compact_lists`` from ``backward``. The forward's own
    calls (COMPACT_LIST) are not recorded."""
    calls = []
    real = attention._compact_lists

    def spy(a, bn):
        r = real(a, bn)
        if sys._getframe(1).f_code.co_name == "backward":
            calls.append((r["USE_DESC"], bn))
        return r

    monkeypatch.setattr(attention, "COMPACT_DQ", on)
    monkeypatch.setattr(attention, "COMPACT_DESC", desc)
    monkeypatch.setattr(attention, "_compact_lists", spy)
    return calls


def _dq_block_n(case: Case, dtype) -> int:
    return attention.launch_config(case.D, torch.empty(0, dtype=dtype).element_size(), "dq")["BLOCK_N"]


def _check_reference(case, dtype, desc, monkeypatch, expect=None):
    """Every output and gradient against the reference with COMPACT_DQ on (descriptors asked for or
    not); the backward's compact copies must be ``expect`` (default: one, as asked)."""
    calls = _compact_dq(monkeypatch, desc)
    inputs = _inputs(case, dtype)
    got = run_with_grads(backend_fn(case, "triton"), *inputs)
    want_calls = [(desc, _dq_block_n(case, dtype))] if expect is None else expect
    assert calls == want_calls, f"the compact dq did not run as expected: {calls}"
    low = run_with_grads(reference_fn(case, dtype), *inputs)
    truth = run_with_grads(reference_fn(case, torch.float64), *inputs)
    assert_close_to_reference(got, low, truth, dtype, label=f"{case}: ")


@pytest.mark.parametrize("desc", [False, True], ids=["pointers", "descriptors"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_compact_dq_matches_reference(case, desc, monkeypatch):
    _check_reference(case, torch.float32, desc, monkeypatch)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[11]], ids=str)
def test_compact_dq_float16(case, monkeypatch):
    _check_reference(case, torch.float16, True, monkeypatch)


def test_compact_dq_padded_head_dim(monkeypatch):
    """D = 40 pads to 64: descriptors need the block to span the row, so the dq takes the pointer
    loads (masked along D) even when descriptors are asked for."""
    case = Case(**{**BASE, "D": 40, "mask": "b_hkv_1"}, causal=True)
    _check_reference(case, torch.float32, True, monkeypatch, expect=[(False, _dq_block_n(case, torch.float32))])


def test_per_query_bias_takes_no_compact_dq(monkeypatch):
    """A per-query bias (the one case with dS per element, WRITE_DS) never selects the LIST path,
    so the backward builds no compact copies for it (and asserts so if it ever did)."""
    case = Case(**{**BASE, "Q": 70, "K": 90, "window": 40, "bias": "b_h_q"}, causal=True)
    _check_reference(case, torch.float32, False, monkeypatch, expect=[])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[11], CASES[13]], ids=str)
def test_compact_dq_is_bitwise_equal_to_gathering(case, dtype, monkeypatch):
    """Same values (the copies are exact, in the input and bias dtypes), same tiles and the same
    arithmetic in the same order, so every output and gradient agrees to the bit with COMPACT_DQ
    off. Positions past a tested tile's limit differ (zeros from masked gathers against real rows
    or padding of the copy) but their scores are -inf and P and dS exactly 0 either way."""
    inputs = _inputs(case, dtype)
    calls = _compact_dq(monkeypatch, None, on=False)
    want = run_with_grads(backend_fn(case, "triton"), *inputs)
    assert calls == []
    for desc in (False, True):
        calls = _compact_dq(monkeypatch, desc)
        got = run_with_grads(backend_fn(case, "triton"), *inputs)
        assert calls == [(desc, _dq_block_n(case, dtype))]
        for name, g, w in zip(("out", "lse", "dq", "dk", "dv", "dbias"), got, want):
            assert (g is None) == (w is None), name
            assert g is None or torch.equal(g, w), f"{name} differs (descriptors {desc})"
