"""One normalisation and validation step for every entry point: the ``Problem`` record.

Every user argument is checked here, before any backend or kernel sees it, and turned into a
small immutable record that backends read (they never re-parse user arguments). Bias and mask stay
as the caller's tensors; their broadcast dimensions are described by sizes here and by stride 0 in
the kernels, never materialised.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

__all__ = ["Problem", "make_problem", "SUPPORTED_DTYPES", "MAX_HEAD_DIM", "SCOPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256
SCOPES = ("visible", "global")


@dataclasses.dataclass(frozen=True)
class Problem:
    """What one call computes, independent of the tensors' contents.

    Sizes follow SPEC.md: query (B, Q, H, D), key/value (B, K, H_kv, D); bias and mask
    (B|1, H|H_kv|1, Q|1, K), recorded as ``bias_shape``/``mask_shape`` (None when absent).

    ``layout`` is "padded" (every sequence of the batch has length Q and K). Packed variable-length
    batches and decoding against a paged KV cache will be further layouts with their own fields
    (cumulative lengths, cache lengths); backends declare which layouts they support, so adding one
    changes neither this record's existing fields nor ``dma_attention``'s signature.
    """

    B: int
    Q: int
    K: int
    H: int
    H_kv: int
    D: int
    dtype: torch.dtype
    device: torch.device
    bias_shape: Optional[tuple[int, int, int, int]]
    bias_dtype: Optional[torch.dtype]
    mask_shape: Optional[tuple[int, int, int, int]]
    window: Optional[int]
    topk_scope: str
    is_causal: bool
    scale: float
    softcap: Optional[float]
    deterministic: bool
    layout: str = "padded"

    @property
    def effective_window(self) -> Optional[int]:
        """The window that changes anything: None when absent or when it keeps every key."""
        return self.window if self.window is not None and self.window < self.K else None

    @property
    def ranks_prefixes(self) -> bool:
        """Whether each query ranks its own causal prefix of keys (``ranks_prefixes``)."""
        return ranks_prefixes(self.topk_scope, self.is_causal, self.Q)

    @property
    def query_broadcast(self) -> bool:
        """True when bias and mask are shared by all queries (their Q dimension is 1)."""
        return all(s is None or s[2] == 1 for s in (self.bias_shape, self.mask_shape))

    @property
    def features(self) -> frozenset[str]:
        """The optional features this call uses; backends declare the ones they support."""
        f = set()
        if self.bias_shape is not None:
            f.add("bias")
        if self.mask_shape is not None:
            f.add("mask")
        if self.softcap is not None:
            f.add("softcap")
        if self.effective_window is not None:
            f.add(f"window_{self.topk_scope}")
            if not self.query_broadcast:
                f.add("window_per_query")
        if self.is_causal:
            f.add("causal")
        return frozenset(f)


def ranks_prefixes(topk_scope: str, is_causal: bool, Q: int) -> bool:
    """Whether each query ranks only its own causal prefix of keys, so the selection differs
    between queries even for a query-broadcast bias: the visible scope with causality and more than
    one query. A single query's causal limit is K - 1 (every key), so it selects exactly what the
    global scope selects."""
    return topk_scope == "visible" and is_causal and Q > 1


def _check_qkv(query, key, value):
    """Validates query, key and value; returns (B, Q, H, D, K, H_kv). The common case passes one
    chain of comparisons; anything it does not accept goes through ``_explain_qkv``, which raises
    the error that names the argument (or returns the same sizes)."""
    if isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor):
        q_shape, k_shape = query.shape, key.shape
        if len(q_shape) == 4 and len(k_shape) == 4 and value.shape == k_shape:
            B, Q, H, D = q_shape
            Bk, K, H_kv, Dk = k_shape
            dtype, device = query.dtype, query.device
            if (dtype in SUPPORTED_DTYPES and key.dtype == dtype and value.dtype == dtype
                    and key.device == device and value.device == device and Bk == B and Dk == D
                    and B >= 1 and Q >= 1 and H >= 1 and K >= 1 and H_kv >= 1 and 1 <= D <= MAX_HEAD_DIM
                    and H % H_kv == 0):
                return B, Q, H, D, K, H_kv
    return _explain_qkv(query, key, value)


def _explain_qkv(query, key, value):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D ({'B, Q, H, D' if name == 'query' else 'B, K, H_kv, D'}),"
                             f" got shape {tuple(t.shape)}")
    if query.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"query must be float16, bfloat16, float32 or float64, got {query.dtype}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name} must have query's dtype {query.dtype}, got {t.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}; all tensors must "
                             "be on one device")
    B, Q, H, D = query.shape
    if key.shape != value.shape:
        raise ValueError(f"key and value must have the same shape (B, K, H_kv, D), got {tuple(key.shape)} "
                         f"and {tuple(value.shape)}")
    Bk, K, H_kv, Dk = key.shape
    if Bk != B:
        raise ValueError(f"key batch size must equal query's {B}, got {Bk}")
    if Dk != D:
        raise ValueError(f"key/value head dim must equal query's {D}, got {Dk}")
    if min(B, Q, H, D, K, H_kv) < 1:
        raise ValueError(f"every size must be >= 1, got query {tuple(query.shape)}, key {tuple(key.shape)}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim D must be at most {MAX_HEAD_DIM}, got {D}")
    if H % H_kv != 0:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads H_kv={H_kv}")
    return B, Q, H, D, K, H_kv


def _check_broadcast(name: str, t, B: int, H: int, H_kv: int, Q: int, K: int, device, is_mask: bool):
    """Validates a bias or mask against (B|1, H|H_kv|1, Q|1, K); returns its 4-D shape. The common
    case passes one chain of comparisons; ``_explain_broadcast`` raises the error otherwise."""
    if isinstance(t, torch.Tensor):
        shape = t.shape
        if len(shape) == 4:
            b, h, q, k = shape
            dtype = t.dtype
            if ((dtype == torch.bool if is_mask else dtype in SUPPORTED_DTYPES) and t.device == device
                    and (b == B or b == 1) and (h == H or h == H_kv or h == 1) and (q == Q or q == 1) and k == K):
                return b, h, q, k
    return _explain_broadcast(name, t, B, H, H_kv, Q, K, device, is_mask)


def _explain_broadcast(name: str, t, B: int, H: int, H_kv: int, Q: int, K: int, device, is_mask: bool):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if is_mask and t.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = may attend), got {t.dtype}")
    if not is_mask and not t.dtype.is_floating_point:
        raise TypeError(f"bias must be a floating-point tensor, got {t.dtype}")
    if not is_mask and t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"bias must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but query is on {device}; all tensors must be on one device")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B|1, H|H_kv|1, Q|1, K), got shape {tuple(t.shape)}")
    accepted = (("batch", (B, 1)), ("head", tuple(dict.fromkeys((H, H_kv, 1)))), ("query", (Q, 1)),
                ("key", (K,)))
    for dim, (size, (what, ok)) in enumerate(zip(t.shape, accepted)):
        if size not in ok:
            raise ValueError(f"{name} dimension {dim} ({what}) has size {size}; accepted sizes: "
                             f"{' or '.join(map(str, ok))} (shape {tuple(t.shape)})")
    return tuple(t.shape)


def _check_options(window, topk_scope, is_causal, scale, softcap, deterministic, has_bias):
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"window must be an int or None, got {type(window).__name__}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not has_bias:
            raise ValueError("window requires bias: the top-w keys are chosen by bias value")
    if topk_scope not in SCOPES:
        raise ValueError(f"topk_scope must be one of {SCOPES}, got {topk_scope!r}")
    for name, flag in (("is_causal", is_causal), ("deterministic", deterministic)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    for name, x in (("scale", scale), ("softcap", softcap)):
        if x is None:
            continue
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TypeError(f"{name} must be a float or None, got {type(x).__name__}")
        if not math.isfinite(x):
            raise ValueError(f"{name} must be finite, got {x}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0 (or None for no softcap), got {softcap}")


def make_problem(query, key, value, bias=None, mask=None, *, window=None, topk_scope="visible",
                 is_causal=False, scale=None, softcap=None, deterministic=False) -> Problem:
    """Validates ``dma_attention``'s arguments (SPEC.md "Errors") and returns the Problem."""
    B, Q, H, D, K, H_kv = _check_qkv(query, key, value)
    bias_shape = None if bias is None else _check_broadcast("bias", bias, B, H, H_kv, Q, K,
                                                            query.device, is_mask=False)
    mask_shape = None if mask is None else _check_broadcast("mask", mask, B, H, H_kv, Q, K,
                                                            query.device, is_mask=True)
    _check_options(window, topk_scope, is_causal, scale, softcap, deterministic, bias is not None)
    return Problem(
        B=B, Q=Q, K=K, H=H, H_kv=H_kv, D=D, dtype=query.dtype, device=query.device,
        bias_shape=bias_shape, bias_dtype=None if bias is None else bias.dtype, mask_shape=mask_shape,
        window=window, topk_scope=topk_scope, is_causal=is_causal,
        scale=float(D ** -0.5 if scale is None else scale),
        softcap=None if softcap is None else float(softcap), deterministic=deterministic)
