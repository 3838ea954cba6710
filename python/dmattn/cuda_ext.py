"""The compiled CUDA module ``dmattn._cuda``, when it was built and imports: build information and
an exact one-thread-per-row ``topk_indices`` on CUDA tensors, compiled from the selection header
shared with the CPU core (the building block of the CUDA backend's selection; ``dmattn.topk_indices``
itself goes through the backend registry)."""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from .backends.base import new_output

try:
    _cuda = importlib.import_module("dmattn._cuda")
    LOAD_ERROR: Optional[str] = None
except ImportError as exc:  # kept for `python -m dmattn`
    _cuda = None
    LOAD_ERROR = f"dmattn._cuda did not import ({exc})"

# One heap entry of the selection workspace: a (double value, int64 index) key.
_KEY_BYTES = 16


def available() -> bool:
    return _cuda is not None


def info() -> dict:
    return _cuda.info()


def topk_indices(bias: torch.Tensor, mask: Optional[torch.Tensor], window: int, rows: tuple) -> torch.Tensor:
    """Global-scope selection on the GPU (one thread per row, the shared C++ selection header)."""
    n_rows = rows[0] * rows[1] * rows[2]
    out = new_output(tuple(rows) + (min(window, bias.shape[-1]),), torch.int64, bias.device)
    workspace = torch.empty(n_rows * window * _KEY_BYTES, dtype=torch.uint8, device=bias.device)
    stream = torch.cuda.current_stream(bias.device).cuda_stream
    _cuda.topk_indices(bias.detach(), None if mask is None else mask.detach(), out, workspace,
                       window=window, stream=stream)
    return out
