"""The compiled CUDA module ``dmattn._cuda``, when it was built and imports: build information, an
exact one-thread-per-row ``topk_indices`` on CUDA tensors (compiled from the selection header shared
with the CPU core; ``dmattn.topk_indices`` itself goes through the backend registry), the radix
select of the LIST metadata (``select_lists``, ``list_selection``, ``list_counts``; same header), the
visible scope's death positions and per-query-block key lists (``visible_death``, ``visible_lists``), and
the CuTe attention forward (``forward``, with its split decode path for few queries, and ``decode``,
that path with its selection in one call) and backward
(``backward``) that the ``cuda`` backend (``backends/cuda.py``) runs, also tested directly. Nothing
here needs Triton."""

from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Optional

import torch

from .backends.base import dlpack, new_output, plain

try:
    _cuda = importlib.import_module("dmattn._cuda")
    LOAD_ERROR: Optional[str] = None
except ImportError as exc:  # kept for `python -m dmattn`
    _cuda = None
    LOAD_ERROR = f"dmattn._cuda did not import ({exc})"

# One heap entry of the selection workspace: a (double value, int64 index) key.
_KEY_BYTES = 16

_SAME_DEVICE = contextlib.nullcontext()
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def on_device(dev: torch.device):
    """``torch.cuda.device(dev)``: the module launches on the current device and checks that it is
    the tensors'. When it already is there is nothing to enter (entering and leaving costs a few
    microseconds of host time per call)."""
    return _SAME_DEVICE if dev.index == torch.cuda.current_device() else torch.cuda.device(dev)


def current_stream(dev: torch.device) -> int:
    """``torch.cuda.current_stream(dev).cuda_stream`` without building a ``torch.cuda.Stream``
    object (the raw query is what Triton's launcher uses too)."""
    if _raw_stream is not None:
        return _raw_stream(dev.index)
    return torch.cuda.current_stream(dev).cuda_stream


def available() -> bool:
    return _cuda is not None


def info() -> dict:
    return _cuda.info()


def topk_indices(bias: torch.Tensor, mask: Optional[torch.Tensor], window: int, rows: tuple) -> torch.Tensor:
    """Global-scope selection on the GPU (one thread per row, the shared C++ selection header)."""
    n_rows = rows[0] * rows[1] * rows[2]
    out = new_output(tuple(rows) + (min(window, bias.shape[-1]),), torch.int64, bias.device)
    workspace = torch.empty(n_rows * window * _KEY_BYTES, dtype=torch.uint8, device=bias.device)
    stream = current_stream(bias.device)
    _cuda.topk_indices(*dlpack(bias, mask, out, workspace), window=window, stream=stream)
    return out


def has_forward() -> bool:
    """Whether the module carries the attention forward (older builds do not)."""
    return _cuda is not None and hasattr(_cuda, "fwd")


def has_sm90_switch() -> bool:
    """Whether the module has the sm_90a forward's switch (older builds do not)."""
    return _cuda is not None and hasattr(_cuda, "set_fwd_sm90_enabled")


def set_sm90_enabled(enabled: bool) -> None:
    """Lets ``forward`` use the sm_90a (wgmma) kernel where it applies (``True``, the default: on
    an H200 its LIST forward takes 1.42 ms at T32k against 3.07 for the sm_80 kernel) or forces the
    sm_80 kernel everywhere (``False``), e.g. for A/B timing. Process-wide."""
    if has_sm90_switch():
        _cuda.set_fwd_sm90_enabled(bool(enabled))


def has_pdl_switch() -> bool:
    """Whether the module has the overlapping-launch switch (older builds do not)."""
    return _cuda is not None and hasattr(_cuda, "set_pdl_enabled")


def set_pdl_enabled(enabled: bool) -> None:
    """Lets the kernels of the select chain, the split forward and its merge start while the kernel
    before them finishes (programmatic dependent launch, compute capability 9.0+; ``True``, the
    default: on an H200 the D128k decode call 29.8 -> 28.4 us per call in a CUDA graph, 40.7 -> 37.5
    us eager with the L2 cleared before each call) or launches each plainly (``False``, for A/B
    timing). Process-wide; the results are the same bits either way."""
    if has_pdl_switch():
        _cuda.set_pdl_enabled(bool(enabled))


def pdl_enabled() -> bool:
    return has_pdl_switch() and bool(_cuda.pdl_enabled())


def has_split_mma_switch() -> bool:
    """Whether the module has the tensor-core split kernel's switch (older builds do not)."""
    return _cuda is not None and hasattr(_cuda, "set_split_mma_enabled")


def set_split_mma_enabled(enabled: bool) -> None:
    """Lets the split (decode) forward run its tensor-core kernel (``True``, the default) where it
    applies: head dim 64 or 128, no softcap, no mask in the kernel (the LIST path folds it into the
    lists) and one bias row per thread block (a query-broadcast bias whose heads cover whole GQA
    groups). ``False`` runs the CUDA-core kernel for every split call, e.g. for A/B timing.
    Process-wide; the two kernels round differently (the tensor-core one rounds the softmax
    weights to the input dtype before the product with V), so results differ in the last bits."""
    if has_split_mma_switch():
        _cuda.set_split_mma_enabled(bool(enabled))


def split_mma_enabled() -> bool:
    return has_split_mma_switch() and bool(_cuda.split_mma_enabled())


def sm90_enabled() -> bool:
    return has_sm90_switch() and bool(_cuda.fwd_sm90_enabled())


def uses_sm90(head_dim: int, per_query: bool = False) -> bool:
    """Whether ``forward`` runs the sm_90a kernel for this head dim on the current device (per_query:
    a bias or mask that differs between query rows, which stays on the sm_80 kernel)."""
    return has_sm90_switch() and bool(_cuda.fwd_uses_sm90(head_dim, per_query))


def compact_bytes(q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                  idx: torch.Tensor) -> int:
    """Workspace bytes of the sm_90a forward's compact copy for a LIST call (``idx`` (B_s, H_s, W)),
    0 where the call does not take that kernel on the current device: on an H100/H200 the listed
    key and value rows are gathered once per call into the kernel's shared-memory tile images
    (B * H_kv * W * D * 4 bytes plus 8 per entry, one copy per query head if the selection is per
    query head), which it loads with bulk copies instead of gathering rows in its inner loop (T32k:
    8 MiB)."""
    if not hasattr(_cuda, "fwd_compact_bytes"):
        return 0
    B, _, H, D = q.shape
    per_query = (bias is not None and bias.shape[2] != 1) or (mask is not None and mask.shape[2] != 1)
    return int(_cuda.fwd_compact_bytes(D, B, H, k.shape[2], idx.shape[1], 1 if bias is None else bias.shape[1],
                                       1 if mask is None else mask.shape[1], idx.shape[-1], per_query))


# The split (decode) forward (kernels/cuda/fwd_split.h) runs for calls with few queries (Q <= 16,
# at most 32 query rows per kv head) unless this is False: process-wide, so that one process can time it against the
# one-block-per-query-block kernel (benchmarks/cuda_decode.py).
SPLIT_DECODE = True


def has_split() -> bool:
    """Whether the module has the split (decode) forward (older builds do not)."""
    return _cuda is not None and hasattr(_cuda, "fwd_split_count")


@functools.lru_cache(maxsize=256)
def _split_count(B: int, Q: int, H: int, H_kv: int, D: int, n_keys: int, device: int) -> int:
    return int(_cuda.fwd_split_count(B, Q, H, H_kv, D, n_keys, device))


def split_count(q: torch.Tensor, k: torch.Tensor, idx: Optional[torch.Tensor] = None) -> int:
    """The splits ``forward`` runs the split (decode) kernel with for these inputs (the list length of
    ``idx``, else K keys): 0 when it runs the one-block-per-query-block kernel instead (more than 16
    queries or 32 query rows per kv head, ``SPLIT_DECODE`` off, or a module without it). The module
    decides (``fwd_split_count``, from the device's SM count and the list length); cached per shape."""
    if not (SPLIT_DECODE and has_split()) or q.dim() != 4 or k.dim() != 4:
        return 0
    B, Q, H, D = q.shape
    n_keys = idx.shape[-1] if idx is not None and idx.dim() == 3 else k.shape[1]
    return _split_count(B, Q, H, k.shape[2], D, n_keys, q.device.index)


def fwd_block_m(head_dim: int) -> int:
    """Query rows per thread block of the CUDA forward: the block size of its LIST counts."""
    return _cuda.fwd_block_m(head_dim)


def _kernel_rows(t: torch.Tensor) -> torch.Tensor:
    """A 4-D q/k/v/out as the kernel reads it: contiguous head dim, 16-byte aligned data and
    strides (a copy otherwise; an aligned contiguous tensor is not copied). Any other rank is
    passed on as it is, for the module to reject with the argument's name."""
    if t.dim() != 4:
        return t
    b, m, h, _ = t.shape
    sb, sm, sh, sd = t.stride()
    nbytes = t.element_size()
    ok = (sd == 1 and t.data_ptr() % 16 == 0 and (b <= 1 or sb * nbytes % 16 == 0)
          and (m <= 1 or sm * nbytes % 16 == 0) and (h <= 1 or sh * nbytes % 16 == 0))
    return t if ok else t.clone(memory_format=torch.contiguous_format)


_BIAS_BITS = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}


@functools.lru_cache(maxsize=256)
def _select_plan(rows: int, K: int, bits: int, device: int, chunk: int) -> tuple[int, int, int]:
    return tuple(_cuda.select_plan(rows, K, bits, device, chunk))


def _selection_rows(bias: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[int, int]:
    """(B_s, H_s): the broadcast batch and head sizes of bias and mask."""
    if mask is None:
        return bias.shape[0], bias.shape[1]
    return max(bias.shape[0], mask.shape[0]), max(bias.shape[1], mask.shape[1])


def select_lists(bias: torch.Tensor, mask: Optional[torch.Tensor], window: int, rows: Optional[tuple] = None, *,
                 Q: int = 1, block_m: Optional[int] = None, is_causal: bool = False, chunk: Optional[int] = None):
    """The CUDA radix select (``kernels/cuda/select.h``): ``(idx, counts)``.

    Args:
        bias: (B_s|1, heads, 1, K) float16/bfloat16/float32/float64 on a GPU, any strides; selection
            head h_s reads bias head h_s * heads // H_s (heads must divide H_s).
        mask: optional bool (B_s|1, heads_m, 1, K), same rules; False keys are never selected.
        window: w >= 1.
        rows: (B_s, H_s), default the broadcast of bias and mask.
        Q, block_m, is_causal: with ``block_m``, also the per-query-block counts of the forward
            (``selection.block_counts`` semantics), else counts is None.
        chunk: keys per thread block (tests and benchmarks force the split plan with it); default
            the plan's choice for this GPU.

    Returns:
        idx int32 (B_s, H_s, min(window, K)): each row's selected keys ascending, padded with K,
        exactly ``kernels/triton/selection.selected_lists``; counts int32 (B_s, H_s, cdiv(Q, block_m))
        or None. No host synchronisation: safe under CUDA graph capture.
    """
    bias, mask = plain(bias, mask)
    B_s, H_s = rows if rows is not None else _selection_rows(bias, mask)
    K = bias.shape[-1]
    dev = bias.device
    bits = _BIAS_BITS.get(bias.dtype)
    if bits is None:
        raise TypeError(f"bias must be float16, bfloat16, float32 or float64, got {bias.dtype}")
    chunk, _, nbytes = _select_plan(B_s * H_s, K, bits, dev.index, int(chunk or 0))
    idx = new_output((B_s, H_s, min(window, K)), torch.int32, dev)
    counts = None
    if block_m is not None:
        counts = new_output((B_s, H_s, -(-Q // block_m)), torch.int32, dev)
    workspace = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    with on_device(dev):
        _cuda.select_lists(*dlpack(bias, mask, idx, counts, workspace), window=int(window), Q=int(Q),
                           block_m=int(block_m or 1), causal=bool(is_causal), chunk=chunk,
                           stream=current_stream(dev))
    return idx, counts


def has_decode() -> bool:
    """Whether the module has the one-call decode path (``decode``; older builds do not)."""
    return _cuda is not None and hasattr(_cuda, "decode")


@functools.lru_cache(maxsize=256)
def _decode_plan(B: int, Q: int, H: int, H_kv: int, D: int, B_s: int, H_s: int, K: int, window: int, bits: int,
                 device: int) -> tuple[int, int]:
    return tuple(_cuda.decode_plan(B, Q, H, H_kv, D, B_s, H_s, K, window, bits, device))


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, mask: Optional[torch.Tensor] = None,
           *, window: int, scale: Optional[float] = None, softcap: Optional[float] = None, is_causal: bool = False,
           out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None):
    """A windowed global-scope forward with few queries (decode) in one module call: ``(out, lse)``
    as ``forward(..., **dict(zip(("idx", "counts"), list_selection(...))))`` gives them, from the
    same kernels (the radix select, the split forward, its merge) run as one chain with one
    workspace; None, launching nothing, when the call does not take this path (``SPLIT_DECODE``
    off, a module without it, window >= K, a per-query bias or mask, too many query rows for the
    split forward: see ``split_count``).

    q (B, Q, H, D), k/v (B, K, H_kv, D) float16/bfloat16 on one GPU; bias (B|1, heads, 1, K) of any
    float dtype and optional bool mask (B|1, heads_m, 1, K), whose broadcast heads H_s must divide
    H. ``out``/``lse`` may be passed in (contiguous) to be filled. No host synchronisation."""
    if not (SPLIT_DECODE and has_decode()) or q.dim() != 4 or k.dim() != 4 or bias is None or bias.dim() != 4:
        return None
    if (mask is not None and mask.dim() != 4) or not _takes_list(bias, mask, window):
        return None
    K = k.shape[1]
    bits = _BIAS_BITS.get(bias.dtype)
    if bits is None:
        return None
    B, Q, H, D = q.shape
    B_s, H_s = _selection_rows(bias, mask)
    dev = q.device
    splits, nbytes = _decode_plan(B, Q, H, k.shape[2], D, B_s, H_s, K, int(window), bits, dev.index)
    if not splits:
        return None
    if out is None:
        out = new_output((B, Q, H, D), q.dtype, dev)
    if lse is None:
        lse = new_output((B, H, Q), torch.float32, dev)
    # Lists, select workspace and partials: every byte the kernels read is written first
    # (new_output fills it under the tests).
    workspace = new_output((nbytes,), torch.uint8, dev)
    q, k, v, bias, mask = plain(q, k, v, bias, mask)
    q, k, v = _kernel_rows(q), _kernel_rows(k), _kernel_rows(v)
    with on_device(dev):
        _cuda.decode(*dlpack(q, k, v, bias, mask, out, lse, workspace), window=int(window),
                     scale=float(D ** -0.5 if scale is None else scale), softcap=float(softcap or 0.0),
                     causal=bool(is_causal), splits=int(splits), stream=current_stream(dev))
    return out, lse


def list_counts(idx: torch.Tensor, *, Q: int, K: int, block_m: int, is_causal: bool) -> torch.Tensor:
    """Per (b_s, h_s, query block of ``block_m`` rows): how many entries of the ascending list ``idx``
    (B_s, H_s, W) int32 are <= the causal limit of the block's last query (all entries but the
    sentinels without causality): int32 (B_s, H_s, cdiv(Q, block_m)). ``idx`` is a list as
    ``select_lists`` writes it (keys ascending, then the sentinel K): the kernel relies on the order
    (each entry writes the counts up to the next one), so other lists give unspecified counts."""
    (idx,) = plain(idx)
    idx = idx.contiguous()
    counts = new_output((idx.shape[0], idx.shape[1], -(-Q // block_m)), torch.int32, idx.device)
    with on_device(idx.device):
        _cuda.list_counts(*dlpack(idx, counts), K=int(K), Q=int(Q), block_m=int(block_m),
                          causal=bool(is_causal), stream=current_stream(idx.device))
    return counts


def has_visible() -> bool:
    """Whether the module carries the visible-scope (PREFIX) kernels, their table's chunk size and
    their dk/dv tile size (older builds do not)."""
    return _cuda is not None and all(hasattr(_cuda, f) for f in ("visible_death", "visible_ranks", "bwd_dkdv_block_n"))


def visible_death(bias: torch.Tensor, mask: Optional[torch.Tensor], window: int, rows: Optional[tuple] = None, *,
                  bucket: Optional[int] = None) -> torch.Tensor:
    """The visible scope's death positions (``kernels/cuda/visible.h``): int32 (B_s, H_s, K).

    Key j of selection row (b_s, h_s) is visible to query i (causal limit c_i = i + K - Q) exactly
    when ``j <= c_i < death[b_s, h_s, j]``, the same definition as the Triton backend's
    ``prefix.death_positions``.

    Args:
        bias: (B_s|1, heads, 1, K) float16/bfloat16/float32 on a GPU, any strides; selection head h_s
            reads bias head h_s * heads // H_s (heads must divide H_s). float64 is refused
            (TypeError): its order keys leave no room for the position.
        mask: optional bool (B_s|1, heads_m, 1, K), same rules; a False key is never visible.
        window: w >= 1.
        rows: (B_s, H_s), default the broadcast of bias and mask.
        bucket: positions per bucket of the death table, a power of two >= 32 (tests vary it);
            default ``visible_bucket(K)``.

    One sort of (rows, K) int64 keys (torch) between the module's kernels; workspaces of about
    5 int32 per key. No host synchronisation.
    """
    bias, mask = plain(bias, mask)
    B_s, H_s = rows if rows is not None else _selection_rows(bias, mask)
    K = bias.shape[-1]
    dev = bias.device
    n = B_s * H_s
    bucket = int(bucket or _cuda.visible_bucket(K))
    keys = torch.empty(B_s, H_s, K, dtype=torch.int64, device=dev)
    x = torch.empty(n, K, dtype=torch.int32, device=dev)
    rank = torch.empty(n, K, dtype=torch.int32, device=dev)
    table = torch.empty(n, -(-K // _cuda.visible_ranks()), -(-K // bucket) + 1, dtype=torch.int32, device=dev)
    death = new_output((B_s, H_s, K), torch.int32, dev)
    with on_device(dev):
        stream = current_stream(dev)
        _cuda.visible_rank_keys(*dlpack(bias, mask, keys), stream=stream)
        # The keys are unique, so any sort gives the one order.
        ordered = keys.view(n, K).sort(dim=-1, descending=True).values
        _cuda.visible_death(*dlpack(ordered, x, rank, table, death.view(n, K)), window=int(window), bucket=bucket,
                            stream=stream)
    return death


def visible_lists(death: torch.Tensor, *, Q: int, window: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """Per selection row and block of ``block_m`` queries, the keys alive for at least one query of
    the block, from ``visible_death``'s death (B_s, H_s, K): ``(idx, counts, ever, before)``, idx
    int32 (B_s, H_s, cdiv(Q, block_m), min(K, window + block_m)) holding two ascending runs (the
    keys every query of the block sees, then those born or dying inside it; entries past the count
    unset), counts int32 (B_s, H_s, cdiv(Q, block_m), 2): the count and the first run's length;
    ever and before int32 (B_s, H_s, K): each row's ever-alive keys (death_j > j) ascending, and
    how many of them lie at or before each position (so before[..., K - 1] of ever are set), which
    the dk/dv kernel tiles. The Triton backend's ``prefix.block_lists``, in three launches."""
    B_s, H_s, K = death.shape
    n, dev = B_s * H_s, death.device
    n_blocks = -(-Q // block_m)
    idx = new_output((B_s, H_s, n_blocks, min(K, window + block_m)), torch.int32, dev)
    counts = new_output((B_s, H_s, n_blocks, 2), torch.int32, dev)
    ever = torch.empty(B_s, H_s, K, dtype=torch.int32, device=dev)
    before = torch.empty(B_s, H_s, K, dtype=torch.int32, device=dev)
    chunk_counts = torch.empty(n, -(-K // _cuda.visible_chunk()), dtype=torch.int32, device=dev)
    with on_device(dev):
        _cuda.visible_lists(*dlpack(death.reshape(n, K), ever.view(n, K), before.view(n, K), chunk_counts,
                                    idx.view(n, n_blocks, -1), counts.view(n, n_blocks, 2)),
                            Q=int(Q), block_m=int(block_m), stream=current_stream(dev))
    return idx, counts, ever, before


def visible_selection(bias: torch.Tensor, mask: Optional[torch.Tensor], *, window: int, Q: int, block_m: int,
                      rows: Optional[tuple] = None, dkdv_block_n: Optional[int] = None) -> dict:
    """The PREFIX metadata of a causal visible-scope call with a query-broadcast bias (and mask),
    for query blocks of ``block_m`` rows: keyword arguments of ``forward``/``backward`` (idx,
    counts, death), and with ``dkdv_block_n`` (``bwd_dkdv_block_n(D)``) those of ``backward``'s
    dk/dv kernel too: each row's ever-alive keys in ``key_order.alive_order`` (tiles of keys born
    and dying close together) and their count. The mask is folded into death, so the kernels take
    none."""
    from .key_order import alive_order

    death = visible_death(bias, mask, window, rows)
    idx, counts, _, _ = visible_lists(death, Q=Q, window=window, block_m=block_m)
    meta = dict(idx=idx, counts=counts, death=death)
    if dkdv_block_n is not None:
        B_s, H_s, K = death.shape
        order, n_alive = alive_order(death.view(B_s * H_s, K), window, dkdv_block_n)
        meta.update(dkdv_keys=order.view(B_s, H_s, K), dkdv_count=n_alive.view(B_s, H_s))
    return meta


def _takes_list(bias: torch.Tensor, mask: Optional[torch.Tensor], window: int) -> bool:
    """Whether a windowed call has a LIST selection (``list_selection``, ``decode``): the window
    drops keys and bias and mask are shared by every query."""
    return window < bias.shape[-1] and bias.shape[2] == 1 and (mask is None or mask.shape[2] == 1)


def list_selection(bias: torch.Tensor, mask: Optional[torch.Tensor], *, window: int, Q: int, head_dim: int,
                   is_causal: bool, rows: Optional[tuple] = None, chunk: Optional[int] = None):
    """LIST metadata for ``forward``: ``(idx, counts)`` int32 from the CUDA radix select, counts per
    block of this kernel's query rows, or None when the call does not take the LIST path
    (window >= K, a per-query bias/mask). Global scope; the mask is folded into idx, so ``forward``
    needs no mask with it."""
    if not _takes_list(bias, mask, window):
        return None
    return select_lists(bias, mask, window, rows, Q=Q, block_m=fwd_block_m(head_dim), is_causal=is_causal,
                        chunk=chunk)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
            mask: Optional[torch.Tensor] = None, *, scale: Optional[float] = None, softcap: Optional[float] = None,
            is_causal: bool = False, idx: Optional[torch.Tensor] = None, counts: Optional[torch.Tensor] = None,
            out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None, splits: Optional[int] = None,
            death: Optional[torch.Tensor] = None):
    """The CuTe forward: ``(out (B, Q, H, D) in q's dtype, lse (B, H, Q) float32)``.

    q (B, Q, H, D), k/v (B, K, H_kv, D) float16/bfloat16 on one GPU (sm_80+); bias and mask
    (B|1, H|H_kv|1, Q|1, K), bias of any float dtype. Keys: DENSE (every key up to the causal limit,
    bias/mask tested per element) unless ``idx``/``counts`` from ``list_selection`` give the LIST
    path; with ``death`` too (``visible_selection``, blocks of ``fwd_block_m(D)`` rows) the PREFIX
    path of the visible scope.
    ``out``/``lse`` may be passed in (contiguous) to be filled. ``splits``: None runs the split
    (decode) forward with ``split_count`` splits where that is > 0 (never on the PREFIX path); 0
    forces the one-block-per-query-block kernel, n > 0 the split forward with at most n splits
    (Q <= 16). Arguments are checked by the binding (ValueError/TypeError naming them) before any
    launch.
    """
    B, Q, H, D = q.shape
    if out is None:
        out = new_output((B, Q, H, D), q.dtype, q.device)
    if lse is None:
        lse = new_output((B, H, Q), torch.float32, q.device)
    if splits is None:
        splits = 0 if death is not None else split_count(q, k, idx)
    q, k, v, bias, mask, idx, counts = plain(q, k, v, bias, mask, idx, counts)
    q, k, v = _kernel_rows(q), _kernel_rows(k), _kernel_rows(v)
    split_args = {}
    with on_device(q.device):
        if splits:
            # The partials: (splits, B * H * Q) rows of D outputs, then the row maxima and sums. Every
            # entry the merge reads is written first (new_output poisons it under the tests).
            workspace = new_output((int(splits) * B * H * Q * (D + 2),), torch.float32, q.device)
            split_args = dict(splits=int(splits), workspace=dlpack(workspace)[0])
        elif idx is not None and death is None:
            # Asked on q's device: whether the sm_90a kernel runs depends on the current device's
            # compute capability.
            nbytes = compact_bytes(q, k, bias, mask, idx)
            if nbytes:
                workspace = new_output((-(-nbytes // 4),), torch.float32, q.device)
                split_args = dict(workspace=dlpack(workspace)[0])
        if death is not None:
            split_args["death"] = dlpack(death)[0]
        _cuda.fwd(*dlpack(q, k, v, bias, mask, out, lse, idx, counts),
                  scale=float(D ** -0.5 if scale is None else scale), softcap=float(softcap or 0.0),
                  causal=bool(is_causal), stream=current_stream(q.device), **split_args)
    return out, lse


def has_backward() -> bool:
    """Whether the module carries the attention backward (older builds do not)."""
    return _cuda is not None and hasattr(_cuda, "bwd")


def bwd_dkdv_block_n(head_dim: int) -> int:
    """Keys per thread block of the CUDA dk/dv kernel: the tile of the PREFIX path's key order."""
    return _cuda.bwd_dkdv_block_n(head_dim)


# The LIST dk/dv kernel runs one thread block per (kv head, tile of list entries) looping over the
# group's query heads, or, with dkdv_part, one per (query head, tile) whose float32 partials a second
# kernel sums per kv head (bwd_params.h). Splitting pays when the first grid leaves SMs idle (ncu at
# T32k: SMs busy 54% of the dk/dv kernel): H200, bf16 H 32 H_kv 8 D 128 causal, grids of 128 and 256
# blocks at two blocks per SM on 132 SMs, the dk/dv kernel T8k 2.02 -> 1.01 ms and T32k 10.10 ->
# 6.49 ms, fwd+bwd 3.48 -> 2.49 and 19.40 -> 15.83 ms (benchmarks/results/cuda-split-dkdv-h200-
# 2026-11-29.log). Below this many waves of the first grid, split; above, the partials' memory
# (8 B H W D bytes) would buy little (not measured).
SPLIT_DKDV_WAVES = 2


@functools.lru_cache(maxsize=16)
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_dkdv(B: int, H: int, H_kv: int, list_len: int, D: int, device: int) -> bool:
    """Whether ``backward`` runs the LIST dk/dv kernel per query head (partials summed per kv head):
    when H > H_kv and one block per (kv head, tile) fills fewer than ``SPLIT_DKDV_WAVES`` waves of
    two blocks per SM."""
    if H <= H_kv or SPLIT_DKDV_WAVES <= 0:
        return False
    blocks = B * H_kv * -(-list_len // bwd_dkdv_block_n(D))
    return blocks < SPLIT_DKDV_WAVES * 2 * _sm_count(device)


# LIST backward calls whose forward runs the sm_90a kernel (H100/H200, head dim 64 or 128,
# query-broadcast bias and mask) run the sm_90a dq and dk/dv kernels (kernels/cuda/bwd_sm90_kernel.cuh)
# unless this is False: process-wide, for A/B measurements against the sm_80 kernels.
SM90_BACKWARD = True


def bwd_dq_block_m(head_dim: int) -> int:
    """Query rows per thread block of the CUDA dq kernel: the block size of the backward's LIST counts."""
    return _cuda.bwd_dq_block_m(head_dim)


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, bias: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None, *,
             scale: Optional[float] = None, softcap: Optional[float] = None, is_causal: bool = False,
             idx: Optional[torch.Tensor] = None, need_dq: bool = True, need_dkdv: bool = True,
             need_dbias: Optional[bool] = None, dq: Optional[torch.Tensor] = None, dk: Optional[torch.Tensor] = None,
             dv: Optional[torch.Tensor] = None, counts: Optional[torch.Tensor] = None,
             death: Optional[torch.Tensor] = None, dkdv_keys: Optional[torch.Tensor] = None,
             dkdv_count: Optional[torch.Tensor] = None):
    """The CuTe backward of ``forward``: ``(dq, dk, dv, dbias)``, each None when not wanted.

    Same inputs as ``forward`` (the LIST path takes ``idx`` from ``list_selection``; its counts are
    rebuilt for the dq kernel's block size; the PREFIX path takes all of ``visible_selection`` for
    blocks of ``bwd_dq_block_m(D)`` rows and ``dkdv_block_n=bwd_dkdv_block_n(D)``), plus
    ``out``/``lse`` of the forward and the cotangent
    ``dout``. dbias (wanted by default when there is a bias) is returned in the bias's shape and
    dtype. ``dq``/``dk``/``dv`` may be passed in (contiguous, q's dtype) to be filled. Deterministic:
    no atomics anywhere.

    Extra memory, as the Triton backward: float32 delta (B, H, Q); for a query-broadcast bias a
    float32 (B, H, K) dbias partial; for a per-query bias a float32 (B, H, Q, K) dS buffer; on the
    LIST path with one list per query head (idx with more heads than H_kv), float32 (B, K, H, D)
    dk/dv partials summed over each group here; on the LIST path with one list per kv head (or
    fewer) and a grid too small for the GPU (``split_dkdv``), float32 (2, B, H, W, D) dk/dv partials
    by list position, summed per kv head by the module; where the sm_90a kernels run
    (``SM90_BACKWARD``), the forward's compact copy (``compact_bytes``).
    """
    from .reference import reduce_to

    B, Q, H, D = q.shape
    K, H_kv = k.shape[1], k.shape[2]
    dev = q.device
    if need_dbias is None:
        need_dbias = bias is not None
    if need_dbias and bias is None:
        raise ValueError("need_dbias=True needs a bias")
    per_query_bias = bias is not None and bias.dim() == 4 and bias.shape[2] > 1
    if death is None:
        counts = None
        if idx is not None:
            counts = list_counts(idx, Q=Q, K=K, block_m=bwd_dq_block_m(D), is_causal=is_causal)
    listed = idx is not None
    per_head = listed and idx.shape[1] > H_kv  # (B_s, H_s, ...) on the LIST and PREFIX paths

    delta = torch.empty(B, H, Q, dtype=torch.float32, device=dev)
    if need_dq and dq is None:
        dq = new_output((B, Q, H, D), q.dtype, dev)
    if not need_dq:
        dq = None
    ds = db_keys = None
    if need_dbias and per_query_bias:
        ds = torch.zeros(B, H, Q, K, dtype=torch.float32, device=dev)
    elif need_dbias:
        db_keys = torch.zeros(B, H, K, dtype=torch.float32, device=dev)
    dk_buf = dv_buf = part = None
    if (need_dkdv and listed and death is None and not per_head
            and split_dkdv(B, H, H_kv, idx.shape[-1], D, dev.index)):
        part = torch.empty(2, B, H, idx.shape[-1], D, dtype=torch.float32, device=dev)
    if need_dkdv:
        if per_head:
            dk_buf = torch.zeros(B, K, H, D, dtype=torch.float32, device=dev)
            dv_buf = torch.zeros_like(dk_buf)
        else:
            dk_buf = dk if dk is not None else new_output((B, K, H_kv, D), q.dtype, dev)
            dv_buf = dv if dv is not None else new_output((B, K, H_kv, D), q.dtype, dev)
            if listed:  # keys in no list get no gradient, and no thread block visits them
                dk_buf.zero_()
                dv_buf.zero_()
    else:
        dk = dv = None

    dout, q, k, v, out, lse, bias, mask, idx = plain(dout, q, k, v, out, lse, bias, mask, idx)
    dout, q, k, v, out = (_kernel_rows(t) for t in (dout, q, k, v, out))
    with on_device(dev):
        stream = current_stream(dev)
        prefix = {}
        if death is not None:
            prefix = dict(zip(("death", "dkdv_keys", "dkdv_count"), dlpack(death, dkdv_keys, dkdv_count)))
        if part is not None:
            prefix["dkdv_part"] = dlpack(part)[0]
        if listed and death is None and ds is None and SM90_BACKWARD:
            # The sm_90a backward reads the forward's compact copy, rebuilt here (0 bytes where it
            # does not run: asked on q's device, as the forward does).
            nbytes = compact_bytes(q, k, bias, mask, idx)
            if nbytes:
                workspace = new_output((-(-nbytes // 4),), torch.float32, dev)
                prefix["workspace"] = dlpack(workspace)[0]
        _cuda.bwd(*dlpack(q, k, v, out, lse, dout, bias, mask, idx, counts, delta, dq, dk_buf, dv_buf, db_keys,
                          ds),
                  scale=float(D ** -0.5 if scale is None else scale), softcap=float(softcap or 0.0),
                  causal=bool(is_causal), stream=stream, **prefix)

    if need_dkdv:
        if per_head:
            group = H // H_kv
            dk_sum = dk_buf.view(B, K, H_kv, group, D).sum(3)
            dv_sum = dv_buf.view(B, K, H_kv, group, D).sum(3)
            dk = dk.copy_(dk_sum) if dk is not None else dk_sum.to(q.dtype)
            dv = dv.copy_(dv_sum) if dv is not None else dv_sum.to(q.dtype)
        else:
            dk, dv = dk_buf, dv_buf
    dbias = None
    if need_dbias:
        grad = ds if ds is not None else db_keys.unsqueeze(2)
        dbias = reduce_to(grad, bias.shape).to(bias.dtype)
    return dq, dk, dv, dbias
