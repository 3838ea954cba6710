"""The public functions. Each validates its arguments once (``make_problem``), picks a backend
(``dispatch.select``) and calls the custom op or the backend's selection routine."""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import dispatch, ops
from .problem import make_problem

__all__ = ["dma_attention", "topk_mask", "topk_indices", "explain"]


def dma_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    *,
    window: Optional[int] = None,
    topk_scope: str = "visible",
    is_causal: bool = False,
    scale: Optional[float] = None,
    softcap: Optional[float] = None,
    deterministic: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Dynamic Mask Attention: each query attends to the ``window`` keys with the highest bias.

    Args:
        query: (B, Q, H, D) float16, bfloat16, float32 (or float64 on CPU/reference).
        key, value: (B, K, H_kv, D), query's dtype and device; H % H_kv == 0 (GQA/MQA: query head h
            reads kv head h // (H // H_kv)).
        bias: optional floating tensor (B|1, H|H_kv|1, Q|1, K) added to the scores (after scaling
            and softcap) and used to rank keys for the window. Trainable: it receives a gradient of
            its own shape. The common case is (B, H_kv, 1, K).
        mask: optional bool tensor with the same broadcast rules; True means "may attend".
        window: keep only the top-``window`` keys per query, ranked by bias value descending, ties
            to the earlier key. Requires ``bias``. None keeps every allowed key.
        topk_scope: "visible": each query ranks only the keys it can see (causality applied
            before ranking, as in the DMA paper's model); "global": keys are ranked once per bias
            row and causality is applied after (flash-dmattn 1.x kernels).
        is_causal: bottom-right aligned causal mask: key j is visible to query i iff j <= i + K - Q.
        scale: score scale, default 1/sqrt(D).
        softcap: if set (> 0), scores become softcap * tanh(scale * q.k / softcap) before the bias.
        deterministic: bitwise reproducible forward and gradients (backends that cannot promise
            it are not chosen).
        return_lse: also return the log-sum-exp (B, H, Q) float32 (natural log; -inf for rows
            with no visible key). It carries no gradient.
        backend: "auto" (or the ``DMATTN_BACKEND`` environment variable), or a backend name from
            ``dmattn.backends()``: "cpu", "reference", ...

    Returns:
        out (B, Q, H, D) in query's dtype, or ``(out, lse)`` with ``return_lse=True``. Rows with no
        visible key give zeros (never NaN) and contribute nothing to any gradient.

    Raises:
        TypeError / ValueError before any kernel runs, naming the argument and what was expected;
        ValueError listing every backend's reasons when no backend can run the call.
    """
    problem = make_problem(query, key, value, bias, mask, window=window, topk_scope=topk_scope,
                           is_causal=is_causal, scale=scale, softcap=softcap, deterministic=deterministic)
    chosen = dispatch.select(problem, backend)
    out, lse = ops.attention_op(query, key, value, bias, mask, problem, chosen.name)
    return (out, lse) if return_lse else out


def explain(query, key, value, bias=None, mask=None, **options) -> dispatch.Explanation:
    """Which backend ``dma_attention`` would pick for these arguments, and why each other backend
    would not. Takes exactly ``dma_attention``'s arguments; ``print()`` the result for a table."""
    backend = options.pop("backend", "auto")
    options.pop("return_lse", None)
    problem = make_problem(query, key, value, bias, mask, **options)
    return dispatch.explain_problem(problem, backend)


def _selection_shape(bias, mask, query_len):
    """(B_s, H_s, Q, K) of a selection helper from bias/mask shapes, validated. ``query_len``: an
    int, None (the broadcast query size, possibly 1) or "self" (that size, or K when it is 1)."""
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor, got {type(bias).__name__}")
    if bias.dim() != 4:
        raise ValueError(f"bias must be 4-D (B, H, Q|1, K), got shape {tuple(bias.shape)}")
    K = bias.shape[-1]
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError("mask must be a bool tensor or None")
        if mask.dim() != 4 or mask.shape[-1] != K:
            raise ValueError(f"mask must be 4-D with K={K} keys like bias, got shape {tuple(mask.shape)}")
        if mask.device != bias.device:
            raise ValueError(f"mask is on {mask.device} but bias is on {bias.device}")
    shapes = [tuple(bias.shape)] + ([tuple(mask.shape)] if mask is not None else [])
    sizes = []
    for dim, what in enumerate(("batch", "head", "query")):
        big = max(s[dim] for s in shapes)
        if any(s[dim] not in (1, big) and not (dim == 1 and big % s[dim] == 0) for s in shapes):
            raise ValueError(f"bias and mask dimension {dim} ({what}) sizes {shapes[0][dim]} and "
                             f"{shapes[1][dim]} do not broadcast (each must be 1 or the larger size"
                             + (", or divide it" if dim == 1 else "") + ")")
        sizes.append(big)
    if query_len == "self":
        sizes[2] = sizes[2] if sizes[2] > 1 else K
    elif query_len is not None:
        if isinstance(query_len, bool) or not isinstance(query_len, int) or query_len < 1:
            raise ValueError(f"query_len must be an int >= 1 or None, got {query_len!r}")
        if sizes[2] not in (1, query_len):
            raise ValueError(f"query_len={query_len} does not match the bias/mask query dimension {sizes[2]}")
        sizes[2] = query_len
    return sizes[0], sizes[1], sizes[2], K


def topk_mask(bias: torch.Tensor, window: int, mask: Optional[torch.Tensor] = None, *,
              is_causal: bool = False, topk_scope: str = "visible", query_len: Optional[int] = None,
              backend: str = "auto") -> torch.Tensor:
    """The dense bool ``visible`` mask that ``dma_attention`` uses, for debugging and interop.

    Args:
        bias: (B, H, Q|1, K) floating; ranks keys (descending, ties to the earlier key).
        window: keys kept per query (>= 1).
        mask: optional bool (B|1, H|1, Q|1, K); True means "may attend".
        is_causal, topk_scope: as in ``dma_attention``.
        query_len: Q when bias and mask are shared by every query (their Q dim is 1); default K.

    Returns:
        bool (B_s, H_s, Q, K) where B_s, H_s are the broadcast batch and head sizes of bias and mask.
        Head h of this mask is query head h when bias has H heads, kv head h when it has H_kv.
    """
    problem = _selection_problem(bias, mask, "self" if query_len is None else query_len, window=window, topk_scope=topk_scope,
                                 is_causal=is_causal)
    return _selector(problem, backend).visible_mask(problem, bias, mask)


def topk_indices(bias: torch.Tensor, window: int, mask: Optional[torch.Tensor] = None, *,
                 backend: str = "auto") -> torch.Tensor:
    """Global-scope selection per broadcast row: the kept key indices, sorted ascending.

    Args:
        bias: (B, H, Q|1, K) floating; ranks keys (descending, ties to the earlier key).
        window: keys kept per row (>= 1).
        mask: optional bool, broadcastable with bias; True means "may attend".

    Returns:
        int64 (B_s, H_s, Q_s, min(window, K)) over the broadcast rows of bias and mask, padded
        with -1 where a row has fewer allowed keys than ``window``.
    """
    problem = _selection_problem(bias, mask, None, window=window, topk_scope="global", is_causal=False)
    return _selector(problem, backend).topk_indices(bias, mask, window)


def _selection_problem(bias, mask, query_len, **options):
    """A Problem describing a selection-only call: sizes from bias/mask, no real q/k/v."""
    B, H, Q, K = _selection_shape(bias, mask, query_len)
    heads = [t.shape[1] for t in (bias, mask) if t is not None and t.shape[1] > 1]
    H_kv = min(heads, default=H)
    # Zero-stride stand-ins carry the sizes through the one validation path without allocating.
    scalar = bias.new_zeros((), dtype=torch.float32)
    q, k = scalar.expand(B, Q, H, 1), scalar.expand(B, K, H_kv, 1)
    return make_problem(q, k, k, bias, mask, **options)


def _selector(problem, backend):
    """Selection helpers may fall back to the reference: they are for debugging and interop."""
    if backend != "auto":
        return dispatch.select(problem, backend)
    try:
        return dispatch.select(problem, "auto")
    except ValueError:
        return dispatch.select(problem, "reference")

