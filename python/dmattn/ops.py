"""The op as torch.library custom ops: ``dmattn::fwd`` and ``dmattn::bwd``, with fake (meta)
implementations and registered autograd, so torch.compile(fullgraph=True) traces through them.

The ops take plain tensors and scalars (custom-op schemas cannot carry a Problem); the Problem is
rebuilt from them without re-validation, because ``api.py`` validated the same values before the
call. The backend is chosen in ``api.py`` too, and passed by name, so nothing on the traced path
reads the environment or probes devices.
"""

from __future__ import annotations

import torch

from .backends import BACKENDS
from .problem import Problem

_OPTIONS = ("float scale, float softcap, bool is_causal, int window, bool scope_global, "
            "bool deterministic, str backend")

_lib = torch.library.Library("dmattn", "DEF")
_lib.define(f"fwd(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? mask, {_OPTIONS}) -> (Tensor, Tensor)")
_lib.define(f"bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? mask, Tensor out, "
            f"Tensor lse, {_OPTIONS}, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor)")


def problem_of(q, k, v, bias, mask, scale, softcap, is_causal, window, scope_global, deterministic) -> Problem:
    """The Problem of already-validated op arguments (window 0 and softcap 0 mean absent)."""
    B, Q, H, D = q.shape
    return Problem(B=B, Q=Q, K=k.shape[1], H=H, H_kv=k.shape[2], D=D, dtype=q.dtype, device=q.device,
                   bias_shape=None if bias is None else tuple(bias.shape),
                   bias_dtype=None if bias is None else bias.dtype,
                   mask_shape=None if mask is None else tuple(mask.shape),
                   window=window or None, topk_scope="global" if scope_global else "visible",
                   is_causal=is_causal, scale=scale, softcap=softcap or None, deterministic=deterministic)


def _fwd(q, k, v, bias, mask, scale, softcap, is_causal, window, scope_global, deterministic, backend):
    p = problem_of(q, k, v, bias, mask, scale, softcap, is_causal, window, scope_global, deterministic)
    return BACKENDS[backend].forward(p, q, k, v, bias, mask)


def _fwd_fake(q, k, v, bias, mask, scale, softcap, is_causal, window, scope_global, deterministic, backend):
    B, Q, H, D = q.shape
    return q.new_empty((B, Q, H, D)), q.new_empty((B, H, Q), dtype=torch.float32)


def _bwd(dout, q, k, v, bias, mask, out, lse, scale, softcap, is_causal, window, scope_global,
         deterministic, backend, needs):
    p = problem_of(q, k, v, bias, mask, scale, softcap, is_causal, window, scope_global, deterministic)
    grads = BACKENDS[backend].backward(p, dout, q, k, v, bias, mask, out, lse, tuple(needs))
    # Schemas cannot return optional tensors: a gradient nobody asked for is an empty tensor.
    return tuple(g if g is not None else q.new_empty(0) for g in grads)


def _bwd_fake(dout, q, k, v, bias, mask, out, lse, scale, softcap, is_causal, window, scope_global,
              deterministic, backend, needs):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if n and t is not None
                 else q.new_empty(0) for t, n in zip((q, k, v, bias), needs))


_lib.impl("fwd", _fwd, "CompositeExplicitAutograd")
_lib.impl("bwd", _bwd, "CompositeExplicitAutograd")
torch.library.register_fake("dmattn::fwd", _fwd_fake, lib=_lib)
torch.library.register_fake("dmattn::bwd", _bwd_fake, lib=_lib)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, *options = inputs
    out, lse = output
    ctx.options = options
    ctx.save_for_backward(q, k, v, bias, mask, out, lse)
    # lse is a by-product for callers that combine partial attentions; it carries no gradient.
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, bias, mask, out, lse = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:4]]
    if dout is None or not any(needs):
        return (None,) * (5 + len(ctx.options))
    dq, dk, dv, dbias = torch.ops.dmattn.bwd(dout, q, k, v, bias, mask, out, lse, *ctx.options, needs)
    grads = tuple(g if n else None for g, n in zip((dq, dk, dv, dbias), needs))
    return grads + (None,) * (1 + len(ctx.options))


torch.library.register_autograd("dmattn::fwd", _backward, setup_context=_setup_context, lib=_lib)


_fwd_op = torch.ops.dmattn.fwd.default
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _runs_directly(q, k, v, bias, mask) -> bool:
    """Whether an eager call may skip ``dmattn::fwd`` and run the backend's forward itself: what the
    op would do then (no autograd node: grad off or no input requires it) minus its host cost, ~20
    us of boxing and autograd wrapping per call, most of a decode step's host time. Everything that
    must see the op gets it: torch.compile and jit tracing, functorch transforms, torch function and
    dispatch modes (FakeTensorMode, make_fx, FlopCounterMode, ``with torch.device(...)``), tensor
    subclasses, and the profiler (its traces name dmattn::fwd)."""
    C = torch._C
    return not (torch.compiler.is_compiling()
                or (C.is_grad_enabled() and C._any_requires_grad(q, k, v, bias, mask))
                or C._are_functorch_transforms_active()
                or C._is_torch_function_mode_enabled()
                or C._len_torch_dispatch_stack()
                or C._get_tracing_state() is not None
                or C._autograd._profiler_enabled()
                or type(q) not in _PLAIN_TYPES or type(k) not in _PLAIN_TYPES or type(v) not in _PLAIN_TYPES
                or (bias is not None and type(bias) not in _PLAIN_TYPES)
                or (mask is not None and type(mask) not in _PLAIN_TYPES))


def attention_op(q, k, v, bias, mask, problem: Problem, backend: str):
    """Calls ``dmattn::fwd`` for a validated Problem, or the backend's forward directly when nothing
    can tell the difference (``_runs_directly``); returns ``(out, lse)``."""
    if _runs_directly(q, k, v, bias, mask):
        return BACKENDS[backend].forward(problem, q, k, v, bias, mask)
    return _fwd_op(q, k, v, bias, mask, problem.scale, problem.softcap or 0.0, problem.is_causal,
                   problem.window or 0, problem.topk_scope == "global", problem.deterministic, backend)
