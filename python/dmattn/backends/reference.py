"""The reference as an explicit backend (``backend="reference"``): float64, materialising, slow.

Auto-selection never picks it; it exists so the reference can run through the public API (the
custom ops, autograd, torch.compile) and serve ``topk_mask``/``topk_indices`` on any device.
"""

from __future__ import annotations

import torch

from .. import reference
from .base import ALL_FEATURES, Backend


def _ref_args(problem):
    return dict(window=problem.window, topk_scope=problem.topk_scope, is_causal=problem.is_causal,
                scale=problem.scale, softcap=problem.softcap)


def _f64(t):
    return None if t is None else t.to(torch.float64)


class ReferenceBackend(Backend):
    name = "reference"
    device_types = frozenset({"cpu", "cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    head_dims = range(1, 257)
    deterministic = True
    features = ALL_FEATURES
    auto_devices = frozenset()

    def forward(self, problem, q, k, v, bias, mask):
        with torch.no_grad():
            out, lse = reference.attention(_f64(q), _f64(k), _f64(v), _f64(bias), mask, **_ref_args(problem))
        # The op's contract (and its fake implementation) is contiguous outputs.
        return out.to(q.dtype).contiguous(), lse.to(torch.float32).contiguous()

    def backward(self, problem, dout, q, k, v, bias, mask, out, lse, needs):
        grads = reference.attention_backward(_f64(q), _f64(k), _f64(v), _f64(bias), mask, _f64(dout),
                                             **_ref_args(problem))
        return tuple(g.to(t.dtype).contiguous() if n and t is not None else None
                     for g, t, n in zip(grads, (q, k, v, bias), needs))

    def visible_mask(self, problem, bias, mask):
        return reference.visible_mask(bias, mask, B=problem.B, H=problem.H, Q=problem.Q, K=problem.K,
                                      window=problem.window, topk_scope=problem.topk_scope,
                                      is_causal=problem.is_causal)

    def topk_indices(self, bias, mask, window):
        return reference.topk_indices(bias, window, mask)
