"""The C++ CPU backend (module ``dmattn._C``): tiled online softmax, OpenMP, driven by the compact
selection metadata of the torch-free core, deterministic by construction."""

from __future__ import annotations

import importlib

import torch

from .base import ALL_FEATURES, Backend, dlpack, forward_outputs, gradient_outputs, new_output

try:
    _C = importlib.import_module("dmattn._C")
    _LOAD_ERROR = None
except ImportError as exc:  # keep the text: `python -m dmattn` and dispatch errors show it
    _C = None
    _LOAD_ERROR = f"dmattn._C did not import ({exc})"


def _kernel_args(problem):
    return dict(scale=problem.scale, softcap=problem.softcap or 0.0, is_causal=problem.is_causal,
                window=problem.effective_window or 0, scope_global=problem.topk_scope == "global",
                num_threads=torch.get_num_threads())


class CpuBackend(Backend):
    name = "cpu"
    device_types = frozenset({"cpu"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    head_dims = range(1, 257)
    deterministic = True
    features = ALL_FEATURES

    def load_error(self):
        return _LOAD_ERROR

    def forward(self, problem, q, k, v, bias, mask):
        out, lse = forward_outputs(problem, q)
        _C.fwd(*dlpack(q, k, v, bias, mask, out, lse), **_kernel_args(problem))
        return out, lse

    def backward(self, problem, dout, q, k, v, bias, mask, out, lse, needs):
        grads = gradient_outputs((q, k, v, bias), needs)
        _C.bwd(*dlpack(q, k, v, bias, mask, out, dout, lse, *grads),
               deterministic=problem.deterministic, **_kernel_args(problem))
        return tuple(grads)

    def visible_mask(self, problem, bias, mask):
        p = problem
        out = new_output((p.B, p.H, p.Q, p.K), torch.bool, bias.device)
        args = _kernel_args(p)
        _C.visible_mask(*dlpack(bias, mask, out), B=p.B, H=p.H, Hkv=p.H_kv, Q=p.Q, K=p.K,
                        is_causal=p.is_causal, window=args["window"], scope_global=args["scope_global"],
                        num_threads=args["num_threads"])
        return out

    def topk_indices(self, bias, mask, window):
        shapes = [bias.shape] + ([mask.shape] if mask is not None else [])
        rows = tuple(max(s[d] for s in shapes) for d in range(3))
        out = new_output(rows + (min(window, bias.shape[-1]),), torch.int64, bias.device)
        _C.topk_indices(*dlpack(bias, mask, out), window=window, num_threads=torch.get_num_threads())
        return out
