// Kernels of the CUDA visible-scope metadata (visible.h). Ports of the Triton backend's
// kernels/triton/prefix.py with the same definitions, so both backends list the same keys.
#pragma once

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <cstdint>

#include "dmattn/selection.h"
#include "select_keys.cuh"
#include "visible.h"

namespace dmattn {
namespace cuda {
namespace visible_detail {

constexpr int kRanks = kVisibleRanks;
constexpr unsigned kFull = 0xFFFFFFFFu;

// ---------------------------------------------------------------- step 1: rank keys

constexpr int kKeyThreads = 256;

// Grid (cdiv(K, kKeyThreads), rows): one thread per key.
template <int kBits>
__global__ void __launch_bounds__(kKeyThreads) rank_keys_kernel(const SelectParams p, int pos_bits, int64_t* keys) {
  const int64_t row = blockIdx.y;
  const int64_t j = int64_t(blockIdx.x) * kKeyThreads + threadIdx.x;
  if (j >= p.K) return;
  int64_t bias_row, mask_row;
  select_detail::row_bases(p, row, &bias_row, &mask_row);
  const uint64_t order = select_detail::load_key<kBits>(p, bias_row, mask_row, j);  // 0: masked out
  keys[row * p.K + j] = int64_t((order << pos_bits) | uint64_t(p.K - 1 - j));
}

// ---------------------------------------------------------------- step 3: death positions

__device__ __forceinline__ int position_of(int64_t key, int64_t K, int pos_bits) {
  return int((K - 1) - (key & ((int64_t(1) << pos_bits) - 1)));
}

// Grid (NC, rows), one warp: ranks c*32 .. c*32+31 of a row. Writes each rank's position X and
// the inverse Rank, and T[row, c, b] = #{ranks of this chunk at positions < b*P}, b = 0..NB.
__global__ void __launch_bounds__(32) table_rows_kernel(const DeathParams p, int64_t nc, int64_t nb) {
  const int64_t row = blockIdx.y, c = blockIdx.x;
  const int lane = threadIdx.x;
  const int64_t r = c * kRanks + lane;
  const bool ok = r < p.K;
  int x = 0x7FFFFFFF;  // past every bucket boundary (NB * P may exceed K): counts nothing
  if (ok) {
    x = position_of(p.sorted[row * p.K + r], p.K, p.pos_bits);
    p.x[row * p.K + r] = x;
    p.rank[row * p.K + x] = int(r);
  }
  int32_t* out = p.table + (row * nc + c) * (nb + 1);
  // Every lane runs every round: the shuffles need the whole warp.
  for (int64_t b0 = 0; b0 <= nb; b0 += 32) {
    const int64_t b = b0 + lane;
    const int64_t bound = b * p.bucket;
    int count = 0;
    for (int t = 0; t < 32; ++t) count += __shfl_sync(kFull, x, t) < bound;
    if (b <= nb) out[b] = count;
  }
}

// Grid (cdiv(NB + 1, 32), rows), block (32, 32): thread (tx, ty) owns column b = 32*blockIdx.x + tx
// and a run of chunks; in place, each entry becomes the sum of the entries of the chunks before it,
// so T[row, c, b] = #{ranks < c*32 at positions < b*P}.
__global__ void __launch_bounds__(1024) table_scan_kernel(const DeathParams p, int64_t nc, int64_t nb) {
  __shared__ int sums[32][33];
  const int64_t row = blockIdx.y;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t b = int64_t(blockIdx.x) * 32 + tx;
  const int64_t per = (nc + 31) / 32;
  const int64_t c0 = ty * per, c1 = c0 + per < nc ? c0 + per : nc;
  int32_t* col = p.table + row * nc * (nb + 1) + b;
  int sum = 0;
  if (b <= nb)
    for (int64_t c = c0; c < c1; ++c) sum += col[c * (nb + 1)];
  sums[ty][tx] = sum;
  __syncthreads();
  int running = 0;
  for (int t = 0; t < ty; ++t) running += sums[t][tx];
  if (b <= nb) {
    for (int64_t c = c0; c < c1; ++c) {
      const int own = col[c * (nb + 1)];
      col[c * (nb + 1)] = running;
      running += own;
    }
  }
}

constexpr int kDeathWarps = 4;

// Grid (cdiv(NC, kDeathWarps), rows), one warp per rank chunk: death of each rank's key.
// count(r, b) = #{r' < r : x_r' < b*P} = T[c, b] + #{earlier lanes with a bucket below b} is
// non-decreasing in b, 0 at b = 0 and r at b = NB; the key dies at the W-th smallest position
// among the better ranks, in the bucket found by a binary search for the largest b with
// count(r, b) < W, and picked inside it from Rank.
__global__ void __launch_bounds__(32 * kDeathWarps) death_kernel(const DeathParams p, int64_t nc, int64_t nb,
                                                                 int steps) {
  const int64_t row = blockIdx.y;
  const int64_t c = int64_t(blockIdx.x) * kDeathWarps + threadIdx.x / 32;
  if (c >= nc) return;  // whole warps only: c is uniform within a warp
  const int lane = threadIdx.x % 32;
  const int64_t r = c * kRanks + lane;
  const bool ok = r < p.K;
  const int64_t key = ok ? p.sorted[row * p.K + r] : 0;
  const int x = ok ? p.x[row * p.K + r] : 0;
  const int64_t xb = x / p.bucket;
  const int32_t* t_row = p.table + (row * nc + c) * (nb + 1);

  auto inside = [&](int64_t bucket) {  // earlier lanes of the chunk at a bucket below `bucket`
    int n = 0;
    for (int t = 0; t < 32; ++t) {
      const int64_t other = __shfl_sync(kFull, xb, t);
      n += (t < lane) & (other < bucket);
    }
    return n;
  };
  int64_t lo = 0, hi = nb;
  for (int s = 0; s < steps; ++s) {
    const int64_t mid = (lo + hi) / 2;
    const bool below = t_row[mid] + inside(mid) < p.W;
    lo = below ? mid : lo;
    hi = below ? hi : mid;
  }
  const int64_t needed = p.W - (t_row[lo] + inside(lo));  // >= 1 where r >= W
  if (!ok) return;

  int64_t killer = p.K;
  if (r >= p.W) {
    int64_t seen = 0;
    const int64_t end = (lo + 1) * p.bucket < p.K ? (lo + 1) * p.bucket : p.K;
    for (int64_t pos = lo * p.bucket; pos < end; ++pos) {
      if (p.rank[row * p.K + pos] < r && ++seen == needed) {
        killer = pos;
        break;
      }
    }
  }
  // Masked keys (order 0, ranked last) and keys killed before they are born get their own
  // position, which no limit satisfies.
  const bool allowed = (uint64_t(key) >> p.pos_bits) != 0;
  const int64_t death = allowed ? (killer > x ? killer : x) : x;
  p.death[row * p.K + x] = int32_t(death);
}

// ---------------------------------------------------------------- step 4: block lists

constexpr int kListThreads = 256;
static_assert(kVisibleChunk % kListThreads == 0, "chunks are whole tiles of the compaction");
constexpr int kChunkItems = kVisibleChunk / kListThreads;

// Grid (cdiv(K, kVisibleChunk), rows): how many keys of each chunk are ever alive (death_j > j).
__global__ void __launch_bounds__(kListThreads) ever_counts_kernel(const ListsParams p, int64_t n_chunks) {
  using Reduce = cub::BlockReduce<int, kListThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t row = blockIdx.y, c = blockIdx.x;
  int n = 0;
  for (int i = 0; i < kChunkItems; ++i) {
    const int64_t j = c * kVisibleChunk + i * kListThreads + threadIdx.x;
    n += j < p.K && p.death[row * p.K + j] > j;
  }
  n = Reduce(tmp).Sum(n);
  if (threadIdx.x == 0) p.chunk_counts[row * n_chunks + c] = n;
}

// Grid (cdiv(K, kVisibleChunk), rows): the chunk's ever-alive keys into their ascending slots of
// the row's `ever` list (after those of the chunks before it), and `before` for each position.
__global__ void __launch_bounds__(kListThreads) ever_compact_kernel(const ListsParams p, int64_t n_chunks) {
  using Reduce = cub::BlockReduce<int, kListThreads>;
  using Scan = cub::BlockScan<int, kListThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ int base;
  const int64_t row = blockIdx.y, c = blockIdx.x;
  int earlier = 0;
  for (int64_t i = threadIdx.x; i < c; i += kListThreads) earlier += p.chunk_counts[row * n_chunks + i];
  earlier = Reduce(tmp.reduce).Sum(earlier);
  if (threadIdx.x == 0) base = earlier;
  __syncthreads();
  // Thread t owns kChunkItems consecutive keys, so one scan keeps the keys in order.
  const int64_t j0 = c * kVisibleChunk + int64_t(threadIdx.x) * kChunkItems;
  int flags[kChunkItems], inclusive[kChunkItems];
  for (int i = 0; i < kChunkItems; ++i) {
    const int64_t j = j0 + i;
    flags[i] = j < p.K && p.death[row * p.K + j] > j;
  }
  Scan(tmp.scan).InclusiveSum(flags, inclusive);
  for (int i = 0; i < kChunkItems; ++i) {
    const int64_t j = j0 + i;
    if (j >= p.K) break;
    const int at_or_before = base + inclusive[i];
    if (flags[i]) p.ever[row * p.K + at_or_before - 1] = int32_t(j);
    p.before[row * p.K + j] = at_or_before;
  }
}

// Grid (n_blocks, rows): the alive keys of one query block, in two ascending runs (visible.h).
__global__ void __launch_bounds__(kListThreads) lists_kernel(const ListsParams p) {
  using Scan = cub::BlockScan<int, kListThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const int64_t row = blockIdx.y, blk = blockIdx.x;
  const int64_t off = p.K - p.Q;
  const int64_t c_lo = blk * p.block_m + off;
  const int64_t last = (blk + 1) * p.block_m < p.Q ? (blk + 1) * p.block_m : p.Q;
  const int64_t c_hi = last - 1 + off;
  // Only ever-alive keys at or before the block's last limit can be alive in it.
  const int64_t end = c_hi < 0 ? 0 : p.before[row * p.K + (c_hi < p.K - 1 ? c_hi : p.K - 1)];
  int32_t* out = p.idx + (row * p.n_blocks + blk) * p.list_len;
  int n = 0, n_full = 0;
  for (int run = 0; run < 2; ++run) {
    for (int64_t start = 0; start < end; start += kListThreads) {
      const int64_t t = start + threadIdx.x;
      int32_t j = 0;
      int keep = 0;
      if (t < end) {
        j = p.ever[row * p.K + t];
        const int64_t d = p.death[row * p.K + j];
        keep = run == 0 ? (j <= c_lo && d > c_hi) : (d > c_lo && (j > c_lo || d <= c_hi));
      }
      int slot, total;
      Scan(tmp).ExclusiveSum(keep, slot, total);
      if (keep) out[n + slot] = j;
      n += total;
      __syncthreads();  // tmp is reused by the next scan
    }
    if (run == 0) n_full = n;
  }
  if (threadIdx.x == 0) {
    p.counts[(row * p.n_blocks + blk) * 2] = n;
    p.counts[(row * p.n_blocks + blk) * 2 + 1] = n_full;
  }
}

}  // namespace visible_detail
}  // namespace cuda
}  // namespace dmattn
