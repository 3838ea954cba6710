// The forward of dynamic mask attention for sm_80 and newer, written with CuTe in the
// FlashAttention-2 pattern: one thread block owns block_m query rows of one (batch, head), keeps
// S = Q K^T and O in registers (mma.sync m16n8k16, float32 accumulation), and walks the keys in
// tiles of block_n with an online softmax.
//
// Keys are visited in one of three ways, told apart at run time by params.idx and params.death:
// - DENSE: tile t holds keys t*block_n .. +block_n-1, up to the causal limit of the block.
// - LIST: tile t holds the entries t*block_n .. of the selection row's ascending key list, up to
//   the block's count (the prefix the block may see causally); K and V rows are gathered through
//   the indices.
// - PREFIX (visible scope): as LIST, over the query block's own list of alive keys (visible.h),
//   and a key is also tested against its death position: query i sees key j iff
//   j <= i + K - Q < death_j.
// All are the same code: every tile row is "a key index or none", computed by the threads that
// load that row. Those threads also publish the key and its query-broadcast bias value, mask bit
// and death position in shared memory (sKey, sBias, sDeath), so the score step reads small arrays
// per tile instead of gathering from global memory per element.
//
// Pipeline per tile t (one shared-memory buffer each for K and V, as FlashAttention-2's forward):
//   wait K(t) ; sync ; issue V(t) ; read list entries of t+1 ; S = Q K(t)^T ; scale, bias, mask
//   wait V(t) ; sync ; issue K(t+1) and the bias/mask loads of t+1 ; softmax ; O += P V(t)
//   publish the key metadata of t+1 (read after the next sync)
// so V loads overlap the first GEMM and K loads overlap softmax and the second GEMM.
//
// Empty rows (no visible key) end with l = 0: out 0 and lse -inf, with no NaN on the way (a row
// whose running max is -inf shifts by 0, so every exp is exp(-inf) = 0).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include "check.h"
#include "elements.cuh"
#include "fwd.h"
#include "tiles.h"

namespace dmattn {
namespace cuda {
namespace fwd_impl {

using namespace cute;

template <DType kDType>
struct CuteElement;
template <>
struct CuteElement<DType::f16> {
  using type = cutlass::half_t;
  using mma = SM80_16x8x16_F32F16F16F32_TN;
};
template <>
struct CuteElement<DType::bf16> {
  using type = cutlass::bfloat16_t;
  using mma = SM80_16x8x16_F32BF16BF16F32_TN;
};

template <DType kDType, int kHeadDim_>
struct FwdTraits {
  using Element = typename CuteElement<kDType>::type;
  static constexpr FwdTile kTile = fwd_tile(kHeadDim_);
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kTile.block_m;
  static constexpr int kBlockN = kTile.block_n;
  static constexpr int kWarps = kTile.warps;
  static constexpr int kThreads = kWarps * 32;
  static_assert(kHeadDim % 32 == 0, "head dims are multiples of 32");
  static_assert(kBlockM == 16 * kWarps * (kBlockM / (16 * kWarps)), "warps stack along query rows");
  static_assert(kBlockN % 16 == 0, "P is the A operand of a k16 MMA");

  // Each warp computes 16-row slabs of S and O; the 16-wide N tile makes two adjacent n8 blocks of S
  // one k16 block of P for the second GEMM.
  using TiledMma = TiledMMA<MMA_Atom<typename CuteElement<kDType>::mma>, Layout<Shape<Int<kWarps>, _1, _1>>,
                            Tile<Int<16 * kWarps>, _16, _16>>;

  // Shared-memory rows are split into 64-element (128-byte) pages with an XOR swizzle, so ldmatrix
  // and the 16-byte cp.async stores are free of bank conflicts; D = 32 and 96 use 32-element pages.
  static constexpr int kPage = kHeadDim % 64 == 0 ? 64 : 32;
  static constexpr int kSwizzleBits = kPage == 64 ? 3 : 2;
  using SmemLayoutAtom =
      decltype(composition(Swizzle<kSwizzleBits, 3, 3>{}, Layout<Shape<_8, Int<kPage>>, Stride<Int<kPage>, _1>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // V read as (D, block_n): the B operand of O += P V.
  using SmemLayoutVt =
      decltype(composition(SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutVtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutVt{}));

  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomT = Copy_Atom<SM75_U16x8_LDSM_T, Element>;
  using SmemCopyAtomO = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>;

  // Global <-> shared: 16 bytes per thread per copy, one page per row of threads.
  static constexpr int kElemsPerCopy = 8;
  static constexpr int kThreadsPerRow = kPage / kElemsPerCopy;
  using GmemThreads =
      Layout<Shape<Int<kThreads / kThreadsPerRow>, Int<kThreadsPerRow>>, Stride<Int<kThreadsPerRow>, _1>>;
  using GmemCopyIn = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{},
                                              GmemThreads{}, Layout<Shape<_1, Int<kElemsPerCopy>>>{}));
  using GmemCopyOut = decltype(make_tiled_copy(Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>{},
                                               GmemThreads{}, Layout<Shape<_1, Int<kElemsPerCopy>>>{}));
  static_assert(kBlockN % (kThreads / kThreadsPerRow) == 0, "every thread loads the same number of key rows");
  static constexpr int kLoadRows = kBlockN / (kThreads / kThreadsPerRow);  // key rows per thread per tile

  static constexpr int kSmemQKVBytes =
      int((cosize(SmemLayoutQ{}) + 2 * cosize(SmemLayoutKV{})) * sizeof(Element));
  // sKey (int32), sBias (float32) and sDeath (int32) per key of the tile.
  static constexpr int kSmemBytes = kSmemQKVBytes + kBlockN * 12;
};

// The bias loads of every kernel (elements.cuh), under the name the backward imports from here.
using ::dmattn::cuda::load_float;

// The 4 threads of a quad hold one accumulator row between them.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x + __shfl_xor_sync(0xffffffffu, x, 1);
}

// Accumulator (4, MMA_M, MMA_N) -> (rows (2, MMA_M), cols (2, MMA_N)): an m16n8 accumulator gives
// each thread 2 adjacent columns in rows r and r + 8, value v = col + 2 * row.
template <class L>
CUTE_HOST_DEVICE auto rowcol(L layout) {
  auto d = logical_divide(layout, Shape<_2>{});  // ((2, 2), MMA_M, MMA_N)
  return make_layout(make_layout(get<0, 1>(d), get<1>(d)), make_layout(get<0, 0>(d), get<2>(d)));
}

// Accumulator (4, MMA_M, MMA_N) of S -> A operand ((4, 2), MMA_M, MMA_N / 2) of the k16 MMA with P:
// n8 blocks 2j and 2j+1 of S are k16 block j of P.
template <class L>
CUTE_HOST_DEVICE auto acc_as_a(L layout) {
  auto d = logical_divide(layout, Shape<Underscore, Underscore, _2>{});  // (4, MMA_M, (2, MMA_N / 2))
  return make_layout(make_layout(get<0>(d), get<2, 0>(d)), get<1>(d), get<2, 1>(d));
}

// A register fragment converted to another element type (an owning copy with the same layout).
template <class To, class Engine, class L>
__device__ __forceinline__ auto convert_fragment(Tensor<Engine, L> const& t) {
  using From = typename Engine::value_type;
  constexpr int N = decltype(size(t))::value;
  cutlass::NumericArrayConverter<To, From, N> convert;
  auto out = make_tensor<To>(t.layout());
  *reinterpret_cast<cutlass::Array<To, N>*>(out.data()) =
      convert(*reinterpret_cast<cutlass::Array<From, N> const*>(t.data()));
  return out;
}

// acc += A B^T with both operands in shared memory; the ldmatrix of k-block i+1 is issued before
// the MMAs of k-block i.
template <class Acc, class RA, class RB, class SA, class SB, class Mma, class CopyA, class CopyB, class ThrA,
          class ThrB>
__device__ __forceinline__ void gemm_smem(Acc& acc, RA& rA, RB& rB, SA const& sA, SB const& sB, Mma const& mma,
                                          CopyA const& copy_a, CopyB const& copy_b, ThrA const& thr_a,
                                          ThrB const& thr_b) {
  Tensor rA_view = thr_a.retile_D(rA);
  Tensor rB_view = thr_b.retile_D(rB);
  copy(copy_a, sA(_, _, _0{}), rA_view(_, _, _0{}));
  copy(copy_b, sB(_, _, _0{}), rB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int i = 0; i < size<2>(rA); ++i) {
    if (i + 1 < size<2>(rA)) {
      copy(copy_a, sA(_, _, i + 1), rA_view(_, _, i + 1));
      copy(copy_b, sB(_, _, i + 1), rB_view(_, _, i + 1));
    }
    gemm(mma, rA(_, _, i), rB(_, _, i), acc);
  }
}

// acc += A B^T with A already in registers (P) and B in shared memory (V^T).
template <class Acc, class RA, class RB, class SB, class Mma, class CopyB, class ThrB>
__device__ __forceinline__ void gemm_reg_smem(Acc& acc, RA const& rA, RB& rB, SB const& sB, Mma const& mma,
                                              CopyB const& copy_b, ThrB const& thr_b) {
  Tensor rB_view = thr_b.retile_D(rB);
  copy(copy_b, sB(_, _, _0{}), rB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int i = 0; i < size<2>(rA); ++i) {
    if (i + 1 < size<2>(rA)) copy(copy_b, sB(_, _, i + 1), rB_view(_, _, i + 1));
    gemm(mma, rA(_, _, i), rB(_, _, i), acc);
  }
}

// Key index of each of this thread's rows of tile t (coordinates tKVc), -1 past the block's
// limit or for a list entry outside 0..K-1.
template <int kBlockN, int kLoadRows, class Coords>
__device__ __forceinline__ void tile_keys(int t, Coords const& tKVc, int limit, const int32_t* list, int K,
                                          int (&keys)[kLoadRows]) {
  CUTE_UNROLL
  for (int m = 0; m < kLoadRows; ++m) {
    const int pos = t * kBlockN + get<0>(tKVc(0, m, 0));
    int key = -1;
    if (pos < limit) {
      key = list != nullptr ? __ldg(list + pos) : pos;
      if (key < 0 || key >= K) key = -1;
    }
    keys[m] = key;
  }
}

// cp.async of a tile of contiguous rows starting at row m0 (view tXg, coordinates tXc relative to
// the tile); rows at or past n_rows are zero-filled, so they give finite products that the
// visibility test then drops (Q and dO blocks of every CUDA kernel).
template <class GmemCopy, class Src, class Dst, class Coords>
__device__ __forceinline__ void load_contiguous(GmemCopy const& gmem_copy, Src const& tXg, Dst&& tXs,
                                                Coords const& tXc, int m0, int n_rows) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(tXs); ++m) {
    const bool row_ok = m0 + get<0>(tXc(0, m, 0)) < n_rows;
    CUTE_UNROLL
    for (int kk = 0; kk < size<2>(tXs); ++kk) {
      if (row_ok) {
        copy(gmem_copy, tXg(_, m, kk), tXs(_, m, kk));
      } else {
        clear(tXs(_, m, kk));
      }
    }
  }
}

// cp.async of this thread's chunks of the tile rows. tXg holds only column offsets (row stride 0);
// the row's key index times row_stride adds the rest. Rows without a key are zero-filled: K so
// that S stays finite, V so that P = 0 times it is 0.
template <int kLoadRows, class GmemCopy, class SrcCols, class Dst>
__device__ __forceinline__ void load_rows(GmemCopy const& gmem_copy, SrcCols const& tXg, Dst& tXs, int64_t row_stride,
                                          const int (&keys)[kLoadRows]) {
  CUTE_UNROLL
  for (int m = 0; m < kLoadRows; ++m) {
    CUTE_UNROLL
    for (int kk = 0; kk < size<2>(tXs); ++kk) {
      if (keys[m] >= 0) {
        Tensor src = make_tensor(tXg(_, m, kk).data() + int64_t(keys[m]) * row_stride, tXg(_, m, kk).layout());
        copy(gmem_copy, src, tXs(_, m, kk));
      } else {
        clear(tXs(_, m, kk));
      }
    }
  }
}

// What the score step needs per key of a tile, beyond the key itself: the query-broadcast bias
// value and mask bit, and on the PREFIX path (visible scope) the key's death position (a query
// with causal limit c sees key j iff j <= c < death_j; kNoDeath elsewhere). Loaded into registers
// early (load) and published in shared memory late (store), so the load latency hides behind the
// softmax and the second GEMM.
constexpr int kNoDeath = 0x7FFFFFFF;

template <int kLoadRows>
struct KeyMeta {
  float bias[kLoadRows];
  bool allowed[kLoadRows];
  int death[kLoadRows];

  // death_row: the selection row's death positions (PREFIX), else nullptr.
  __device__ __forceinline__ void load(const FwdParams& p, const int (&keys)[kLoadRows], bool writer,
                                       bool bias_per_key, bool mask_per_key, int64_t bias_base, int64_t mask_base,
                                       const int32_t* death_row) {
    CUTE_UNROLL
    for (int m = 0; m < kLoadRows; ++m) {
      bias[m] = 0.f;
      allowed[m] = true;
      death[m] = kNoDeath;
      if (writer && keys[m] >= 0) {
        if (bias_per_key) bias[m] = load_float(p.bias, p.bias_dtype, bias_base + keys[m] * p.bias_stride[3]);
        if (mask_per_key) allowed[m] = __ldg(p.mask + mask_base + keys[m] * p.mask_stride[3]) != 0;
        if (death_row != nullptr) death[m] = __ldg(death_row + keys[m]);
      }
    }
  }

  template <class Coords>
  __device__ __forceinline__ void store(Coords const& tKVc, const int (&keys)[kLoadRows], bool writer, int* sKey,
                                        float* sBias, int* sDeath) const {
    if (!writer) return;
    CUTE_UNROLL
    for (int m = 0; m < kLoadRows; ++m) {
      const int r = get<0>(tKVc(0, m, 0));
      sKey[r] = allowed[m] ? keys[m] : -1;
      sBias[r] = bias[m];
      sDeath[r] = death[m];
    }
  }
};

// The selection row of (batch b, query head h) in the LIST/PREFIX metadata.
using ::dmattn::cuda::selection_row;  // fwd_params.h

// How far a query block walks and through which list: DENSE, contiguous keys (list nullptr) up to
// the causal limit; LIST, the prefix of the row's list the block may see; PREFIX (p.death), the
// block's own list of alive keys, and the row's death positions.
__device__ __forceinline__ int block_keys(const FwdParams& p, int b, int h, int m_block, int block_m,
                                          const int32_t** list, const int32_t** death_row) {
  *list = nullptr;
  *death_row = nullptr;
  if (p.idx != nullptr) {
    const int64_t row = selection_row(p, b, h);
    if (p.death != nullptr) {
      const int64_t blk = row * p.n_query_blocks + m_block;
      *list = p.idx + blk * p.list_len;
      *death_row = p.death + row * int64_t(p.K);
      return max(0, int(min(int64_t(p.counts[blk * 2]), p.list_len)));
    }
    *list = p.idx + row * p.list_len;
    return max(0, int(min(int64_t(p.counts[row * p.n_query_blocks + m_block]), p.list_len)));
  }
  const int m0 = m_block * block_m;
  if (p.causal) return max(0, min(min(m0 + block_m, p.Q) + p.K - p.Q, p.K));
  return p.K;
}

// 2^x as one MUFU.EX2 (ex2.approx.ftz: about 2 ulp, denormal results flushed to 0; -inf gives 0).
// exp2f wraps the same instruction in range fix-ups, a few instructions per score that the softmax
// and the backward's element-wise steps notice (H200, T32k: the sm_90a dk/dv kernel 3.80 -> 2.42 ms
// together with the changes of bwd_sm90_kernel.cuh's element-wise step).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// One row of a key tile through the online softmax, in base 2: p = 2^(s log2e - m log2e). Updates
// the row's running max and sum, replaces its scores by p, and returns alpha, the factor O's row
// must be rescaled by. A row whose max is still -inf shifts by 0, so every p of it is 0 and alpha is
// 0 (never inf - inf). s_rc: the thread's scores as (rows, columns).
template <class TS>
__device__ __forceinline__ float softmax_row(TS& s_rc, int mi, float& row_max, float& row_sum) {
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr int kCols = decltype(size<1>(s_rc))::value;
  float mx = row_max;
  CUTE_UNROLL
  for (int ni = 0; ni < kCols; ++ni) mx = fmaxf(mx, s_rc(mi, ni));
  mx = quad_max(mx);
  const float m_use = mx == -INFINITY ? 0.f : mx;
  const float alpha = fast_exp2((row_max - m_use) * kLog2e);
  row_max = mx;
  row_sum *= alpha;
  const float shift = m_use * kLog2e;
  CUTE_UNROLL
  for (int ni = 0; ni < kCols; ++ni) {
    const float e = fast_exp2(fmaf(s_rc(mi, ni), kLog2e, -shift));
    s_rc(mi, ni) = e;
    row_sum += e;
  }
  return alpha;
}

// Raw scores times the softmax scale, or softcap * tanh(score * scale / softcap) with a softcap
// (scale_over_cap = scale / softcap).
template <class TS>
__device__ __forceinline__ void scale_scores(TS& acc_s, float scale, float softcap, float scale_over_cap) {
  if (softcap > 0.f) {
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) acc_s(i) = softcap * tanhf(acc_s(i) * scale_over_cap);
  } else {
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) acc_s(i) *= scale;
  }
}

// The end of the online softmax for a thread's rows: O divided by the row sums (a row without keys
// stays 0) and, from one thread of each quad, the rows' log-sum-exp into lse_ptr (-inf for a row
// without keys; rows at or past Q are not written). o_rc, c_rc: the thread's O accumulator and its
// identity coordinates viewed as (rows, columns); row_max in natural units.
template <int kRows, class TO, class TC>
__device__ __forceinline__ void finish_rows(TO& o_rc, TC const& c_rc, const float (&row_max)[kRows],
                                            const float (&row_sum)[kRows], float* lse_ptr, int m0, int Q) {
  float row_lse[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const float sum = quad_sum(row_sum[mi]);
    const bool any = sum > 0.f;
    const float inv = any ? 1.f / sum : 0.f;
    CUTE_UNROLL
    for (int j = 0; j < size<1>(o_rc); ++j) o_rc(mi, j) *= inv;
    row_lse[mi] = any ? row_max[mi] + logf(sum) : -INFINITY;
  }
  if (get<1>(c_rc(0, 0)) == 0) {  // one thread of each quad writes the quad's rows
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const int row = m0 + get<0>(c_rc(mi, 0));
      if (row < Q) lse_ptr[row] = row_lse[mi];
    }
  }
}

// O's block_m x D tile from shared memory (sO, staged there by the caller, who has synchronised
// the threads since) to out in 16-byte rows, rows below Q only. `thread`: this thread's index among
// the GmemCopyOut threads.
template <class Traits, class TS>
__device__ __forceinline__ void store_out_rows(TS const& sO, int thread, typename Traits::Element* out_ptr,
                                               int64_t row_stride, int m0, int Q) {
  typename Traits::GmemCopyOut gmem_copy_O;
  auto gthr_O = gmem_copy_O.get_thread_slice(thread);
  Tensor gO = make_tensor(make_gmem_ptr(out_ptr + int64_t(m0) * row_stride),
                          Shape<Int<Traits::kBlockM>, Int<Traits::kHeadDim>>{}, make_stride(row_stride, _1{}));
  Tensor tOsO = gthr_O.partition_S(sO);
  Tensor tOgO = gthr_O.partition_D(gO);
  Tensor tOcO = gthr_O.partition_D(make_identity_tensor(Shape<Int<Traits::kBlockM>, Int<Traits::kHeadDim>>{}));
  Tensor tOrO = make_tensor<typename Traits::Element>(shape(tOgO));
  copy(gmem_copy_O, tOsO, tOrO);
  CUTE_UNROLL
  for (int m = 0; m < size<1>(tOgO); ++m) {
    if (m0 + get<0>(tOcO(0, m, 0)) < Q) {
      CUTE_UNROLL
      for (int kk = 0; kk < size<2>(tOgO); ++kk) copy(gmem_copy_O, tOrO(_, m, kk), tOgO(_, m, kk));
    }
  }
}

// Rows m0 .. m0 + kBlockM - 1 (those below Q) of a (rows, kHeadDim) tensor of 16-bit elements with
// 16-byte aligned rows set to 0, in 16-byte stores by `threads` threads (a query block without keys:
// its out, or its dq).
template <int kBlockM, int kHeadDim, class T>
__device__ void zero_block_rows(T* ptr, int64_t row_stride, int m0, int Q, int thread, int threads) {
  static_assert(sizeof(T) == 2, "16-bit elements, 8 per store");
  constexpr int kVecs = kHeadDim / 8;  // 16-byte vectors per row
  for (int i = thread; i < kBlockM * kVecs; i += threads) {
    const int r = m0 + i / kVecs;
    if (r < Q) *reinterpret_cast<uint4*>(ptr + int64_t(r) * row_stride + (i % kVecs) * 8) = make_uint4(0, 0, 0, 0);
  }
}

// A query block that sees no key: out 0 and lse -inf for its rows, written by `threads` threads.
template <class Traits>
__device__ void write_empty_block(typename Traits::Element* out, int64_t out_row_stride, float* lse, int m0, int Q,
                                  int thread, int threads) {
  zero_block_rows<Traits::kBlockM, Traits::kHeadDim>(out, out_row_stride, m0, Q, thread, threads);
  for (int r = m0 + thread; r < m0 + Traits::kBlockM; r += threads) {
    if (r < Q) lse[r] = -INFINITY;
  }
}

// kPerQuery: the bias or the mask differs between query rows and is read per element; otherwise
// both are per key and come from sKey/sBias (a separate variant, because the per-element gathers
// cost registers that the common case should not pay for).
template <class Traits, bool kPerQuery>
__global__ void __launch_bounds__(Traits::kThreads) dma_fwd_kernel(const FwdParams p) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;

  extern __shared__ __align__(128) char smem[];

  // Last query blocks first: with causality they see the most keys, and starting them early keeps
  // the tail of the grid short.
  const int m_block = int(gridDim.x) - 1 - int(blockIdx.x);
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int tidx = threadIdx.x;
  const int m0 = m_block * kBlockM;
  const int off = p.K - p.Q;  // bottom-right causal: key j visible to query i iff j <= i + off
  const int g = h / (p.H / p.H_kv);

  // How far this block walks: list entries (LIST, PREFIX) or contiguous keys (DENSE).
  const int32_t* list;
  const int32_t* death_row;
  const int limit = block_keys(p, b, h, m_block, kBlockM, &list, &death_row);
  const int n_tiles = (limit + kBlockN - 1) / kBlockN;

  Element* out_ptr = static_cast<Element*>(p.out) + b * p.out_stride[0] + h * p.out_stride[2];
  float* lse_ptr = p.lse + b * p.lse_stride[0] + h * p.lse_stride[1];
  if (n_tiles == 0) {
    write_empty_block<Traits>(out_ptr, p.out_stride[1], lse_ptr, m0, p.Q, threadIdx.x, Traits::kThreads);
    return;
  }

  const Element* q_ptr = static_cast<const Element*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
  const Element* k_ptr = static_cast<const Element*>(p.k) + b * p.k_stride[0] + g * p.k_stride[2];
  const Element* v_ptr = static_cast<const Element*>(p.v) + b * p.v_stride[0] + g * p.v_stride[2];
  const int64_t bias_base = b * p.bias_stride[0] + int64_t(h) * p.bias_heads / p.H * p.bias_stride[1];
  const int64_t mask_base = b * p.mask_stride[0] + int64_t(h) * p.mask_heads / p.H * p.mask_stride[1];
  // Query-broadcast bias and mask (query stride 0) are per key: staged once per tile in sBias and
  // folded into sKey. Per-query ones are read per element in the score step.
  const bool bias_per_key = p.bias != nullptr && p.bias_stride[2] == 0;
  const bool mask_per_key = p.mask != nullptr && p.mask_stride[2] == 0;

  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(sV.data(), typename Traits::SmemLayoutVt{});
  Tensor sVtNoSwizzle = make_tensor(sV.data(), typename Traits::SmemLayoutVtNoSwizzle{});
  int* sKey = reinterpret_cast<int*>(smem + Traits::kSmemQKVBytes);  // key of each tile row, -1: none
  float* sBias = reinterpret_cast<float*>(sKey + kBlockN);          // its query-broadcast bias
  int* sDeath = reinterpret_cast<int*>(sBias + kBlockN);            // its death (PREFIX), else kNoDeath

  // ---------------------------------------------------------------- global -> shared copies
  typename Traits::GmemCopyIn gmem_copy;
  auto gthr = gmem_copy.get_thread_slice(tidx);

  Tensor gQ = make_tensor(make_gmem_ptr(q_ptr + int64_t(m0) * p.q_stride[1]),
                          Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_stride(p.q_stride[1], _1{}));
  Tensor tQgQ = gthr.partition_S(gQ);
  Tensor tQsQ = gthr.partition_D(sQ);
  Tensor tQcQ = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));

  // K and V tiles are addressed per row (contiguous or gathered): these views carry only the
  // column offsets of the thread's 16-byte chunks (row stride 0); the row's key index adds the rest.
  Tensor gKcols = make_tensor(make_gmem_ptr(k_ptr), Shape<Int<kBlockN>, Int<kHeadDim>>{}, Stride<_0, _1>{});
  Tensor gVcols = make_tensor(make_gmem_ptr(v_ptr), Shape<Int<kBlockN>, Int<kHeadDim>>{}, Stride<_0, _1>{});
  Tensor tKgK = gthr.partition_S(gKcols);  // (CPY, CPY_N, CPY_K)
  Tensor tVgV = gthr.partition_S(gVcols);
  Tensor tKsK = gthr.partition_D(sK);
  Tensor tVsV = gthr.partition_D(sV);
  Tensor tKVc = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  constexpr int kLoadRows = Traits::kLoadRows;
  static_assert(decltype(size<1>(tKsK))::value == kLoadRows, "copy partition and key rows agree");
  static_assert(decltype(size<1>(tKgK))::value == kLoadRows && decltype(size<2>(tKgK))::value ==
                decltype(size<2>(tKsK))::value, "column views partition like the shared tiles");
  // The thread holding a row's first chunk publishes that row's key metadata.
  const bool meta_writer = get<1>(tKVc(0, 0, 0)) == 0;

  // ---------------------------------------------------------------- MMA partitions
  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tidx);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);             // (MMA, MMA_M, MMA_K)
  Tensor tSrK = thr_mma.partition_fragment_B(sK);             // (MMA, MMA_N, MMA_K)
  Tensor tOrVt = thr_mma.partition_fragment_B(sVtNoSwizzle);  // (MMA, MMA_D, MMA_N)

  auto smem_copy_Q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto sthr_Q = smem_copy_Q.get_thread_slice(tidx);
  Tensor tSsQ = sthr_Q.partition_S(sQ);
  auto smem_copy_K = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto sthr_K = smem_copy_K.get_thread_slice(tidx);
  Tensor tSsK = sthr_K.partition_S(sK);
  auto smem_copy_V = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, tiled_mma);
  auto sthr_V = smem_copy_V.get_thread_slice(tidx);
  Tensor tOsVt = sthr_V.partition_S(sVt);

  Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});  // (MMA, MMA_M, MMA_D)
  clear(acc_o);
  Tensor o_rc = make_tensor(acc_o.data(), rowcol(acc_o.layout()));
  // (row, col) inside the tile of every S element this thread holds.
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor c_rc = make_tensor(tScS.data(), rowcol(tScS.layout()));
  constexpr int kRows = decltype(size<0>(c_rc))::value;
  constexpr int kCols = decltype(size<1>(c_rc))::value;

  float row_max[kRows];
  float row_sum[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    row_max[mi] = -INFINITY;
    row_sum[mi] = 0.f;
  }

  // ---------------------------------------------------------------- prologue: Q, K(0), keys of tile 0
  load_contiguous(gmem_copy, tQgQ, tQsQ, tQcQ, m0, p.Q);
  int keys[kLoadRows];
  tile_keys<kBlockN>(0, tKVc, limit, list, p.K, keys);
  load_rows(gmem_copy, tKgK, tKsK, p.k_stride[1], keys);
  cp_async_fence();
  {
    KeyMeta<kLoadRows> meta;
    meta.load(p, keys, meta_writer, bias_per_key, mask_per_key, bias_base, mask_base, death_row);
    meta.store(tKVc, keys, meta_writer, sKey, sBias, sDeath);
  }

  const float scale = p.scale;
  const float softcap = p.softcap;
  const float scale_over_cap = softcap > 0.f ? p.scale / softcap : 0.f;

  for (int t = 0; t < n_tiles; ++t) {
    const bool has_next = t + 1 < n_tiles;
    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});  // (MMA, MMA_M, MMA_N)
    clear(acc_s);
    cp_async_wait<0>();
    __syncthreads();  // K(t), sKey/sBias(t) visible; everyone is done with V(t-1)
    load_rows(gmem_copy, tVgV, tVsV, p.v_stride[1], keys);
    cp_async_fence();
    int next_keys[kLoadRows];
    CUTE_UNROLL
    for (int m = 0; m < kLoadRows; ++m) next_keys[m] = -1;
    if (has_next) tile_keys<kBlockN>(t + 1, tKVc, limit, list, p.K, next_keys);

    gemm_smem(acc_s, tSrQ, tSrK, tSsQ, tSsK, tiled_mma, smem_copy_Q, smem_copy_K, sthr_Q, sthr_K);

    // Scores: scale (or softcap), bias, then -inf wherever the key is not visible.
    Tensor s_rc = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    scale_scores(acc_s, scale, softcap, scale_over_cap);
    int col_key[kCols];
    float col_bias[kCols];
    int col_death[kCols];
    CUTE_UNROLL
    for (int ni = 0; ni < kCols; ++ni) {
      const int c = get<1>(c_rc(0, ni));
      col_key[ni] = sKey[c];
      col_bias[ni] = sBias[c];
      col_death[ni] = sDeath[c];
    }
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const int row = m0 + get<0>(c_rc(mi, 0));
      const bool row_ok = row < p.Q;
      const int last_key = p.causal ? row + off : p.K;
      if constexpr (kPerQuery) {
        const bool bias_per_query = p.bias != nullptr && !bias_per_key;
        const bool mask_per_query = p.mask != nullptr && !mask_per_key;
        CUTE_UNROLL
        for (int ni = 0; ni < kCols; ++ni) {
          const int key = col_key[ni];
          bool visible = row_ok && key >= 0 && key <= last_key && last_key < col_death[ni];
          float s = s_rc(mi, ni) + col_bias[ni];
          if (visible && bias_per_query) {
            s += load_float(p.bias, p.bias_dtype, bias_base + row * p.bias_stride[2] + key * p.bias_stride[3]);
          }
          if (visible && mask_per_query) {
            visible = __ldg(p.mask + mask_base + row * p.mask_stride[2] + key * p.mask_stride[3]) != 0;
          }
          s_rc(mi, ni) = visible ? s : -INFINITY;
        }
      } else {
        CUTE_UNROLL
        for (int ni = 0; ni < kCols; ++ni) {
          const int key = col_key[ni];
          const bool visible = row_ok && key >= 0 && key <= last_key && last_key < col_death[ni];
          s_rc(mi, ni) = visible ? s_rc(mi, ni) + col_bias[ni] : -INFINITY;
        }
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // V(t) visible; everyone is done with K(t) and sKey/sBias(t)
    KeyMeta<kLoadRows> next_meta;
    if (has_next) {
      load_rows(gmem_copy, tKgK, tKsK, p.k_stride[1], next_keys);
      cp_async_fence();
      next_meta.load(p, next_keys, meta_writer, bias_per_key, mask_per_key, bias_base, mask_base, death_row);
    }

    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const float alpha = softmax_row(s_rc, mi, row_max[mi], row_sum[mi]);
      CUTE_UNROLL
      for (int j = 0; j < size<1>(o_rc); ++j) o_rc(mi, j) *= alpha;
    }

    Tensor rP = convert_fragment<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), acc_as_a(rP.layout()));
    gemm_reg_smem(acc_o, tOrP, tOrVt, tOsVt, tiled_mma, smem_copy_V, sthr_V);

    if (has_next) {
      next_meta.store(tKVc, next_keys, meta_writer, sKey, sBias, sDeath);
      CUTE_UNROLL
      for (int m = 0; m < kLoadRows; ++m) keys[m] = next_keys[m];
    }
  }

  // ---------------------------------------------------------------- epilogue
  finish_rows(o_rc, c_rc, row_max, row_sum, lse_ptr, m0, p.Q);

  // O goes through shared memory (the Q tile, which no thread reads any more: the last QK^T GEMM
  // ended before the last barrier) so the global stores are 16-byte rows.
  Tensor rO = convert_fragment<Element>(acc_o);
  Tensor sO = make_tensor(sQ.data(), typename Traits::SmemLayoutQ{});
  auto smem_copy_O = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, tiled_mma);
  auto sthr_O = smem_copy_O.get_thread_slice(tidx);
  Tensor taccOrO = sthr_O.retile_S(rO);
  Tensor taccOsO = sthr_O.partition_D(sO);
  copy(smem_copy_O, taccOrO, taccOsO);
  __syncthreads();
  store_out_rows<Traits>(sO, tidx, out_ptr, p.out_stride[1], m0, p.Q);
}

}  // namespace fwd_impl

template <DType kDType, int kHeadDim, bool kPerQuery>
void launch_fwd(const FwdParams& params, cudaStream_t stream) {
  using Traits = fwd_impl::FwdTraits<kDType, kHeadDim>;
  auto kernel = &fwd_impl::dma_fwd_kernel<Traits, kPerQuery>;
  constexpr int smem = Traits::kSmemBytes;
  if (smem > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
               "cudaFuncSetAttribute(dma_fwd_kernel, MaxDynamicSharedMemorySize)");
  }
  const dim3 grid(unsigned((params.Q + Traits::kBlockM - 1) / Traits::kBlockM), unsigned(params.H), unsigned(params.B));
  kernel<<<grid, Traits::kThreads, smem, stream>>>(params);
  check_cuda(cudaGetLastError(), "dma_fwd_kernel launch");
}

}  // namespace cuda
}  // namespace dmattn
