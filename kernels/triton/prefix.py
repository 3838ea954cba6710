"""Visible-scope metadata in O(K log K): when each key dies, and per query block the keys alive in it.

The case: causal, ``topk_scope="visible"``, bias and mask shared by every query (their Q dim is 1).
Query i sees the keys ``0..c_i`` (``c_i = i + K - Q``, its causal limit) and keeps their top w. Seen
from a key: key j is in the top w of the prefix ``0..c`` iff fewer than w keys of that prefix are
better than it. As c grows that count only grows, so each key is alive on one interval of limits:

    key j is visible to query i  <=>  j <= c_i < death_j

where ``death_j`` is the position of the w-th key, in position order, among the keys better than j
(K when fewer than w keys are better; j itself when the key is masked out or already dead at birth).
"Better" is the SPEC order: bias descending, then index ascending. So one int32 per key describes the
whole (Q, K) selection, and the kernels test it per element.

Computing ``death``: rank the allowed keys once (one sort). With ``x_r`` the position of the key of
rank r, ``death`` of that key is the w-th smallest of ``x_0 .. x_{r-1}``: a prefix order statistic.
``prefix_death_kernel`` answers it for every r at once from a 2-D prefix-count table of (rank chunk
of R, position bucket of P) pairs, (K/R) x (K/P) counts per row, built by two kernels: a binary
search over buckets, then an exact pick inside the bucket. No O(Q*K) work, no sequential scan.

Per query block of BM queries (limits ``c_lo..c_hi``), the keys alive for at least one of them are
``j <= c_hi`` with ``death_j > max(j, c_lo)``: the top w of the prefix at ``c_lo`` plus at most BM
newer keys, so at most ``w + BM``. ``prefix_lists_kernel`` compacts them in ascending order; the
forward and dq kernels gather those and test ``death`` per element. The dk/dv kernel tiles the
ever-alive keys (``death_j > j``) in ``alive_order``: by death, then position within chunks of a
few tiles, so a tile's keys are born and die close together and most of its query blocks see all
of them (the kernel's FULL range). Simulated on T32k: 1.2x the useful tile work, 31% of it tested
per element; death order alone visits 1.5x, 67% tested, and position order 2.9x.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import launch
from ...key_order import alive_order, order_chunk  # noqa: F401 (shared with the cuda backend)

_INT64_MIN = -(2**63)


def _order_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys whose order is the values' order (equal values, -0.0 and +0.0 included, get
    equal keys). Negative floats have their magnitude bits flipped so larger means greater."""
    bits = (values.to(torch.float64) + 0.0).view(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFF_FFFF_FFFF_FFFF, bits)


_NARROW_BITS = {torch.float16: (16, torch.int16), torch.bfloat16: (16, torch.int16), torch.float32: (32, torch.int32)}
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _key_layout(dtype: torch.dtype, K: int):
    """(value bits kb, position bits b, key dtype) of the packed rank keys for ``dtype`` values,
    or None where ``rank_order`` takes a stable sort instead (float64)."""
    if dtype not in _NARROW_BITS:
        return None
    kb = _NARROW_BITS[dtype][0]
    b = max(1, (K - 1).bit_length())
    if kb + b > 63:
        return None
    return kb, b, torch.int32 if kb + b <= 31 else torch.int64


def packed_keys_reference(values: torch.Tensor, allowed) -> torch.Tensor:
    """The unique rank keys ``order << b | (K - 1 - j)`` of (rows, K) 16-bit or float32 values
    (``_key_layout``), with torch ops: ``order`` is the value's bits mapped to [0, 2**kb) in the
    values' order (-0.0 folded onto +0.0, negatives' magnitude bits flipped), so a larger key is
    a better key (bias descending, then position ascending); masked-out keys take the negative
    range, ``K - 1 - j`` plus the key dtype's minimum, below every allowed key. This is their
    definition; ``packed_keys`` computes them with one kernel (the tests compare the two)."""
    rows, K = values.shape
    kb, b, key_dtype = _key_layout(values.dtype, K)
    bits = values.view(_NARROW_BITS[values.dtype][1]).to(key_dtype)  # sign-extended
    bits = torch.where(bits == -(1 << (kb - 1)), 0, bits)  # -0.0 -> +0.0
    flip = (1 << (kb - 1)) - 1
    order = torch.where(bits < 0, bits ^ flip, bits) + (1 << (kb - 1))  # in [0, 2**kb)
    tie = (K - 1) - torch.arange(K, device=values.device, dtype=key_dtype)  # earlier positions rank higher
    keys = (order << b) | tie
    if allowed is not None:
        keys = torch.where(allowed.expand(rows, K), keys, tie + torch.iinfo(key_dtype).min)
    return keys


@triton.jit
def prefix_keys_kernel(Bits, Allowed, Keys, K, sv_row, sv_key, sa_row, sa_key, KB: tl.constexpr, B: tl.constexpr,
                       WIDE: tl.constexpr, HAS_ALLOWED: tl.constexpr, BLOCK: tl.constexpr):
    """Program (block of keys, row): ``packed_keys_reference`` of one block of a row. Bits: the values'
    bits (int16 or int32), Allowed: uint8, both read through (row, key) strides; Keys (rows, K)
    int32, or int64 with WIDE."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    row = tl.program_id(1).to(tl.int64)
    ok = j < K
    raw = tl.load(Bits + row * sv_row + j.to(tl.int64) * sv_key, mask=ok, other=0)
    if WIDE:
        v = raw.to(tl.int64)
        tie = ((K - 1) - j).to(tl.int64)
        masked = tie - 9223372036854775807 - 1  # tie + the int64 minimum
    else:
        v = raw.to(tl.int32)
        tie = (K - 1) - j
        masked = tie - 2147483647 - 1
    v = tl.where(v == -(1 << (KB - 1)), 0, v)  # -0.0 -> +0.0
    order = tl.where(v < 0, v ^ ((1 << (KB - 1)) - 1), v) + (1 << (KB - 1))
    key = (order << B) | tie
    if HAS_ALLOWED:
        a = tl.load(Allowed + row * sa_row + j.to(tl.int64) * sa_key, mask=ok, other=0)
        key = tl.where(a != 0, key, masked)
    tl.store(Keys + row * K + j, key, mask=ok)


def _runs_kernels(t: torch.Tensor) -> bool:
    return t.is_cuda or _INTERPRETED


def packed_keys(values: torch.Tensor, allowed) -> torch.Tensor:
    """``packed_keys_reference`` of (rows, K) 16-bit or float32 values; on a GPU (or under the
    interpreter) from ``prefix_keys_kernel``: one launch in place of a dozen elementwise torch ops,
    which are host time on short visible-scope calls."""
    rows, K = values.shape
    if not _runs_kernels(values):
        return packed_keys_reference(values, allowed)
    kb, b, key_dtype = _key_layout(values.dtype, K)
    keys = torch.empty(rows, K, dtype=key_dtype, device=values.device)
    bits = values.view(_NARROW_BITS[values.dtype][1])
    if allowed is None:
        a, sa = bits, (0, 0)
    else:
        allowed = allowed.expand(rows, K)
        a, sa = allowed.view(torch.uint8), (allowed.stride(0), allowed.stride(1))
    block = 1024
    prefix_keys_kernel[(triton.cdiv(K, block), rows)](bits, a, keys, K, bits.stride(0), bits.stride(1), *sa, KB=kb, B=b,
                                                     WIDE=key_dtype == torch.int64, HAS_ALLOWED=allowed is not None,
                                                     BLOCK=block, num_warps=4)
    return keys


def sorted_keys(values: torch.Tensor, allowed):
    """The packed keys (``packed_keys``) of each row sorted best first, (rows, K), and their
    position bits b; None for float64 values."""
    layout = _key_layout(values.dtype, values.shape[1])
    if layout is None:
        return None
    # The keys are unique, so any sort gives the one order.
    return packed_keys(values, allowed).sort(dim=-1, descending=True).values, layout[1]


def rank_order(values: torch.Tensor, allowed) -> torch.Tensor:
    """int32 (rows, K): the positions of each row's keys best first (bias descending, then
    position ascending), the masked-out keys last.

    16-bit and float32 values sort one unique integer per key (``packed_keys``): int32 for 16-bit
    values up to K = 32768 (a radix sort of half the passes of int64), int64 otherwise; a key's
    low b bits give back its position. float64 values take a stable sort of ``_order_keys``.
    ``death_positions`` decodes the sorted keys inside its first kernel instead of calling this."""
    rows, K = values.shape
    s = sorted_keys(values, allowed)
    if s is None:
        keys = _order_keys(values)
        if allowed is not None:
            keys = torch.where(allowed.expand(rows, K), keys, _INT64_MIN)
        # Stable descending sort: equal values keep ascending position order, the SPEC's tie rule.
        return keys.sort(dim=-1, descending=True, stable=True).indices.to(torch.int32).contiguous()
    keys, b = s
    return ((K - 1) - (keys & ((1 << b) - 1))).to(torch.int32)


def _death_tiles(K: int) -> tuple[int, int]:
    """(R, P) of ``prefix_death_kernel``: ranks per program (the table's rank chunk) and positions
    per bucket. The table holds cdiv(K, R) x (cdiv(K, P) + 1) counts per row; the kernel compares
    R x R pairs per search step (about log2(K / P) steps) and R x P pairs in its final pick.
    Measured on an H200 (8 rows of bf16 randn, w = 2048; benchmarks/results/
    visible-sweep-h200-2026-11-28.json). At K = 32768 with R = P = C, the kernel alone: one warp
    per program took 0.048 ms at C = 32, 0.084 ms at 64 and 0.37 ms at 128; two to eight warps
    0.12 to 6.5 ms (the compares' row reductions leave the warp). So programs are one warp of 32
    ranks. P keeps at most 512 buckets (the table's size): R = 32, P = 64 gave the whole
    ``death_positions`` 0.31 ms at K = 32768 (0.22 ms of GPU time, the kernel 0.067) against 0.86
    ms before (R = P = 64, four warps). At K = 131072: (32, 256) 1.26 ms, (32, 128) 1.07 but a
    table twice the size, (64, 256) 3.0, and 2.74 ms before."""
    return 32, max(32, triton.next_power_of_2(triton.cdiv(K, 512)))


@triton.jit
def prefix_table_rows_kernel(S, X, Rank, T, K, NC, NB, R: tl.constexpr, P: tl.constexpr, BB: tl.constexpr,
                             FROM_KEYS: tl.constexpr, POS_MASK: tl.constexpr):
    """Program (c, row): T[row, c, b] = #{ranks c*R .. c*R+R-1 with position < b*P} for b = 0..NB,
    the rank chunk's own counts (``prefix_table_scan_kernel`` then sums them over earlier chunks),
    and Rank[row, x] = r for each of the chunk's ranks r at position x. X (rows, K) int32: the
    position of each rank; with FROM_KEYS it is written here, decoded from the row's sorted packed
    keys S (``sorted_keys``: position K - 1 - (key & POS_MASK)), else read."""
    c = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    r = c * R + tl.arange(0, R)  # [R]
    r_ok = r < K
    if FROM_KEYS:
        key = tl.load(S + row * K + r, mask=r_ok, other=0)
        x = ((K - 1) - (key & POS_MASK)).to(tl.int32)
        tl.store(X + row * K + r, x, mask=r_ok)
    else:
        x = tl.load(X + row * K + r, mask=r_ok, other=0)
    tl.store(Rank + row * K + x, r, mask=r_ok)
    out = T + (row * NC + c) * (NB + 1)
    for b0 in range(0, NB + 1, BB):
        b = b0 + tl.arange(0, BB)  # [BB]
        below = r_ok[:, None] & (x[:, None] < b[None, :] * P)  # [R, BB]
        tl.store(out + b, tl.sum(below.to(tl.int32), 0), mask=b <= NB)


@triton.jit
def prefix_table_scan_kernel(T, NC, NB, TC: tl.constexpr, BB: tl.constexpr):
    """Program (column block, row): in place, each chunk's counts become the sum over the chunks
    before it (an exclusive scan down the table's columns), so T[row, c, b] = #{ranks < c*R with
    position < b*P}."""
    cb = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    b = cb * BB + tl.arange(0, BB)  # [BB]
    b_ok = b <= NB
    carry = tl.zeros([BB], dtype=tl.int32)
    for c0 in range(0, NC, TC):
        c = c0 + tl.arange(0, TC)  # [TC]
        ptr = T + (row * NC + c[:, None]) * (NB + 1) + b[None, :]
        ok = (c < NC)[:, None] & b_ok[None, :]
        own = tl.load(ptr, mask=ok, other=0)  # [TC, BB]
        tl.store(ptr, tl.cumsum(own, 0) - own + carry[None, :], mask=ok)
        carry += tl.sum(own, 0)


@triton.jit
def prefix_death_kernel(X, Rank, T, NA, Death, K, W, NC, NB, R: tl.constexpr, P: tl.constexpr,
                        PS: tl.constexpr, STEPS: tl.constexpr, HAS_NA: tl.constexpr):
    """Program (c, row): ``death`` of the keys with ranks c*R .. c*R+R-1 of one row.

    X (rows, K) int32: position of each rank (allowed keys first, best first). Rank (rows, K) int32:
    its inverse. T (rows, NC, NB+1) int32: T[c, b] = #{rank < c*R with position < b*P}.
    NA (rows,) int32: the number of allowed keys (HAS_NA; else every key is allowed)."""
    c = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    t = tl.arange(0, R)  # [R]
    r = c * R + t  # [R] ranks handled here
    r_ok = r < K
    x = tl.load(X + row * K + r, mask=r_ok, other=0)  # [R] their positions
    xb = x // P  # [R] their buckets
    if HAS_NA:
        n_allowed = tl.load(NA + row)
    else:
        n_allowed = K
    t_base = T + (row * NC + c) * (NB + 1)
    earlier = t[None, :] < t[:, None]  # [R, R]: rank t' of this program precedes rank t

    # count(r, b) = #{r' < r : x_r' < b*P} is non-decreasing in b, 0 at b = 0 and r at b = NB.
    # Search the bucket holding the w-th smallest position: the largest b with count(r, b) < W.
    lo = tl.zeros([R], dtype=tl.int32)
    hi = tl.zeros([R], dtype=tl.int32) + NB
    for _ in tl.static_range(STEPS):
        mid = (lo + hi) // 2
        inside = tl.sum((earlier & (xb[None, :] < mid[:, None])).to(tl.int32), 1)  # [R]
        count = tl.load(t_base + mid) + inside
        below = count < W
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    inside = tl.sum((earlier & (xb[None, :] < lo[:, None])).to(tl.int32), 1)
    needed = W - (tl.load(t_base + lo) + inside)  # [R] >= 1 where r >= W

    # Inside bucket lo, PS positions at a time: the needed-th position (ascending) held by a rank
    # below r.
    killer = tl.full([R], 0, tl.int32) + K
    seen = tl.zeros([R], dtype=tl.int32)
    for s in tl.static_range(P // PS):
        p = lo[:, None] * P + s * PS + tl.arange(0, PS)[None, :]  # [R, PS]
        rk = tl.load(Rank + row * K + p, mask=p < K, other=K)
        held = rk < r[:, None]
        nth = seen[:, None] + tl.cumsum(held.to(tl.int32), 1)
        killer = tl.minimum(killer, tl.min(tl.where(held & (nth == needed[:, None]), p, K), 1))
        seen += tl.sum(held.to(tl.int32), 1)

    # Fewer than W better keys: never dies. Masked keys (ranks >= n_allowed) and keys killed before
    # they are born get death = their own position, which no limit satisfies.
    death = tl.where(r < W, K, killer)
    death = tl.where(r < n_allowed, tl.maximum(death, x), x)
    tl.store(Death + row * K + x, death, mask=r_ok)


@triton.jit
def prefix_lists_kernel(Death, Keys, Before, Idx, Cnt, Bias, BL, sbb, sbh, sbn, H_S, HB, Q, K, NBLK, LW,
                        BLOCK_M: tl.constexpr, TILE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Program (query block, row): the keys alive for at least one query of the block into
    Idx[row, block, :count], in two ascending runs: first the keys every query of the block sees
    (at or before its first query's causal position, dying after its last), then the rest; into
    Cnt[row, block] the pair (count, length of the first run). Keys (rows, K): the row's ever-alive
    keys (death_j > j) in ascending order (``prefix_ever_kernel``); Before (rows, K): how many ever-alive
    keys are at or before each position. Only ever-alive keys can be alive, so the scans walk
    those at or before the block's last limit, not the whole prefix. HAS_BIAS: also each listed
    key's bias value into BL at its slot (row b_s * H_S + h_s reads bias head h_s * HB // H_S), so
    the attention kernels read a tile's bias values contiguously instead of gathering them."""
    blk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    off = K - Q
    c_lo = blk * BLOCK_M + off
    c_hi = tl.minimum(blk * BLOCK_M + BLOCK_M, Q) - 1 + off
    end = tl.load(Before + row * K + tl.minimum(c_hi, K - 1), mask=c_hi >= 0, other=0)
    out = Idx + (row * NBLK + blk) * LW
    bl_out = BL + (row * NBLK + blk) * LW
    bias_row = Bias + (row // H_S) * sbb + (row % H_S * HB // H_S) * sbh
    n = tl.full([], 0, tl.int32)
    for start in range(0, end, TILE):  # the keys alive for the whole block
        t = start + tl.arange(0, TILE)  # [TILE]
        ok = t < end
        j = tl.load(Keys + row * K + t, mask=ok, other=0)
        d = tl.load(Death + row * K + j, mask=ok, other=0)
        keep = ok & (j <= c_lo) & (d > c_hi)
        slot = n + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(out + slot, j, mask=keep)
        if HAS_BIAS:
            tl.store(bl_out + slot, tl.load(bias_row + j.to(tl.int64) * sbn, mask=keep), mask=keep)
        n += tl.sum(keep.to(tl.int32), 0)
    n_full = n
    for start in range(0, end, TILE):  # the keys born or dying inside the block
        t = start + tl.arange(0, TILE)  # [TILE]
        ok = t < end
        j = tl.load(Keys + row * K + t, mask=ok, other=0)
        d = tl.load(Death + row * K + j, mask=ok, other=0)
        keep = ok & (d > c_lo) & ((j > c_lo) | (d <= c_hi))
        slot = n + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(out + slot, j, mask=keep)
        if HAS_BIAS:
            tl.store(bl_out + slot, tl.load(bias_row + j.to(tl.int64) * sbn, mask=keep), mask=keep)
        n += tl.sum(keep.to(tl.int32), 0)
    tl.store(Cnt + (row * NBLK + blk) * 2, n)
    tl.store(Cnt + (row * NBLK + blk) * 2 + 1, n_full)


def death_positions(values: torch.Tensor, allowed, window: int, tiles=None) -> torch.Tensor:
    """``death`` (rows, K) int32 for bias rows ``values`` (rows, K) and an optional bool
    ``allowed`` of the same shape (or broadcastable to it). ``window`` >= 1. ``tiles``: (R, P) of
    the death kernel, powers of two >= 16 (default ``_death_tiles(K)``; tests vary it).

    Launches: the packed keys, their sort, then three kernels (the table's rows, which also decode
    each rank's position and invert the order, its scan, the deaths); with a mask one reduction
    more. Short calls are host-bound, so each torch op saved is host time saved."""
    rows, K = values.shape
    dev = values.device
    if allowed is not None:
        allowed = allowed.expand(rows, K)
    s = sorted_keys(values, allowed)
    x = torch.empty(rows, K, dtype=torch.int32, device=dev) if s is not None else rank_order(values, allowed)
    rank = torch.empty(rows, K, dtype=torch.int32, device=dev)
    n_allowed = allowed.sum(-1, dtype=torch.int32) if allowed is not None else x

    R, P = tiles if tiles is not None else _death_tiles(K)
    nc, nb = triton.cdiv(K, R), triton.cdiv(K, P)
    table = torch.empty(rows, nc, nb + 1, dtype=torch.int32, device=dev)
    prefix_table_rows_kernel[(nc, rows)](x if s is None else s[0], x, rank, table, K, nc, nb, R=R, P=P, BB=128,
                                         FROM_KEYS=s is not None, POS_MASK=0 if s is None else (1 << s[1]) - 1)
    prefix_table_scan_kernel[(triton.cdiv(nb + 1, 32), rows)](table, nc, nb, TC=128, BB=32)
    death = torch.empty(rows, K, dtype=torch.int32, device=dev)
    steps = max(1, (nb - 1).bit_length())
    prefix_death_kernel[(nc, rows)](x, rank, table, n_allowed, death, K, window, nc, nb, R=R, P=P, PS=min(P, 64),
                                    STEPS=steps, HAS_NA=allowed is not None, num_warps=1)
    return death


# Keys per step of prefix_lists_kernel's two scans, and its warps (each program walks the row's
# ever-alive keys up to its last query).
# Under the interpreter 256; 1024 with four warps took 0.21 ms at T32k against 0.26 for 256 (H200,
# the whole-prefix scan before the ever-alive compaction), 2048 and 4096 with 8 or 16 warps 0.24-0.33.
LISTS_TILE = 256 if os.environ.get("TRITON_INTERPRET") == "1" else 1024
LISTS_WARPS = 4


# Keys per step of prefix_ever_kernel (one program per row walks the whole row) and its warps.
EVER_TILE = 256 if os.environ.get("TRITON_INTERPRET") == "1" else 4096
EVER_WARPS = 8


@triton.jit
def prefix_ever_kernel(Death, Keys, Before, K, TILE: tl.constexpr):
    """Program row: the row's ever-alive keys (death_j > j) in ascending order into Keys[row, :n]
    (the rest of the row is left unset), and Before[row, j] = how many of them are at or before j."""
    row = tl.program_id(0).to(tl.int64)
    n = tl.full([], 0, tl.int32)
    for start in range(0, K, TILE):
        j = start + tl.arange(0, TILE)  # [TILE]
        ok = j < K
        d = tl.load(Death + row * K + j, mask=ok, other=0)
        ever = (ok & (d > j)).to(tl.int32)
        inclusive = n + tl.cumsum(ever, 0)  # [TILE]
        tl.store(Keys + row * K + inclusive - 1, j, mask=ever != 0)
        tl.store(Before + row * K + j, inclusive, mask=ok)
        n += tl.sum(ever, 0)


def block_lists(death: torch.Tensor, Q: int, window: int, block_m: int, bias=None):
    """Per (row, query block of ``block_m``): the alive keys, int32 (rows, NBLK, LW) with
    LW = min(K, window + block_m) (entries past the count are unset), as two ascending runs: the
    keys every query of the block sees, then those born or dying inside it; int32 (rows, NBLK, 2):
    the count and the first run's length (the attention kernels skip the per-element visibility
    test on the first run); and the listed keys' bias values in a (rows, NBLK, LW) tensor of the
    bias's dtype, slot for slot, when ``bias`` = (tensor, stride of its batch (0 when broadcast),
    of its head, of its key, H_S the selection heads) is given, else None. Row r = b_s * H_S + h_s
    reads bias head h_s * heads // H_S, as the kernels do.

    The kernel scans the row's ever-alive keys (compacted first by ``prefix_ever_kernel``,
    ascending), about w * (1 + ln(c / w)) of the c keys before a block for a random bias, not the
    whole prefix: at T32k on an H200 0.16 ms of GPU time (kernel 0.10, and 0.04 for the compaction
    when it was five torch ops) against 0.26 ms for the whole-prefix scan. Two launches in all."""
    rows, K = death.shape
    nblk = triton.cdiv(Q, block_m)
    lw = min(K, window + block_m)
    keys = torch.empty_like(death)
    before = torch.empty_like(death)
    prefix_ever_kernel[(rows,)](death, keys, before, K, TILE=EVER_TILE, num_warps=EVER_WARPS)
    idx = torch.empty(rows, nblk, lw, dtype=torch.int32, device=death.device)
    cnt = torch.empty(rows, nblk, 2, dtype=torch.int32, device=death.device)
    if bias is None:
        values, bl, strides, h_s, heads = death, None, (0, 0, 0), 1, 1
    else:
        values, sbb, sbh, sbn, h_s = bias
        bl = torch.empty(rows, nblk, lw, dtype=values.dtype, device=death.device)
        strides, heads = (sbb, sbh, sbn), values.shape[1]
    prefix_lists_kernel[(nblk, rows)](death, keys, before, idx, cnt, values, death if bl is None else bl, *strides,
                                      h_s, heads, Q, K, nblk, lw, BLOCK_M=block_m, TILE=LISTS_TILE,
                                      HAS_BIAS=bl is not None, num_warps=LISTS_WARPS)
    return idx, cnt, bl


@triton.jit
def prefix_super_lists_kernel(Death, ByDeath, DeathSorted, NAlive, L, NL, Meta, Q, K, NBLK, NSB, LW,
                              BLOCK_M: tl.constexpr, G: tl.constexpr, TILE: tl.constexpr, STEPS: tl.constexpr):
    """Program (super-block s, row): the keys any query of super-block s (query blocks s*G ..
    s*G+G-1, limits C_lo..C_hi) can see, into L[row, s, :NL[row, s]] as three runs:

    1. the keys alive at C_lo born at or before it (``j <= C_lo < death_j``), by death ascending:
       first those dying inside the super-block, then the ones that outlive it;
    2. the keys born inside it that outlive it (``C_lo < j <= C_hi < death_j``), by position;
    3. the keys born and dying inside it (``C_lo < j < death_j <= C_hi``), by position.

    Query block k of the super-block (limits c_lo..c_hi) then sees a contiguous range of runs 1-2:
    run-1 keys dying inside the block (tested head), run-1 keys dying after it and run-2 keys born
    at or before c_lo (seen by every query of the block: FULL), run-2 keys born inside the block
    (tested tail); and a range of run 3, from its first key alive at c_lo to its last born by c_hi
    (tested). Per block into Meta[row, block, :6]: (head start, FULL start, FULL end, tail end,
    run-3 start, run-3 end)."""
    sb = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    off = K - Q
    c0 = sb * G * BLOCK_M + off  # C_lo
    c1 = tl.minimum(sb * G * BLOCK_M + G * BLOCK_M, Q) - 1 + off  # C_hi
    blk = sb * G + tl.arange(0, G)  # [G]
    c_lo = blk * BLOCK_M + off  # [G]
    c_hi = tl.minimum(blk * BLOCK_M + BLOCK_M, Q) - 1 + off  # [G]
    out = L + (row * NSB + sb) * LW

    # Run 1: ByDeath holds the ever-alive keys by death ascending; skip those dead by C_lo.
    n_alive = tl.load(NAlive + row)
    lo = n_alive * 0
    hi = n_alive
    for _ in tl.static_range(STEPS):
        mid = (lo + hi) // 2
        dm = tl.load(DeathSorted + row * K + tl.minimum(mid, K - 1))
        active = lo < hi
        le = dm <= c0
        lo = tl.where(active & le, mid + 1, lo)
        hi = tl.where(active & (dm > c0), mid, hi)
    n = tl.full([], 0, tl.int32)
    dead_lo = tl.zeros([G], dtype=tl.int32)  # run-1 keys dead for the whole block (death <= c_lo)
    dead_hi = tl.zeros([G], dtype=tl.int32)  # run-1 keys dying at or before its last query
    for start in range(lo, n_alive, TILE):
        t = start + tl.arange(0, TILE)  # [TILE]
        ok = t < n_alive
        j = tl.load(ByDeath + row * K + t, mask=ok, other=0)
        d = tl.load(DeathSorted + row * K + t, mask=ok, other=0)
        keep = ok & (j <= c0) & (d > c0)
        slot = n + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(out + slot, j, mask=keep)
        n += tl.sum(keep.to(tl.int32), 0)
        dead_lo += tl.sum((keep[None, :] & (d[None, :] <= c_lo[:, None])).to(tl.int32), 1)
        dead_hi += tl.sum((keep[None, :] & (d[None, :] <= c_hi[:, None])).to(tl.int32), 1)
    n1 = n

    # Run 2: the keys born inside the super-block that outlive it, by position.
    born_lo = tl.zeros([G], dtype=tl.int32)  # born at or before the block's first query
    born_hi = tl.zeros([G], dtype=tl.int32)  # born at or before its last query
    for start in range(tl.maximum(c0 + 1, 0), c1 + 1, TILE):
        j = start + tl.arange(0, TILE)  # [TILE]
        ok = j <= c1
        d = tl.load(Death + row * K + j, mask=ok, other=0)
        keep = ok & (d > c1)
        slot = n + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(out + slot, j, mask=keep)
        n += tl.sum(keep.to(tl.int32), 0)
        born_lo += tl.sum((keep[None, :] & (j[None, :] <= c_lo[:, None])).to(tl.int32), 1)
        born_hi += tl.sum((keep[None, :] & (j[None, :] <= c_hi[:, None])).to(tl.int32), 1)
    n2 = n

    # Run 3: the keys born and dying inside the super-block, by position.
    tr_lo = tl.full([G], 2**30, tl.int32)  # the first one still alive at the block's first query
    tr_hi = tl.zeros([G], dtype=tl.int32)  # how many are born at or before its last query
    for start in range(tl.maximum(c0 + 1, 0), c1 + 1, TILE):
        j = start + tl.arange(0, TILE)  # [TILE]
        ok = j <= c1
        d = tl.load(Death + row * K + j, mask=ok, other=0)
        keep = ok & (d > j) & (d <= c1)
        slot = n + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(out + slot, j, mask=keep)
        n += tl.sum(keep.to(tl.int32), 0)
        tr_hi += tl.sum((keep[None, :] & (j[None, :] <= c_hi[:, None])).to(tl.int32), 1)
        alive = keep[None, :] & (d[None, :] > c_lo[:, None])  # [G, TILE]
        tr_lo = tl.minimum(tr_lo, tl.min(tl.where(alive, slot[None, :], 2**30), 1))

    tl.store(NL + row * NSB + sb, n)
    meta = Meta + (row * NBLK + blk) * 6
    real = blk < NBLK
    tl.store(meta, dead_lo, mask=real)
    tl.store(meta + 1, dead_hi, mask=real)
    tl.store(meta + 2, n1 + born_lo, mask=real)
    tl.store(meta + 3, n1 + born_hi, mask=real)
    tr_end = n2 + tr_hi
    tl.store(meta + 4, tl.minimum(tr_lo, tr_end), mask=real)
    tl.store(meta + 5, tr_end, mask=real)


def superblock_size(window: int, block_m: int, queries=None) -> int:
    """Query blocks per super-block: about ``queries`` (default ``window``) queries, a power of two
    from 1 to 32. Each super-block's list (and compact copy) holds at most ``window`` keys alive at
    its start plus the keys born inside it, so fewer, longer super-blocks copy fewer rows in all
    (K / (G * block_m) lists of about window + G * block_m * (births per position)), while the
    keys born and dying inside one super-block (run 3, always tested) grow with its length."""
    g = max(1, (queries or window) // block_m)
    return min(32, triton.next_power_of_2(g))


def superblock_lists(death: torch.Tensor, Q: int, window: int, block_m: int, g: int):
    """The super-block lists of ``prefix_super_lists_kernel`` for query blocks of ``block_m`` and
    super-blocks of ``g`` blocks: int32 L (rows, NSB, LW) (entries past the count unset), NL (rows,
    NSB) the counts, Meta (rows, NBLK, 6) each block's ranges in its super-block's list (head start,
    FULL start, FULL end, tail end, run-3 start, run-3 end); LW = min(K, window + g * block_m)."""
    rows, K = death.shape
    dev = death.device
    nblk = triton.cdiv(Q, block_m)
    nsb = triton.cdiv(nblk, g)
    lw = min(K, min(window, K) + g * block_m)
    j = torch.arange(K, device=dev, dtype=torch.int32)
    alive = death > j
    n_alive = alive.sum(-1, dtype=torch.int32)
    # Ever-alive keys by death ascending (dead keys after them, never read).
    dsorted, by_death = torch.where(alive, death, K + 1).sort(dim=-1, stable=True)
    by_death = by_death.to(torch.int32).contiguous()
    dsorted = dsorted.to(torch.int32).contiguous()
    lists = torch.empty(rows, nsb, lw, dtype=torch.int32, device=dev)
    nl = torch.empty(rows, nsb, dtype=torch.int32, device=dev)
    meta = torch.empty(rows, nblk, 6, dtype=torch.int32, device=dev)
    tile = 64 if os.environ.get("TRITON_INTERPRET") == "1" else 256
    prefix_super_lists_kernel[(nsb, rows)](death, by_death, dsorted, n_alive, lists, nl, meta, Q, K, nblk, nsb, lw,
                                           BLOCK_M=block_m, G=g, TILE=tile, STEPS=K.bit_length() + 1,
                                           num_warps=4)
    return lists, nl, meta


# Every kernel above launches through the short path of launch.py.
launch.fast_all(globals())
