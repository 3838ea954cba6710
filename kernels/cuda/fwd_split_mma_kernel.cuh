// The split (decode) forward on the tensor cores (fwd_split.h), for the common case: head dims 64
// and 128, no softcap, no mask, one bias row for the whole thread block (fwd_split.cu,
// split_mma_applies). Same grid, partials and last step (fwd_split_common.cuh) as the CUDA-core
// kernel of fwd_split_kernel.cuh, which runs everything else.
//
// Thread block (split, head group, batch b): up to 16 query rows (heads x queries of one kv head)
// form one m16 tile; each step of 64 list entries (or keys) is cut into 16 keys per warp. S = Q K^T
// and O += P V run as mma.sync m16n8k16 with float32 accumulation, P rounded to the input dtype
// (as in fwd_kernel.cuh) and passed from the S accumulators to the A operand in registers (FA2's
// layout reuse). Each warp keeps its own online softmax; the warps merge in a fixed order at the
// end. Rows past the block's count are zero in Q and never written.
//
// Why: the CUDA-core kernel is issue-bound at D128k (ncu, H200: 3,383 instructions per warp, 4.2
// cycles per issue, 8.2 us): every lane multiplies 8 elements per (key, row) and reduces across 16
// lanes with shuffles. Here a step is 16 HMMA per warp (D = 128).
//
// Per step: the list entries were loaded during the previous step; the bias values are loaded
// while the K/V rows (cp.async into swizzled shared memory) are in flight, so a step waits on one
// memory round trip. One stage only: at D128k every block walks one step.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "elements.cuh"
#include "fwd_split.h"
#include "fwd_split_common.cuh"
#include "launch.h"
#include "tiles.h"

namespace dmattn {
namespace cuda {
namespace split_mma {

constexpr int kRows = kFwdSplitMmaTile.rows;  // one m16 tile of query rows per block
constexpr int kWarps = kFwdSplitMmaTile.warps;
constexpr int kStep = kFwdSplitMmaTile.step;
constexpr int kWarpKeys = kStep / kWarps;  // keys per warp per step: two n8 tiles of S, one k16 of P V
constexpr int kThreads = 32 * kWarps;
static_assert(kRows == 16 && kWarpKeys == 16, "one m16n8k16 tile of rows, one k16 of keys per warp");
using split_impl::kLog2e;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a b for one m16n8k16 tile (a: 16 x 16 row-major fragments, b: 16 x 8 column-major).
template <DType kDType>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kDType == DType::bf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats rounded to the input dtype, packed as one b16x2 operand register (lo in the low half).
template <DType kDType>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (kDType == DType::bf16) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// Element offset of 16-byte chunk c of row r in a [rows][D] tile: chunks XOR-swizzled by the row
// within each 128-byte page, so the 8 rows one ldmatrix matrix reads at one chunk hit 8 different
// bank groups.
template <int kHeadDim>
__device__ __forceinline__ int swz(int r, int c) {
  return r * kHeadDim + ((c ^ (r & 7)) << 3);
}

template <DType kDType, int kHeadDim>
__global__ void __launch_bounds__(kThreads, kFwdSplitMmaTile.blocks_per_sm)
    dma_fwd_split_mma_kernel(const FwdParams p, const FwdSplitLaunch s) {
  static_assert(fwd_split_mma_head_dim(kHeadDim), "head dims 64 and 128 (tiles.h)");
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  using elem = unsigned short;

  __shared__ __align__(128) elem s_q[kRows * kHeadDim];
  __shared__ __align__(128) elem s_kv[2][kStep * kHeadDim];  // K, V; at the end the warps' outputs
  __shared__ int s_key[kStep];
  __shared__ float s_bias[kStep];
  __shared__ int s_limit[kRows];
  __shared__ int s_head[kRows], s_query[kRows];
  __shared__ float s_max[kWarps][kRows], s_sum[kWarps][kRows];
  static_assert(sizeof(float) * kWarps * kRows * kHeadDim <= sizeof(s_kv), "the warps' outputs fit in K and V");
  float(&s_out)[kWarps][kRows][kHeadDim] = *reinterpret_cast<float(*)[kWarps][kRows][kHeadDim]>(&s_kv[0][0]);

  pdl_launch_next();
  if (!s.inputs_ready) pdl_wait();  // else after loading q, before the list (launch.h)
  const int tid = int(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int tile = int(blockIdx.x) % s.row_tiles;
  const int split = int(blockIdx.x) / s.row_tiles;
  const int h0 = int(blockIdx.y) * s.heads;
  const int b = int(blockIdx.z);
  const int g = h0 / (p.H / p.H_kv);
  const int r0 = tile * kRows;
  const int n_rows = min(kRows, s.heads * p.Q - r0);

  if (tid < kRows) {
    const split_impl::SplitRow row = split_impl::split_row(p, h0, r0, n_rows, tid);
    s_head[tid] = row.h;
    s_query[tid] = row.i;
    s_limit[tid] = row.limit;
  }
  __syncthreads();
  // The block's one bias row (split_mma_applies): head of row 0, query 0 or a query-broadcast row.
  const bool has_bias = p.bias != nullptr;
  const int64_t bias_row =
      has_bias ? split_impl::broadcast_row(p.bias_stride, p.bias_heads, p.H, b, s_head[0], s_query[0]) : 0;

  // Q rows (zero past n_rows), swizzled like K.
  for (int x = tid; x < kRows * kChunks; x += kThreads) {
    const int r = x / kChunks, c = x % kChunks;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < n_rows) {
      v = __ldg(reinterpret_cast<const uint4*>(static_cast<const elem*>(p.q) + b * p.q_stride[0] +
                                               int64_t(s_query[r]) * p.q_stride[1] +
                                               int64_t(s_head[r]) * p.q_stride[2] + c * 8));
    }
    *reinterpret_cast<uint4*>(&s_q[swz<kHeadDim>(r, c)]) = v;
  }
  if (s.inputs_ready) pdl_wait();  // the list is the previous kernel's output

  const int32_t* list = nullptr;
  int64_t limit = p.K;
  if (p.idx != nullptr) {
    list = p.idx + selection_row(p, b, h0) * p.list_len;
    limit = p.list_len;
  }
  const int64_t begin = min(int64_t(split) * s.chunk, limit);
  const int64_t end = min(begin + s.chunk, limit);
  const elem* k_base = static_cast<const elem*>(p.k) + b * p.k_stride[0] + g * p.k_stride[2];
  const elem* v_base = static_cast<const elem*>(p.v) + b * p.v_stride[0] + g * p.v_stride[2];

  // Thread tid < kStep owns entry tid of every step: its key (-1 past the stretch or outside
  // 0..K-1, padding included), loaded a step ahead and looked at only when the step starts.
  auto load_entry = [&](int64_t base) {
    const int64_t pos = base + tid;
    return tid < kStep && pos < end ? (list != nullptr ? __ldg(list + pos) : int(pos)) : -1;
  };
  int entry = load_entry(begin);

  // This thread's rows of the C fragments: lane / 4 and lane / 4 + 8.
  const int ra = lane / 4, rb = ra + 8;
  const int limit_a = s_limit[ra], limit_b = s_limit[rb];
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;
  float o[kHeadDim / 8][4];
#pragma unroll
  for (int n = 0; n < kHeadDim / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  const int k0 = warp * kWarpKeys;  // this warp's keys of a step

  for (int64_t base = begin; base < end; base += kStep) {
    __syncthreads();  // the previous step's K, V, keys and bias are no longer read
    const int key = entry >= 0 && entry < p.K ? entry : -1;
    uint32_t bits = 0;  // bias 0 in every dtype; key 0 stands in for a missing key
    if (tid < kStep) {
      s_key[tid] = key;
      if (has_bias) bits = load_bits(p.bias, p.bias_dtype, bias_row + (key >= 0 ? key : 0) * p.bias_stride[3]);
    }
    __syncthreads();
    for (int x = tid; x < kStep * kChunks; x += kThreads) {
      const int r = x / kChunks, c = x % kChunks;
      const int kr = s_key[r];
      const int64_t at = kr >= 0 ? kr : 0;
      split_impl::cp_async16(&s_kv[0][swz<kHeadDim>(r, c)], k_base + at * p.k_stride[1] + c * 8, kr >= 0);
      split_impl::cp_async16(&s_kv[1][swz<kHeadDim>(r, c)], v_base + at * p.v_stride[1] + c * 8, kr >= 0);
    }
    split_impl::cp_async_commit();
    entry = load_entry(base + kStep);
    if (tid < kStep) s_bias[tid] = bits_to_float(bits, p.bias_dtype);
    split_impl::cp_async_wait<0>();
    __syncthreads();

    // S = Q K^T for this warp's 16 keys: two n8 tiles, kHeadDim / 16 k-steps. ldmatrix x4
    // matrices for Q: (rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15); for K:
    // (keys 0-7, k 0-7), (keys 0-7, k 8-15), (keys 8-15, k 0-7), (keys 8-15, k 8-15).
    float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    const int m = lane / 8;
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      uint32_t a[4], bk[4];
      ldsm_x4(smem_addr(&s_q[swz<kHeadDim>(lane % 16, 2 * kk + lane / 16)]), a);
      ldsm_x4(smem_addr(&s_kv[0][swz<kHeadDim>(k0 + (m / 2) * 8 + lane % 8, 2 * kk + (m % 2))]), bk);
      mma16816<kDType>(sc[0], a, bk[0], bk[1]);
      mma16816<kDType>(sc[1], a, bk[2], bk[3]);
    }

    // Scale, bias and visibility (C fragment: row ra holds elements 0-1, row rb 2-3, at keys
    // n * 8 + 2 * (lane % 4) + e); then the online softmax of rows ra and rb, whose maxima the
    // four lanes of a quad share.
    float mx_a = m_a, mx_b = m_b;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int kl = k0 + n * 8 + 2 * (lane % 4) + e;
        const int kj = s_key[kl];
        const float bias = s_bias[kl];
        sc[n][e] = kj >= 0 && kj <= limit_a ? fmaf(sc[n][e], p.scale, bias) : -INFINITY;
        sc[n][e + 2] = kj >= 0 && kj <= limit_b ? fmaf(sc[n][e + 2], p.scale, bias) : -INFINITY;
        mx_a = fmaxf(mx_a, sc[n][e]);
        mx_b = fmaxf(mx_b, sc[n][e + 2]);
      }
    }
#pragma unroll
    for (int d = 1; d < 4; d *= 2) {
      mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, d));
      mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, d));
    }
    // A row whose max is still -inf shifts by 0 (no NaN).
    const float use_a = mx_a == -INFINITY ? 0.f : mx_a, use_b = mx_b == -INFINITY ? 0.f : mx_b;
    const float alpha_a = exp2f((m_a - use_a) * kLog2e), alpha_b = exp2f((m_b - use_b) * kLog2e);
    m_a = mx_a;
    m_b = mx_b;
    l_a *= alpha_a;
    l_b *= alpha_b;
#pragma unroll
    for (int n = 0; n < kHeadDim / 8; ++n) {
      o[n][0] *= alpha_a;
      o[n][1] *= alpha_a;
      o[n][2] *= alpha_b;
      o[n][3] *= alpha_b;
    }
    float pr[2][4];
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        pr[n][e] = exp2f((sc[n][e] - use_a) * kLog2e);
        pr[n][e + 2] = exp2f((sc[n][e + 2] - use_b) * kLog2e);
        l_a += pr[n][e];
        l_b += pr[n][e + 2];
      }
    }
    // P as the A operand of one k16 step: the two S tiles' C fragments are its four registers.
    const uint32_t pa[4] = {pack2<kDType>(pr[0][0], pr[0][1]), pack2<kDType>(pr[0][2], pr[0][3]),
                            pack2<kDType>(pr[1][0], pr[1][1]), pack2<kDType>(pr[1][2], pr[1][3])};
    // O += P V: V^T fragments by ldmatrix.trans, two d-tiles of 8 per load. Matrices:
    // (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15).
#pragma unroll
    for (int j = 0; j < kHeadDim / 16; ++j) {
      uint32_t bv[4];
      ldsm_x4_trans(smem_addr(&s_kv[1][swz<kHeadDim>(k0 + (m % 2) * 8 + lane % 8, 2 * j + m / 2)]), bv);
      mma16816<kDType>(o[2 * j], pa, bv[0], bv[1]);
      mma16816<kDType>(o[2 * j + 1], pa, bv[2], bv[3]);
    }
  }

  // Row sums over the quad, then each warp's rows into shared memory for store_rows.
#pragma unroll
  for (int d = 1; d < 4; d *= 2) {
    l_a += __shfl_xor_sync(0xffffffffu, l_a, d);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, d);
  }
  __syncthreads();  // K and V are no longer read: they take the warps' outputs
#pragma unroll
  for (int n = 0; n < kHeadDim / 8; ++n) {
    const int col = n * 8 + 2 * (lane % 4);
    s_out[warp][ra][col] = o[n][0];
    s_out[warp][ra][col + 1] = o[n][1];
    s_out[warp][rb][col] = o[n][2];
    s_out[warp][rb][col + 1] = o[n][3];
  }
  if (lane % 4 == 0) {
    s_max[warp][ra] = m_a;
    s_max[warp][rb] = m_b;
    s_sum[warp][ra] = l_a;
    s_sum[warp][rb] = l_b;
  }
  __syncthreads();
  split_impl::store_rows<kDType, kHeadDim, kWarps, kRows>(p, s, split, b, n_rows, s_out, s_max, s_sum, s_head,
                                                          s_query, tid, kThreads);
}

}  // namespace split_mma
}  // namespace cuda
}  // namespace dmattn
