// Kernels of the CUDA global-scope selection (select.h): a radix select on order-preserving integer
// keys, then an ordered, stable compaction; no sort of the K keys.
//
// A row of K keys is cut into C chunks of `chunk` keys, one thread block each (grid (rows, C)), so
// a few long rows still fill the GPU. Keys are the bias bits mapped by sel::order_key* (masked-out
// keys get 0). The threshold T, the W-th largest key of the row, is found 8 bits at a time from the
// top, one kernel per digit (select_hist_kernel): each block histograms, in shared memory, the
// digit of its chunk's keys whose higher digits equal T's prefix found so far, and writes the 256
// counts to the workspace; the next kernel's blocks each sum the row's C histograms and pick the
// digit holding the rank still sought (sel::bucket_holds_rank). No atomics in global memory, so
// nothing to zero and the result does not depend on scheduling. The last pass also counts, per
// chunk, the keys whose higher digits are above the prefix.
//
// select_write_kernel then knows T, how many keys equal to T are kept (the earliest ones,
// sel::threshold_takes) and, from the chunk histograms before its own, how many keys earlier chunks
// keep: its first output slot. It walks its chunk kGroup tiles at a time, a block-wide exclusive
// scan of packed (above, equal) flags giving each kept key its slot, so the list comes out
// ascending.
//
// Workspace (bytes, select_plan): per pass and row a RowState {prefix, above}; two ping-pong
// int32 histogram buffers of rows x C x 256 (pass p writes buffer p % 2 and reads the other); the
// last pass's rows x C above-prefix counts.
//
// The passes after the first and the compaction overlap the kernel before them (launch.h): they
// load their first kGroup tiles of keys, then wait for it.
//
// Measured (H200, D128k: 8 rows of 131072 bf16 keys, w 2048, chunks of 4096; torch.profiler, each
// kernel alone): 7.0 + 8.2 + 10.1 us before, 5.0 + 5.5 + 6.9 us with every key load of a group
// issued before any is used (load_group), the compaction's one exchange and scan per group, the
// register cap (kMinBlocks) and the histogram sums unrolled (benchmarks/results/
// cuda-decode-chain-h200-2026-11-29.log). Measured and not built: one kernel per row as a thread-block
// cluster (keys held in registers, histograms summed through distributed shared memory, cluster
// barriers instead of launches, ballots and one block scan for the compaction) gave the same lists
// but took 25.7 us at 8 blocks of 512 threads per row and 34.9 us at 16 (not profiled further).
#pragma once

#include <cub/block/block_exchange.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <cstdint>
#include <type_traits>

#include "dmattn/selection.h"
#include "launch.h"
#include "select.h"
#include "select_keys.cuh"

namespace dmattn {
namespace cuda {
namespace select_detail {

namespace sel = ::dmattn::sel;

constexpr int kThreads = 256;  // one thread per histogram bin in the bucket search
constexpr int kBins = 256;     // 8-bit digits
constexpr int kItems = 4;      // keys per thread per compaction tile
constexpr int kTile = kThreads * kItems;

struct RowState {
  unsigned long long prefix;  // the threshold's digits found so far
  long long above;            // keys of the row whose found digits are above the prefix
};

struct Workspace {
  RowState* state;  // (passes, rows)
  int32_t* hist;    // (2, rows, C, kBins)
  int32_t* above;   // (rows, C)
};

__host__ __device__ inline Workspace carve(void* base, int64_t rows, int64_t chunks, int passes) {
  char* p = static_cast<char*>(base);
  Workspace w;
  w.state = reinterpret_cast<RowState*>(p);
  p += (size_t(passes) * size_t(rows) * sizeof(RowState) + 15) / 16 * 16;
  w.hist = reinterpret_cast<int32_t*>(p);
  p += (size_t(2) * size_t(rows) * size_t(chunks) * kBins * sizeof(int32_t) + 15) / 16 * 16;
  w.above = reinterpret_cast<int32_t*>(p);
  return w;
}

inline size_t workspace_bytes(int64_t rows, int64_t chunks, int passes) {
  return align16(size_t(passes) * size_t(rows) * sizeof(RowState)) +
         align16(size_t(2) * size_t(rows) * size_t(chunks) * kBins * sizeof(int32_t)) +
         align16(size_t(rows) * size_t(chunks) * sizeof(int32_t));
}

// Tiles whose keys a thread loads before using any: one memory round trip per kGroup tiles.
constexpr int kGroup = 4;
// Blocks per SM the radix kernels are compiled to fit (a register cap): room for the next kernel
// of the chain to be resident while they finish (launch.h), which 16 keys in flight per thread
// would otherwise take (125 registers: two blocks filled an SM). 64-bit keys need two registers
// each and would spill at three.
template <int kBits>
constexpr int kMinBlocks = kBits == 64 ? 2 : 3;

// The keys of tiles t0, t0 + kTile, ... (kGroup of them) of a chunk ending at `stop`, striped
// (thread t holds key t0 + g * kTile + i * kThreads + t); 0 (never kept) past the end. Every load
// is issued before any loaded value is used: with the conversion next to its load under the
// bounds test, the compiler waited for each key before issuing the next (ncu, H200, D128k: 16
// memory round trips per thread in a radix pass, its largest stall).
template <int kBits>
__device__ __forceinline__ void load_group(const SelectParams& p, int64_t bias_row, int64_t mask_row, int64_t t0,
                                           int64_t stop, KeyT<kBits> (&key)[kGroup][kItems]) {
  using Raw = RawT<kBits>;
  // Contiguous keys (the usual layout) load at constant offsets from one address; other strides
  // keep an address per load (more registers). Both branches are block-uniform.
  const Raw* bias = static_cast<const Raw*>(p.bias) + bias_row;
  const int64_t stride = p.bias_stride[2];
  const int64_t first = t0 + threadIdx.x;
  Raw raw[kGroup][kItems];
  uint8_t allowed[kGroup][kItems];
  if (stride == 1) {
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int k = g * kTile + i * kThreads;
        raw[g][i] = first + k < stop ? bias[first + k] : Raw(0);
      }
    }
  } else {
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int64_t j = first + g * kTile + i * kThreads;
        raw[g][i] = j < stop ? bias[j * stride] : Raw(0);
      }
    }
  }
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
#pragma unroll
    for (int i = 0; i < kItems; ++i) allowed[g][i] = 1;
  }
  if (p.mask != nullptr) {
    const uint8_t* mask = p.mask + mask_row;
    const int64_t mstride = p.mask_stride[2];
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int64_t j = first + g * kTile + i * kThreads;
        allowed[g][i] = j < stop ? mask[j * mstride] : uint8_t(0);
      }
    }
  }
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const bool in = t0 + g * kTile + i * kThreads + threadIdx.x < stop && allowed[g][i] != 0;
      key[g][i] = in ? order_key<kBits>(raw[g][i]) : KeyT<kBits>(0);
    }
  }
}

// Where a radix pass or the compaction block works: chunk c of row `row` (grid (rows, C)), keys
// [start, stop), and the workspace.
struct ChunkView {
  int64_t row, c, rows;
  int64_t bias_row, mask_row;  // row_bases
  int64_t start, stop;
  Workspace ws;
};

// The common start of select_hist_kernel and select_write_kernel: lets the next kernel of the chain
// launch, loads the chunk's first kGroup tiles of keys (inputs of the chain, so they load while the
// previous kernel may still run: launch.h), then waits for that kernel.
template <int kBits>
__device__ __forceinline__ ChunkView begin_chunk(const SelectParams& p, int64_t chunks,
                                                 KeyT<kBits> (&key)[kGroup][kItems]) {
  pdl_launch_next();
  ChunkView v;
  v.row = blockIdx.x;
  v.c = blockIdx.y;
  v.rows = p.B_s * p.H_s;
  v.ws = carve(p.workspace, v.rows, chunks, kBits / 8);
  row_bases(p, v.row, &v.bias_row, &v.mask_row);
  v.start = v.c * p.chunk;
  v.stop = v.start + p.chunk < p.K ? v.start + p.chunk : p.K;
  load_group<kBits>(p, v.bias_row, v.mask_row, v.start, v.stop, key);
  pdl_wait();
  return v;
}

using BinScan = cub::BlockScan<int, kThreads>;

struct BucketShared {
  typename BinScan::TempStorage scan;
  int digit;
  int more;
};

// Thread t owns bin 255 - t with `count` keys. Returns (to every thread) the bin holding the
// rank-th largest key and, in *more, the keys in higher bins.
__device__ __forceinline__ int find_bucket(int count, long long rank, BucketShared& sh, int* more) {
  int at_or_above;
  BinScan(sh.scan).InclusiveSum(count, at_or_above);
  if (sel::bucket_holds_rank(at_or_above, count, rank)) {
    sh.digit = kBins - 1 - int(threadIdx.x);
    sh.more = at_or_above - count;
  }
  __syncthreads();
  *more = sh.more;
  return sh.digit;
}

// The row's state entering pass `pass`: prefix and above count after the digits of passes < pass,
// derived from pass - 1's chunk histograms (block 0 of the row stores it for later kernels).
__device__ __forceinline__ RowState state_entering(const SelectParams& p, const Workspace& ws, int64_t row,
                                                   int64_t chunks, int pass, BucketShared& sh) {
  if (pass == 0) return RowState{0, 0};
  const int64_t rows = p.B_s * p.H_s;
  const RowState base = pass == 1 ? RowState{0, 0} : ws.state[int64_t(pass - 1) * rows + row];
  const int bin = kBins - 1 - int(threadIdx.x);
  const int32_t* hist = ws.hist + (int64_t((pass - 1) & 1) * rows + row) * chunks * kBins;
  int count = 0;
  // Unrolled to 32 (the plan's chunks per row at D128k): one L2 round trip, not four (ncu: the
  // largest stall of the second pass at 8).
#pragma unroll 32
  for (int64_t c = 0; c < chunks; ++c) count += hist[c * kBins + bin];
  int more = 0;
  const int digit = find_bucket(count, (long long)p.W - base.above, sh, &more);
  const RowState next{(base.prefix << 8) | unsigned(digit), base.above + more};
  if (blockIdx.y == 0 && threadIdx.x == 0) ws.state[int64_t(pass) * rows + row] = next;
  return next;
}

// Radix pass `pass` over chunk blockIdx.y of row blockIdx.x: the histogram of the pass's digit
// among the chunk's keys whose higher digits equal the prefix; in the last pass also the count of
// keys whose higher digits are above it.
template <int kBits>
__global__ void __launch_bounds__(kThreads, kMinBlocks<kBits>) select_hist_kernel(SelectParams p, int64_t chunks, int pass) {
  using Key = KeyT<kBits>;
  constexpr int kPasses = kBits / 8;
  using Reduce = cub::BlockReduce<int, kThreads>;
  __shared__ int hist[kBins];
  __shared__ BucketShared sh;
  __shared__ typename Reduce::TempStorage reduce;

  hist[threadIdx.x] = 0;
  Key key[kGroup][kItems];
  const auto [row, c, rows, bias_row, mask_row, start, stop, ws] = begin_chunk<kBits>(p, chunks, key);
  const RowState st = state_entering(p, ws, row, chunks, pass, sh);
  __syncthreads();  // hist zeroed
  const int shift = kBits - 8 * (pass + 1);
  const Key prefix = Key(st.prefix);
  const bool last = pass == kPasses - 1;

  const unsigned lane = threadIdx.x % 32;
  int n_above = 0;
  for (int64_t t0 = start; t0 < stop; t0 += kGroup * kTile) {
    if (t0 != start) load_group<kBits>(p, bias_row, mask_row, t0, stop, key);
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      if (t0 + g * kTile >= stop) break;  // block-uniform
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const bool valid = t0 + g * kTile + i * kThreads + threadIdx.x < stop;
        const Key high = pass == 0 ? Key(0) : key[g][i] >> (shift + 8);
        const bool in = valid && high == prefix;
        n_above += (valid && high > prefix) ? 1 : 0;
        // Warp-aggregated: skewed biases put most keys of a pass in one bin.
        const unsigned digit = in ? unsigned(key[g][i] >> shift) & (kBins - 1) : unsigned(kBins);
        const unsigned peers = __match_any_sync(0xffffffffu, digit);
        if (in && lane == unsigned(__ffs(peers) - 1)) atomicAdd(&hist[digit], __popc(peers));
      }
    }
  }
  __syncthreads();
  ws.hist[((int64_t(pass & 1) * rows + row) * chunks + c) * kBins + threadIdx.x] = hist[threadIdx.x];
  if (last) {
    const int total = Reduce(reduce).Sum(n_above);
    if (threadIdx.x == 0) ws.above[row * chunks + c] = total;
  }
}

// Compaction of chunk blockIdx.y of row blockIdx.x after the last radix pass.
template <int kBits>
__global__ void __launch_bounds__(kThreads, kMinBlocks<kBits>) select_write_kernel(SelectParams p, int64_t chunks) {
  using Key = KeyT<kBits>;
  constexpr int kPasses = kBits / 8;
  using Reduce = cub::BlockReduce<long long, kThreads>;
  using Exchange = cub::BlockExchange<Key, kThreads, kGroup * kItems>;
  using FlagScan = cub::BlockScan<int, kThreads>;
  __shared__ BucketShared sh;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Exchange::TempStorage exchange;
    typename FlagScan::TempStorage scan;
  } tmp;
  __shared__ long long eq_before_sh, kept_sh;

  Key keys[kGroup][kItems];
  const auto [row, c, rows, bias_row, mask_row, start, stop, ws] = begin_chunk<kBits>(p, chunks, keys);
  const RowState base = ws.state[int64_t(kPasses - 1) * rows + row];

  // Threshold T = prefix . digit, from the last pass's histograms summed over every chunk; the
  // same histograms summed over the chunks before this one say how many keys those keep.
  const int bin = kBins - 1 - int(threadIdx.x);
  const int32_t* hist = ws.hist + (int64_t((kPasses - 1) & 1) * rows + row) * chunks * kBins;
  int count = 0, before = 0;
  // Unrolled as in state_entering.
#pragma unroll 32
  for (int64_t k = 0; k < chunks; ++k) {
    const int h = hist[k * kBins + bin];
    count += h;
    before += k < c ? h : 0;
  }
  int more = 0;
  const int digit = find_bucket(count, (long long)p.W - base.above, sh, &more);
  const Key thr = Key((base.prefix << 8) | unsigned(digit));
  const long long needed = sel::threshold_takes(thr, p.W, base.above + more);
  if (bin == digit) eq_before_sh = before;
  long long above_before = bin > digit ? before : 0;
  for (int64_t k = threadIdx.x; k < c; k += kThreads) above_before += ws.above[row * chunks + k];
  above_before = Reduce(tmp.reduce).Sum(above_before);  // valid in thread 0
  __syncthreads();  // eq_before_sh written
  if (threadIdx.x == 0) kept_sh = above_before + (needed < eq_before_sh ? needed : eq_before_sh);
  __syncthreads();
  long long kept = kept_sh;        // keys kept before the current tile, row-wide
  long long eq_seen = eq_before_sh;  // keys equal to T before the current tile, row-wide

  int32_t* out = p.idx + row * p.W;
  // A group of kGroup tiles at a time: one exchange and one scan (two barriers) for its
  // kGroup * kTile keys rather than per tile.
  constexpr int kN = kGroup * kItems;
  for (int64_t t0 = start; t0 < stop; t0 += kGroup * kTile) {
    if (t0 != start) load_group<kBits>(p, bias_row, mask_row, t0, stop, keys);
    Key key[kN];  // striped: key[k] = t0 + k * kThreads + t (load_group's [g][i] at k = g * kItems + i)
#pragma unroll
    for (int k = 0; k < kN; ++k) key[k] = keys[k / kItems][k % kItems];
    __syncthreads();  // tmp is reused
    Exchange(tmp.exchange).StripedToBlocked(key);  // thread t: keys t0 + t * kN + k
    int flags[kN], excl[kN];
#pragma unroll
    for (int k = 0; k < kN; ++k) flags[k] = int(key[k] > thr) | (int(key[k] == thr) << 16);  // counts < 2^16
    int total;
    __syncthreads();
    FlagScan(tmp.scan).ExclusiveSum(flags, excl, total);
    const long long rem = needed - eq_seen > 0 ? needed - eq_seen : 0;  // equal keys still to take
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      const long long above_ex = excl[k] & 0xFFFF, eq_ex = excl[k] >> 16;
      if (sel::radix_keeps(key[k], thr, eq_seen + eq_ex, needed)) {
        const long long slot = kept + above_ex + (eq_ex < rem ? eq_ex : rem);
        out[slot] = int32_t(t0 + int64_t(threadIdx.x) * kN + k);
      }
    }
    const long long eq_total = total >> 16;
    kept += (total & 0xFFFF) + (eq_total < rem ? eq_total : rem);
    eq_seen += eq_total;
  }
  if (c == chunks - 1) {
    const long long n_kept = base.above + more + needed;
    for (long long s = n_kept + threadIdx.x; s < p.W; s += kThreads) out[s] = int32_t(p.K);
    if (p.row_counts != nullptr && threadIdx.x == 0) p.row_counts[row] = int32_t(n_kept);
  }
}

// counts[row, m] = the number of entries of the row's list <= the causal limit of query block m's
// last query (all of them without causality); sentinels (K) are never counted.
//
// One thread per list entry rather than one per count: with f(e) the first query block whose limit
// reaches key e (n_blocks for the sentinel), f is non-decreasing along the ascending list and
// counts[m] is the number of entries with f <= m. So entry j writes j + 1 into counts[f(list[j]) ..
// f(list[j + 1]) - 1], and entry 0 also writes 0 below f(list[0]): every count once, after one load
// round trip, where a binary search per count made log2(W) dependent ones (11 at W = 2048).
__device__ __forceinline__ int64_t first_block(const CountsParams& p, int64_t e) {
  if (e >= p.K) return p.n_blocks;
  if (!p.causal) return 0;
  // Block m's limit min((m + 1) * block_m, Q) - 1 + K - Q reaches e < K iff (m + 1) * block_m >= t
  // (t <= Q since e < K).
  const int64_t t = e + 1 - p.K + p.Q;
  return t <= 0 ? 0 : (t + p.block_m - 1) / p.block_m - 1;
}

__global__ void list_counts_kernel(CountsParams p) {
  pdl_launch_next();
  pdl_wait();  // the lists are the previous kernel's output
  const int64_t w = p.W > 0 ? p.W : 1;  // W = 0: one thread per row writes its zeros
  const int64_t n = p.rows * w;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / w, j = i % w;
    const int32_t* list = p.idx + row * p.W;
    int32_t* counts = p.counts + row * p.n_blocks;
    const int64_t lo = first_block(p, j < p.W ? int64_t(list[j]) : p.K);
    const int64_t hi = j + 1 < p.W ? first_block(p, int64_t(list[j + 1])) : p.n_blocks;
    for (int64_t m = lo; m < hi; ++m) counts[m] = int32_t(j + 1);
    if (j == 0) {
      for (int64_t m = 0; m < lo; ++m) counts[m] = 0;
    }
  }
}

}  // namespace select_detail
}  // namespace cuda
}  // namespace dmattn
