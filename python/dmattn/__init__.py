"""dmattn: trainable Dynamic Mask Attention (top-k sparse attention with a learned bias).

``dma_attention`` is the op (SPEC.md); ``topk_mask`` and ``topk_indices`` expose its key selection;
``explain`` says which backend a call would use and why; ``python -m dmattn`` reports what is
built and available here.
"""

from . import ops as _ops  # noqa: F401  (registers the dmattn:: custom ops)
from .api import dma_attention, explain, topk_indices, topk_mask
from .backends import BACKENDS as _BACKENDS

__version__ = "0.1.0"


def backends() -> list[str]:
    """Registered backend names in dispatch priority order."""
    return list(_BACKENDS)


__all__ = ["dma_attention", "topk_mask", "topk_indices", "explain", "backends", "__version__"]
