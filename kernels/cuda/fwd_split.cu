// The split (decode) forward's plan, dispatch and merge kernel (fwd_split.h; the split kernel is in
// fwd_split_kernel.cuh, instantiated per head dim in generated translation units).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include <atomic>
#include <stdexcept>
#include <string>

#include "check.h"
#include "fwd.h"
#include "fwd_split.h"
#include "launch.h"
#include "switch.h"
#include "tiles.h"

namespace dmattn {
namespace cuda {

// Multiprocessor count per device ordinal, 0 until first read (fwd.cu does the same for the
// compute capability): fwd_split_count and the sm_90a forward's grid read it on every call.
namespace {
constexpr int kMaxDevices = 64;
std::atomic<int> g_sms[kMaxDevices];
}  // namespace

int device_sm_count(int device) {
  if (device < 0 || device >= kMaxDevices) {
    int sms = 0;
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
               "cudaDeviceGetAttribute(MultiProcessorCount)");
    return sms;
  }
  int sms = g_sms[device].load(std::memory_order_relaxed);
  if (sms == 0) {
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
               "cudaDeviceGetAttribute(MultiProcessorCount)");
    g_sms[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

namespace {

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t gcd(int64_t a, int64_t b) {
  while (b != 0) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kMergeThreads = 128;

// One thread block per partial row x = (b * H + h) * Q + i: the weights exp(m_s - M) of the
// splits, their sum of row sums (warp 0, a fixed tree), and the weighted sum of the partial
// outputs (threads own 4 columns of a group of splits; groups are added in order), so the result
// does not depend on scheduling. Every thread first issues the loads that do not depend on the
// weights (its first kMergePrefetch partial outputs, its row max, warp 0 its row sum), so the
// kernel waits on one memory round trip rather than one per phase.
constexpr int kMergePrefetch = 8;

__global__ void __launch_bounds__(kMergeThreads) dma_fwd_split_merge_kernel(const FwdParams p, const FwdSplitLaunch s) {
  __shared__ float s_weight[kFwdSplitMaxSplits];
  __shared__ float s_max[kMergeThreads / 32];
  __shared__ float s_total;
  __shared__ __align__(16) float s_out[kMergeThreads * 4];

  pdl_launch_next();
  pdl_wait();  // the partials are the split kernel's output
  const int64_t x = blockIdx.x;
  const int tid = int(threadIdx.x);
  const int warp = tid / 32, lane = tid % 32;
  const int D = p.D;
  const int quads = D / 4;                 // float4 columns of a row
  const int groups = kMergeThreads / quads;  // split groups (5 at D = 96: threads 120..127 idle)
  const int c = tid % quads, grp = tid / quads;
  auto part_o = [&](int sp) { return __ldg(reinterpret_cast<const float4*>(s.part_o + (sp * s.rows + x) * D) + c); };

  float4 pre[kMergePrefetch];
#pragma unroll
  for (int k = 0; k < kMergePrefetch; ++k) {
    const int sp = grp + k * groups;
    pre[k] = grp < groups && sp < s.splits ? part_o(sp) : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  const float m_first = tid < s.splits ? __ldg(s.part_m + int64_t(tid) * s.rows + x) : -INFINITY;
  const float l_first = warp == 0 && lane < s.splits ? __ldg(s.part_l + int64_t(lane) * s.rows + x) : 0.f;

  float mx = m_first;
  for (int sp = tid + kMergeThreads; sp < s.splits; sp += kMergeThreads) mx = fmaxf(mx, s.part_m[sp * s.rows + x]);
  for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (lane == 0) s_max[warp] = mx;
  __syncthreads();
  mx = s_max[0];
  for (int w = 1; w < kMergeThreads / 32; ++w) mx = fmaxf(mx, s_max[w]);
  const float m_use = mx == -INFINITY ? 0.f : mx;
  if (tid < s.splits) s_weight[tid] = exp2f((m_first - m_use) * kLog2e);
  for (int sp = tid + kMergeThreads; sp < s.splits; sp += kMergeThreads) {
    s_weight[sp] = exp2f((s.part_m[sp * s.rows + x] - m_use) * kLog2e);
  }
  __syncthreads();

  if (warp == 0) {
    float sum = lane < s.splits ? l_first * s_weight[lane] : 0.f;
    for (int sp = lane + 32; sp < s.splits; sp += 32) sum = fmaf(s.part_l[sp * s.rows + x], s_weight[sp], sum);
    for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) s_total = sum;
  }

  if (grp < groups) {
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
    auto add = [&](const float4& o, float w) {
      a.x = fmaf(o.x, w, a.x);
      a.y = fmaf(o.y, w, a.y);
      a.z = fmaf(o.z, w, a.z);
      a.w = fmaf(o.w, w, a.w);
    };
#pragma unroll
    for (int k = 0; k < kMergePrefetch; ++k) {
      const int sp = grp + k * groups;
      if (sp < s.splits) add(pre[k], s_weight[sp]);
    }
#pragma unroll 4
    for (int sp = grp + kMergePrefetch * groups; sp < s.splits; sp += groups) add(part_o(sp), s_weight[sp]);
    reinterpret_cast<float4*>(s_out + grp * D)[c] = a;
  }
  __syncthreads();

  const float total = s_total;
  const bool any = total > 0.f;
  const float inv = any ? 1.f / total : 0.f;
  const int64_t b = x / (int64_t(p.H) * p.Q);
  const int64_t h = x / p.Q % p.H;
  const int64_t i = x % p.Q;
  unsigned short* out = static_cast<unsigned short*>(p.out) + b * p.out_stride[0] + i * p.out_stride[1] +
                        h * p.out_stride[2];
  for (int d = tid; d < D; d += kMergeThreads) {
    float o = 0.f;
    for (int gi = 0; gi < groups; ++gi) o += s_out[gi * D + d];
    o *= inv;
    out[d] = p.dtype == DType::f16 ? __half_as_ushort(__float2half_rn(o))
                                   : __bfloat16_as_ushort(__float2bfloat16_rn(o));
  }
  if (tid == 0) p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + i] = any ? mx + logf(total) : -INFINITY;
}

}  // namespace

// Split the list until the launch fills the device in one wave: fwd_split_tile(D).blocks_per_sm
// blocks per SM (what fits, tiles.h) over the blocks one split has (B * H_kv kv heads, each
// cdiv(group * Q, rows) row tiles), but never a split shorter than one step of a block (fewer keys
// would leave lanes idle and only add partials to merge), and at most kFwdSplitMaxSplits. A call
// that already has enough blocks gets 1 split: the split kernel then writes out and lse itself (no
// merge), still sharing K/V loads over the group. D128k on an H200 (132 SMs, 8 kv heads, 2048
// entries): 50 wanted, chunks of 64 entries (two steps), 32 splits, 256 blocks.
//
// Q <= kFwdSplitMaxQ and Q x group <= kFwdSplitMaxRows: the split kernel computes on the CUDA
// cores and re-reads a chunk's K/V rows for every tile of 4 query rows (from L2 when the tiles run
// together), while fwd_kernel.cuh reads them once per 128 rows with mma.sync but runs only
// B * H * cdiv(Q, 128) blocks, each walking the whole list. Measured on an H200 (D128k shape, group
// 4, bf16, CUDA-graph replay of the forward alone; benchmarks/results/cuda-decode-h200-2026-11-28.json,
// benchmarks/cuda_decode.py --q-sweep): split against one-block 0.025 / 0.149 ms at Q = 1, 0.032 /
// 0.150 at Q = 2, 0.070 / 0.151 at Q = 4, 0.101 / 0.150 at Q = 8 (32 rows per kv head), 0.201 /
// 0.151 at Q = 16 (64 rows). So the split is picked up to 32 rows per kv head; up to Q = 16 it can
// still be forced (tests).
//
// The plan assumes the tensor-core kernel where the head dim has one (split_mma_applies also needs
// no softcap, no mask and one bias row per block, which the plan's callers do not know, and the
// switch): a call that then runs the CUDA-core kernel gets the same splits with 4-row tiles, so
// more thread blocks.
int fwd_split_count(int64_t B, int64_t Q, int64_t H, int64_t H_kv, int head_dim, int64_t n_keys, int sms) {
  if (Q < 1 || Q > kFwdSplitMaxQ || B < 1 || H_kv < 1 || H % H_kv != 0) return 0;
  if (Q * (H / H_kv) > kFwdSplitMaxRows) return 0;
  const FwdSplitTile tile = fwd_split_mma_head_dim(head_dim) ? kFwdSplitMmaTile : fwd_split_tile(head_dim);
  const int64_t blocks = B * H_kv * cdiv(H / H_kv * Q, tile.rows);
  const int64_t steps = cdiv(n_keys > 0 ? n_keys : 1, tile.step);
  const int64_t want = cdiv(tile.blocks_per_sm * int64_t(sms > 0 ? sms : 1), blocks);
  int64_t splits = want < steps ? want : steps;
  if (splits > kFwdSplitMaxSplits) splits = kFwdSplitMaxSplits;
  return int(splits < 1 ? 1 : splits);
}

int fwd_split_count_on(int device, int64_t B, int64_t Q, int64_t H, int64_t H_kv, int head_dim, int64_t n_keys) {
  return fwd_split_count(B, Q, H, H_kv, head_dim, n_keys, device_sm_count(device));
}

int64_t fwd_split_workspace(int64_t B, int64_t Q, int64_t H, int head_dim, int splits) {
  return int64_t(splits) * B * H * Q * (head_dim + 2);
}

namespace {
std::atomic<bool> g_split_mma{true};

// Whether the tensor-core kernel computes this launch (fwd_split_mma_kernel.cuh): head dim 64 or
// 128, no softcap, no mask (the LIST path folds it into the lists), and one bias row for each
// thread block: the bias is query-broadcast (or Q = 1) and the block's `heads` heads read one
// bias head (head h reads h * bias_heads / H).
bool split_mma_applies(const FwdParams& p, int heads) {
  if (!g_split_mma.load(std::memory_order_relaxed) || !fwd_split_mma_head_dim(p.D)) return false;
  if (p.softcap > 0.f || p.mask != nullptr) return false;
  if (p.bias == nullptr) return true;
  const bool one_query_row = p.Q == 1 || p.bias_stride[2] == 0;
  const bool one_head = p.bias_heads == 1 || (p.H / p.bias_heads) % heads == 0;
  return one_query_row && one_head;
}
}  // namespace

void set_split_mma_enabled(bool enabled) { g_split_mma.store(enabled, std::memory_order_relaxed); }
bool split_mma_enabled() { return g_split_mma.load(std::memory_order_relaxed); }

int fwd_split(const FwdParams& p, cudaStream_t stream, bool inputs_ready) {
  if (p.splits < 1 || p.splits > kFwdSplitMaxSplits)
    throw std::invalid_argument("splits must be in 1.." + std::to_string(kFwdSplitMaxSplits));
  if (p.Q > kFwdSplitMaxQ)
    throw std::invalid_argument("the split forward takes Q <= " + std::to_string(kFwdSplitMaxQ) + ", got " +
                                std::to_string(p.Q));
  const int64_t n_keys = p.idx != nullptr ? p.list_len : p.K;
  FwdSplitLaunch s;
  // Heads that share a thread block share its K/V rows and key list: a divisor of the GQA group
  // and of the heads per selection row.
  const int group = p.H / p.H_kv;
  s.heads = int(p.idx != nullptr ? gcd(group, p.H / p.sel_heads) : group);
  s.mma = split_mma_applies(p, s.heads);
  const FwdSplitTile tile = s.mma ? kFwdSplitMmaTile : fwd_split_tile(p.D);
  s.chunk = cdiv(cdiv(n_keys > 0 ? n_keys : 1, p.splits), tile.step) * tile.step;
  s.splits = int(cdiv(n_keys > 0 ? n_keys : 1, s.chunk));
  s.row_tiles = int(cdiv(int64_t(s.heads) * p.Q, tile.rows));  // heads * Q <= 65535 * 16: no overflow
  s.rows = int64_t(p.B) * p.H * p.Q;
  if (s.splits > 1 && s.rows > int64_t(0x7fffffff)) throw std::invalid_argument("B * H * Q must be below 2^31");
  if (int64_t(s.row_tiles) * s.splits > int64_t(0x7fffffff))
    throw std::invalid_argument("too many thread blocks for the split forward");
  s.part_o = p.split_workspace;
  s.part_m = s.part_o + int64_t(s.splits) * s.rows * p.D;
  s.part_l = s.part_m + int64_t(s.splits) * s.rows;
  s.inputs_ready = inputs_ready;

  head_dim_switch(p.D, [&](auto hd) {
    dtype_switch(p.dtype, [&](auto dt) { launch_fwd_split<decltype(dt)::value, decltype(hd)::value>(p, s, stream); });
  });
  if (s.splits > 1) {
    launch_kernel(dma_fwd_split_merge_kernel, dim3(unsigned(s.rows)), dim3(kMergeThreads), stream, pdl_available(),
                  "dma_fwd_split_merge_kernel launch", p, s);
  }
  return s.splits;
}

}  // namespace cuda
}  // namespace dmattn
