"""Randomised shapes and options: every backend against the reference (hypothesis, derandomised)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cases import (FORMS, Case, assert_close_to_reference, backend_fn, backend_params, device_for,
                   first_dtype, make_inputs, reference_fn, refused, run_with_grads)

MASK_FORMS = [None] + list(FORMS)


@st.composite
def cases(draw):
    H_kv = draw(st.sampled_from([1, 2, 3]))
    return Case(
        B=draw(st.integers(1, 2)), Q=draw(st.integers(1, 90)), K=draw(st.integers(1, 90)),
        H=H_kv * draw(st.sampled_from([1, 2, 4])), H_kv=H_kv, D=draw(st.sampled_from([1, 3, 16, 32, 33, 64])),
        bias=draw(st.sampled_from(list(FORMS))), mask=draw(st.sampled_from(MASK_FORMS)),
        window=draw(st.one_of(st.none(), st.integers(1, 100))), scope=draw(st.sampled_from(["visible", "global"])),
        causal=draw(st.booleans()), softcap=draw(st.sampled_from([None, 3.0])), ties=draw(st.booleans()))


@pytest.mark.parametrize("backend", backend_params())
@given(case=cases(), seed=st.integers(0, 2**16))
def test_random_shapes(backend, case, seed):
    dtype = first_dtype(backend)
    inputs = make_inputs(case, dtype, device_for(backend), seed=seed)
    if refused(backend, case, inputs):
        return
    got = run_with_grads(backend_fn(case, backend), *inputs)
    low = run_with_grads(reference_fn(case, dtype), *inputs)
    truth = run_with_grads(reference_fn(case, torch.float64), *inputs)
    assert_close_to_reference(got, low, truth, dtype, label=f"[{backend} {case} {dtype}] ")
