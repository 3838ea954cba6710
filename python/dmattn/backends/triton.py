"""The Triton backend (``dmattn.kernels.triton``): CUDA tensors, and CPU tensors under the Triton
interpreter (``TRITON_INTERPRET=1``) for testing only, never picked by auto-selection there.

Exact for every feature; fast on the LIST path (query-broadcast bias and mask, global scope or no
causality). The THRESHOLD path (visible scope with causality, or a per-query bias/mask) computes
its per-query thresholds with O(Q*K) torch work and runs the kernels over every causal key tile.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .base import ALL_FEATURES, Backend, forward_outputs, gradient_outputs, plain

try:
    from ..kernels.triton import attention as _attention
    from ..kernels.triton import selection as _selection
    _LOAD_ERROR = None
except ImportError as exc:  # keep the text: `python -m dmattn` and dispatch errors show it
    _attention = _selection = None
    _LOAD_ERROR = f"triton kernels did not import ({exc})"

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(Backend):
    name = "triton"
    device_types = frozenset({"cuda", "cpu"} if _INTERPRETED else {"cuda"})
    auto_devices = frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})
    # Any D up to 256: padded to a power of two >= 16 inside the kernels, the tail masked.
    head_dims = range(1, 257)
    # No atomics anywhere (see attention.py), so every run is bitwise identical.
    deterministic = True
    features = ALL_FEATURES

    def load_error(self):
        return _LOAD_ERROR

    def extra_reasons(self, problem):
        longest = max(problem.Q, problem.K)
        if _attention is not None and longest > _attention.MAX_SEQ_LEN:
            return [f"sequence length {longest} exceeds {_attention.MAX_SEQ_LEN} (CUDA grid limit of its tiling)"]
        return []

    def forward(self, problem, q, k, v, bias, mask):
        out, lse = forward_outputs(problem, q)
        with _device_of(q):
            _attention.forward(problem, *plain(q, k, v, bias, mask), out, lse)
        return out, lse

    def backward(self, problem, dout, q, k, v, bias, mask, out, lse, needs):
        grads = gradient_outputs((q, k, v, bias), needs)
        with _device_of(q):
            _attention.backward(problem, *plain(dout, q, k, v, bias, mask, out, lse), *grads)
        return tuple(grads)

    def select(self, problem, bias, mask):
        p = problem
        with _device_of(bias if bias is not None else mask):
            return _selection.make_selection(*plain(bias, mask), window=p.effective_window, K=p.K, Q=p.Q,
                                             scope=p.topk_scope, is_causal=p.is_causal)

    def visible_mask(self, problem, bias, mask):
        p = problem
        return _selection.visible_mask(*plain(bias, mask), B=p.B, H=p.H, Q=p.Q, K=p.K, window=p.window,
                                       scope=p.topk_scope, is_causal=p.is_causal)

    def topk_indices(self, bias, mask, window):
        bias, mask = plain(bias, mask)
        if all(t is None or t.shape[2] == 1 for t in (bias, mask)):
            idx = _selection.broadcast_lists(bias, mask, window, *_selection.selection_rows(bias, mask))
            idx = idx.unsqueeze(2).long()
        else:
            idx = _selection.selected_lists(bias, mask, window).long()
        return idx.masked_fill_(idx == bias.shape[-1], -1)


_SAME_DEVICE = contextlib.nullcontext()


def _device_of(t):
    """Triton launches on the current CUDA device: make it the tensors' device. Entering
    ``torch.cuda.device`` costs a few microseconds per call; when the device is already current
    there is nothing to switch."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _SAME_DEVICE
