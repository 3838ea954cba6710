"""Exact top-w key selection on the GPU: the LIST path's sorted index lists (``selection.py``).

For every selection row (b_s, h_s) of a query-broadcast bias (and optional mask) the result is the
keys among the first ``w`` candidates, ordered by bias value descending then key index ascending,
listed in ascending key order and padded with the sentinel K; bit for bit what
``selection.selected_lists`` computes with torch ops.

Algorithm: radix select on order-preserving integer keys, then an ordered compaction.
- Every value becomes an unsigned key whose integer order is the values' order: the float's bits
  with the magnitude bits flipped for negatives and the sign bit set for the rest, -0.0 folded onto
  +0.0 first (they compare equal). 16-bit floats need 16 key bits, float32 32. Masked-out keys get
  key 0, below every real value (-inf included), so they are never taken unless the threshold
  itself is 0, which the compaction treats as "fewer than w candidates: take every key above 0".
- The threshold T, the w-th largest key of the row, is found 8 bits at a time from the top: a
  256-bin ``tl.histogram`` of the next digit over the keys whose higher digits equal T's (found so
  far) tells which digit value holds the rank still sought. Two passes for 16-bit floats, four for
  float32. Integer counting only, so the result does not depend on scheduling.
- Kept keys are those above T plus the earliest ``needed = w - #(keys > T)`` keys equal to T. A
  block ``tl.cumsum`` over the kept flags gives each kept key its output slot (its rank among kept
  keys in index order), with running offsets carried from block to block.

Two launch plans (``_plan``):
- Many rows: ``select_row_kernel``, one program per row doing every pass; one launch.
- Few long rows (decode: 8 rows of 128k keys): the row is cut into C chunks, one program each.
  ``select_hist_kernel`` runs once per digit; each program writes its chunk's histogram, no
  atomics: the next pass sums the C chunk histograms of its row, finds the digit and goes on.
  ``select_write_kernel`` then derives, from the last pass's chunk histograms and per-chunk
  counts of keys with a higher prefix, how many keys earlier chunks keep (its output offset) and
  how many threshold-equal keys they take, and compacts its chunk. KEY_BITS / 8 + 1 launches.
  Temporaries: one int32 workspace of passes * rows * C * 256 + rows * C + passes * rows * 2
  (C <= 32 by default), nothing to zero.
The plan's minimum chunk comes from an H200 sweep (see MIN_CHUNK); MAX_CHUNKS and PROGRAMS_PER_SM
were not measured. benchmarks/triton_select.py times every chunk size next to the plan's choice.
NaN biases are not expected (SPEC.md): they rank by
their bits as in ``selected_lists``, except a negative NaN with every payload bit set, which gets
key 0 like a masked-out key.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import launch

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_KEY_BITS = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32}
_BITS_VIEW = {16: torch.int16, 32: torch.int32}

DIGIT_BITS = 8
NB = 1 << DIGIT_BITS  # histogram bins per pass
# Chunk histograms summed per load in the multi-chunk kernels: [CB, NB] int32 stays in registers.
CB = 8
# Multi-chunk plan: at most this many chunks per row (each program sums the C * NB histogram
# counts of the previous pass, which should stay small next to its chunk of keys) and at least
# this many keys per chunk. H200 sweep (benchmarks/results/triton-select-nvidia-h200-2026-11-28.json,
# bf16, chunks 1024..32768): 8192 was fastest or within 5% on every shape, e.g. 0.024 ms against
# 0.047 ms with 1024 for 8 rows of 8192 keys, 0.039 against 0.088 ms for 8 rows of 32768.
MAX_CHUNKS = 32
MIN_CHUNK = 8192
# Rows that fill the GPU this many times over run as one program per row.
PROGRAMS_PER_SM = 4

# Sizes that vary from call to call and only bound loops or pick rows are not specialised on (each
# specialisation is a separate compilation). Strides stay specialised: with the rows' alignment and
# a unit key stride known, the key loads are vectorised.
_SIZES = ("W", "H_S", "HB", "HM")


def supported(bias: torch.Tensor) -> bool:
    """Whether ``select_lists`` runs a kernel for this bias (else callers use the torch path):
    float16/bfloat16/float32, on a GPU or on the CPU under the Triton interpreter."""
    return bias.dtype in _KEY_BITS and (bias.is_cuda or _INTERPRETED)


@triton.jit
def _load_keys(Bits, Mask, bias_row, mask_row, sbk, smk, offs, K,
               KEY_BITS: tl.constexpr, HAS_MASK: tl.constexpr):
    """Order-preserving integer keys of the bias entries of keys ``offs`` (# [BLOCK]): int32 for
    16-bit floats, int64 for float32 (unsigned 32-bit values); 0 for masked-out keys and for
    offs >= K."""
    inb = offs < K  # [BLOCK]
    raw = tl.load(Bits + bias_row + offs.to(tl.int64) * sbk, mask=inb, other=0)  # [BLOCK]
    if KEY_BITS == 16:
        v = raw.to(tl.int32)  # sign-extended
        v = tl.where(v == -32768, 0, v)  # -0.0 -> +0.0
        key = tl.where(v < 0, ~v, v | 0x8000)  # [BLOCK] in [0, 2^16)
    else:
        v = raw.to(tl.int64)
        v = tl.where(v == -2147483648, 0, v)
        key = tl.where(v < 0, ~v, v | 0x80000000)  # [BLOCK] in [0, 2^32)
    keep = inb
    if HAS_MASK:
        m = tl.load(Mask + mask_row + offs.to(tl.int64) * smk, mask=inb, other=0)  # [BLOCK]
        keep = keep & (m != 0)
    return tl.where(keep, key, 0)


@triton.jit
def _row_bases(row, H_S, HB, HM, sbb, sbh, smb, smh):
    """Element offsets of selection row ``row`` = b_s * H_S + h_s in bias and mask: head h_s
    reads head h_s * heads // H_S; a size-1 batch has stride 0."""
    b = (row // H_S).to(tl.int64)
    h = (row % H_S).to(tl.int64)
    return b * sbb + (h * HB // H_S) * sbh, b * smb + (h * HM // H_S) * smh


@triton.jit
def _digit_hist(Bits, Mask, bias_row, mask_row, sbk, smk, K, start, stop, prefix,
                SHIFT: tl.constexpr, KEY_BITS: tl.constexpr, HAS_MASK: tl.constexpr,
                BLOCK: tl.constexpr, NB: tl.constexpr, COUNT_ABOVE: tl.constexpr):
    """Over keys start..stop (in steps of BLOCK, keys >= K excluded): histogram (# [NB]) of digit
    (key >> SHIFT) % NB among keys whose higher digits equal ``prefix``; masked-out keys count as
    key 0. With COUNT_ABOVE also how many keys have higher digits above
    ``prefix``."""
    hist = tl.zeros([NB], dtype=tl.int32)  # [NB]
    above = tl.zeros([BLOCK], dtype=tl.int32)  # [BLOCK]
    for s in range(start, stop, BLOCK):
        offs = s + tl.arange(0, BLOCK)  # [BLOCK]
        key = _load_keys(Bits, Mask, bias_row, mask_row, sbk, smk, offs, K, KEY_BITS, HAS_MASK)
        high = key >> (SHIFT + 8)
        digit = ((key >> SHIFT) & (NB - 1)).to(tl.int32)  # [BLOCK]
        hist += tl.histogram(digit, NB, mask=(offs < K) & (high == prefix))
        if COUNT_ABOVE:
            above += (high > prefix).to(tl.int32)
    return hist, tl.sum(above, 0)


@triton.jit
def _bucket(hist, rank, NB: tl.constexpr):
    """The bucket t of a histogram (# [NB]) that holds the rank-th largest element (rank >= 1,
    at most the total), and the number of elements in buckets above t."""
    bins = tl.arange(0, NB)  # [NB]
    at_or_above = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # [NB], non-increasing
    t = tl.sum((at_or_above >= rank).to(tl.int32), 0) - 1
    return t, tl.sum(tl.where(bins > t, hist, 0), 0)


@triton.jit
def _extend(prefix, t, KEY_BITS: tl.constexpr, NB: tl.constexpr):
    """The prefix with digit t appended; int64 once a float32 key's four digits may not fit int32."""
    if KEY_BITS == 32:
        return prefix.to(tl.int64) * NB + t
    else:
        return prefix * NB + t


@triton.jit
def _compact(Bits, Mask, Out, bias_row, mask_row, out_row, sbk, smk, K, start, stop, thr, needed,
             eq_seen, kept, KEY_BITS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """Writes the kept keys of start..stop to Out[out_row + slot], slots counted from ``kept``:
    keys above ``thr``, and keys equal to it while fewer than ``needed`` equal keys (``eq_seen``
    before ``start``) have been taken. Returns the updated (eq_seen, kept)."""
    for s in range(start, stop, BLOCK):
        offs = s + tl.arange(0, BLOCK)  # [BLOCK]
        key = _load_keys(Bits, Mask, bias_row, mask_row, sbk, smk, offs, K, KEY_BITS, HAS_MASK)
        eq = (key == thr).to(tl.int32)  # [BLOCK]; keys >= K are 0 and thr > 0 when needed > 0
        take = (key > thr) | ((eq != 0) & (eq_seen + tl.cumsum(eq, 0) <= needed))  # [BLOCK]
        take_i = take.to(tl.int32)
        slot = kept + tl.cumsum(take_i, 0) - 1  # [BLOCK]
        tl.store(Out + out_row + slot.to(tl.int64), offs, mask=take)
        eq_seen += tl.sum(eq, 0)
        kept += tl.sum(take_i, 0)
    return eq_seen, kept


@triton.jit
def _pad(Out, out_row, kept, K, W, BLOCK: tl.constexpr):
    """Fills slots kept..W-1 of a row with the sentinel K."""
    for s in range(kept // BLOCK * BLOCK, W, BLOCK):
        offs = s + tl.arange(0, BLOCK)  # [BLOCK]
        tl.store(Out + out_row + offs, tl.zeros([BLOCK], dtype=tl.int32) + K, mask=(offs >= kept) & (offs < W))


@triton.jit(do_not_specialize=_SIZES)
def select_row_kernel(Bits, Mask, Out, K, W, H_S, HB, HM, sbb, sbh, sbk, smb, smh, smk,
                      KEY_BITS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr):
    """One program per selection row: every radix pass over the row, then the compaction.
    Out: int32 (rows, W)."""
    row = tl.program_id(0)
    bias_row, mask_row = _row_bases(row, H_S, HB, HM, sbb, sbh, smb, smh)
    prefix = tl.full([], 0, tl.int32)
    above = 0
    for d in tl.static_range(KEY_BITS // 8):
        hist, _ = _digit_hist(Bits, Mask, bias_row, mask_row, sbk, smk, K, 0, K, prefix,
                              KEY_BITS - 8 * (d + 1), KEY_BITS, HAS_MASK, BLOCK, NB, False)
        t, more = _bucket(hist, W - above, NB)
        prefix = _extend(prefix, t, KEY_BITS, NB)
        above += more
    # A threshold of 0 means fewer than W candidates: every real key is above it.
    needed = tl.where(prefix > 0, W - above, 0)
    out_row = row.to(tl.int64) * W
    zero = tl.full([], 0, tl.int32)  # loop-carried counters must start as tensors
    _, kept = _compact(Bits, Mask, Out, bias_row, mask_row, out_row, sbk, smk, K, 0, K, prefix, needed,
                       zero, zero, KEY_BITS, HAS_MASK, BLOCK)
    _pad(Out, out_row, kept, K, W, BLOCK)


@triton.jit
def _chunk_sums(Hist, Above, c_self, C, NB: tl.constexpr, CB: tl.constexpr):
    """Over a row's per-chunk histograms Hist (# [C, NB]) and above-prefix counts Above (# [C]):
    the histogram summed over all chunks, summed over chunks before ``c_self``, and the Above
    counts summed over chunks before ``c_self``."""
    chunks = tl.arange(0, CB)  # [CB]
    bins = tl.arange(0, NB)  # [NB]
    total = tl.zeros([NB], dtype=tl.int32)
    before = tl.zeros([NB], dtype=tl.int32)
    above = tl.zeros([CB], dtype=tl.int32)
    for c0 in range(0, C, CB):
        cc = c0 + chunks  # [CB]
        tile = tl.load(Hist + cc[:, None] * NB + bins[None, :], mask=(cc < C)[:, None], other=0)  # [CB, NB]
        earlier = cc < c_self  # [CB]
        total += tl.sum(tile, 0)
        before += tl.sum(tl.where(earlier[:, None], tile, 0), 0)
        above += tl.load(Above + cc, mask=earlier, other=0)
    return total, before, tl.sum(above, 0)


@triton.jit
def _workspace(Work, row, R, C, PASS: tl.constexpr, PASSES: tl.constexpr, NB: tl.constexpr):
    """Pointers into the int32 workspace of the multi-chunk plan for ``row``: its chunk histograms
    of pass PASS (# [C, NB]), of layout (PASSES, R, C, NB); its per-chunk counts of keys whose
    higher digits are above the last pass's prefix (# [C]), of layout (R, C); and its state
    (prefix, above) entering pass PASS (# [2]), of layout (PASSES, R, 2)."""
    r64 = row.to(tl.int64)
    rows = r64 * 0 + R  # R as int64: the offsets below exceed 2^31 for large workspaces
    hists = PASSES * rows * C * NB
    return (Work + ((PASS * rows + r64) * C) * NB,
            Work + hists + r64 * C,
            Work + hists + rows * C + (PASS * rows + r64) * 2)


@triton.jit(do_not_specialize=_SIZES + ("R", "C"))
def select_hist_kernel(Bits, Mask, Work, K, W, R, C, H_S, HB, HM, sbb, sbh, sbk, smb, smh, smk,
                       PASS: tl.constexpr, KEY_BITS: tl.constexpr, HAS_MASK: tl.constexpr, CHUNK: tl.constexpr,
                       BLOCK: tl.constexpr, NB: tl.constexpr, CB: tl.constexpr):
    """Radix pass PASS over chunk c of a row (grid (rows, C)). The pass's prefix comes from the
    previous pass's chunk histograms (chunk 0 stores it for the next pass); the chunk's histogram
    of this pass's digit is written to the workspace, and in the last pass also the chunk's count
    of keys whose higher digits are above the prefix."""
    row = tl.program_id(0)
    c = tl.program_id(1)
    PASSES = KEY_BITS // 8
    LAST = PASS == PASSES - 1
    bias_row, mask_row = _row_bases(row, H_S, HB, HM, sbb, sbh, smb, smh)
    hist_out, above_out, state = _workspace(Work, row, R, C, PASS, PASSES, NB)
    if PASS == 0:
        prefix = 0
    else:
        hist_prev, _, state_prev = _workspace(Work, row, R, C, PASS - 1, PASSES, NB)
        if PASS == 1:
            prefix = tl.full([], 0, tl.int32)
            above = 0
        else:
            prefix = tl.load(state_prev)
            above = tl.load(state_prev + 1)
        total, _, _ = _chunk_sums(hist_prev, above_out, 0, C, NB, CB)
        t, more = _bucket(total, W - above, NB)
        prefix = _extend(prefix, t, KEY_BITS, NB)
        if c == 0:
            tl.store(state, prefix)
            tl.store(state + 1, above + more)
    start = c * CHUNK
    hist, n_above = _digit_hist(Bits, Mask, bias_row, mask_row, sbk, smk, K, start, start + CHUNK, prefix,
                                KEY_BITS - 8 * (PASS + 1), KEY_BITS, HAS_MASK, BLOCK, NB, LAST)
    tl.store(hist_out + c.to(tl.int64) * NB + tl.arange(0, NB), hist)
    if LAST:
        tl.store(above_out + c, n_above)


@triton.jit(do_not_specialize=_SIZES + ("R", "C"))
def select_write_kernel(Bits, Mask, Work, Out, K, W, R, C, H_S, HB, HM, sbb, sbh, sbk, smb, smh, smk,
                        KEY_BITS: tl.constexpr, HAS_MASK: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK: tl.constexpr, NB: tl.constexpr, CB: tl.constexpr):
    """Compaction of chunk c of a row (grid (rows, C)) after the last radix pass. Out: int32
    (rows, W). The chunk's first output slot and the threshold-equal keys already taken come from
    the chunks before it: their last-pass histograms and above-prefix counts."""
    row = tl.program_id(0)
    c = tl.program_id(1)
    PASSES = KEY_BITS // 8
    bias_row, mask_row = _row_bases(row, H_S, HB, HM, sbb, sbh, smb, smh)
    hist, above_in, state = _workspace(Work, row, R, C, PASSES - 1, PASSES, NB)
    prefix = tl.load(state)
    above = tl.load(state + 1)
    total, before, above_before = _chunk_sums(hist, above_in, c, C, NB, CB)
    t, more = _bucket(total, W - above, NB)
    thr = _extend(prefix, t, KEY_BITS, NB)
    # A threshold of 0 means fewer than W candidates: every real key is above it.
    needed = tl.where(thr > 0, W - above - more, 0)
    bins = tl.arange(0, NB)  # [NB]
    eq_before = tl.sum(tl.where(bins == t, before, 0), 0)
    kept_before = above_before + tl.sum(tl.where(bins > t, before, 0), 0) + tl.minimum(needed, eq_before)
    out_row = row.to(tl.int64) * W
    start = c * CHUNK
    _compact(Bits, Mask, Out, bias_row, mask_row, out_row, sbk, smk, K, start, start + CHUNK, thr, needed,
             eq_before, kept_before, KEY_BITS, HAS_MASK, BLOCK)
    if c == C - 1:
        _pad(Out, out_row, above + more + needed, K, W, BLOCK)


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host code. In recent Triton (3.9 on the CPU machines) ``triton.cdiv`` and
    ``next_power_of_2`` are constexpr functions whose calls unwrap their arguments: ~1 us each on
    the host, and a decode call made a dozen of them."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` for host code (see ``cdiv``)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@functools.lru_cache(maxsize=None)
def _properties(index: int):
    """CUDA device ``index``'s properties, asked once: they do not change, and the query is host
    time on every call that needs them."""
    return torch.cuda.get_device_properties(index)


def _sm_count(index: int) -> int:
    return _properties(index).multi_processor_count


def _plan(K: int, rows: int, device: torch.device, chunk: Optional[int]) -> tuple[int, int]:
    """(chunk, block): keys per program (chunk >= K: one program per row) and per loop step.

    The radix passes are latency-bound on L2-resident data, so the aim is enough programs to fill
    the GPU: rows that already give PROGRAMS_PER_SM programs per SM run whole; fewer rows are cut
    into chunks of at least MIN_CHUNK keys, at most MAX_CHUNKS per row (every program re-reads the
    previous pass's C x NB chunk histograms of its row). Under the interpreter one program per row
    is fastest (one launch)."""
    if chunk is None:
        chunk = K
        if device.type == "cuda" and not _INTERPRETED:
            want = min(MAX_CHUNKS, cdiv(PROGRAMS_PER_SM * _sm_count(device.index), rows))
            if want > 1:
                chunk = max(MIN_CHUNK, next_power_of_2(cdiv(K, want)))
    elif chunk < 64 or chunk & (chunk - 1):
        # Blocks of at least 64 keys: no histogram input smaller than a warp's 32 threads x 2.
        raise ValueError(f"chunk must be a power of two >= 64, got {chunk}")
    if chunk >= K:
        return K, max(128, min(2048, next_power_of_2(K)))
    return chunk, min(chunk, 2048)


def _row_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, key) strides of a (B|1, heads, 1, K) tensor; a size-1 batch gets stride 0."""
    return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1), t.stride(3)


def select_lists(bias: torch.Tensor, mask: Optional[torch.Tensor], window: int, B_s: int, H_s: int, *,
                 chunk: Optional[int] = None) -> torch.Tensor:
    """The selected key indices of every selection row (b_s, h_s), ascending, padded with K.

    Args:
        bias: (B|1, heads, 1, K) float16/bfloat16/float32, any strides; selection head h_s reads
            bias head h_s * heads // H_s.
        mask: optional bool (B|1, heads_m, 1, K), same broadcast rules; False keys are not
            candidates.
        window: w >= 1.
        B_s, H_s: the selection rows (broadcast batch and head sizes).
        chunk: keys per program, a power of two (tests use it to force the multi-chunk plan);
            default from ``_plan``.

    Returns:
        int32 (B_s, H_s, min(window, K)), contiguous: ``selection.selected_lists(bias, mask,
        window).squeeze(2)`` exactly.
    """
    if bias.is_cuda and bias.device.index != torch.cuda.current_device():
        # Triton launches on the current device.
        with torch.cuda.device(bias.device):
            return select_lists(bias, mask, window, B_s, H_s, chunk=chunk)
    K = bias.shape[-1]
    W = min(window, K)
    rows = B_s * H_s
    key_bits = _KEY_BITS[bias.dtype]
    # Output and workspace stay two allocations: cutting both from one measured slower on the CPU
    # (the slice and view cost more than the allocation they save).
    out = torch.empty((B_s, H_s, W), dtype=torch.int32, device=bias.device)
    bits = bias.view(_BITS_VIEW[key_bits])
    sbb, sbh, sbk = _row_strides(bias)
    if mask is None:
        m, (smb, smh, smk), heads_m = bits, (0, 0, 0), 1
    else:
        m, (smb, smh, smk), heads_m = mask.view(torch.uint8), _row_strides(mask), mask.shape[1]
    chunk, block = _plan(K, rows, bias.device, chunk)
    num_warps = max(1, min(8, block // 256))
    common = dict(KEY_BITS=key_bits, HAS_MASK=mask is not None, BLOCK=block, NB=NB, num_warps=num_warps)
    sizes = (H_s, bias.shape[1], heads_m, sbb, sbh, sbk, smb, smh, smk)
    if chunk >= K:
        select_row_kernel[(rows,)](bits, m, out, K, W, *sizes, **common)
        return out
    C = cdiv(K, chunk)
    passes = key_bits // DIGIT_BITS
    work = torch.empty(passes * rows * C * NB + rows * C + passes * rows * 2, dtype=torch.int32,
                       device=bias.device)
    for p in range(passes):
        select_hist_kernel[(rows, C)](bits, m, work, K, W, rows, C, *sizes, PASS=p, CHUNK=chunk, CB=CB, **common)
    select_write_kernel[(rows, C)](bits, m, work, out, K, W, rows, C, *sizes, CHUNK=chunk, CB=CB, **common)
    return out


@triton.jit(do_not_specialize=("W", "Q", "K", "NBLK"))
def list_counts_kernel(Idx, Cnt, W, Q, K, NBLK, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr,
                       NB: tl.constexpr, STEPS: tl.constexpr):
    """Program (row, chunk of NB query blocks): for each block, how many entries of the row's
    ascending list are <= its last query's causal limit, by a binary search per block (STEPS
    halvings of [0, W])."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1) * NB + tl.arange(0, NB)  # [NB]
    if IS_CAUSAL:
        c_hi = tl.minimum((blk + 1) * BLOCK_M, Q) - 1 + (K - Q)
    else:
        c_hi = tl.zeros([NB], dtype=tl.int32) + (K - 1)
    lo = tl.zeros([NB], dtype=tl.int32)  # entries before lo are <= c_hi
    hi = tl.zeros([NB], dtype=tl.int32) + W  # entries from hi on are > c_hi (padding K always is)
    for _ in range(STEPS):
        mid = (lo + hi) // 2
        e = tl.load(Idx + row * W + mid, mask=mid < hi, other=K)
        right = (mid < hi) & (e <= c_hi)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(right | (mid >= hi), hi, mid)
    tl.store(Cnt + row * NBLK + blk, lo, mask=blk < NBLK)


def list_counts(idx: torch.Tensor, Q: int, K: int, block_m: int, is_causal: bool) -> torch.Tensor:
    """Per (b_s, h_s, query block of ``block_m``): how many entries of the ascending list ``idx``
    (B_s, H_s, W) int32 the block can see at all, int32 (B_s, H_s, cdiv(Q, block_m)):
    ``selection.block_counts`` in one launch (that one is several torch ops, which showed in the
    host time of short calls)."""
    W = idx.shape[-1]
    nblk = cdiv(Q, block_m)
    rows = idx.numel() // W
    cnt = torch.empty(*idx.shape[:-1], nblk, dtype=torch.int32, device=idx.device)
    nb = min(256, next_power_of_2(nblk))
    list_counts_kernel[(rows, cdiv(nblk, nb))](idx, cnt, W, Q, K, nblk, BLOCK_M=block_m,
                                               IS_CAUSAL=is_causal, NB=nb, STEPS=W.bit_length())
    return cnt


# Every kernel above launches through the short path of launch.py.
launch.fast_all(globals())
