"""The executable form of SPEC.md: plain PyTorch, materialising, slow, obviously right.

Every backend is tested against this module. It computes in the dtype of its inputs, so call it
with float64 tensors for ground truth, and with low-precision tensors to measure what plain
PyTorch loses at that precision (the tolerance rule of the tests).

Nothing here is optimised, and nothing here may be copied into a backend: the point of this file
is that a reader can check it against SPEC.md line by line.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["expand_heads", "visible_mask", "topk_indices", "attention", "attention_backward"]


def expand_heads(t: torch.Tensor, B: int, H: int, Q: int, K: int) -> torch.Tensor:
    """Broadcast a (B|1, H|H_kv|1, Q|1, K) bias or mask to (B, H, Q, K).

    A tensor with H_kv heads serves query head h from head h // (H // H_kv); with H or 1 heads the
    same formula ``h * heads // H`` picks head h or head 0.
    """
    heads = t.shape[1]
    src = torch.arange(H, device=t.device) * heads // H
    return t.index_select(1, src).expand(B, H, Q, K)


def _causal(Q: int, K: int, device) -> torch.Tensor:
    """(Q, K) bool: key j is causal-visible to query i iff j <= i + (K - Q) (bottom-right)."""
    i = torch.arange(Q, device=device).unsqueeze(1)
    j = torch.arange(K, device=device).unsqueeze(0)
    return j <= i + (K - Q)


def _rank(bias: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Position of each key when a row's candidates are ordered by bias descending, then index
    ascending; non-candidates come after every candidate."""
    # Stable sorts keep the earlier key first among equal values, which is the SPEC tie rule.
    by_value = torch.sort(bias, dim=-1, descending=True, stable=True).indices
    cand_first = torch.sort(candidate.gather(-1, by_value).to(torch.uint8), dim=-1,
                            descending=True, stable=True).indices
    order = by_value.gather(-1, cand_first)
    positions = torch.arange(bias.shape[-1], device=bias.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def visible_mask(bias: Optional[torch.Tensor], mask: Optional[torch.Tensor], *, B: int, H: int,
                 Q: int, K: int, window: Optional[int] = None, topk_scope: str = "visible",
                 is_causal: bool = False, device=None) -> torch.Tensor:
    """The SPEC's ``visible(i, j)`` for every (batch, query head, query, key): bool (B, H, Q, K),
    on ``device`` (default: the bias's or mask's device, else the CPU)."""
    if device is None:
        given = bias if bias is not None else mask
        device = given.device if given is not None else torch.device("cpu")
    allowed = (expand_heads(mask, B, H, Q, K) if mask is not None
               else torch.ones(B, H, Q, K, dtype=torch.bool, device=device))
    causal = _causal(Q, K, device)
    if window is None:
        return allowed & causal if is_causal else allowed
    if bias is None:
        raise ValueError("window requires bias")
    candidate = allowed & causal if (is_causal and topk_scope == "visible") else allowed
    # float64 holds every float16/bfloat16/float32 value exactly, so the order is the given dtype's.
    values = expand_heads(bias, B, H, Q, K).to(torch.float64)
    selected = candidate & (_rank(values, candidate) < window)
    return selected & causal if is_causal else selected


def topk_indices(bias: torch.Tensor, window: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Global-scope selection per broadcast row: ascending key indices, int64,
    (B_s, H_s, Q_s, min(window, K)), padded with -1 where a row has fewer candidates."""
    shapes = [bias.shape] + ([mask.shape] if mask is not None else [])
    Bs, Hs, Qs = (max(s[d] for s in shapes) for d in range(3))
    K = bias.shape[-1]
    values = expand_heads(bias, Bs, Hs, Qs, K).to(torch.float64)
    candidate = (expand_heads(mask, Bs, Hs, Qs, K) if mask is not None
                 else torch.ones(Bs, Hs, Qs, K, dtype=torch.bool, device=bias.device))
    selected = candidate & (_rank(values, candidate) < window)
    keys = torch.arange(K, device=bias.device).expand_as(selected)
    # Unselected keys sort after every real index, then become -1.
    ordered = torch.sort(torch.where(selected, keys, K), dim=-1).values[..., :min(window, K)]
    return torch.where(ordered == K, -1, ordered)


def _softmax(q, k, bias, mask, *, window, topk_scope, is_causal, scale, softcap):
    """Scores through the softmax: ``(probs (B,H,Q,K), lse (B,H,Q), tanh of the capped scores or
    None, k and scale as used)``. Invisible entries and empty rows have probability 0."""
    B, Q, H, D = q.shape
    K, H_kv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    k_h = k.repeat_interleave(H // H_kv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k_h) * scale
    capped = None
    if softcap:
        capped = torch.tanh(s / softcap)
        s = softcap * capped
    if bias is not None:
        s = s + expand_heads(bias, B, H, Q, K).to(s.dtype)
    visible = visible_mask(bias, mask, B=B, H=H, Q=Q, K=K, window=window,
                           topk_scope=topk_scope, is_causal=is_causal, device=q.device)
    s = s.masked_fill(~visible, float("-inf"))
    # The row max only shifts the exponent; it cancels mathematically, so it carries no gradient.
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    lse = (torch.log(l) + m).squeeze(-1)
    probs = p / torch.where(l == 0, torch.ones_like(l), l)
    return probs, lse, capped, k_h, scale


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
              mask: Optional[torch.Tensor] = None, *, window: Optional[int] = None,
              topk_scope: str = "visible", is_causal: bool = False, scale: Optional[float] = None,
              softcap: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC.md's op: returns ``(out (B, Q, H, D), lse (B, H, Q))`` in q's dtype.

    Differentiable through torch autograd (the selection itself is a hard, gradient-free gate).
    Rows with no visible key, or whose visible scores are all -inf, give out 0 and lse -inf.
    """
    probs, lse, _, _, _ = _softmax(q, k, bias, mask, window=window, topk_scope=topk_scope,
                                   is_causal=is_causal, scale=scale, softcap=softcap)
    v_h = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v_h), lse


def reduce_to(grad: torch.Tensor, shape) -> torch.Tensor:
    """Sums a (B, H, Q, K) gradient back to a (B|1, H|H_kv|1, Q|1, K) broadcast shape."""
    B, H, Q, K = grad.shape
    Bb, Hb, Qb, _ = shape
    grad = grad.reshape(B, Hb, H // Hb, Q, K).sum(2)  # query head h came from head h // (H // Hb)
    if Qb == 1:
        grad = grad.sum(2, keepdim=True)
    if Bb == 1:
        grad = grad.sum(0, keepdim=True)
    return grad


def attention_backward(q, k, v, bias, mask, dout, *, window=None, topk_scope="visible", is_causal=False,
                       scale=None, softcap=None):
    """The gradients ``(dq, dk, dv, dbias)`` of ``attention``'s out for the cotangent ``dout``,
    written out (dS = P * (dP - rowsum(P * dP))), in the inputs' dtype; dbias None without bias.

    ``attention`` is differentiable by autograd already; this form exists for callers that cannot
    record autograd (inside a custom op's kernel), and the tests hold it to autograd's answer.
    """
    B, Q, H, D = q.shape
    K, H_kv = k.shape[1], k.shape[2]
    group = H // H_kv
    probs, _, capped, k_h, scale = _softmax(q, k, bias, mask, window=window, topk_scope=topk_scope,
                                            is_causal=is_causal, scale=scale, softcap=softcap)
    v_h = v.repeat_interleave(group, dim=2)

    dp = torch.einsum("bqhd,bkhd->bhqk", dout.to(q.dtype), v_h)
    ds = probs * (dp - (probs * dp).sum(dim=-1, keepdim=True))
    draw = ds * (1 - capped.square()) if capped is not None else ds
    dq = torch.einsum("bhqk,bkhd->bqhd", draw, k_h) * scale
    dk = (torch.einsum("bhqk,bqhd->bkhd", draw, q) * scale).reshape(B, K, H_kv, group, D).sum(3)
    dv = torch.einsum("bhqk,bqhd->bkhd", probs, dout.to(q.dtype)).reshape(B, K, H_kv, group, D).sum(3)
    dbias = None if bias is None else reduce_to(ds, bias.shape).to(bias.dtype)
    return dq, dk, dv, dbias
