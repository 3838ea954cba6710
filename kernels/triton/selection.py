"""Selection metadata for the Triton kernels: which keys each query may see, in compact form.

Torch ops and Triton kernels (``topk.py``, ``prefix.py``), device-agnostic, so the same code serves
CUDA tensors and CPU tensors under the Triton interpreter. Four paths (SPEC.md "Which keys query i
sees"):

- DENSE: no window, or a window that keeps every key. No metadata: the kernels visit keys
  0 .. causal limit and test the mask per element.
- LIST: bias and mask shared by every query (their Q dim is 1), and global scope or no causality.
  The selection is one set per selection row (b_s, h_s); it is stored as the selected key indices
  sorted ascending, int32 (B_s, H_s, W), padded with the sentinel K, by the radix select of
  ``topk.py`` (``selected_lists`` below for float64 and as the reference). Kernels gather those keys;
  causality only cuts a prefix of each list, counted per query block by ``topk.list_counts``
  (``block_counts`` is the same rule in torch, for tests and the CUDA select's checks). No Q x K
  tensor is formed.
- PREFIX: bias and mask shared by every query, visible scope with causality. One int32 per key,
  ``death`` (B_s, H_s, K): key j is visible to query i iff ``j <= i + K - Q < death_j``; built in
  O(K log K) by ``prefix.py``, which also makes the per-query-block alive lists the kernels gather.
- THRESHOLD: every other windowed call (a bias or mask that varies per query).
  Query i of row (b_s, h_s) keeps key j iff j is a candidate and (bias_ij, -j) >= (tv_i, -ti_i),
  where (tv_i, ti_i) is the value and index of its w-th best candidate; a row with at most w
  candidates gets (-inf, INT32_MAX), which passes every key including -inf biases. v1 computes the
  thresholds with O(Q*K) torch work in chunks of query rows (bounded temporary memory).

Exact tie rule without relying on torch.topk's order among equal values: every value becomes an
order-preserving int64 key (through float64, which holds every float16/bfloat16/float32/float64
value exactly, with -0.0 folded onto +0.0 because they compare equal). topk only supplies the w-th
largest key *value*, which is unambiguous; among the keys equal to it the earliest ones are taken by
a cumulative count, so ties go to the earlier key whatever order topk returns them in.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ...problem import ranks_prefixes  # the package this directory ships in
from . import topk
from .prefix import _order_keys, death_positions

DENSE, LIST, THRESHOLD, PREFIX = 0, 1, 2, 3
INT32_MAX = 2**31 - 1
_INT64_MIN = -(2**63)
# Bound on the elements of one chunk of threshold rows; each element costs ~20 bytes of temporaries.
_CHUNK_ELEMENTS = 1 << 24


@dataclasses.dataclass(frozen=True)
class Selection:
    """Metadata of one call. Selection row of (batch b, query head h): ``row_of(b, h)``.

    ``idx`` (B_s, H_s, W) int32 for LIST; ``tv`` (B_s, H_s, Q) in ``compare_dtype(bias)`` and
    ``ti`` (B_s, H_s, Q) int32 for THRESHOLD; ``death`` (B_s, H_s, K) int32 for PREFIX; all
    contiguous.
    """

    path: int
    B_s: int = 1
    H_s: int = 1
    idx: Optional[torch.Tensor] = None
    tv: Optional[torch.Tensor] = None
    ti: Optional[torch.Tensor] = None
    death: Optional[torch.Tensor] = None


def compare_dtype(bias_dtype: torch.dtype) -> torch.dtype:
    """float32 holds every float16/bfloat16/float32 value exactly, so kernels compare in it."""
    return torch.float64 if bias_dtype == torch.float64 else torch.float32


def choose_path(window: Optional[int], K: int, query_broadcast: bool, prefixes: bool) -> int:
    """The path of a call; ``prefixes``: whether queries rank their own causal prefixes
    (``problem.ranks_prefixes``)."""
    if window is None or window >= K:
        return DENSE
    if query_broadcast:
        return PREFIX if prefixes else LIST
    return THRESHOLD


def selection_rows(bias: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> tuple[int, int]:
    """(B_s, H_s): the broadcast batch and head sizes of bias and mask."""
    if mask is None or bias is None:
        s = (bias if mask is None else mask).shape
        return s[0], s[1]
    return max(bias.shape[0], mask.shape[0]), max(bias.shape[1], mask.shape[1])


def _rows(t: torch.Tensor, B_s: int, H_s: int, q0: int, q1: int) -> torch.Tensor:
    """Query rows q0..q1 of a (B|1, heads, Q|1, K) bias or mask as (B_s, H_s, q1 - q0 or 1, K):
    a view, or a chunk-sized copy when heads are repeated (selection head h_s reads head
    h_s * heads // H_s, as the kernels do). A query-broadcast tensor keeps its Q dim of 1."""
    if t.shape[2] > 1:
        t = t[:, :, q0:q1]
    heads = t.shape[1]
    if heads != H_s:
        t = t.index_select(1, torch.arange(H_s, device=t.device) * heads // H_s)
    return t.expand(B_s, H_s, t.shape[2], t.shape[3])


def _thresholds(values: torch.Tensor, candidate: Optional[torch.Tensor], window: int):
    """Per row of (..., K) values: the w-th best candidate as (value in compare dtype, index
    int32), or (-inf, INT32_MAX) when the row has fewer than w candidates. Requires w <= K."""
    keys = _order_keys(values)
    if candidate is not None:
        keys = torch.where(candidate, keys, _INT64_MIN)
        values = values.expand(keys.shape)
    # The w-th largest key is the minimum of the top w; unsorted top-k skips sorting those w.
    kth = keys.topk(window, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    needed = window - (keys > kth).sum(-1, keepdim=True)
    # Position of the needed-th key equal to kth: the number of positions before it.
    ti = ((keys == kth).cumsum(-1) < needed).sum(-1, keepdim=True)
    pass_all = kth == _INT64_MIN
    tv = values.gather(-1, ti.clamp(max=values.shape[-1] - 1)).to(compare_dtype(values.dtype))
    tv = torch.where(pass_all, float("-inf"), tv).squeeze(-1)
    ti = torch.where(pass_all, INT32_MAX, ti).squeeze(-1).to(torch.int32)
    return tv, ti


def _passes(values, tv, ti) -> torch.Tensor:
    """The kernels' test: (value, -j) >= (tv, -ti), in the compare dtype; broadcasts rows."""
    v = values.to(tv.dtype)
    j = torch.arange(values.shape[-1], device=values.device)
    return (v > tv.unsqueeze(-1)) | ((v == tv.unsqueeze(-1)) & (j <= ti.unsqueeze(-1)))


def _causal(q0: int, q1: int, K: int, off: int, device) -> torch.Tensor:
    i = torch.arange(q0, q1, device=device).unsqueeze(1)
    return torch.arange(K, device=device) <= i + off


def selected_lists(bias: torch.Tensor, mask: Optional[torch.Tensor], window: int, rows=None) -> torch.Tensor:
    """Selected key indices per row of (B_s, H_s, Q_s) (default: the broadcast rows of bias and
    mask), ascending, int32, (B_s, H_s, Q_s, min(window, K)), padded with K."""
    K = bias.shape[-1]
    B_s, H_s = rows if rows is not None else selection_rows(bias, mask)
    Q_s = max(t.shape[2] for t in (bias, mask) if t is not None)
    values = _rows(bias, B_s, H_s, 0, Q_s)
    allowed = None if mask is None else _rows(mask, B_s, H_s, 0, Q_s)
    keep = allowed if allowed is not None else torch.ones((), dtype=torch.bool, device=bias.device)
    if window < K:
        keep = keep & _passes(values, *_thresholds(values, allowed, window))
    keep = keep.expand(B_s, H_s, Q_s, K)
    # Compaction without a sort: a kept key's slot is the number of kept keys before it; the
    # dropped keys all write the sentinel into one spare slot that is cut off afterwards.
    W = min(window, K)
    slot = torch.where(keep, keep.cumsum(-1, dtype=torch.int32) - 1, W).to(torch.int64)
    j = torch.arange(K, device=bias.device, dtype=torch.int32).expand(B_s, H_s, Q_s, K)
    out = torch.full((B_s, H_s, Q_s, W + 1), K, dtype=torch.int32, device=bias.device)
    return out.scatter_(-1, slot, torch.where(keep, j, K))[..., :W].contiguous()


def broadcast_lists(bias: torch.Tensor, mask: Optional[torch.Tensor], window: int, B_s: int, H_s: int):
    """The LIST selection of a query-broadcast bias and mask: int32 (B_s, H_s, min(window, K)),
    ascending, padded with K. The Triton radix select (topk.py) computes exactly what
    ``selected_lists`` does; float64 biases take the torch ops.

    The compiled CUDA select (kernels/cuda/select.h) gives the same lists in less GPU time, but
    routed through here it did not lower the end-to-end time of short calls on the H200 (T8k and
    D128k, host-bound: 0.45-0.52 ms against 0.30-0.56 ms for this path, within the host's noise),
    so the Triton backend keeps its own select and needs no compiled module."""
    if topk.supported(bias):
        return topk.select_lists(bias, mask, window, B_s, H_s)
    return selected_lists(bias, mask, window, (B_s, H_s)).squeeze(2)


def thresholds(bias: torch.Tensor, mask: Optional[torch.Tensor], window: int, B_s: int, H_s: int, Q: int,
               causal_candidates: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (b_s, h_s, query i): (tv, ti) of the THRESHOLD path. Candidates are the allowed keys,
    and with ``causal_candidates`` (visible scope, causal) only those with j <= i + K - Q."""
    K = bias.shape[-1]
    tv = torch.empty(B_s, H_s, Q, dtype=compare_dtype(bias.dtype), device=bias.device)
    ti = torch.empty(B_s, H_s, Q, dtype=torch.int32, device=bias.device)
    chunk = max(1, _CHUNK_ELEMENTS // (B_s * H_s * K))
    for q0 in range(0, Q, chunk):
        q1 = min(Q, q0 + chunk)
        values = _rows(bias, B_s, H_s, q0, q1).expand(B_s, H_s, q1 - q0, K)
        cand = None if mask is None else _rows(mask, B_s, H_s, q0, q1)
        if causal_candidates:
            causal = _causal(q0, q1, K, K - Q, bias.device)
            cand = causal if cand is None else cand & causal
        tv[:, :, q0:q1], ti[:, :, q0:q1] = _thresholds(values, cand, window)
    return tv, ti


def make_selection(bias, mask, *, window: Optional[int], K: int, Q: int, scope: str, is_causal: bool,
                   rows: Optional[tuple[int, int]] = None) -> Selection:
    """The metadata of one attention call (``rows`` overrides the selection rows (B_s, H_s))."""
    query_broadcast = (bias is None or bias.shape[2] == 1) and (mask is None or mask.shape[2] == 1)
    path = choose_path(window, K, query_broadcast, ranks_prefixes(scope, is_causal, Q))
    if path == DENSE:
        return Selection(DENSE)
    B_s, H_s = rows if rows is not None else selection_rows(bias, mask)
    if path == LIST:
        return Selection(LIST, B_s, H_s, idx=broadcast_lists(bias, mask, window, B_s, H_s))
    if path == PREFIX:
        values = _rows(bias, B_s, H_s, 0, 1).reshape(B_s * H_s, K)
        allowed = None if mask is None else _rows(mask, B_s, H_s, 0, 1).reshape(B_s * H_s, K)
        death = death_positions(values, allowed, window).view(B_s, H_s, K)
        return Selection(PREFIX, B_s, H_s, death=death)
    tv, ti = thresholds(bias, mask, window, B_s, H_s, Q,
                        causal_candidates=is_causal and scope == "visible")
    return Selection(THRESHOLD, B_s, H_s, tv=tv, ti=ti)


def block_counts(idx: torch.Tensor, Q: int, K: int, block_m: int, is_causal: bool) -> torch.Tensor:
    """Per (b_s, h_s, query block): how many list entries the block can see at all, i.e. entries
    <= the causal limit of the block's last query (the list is sorted, so they form a prefix).
    int32 (B_s, H_s, cdiv(Q, block_m)); sentinels (K) are never counted."""
    n_blocks = -(-Q // block_m)
    last = torch.clamp(torch.arange(1, n_blocks + 1, device=idx.device) * block_m, max=Q) - 1
    limit = torch.clamp(last + (K - Q), min=-1, max=K - 1) if is_causal else torch.full_like(last, K - 1)
    rows = idx.reshape(-1, idx.shape[-1])
    limits = limit.to(torch.int32).expand(rows.shape[0], n_blocks).contiguous()
    counts = torch.searchsorted(rows, limits, right=True, out_int32=True)
    return counts.reshape(*idx.shape[:-1], n_blocks)


def visible_mask(bias, mask, *, B: int, H: int, Q: int, K: int, window: Optional[int], scope: str,
                 is_causal: bool) -> torch.Tensor:
    """Dense bool (B, H, Q, K) ``visible`` built from the metadata (for ``topk_mask`` and tests);
    B and H are the selection rows here."""
    device = (bias if bias is not None else mask).device
    sel = make_selection(bias, mask, window=window, K=K, Q=Q, scope=scope, is_causal=is_causal, rows=(B, H))
    causal = _causal(0, Q, K, K - Q, device) if is_causal else torch.ones((), dtype=torch.bool, device=device)
    if sel.path == LIST:
        hit = torch.zeros(B, H, K + 1, dtype=torch.bool, device=device)
        hit.scatter_(-1, sel.idx.long(), True)
        return (hit[..., :K].unsqueeze(2) & causal).expand(B, H, Q, K).contiguous()
    if sel.path == PREFIX:
        limit = torch.arange(Q, device=device) + (K - Q)
        return (causal & (sel.death.unsqueeze(2) > limit.view(Q, 1))).expand(B, H, Q, K).contiguous()
    allowed = _rows(mask, B, H, 0, Q) if mask is not None else torch.ones((), dtype=torch.bool, device=device)
    out = allowed & causal
    if sel.path == THRESHOLD:
        out = out & _passes(_rows(bias, B, H, 0, Q), sel.tv, sel.ti)
    return out.expand(B, H, Q, K).contiguous()
