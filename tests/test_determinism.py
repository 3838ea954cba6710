"""deterministic=True: forward and every gradient bitwise identical from run to run."""

from __future__ import annotations

import pytest
import torch

from cases import Case, backend_fn, backend_params, device_for, make_inputs, run_with_grads
from dmattn.backends import BACKENDS


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", [
    Case(B=2, Q=130, K=130, H=4, H_kv=1, window=20, causal=True),
    Case(B=1, Q=70, K=200, bias="1_1_1", mask="b_h_q", window=33, scope="global", causal=True),
    Case(B=2, Q=64, K=64, bias="b_h_q", softcap=5.0),
], ids=str)
def test_bitwise_reproducible(backend, case):
    if not BACKENDS[backend].deterministic:
        pytest.skip(f"backend {backend} does not declare deterministic support")
    fn = backend_fn(case, backend, deterministic=True)
    inputs = make_inputs(case, torch.float32, device_for(backend))
    first = run_with_grads(fn, *inputs)
    for _ in range(2):
        again = run_with_grads(fn, *inputs)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
