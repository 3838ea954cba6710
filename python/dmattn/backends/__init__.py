"""The backend registry, in dispatch priority order (fastest first).

Adding a backend: write its module here and add one line to ``_REGISTRY``; dispatch, ``explain``,
``python -m dmattn`` and the parametrised test matrix pick it up from this list.
"""

from __future__ import annotations

from .base import Backend
from .cpu import CpuBackend
from .cuda import CudaBackend
from .reference import ReferenceBackend
from .triton import TritonBackend

_REGISTRY: tuple[Backend, ...] = (
    TritonBackend(),
    CudaBackend(),
    CpuBackend(),
    ReferenceBackend(),
)

BACKENDS: dict[str, Backend] = {b.name: b for b in _REGISTRY}

__all__ = ["Backend", "BACKENDS"]
