"""The dk/dv kernel's q and dO tiles through tensor descriptors (``attention._row_descriptors``,
TMA on sm_90): every output and gradient bitwise equal to the pointer loads' on the LIST, PREFIX,
contiguous and TILES paths, the descriptors really taken, and refused for an expanded dO (stride 0).
They are off by default (``attention.DKDV_DESC``: slower on the H200); these tests turn them on.
Triton kernels: CPU tensors under the interpreter, CUDA tensors when present."""

from __future__ import annotations

import pytest
import torch

from cases import SELECTION_DEVICES, Case, backend_fn, make_inputs, run_with_grads
from dmattn.kernels.triton import attention

CASES = [
    Case(B=2, Q=70, K=90, H=4, H_kv=2, D=32, window=24, scope="global", causal=True),  # LIST, Q < K
    Case(B=1, Q=100, K=100, H=4, H_kv=1, D=16, window=30, causal=True, softcap=3.0),  # PREFIX
    Case(B=2, Q=65, K=65, H=4, H_kv=2, D=32, causal=True),  # no window: contiguous key tiles
    Case(B=1, Q=64, K=64, H=2, H_kv=2, D=32, bias="b_h_q", mask="1_1_q", window=9, causal=True),  # TILES
]


def _record(monkeypatch) -> list:
    """Patches ``_row_descriptors`` to note whether each backward took the descriptors."""
    taken = []
    real = attention._row_descriptors

    def recording(*args):
        out = real(*args)
        taken.append(out["Q_DESC"])
        return out

    monkeypatch.setattr(attention, "_row_descriptors", recording)
    return taken


@pytest.mark.parametrize("device", SELECTION_DEVICES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_dkdv_descriptors_match_pointer_loads(case, device, monkeypatch):
    inputs = make_inputs(case, torch.float32, device)
    fn = backend_fn(case, "triton")
    taken = _record(monkeypatch)
    monkeypatch.setattr(attention, "DKDV_DESC", True)  # off by default (slower on the H200)
    monkeypatch.setattr(attention, "COMPACT_DESC", False)
    pointers = run_with_grads(fn, *inputs)
    monkeypatch.setattr(attention, "COMPACT_DESC", True)
    descriptors = run_with_grads(fn, *inputs)
    assert taken == [False, True]
    for a, b in zip(pointers, descriptors):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("device", SELECTION_DEVICES)
def test_expanded_dout_keeps_pointer_loads(device, monkeypatch):
    case = CASES[0]
    q, k, v, bias, mask = make_inputs(case, torch.float32, device)
    taken = _record(monkeypatch)
    monkeypatch.setattr(attention, "DKDV_DESC", True)
    monkeypatch.setattr(attention, "COMPACT_DESC", True)
    grads = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, bias)]
        out, _ = backend_fn(case, "triton")(*leaves, mask)
        if not grads:
            out.sum().backward()  # dO = ones expanded: every stride 0
        else:
            out.backward(torch.ones_like(out))  # the same values, contiguous
        grads.append([t.grad for t in leaves])
    assert taken == [False, True]
    for a, b in zip(*grads):
        assert torch.equal(a, b)
