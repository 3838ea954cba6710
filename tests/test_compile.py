"""torch.compile(fullgraph=True) traces through the custom ops, and opcheck passes on both ops."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import dmattn
from cases import Case, backend_params, call_options, device_for, first_dtype, make_inputs, refused

# One case per key-visiting family: a visible-scope causal window (per-query thresholds or prefix
# lists) and a global-scope one (sorted key lists), so a backend that implements only one of them
# is still traced and op-checked on the other.
CASES = [Case(B=1, Q=19, K=23, H=4, H_kv=2, D=16, window=6, causal=True, softcap=4.0),
         Case(B=1, Q=19, K=23, H=4, H_kv=2, D=32, window=6, scope="global", causal=True, softcap=4.0)]


def _inputs(case, backend, with_mask=False):
    """The case's q, k, v, bias in the backend's first dtype, and a key mask or None."""
    q, k, v, bias, _ = make_inputs(case, first_dtype(backend), device_for(backend))
    mask = (torch.arange(case.K) % 3 != 0).view(1, 1, 1, -1).to(q.device) if with_mask else None
    return q, k, v, bias, mask


@pytest.mark.parametrize("backend", backend_params(include_reference=True))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_compile_fullgraph_matches_eager(backend, case):
    q, k, v, bias, _ = _inputs(case, backend)
    if refused(backend, case, (q, k, v, bias, None)):
        return
    torch._dynamo.reset()

    def step(q, k, v, bias):
        return dmattn.dma_attention(q, k, v, bias, backend=backend, **call_options(case)).square().sum()

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    eager = step(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    leaves_c = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    compiled = torch.compile(step, fullgraph=True)(*leaves_c)
    compiled_grads = torch.autograd.grad(compiled, leaves_c)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


def _op_options(case, backend):
    return (case.D ** -0.5, case.softcap, case.causal, case.window, case.scope == "global", False, backend)


@pytest.mark.parametrize("backend", backend_params(include_reference=True))
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_opcheck_forward(backend, with_mask, case):
    q, k, v, bias, mask = _inputs(case, backend, with_mask)
    # The op runs the named backend without dispatch: a call the backend declines must not get there.
    if refused(backend, case, (q, k, v, bias, mask)):
        return
    args = tuple(t.requires_grad_(True) for t in (q, k, v, bias)) + (mask,) + _op_options(case, backend)
    opcheck(torch.ops.dmattn.fwd.default, args)


@pytest.mark.parametrize("backend", backend_params(include_reference=True))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_opcheck_backward(backend, case):
    q, k, v, bias, mask = _inputs(case, backend, with_mask=True)
    if refused(backend, case, (q, k, v, bias, mask)):
        return
    options = _op_options(case, backend)
    out, lse = torch.ops.dmattn.fwd(q, k, v, bias, mask, *options)
    dout = torch.randn_like(out)
    for needs in ([True, True, True, True], [False, False, False, True]):
        opcheck(torch.ops.dmattn.bwd.default, (dout, q, k, v, bias, mask, out, lse, *options, needs))
