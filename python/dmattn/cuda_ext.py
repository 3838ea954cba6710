"""The compiled CUDA module ``dmattn._cuda``, when it was built and imports: build information, an
exact one-thread-per-row ``topk_indices`` on CUDA tensors (compiled from the selection header shared
with the CPU core; ``dmattn.topk_indices`` itself goes through the backend registry), and the CuTe
attention forward (``forward``), tested directly until the CUDA backend has a backward."""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from .backends.base import new_output, plain

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


def has_forward() -> bool:
    """Whether the module carries the attention forward (older builds do not)."""
    return _cuda is not None and hasattr(_cuda, "fwd")


def fwd_block_m(head_dim: int) -> int:
    """Query rows per thread block of the CUDA forward: the block size of its LIST counts."""
    return _cuda.fwd_block_m(head_dim)


def _kernel_rows(t: torch.Tensor) -> torch.Tensor:
    """q/k/v/out as the kernel reads them: contiguous head dim, 16-byte aligned data and strides
    (a copy otherwise; an aligned contiguous tensor is not copied)."""
    nbytes = t.element_size()
    ok = (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
          and all(t.stride(d) * nbytes % 16 == 0 for d in range(3) if t.shape[d] > 1))
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def list_selection(bias: torch.Tensor, mask: Optional[torch.Tensor], *, window: int, Q: int, head_dim: int,
                   is_causal: bool, rows: Optional[tuple] = None):
    """LIST metadata for ``forward``: ``(idx, counts)`` int32, built by the Triton backend's
    selection (plain torch) with this kernel's query block size, or None when the call does not take
    the LIST path (window >= K, a per-query bias/mask). Global scope; the mask is folded into idx,
    so ``forward`` needs no mask with it."""
    from .kernels.triton.selection import LIST, block_counts, make_selection

    K = bias.shape[-1]
    sel = make_selection(*plain(bias, mask), window=window, K=K, Q=Q, scope="global", is_causal=is_causal,
                         rows=rows)
    if sel.path != LIST:
        return None
    return sel.idx, block_counts(sel.idx, Q, K, fwd_block_m(head_dim), is_causal)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
            mask: Optional[torch.Tensor] = None, *, scale: Optional[float] = None, softcap: Optional[float] = None,
            is_causal: bool = False, idx: Optional[torch.Tensor] = None, counts: Optional[torch.Tensor] = None,
            out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None):
    """The CuTe forward: ``(out (B, Q, H, D) in q's dtype, lse (B, H, Q) float32)``.

    q (B, Q, H, D), k/v (B, K, H_kv, D) float16/bfloat16 on one GPU (sm_80+); bias and mask
    (B|1, H|H_kv|1, Q|1, K), bias of any float dtype. Keys: DENSE (every key up to the causal limit,
    bias/mask tested per element) unless ``idx``/``counts`` from ``list_selection`` give the LIST
    path. ``out``/``lse`` may be passed in (contiguous) to be filled. Arguments are checked by the
    binding (ValueError/TypeError naming them) before any launch.
    """
    B, Q, H, D = q.shape
    if out is None:
        out = new_output((B, Q, H, D), q.dtype, q.device)
    if lse is None:
        lse = new_output((B, H, Q), torch.float32, q.device)
    q, k, v, bias, mask, idx, counts = plain(q, k, v, bias, mask, idx, counts)
    q, k, v = (_kernel_rows(t) for t in (q, k, v))
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        _cuda.fwd(q, k, v, bias, mask, out, lse, idx, counts, scale=float(D ** -0.5 if scale is None else scale),
                  softcap=float(softcap or 0.0), causal=bool(is_causal), stream=stream)
    return out, lse
