"""deterministic=True: forward and every gradient bitwise identical from run to run."""

from __future__ import annotations

import pytest
import torch

from cases import Case, backend_fn, backend_params, device_for, first_dtype, make_inputs, refused, run_with_grads


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", [
    Case(B=2, Q=130, K=130, H=4, H_kv=1, window=20, causal=True),
    Case(B=2, Q=130, K=130, H=4, H_kv=1, window=20, scope="global", causal=True),
    Case(B=1, Q=70, K=200, bias="1_1_1", mask="b_h_q", window=33, scope="global", causal=True),
    Case(B=2, Q=64, K=64, bias="b_h_q", softcap=5.0),
], ids=str)
def test_bitwise_reproducible(backend, case):
    inputs = make_inputs(case, first_dtype(backend), device_for(backend))
    # A backend that cannot promise determinism, or lacks a feature of the case, must decline it.
    if refused(backend, case, inputs, deterministic=True):
        return
    fn = backend_fn(case, backend, deterministic=True)
    first = run_with_grads(fn, *inputs)
    for _ in range(2):
        again = run_with_grads(fn, *inputs)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
