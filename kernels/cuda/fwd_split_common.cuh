// Device helpers of the two split (decode) forward kernels (fwd_split_kernel.cuh on the CUDA cores,
// fwd_split_mma_kernel.cuh on the tensor cores): asynchronous copies, output rounding, and the
// block's last step, which merges its warps and writes a partial (or out and lse).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "dmattn/params.h"
#include "fwd_split.h"

namespace dmattn {
namespace cuda {
namespace split_impl {

constexpr float kLog2e = 1.4426950408889634f;

// 16 bytes global -> shared without passing through registers (zero-filled when !valid, reading
// nothing), so rows in flight cost no registers. The "memory" clobbers keep the compiler from
// moving shared-memory reads across the copies and waits.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Row r (< the kernel's rows) of a split block whose rows start at r0 of head group h0 (n_rows of
// them): head h0 + (r0 + r) / Q and query (r0 + r) % Q, and the last key it may see (bottom-right
// causal: i + K - Q). Rows past n_rows repeat the last one (valid addresses) and see no key (-1).
struct SplitRow {
  int h, i, limit;
};
__device__ __forceinline__ SplitRow split_row(const FwdParams& p, int h0, int r0, int n_rows, int r) {
  const int rr = r0 + min(r, n_rows - 1);
  const int h = h0 + rr / p.Q, i = rr % p.Q;
  return SplitRow{h, i, r >= n_rows ? -1 : p.causal ? i + p.K - p.Q : p.K - 1};
}

// Offset of the row that head h, query i of batch b reads in a bias or mask of `heads` heads with
// these element strides (stride 0 on size-1 dimensions): head h reads head h * heads / H, in 32
// bits (H <= 65535, checked by the binding).
__device__ __forceinline__ int64_t broadcast_row(const int64_t (&stride)[4], int heads, int H, int b, int h, int i) {
  return b * stride[0] + int64_t(unsigned(h) * unsigned(heads) / unsigned(H)) * stride[1] + int64_t(i) * stride[2];
}

// One output element, rounded to nearest even.
template <DType kDType>
__device__ __forceinline__ unsigned short pack1(float x) {
  if constexpr (kDType == DType::f16) {
    return __half_as_ushort(__float2half_rn(x));
  } else {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
}

// The end of a split block: each warp has left its unnormalised output rows, row maxima (natural
// units, -inf for a row that saw no key) and row sums in shared memory; they are merged in warp
// order (deterministic) and the block's n_rows rows (row r: head s_head[r], query s_query[r]) are
// written as split `split`'s partial, or, when the call has one split, as out and lse.
template <DType kDType, int kHeadDim, int kWarps, int kRows>
__device__ __forceinline__ void store_rows(const FwdParams& p, const FwdSplitLaunch& s, int split, int b, int n_rows,
                                           const float (*s_out)[kRows][kHeadDim], const float (*s_max)[kRows],
                                           const float (*s_sum)[kRows], const int* s_head, const int* s_query,
                                           int tid, int threads) {
  for (int x = tid; x < n_rows * kHeadDim; x += threads) {
    const int r = x / kHeadDim;
    const int d = x % kHeadDim;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_max[w][r]);
    const float m_use = mx == -INFINITY ? 0.f : mx;
    float o = 0.f, sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float wt = exp2f((s_max[w][r] - m_use) * kLog2e);
      o = fmaf(s_out[w][r][d], wt, o);
      sum = fmaf(s_sum[w][r], wt, sum);
    }
    const int h = s_head[r];
    const int i = s_query[r];
    if (s.splits == 1) {
      const bool any = sum > 0.f;
      unsigned short* out = static_cast<unsigned short*>(p.out) + b * p.out_stride[0] + int64_t(i) * p.out_stride[1] +
                            int64_t(h) * p.out_stride[2];
      out[d] = pack1<kDType>(any ? o * (1.f / sum) : 0.f);
      if (d == 0) p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + i] = any ? mx + logf(sum) : -INFINITY;
    } else {
      const int64_t part = int64_t(split) * s.rows + (int64_t(b) * p.H + h) * p.Q + i;
      s.part_o[part * kHeadDim + d] = o;
      if (d == 0) {
        s.part_m[part] = mx;
        s.part_l[part] = sum;
      }
    }
  }
}

}  // namespace split_impl
}  // namespace cuda
}  // namespace dmattn
