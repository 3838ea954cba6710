// The split (decode) forward kernel (fwd_split.h): plain CUDA, float32 math on the CUDA cores. At
// a few query rows per kv head the products are tiny (Q = 1, GQA group 4, 2048 keys: 4 x 2048 x
// 128 multiply-adds per kv head and product); what counts is having enough K/V rows in flight.
// It computes every split call that the tensor-core kernel (fwd_split_mma_kernel.cuh, head dims 64
// and 128 without softcap, mask or a bias row that varies within a block) does not take;
// launch_fwd_split at the end of this file picks between them (FwdSplitLaunch::mma).
//
// Thread block (split s, head group, batch b), fwd_split_tile(D): `rows` query rows (head, query)
// of heads that share one kv head and one key list, over list entries [s * chunk, (s + 1) * chunk)
// (DENSE: keys); padding entries and keys a row may not see causally are skipped per element. Lanes are grouped by
// `lanes` per key row, 8 elements each (one 16-byte copy), so a warp holds 32 / lanes keys at once;
// each warp takes its own keys of every step (`unroll` per lane group) and keeps its own online
// softmax (row max shared by the warp, sum and output per lane group). K/V rows go to shared memory
// by cp.async, two stages: a step's rows arrive while the previous step is computed, without
// holding registers. At the end the lane groups, then the warps, are merged in a fixed order through shared
// memory, and the block writes its partial (or, when it is the only split, out and lse).
//
// Instruction fetch bounds this kernel: a block walks its loop body only twice (D128k: 64 entries,
// two steps), so every SM fetches the executed code once from L2 and waits on it (ncu, H200, D128k:
// "no instruction" 47% of the stalls, 8416 SASS instructions for bf16 D = 128). Hence the
// block-uniform branch between the short common scoring (one bias/mask row per block, no softcap)
// and the general one: 21.3 -> 12.1 us at D128k (torch.profiler). Then the rows' heads, queries,
// bias/mask offsets and causal limits worked out once per row into shared memory (the prologue's
// divisions, 64-bit ones among them, were ~900 instructions), and list entries and bias values
// loaded without being looked at until they are used (each was waited for under its own branch):
// 4176 instructions, 12.1 -> 8.2 us.
//
// Row max and sums are in natural units as in fwd_kernel.cuh (lse = max + log(sum)); a row that saw
// no key keeps max = -inf and sum 0, shifts by 0 (no NaN) and ends as out 0, lse -inf.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "check.h"
#include "elements.cuh"
#include "fwd_split.h"
#include "fwd_split_common.cuh"
#include "fwd_split_mma_kernel.cuh"
#include "launch.h"
#include "tiles.h"

namespace dmattn {
namespace cuda {
namespace split_impl {

template <int kHeadDim_>
struct SplitTraits {
  static constexpr FwdSplitTile kTile = fwd_split_tile(kHeadDim_);
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kRows = kTile.rows;
  static constexpr int kWarps = kTile.warps;
  static constexpr int kLanes = kTile.lanes;
  static constexpr int kUnroll = kTile.unroll;
  static constexpr int kStep = kTile.step;
  static constexpr int kSlots = 32 / kLanes;  // keys a warp holds at once
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kVec = 8;  // elements per lane per key row
  static_assert(kStep == kWarps * kSlots * kUnroll, "tiles.h: step = warps * (32 / lanes) * unroll");
  static_assert(kLanes * kVec >= kHeadDim && kLanes * kVec < 2 * kHeadDim, "lanes cover the head dim once");
  static_assert(kHeadDim % kVec == 0, "head dims are multiples of 8");
};

// 8 consecutive elements (one 16-byte load) as floats.
template <DType kDType>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&f)[8]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (kDType == DType::f16) {
      f[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
      f[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
    } else {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
}

template <DType kDType, class Traits>
__global__ void __launch_bounds__(Traits::kThreads, Traits::kTile.blocks_per_sm)
    dma_fwd_split_kernel(const FwdParams p, const FwdSplitLaunch s) {
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kRows = Traits::kRows;
  constexpr int kWarps = Traits::kWarps;
  constexpr int kLanes = Traits::kLanes;
  constexpr int kUnroll = Traits::kUnroll;
  constexpr int kSlots = Traits::kSlots;
  constexpr int kStep = Traits::kStep;
  constexpr int kThreads = Traits::kThreads;

  // Two stages of every lane's K and V chunks (16 KiB each); after the loop the same memory holds
  // the warps' partial outputs for the merge.
  __shared__ uint4 s_kv[2][2][kUnroll][kThreads];
  __shared__ float s_max[kWarps][kRows];
  __shared__ float s_sum[kWarps][kRows];
  __shared__ int s_limit[kRows];
  __shared__ int s_head[kRows], s_query[kRows];
  __shared__ int64_t s_bias_row[kRows], s_mask_row[kRows];
  static_assert(sizeof(float) * kWarps * kRows * kHeadDim <= sizeof(s_kv), "merge buffer fits in the stages");
  float(&s_out)[kWarps][kRows][kHeadDim] = *reinterpret_cast<float(*)[kWarps][kRows][kHeadDim]>(&s_kv[0][0][0][0]);

  pdl_launch_next();
  if (!s.inputs_ready) pdl_wait();  // else after loading q, before the list (launch.h)
  const int tid = int(threadIdx.x);
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int slot = lane / kLanes;                 // which of the warp's keys this lane works on
  const int d0 = (lane % kLanes) * Traits::kVec;  // its first element of the row
  const bool has_dims = d0 < kHeadDim;            // D = 96: 4 of every 16 lanes hold no elements

  const int tile = int(blockIdx.x) % s.row_tiles;
  const int split = int(blockIdx.x) / s.row_tiles;
  const int h0 = int(blockIdx.y) * s.heads;
  const int b = int(blockIdx.z);
  const int g = h0 / (p.H / p.H_kv);
  const int r0 = tile * kRows;
  const int n_rows = min(kRows, s.heads * p.Q - r0);

  // Row r of the block: head h0 + (r0 + r) / Q, query (r0 + r) % Q. Rows past n_rows repeat the
  // last one (valid addresses) and are masked out. Thread r works out row r once: its head, query,
  // bias and mask offsets and the last key it may see (-1 past n_rows), which the block then reads
  // from shared memory. Computed by every thread for every row, the divisions made the prologue
  // ~900 instructions, each fetched once per SM (the kernel's blocks run two loop steps).
  if (tid < kRows) {
    const SplitRow row = split_row(p, h0, r0, n_rows, tid);
    s_head[tid] = row.h;
    s_query[tid] = row.i;
    s_bias_row[tid] = broadcast_row(p.bias_stride, p.bias_heads, p.H, b, row.h, row.i);
    s_mask_row[tid] = broadcast_row(p.mask_stride, p.mask_heads, p.H, b, row.h, row.i);
    s_limit[tid] = row.limit;
  }
  __syncthreads();
  // Bias and mask offsets of a row. When every row of the block reads the same one (a
  // query-broadcast bias of one head for all of them), one load per key serves all rows, issued a
  // step ahead like the K/V rows; otherwise each row loads its own when its scores are formed.
  const bool has_bias = p.bias != nullptr;
  const bool has_mask = p.mask != nullptr;
  const int64_t bias_row0 = has_bias ? s_bias_row[0] : 0;
  const int64_t mask_row0 = has_mask ? s_mask_row[0] : 0;
  bool bias_per_row = false, mask_per_row = false;
#pragma unroll
  for (int r = 1; r < kRows; ++r) {
    bias_per_row = bias_per_row || (has_bias && s_bias_row[r] != bias_row0);
    mask_per_row = mask_per_row || (has_mask && s_mask_row[r] != mask_row0);
  }
  const bool general = bias_per_row || mask_per_row || p.softcap > 0.f;

  // The stretch of the list (or of the keys) this split walks. The per-block counts are not read:
  // with Q <= kFwdSplitMaxQ every query is in the first query block, which holds the last query,
  // which sees every listed key, so the count would only cut the padding (key K), which is skipped
  // per key anyway; not waiting for it saves a dependent load before the list entries.
  const int32_t* list = nullptr;
  int64_t limit = p.K;
  if (p.idx != nullptr) {
    list = p.idx + selection_row(p, b, h0) * p.list_len;
    limit = p.list_len;
  }
  const int64_t begin = min(int64_t(split) * s.chunk, limit);
  const int64_t end = min(begin + s.chunk, limit);

  const unsigned short* k_ptr =
      static_cast<const unsigned short*>(p.k) + b * p.k_stride[0] + g * p.k_stride[2] + (has_dims ? d0 : 0);
  const unsigned short* v_ptr =
      static_cast<const unsigned short*>(p.v) + b * p.v_stride[0] + g * p.v_stride[2] + (has_dims ? d0 : 0);

  float q[kRows][8];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (r < n_rows && has_dims) {
      raw = __ldg(reinterpret_cast<const uint4*>(static_cast<const unsigned short*>(p.q) + b * p.q_stride[0] +
                                                 int64_t(s_query[r]) * p.q_stride[1] +
                                                 int64_t(s_head[r]) * p.q_stride[2] + d0));
    }
    unpack8<kDType>(raw, q[r]);
  }

  if (s.inputs_ready) pdl_wait();  // the list is the previous kernel's output

  float row_max[kRows], row_sum[kRows], acc[kRows][8];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[r][e] = 0.f;
  }

  // This lane's list entry of unroll step u of the step at list position `base` (its key; -1 past
  // the stretch), loaded and not looked at: issue() checks it two steps later, so the loads of a
  // step are in flight together instead of each being waited for under its bounds test (ncu,
  // H200, D128k: one memory round trip per entry, then one per bias value).
  const int lane_first = warp * kSlots + slot;
  auto load_keys = [&](int64_t base, int (&keys)[kUnroll]) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t pos = base + u * kWarps * kSlots + lane_first;
      keys[u] = pos >= end ? -1 : list != nullptr ? __ldg(list + pos) : int(pos);
    }
  };
  // Issues a step: its keys checked (outside 0..K-1, padding included: -1), their K/V rows into
  // `stage`, and (in registers) the bias bits (load_bits) and mask bit each key has for every row
  // of the block. A masked key keeps its rows (they are loaded anyway).
  auto issue = [&](int stage, int (&keys)[kUnroll], uint32_t (&key_bits)[kUnroll], unsigned& key_ok) {
    key_ok = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (keys[u] >= p.K) keys[u] = -1;
      const bool ok_key = keys[u] >= 0;
      const bool valid = ok_key && has_dims;
      cp_async16(&s_kv[stage][0][u][tid], valid ? k_ptr + keys[u] * p.k_stride[1] : k_ptr, valid);
      cp_async16(&s_kv[stage][1][u][tid], valid ? v_ptr + keys[u] * p.v_stride[1] : v_ptr, valid);
      key_bits[u] = 0;  // bias 0 in every dtype
      if (has_bias && !bias_per_row) {  // block-uniform; key 0 stands in for a missing key
        key_bits[u] = load_bits(p.bias, p.bias_dtype, bias_row0 + (ok_key ? keys[u] : 0) * p.bias_stride[3]);
      }
      bool ok = ok_key;
      if (ok && has_mask && !mask_per_row) ok = __ldg(p.mask + mask_row0 + keys[u] * p.mask_stride[3]) != 0;
      key_ok |= unsigned(ok) << u;
    }
    cp_async_commit();
  };

  const float scale = p.scale;
  const float softcap = p.softcap;
  const float scale_over_cap = softcap > 0.f ? p.scale / softcap : 0.f;

  // Pipeline: step t computes from one stage while step t + 1's rows arrive in the other, and
  // step t + 2's list entries are read. Each lane reads back only the K/V chunks it copied itself,
  // so waiting for its own cp.async groups is all the synchronisation the stages need.
  int keys[kUnroll], next_keys[kUnroll];
  uint32_t key_bits[kUnroll];
  unsigned key_ok = 0;
  load_keys(begin, keys);
  if (begin < end) issue(0, keys, key_bits, key_ok);
  load_keys(begin + kStep, next_keys);
  int stage = 0;

  for (int64_t base = begin; base < end; base += kStep) {
    const bool more = base + kStep < end;
    uint32_t next_bits[kUnroll];
    unsigned next_ok = 0;
    if (more) issue(stage ^ 1, next_keys, next_bits, next_ok);
    int later_keys[kUnroll];
    load_keys(base + 2 * kStep, later_keys);
    if (more) {
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }

    // Scores: this lane's 8 products per (key, row), summed over the key's lane group.
    float sc[kUnroll][kRows];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float kf[8];
      unpack8<kDType>(s_kv[stage][0][u][tid], kf);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) dot = fmaf(q[r][e], kf[e], dot);
        sc[u][r] = dot;
      }
    }
#pragma unroll
    for (int o = kLanes / 2; o > 0; o /= 2) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) sc[u][r] += __shfl_xor_sync(0xffffffffu, sc[u][r], o);
      }
    }

    // Scale (or softcap), bias, then -inf wherever the key is not visible to the row. The common
    // case (no softcap, one bias/mask row for the whole block, already loaded per key) takes the
    // short branch; the other is long (tanhf and a row's bias/mask address per key and row) but
    // block-uniform, so a block fetches only the instructions of its own branch.
    if (!general) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const bool ok = (key_ok >> u) & 1u;
        const float key_bias = bits_to_float(key_bits[u], p.bias_dtype);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          sc[u][r] = ok && keys[u] <= s_limit[r] ? fmaf(sc[u][r], scale, key_bias) : -INFINITY;
        }
      }
    } else {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int key = keys[u];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          float x = softcap > 0.f ? softcap * tanhf(sc[u][r] * scale_over_cap) : sc[u][r] * scale;
          bool visible = ((key_ok >> u) & 1u) && key <= s_limit[r];
          if (visible && has_bias) {
            x += bias_per_row ? load_float(p.bias, p.bias_dtype, s_bias_row[r] + key * p.bias_stride[3])
                              : bits_to_float(key_bits[u], p.bias_dtype);
          }
          if (visible && mask_per_row) visible = __ldg(p.mask + s_mask_row[r] + key * p.mask_stride[3]) != 0;
          sc[u][r] = visible ? x : -INFINITY;
        }
      }
    }

    // Online softmax in base 2, the max shared by the warp's lane groups. A row whose max is still
    // -inf shifts by 0.
    float shift[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) mx = fmaxf(mx, sc[u][r]);
#pragma unroll
      for (int o = kLanes; o < 32; o *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_use = mx == -INFINITY ? 0.f : mx;
      const float alpha = exp2f((row_max[r] - m_use) * kLog2e);
      row_max[r] = mx;
      row_sum[r] *= alpha;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[r][e] *= alpha;
      shift[r] = m_use * kLog2e;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float vf[8];
      unpack8<kDType>(s_kv[stage][1][u][tid], vf);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float e_ur = exp2f(fmaf(sc[u][r], kLog2e, -shift[r]));
        row_sum[r] += e_ur;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[r][e] = fmaf(e_ur, vf[e], acc[r][e]);
      }
    }

#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      keys[u] = next_keys[u];
      next_keys[u] = later_keys[u];
      key_bits[u] = next_bits[u];
    }
    key_ok = next_ok;
    stage ^= 1;
  }

  // Lane groups of a warp -> the warp (same max, so plain sums), then warps -> the block in
  // warp order.
#pragma unroll
  for (int o = kLanes; o < 32; o *= 2) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], o);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[r][e] += __shfl_xor_sync(0xffffffffu, acc[r][e], o);
    }
  }
  __syncthreads();  // every warp is done with the stages, which now take the partial outputs
  if (slot == 0 && has_dims) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int e = 0; e < 8; ++e) s_out[warp][r][d0 + e] = acc[r][e];
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      s_max[warp][r] = row_max[r];
      s_sum[warp][r] = row_sum[r];
    }
  }
  __syncthreads();

  store_rows<kDType, kHeadDim, kWarps, kRows>(p, s, split, b, n_rows, s_out, s_max, s_sum, s_head, s_query, tid,
                                              kThreads);
}

}  // namespace split_impl

template <DType kDType, int kHeadDim>
void launch_fwd_split(const FwdParams& params, const FwdSplitLaunch& launch, cudaStream_t stream) {
  const dim3 grid(unsigned(launch.row_tiles * launch.splits), unsigned(params.H / launch.heads), unsigned(params.B));
  if constexpr (fwd_split_mma_head_dim(kHeadDim)) {
    if (launch.mma) {
      launch_kernel(split_mma::dma_fwd_split_mma_kernel<kDType, kHeadDim>, grid, dim3(split_mma::kThreads), stream,
                    pdl_available(), "dma_fwd_split_mma_kernel launch", params, launch);
      return;
    }
  }
  using Traits = split_impl::SplitTraits<kHeadDim>;
  launch_kernel(split_impl::dma_fwd_split_kernel<kDType, Traits>, grid, dim3(Traits::kThreads), stream, pdl_available(),
                "dma_fwd_split_kernel launch", params, launch);
}

}  // namespace cuda
}  // namespace dmattn
