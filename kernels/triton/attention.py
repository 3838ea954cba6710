"""Dynamic mask attention in Triton: forward, and a deterministic backward without atomics.

Kernels visit keys in one of three ways, chosen by the selection path (``selection.py``):
- DENSE and THRESHOLD: contiguous key tiles up to the causal limit of the query block, with a
  per-element test (mask through its broadcast strides, causality, and for THRESHOLD the
  per-query threshold (tv_i, ti_i) on the bias value).
- LIST: the tiles are positions of the row's sorted list of selected keys; key, value and bias rows
  are gathered through the loaded indices, and only the list prefix a query block can see
  causally is visited.
- PREFIX (visible scope): the same gather over the query block's own list of alive keys
  (``prefix.py``), with the per-element test ``j <= c_i < death_j``. The dk/dv kernel takes its key
  tiles from the row's ever-alive keys (``prefix.alive_order``) and visits only the query blocks
  between the tile's first key and its last death, untested where all its keys are alive.

Scores, softmax and every accumulator are float32. Bias and mask are read through their strides
(stride 0 on broadcast dimensions) and never materialised. A query row with no visible key (or
only -inf scores) gets out 0 and lse -inf, and contributes nothing to any gradient.

Backward: ``dma_bwd_dq_kernel`` owns a query block (dq, and dS per element for a per-query bias);
``dma_bwd_dkdv_kernel`` owns a tile of keys of one (batch, kv head), loops over the group's query
heads and every query block that can see those keys, and writes dk, dv and the per-(batch, head)
dbias partial of its keys once. No two programs write the same element, so there are no atomics
and the result is bitwise reproducible.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import launch, topk
from .prefix import alive_order, block_lists, superblock_lists, superblock_size
from .selection import DENSE, LIST, PREFIX, THRESHOLD, make_selection

# The interpreter computes bfloat16 dots and arithmetic wrongly (ENV.md); under it every dot
# operand is upcast to float32, and one fixed launch configuration is used.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Sizes that change from call to call are not specialised on (value 1, divisibility by 16): each
# specialisation is a separate compilation (the test matrix alone needs ~450 on a GPU), and these
# only bound loops, form masks or offset rows. D is a compile-time constant instead, so the head-dim
# mask is known and the q/k/v/out tile loads stay vectorised. The strides of bias and mask are
# specialised like every other stride: a per-query (B, H, Q, K) bias or mask is read in
# [BLOCK_M, BLOCK_N] tiles, and unless Triton knows its row and head strides are multiples of 16
# it cannot prove a row's alignment and issues one scalar load per element (H200, a per-query
# bool mask at Q = K = 8192: the occupancy pass took 10.3 ms and the forward 45.8 ms that way).
_SIZES = ("Q", "K", "H", "GROUP", "HB", "HM", "SEL_B", "H_S", "W", "OCC_H")

# Kernels can only read globals that are constexpr.
_LIST = tl.constexpr(LIST)
_THRESHOLD = tl.constexpr(THRESHOLD)
_PREFIX = tl.constexpr(PREFIX)


# Query blocks (forward, dq) and key tiles (dk/dv) run along the grid's y axis, which CUDA limits to
# 65535 programs; the smallest tiles are 32 rows.
MAX_SEQ_LEN = 65535 * 32


def _head_block(D: int) -> int:
    """tl.dot needs at least 16 along each dimension: D is padded to a power of two >= 16 and the
    tail is masked on every load and store. Plain-int arithmetic: decode calls it on the host path."""
    return max(16, topk.next_power_of_2(D))


def launch_config(D: int, elem_size: int, kind: str, path: int = LIST) -> dict:
    """Tile sizes, warps and pipeline stages for ``kind`` in {"fwd", "dq", "dkdv"} on selection
    ``path`` (the sweeps below are of the LIST path unless they say PREFIX).

    Interpreter: 32 x 32 tiles. Each program runs as numpy on the host, so time grows with the
    number of tiles (measured on the test cases: 16 is ~2.3x slower than 32, 64 ~1.6x faster);
    32 keeps several full and partial tiles, and several query blocks per key tile, in the tests'
    small shapes.
    CUDA: 256-byte rows (D = 128 in bf16/fp16) were swept on an H200 (T32k, global scope, list
    path; benchmarks/results/triton-sweep-h200-2026-11-28.log): forward 128 x 32 with 4 warps and 2
    stages took 2.89 ms against 3.62 ms for 128 x 64 and 4.7 ms for the earlier 128 x 64 / 8 warps.
    Once most tiles skipped the causal test (FULL tiles) the sweep was repeated
    (.../triton-sweep2-h200-2026-11-28.json, end to end from the bias): 128 x 64, 4 warps, 2 stages
    took 1.964 ms at T32k and 0.390 ms at T8k, against 1.959 / 0.428 for 128 x 32 and 2.27 / 0.50
    for 128 x 128 with 8 warps; 8 warps or more stages were slower everywhere. Backward
    128 x 64 with 8 warps and 2 stages gave fwd+bwd 15.6 ms against 18.2 ms for 64 x 64 / 4 warps.
    A second sweep tuned dq and dk/dv apart (.../triton-bwd-sweep-h200-2026-11-28.json): dq 128 x 32
    with 4 warps gave fwd+bwd 14.1 ms against 14.9 for 128 x 64 / 8 warps; dk/dv kept 128 x 64 / 8
    warps (14.9 ms; 32..128 x 64..128 with 4 or 8 warps all took 17.8 to 45 ms); after the FULL
    tiles, the backward alone took 8.66 ms with these choices, 8.79 to 27 ms with the others.
    The PREFIX path (visible scope) was swept apart (T32k and T8k visible, end to end from the bias;
    benchmarks/results/visible-sweep-h200-2026-11-28.json): its gathering forward wants 3 stages
    (T32k 4.20 ms against 4.56 with 2, 128 x 32 4.26, 8 warps 4.84; T8k 0.72 against 0.80, where
    128 x 32 gave 0.69; 4 stages 0.7% faster at T32k than 3), while the LIST path's compact forward
    lost with 3 (T32k 2.71 ms against 1.39). Its dk/dv wants 64 x 64 with 4 warps: T32k fwd+bwd
    18.95 / 18.77 ms against 20.06 / 19.75 for 128 x 64 with 8 warps in two rounds (32 x 64 19.77,
    64 x 32 21.5, 3 stages 22.9, 128 x 128 32.9); at T8k 3.66 against 3.41 ms in the clean round.
    Other row sizes are unswept starting points: 128-byte rows keep the FlashAttention-2 128 x 64
    forward, 512-byte rows (D = 256, or D = 128 in fp32) halve the tiles to fit shared memory."""
    if INTERPRETED:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    bytes_d = _head_block(D) * elem_size
    if kind == "fwd":
        if bytes_d <= 128:
            return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
        if bytes_d <= 256:
            return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3 if path == PREFIX else 2)
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if bytes_d <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    if bytes_d <= 256 and kind == "dq":
        return dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=2)
    if bytes_d <= 256 and path == PREFIX:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    if bytes_d <= 256:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    # "ieee" keeps float32 inputs exact (the default would round them to tf32); it is ignored for
    # float16/bfloat16 operands.
    if UPCAST:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(a, b, input_precision="ieee")
    return r


@triton.jit
def _tanh(x):
    # No libdevice under the interpreter; this form saturates to +-1 without overflow trouble
    # (exp(2x) = inf gives 1, exp(2x) = 0 gives -1).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


# Scores are kept in base-2 units (natural score * log2(e)) so every softmax exponential is a bare
# exp2: the log2(e) factor folds into the score scale instead of costing a multiply per element in
# each exp. lse stays natural (converted once per row).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _base2_scores(qk, scale, softcap, SOFTCAP: tl.constexpr):
    """q.k products to scores in base-2 units (softcap applied), and tanh of the capped scores for
    the softcap chain rule (0 without softcap)."""
    if SOFTCAP:
        t = _tanh(qk * (scale / softcap))
        s = t * (softcap * LOG2E)
    else:
        t = qk * 0.0
        s = qk * (scale * LOG2E)
    return s, t


@triton.jit
def _alive(offs_m, offs_n, n_ok, death, off):
    """[BLOCK_M, BLOCK_N] ``j <= c_i < death_j`` (c_i = i + off) of a PREFIX tile as one unsigned
    compare per element, ``c_i - j < death_j - j``: a key after c_i wraps to a huge difference,
    padding entries (not ``n_ok``) get an empty span, and rows past Q have c_i >= K >= death_j, so
    no bound needs a term of its own. Against two compares and their logic per element, sm_90a
    SASS with Triton 3.6 (benchmarks/triton_sass.py, T-like bf16 D 128), instructions per tested
    loop step: forward 2294 -> 2162, dq 1136 -> 995, dk/dv 1042 -> 969 (born keys) and 1045 -> 991
    (dying keys), with fewer spills; FULL loops, which do not test, moved by register allocation:
    dk/dv 812 -> 779, forward 913 -> 938. Timed (H200, T32k visible): training gains 0.3 ms, the
    forward's list tiles lose 0.14 ms and keep two compares (``_prefix_scores``'s ONE_COMPARE)."""
    span = tl.where(n_ok, death - offs_n, 0).to(tl.uint32)  # [BLOCK_N]; death_j >= j
    return (offs_m[:, None] + off - offs_n[None, :]).to(tl.uint32) < span[None, :]


@triton.jit
def _visibility(offs_m, offs_n, m_ok, n_ok, bias_base, sbm, sbn, mask_base, smm, smn, tv, ti, death, off,
                IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_PER_QUERY: tl.constexpr,
                HAS_MASK: tl.constexpr, MASK_PER_QUERY: tl.constexpr, PATH: tl.constexpr, FULL: tl.constexpr):
    """Which (query, key) pairs of a [BLOCK_M, BLOCK_N] tile are visible, and the bias values it
    loaded on the way ([BLOCK_M, BLOCK_N] per query, [1, BLOCK_N] shared; 0.0 without bias).
    FULL: see ``_scores``."""
    if PATH == _PREFIX and not FULL:  # causal always
        vis = _alive(offs_m, offs_n, n_ok, death, off)  # [BLOCK_M, BLOCK_N]
    else:
        vis = m_ok[:, None] & n_ok[None, :]  # [BLOCK_M, BLOCK_N]
        if IS_CAUSAL and not FULL:
            vis = vis & (offs_n[None, :] <= offs_m[:, None] + off)
    braw = 0.0
    if HAS_BIAS:
        if BIAS_PER_QUERY:
            braw = tl.load(bias_base + offs_m[:, None] * sbm + offs_n[None, :] * sbn,
                           mask=vis, other=0.0)  # [BLOCK_M, BLOCK_N]
        elif FULL:
            braw = tl.load(bias_base + offs_n * sbn)[None, :]  # [1, BLOCK_N]
        else:
            braw = tl.load(bias_base + offs_n * sbn, mask=n_ok, other=0.0)[None, :]  # [1, BLOCK_N]
        if PATH == _THRESHOLD:
            # The selection compares bias values as given, in float32 (float64 for a float64 bias).
            bc = braw.to(tv.dtype)
            vis = vis & ((bc > tv[:, None]) | ((bc == tv[:, None]) & (offs_n[None, :] <= ti[:, None])))
    # On the LIST and PREFIX paths the mask is query-broadcast and already part of the metadata.
    if HAS_MASK and PATH != _LIST and PATH != _PREFIX:
        if MASK_PER_QUERY:
            allowed = tl.load(mask_base + offs_m[:, None] * smm + offs_n[None, :] * smn, mask=vis, other=0)
        else:
            allowed = tl.load(mask_base + offs_n * smn, mask=n_ok, other=0)[None, :]
        vis = vis & (allowed != 0)
    return vis, braw


@triton.jit
def _scores(q, k, offs_m, offs_n, m_ok, n_ok, bias_base, sbm, sbn, mask_base, smm, smn, tv, ti, death,
            off, scale, softcap,
            IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_PER_QUERY: tl.constexpr,
            HAS_MASK: tl.constexpr, MASK_PER_QUERY: tl.constexpr, PATH: tl.constexpr,
            SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, FULL: tl.constexpr):
    """Scores of a [BLOCK_M, BLOCK_N] tile in base-2 units, -inf where the key is not visible to
    the query, and tanh of the capped scores (for the softcap chain rule; 0 without softcap).
    ``death`` [BLOCK_N]: the keys' death positions on the PREFIX path (ignored elsewhere).

    FULL: the caller guarantees every key of the tile is real and visible by position (causality,
    and on the PREFIX path alive) to every query of the block, so none of those is tested, nor the
    row bounds (rows beyond Q are never stored and their P is 0 in the backward). The tests that do
    not follow from position (threshold, a per-query mask) still apply; without them the tile
    needs no select at all, which is most tiles of a causal call."""
    s, t = _base2_scores(_dot(q, tl.trans(k), UPCAST), scale, softcap, SOFTCAP)  # [BLOCK_M, BLOCK_N]
    vis, braw = _visibility(offs_m, offs_n, m_ok, n_ok, bias_base, sbm, sbn, mask_base, smm, smn, tv, ti, death,
                            off, IS_CAUSAL, HAS_BIAS, BIAS_PER_QUERY, HAS_MASK, MASK_PER_QUERY, PATH, FULL)
    if HAS_BIAS:
        s = s + braw.to(tl.float32) * LOG2E
    if (not FULL) or PATH == _THRESHOLD or (HAS_MASK and PATH != _LIST and PATH != _PREFIX):
        s = tl.where(vis, s, float("-inf"))
    return s, t


@triton.jit
def _online_softmax(s, m_i, l_i):
    """One key tile of the online softmax over base-2 scores: the tile's probabilities against the
    new row max, the factor that rescales the running sums, the new max and the new row sum."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing visible so far keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _key_tile(Idx, idx_row, start, limit, K, BLOCK_N: tl.constexpr, PATH: tl.constexpr, TILES: tl.constexpr):
    """Key indices of the tile starting at ``start`` and which of them are real: list entries
    (LIST and PREFIX; positions at or beyond ``limit`` and padding read as the sentinel K), with
    TILES the contiguous keys of the block's (start / BLOCK_N)-th occupied tile, or the contiguous
    keys below ``limit``."""
    pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    if TILES:
        offs_n = tl.load(Idx + idx_row + start // BLOCK_N) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < K
    elif PATH == _LIST or PATH == _PREFIX:
        offs_n = tl.load(Idx + idx_row + pos, mask=pos < limit, other=K)
        n_ok = offs_n < K
    else:
        offs_n = pos
        n_ok = pos < limit
    return offs_n, n_ok


@triton.jit
def _death(Dth, row, K, offs_n, n_ok, PATH: tl.constexpr):
    """The death positions of a tile's keys on the PREFIX path; a placeholder elsewhere."""
    if PATH == _PREFIX:
        death = tl.load(Dth + row * K + offs_n, mask=n_ok, other=0)
    else:
        death = offs_n
    return death


@triton.jit
def _query_block_keys(TV, TI, Cnt, row, occ_row, pid_m, offs_m, m_ok, Q, K, off, NBLK, W, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, PATH: tl.constexpr, IS_CAUSAL: tl.constexpr, TILES: tl.constexpr):
    """What a query block needs to walk its keys: the rows' thresholds (THRESHOLD path; unused
    zeros otherwise), ``limit``, the number of list entries (LIST, PREFIX) or contiguous keys the
    block can see at all, ``full``, a multiple of BLOCK_N up to which every entry is a real key
    that every query of the block sees by position (tiles below it take the FULL path of
    ``_scores``), and where its list starts in Idx (the row's list of W entries for LIST, the
    block's own list of W entries for PREFIX). With TILES (DENSE or THRESHOLD with a per-query
    bias or mask) the block's W = cdiv(K, BLOCK_N) tiles, occupied ones first, and their count
    (``tile_occupancy_kernel``): ``limit`` counts keys of occupied tiles, none of them FULL."""
    tv = tl.zeros([BLOCK_M], dtype=tl.float32)
    ti = tl.zeros([BLOCK_M], dtype=tl.int32)
    if PATH == _THRESHOLD:
        tv = tl.load(TV + row * Q + offs_m, mask=m_ok, other=float("-inf"))  # [BLOCK_M]
        ti = tl.load(TI + row * Q + offs_m, mask=m_ok, other=0)
    idx_row = row * W
    if TILES:
        idx_row = (occ_row * NBLK + pid_m).to(tl.int64) * W
        limit = tl.load(Cnt + occ_row * NBLK + pid_m) * BLOCK_N
        full = limit * 0
    elif PATH == _PREFIX:
        # The block's own list, which starts with the keys all its queries see (prefix.block_lists).
        idx_row = (row * NBLK + pid_m) * W
        limit = tl.load(Cnt + (row * NBLK + pid_m) * 2)
        full = tl.load(Cnt + (row * NBLK + pid_m) * 2 + 1)
    elif PATH == _LIST:
        limit = tl.load(Cnt + row * NBLK + pid_m)
        if IS_CAUSAL:
            # The previous block's count: entries <= the causal limit of this block's first query - 1.
            full = tl.load(Cnt + row * NBLK + pid_m - 1, mask=pid_m > 0, other=0)
        else:
            full = limit
    elif IS_CAUSAL:
        limit = tl.maximum(tl.minimum(tl.minimum((pid_m + 1) * BLOCK_M, Q) + off, K), 0)
        full = tl.minimum(tl.maximum(pid_m * BLOCK_M + off + 1, 0), limit)
    else:
        limit = K
        full = limit
    full = full // BLOCK_N * BLOCK_N
    return tv, ti, limit, full, idx_row


@triton.jit
def _kv_rows(base, offs_n, stride_n, n_ok, offs_d, stride_d, D: tl.constexpr, BLOCK_D: tl.constexpr,
             FULL: tl.constexpr):
    """A [BLOCK_N, BLOCK_D] tile of key or value rows ``offs_n``; on FULL tiles every row is real,
    so only a padded head dim needs a mask."""
    ptrs = base + offs_n[:, None].to(tl.int64) * stride_n + offs_d[None, :] * stride_d
    if FULL and D == BLOCK_D:
        x = tl.load(ptrs)
    elif FULL:
        x = tl.load(ptrs, mask=(offs_d < D)[None, :], other=0.0)
    else:
        x = tl.load(ptrs, mask=n_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    return x


@triton.jit
def _query_block(Qp, Kp, Vp, Bp, Mp, sqb, sqm, sqh, sqd, skb, skh, svb, svh, sbb, sbh, smb, smh,
                 Q, K, H, GROUP, D: tl.constexpr, HB, HM, SEL_B, H_S, BLOCK_M: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """The program's query block, for the kernels that own one (forward, dq): its ids, the causal
    offset, the selection row, the bias/mask/key/value bases of its (batch, head), the row and
    head-dim offsets with their bounds, and the q tile [BLOCK_M, BLOCK_D].

    Grid (B * H, query blocks), the last block first: blocks are issued in launch order, and the
    causally later blocks hold the most keys, so the heaviest run first and the small ones fill
    the tail."""
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    g = (h // GROUP).to(tl.int64)
    row = (b * SEL_B + h * H_S // H).to(tl.int64)  # selection row of (b, h)
    bias_base = Bp + b * sbb + (h * HB // H).to(tl.int64) * sbh
    mask_base = Mp + b * smb + (h * HM // H).to(tl.int64) * smh
    k_base = Kp + b * skb + g * skh
    v_base = Vp + b * svb + g * svh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    m_ok = offs_m < Q
    d_ok = offs_d < D
    q = tl.load(Qp + b * sqb + h.to(tl.int64) * sqh + offs_m[:, None].to(tl.int64) * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    return pid_bh, pid_m, b, h, K - Q, row, bias_base, mask_base, k_base, v_base, offs_m, offs_d, m_ok, d_ok, q


@triton.jit
def _compact_rows(C, c_off, start, n_ok, offs_d, D: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, USE_DESC: tl.constexpr, FULL: tl.constexpr):
    """List positions ``start`` .. ``start + BLOCK_N - 1`` of a compact (rows, D) key or value
    buffer whose list starts at row ``c_off``, [BLOCK_N, BLOCK_D]: no address depends on an index.
    USE_DESC: C is a tensor descriptor with block [BLOCK_N, D] (D == BLOCK_D) and the load is one
    TMA copy on sm_90; it also reads the positions past ``limit`` of a tested tile (real keys beyond
    the causal limit, or zero padding), whose probabilities are exactly 0."""
    if USE_DESC:
        x = C.load([(c_off + start).to(tl.int32), 0])
    else:  # rows of D contiguous elements
        x = _kv_rows(C + c_off * D, start + tl.arange(0, BLOCK_N), D, n_ok, offs_d, 1, D, BLOCK_D, FULL)
    return x


@triton.jit
def _list_scores(q, k, pos, n_ok, B, base, scale, softcap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                 UPCAST: tl.constexpr, FULL: tl.constexpr):
    """Base-2 scores of a tile of list positions ``pos`` (real where ``n_ok``; all real on FULL
    tiles) with the bias values read contiguously from B + base + pos: the compact LIST buffers and
    the PREFIX block lists' copies. The bias is added before any -inf select, as in ``_scores``."""
    s, t = _base2_scores(_dot(q, tl.trans(k), UPCAST), scale, softcap, SOFTCAP)  # [BLOCK_M, BLOCK_N]
    if HAS_BIAS:
        if FULL:
            braw = tl.load(B + base + pos)
        else:
            braw = tl.load(B + base + pos, mask=n_ok, other=0.0)
        s = s + braw[None, :].to(tl.float32) * LOG2E
    return s, t


@triton.jit
def _compact_scores(q, k, pos, n_ok, Idx, idx_row, BC, c_off, offs_m, m_ok, off, K, scale, softcap, Dth, drow,
                    IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                    FULL: tl.constexpr, PREFIX: tl.constexpr = False):
    """``_scores`` of the compact LIST tiles (list positions ``pos``, real below the limit where
    ``n_ok``): the bias values come from the compact row BC + c_off, and only a tested tile loads
    its key indices, for the causal test. Same arithmetic in the same order as ``_scores`` (bias
    added before the -inf select), so the compact kernels match the gathering ones to the bit.
    PREFIX (the visible scope's super-block lists): a tested tile also loads its keys' death
    positions (row ``drow`` of Dth) and tests ``c_i < death_j``."""
    s, t = _list_scores(q, k, pos, n_ok, BC, c_off, scale, softcap, HAS_BIAS, SOFTCAP, UPCAST, FULL)
    if not FULL:
        vis = m_ok[:, None] & n_ok[None, :]  # [BLOCK_M, BLOCK_N]
        if IS_CAUSAL:
            offs_n = tl.load(Idx + idx_row + pos, mask=n_ok, other=K)  # [BLOCK_N]
            if PREFIX:
                death = tl.load(Dth + drow * K + offs_n, mask=n_ok, other=0)  # [BLOCK_N]
                vis = _alive(offs_m, offs_n, n_ok, death, off)
            else:
                vis = vis & (offs_n[None, :] <= offs_m[:, None] + off)
        s = tl.where(vis, s, float("-inf"))
    return s, t


@triton.jit
def _compact_fwd_tile(acc, m_i, l_i, q, start, limit, Idx, idx_row, KC, VC, BC, c_off, offs_m, offs_d, m_ok,
                      off, K, scale, softcap, Dth, drow, D: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                      UPCAST: tl.constexpr, USE_DESC: tl.constexpr, FULL: tl.constexpr, PREFIX: tl.constexpr):
    """``_fwd_tile`` of the LIST path over the compact buffers (``forward``, COMPACT_LIST): key,
    value and bias rows of list positions ``start`` .. are contiguous. The key indices are loaded
    only on tested tiles, for the causal test; a FULL tile touches no index. The arithmetic is that
    of ``_scores`` (bias added before the -inf select), so the result is the same to the bit."""
    pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    n_ok = pos < limit  # entries below limit are real keys (padding K is beyond every causal limit)
    k = _compact_rows(KC, c_off, start, n_ok, offs_d, D, BLOCK_N, BLOCK_D, USE_DESC, FULL)  # [BLOCK_N, BLOCK_D]
    s, t = _compact_scores(q, k, pos, n_ok, Idx, idx_row, BC, c_off, offs_m, m_ok, off, K, scale, softcap,
                           Dth, drow, IS_CAUSAL, HAS_BIAS, SOFTCAP, UPCAST, FULL, PREFIX)  # [BLOCK_M, BLOCK_N]
    p, alpha, m_new, l_i = _online_softmax(s, m_i, l_i)  # p: [BLOCK_M, BLOCK_N]
    v = _compact_rows(VC, c_off, start, n_ok, offs_d, D, BLOCK_N, BLOCK_D, USE_DESC, FULL)  # [BLOCK_N, BLOCK_D]
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, start, limit, Idx, idx_row, Dth, row, k_base, skn, skd, v_base, svn, svd,
              offs_m, offs_d, m_ok, bias_base, sbm, sbn, mask_base, smm, smn, tv, ti, off, K, scale, softcap,
              D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_PER_QUERY: tl.constexpr,
              HAS_MASK: tl.constexpr, MASK_PER_QUERY: tl.constexpr, PATH: tl.constexpr,
              SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, TILES: tl.constexpr, FULL: tl.constexpr):
    """The forward's step over the key tile at list position (or key) ``start``."""
    offs_n, n_ok = _key_tile(Idx, idx_row, start, limit, K, BLOCK_N, PATH, TILES)  # [BLOCK_N]
    death = _death(Dth, row, K, offs_n, n_ok, PATH)
    k = _kv_rows(k_base, offs_n, skn, n_ok, offs_d, skd, D, BLOCK_D, FULL)  # [BLOCK_N, BLOCK_D]
    s, t = _scores(q, k, offs_m, offs_n, m_ok, n_ok, bias_base, sbm, sbn, mask_base, smm, smn, tv, ti,
                   death, off, scale, softcap, IS_CAUSAL, HAS_BIAS, BIAS_PER_QUERY, HAS_MASK, MASK_PER_QUERY,
                   PATH, SOFTCAP, UPCAST, FULL)
    p, alpha, m_new, l_i = _online_softmax(s, m_i, l_i)  # p: [BLOCK_M, BLOCK_N]
    v = _kv_rows(v_base, offs_n, svn, n_ok, offs_d, svd, D, BLOCK_D, FULL)  # [BLOCK_N, BLOCK_D]
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _prefix_keys(Idx, idx_row, start, limit, K, BLOCK_N: tl.constexpr, FULL: tl.constexpr):
    """List positions, key indices and which are real for the PREFIX tile at ``start`` of a block's
    list (a FULL tile lies below the first run's end, so all its entries are real)."""
    pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    n_ok = pos < limit
    if FULL:
        offs_n = tl.load(Idx + idx_row + pos)
    else:
        offs_n = tl.load(Idx + idx_row + pos, mask=n_ok, other=K)
    return pos, offs_n, n_ok


@triton.jit
def _prefix_scores(q, k, pos, offs_n, n_ok, BL, idx_row, offs_m, off, K, scale, softcap, Dth, row,
                   HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, FULL: tl.constexpr,
                   ONE_COMPARE: tl.constexpr):
    """``_scores`` of a PREFIX tile (causal always): bias values from the block's list copy BL at
    list positions ``pos``; on tested tiles the causal and death tests of the tile's own key
    indices ``offs_n``, loaded once for the gather too. Same arithmetic in the same order as
    ``_scores`` (bias added before the -inf select), so the result is the same to the bit.

    ONE_COMPARE picks ``_alive``'s unsigned compare over two signed ones. Both are exact; they
    differ in speed only, and not the same way in both kernels (H200, Triton 3.6, T32k visible,
    benchmarks/triton_ab.py, two alternating runs each): dq gains with it (fwd+bwd 18.08 -> 17.82
    ms), the forward loses (3.71 -> 3.85 ms), so the forward passes False."""
    s, t = _list_scores(q, k, pos, n_ok, BL, idx_row, scale, softcap, HAS_BIAS, SOFTCAP, UPCAST, FULL)
    if not FULL:
        # padding entries read death 0, and rows past Q have limits >= K >= every death, so
        # neither form needs the row or entry bounds as terms of their own
        death = tl.load(Dth + row * K + offs_n, mask=n_ok, other=0)  # [BLOCK_N]
        if ONE_COMPARE:
            alive = _alive(offs_m, offs_n, n_ok, death, off)
        else:
            limit = offs_m[:, None] + off  # [BLOCK_M, 1]
            alive = (offs_n[None, :] <= limit) & (death[None, :] > limit)
        s = tl.where(alive, s, float("-inf"))
    return s, t


@triton.jit
def _prefix_fwd_tile(acc, m_i, l_i, q, start, limit, Idx, idx_row, BL, Dth, row, k_base, skn, skd, v_base, svn, svd,
                     offs_m, offs_d, off, K, scale, softcap, D: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                     FULL: tl.constexpr):
    """``_fwd_tile`` of the PREFIX path: key and value rows gathered through the block's list, the
    bias values read contiguously from BL (``prefix.block_lists`` wrote them slot for slot), and,
    on tested tiles, the causal and death tests (``_prefix_scores``). Gathering the bias in the
    scores' layout took a second set of index loads and their address arithmetic per tile: sm_90a
    SASS with Triton 3.6 (benchmarks/triton_sass.py), FULL loop 1150 -> 913 instructions per 64
    keys (the LIST path's compact loop: 769), tested loop 2169 -> 2294. Same arithmetic in the same
    order as ``_scores``, so the result is the same to the bit."""
    pos, offs_n, n_ok = _prefix_keys(Idx, idx_row, start, limit, K, BLOCK_N, FULL)
    k = _kv_rows(k_base, offs_n, skn, n_ok, offs_d, skd, D, BLOCK_D, FULL)  # [BLOCK_N, BLOCK_D]
    s, t = _prefix_scores(q, k, pos, offs_n, n_ok, BL, idx_row, offs_m, off, K, scale, softcap, Dth, row, HAS_BIAS,
                          SOFTCAP, UPCAST, FULL, False)  # [BLOCK_M, BLOCK_N]
    p, alpha, m_new, l_i = _online_softmax(s, m_i, l_i)
    v = _kv_rows(v_base, offs_n, svn, n_ok, offs_d, svd, D, BLOCK_D, FULL)  # [BLOCK_N, BLOCK_D]
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=_SIZES + ("NBLK", "CH", "NSB", "SBG"))
def dma_fwd_kernel(
    Qp, Kp, Vp, Bp, Mp, Out, Lse, Idx, Cnt, TV, TI, Dth,
    sqb, sqm, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd,
    sbb, sbh, sbm, sbn, smb, smh, smm, smn, sob, som, soh, sod,
    Q, K, H, GROUP, D: tl.constexpr, HB, HM, SEL_B, H_S, W, OCC_H, NBLK,
    scale, softcap, KC, VC, BC, CH, WC, BL,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_PER_QUERY: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_PER_QUERY: tl.constexpr, PATH: tl.constexpr,
    SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, TILES: tl.constexpr,
    COMPACT: tl.constexpr = False, USE_DESC: tl.constexpr = False, NSB=1, SBG=1,
):
    """COMPACT: keys, values and bias values come from the compact buffers KC, VC (rows of D
    elements, or tensor descriptors with USE_DESC) and BC, WC rows per list. LIST path: one list per
    (batch, compact head h * CH // H); see ``_compact_lists``. PREFIX path: NSB lists per (batch,
    compact head), one per super-block of SBG query blocks, and Idx, Cnt the super-block lists and
    each block's ranges in them (``prefix.superblock_lists``); see ``_compact_prefix``."""
    (pid_bh, pid_m, b, h, off, row, bias_base, mask_base, k_base, v_base, offs_m, offs_d, m_ok, d_ok,
     q) = _query_block(Qp, Kp, Vp, Bp, Mp, sqb, sqm, sqh, sqd, skb, skh, svb, svh, sbb, sbh, smb, smh,
                       Q, K, H, GROUP, D, HB, HM, SEL_B, H_S, BLOCK_M, BLOCK_D)
    tv, ti, limit, full, idx_row = _query_block_keys(TV, TI, Cnt, row, b * OCC_H + h * OCC_H // H, pid_m, offs_m,
                                                     m_ok, Q, K, off,
                                                     NBLK, W, BLOCK_M, BLOCK_N, PATH, IS_CAUSAL, TILES)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Tiles every query of the block sees in full first, then the tested rest (the causal edge).
    if COMPACT and PATH == _PREFIX:
        # The block's ranges in its super-block's list: tested [t0, f0), FULL [f0, f1), tested
        # [f1, t1) and [r0, r1); FULL tiles start at f0 and the remainder of [f0, f1) joins the
        # tested tail.
        sb = pid_m // SBG
        c_off = ((b * CH + h * CH // H) * NSB + sb).to(tl.int64) * WC
        lst = (row * NSB + sb) * W
        meta = Cnt + (row * NBLK + pid_m) * 6
        t0 = tl.load(meta)
        f0 = tl.load(meta + 1)
        f1 = tl.load(meta + 2)
        t1 = tl.load(meta + 3)
        r0 = tl.load(meta + 4)
        r1 = tl.load(meta + 5)
        f_end = f0 + (f1 - f0) // BLOCK_N * BLOCK_N
        for start in range(f0, f_end, BLOCK_N):
            acc, m_i, l_i = _compact_fwd_tile(acc, m_i, l_i, q, start, f_end, Idx, lst, KC, VC, BC, c_off,
                                              offs_m, offs_d, m_ok, off, K, scale, softcap, Dth, row, D, BLOCK_N,
                                              BLOCK_D, IS_CAUSAL, HAS_BIAS, SOFTCAP, UPCAST, USE_DESC, True, True)
        for part in tl.static_range(3):  # the tested ranges: head, tail, born-and-dying run
            if part == 0:
                lo, hi = t0, f0
            elif part == 1:
                lo, hi = f_end, t1
            else:
                lo, hi = r0, r1
            for start in range(lo, hi, BLOCK_N):
                acc, m_i, l_i = _compact_fwd_tile(acc, m_i, l_i, q, start, hi, Idx, lst, KC, VC, BC, c_off,
                                                  offs_m, offs_d, m_ok, off, K, scale, softcap, Dth, row, D,
                                                  BLOCK_N, BLOCK_D, IS_CAUSAL, HAS_BIAS, SOFTCAP, UPCAST, USE_DESC,
                                                  False, True)
    elif COMPACT:
        c_off = (b * CH + h * CH // H).to(tl.int64) * WC
        for start in range(0, full, BLOCK_N):
            acc, m_i, l_i = _compact_fwd_tile(acc, m_i, l_i, q, start, limit, Idx, idx_row, KC, VC, BC, c_off,
                                              offs_m, offs_d, m_ok, off, K, scale, softcap, Dth, row, D, BLOCK_N,
                                              BLOCK_D, IS_CAUSAL, HAS_BIAS, SOFTCAP, UPCAST, USE_DESC, True, False)
        for start in range(full, limit, BLOCK_N):
            acc, m_i, l_i = _compact_fwd_tile(acc, m_i, l_i, q, start, limit, Idx, idx_row, KC, VC, BC, c_off,
                                              offs_m, offs_d, m_ok, off, K, scale, softcap, Dth, row, D, BLOCK_N,
                                              BLOCK_D, IS_CAUSAL, HAS_BIAS, SOFTCAP, UPCAST, USE_DESC, False, False)
    elif PATH == _PREFIX:
        for start in range(0, full, BLOCK_N):
            acc, m_i, l_i = _prefix_fwd_tile(acc, m_i, l_i, q, start, limit, Idx, idx_row, BL, Dth, row, k_base, skn,
                                             skd, v_base, svn, svd, offs_m, offs_d, off, K, scale, softcap, D, BLOCK_N,
                                             BLOCK_D, HAS_BIAS, SOFTCAP, UPCAST, True)
        for start in range(full, limit, BLOCK_N):
            acc, m_i, l_i = _prefix_fwd_tile(acc, m_i, l_i, q, start, limit, Idx, idx_row, BL, Dth, row, k_base, skn,
                                             skd, v_base, svn, svd, offs_m, offs_d, off, K, scale, softcap, D, BLOCK_N,
                                             BLOCK_D, HAS_BIAS, SOFTCAP, UPCAST, False)
    else:
        for start in range(0, full, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, start, limit, Idx, idx_row, Dth, row, k_base, skn, skd,
                                      v_base, svn, svd, offs_m, offs_d, m_ok, bias_base, sbm, sbn, mask_base, smm,
                                      smn, tv, ti, off, K, scale, softcap, D, BLOCK_N, BLOCK_D, IS_CAUSAL, HAS_BIAS,
                                      BIAS_PER_QUERY, HAS_MASK, MASK_PER_QUERY, PATH, SOFTCAP, UPCAST, TILES, True)
        for start in range(full, limit, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, start, limit, Idx, idx_row, Dth, row, k_base, skn, skd,
                                      v_base, svn, svd, offs_m, offs_d, m_ok, bias_base, sbm, sbn, mask_base, smm,
                                      smn, tv, ti, off, K, scale, softcap, D, BLOCK_N, BLOCK_D, IS_CAUSAL, HAS_BIAS,
                                      BIAS_PER_QUERY, HAS_MASK, MASK_PER_QUERY, PATH, SOFTCAP, UPCAST, TILES, False)

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(Out + b * sob + h.to(tl.int64) * soh + offs_m[:, None].to(tl.int64) * som + offs_d[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + pid_bh.to(tl.int64) * Q + offs_m, lse, mask=m_ok)


@triton.jit(do_not_specialize=("K", "W", "WC", "H", "CH", "GROUP", "HB", "SEL_B", "H_S", "NSB", "PAD"))
def compact_gather_kernel(Kp, Vp, Bp, Idx, KC, VC, BC, skb, skn, skh, skd, svb, svn, svh, svd, sbb, sbh, sbn,
                          K, W, WC, H, CH, GROUP, HB, SEL_B, H_S, D: tl.constexpr, BLOCK_P: tl.constexpr,
                          BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, NL, NSB=1, PAD=0,
                          COUNTED: tl.constexpr = False):
    """Program (batch x compact head, block of list positions[, list]): the key and value rows (D
    each) and bias values of its list's entries into KC, VC, BC at row (b * CH + hc) * WC + position;
    the padding (sentinel K, and positions W .. WC - 1) gets zeros. Compact head hc serves query heads
    hc * H // CH .. (hc + 1) * H // CH - 1, which share a selection row, a kv head and a bias head.
    COUNTED (the PREFIX super-block lists): NSB lists of W entries per selection row (grid axis 2),
    NL[row, list] of them real; copy row ((b * CH + hc) * NSB + list) * WC + position. Only the PAD
    rows after the count get zeros (all a tile that starts below the count can read); the rest of
    the WC rows stay unset and are never read."""
    pid = tl.program_id(0)
    lst = tl.program_id(2)
    b = (pid // CH).to(tl.int64)
    h = pid % CH * (H // CH)  # the first query head of the compact head
    row = b * SEL_B + h * H_S // H
    pos = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    if COUNTED:
        n = tl.load(NL + row * NSB + lst)
        stored = tl.minimum(n + PAD, WC)
    else:
        n = W
        stored = WC
    keys = tl.load(Idx + (row * NSB + lst) * W + pos, mask=pos < n, other=K)
    ok = keys < K
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < D)[None, :]
    kj = keys[:, None].to(tl.int64)
    g = (h // GROUP).to(tl.int64)
    krows = tl.load(Kp + b * skb + g * skh + kj * skn + offs_d[None, :] * skd, mask=ok[:, None] & d_ok, other=0.0)
    vrows = tl.load(Vp + b * svb + g * svh + kj * svn + offs_d[None, :] * svd, mask=ok[:, None] & d_ok, other=0.0)
    dst = (pid.to(tl.int64) * NSB + lst) * WC + pos  # [BLOCK_P]
    st = (pos < stored)[:, None] & d_ok
    tl.store(KC + dst[:, None] * D + offs_d[None, :], krows, mask=st)
    tl.store(VC + dst[:, None] * D + offs_d[None, :], vrows, mask=st)
    if HAS_BIAS:
        braw = tl.load(Bp + b * sbb + (h * HB // H).to(tl.int64) * sbh + keys.to(tl.int64) * sbn, mask=ok, other=0.0)
        tl.store(BC + dst, braw, mask=pos < stored)


@triton.jit
def _row_stats(Lse, Delta, bh, Q, offs_m, m_ok):
    """The backward's per-row inputs of query rows ``offs_m`` of (batch x head) ``bh``: lse in base
    2, like the scores, and delta. Empty rows (lse -inf) get +inf, so P = exp2(s - lse) is 0
    without NaN."""
    lse = tl.load(Lse + bh * Q + offs_m, mask=m_ok, other=float("-inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    return lse, tl.load(Delta + bh * Q + offs_m, mask=m_ok, other=0.0)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, start, limit, Idx, idx_row, Dth, row, k_base, skn, skd, v_base, svn, svd,
             ds_base, offs_m, offs_d, m_ok, bias_base, sbm, sbn, mask_base, smm, smn, tv, ti, off, K, scale,
             softcap, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_PER_QUERY: tl.constexpr,
             HAS_MASK: tl.constexpr, MASK_PER_QUERY: tl.constexpr, PATH: tl.constexpr,
             SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, WRITE_DS: tl.constexpr, TILES: tl.constexpr,
             FULL: tl.constexpr):
    """The dq kernel's step over the key tile at list position (or key) ``start``; ``lse2`` is the
    rows' lse in base 2 (+inf for empty rows)."""
    offs_n, n_ok = _key_tile(Idx, idx_row, start, limit, K, BLOCK_N, PATH, TILES)  # [BLOCK_N]
    death = _death(Dth, row, K, offs_n, n_ok, PATH)
    k = _kv_rows(k_base, offs_n, skn, n_ok, offs_d, skd, D, BLOCK_D, FULL)  # [BLOCK_N, BLOCK_D]
    v = _kv_rows(v_base, offs_n, svn, n_ok, offs_d, svd, D, BLOCK_D, FULL)  # [BLOCK_N, BLOCK_D]
    s, t = _scores(q, k, offs_m, offs_n, m_ok, n_ok, bias_base, sbm, sbn, mask_base, smm, smn, tv, ti,
                   death, off, scale, softcap, IS_CAUSAL, HAS_BIAS, BIAS_PER_QUERY, HAS_MASK, MASK_PER_QUERY,
                   PATH, SOFTCAP, UPCAST, FULL)
    p = tl.exp2(s - lse2[:, None])  # [BLOCK_M, BLOCK_N]
    dp = _dot(do, tl.trans(v), UPCAST)  # [BLOCK_M, BLOCK_N]
    ds = p * (dp - delta[:, None])
    if WRITE_DS:
        tl.store(ds_base + offs_m[:, None].to(tl.int64) * K + offs_n[None, :], ds, mask=m_ok[:, None] & n_ok[None, :])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return dq + _dot(ds.to(k.dtype), k, UPCAST)


@triton.jit
def _compact_dq_tile(dq, q, do, lse2, delta, start, limit, Idx, idx_row, KC, VC, BC, c_off, offs_m, offs_d, m_ok,
                     off, K, scale, softcap, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                     UPCAST: tl.constexpr, USE_DESC: tl.constexpr, FULL: tl.constexpr):
    """``_dq_tile`` of the LIST path over the compact buffers (``backward``, COMPACT_DQ): key,
    value and bias rows of list positions ``start`` .. are contiguous (``_compact_lists``). As in
    ``_compact_fwd_tile`` the key indices are loaded only on tested tiles, for the causal test; the
    arithmetic is that of ``_scores`` and ``_dq_tile`` in the same order, so dq is the same to the
    bit. Positions at or past ``limit`` of a tested tile read real rows or padding instead of the
    gather's zeros, but their scores are -inf, so P and dS are exactly 0 there. No dS output: the
    LIST path's bias is query-broadcast (the host asserts it)."""
    pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    n_ok = pos < limit  # entries below limit are real keys (padding K is beyond every causal limit)
    k = _compact_rows(KC, c_off, start, n_ok, offs_d, D, BLOCK_N, BLOCK_D, USE_DESC, FULL)  # [BLOCK_N, BLOCK_D]
    v = _compact_rows(VC, c_off, start, n_ok, offs_d, D, BLOCK_N, BLOCK_D, USE_DESC, FULL)  # [BLOCK_N, BLOCK_D]
    s, t = _compact_scores(q, k, pos, n_ok, Idx, idx_row, BC, c_off, offs_m, m_ok, off, K, scale, softcap,
                           Idx, 0, IS_CAUSAL, HAS_BIAS, SOFTCAP, UPCAST, FULL)  # [BLOCK_M, BLOCK_N]
    p = tl.exp2(s - lse2[:, None])  # [BLOCK_M, BLOCK_N]
    dp = _dot(do, tl.trans(v), UPCAST)  # [BLOCK_M, BLOCK_N]
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return dq + _dot(ds.to(k.dtype), k, UPCAST)


@triton.jit
def _prefix_dq_tile(dq, q, do, lse2, delta, start, limit, Idx, idx_row, BL, Dth, row, k_base, skn, skd, v_base, svn,
                    svd, offs_m, offs_d, off, K, scale, softcap, D: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                    FULL: tl.constexpr):
    """``_dq_tile`` of the PREFIX path, reading bias values from BL as ``_prefix_fwd_tile`` does (no
    dS output: the PREFIX path's bias is query-broadcast). dq is the same to the bit. SASS (Triton
    3.6, 32-key tiles): FULL loop 583 -> 485 instructions, tested loop 987 -> 1136."""
    pos, offs_n, n_ok = _prefix_keys(Idx, idx_row, start, limit, K, BLOCK_N, FULL)
    k = _kv_rows(k_base, offs_n, skn, n_ok, offs_d, skd, D, BLOCK_D, FULL)  # [BLOCK_N, BLOCK_D]
    v = _kv_rows(v_base, offs_n, svn, n_ok, offs_d, svd, D, BLOCK_D, FULL)  # [BLOCK_N, BLOCK_D]
    s, t = _prefix_scores(q, k, pos, offs_n, n_ok, BL, idx_row, offs_m, off, K, scale, softcap, Dth, row, HAS_BIAS,
                          SOFTCAP, UPCAST, FULL, True)  # [BLOCK_M, BLOCK_N]
    p = tl.exp2(s - lse2[:, None])  # [BLOCK_M, BLOCK_N]
    dp = _dot(do, tl.trans(v), UPCAST)  # [BLOCK_M, BLOCK_N]
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return dq + _dot(ds.to(k.dtype), k, UPCAST)


@triton.jit(do_not_specialize=_SIZES + ("NBLK", "CH"))
def dma_bwd_dq_kernel(
    Qp, Kp, Vp, Bp, Mp, DO, Lse, Delta, DQ, DS, Idx, Cnt, TV, TI, Dth,
    sqb, sqm, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd,
    sbb, sbh, sbm, sbn, smb, smh, smm, smn, sdb, sdm, sdh, sdd,
    Q, K, H, GROUP, D: tl.constexpr, HB, HM, SEL_B, H_S, W, OCC_H, NBLK,
    scale, softcap, KC, VC, BC, CH, WC, BL,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_PER_QUERY: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_PER_QUERY: tl.constexpr, PATH: tl.constexpr,
    SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, WRITE_DQ: tl.constexpr, WRITE_DS: tl.constexpr,
    TILES: tl.constexpr, COMPACT: tl.constexpr = False, USE_DESC: tl.constexpr = False,
):
    """dq of one query block; with WRITE_DS also dS per element into the float32 (B, H, Q, K)
    buffer DS (zero-filled by the host: tiles outside the loop stay 0), for a per-query bias.
    COMPACT (LIST path only, never with WRITE_DS): keys, values and bias values come from the
    compact buffers KC, VC, BC, as in ``dma_fwd_kernel``; see ``_compact_lists``."""
    (pid_bh, pid_m, b, h, off, row, bias_base, mask_base, k_base, v_base, offs_m, offs_d, m_ok, d_ok,
     q) = _query_block(Qp, Kp, Vp, Bp, Mp, sqb, sqm, sqh, sqd, skb, skh, svb, svh, sbb, sbh, smb, smh,
                       Q, K, H, GROUP, D, HB, HM, SEL_B, H_S, BLOCK_M, BLOCK_D)
    qd_mask = m_ok[:, None] & d_ok[None, :]
    do = tl.load(DO + b * sdb + h.to(tl.int64) * sdh + offs_m[:, None].to(tl.int64) * sdm + offs_d[None, :] * sdd,
                 mask=qd_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    lse, delta = _row_stats(Lse, Delta, pid_bh.to(tl.int64), Q, offs_m, m_ok)
    tv, ti, limit, full, idx_row = _query_block_keys(TV, TI, Cnt, row, b * OCC_H + h * OCC_H // H, pid_m, offs_m,
                                                     m_ok, Q, K, off,
                                                     NBLK, W, BLOCK_M, BLOCK_N, PATH, IS_CAUSAL, TILES)
    ds_base = DS + pid_bh.to(tl.int64) * Q * K

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if COMPACT:
        c_off = (b * CH + h * CH // H).to(tl.int64) * WC
        for start in range(0, full, BLOCK_N):
            dq = _compact_dq_tile(dq, q, do, lse, delta, start, limit, Idx, idx_row, KC, VC, BC, c_off, offs_m,
                                  offs_d, m_ok, off, K, scale, softcap, D, BLOCK_N, BLOCK_D, IS_CAUSAL, HAS_BIAS,
                                  SOFTCAP, UPCAST, USE_DESC, True)
        for start in range(full, limit, BLOCK_N):
            dq = _compact_dq_tile(dq, q, do, lse, delta, start, limit, Idx, idx_row, KC, VC, BC, c_off, offs_m,
                                  offs_d, m_ok, off, K, scale, softcap, D, BLOCK_N, BLOCK_D, IS_CAUSAL, HAS_BIAS,
                                  SOFTCAP, UPCAST, USE_DESC, False)
    elif PATH == _PREFIX:
        for start in range(0, full, BLOCK_N):
            dq = _prefix_dq_tile(dq, q, do, lse, delta, start, limit, Idx, idx_row, BL, Dth, row, k_base, skn, skd,
                                 v_base, svn, svd, offs_m, offs_d, off, K, scale, softcap, D, BLOCK_N, BLOCK_D,
                                 HAS_BIAS, SOFTCAP, UPCAST, True)
        for start in range(full, limit, BLOCK_N):
            dq = _prefix_dq_tile(dq, q, do, lse, delta, start, limit, Idx, idx_row, BL, Dth, row, k_base, skn, skd,
                                 v_base, svn, svd, offs_m, offs_d, off, K, scale, softcap, D, BLOCK_N, BLOCK_D,
                                 HAS_BIAS, SOFTCAP, UPCAST, False)
    else:
        for start in range(0, full, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse, delta, start, limit, Idx, idx_row, Dth, row, k_base, skn, skd, v_base, svn,
                          svd, ds_base, offs_m, offs_d, m_ok, bias_base, sbm, sbn, mask_base, smm, smn, tv, ti, off, K,
                          scale, softcap, D, BLOCK_N, BLOCK_D, IS_CAUSAL, HAS_BIAS, BIAS_PER_QUERY, HAS_MASK,
                          MASK_PER_QUERY, PATH, SOFTCAP, UPCAST, WRITE_DS, TILES, True)
        for start in range(full, limit, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse, delta, start, limit, Idx, idx_row, Dth, row, k_base, skn, skd, v_base, svn,
                          svd, ds_base, offs_m, offs_d, m_ok, bias_base, sbm, sbn, mask_base, smm, smn, tv, ti, off, K,
                          scale, softcap, D, BLOCK_N, BLOCK_D, IS_CAUSAL, HAS_BIAS, BIAS_PER_QUERY, HAS_MASK,
                          MASK_PER_QUERY, PATH, SOFTCAP, UPCAST, WRITE_DS, TILES, False)
    if WRITE_DQ:
        # DQ is contiguous (B, Q, H, D).
        tl.store(DQ + ((b * Q + offs_m[:, None].to(tl.int64)) * H + h) * D + offs_d[None, :],
                 (dq * scale).to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _dkdv_tile(dk, dv, db, k, v, start_m, q_base, sqm, sqd, do_base, sdm, sdd, Lse, Delta, bh, TV, TI, row,
               offs_n, n_ok, offs_d, death, bias_base, sbm, sbn, mask_base, smm, smn, Q, off, scale, softcap,
               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
               IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_PER_QUERY: tl.constexpr,
               HAS_MASK: tl.constexpr, MASK_PER_QUERY: tl.constexpr, PATH: tl.constexpr,
               SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, FULL: tl.constexpr, QD, DOD, b, h,
               Q_DESC: tl.constexpr):
    """The dk/dv kernel's step over the query block at ``start_m`` for one query head (batch ``b``,
    head ``h``). Q_DESC: its q and dO rows come through the 4-D tensor descriptors QD and DOD
    (one TMA copy each on sm_90, rows past Q read as zeros) instead of per-row pointers."""
    offs_m = start_m + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    m_ok = offs_m < Q
    if Q_DESC:
        q = QD.load([b.to(tl.int32), start_m, h.to(tl.int32), 0]).reshape([BLOCK_M, BLOCK_D])
        do = DOD.load([b.to(tl.int32), start_m, h.to(tl.int32), 0]).reshape([BLOCK_M, BLOCK_D])
    else:
        qd_mask = m_ok[:, None] & (offs_d < D)[None, :]
        rows = offs_m[:, None].to(tl.int64)
        q = tl.load(q_base + rows * sqm + offs_d[None, :] * sqd, mask=qd_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
        do = tl.load(do_base + rows * sdm + offs_d[None, :] * sdd, mask=qd_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    lse, delta = _row_stats(Lse, Delta, bh, Q, offs_m, m_ok)
    tv = tl.zeros([BLOCK_M], dtype=tl.float32)
    ti = tl.zeros([BLOCK_M], dtype=tl.int32)
    if PATH == _THRESHOLD:
        tv = tl.load(TV + row * Q + offs_m, mask=m_ok, other=float("-inf"))
        ti = tl.load(TI + row * Q + offs_m, mask=m_ok, other=0)
    s, t = _scores(q, k, offs_m, offs_n, m_ok, n_ok, bias_base, sbm, sbn, mask_base, smm, smn, tv, ti,
                   death, off, scale, softcap, IS_CAUSAL, HAS_BIAS, BIAS_PER_QUERY, HAS_MASK, MASK_PER_QUERY,
                   PATH, SOFTCAP, UPCAST, FULL)
    p = tl.exp2(s - lse[:, None])  # [BLOCK_M, BLOCK_N]
    dv += _dot(tl.trans(p.to(do.dtype)), do, UPCAST)
    dp = _dot(do, tl.trans(v), UPCAST)  # [BLOCK_M, BLOCK_N]
    ds = p * (dp - delta[:, None])
    db += tl.sum(ds, 0)
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    dk += _dot(tl.trans(ds.to(q.dtype)), q, UPCAST)
    return dk, dv, db


@triton.jit(do_not_specialize=_SIZES + ("N_HEADS", "H_OUT"))
def dma_bwd_dkdv_kernel(
    Qp, Kp, Vp, Bp, Mp, DO, Lse, Delta, DK, DV, DB, Idx, Cnt, TV, TI, Dth,
    sqb, sqm, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd,
    sbb, sbh, sbm, sbn, smb, smh, smm, smn, sdb, sdm, sdh, sdd,
    Q, K, H, GROUP, D: tl.constexpr, HB, HM, SEL_B, H_S, W, OCC_H, N_HEADS, H_OUT,
    scale, softcap,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_PER_QUERY: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_PER_QUERY: tl.constexpr, PATH: tl.constexpr,
    SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, WRITE_DKDV: tl.constexpr, WRITE_DB: tl.constexpr,
    BY_POSITION: tl.constexpr, TILES: tl.constexpr, QD=None, DOD=None, Q_DESC: tl.constexpr = False,
):
    """dk, dv (and the dbias partial, float32 (B, H, K), of a query-broadcast bias) of one tile of
    keys. Program (p, tile) covers query heads p*N_HEADS .. +N_HEADS-1 of batch p // (H/N_HEADS):
    with N_HEADS = GROUP it owns kv head g outright and writes DK/DV (B, K, H_OUT = H_kv, D); with
    N_HEADS = 1 it writes float32 per-head partials that are summed over the group afterwards:
    (B, K, H_OUT = H, D) by key on the LIST path with one list per query head, or with BY_POSITION
    (B * H, W, D) by list position when the group shares one list (``dkdv_gather_kernel``)."""
    # Grid (programs per tile, key tiles): every head's tile 0, which under causality meets the
    # most query blocks, is issued first.
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_progs_b = H // N_HEADS
    b = (pid_p // n_progs_b).to(tl.int64)
    h0 = (pid_p % n_progs_b) * N_HEADS
    g = (h0 // GROUP).to(tl.int64)
    h_out = (pid_p % n_progs_b).to(tl.int64)
    off = K - Q

    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    d_ok = offs_d < D
    row0 = (b * SEL_B + h0 * H_S // H).to(tl.int64)
    if PATH == _LIST:
        n_limit = W
        idx_row = row0 * W
    elif PATH == _PREFIX:  # the row's ever-alive keys, by death
        n_limit = tl.load(Cnt + row0)
        idx_row = row0 * K
    else:
        n_limit = K
        idx_row = 0
    offs_n, n_ok = _key_tile(Idx, idx_row, pid_n * BLOCK_N, n_limit, K, BLOCK_N, PATH, False)  # [BLOCK_N]
    # Every query head of the program shares row0's selection (N_HEADS > 1 only when the selection
    # rows do not split a kv head's group).
    death = _death(Dth, row0, K, offs_n, n_ok, PATH)
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = _kv_rows(Kp + b * skb + g * skh, offs_n, skn, n_ok, offs_d, skd, D, BLOCK_D, False)  # [BLOCK_N, BLOCK_D]
    v = _kv_rows(Vp + b * svb + g * svh, offs_n, svn, n_ok, offs_d, svd, D, BLOCK_D, False)
    # The first query that can see any of the tile's keys causally is the one of the smallest key;
    # on the PREFIX path the last one is just below the latest death.
    if IS_CAUSAL:
        first = tl.min(tl.where(n_ok, offs_n, K))
        m_lo = tl.maximum(first - off, 0) // BLOCK_M * BLOCK_M
    else:
        m_lo = 0
    m_hi = Q
    if PATH == _PREFIX:
        m_hi = tl.minimum(tl.maximum(tl.max(tl.where(n_ok, death, 0)) - off, 0), Q)
    # Query blocks [m_full, m_full_end) see every key of the tile (FULL path of _scores): the block's
    # first query is at or past the tile's last key, and on the PREFIX path the block's last real
    # query (min(start + BLOCK_M, Q) - 1) is still before the tile's first death. Before m_full keys
    # are being born, from m_full_end on they die: both edges are tested. FULL reads the keys' bias
    # unmasked, so a tile with padding (the list's or K's tail) takes the tested path throughout.
    if IS_CAUSAL:
        last = tl.max(tl.where(n_ok, offs_n, 0))
        m_full = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(last - off, 0), BLOCK_M) * BLOCK_M, m_lo), m_hi)
    else:
        m_full = m_lo
    m_full_end = m_hi
    if PATH == _PREFIX:
        first_death = tl.min(tl.where(n_ok, death, K)) - off  # as a query index
        m_full_end = tl.where(first_death >= Q, m_hi, tl.maximum(first_death, 0) // BLOCK_M * BLOCK_M)
        m_full_end = tl.minimum(tl.maximum(m_full_end, m_full), m_hi)
    all_real = tl.min(n_ok.to(tl.int32)) == 1
    m_full = tl.where(all_real, m_full, tl.maximum(m_hi, m_lo))
    m_full_end = tl.where(all_real, m_full_end, m_full)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for hh in range(0, N_HEADS):
        h = h0 + hh
        row = (b * SEL_B + h * H_S // H).to(tl.int64)
        bh = b * H + h
        bias_base = Bp + b * sbb + (h * HB // H).to(tl.int64) * sbh
        mask_base = Mp + b * smb + (h * HM // H).to(tl.int64) * smh
        q_base = Qp + b * sqb + h.to(tl.int64) * sqh
        do_base = DO + b * sdb + h.to(tl.int64) * sdh
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        if TILES:
            # Only the query blocks whose block x tile pair holds a visible pair (W of them per
            # tile, occupied first; tile_occupancy_kernel), all tested.
            at = (b * OCC_H + h * OCC_H // H) * tl.cdiv(K, BLOCK_N) + pid_n
            for i in range(0, tl.load(Cnt + at)):
                start_m = tl.load(Idx + at * W + i) * BLOCK_M
                dk, dv, db = _dkdv_tile(dk, dv, db, k, v, start_m, q_base, sqm, sqd, do_base, sdm, sdd, Lse, Delta,
                                        bh, TV, TI, row, offs_n, n_ok, offs_d, death, bias_base, sbm, sbn, mask_base,
                                        smm, smn, Q, off, scale, softcap, D, BLOCK_M, BLOCK_D, IS_CAUSAL, HAS_BIAS,
                                        BIAS_PER_QUERY, HAS_MASK, MASK_PER_QUERY, PATH, SOFTCAP, UPCAST, False,
                                        QD, DOD, b, h, Q_DESC)
        else:
            for start_m in range(m_lo, m_full, BLOCK_M):
                dk, dv, db = _dkdv_tile(dk, dv, db, k, v, start_m, q_base, sqm, sqd, do_base, sdm, sdd, Lse, Delta,
                                        bh, TV, TI, row, offs_n, n_ok, offs_d, death, bias_base, sbm, sbn, mask_base,
                                        smm, smn, Q, off, scale, softcap, D, BLOCK_M, BLOCK_D, IS_CAUSAL, HAS_BIAS,
                                        BIAS_PER_QUERY, HAS_MASK, MASK_PER_QUERY, PATH, SOFTCAP, UPCAST, False,
                                        QD, DOD, b, h, Q_DESC)
            for start_m in range(m_full, m_full_end, BLOCK_M):
                dk, dv, db = _dkdv_tile(dk, dv, db, k, v, start_m, q_base, sqm, sqd, do_base, sdm, sdd, Lse, Delta,
                                        bh, TV, TI, row, offs_n, n_ok, offs_d, death, bias_base, sbm, sbn, mask_base,
                                        smm, smn, Q, off, scale, softcap, D, BLOCK_M, BLOCK_D, IS_CAUSAL, HAS_BIAS,
                                        BIAS_PER_QUERY, HAS_MASK, MASK_PER_QUERY, PATH, SOFTCAP, UPCAST, True,
                                        QD, DOD, b, h, Q_DESC)
            if PATH == _PREFIX:  # the blocks where some of the tile's keys have died
                for start_m in range(m_full_end, m_hi, BLOCK_M):
                    dk, dv, db = _dkdv_tile(dk, dv, db, k, v, start_m, q_base, sqm, sqd, do_base, sdm, sdd, Lse,
                                            Delta, bh, TV, TI, row, offs_n, n_ok, offs_d, death, bias_base, sbm, sbn,
                                            mask_base, smm, smn, Q, off, scale, softcap, D, BLOCK_M, BLOCK_D,
                                            IS_CAUSAL, HAS_BIAS, BIAS_PER_QUERY, HAS_MASK, MASK_PER_QUERY, PATH,
                                            SOFTCAP, UPCAST, False, QD, DOD, b, h, Q_DESC)
        if WRITE_DB:
            tl.store(DB + bh.to(tl.int64) * K + offs_n, db, mask=n_ok)
    if WRITE_DKDV:
        if BY_POSITION:
            out_rows = pid_p.to(tl.int64) * W + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
        else:
            out_rows = (b * K + offs_n[:, None].to(tl.int64)) * H_OUT + h_out
        tl.store(DK + out_rows * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + out_rows * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=("K", "W", "H", "GROUP", "SEL_B", "H_S"))
def dkdv_gather_kernel(PartK, PartV, Idx, DK, DV, K, W, H, GROUP, SEL_B, H_S, D: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (batch x kv head, block of list positions): sums the group's float32 per-head
    partials (B * H, W, D) of ``dma_bwd_dkdv_kernel`` (BY_POSITION) in head order and writes each
    position's key row of DK/DV (B, K, H_kv, D); padding positions (the sentinel K) are skipped."""
    pid_bg = tl.program_id(0)
    H_kv = H // GROUP
    b = (pid_bg // H_kv).to(tl.int64)
    g = pid_bg % H_kv
    row = b * SEL_B + (g * GROUP * H_S // H)  # the selection row the group shares
    pos = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    keys = tl.load(Idx + row * W + pos, mask=pos < W, other=K)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (keys < K)[:, None] & (offs_d < D)[None, :]
    acc_k = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for j in range(0, GROUP):
        rows = (b * H + g * GROUP + j) * W + pos.to(tl.int64)  # [BLOCK_P]
        acc_k += tl.load(PartK + rows[:, None] * D + offs_d[None, :], mask=ok, other=0.0)
        acc_v += tl.load(PartV + rows[:, None] * D + offs_d[None, :], mask=ok, other=0.0)
    out = ((b * K + keys.to(tl.int64)) * H_kv + g)[:, None] * D + offs_d[None, :]
    tl.store(DK + out, acc_k.to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + out, acc_v.to(DV.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=_SIZES + ("NT", "NT_PER"))
def tile_occupancy_kernel(Bp, Mp, TV, TI, Occ, sbb, sbh, sbm, sbn, smb, smh, smm, smn,
                          Q, K, H, HB, HM, SEL_B, H_S, OCC_H, NT, NT_PER, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr,
                          IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_PER_QUERY: tl.constexpr,
                          HAS_MASK: tl.constexpr, MASK_PER_QUERY: tl.constexpr, PATH: tl.constexpr):
    """Program (batch x occupancy head, query block, run of NT_PER tiles): for each of its key
    tiles (NT in all), whether any of its (query, key) pairs is visible (the kernels' own test:
    causality, per-query mask, threshold), int8 into Occ (B * OCC_H, query blocks, NT). Query heads that read the same mask, bias and
    threshold rows share an occupancy head (see ``_Launch``): this runs for the first head of each.
    One pass over a per-query bias or mask; the attention kernels then visit only occupied tiles
    (TILES)."""
    pid_bo = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bo // OCC_H).to(tl.int64)
    h = pid_bo % OCC_H * (H // OCC_H)
    off = K - Q
    row = (b * SEL_B + h * H_S // H).to(tl.int64)
    bias_base = Bp + b * sbb + (h * HB // H).to(tl.int64) * sbh
    mask_base = Mp + b * smb + (h * HM // H).to(tl.int64) * smh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    m_ok = offs_m < Q
    tv = tl.zeros([BLOCK_M], dtype=tl.float32)
    ti = tl.zeros([BLOCK_M], dtype=tl.int32)
    if PATH == _THRESHOLD:
        tv = tl.load(TV + row * Q + offs_m, mask=m_ok, other=float("-inf"))
        ti = tl.load(TI + row * Q + offs_m, mask=m_ok, other=0)
    out = Occ + (pid_bo.to(tl.int64) * tl.num_programs(1) + pid_m) * NT
    for t in range(tl.program_id(2) * NT_PER, tl.minimum(NT, (tl.program_id(2) + 1) * NT_PER)):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        vis, _ = _visibility(offs_m, offs_n, m_ok, offs_n < K, bias_base, sbm, sbn, mask_base, smm, smn, tv, ti,
                             offs_n, off, IS_CAUSAL, HAS_BIAS, BIAS_PER_QUERY, HAS_MASK, MASK_PER_QUERY, PATH, False)
        tl.store(out + t, tl.max(tl.max(vis.to(tl.int8), 1), 0))


@triton.jit(do_not_specialize=_SIZES + ("NSPLIT", "CHUNK"))
def dma_fwd_split_kernel(
    Qp, Kp, Vp, Bp, PartO, PartM, PartL, Idx,
    sqb, sqm, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd, sbb, sbh, sbm, sbn,
    Q, K, H, GROUP, D: tl.constexpr, HB, SEL_B, H_S, W, NSPLIT, CHUNK,
    scale, softcap,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
):
    """Few queries (decode), LIST path: program (split s, batch b, kv head g) takes the GROUP * Q
    (query head, query) rows of kv head g as one tile (they share the list and every gathered key
    and value row) over list entries s*CHUNK .. +CHUNK-1, and writes the unnormalised partial
    output, row max (base 2) and row sum; ``dma_fwd_combine_kernel`` merges the splits. Spreading one list
    over many programs is what keeps a single query from running on a handful of SMs."""
    pid_s = tl.program_id(0)
    pid_bg = tl.program_id(1)
    H_kv = H // GROUP
    b = (pid_bg // H_kv).to(tl.int64)
    g = pid_bg % H_kv
    off = K - Q
    row = (b * SEL_B + g * GROUP * H_S // H).to(tl.int64)  # the group's shared selection row

    r = tl.arange(0, BLOCK_M)  # [BLOCK_M] rows: (head g*GROUP + r // Q, query r % Q)
    r_ok = r < GROUP * Q
    h = (g * GROUP + r // Q).to(tl.int64)
    i = (r % Q).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    d_ok = offs_d < D
    q = tl.load(Qp + b * sqb + h[:, None] * sqh + i[:, None] * sqm + offs_d[None, :] * sqd,
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    bias_rows = Bp + b * sbb + (h * HB // H) * sbh + i * sbm  # [BLOCK_M]

    # The whole list: padding entries (the sentinel K) are masked per key, causality per element.
    end = tl.minimum(pid_s * CHUNK + CHUNK, W)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(pid_s * CHUNK, end, BLOCK_N):
        offs_n, n_ok = _key_tile(Idx, row * W, start, end, K, BLOCK_N, _LIST, False)  # [BLOCK_N]
        k = _kv_rows(Kp + b * skb + g * skh, offs_n, skn, n_ok, offs_d, skd, D, BLOCK_D, False)  # [BLOCK_N, BLOCK_D]
        s, _ = _base2_scores(_dot(q, tl.trans(k), UPCAST), scale, softcap, SOFTCAP)  # [BLOCK_M, BLOCK_N]
        vis = r_ok[:, None] & n_ok[None, :]
        if IS_CAUSAL:
            vis = vis & (offs_n[None, :] <= i[:, None] + off)
        if HAS_BIAS:
            braw = tl.load(bias_rows[:, None] + offs_n[None, :] * sbn, mask=vis, other=0.0)
            s = s + braw.to(tl.float32) * LOG2E
        s = tl.where(vis, s, float("-inf"))
        p, alpha, m_new, l_i = _online_softmax(s, m_i, l_i)  # p: [BLOCK_M, BLOCK_N]
        v = _kv_rows(Vp + b * svb + g * svh, offs_n, svn, n_ok, offs_d, svd, D, BLOCK_D, False)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
        m_i = m_new

    part = (pid_s * (tl.num_programs(1) * GROUP * Q) + pid_bg * GROUP * Q + r).to(tl.int64)  # [BLOCK_M]
    tl.store(PartO + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=r_ok[:, None])
    tl.store(PartM + part, m_i, mask=r_ok)
    tl.store(PartL + part, l_i, mask=r_ok)


@triton.jit
def dma_fwd_combine_kernel(PartO, PartM, PartL, Out, Lse, ROWS, Q, H, GROUP, sob, som, soh, sod,
                           D: tl.constexpr, NSPLIT: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program x: row x = ((b * H_kv + g) * GROUP + head in group) * Q + query of the split
    kernel; merges its NSPLIT partials (a split that saw no key has m = -inf and l = 0)."""
    x = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, NSPLIT)  # [NSPLIT]
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.load(PartM + sp * ROWS + x)  # [NSPLIT]
    l = tl.load(PartL + sp * ROWS + x)
    m_all = tl.max(m, 0)
    m_use = tl.where(m_all == float("-inf"), 0.0, m_all)
    wgt = tl.exp2(m - m_use)  # [NSPLIT]; m is in base 2
    l_all = tl.sum(l * wgt, 0)
    acc = tl.sum(tl.load(PartO + (sp[:, None] * ROWS + x) * BLOCK_D + offs_d[None, :]) * wgt[:, None], 0)
    has_keys = l_all > 0.0
    out = acc / tl.where(has_keys, l_all, 1.0)  # [BLOCK_D]
    lse = tl.where(has_keys, (m_use + tl.log2(tl.where(has_keys, l_all, 1.0))) * LN2, float("-inf"))
    b = x // (H * Q)
    h = x // Q % H  # rows of one batch run over (g, head in group) = query head h, then query
    i = x % Q
    tl.store(Out + b * sob + h * soh + i * som + offs_d * sod, out.to(Out.dtype.element_ty), mask=offs_d < D)
    tl.store(Lse + (b * H + h) * Q + i, lse)


@triton.jit(do_not_specialize=("Q", "H"))
def dma_bwd_preprocess_kernel(Out, DO, Delta, sob, som, soh, sod, sdb, sdm, sdh, sdd, Q, H, D: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """delta = rowsum(dO * O) in float32, (B, H, Q), read once in the inputs' dtype (no float32
    copies of O and dO).

    Taken from the diagonal of the same dot the dq and dk/dv kernels use for dP = dO V^T, so that
    both sum over D in one order: where a row's probability sits on one key (window 1, or a single
    candidate), O equals that key's V row and dS = P (dP - delta) cancels to exactly 0 instead of
    to rounding noise, which the dbias reduction over many rows would otherwise add up (seen on the
    H200 in float32: 2e-5 for a gradient that is exactly 0)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < Q)[:, None] & (offs_d < D)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(Out + b * sob + h * soh + rows * som + offs_d[None, :] * sod, mask=ok, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows * sdm + offs_d[None, :] * sdd, mask=ok, other=0.0)
    dd = _dot(do, tl.trans(o), UPCAST)  # [BLOCK_M, BLOCK_M]
    diag = tl.arange(0, BLOCK_M)[:, None] == tl.arange(0, BLOCK_M)[None, :]
    delta = tl.sum(tl.where(diag, dd, 0.0), 1)  # [BLOCK_M]
    tl.store(Delta + pid_bh.to(tl.int64) * Q + offs_m, delta, mask=offs_m < Q)


def _broadcast_strides(t: torch.Tensor) -> list[int]:
    """A bias's or mask's strides with 0 on its size-1 batch and query dims, so one kernel serves
    every broadcast form (the head is picked by index, h * heads // H)."""
    s = list(t.stride())
    for d in (0, 2):
        if t.shape[d] == 1:
            s[d] = 0
    return s


_PLACEHOLDERS: dict = {}


def _placeholders(dev: torch.device):
    """One-element int32 and float32 tensors standing in for absent metadata (never read), made
    once per device: allocating them per call showed in the host time of decode."""
    if dev not in _PLACEHOLDERS:
        _PLACEHOLDERS[dev] = (torch.zeros(1, dtype=torch.int32, device=dev),
                              torch.zeros(1, dtype=torch.float32, device=dev))
    return _PLACEHOLDERS[dev]


def _occupied_first(occ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Along the last dim of an int8 occupancy: the indices, occupied ones first in ascending
    order (a stable sort), int32, and how many are occupied, int32."""
    order = torch.sort(occ, dim=-1, descending=True, stable=True).indices.to(torch.int32).contiguous()
    return order, occ.sum(-1, dtype=torch.int32).contiguous()


class _Launch:
    """The arguments every kernel shares for one call: tensors or placeholders, strides, sizes,
    the selection metadata and the compile-time flags."""

    def __init__(self, p, q, k, v, bias, mask, sel=None):
        self.p = p
        self.sel = sel if sel is not None else _selection(p, bias, mask)
        ints, floats = _placeholders(q.device)
        sel = self.sel
        self.ints = ints
        self.tv = sel.tv if sel.tv is not None else floats
        self.ti = sel.ti if sel.ti is not None else ints
        self.death = sel.death if sel.death is not None else ints
        self.bias = bias if bias is not None else q
        self.mask = mask if mask is not None else ints
        self.q, self.k, self.v = q, k, v
        self.strides = [*q.stride(), *k.stride(), *v.stride(),
                        *(_broadcast_strides(bias) if bias is not None else [0] * 4),
                        *(_broadcast_strides(mask) if mask is not None else [0] * 4)]
        self.sizes = dict(Q=p.Q, K=p.K, H=p.H, GROUP=p.H // p.H_kv, D=p.D,
                          HB=1 if bias is None else bias.shape[1], HM=1 if mask is None else mask.shape[1],
                          SEL_B=sel.H_s if sel.B_s > 1 else 0, H_S=sel.H_s)
        self.flags = dict(BLOCK_D=_head_block(p.D), IS_CAUSAL=p.is_causal, HAS_BIAS=bias is not None,
                          BIAS_PER_QUERY=bias is not None and bias.shape[2] > 1, HAS_MASK=mask is not None,
                          MASK_PER_QUERY=mask is not None and mask.shape[2] > 1, PATH=sel.path,
                          SOFTCAP=p.softcap is not None, UPCAST=INTERPRETED)
        # A per-query (4-D) mask, or a window over a per-query bias or mask: the kernels visit only
        # the tiles that hold a visible pair (tile_occupancy_kernel), not every causal tile.
        self.flags["TILES"] = sel.path == THRESHOLD or (sel.path == DENSE and self.flags["MASK_PER_QUERY"])
        # Occupancy heads: query head h reads mask head h*HM//H, bias head h*HB//H and threshold row
        # h*H_S//H, each count in {1, H_kv, H}, so the largest count that matters partitions the
        # heads into classes that see the same tiles (a mask shared by all heads: one pass, not H).
        occ_h = self.sizes["HM"] if mask is not None else 1
        if sel.path == THRESHOLD:
            occ_h = max(occ_h, self.sizes["H_S"], self.sizes["HB"] if bias is not None else 1)
        self.sizes["OCC_H"] = occ_h
        self.scalars = dict(scale=p.scale, softcap=p.softcap or 1.0)
        self._occupancy = {}

    def occupancy(self, block_m: int, block_n: int) -> torch.Tensor:
        """int8 (B * OCC_H, cdiv(Q, block_m), cdiv(K, block_n)): whether each query block x key tile
        holds a visible pair (TILES calls only; one pass over the bias/mask per tiling, cached)."""
        key = (block_m, block_n)
        if key not in self._occupancy:
            p = self.p
            nblk, nt = triton.cdiv(p.Q, block_m), triton.cdiv(p.K, block_n)
            occ_h = self.sizes["OCC_H"]
            occ = torch.empty(p.B * occ_h, nblk, nt, dtype=torch.int8, device=self.q.device)
            f = self.flags
            # Runs of tiles per program: with one occupancy head a whole row of tiles per program
            # gave 64 programs at Q = 8192, each walking 128 tiles one after another (0.59 ms on an
            # H200 for a 64 MB mask); runs of 8 tiles give every SM several programs. Under the
            # interpreter runs of 2, so the tests' few tiles still span several runs.
            nt_per = 2 if INTERPRETED else 8
            tile_occupancy_kernel[(p.B * occ_h, nblk, triton.cdiv(nt, nt_per))](
                self.bias, self.mask, self.tv, self.ti, occ, *self.strides[12:], p.Q, p.K, p.H,
                self.sizes["HB"], self.sizes["HM"], self.sizes["SEL_B"], self.sizes["H_S"], occ_h, nt, nt_per,
                BLOCK_M=block_m, BLOCK_N=block_n, IS_CAUSAL=f["IS_CAUSAL"], HAS_BIAS=f["HAS_BIAS"],
                BIAS_PER_QUERY=f["BIAS_PER_QUERY"], HAS_MASK=f["HAS_MASK"], MASK_PER_QUERY=f["MASK_PER_QUERY"],
                PATH=f["PATH"])
            self._occupancy[key] = occ
        return self._occupancy[key]


    def query_lists(self, block_m: int, block_n: int) -> dict:
        """The key lists the forward and dq kernels walk for query blocks of ``block_m``: Idx, Cnt
        (per selection row and query block), W (entries per list) and NBLK.
        LIST: the row's list, and in Cnt the prefix each block can see; PREFIX: each block's
        alive keys, and in Cnt their count and how many of them lead the list visible to the whole
        block; TILES: per (batch x occupancy head, query block) its key tiles of ``block_n``,
        occupied first, and how many are occupied; placeholders on the other paths. BL: on the
        PREFIX path with a bias, the listed keys' bias values slot for slot (a placeholder
        elsewhere), which the PREFIX tiles read contiguously."""
        p, sel = self.p, self.sel
        if self.flags["TILES"]:
            order, cnt = _occupied_first(self.occupancy(block_m, block_n))
            return dict(Idx=order, Cnt=cnt, W=order.shape[-1], NBLK=order.shape[1], BL=self.ints)
        if sel.path == LIST:
            cnt = topk.list_counts(sel.idx, p.Q, p.K, block_m, p.is_causal)
            return dict(Idx=sel.idx, Cnt=cnt, W=sel.idx.shape[-1], NBLK=cnt.shape[-1], BL=self.ints)
        if sel.path == PREFIX:
            sb = self.strides[12:16]
            bias = (self.bias, sb[0], sb[1], sb[3], sel.H_s) if self.flags["HAS_BIAS"] else None
            idx, cnt, bl = block_lists(sel.death.view(-1, p.K), p.Q, p.effective_window, block_m, bias)
            return dict(Idx=idx, Cnt=cnt, W=idx.shape[-1], NBLK=cnt.shape[1], BL=bl if bl is not None else self.ints)
        return dict(Idx=self.ints, Cnt=self.ints, W=0, NBLK=1, BL=self.ints)

    def key_tiles(self, block_m: int, block_n: int) -> dict:
        """The keys the dk/dv kernel tiles: Idx, Cnt, W, and how many keys to cover (n_keys).
        LIST: the row's list; PREFIX: the row's ever-alive keys (Cnt: how many per row);
        contiguous keys otherwise, with TILES per (batch x occupancy head, key tile of ``block_n``) its query
        blocks of ``block_m``, occupied first, and how many are occupied."""
        p, sel = self.p, self.sel
        if self.flags["TILES"]:
            order, cnt = _occupied_first(self.occupancy(block_m, block_n).transpose(1, 2))
            return dict(Idx=order, Cnt=cnt, W=order.shape[-1]), p.K
        if sel.path == LIST:
            return dict(Idx=sel.idx, Cnt=self.ints, W=sel.idx.shape[-1]), sel.idx.shape[-1]
        if sel.path == PREFIX:
            order, alive = alive_order(sel.death.view(-1, p.K), p.effective_window, block_n)
            return dict(Idx=order, Cnt=alive, W=0), p.K
        return dict(Idx=self.ints, Cnt=self.ints, W=0), p.K


def _selection(p, bias, mask):
    return make_selection(bias, mask, window=p.effective_window, K=p.K, Q=p.Q, scope=p.topk_scope,
                          is_causal=p.is_causal)


def forward(p, q, k, v, bias, mask, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Fills ``out`` (B, Q, H, D) and ``lse`` (B, H, Q) float32, both contiguous. ``p`` is the
    call's Problem (sizes, scale, softcap, causality, window and scope)."""
    sel = _selection(p, bias, mask)
    if sel.path == LIST and p.Q * (p.H // p.H_kv) <= _SPLIT_ROWS and sel.H_s <= p.H_kv:
        _forward_split(p, sel, q, k, v, bias, out, lse)
        return
    a = _Launch(p, q, k, v, bias, mask, sel)
    cfg = launch_config(p.D, q.element_size(), "fwd", sel.path)
    bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    if COMPACT_PREFIX and a.sel.path == PREFIX:
        lists, compact = _compact_prefix(a, bm, bn)
    else:
        lists = a.query_lists(bm, bn)
        if COMPACT_LIST and a.sel.path == LIST:
            compact = _compact_lists(a, bn)
        else:
            compact = dict(KC=a.ints, VC=a.ints, BC=a.ints, CH=1, WC=0)
    grid = (p.B * p.H, triton.cdiv(p.Q, bm))
    dma_fwd_kernel[grid](
        q, k, v, a.bias, a.mask, out, lse, lists.pop("Idx"), lists.pop("Cnt"), a.tv, a.ti, a.death,
        *a.strides, *out.stride(), **a.sizes, **lists, **a.scalars, **compact, BLOCK_M=bm, BLOCK_N=bn, **a.flags,
        **cfg)


# The forward of a LIST call reads keys, values and bias values from contiguous copies of the
# selected rows (``_compact_lists``) instead of gathering them through the indices in every tile.
# The copies cost one gather launch and 2 * B * CH * WC * D elements (+ B * CH * WC bias values)
# per call: T32k (B 1, H_kv 8, w 2048, D 128, bf16) 8 MB, 0.03 ms. Measured on an H200 (bf16,
# H 32, H_kv 8, D 128, causal, global scope, end to end from the bias, alternating runs;
# benchmarks/results/compact-ab-h200-2026-11-28.json): T32k 2.00 ms gathering, 1.41 ms compact
# with TMA descriptors, 1.59 ms compact with pointer loads; T8k 0.336 / 0.255-0.290 / 0.277 ms.
# Outputs are bitwise equal to the gathering forward's (same tiles, same arithmetic order).
COMPACT_LIST = True
# Whether the compact forward and dq load key and value tiles, and the dk/dv kernel its q and dO
# tiles (``_row_descriptors``), through tensor descriptors (TMA on sm_90): None picks them on CUDA
# devices of compute capability 9 or more when D is a power of two >= 16 (a descriptor's block
# must span the row); True/False force it (the interpreter runs both).
COMPACT_DESC = None


# The dq kernel of a LIST call reads keys, values and bias values from the same compact copies
# (``_compact_lists`` for the dq launch's BLOCK_N, built again in the backward: the forward's are
# not kept, and its BLOCK_N may differ) instead of gathering them through the indices in every tile,
# like the forward (COMPACT_LIST). dq is bitwise equal to the gathering dq's (tests/
# test_triton_compact_dq.py). Measured on an H200 (bf16, H 32, H_kv 8, D 128, causal, global scope,
# fwd+bwd from the bias, alternating rounds; benchmarks/results/compact-dq-ab-h200-2026-11-28.json,
# ``benchmarks/compact_ab.py --kernel dq``): T32k 8.07 / 8.11 ms gathering, 7.70 / 7.72 compact
# with descriptors, 7.88 / 7.88 compact with pointer loads; T8k 1.84-2.73 ms for all three (host-
# bound at that size, the rounds' spread covers any difference). All gradients bitwise equal.
COMPACT_DQ = True


# The forward of a PREFIX call (visible scope) reads keys, values and bias values from contiguous
# copies too (``_compact_prefix``). A block's alive keys overlap its neighbours' almost entirely, so
# the copies are per super-block of SBG query blocks (``prefix.superblock_lists``): the keys alive
# at its start by death, then those born inside it by position, so that each query block sees one
# contiguous range of its super-block's list: a tested head (keys dying inside the block), a FULL
# middle and a tested tail (keys born inside it), plus a tested range of the keys born and dying
# inside the super-block. T32k (w 2048, 128-query blocks, super-blocks of
# 16 blocks): 16 lists of about 2300 keys per row, 8 rows: about 150 MB of copies, in place of the
# per-block lists (0.26 ms on an H200) and a kernel that gathered every key row through an index.
# Measured on an H200 (bf16, H 32, H_kv 8, D 128, causal, visible scope, forward from the bias,
# alternating rounds; benchmarks/results/visible-ab-h200-2026-11-28.json, benchmarks/visible_ab.py):
# T32k 5.12 / 5.13 ms gathering, 4.85 / 4.83 compact with descriptors, 5.42 / 5.43 with pointer
# loads; T8k 1.55 / 1.45 gathering, 2.32 / 2.19 compact. The forward kernel itself went from 4.0 to
# 3.7 ms at T32k (torch.profiler), so the gather was not most of its time; off until it wins at
# both sizes. The tests run it (tests/test_triton_prefix_compact.py).
COMPACT_PREFIX = False
# Queries per super-block (None: the window); see ``prefix.superblock_size``.
PREFIX_SUPERBLOCK = None


def _compact_prefix(a: "_Launch", bm: int, bn: int) -> tuple[dict, dict]:
    """The forward's lists and compact buffers of a PREFIX call for query blocks of ``bm`` and key
    tiles of ``bn``: the super-block lists (Idx), each block's ranges in them (Cnt), and per (batch,
    compact head, super-block) the key and value rows KC, VC and bias values BC of its list, WC
    rows each, with ``bn`` zero rows after each list's count (a tested tile never reads further)."""
    p, sel, q = a.p, a.sel, a.q
    g = superblock_size(p.effective_window, bm, PREFIX_SUPERBLOCK)
    idx, nl, meta = superblock_lists(sel.death.view(-1, p.K), p.Q, p.effective_window, bm, g)
    rows_s, nsb, lw = idx.shape
    wc = triton.cdiv(lw, bn) * bn
    ch = _compact_heads(p.H, p.H_kv, sel.H_s)
    rows = p.B * ch * nsb
    kv = torch.empty(2, rows * wc, p.D, dtype=q.dtype, device=q.device)
    has_bias = a.flags["HAS_BIAS"]
    bc = torch.empty(rows * wc, dtype=a.bias.dtype, device=q.device) if has_bias else a.ints
    block_p = 32 if INTERPRETED else 64
    sb = a.strides[12:16]
    compact_gather_kernel[(p.B * ch, triton.cdiv(wc, block_p), nsb)](
        a.k, a.v, a.bias, idx, kv[0], kv[1], bc, *a.strides[4:12], sb[0], sb[1], sb[3],
        p.K, lw, wc, p.H, ch, p.H // p.H_kv, a.sizes["HB"], a.sizes["SEL_B"], a.sizes["H_S"],
        D=p.D, BLOCK_P=block_p, BLOCK_D=_head_block(p.D), HAS_BIAS=has_bias, NL=nl, NSB=nsb, PAD=bn, COUNTED=True)
    kc, vc = kv[0], kv[1]
    use_desc = _use_desc(q, p.D) and rows * wc < 2**31
    if use_desc:
        from triton.tools.tensor_descriptor import TensorDescriptor
        kc = TensorDescriptor.from_tensor(kc, block_shape=[bn, p.D])
        vc = TensorDescriptor.from_tensor(vc, block_shape=[bn, p.D])
    lists = dict(Idx=idx, Cnt=meta, W=lw, NBLK=meta.shape[1], BL=a.ints)
    compact = dict(KC=kc, VC=vc, BC=bc, CH=ch, WC=wc, NSB=nsb, SBG=g, COMPACT=True, USE_DESC=use_desc)
    return lists, compact


def _compact_heads(H: int, H_kv: int, H_s: int) -> int:
    """Compact heads: the fewest classes of query heads that share a selection row and a kv head
    (bias heads are among 1, H_kv, H and never outnumber the selection heads). Head counts are
    among 1, H_kv, H, so H_kv classes suffice unless the selection has one row per query head."""
    return H if H_s == H else H_kv


def _use_desc(q: torch.Tensor, D: int) -> bool:
    if COMPACT_DESC is not None:
        return COMPACT_DESC and D == _head_block(D)
    return (q.device.type == "cuda" and D == _head_block(D)
            and topk._properties(q.device.index).major >= 9)


# Whether the dk/dv kernel loads its q and dO tiles through tensor descriptors (``_row_descriptors``).
# Off: fewer instructions per tile in the SASS, but slower on the GPU. Measured on an H200 (bf16,
# H 32, H_kv 8, D 128, causal, fwd+bwd from the bias, two alternating rounds against the pointer
# loads; benchmarks/results/triton-ab-h200-2026-11-29.json): T32k global 7.83 / 7.82 ms with pointer
# loads, 8.25 / 8.26 with descriptors. The tests run both (tests/test_triton_dkdv_desc.py).
DKDV_DESC = False


def _row_descriptors(q: torch.Tensor, dout: torch.Tensor, block_m: int, D: int) -> dict:
    """The dk/dv kernel's q and dO tiles through 4-D tensor descriptors (block [1, block_m, 1, D]):
    where ``_use_desc`` allows them and both tensors meet TMA's rules (last dim contiguous, the
    other strides positive and 16-byte multiples, the base 16-byte aligned; an expanded dO, stride
    0, keeps the pointer loads); otherwise the kernel's pointer loads (Q_DESC False).

    Each q/dO tile is then one TMA copy instead of per-row cp.async copies and their 64-bit
    address arithmetic. sm_90a SASS with Triton 3.6 (benchmarks/triton_sass.py, T-like bf16
    D 128): the global scope's FULL loop went from 805 to 728 instructions per 128 x 64 step (its
    tested loop 1020 to 954, stack 528 to 176 bytes), the visible scope's (64 x 64) from 812 to
    727 (tested 1042 to 1064). Triton 3.9 gives 923 -> 754 and 902 -> 738."""
    ok = DKDV_DESC and _use_desc(q, D) and all(
        t.stride(-1) == 1 and t.data_ptr() % 16 == 0
        and all(st > 0 and st * t.element_size() % 16 == 0 for st in t.stride()[:-1])
        for t in (q, dout))
    if not ok:
        return dict(Q_DESC=False)
    from triton.tools.tensor_descriptor import TensorDescriptor
    block = [1, block_m, 1, D]
    return dict(QD=TensorDescriptor.from_tensor(q, block_shape=block),
                DOD=TensorDescriptor.from_tensor(dout, block_shape=block), Q_DESC=True)


def _compact_lists(a: "_Launch", bn: int) -> dict:
    """The compact buffers of a LIST call for key tiles of ``bn``: per (batch, compact head) its
    list's key and value rows KC, VC ((rows, D) in the input dtype) and bias values BC (the bias
    dtype), WC = W rounded up to ``bn`` rows each, so no tile crosses into the next list; zeros at
    padding. One launch of ``compact_gather_kernel`` fills all three."""
    p, sel, q = a.p, a.sel, a.q
    W = sel.idx.shape[-1]
    wc = triton.cdiv(W, bn) * bn
    ch = _compact_heads(p.H, p.H_kv, sel.H_s)
    rows = p.B * ch
    kv = torch.empty(2, rows * wc, p.D, dtype=q.dtype, device=q.device)
    has_bias = a.flags["HAS_BIAS"]
    bc = torch.empty(rows * wc, dtype=a.bias.dtype, device=q.device) if has_bias else a.ints
    block_p = 32 if INTERPRETED else 64
    bd = _head_block(p.D)
    sb = a.strides[12:16]
    compact_gather_kernel[(rows, triton.cdiv(wc, block_p))](
        a.k, a.v, a.bias, sel.idx, kv[0], kv[1], bc, *a.strides[4:12], sb[0], sb[1], sb[3],
        p.K, W, wc, p.H, ch, p.H // p.H_kv, a.sizes["HB"], a.sizes["SEL_B"], a.sizes["H_S"],
        D=p.D, BLOCK_P=block_p, BLOCK_D=bd, HAS_BIAS=has_bias, NL=a.ints)
    kc, vc = kv[0], kv[1]
    use_desc = _use_desc(q, p.D) and rows * wc < 2**31
    if use_desc:
        from triton.tools.tensor_descriptor import TensorDescriptor
        kc = TensorDescriptor.from_tensor(kc, block_shape=[bn, p.D])
        vc = TensorDescriptor.from_tensor(vc, block_shape=[bn, p.D])
    return dict(KC=kc, VC=vc, BC=bc, CH=ch, WC=wc, COMPACT=True, USE_DESC=use_desc)


# dk/dv of a LIST call whose group of query heads shares one list: one program per (query head,
# tile of the list) writing float32 partials by list position, which dkdv_gather_kernel sums over
# the group in head order and writes to the keys, instead of one program per (kv head, tile) that
# loops over the group. That is GROUP times the programs (T32k: 1024 instead of 256, T8k: 512
# instead of 128, for 132 SMs holding two each), so the heaviest tiles no longer set the time
# alone, for 2 x B * H * w * D float32 of partials (67 MB at T32k). Measured on an H200 (bf16,
# global scope, fwd+bwd, alternating runs; benchmarks/results/triton-ab-h200-2026-11-28-session4.log):
# T32k 8.82 / 8.75 ms off against 8.72 / 8.69 on, T8k 2.18 / 2.01 off against 2.20 / 2.20 on. The
# partials' traffic eats what the parallelism gains, so it stays off. The tests run both ways.
SPLIT_GROUP_DKDV = False

# The split (decode) forward takes a kv head's GROUP * Q rows as one tile up to this many rows.
_SPLIT_ROWS = 64


def _split_count(dev: torch.device, tiles: int, programs: int) -> int:
    """How many programs share one list: enough for about two per SM, at most one per key tile.
    Under the interpreter a fixed 3, so the tests cover the merge of uneven splits."""
    if dev.type != "cuda":
        return max(1, min(3, tiles))
    return max(1, min(tiles, 2 * topk._sm_count(dev.index) // programs))


def _forward_split(p, sel, q, k, v, bias, out: torch.Tensor, lse: torch.Tensor) -> None:
    """The decode forward: split kernel, then combine. It reads only what these two launches need
    (not a ``_Launch``) and computes sizes with plain ints (``topk.cdiv``): at one query this is
    all host time, which the GPU does not hide."""
    group = p.H // p.H_kv
    bm = max(16, topk.next_power_of_2(p.Q * group))
    bn = 32 if INTERPRETED else 64
    width = sel.idx.shape[-1]
    nsplit = topk.next_power_of_2(_split_count(q.device, topk.cdiv(width, bn), p.B * p.H_kv))
    chunk = topk.cdiv(topk.cdiv(width, nsplit), bn) * bn
    bd = _head_block(p.D)
    rows = p.B * p.H * p.Q
    # One allocation for the three partials (each allocation shows in the host time of decode);
    # the kernels index them flat, so 1-D pieces do.
    n = nsplit * rows
    part = torch.empty(n * (bd + 2), dtype=torch.float32, device=q.device)
    part_o, part_m, part_l = part.split_with_sizes((n * bd, n, n))
    if bias is None:
        b_arg, b_strides, hb = q, (0, 0, 0, 0), 1
    else:
        b_arg, b_strides, hb = bias, _broadcast_strides(bias), bias.shape[1]
    dma_fwd_split_kernel[(nsplit, p.B * p.H_kv)](
        q, k, v, b_arg, part_o, part_m, part_l, sel.idx, *q.stride(), *k.stride(), *v.stride(), *b_strides,
        Q=p.Q, K=p.K, H=p.H, GROUP=group, D=p.D, HB=hb, SEL_B=sel.H_s if sel.B_s > 1 else 0, H_S=sel.H_s,
        W=width, NSPLIT=nsplit, CHUNK=chunk, scale=p.scale, softcap=p.softcap or 1.0, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_D=bd, IS_CAUSAL=p.is_causal, HAS_BIAS=bias is not None, SOFTCAP=p.softcap is not None,
        UPCAST=INTERPRETED, num_warps=4, num_stages=1 if INTERPRETED else 2)
    dma_fwd_combine_kernel[(rows,)](part_o, part_m, part_l, out, lse, rows, p.Q, p.H, group, *out.stride(),
                                    D=p.D, NSPLIT=nsplit, BLOCK_D=bd)


def _reduce_dbias(grad: torch.Tensor, shape) -> torch.Tensor:
    """Sums a float32 (B, H, Q|1, K) gradient to the bias's (B|1, H|H_kv|1, Q|1, K) shape in a fixed
    order (query head h came from bias head h // (H // heads))."""
    B, H, Qg, K = grad.shape
    Bb, Hb, Qb, _ = shape
    grad = grad.reshape(B, Hb, H // Hb, Qg, K).sum(2)
    if Qb == 1 and Qg > 1:
        grad = grad.sum(2, keepdim=True)
    if Bb == 1:
        grad = grad.sum(0, keepdim=True)
    return grad


def backward(p, dout, q, k, v, bias, mask, out, lse, dq, dk, dv, dbias) -> None:
    """Fills the gradients that are not None: dq (B, Q, H, D), dk and dv (B, K, H_kv, D), dbias in
    the bias's shape, all contiguous.

    Extra memory: float32 delta (B, H, Q); for a query-broadcast bias a float32 (B, H, K) dbias
    partial; for a per-query bias a float32 (B, H, Q, K) dS buffer (the one O(Q*K) buffer, only
    when dbias of a per-query bias is wanted); on the LIST path with one list per query head
    (bias or mask with H heads and H > H_kv), float32 (B, K, H, D) dk/dv partials, and with
    SPLIT_GROUP_DKDV float32 (2, B * H, w, D) partials by list position otherwise. The PREFIX path
    adds int32 per-block lists of at most w + BLOCK_M keys, (rows, cdiv(Q, BLOCK_M), w + BLOCK_M), and
    the rows' key order (rows, K); the forward needs only the lists.
    """
    a = _Launch(p, q, k, v, bias, mask)
    dev = q.device
    delta = torch.empty(p.B, p.H, p.Q, dtype=torch.float32, device=dev)
    dma_bwd_preprocess_kernel[(triton.cdiv(p.Q, 64), p.B * p.H)](
        out, dout, delta, *out.stride(), *dout.stride(), p.Q, p.H, D=p.D, BLOCK_M=64, BLOCK_D=_head_block(p.D),
        UPCAST=INTERPRETED)
    per_query_bias = a.flags["BIAS_PER_QUERY"]
    write_ds = dbias is not None and per_query_bias
    write_db = dbias is not None and not per_query_bias
    dbias_f32 = None

    if dq is not None or write_ds:
        cfg = launch_config(p.D, q.element_size(), "dq", a.sel.path)
        bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
        ds = torch.zeros(p.B, p.H, p.Q, p.K, dtype=torch.float32, device=dev) if write_ds else delta
        lists = a.query_lists(bm, bn)
        # The PREFIX dq tiles have no dS output either: that path's bias is query-broadcast.
        assert not (write_ds and a.sel.path == PREFIX), "PREFIX path with a per-query bias"
        if COMPACT_DQ and a.sel.path == LIST:
            # The LIST path's bias is query-broadcast (selection.py), so no dS per element is wanted:
            # the compact dq tile has no dS output.
            assert not write_ds and not per_query_bias, "LIST path with a per-query bias"
            compact = _compact_lists(a, bn)
        else:
            compact = dict(KC=a.ints, VC=a.ints, BC=a.ints, CH=1, WC=0)
        dma_bwd_dq_kernel[(p.B * p.H, triton.cdiv(p.Q, bm))](
            q, k, v, a.bias, a.mask, dout, lse, delta, dq if dq is not None else delta, ds,
            lists.pop("Idx"), lists.pop("Cnt"), a.tv, a.ti, a.death, *a.strides, *dout.stride(), **a.sizes,
            **lists, **a.scalars, **compact, BLOCK_M=bm, BLOCK_N=bn,
            **a.flags, WRITE_DQ=dq is not None, WRITE_DS=write_ds, **cfg)
        if write_ds:
            dbias_f32 = ds

    if dk is not None or dv is not None or write_db:
        cfg = launch_config(p.D, q.element_size(), "dkdv", a.sel.path)
        bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
        group = p.H // p.H_kv
        listed = a.sel.path in (LIST, PREFIX)
        # One list per query head of a group: programs per query head, summed over the group below.
        per_head = listed and a.sel.H_s > p.H_kv
        by_position = SPLIT_GROUP_DKDV and a.sel.path == LIST and not per_head and group > 1
        n_heads, h_out = (1, p.H) if per_head or by_position else (group, p.H_kv)
        if per_head:
            dk_buf = torch.zeros(p.B, p.K, p.H, p.D, dtype=torch.float32, device=dev)
            dv_buf = torch.zeros_like(dk_buf)
        else:
            dk_out = dk if dk is not None else torch.empty_like(k, memory_format=torch.contiguous_format)
            dv_out = dv if dv is not None else torch.empty_like(v, memory_format=torch.contiguous_format)
            if listed:  # keys in no list get no gradient, and no program visits them
                dk_out.zero_()
                dv_out.zero_()
            dk_buf, dv_buf = dk_out, dv_out
            if by_position:
                part = torch.empty(2, p.B * p.H, a.sel.idx.shape[-1], p.D, dtype=torch.float32, device=dev)
                dk_buf, dv_buf = part[0], part[1]
        # Every (b, h, key) of a contiguous tiling is written; a list leaves the other keys at 0.
        db = torch.zeros(p.B, p.H, p.K, dtype=torch.float32, device=dev) if write_db else delta
        tiles, n_keys = a.key_tiles(bm, bn)
        grid = (p.B * p.H // n_heads, triton.cdiv(n_keys, bn))
        qdesc = _row_descriptors(q, dout, bm, p.D)
        dma_bwd_dkdv_kernel[grid](
            q, k, v, a.bias, a.mask, dout, lse, delta, dk_buf, dv_buf, db, tiles.pop("Idx"), tiles.pop("Cnt"),
            a.tv, a.ti, a.death, *a.strides, *dout.stride(), **a.sizes, **tiles, N_HEADS=n_heads,
            H_OUT=h_out, **a.scalars,
            BLOCK_M=bm, BLOCK_N=bn, **a.flags, WRITE_DKDV=dk is not None or dv is not None,
            WRITE_DB=write_db, BY_POSITION=by_position, **qdesc, **cfg)
        if by_position and (dk is not None or dv is not None):
            width, bp = a.sel.idx.shape[-1], 32 if INTERPRETED else 64
            dkdv_gather_kernel[(p.B * p.H_kv, triton.cdiv(width, bp))](
                dk_buf, dv_buf, a.sel.idx, dk_out, dv_out, p.K, width, p.H, group, a.sizes["SEL_B"],
                a.sizes["H_S"], D=p.D, BLOCK_P=bp, BLOCK_D=_head_block(p.D))
        if per_head:
            for grad, buf in ((dk, dk_buf), (dv, dv_buf)):
                if grad is not None:
                    grad.copy_(buf.view(p.B, p.K, p.H_kv, group, p.D).sum(3))
        if write_db:
            dbias_f32 = db.unsqueeze(2)

    if dbias is not None:
        dbias.copy_(_reduce_dbias(dbias_f32, bias.shape))


# Every kernel above launches through the short path of launch.py.
launch.fast_all(globals())
