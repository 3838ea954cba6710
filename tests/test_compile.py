"""torch.compile(fullgraph=True) traces through the custom ops, and opcheck passes on both ops."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import dmattn
from cases import Case, backend_params, device_for, make_inputs

CASE = Case(B=1, Q=19, K=23, H=4, H_kv=2, D=16, window=6, causal=True, softcap=4.0)


def _options(backend):
    return dict(window=CASE.window, is_causal=CASE.causal, softcap=CASE.softcap, backend=backend)


@pytest.mark.parametrize("backend", backend_params(include_reference=True))
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    q, k, v, bias, mask = make_inputs(CASE, torch.float32, device_for(backend))

    def step(q, k, v, bias):
        return dmattn.dma_attention(q, k, v, bias, **_options(backend)).square().sum()

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    eager = step(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    leaves_c = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    compiled = torch.compile(step, fullgraph=True)(*leaves_c)
    compiled_grads = torch.autograd.grad(compiled, leaves_c)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


def _op_args(backend, with_mask):
    q, k, v, bias, _ = make_inputs(CASE, torch.float32, device_for(backend))
    mask = (torch.arange(CASE.K) % 3 != 0).view(1, 1, 1, -1).to(q.device) if with_mask else None
    return q, k, v, bias, mask, CASE.D ** -0.5, CASE.softcap, CASE.causal, CASE.window, False, False, backend


@pytest.mark.parametrize("backend", backend_params(include_reference=True))
@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck_forward(backend, with_mask):
    q, k, v, bias, *rest = _op_args(backend, with_mask)
    args = tuple(t.requires_grad_(True) for t in (q, k, v, bias)) + tuple(rest)
    opcheck(torch.ops.dmattn.fwd.default, args)


@pytest.mark.parametrize("backend", backend_params(include_reference=True))
def test_opcheck_backward(backend):
    q, k, v, bias, mask, *options = _op_args(backend, with_mask=True)
    out, lse = torch.ops.dmattn.fwd(q, k, v, bias, mask, *options)
    dout = torch.randn_like(out)
    for needs in ([True, True, True, True], [False, False, False, True]):
        opcheck(torch.ops.dmattn.bwd.default, (dout, q, k, v, bias, mask, out, lse, *options, needs))
