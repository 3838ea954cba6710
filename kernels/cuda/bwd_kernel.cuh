// The backward of dynamic mask attention for sm_80 and newer, with CuTe (mma.sync m16n8k16,
// float32 accumulation, cp.async, ldmatrix), deterministic: no two thread blocks write the same
// element, so there are no atomics. It mirrors the Triton backward (kernels/triton/attention.py):
//
// - dq kernel: one thread block per block of query rows of one (batch, head), walking the same key
//   tiles as the forward (DENSE: contiguous keys up to the causal limit; LIST: the prefix of the
//   selection row's ascending key list the block may see, keys gathered). Per tile:
//     S = Q K^T, dP = dO V^T, P = exp(S - lse), dS = P (dP - delta), dQ += dS K.
//   With a per-query bias it also writes dS (before the softcap factor) into a float32
//   (B, H, Q, K) buffer: that is dbias before the reduction to the bias's shape.
// - dk/dv kernel: one thread block per tile of keys (DENSE: contiguous keys; LIST: list
//   positions, keys gathered) of one (batch, kv head), looping over the group's query heads and
//   every query block that can see the keys (causal: from the block of the tile's smallest key).
//   It computes the transposed products, so that P^T and dS^T come out of the MMA already in the
//   layout of the A operand of the next MMA and never pass through shared memory:
//     S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q,
//   and, for a query-broadcast bias, the per-(batch, head) sum over queries of dS per key.
//
// Both kernels hold their fixed rows (Q and dO, or K and V) in shared memory for the whole block
// and stream the other side in tiles through two shared-memory stages: the copies of tile t+1 are
// issued right after the barrier that opens tile t, and overlap its four GEMMs.
//
// Empty rows (lse = -inf) are read as lse = +inf, so P = exp(S - lse) = 0 and they contribute
// nothing, with no NaN on the way.
//
// The layout helpers, the gathered row loads and the shared-memory GEMM loops are the forward's
// (fwd_kernel.cuh), so both directions read keys, bias and mask the same way.
#pragma once

#include "bwd.h"
#include "fwd_kernel.cuh"

namespace dmattn {
namespace cuda {
namespace bwd_impl {

using namespace cute;
using fwd_impl::acc_as_a;
using fwd_impl::convert_fragment;
using fwd_impl::fast_exp2;
using fwd_impl::load_contiguous;
using fwd_impl::gemm_reg_smem;
using fwd_impl::gemm_smem;
using fwd_impl::load_float;
using fwd_impl::quad_sum;
using fwd_impl::rowcol;

// One backward kernel's tiles: kRows fixed rows per thread block (16 per warp: the M side of every
// MMA), kCols rows per streamed tile.
template <DType kDType, int kHeadDim_, int kRows_, int kCols_, int kWarps_>
struct BwdTraits {
  using Element = typename fwd_impl::CuteElement<kDType>::type;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kRows = kRows_;
  static constexpr int kCols = kCols_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * 32;
  static_assert(kHeadDim % 32 == 0, "head dims are multiples of 32");
  static_assert(kRows == 16 * kWarps, "each warp owns 16 fixed rows");
  static_assert(kCols % 16 == 0, "P and dS are the A operand of a k16 MMA along the streamed rows");

  using TiledMma = TiledMMA<MMA_Atom<typename fwd_impl::CuteElement<kDType>::mma>, Layout<Shape<Int<kWarps>, _1, _1>>,
                            Tile<Int<16 * kWarps>, _16, _16>>;

  // The forward's swizzled 64- (or 32-) element pages: conflict-free ldmatrix and cp.async.
  static constexpr int kPage = kHeadDim % 64 == 0 ? 64 : 32;
  static constexpr int kSwizzleBits = kPage == 64 ? 3 : 2;
  using SmemLayoutAtom =
      decltype(composition(Swizzle<kSwizzleBits, 3, 3>{}, Layout<Shape<_8, Int<kPage>>, Stride<Int<kPage>, _1>>{}));
  using SmemLayoutRows = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kRows>, Int<kHeadDim>>{}));
  using SmemLayoutCols = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kCols>, Int<kHeadDim>>{}));
  // A streamed tile read as (D, kCols): the B operand of dQ += dS K (K^T), dV += P^T dO (dO^T) and
  // dK += dS^T Q (Q^T).
  using SmemLayoutColsT =
      decltype(composition(SmemLayoutCols{}, make_layout(Shape<Int<kHeadDim>, Int<kCols>>{}, GenRowMajor{})));
  using SmemLayoutColsTNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutColsT{}));

  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomT = Copy_Atom<SM75_U16x8_LDSM_T, Element>;

  static constexpr int kElemsPerCopy = 8;
  static constexpr int kThreadsPerRow = kPage / kElemsPerCopy;
  static constexpr int kRowsPerPass = kThreads / kThreadsPerRow;
  using GmemThreads = Layout<Shape<Int<kRowsPerPass>, Int<kThreadsPerRow>>, Stride<Int<kThreadsPerRow>, _1>>;
  using GmemCopyIn = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{},
                                              GmemThreads{}, Layout<Shape<_1, Int<kElemsPerCopy>>>{}));
  static_assert(kRows % kRowsPerPass == 0 && kCols % kRowsPerPass == 0, "every thread loads whole passes");
  static constexpr int kLoadRowsFixed = kRows / kRowsPerPass;
  static constexpr int kLoadRowsCols = kCols / kRowsPerPass;

  static constexpr int kRowsElems = int(cosize(SmemLayoutRows{}));
  static constexpr int kColsElems = int(cosize(SmemLayoutCols{}));
  // Two fixed tiles, two stages of two streamed tiles, then per-row metadata: the dq kernel keeps
  // a key, a bias value and a death position per streamed row and stage, the dk/dv kernel a key
  // and a death position per fixed row and lse and delta per streamed row and stage.
  static constexpr int kSmemTileBytes = (2 * kRowsElems + 4 * kColsElems) * int(sizeof(Element));
  static constexpr int kSmemBytes = kSmemTileBytes + 24 * kCols + 8 * kRows;
};

// The backward's per-row statistics of query row `row` of (b, h): its log-sum-exp in base 2 for
// P = 2^(s log2e - lse2), +inf for a row without keys (lse -inf) or at or past Q, so P = 0 there with
// no NaN; and delta (0 past Q). Every backward kernel reads them through these two.
__device__ __forceinline__ float lse2_of_row(const BwdParams& p, int b, int h, int row) {
  float lse = INFINITY;
  if (row < p.Q) {
    lse = p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + row];
    if (lse == -INFINITY) lse = INFINITY;
  }
  return lse * 1.4426950408889634f;
}
__device__ __forceinline__ float delta_of_row(const BwdParams& p, int b, int h, int row) {
  return row < p.Q ? p.delta[(int64_t(b) * p.H + h) * p.Q + row] : 0.f;
}

// Both kernels scale or softcap their scores in place with the forward's fwd_impl::scale_scores. The
// chain-rule factor of the cap, 1 - tanh^2, is taken later from the capped score itself
// (tanh = capped / softcap), so no second score-sized fragment is live; the factor `scale` is
// applied once to dq and dk at the end.
// d(capped score) / d(score before the cap) / scale, from the capped score: 1 - tanh^2.
__device__ __forceinline__ float cap_factor(float capped, float inv_cap) {
  const float t = capped * inv_cap;
  return 1.f - t * t;
}

// An accumulator (scaled) into rows of a (row, D) global tensor: element (r, c) of the fragment
// goes to base + row_offset[r-th fragment row] + c, for rows whose offset is not negative. a_rc and
// c_rc: the accumulator and its identity coordinates viewed as (rows, columns) (the sm_80 and sm_90
// kernels' rowcol). Written once per thread block, so plain stores are enough.
template <class OutT, class AccRC, class CoordsRC>
__device__ __forceinline__ void store_rows(OutT* base, AccRC const& a_rc, CoordsRC const& c_rc, float scale,
                                           const int64_t* row_offset) {
  CUTE_UNROLL
  for (int mi = 0; mi < size<0>(a_rc); ++mi) {
    const int64_t off = row_offset[mi];
    if (off < 0) continue;
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(a_rc); ++ni) base[off + get<1>(c_rc(mi, ni))] = OutT(a_rc(mi, ni) * scale);
  }
}

template <class Traits, bool kPerQuery>
__global__ void __launch_bounds__(Traits::kThreads) dma_bwd_dq_kernel(const BwdParams p) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kRows;
  constexpr int kBlockN = Traits::kCols;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ __align__(128) char smem[];

  // Last query blocks first, as in the forward: with causality they walk the most keys.
  const int m_block = int(gridDim.x) - 1 - int(blockIdx.x);
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int tidx = threadIdx.x;
  const int m0 = m_block * kBlockM;
  const int off = p.K - p.Q;
  const int g = h / (p.H / p.H_kv);

  // The forward's walk: DENSE, LIST, or the block's own list and the death positions (PREFIX).
  const int32_t* list;
  const int32_t* death_row;
  const int limit = fwd_impl::block_keys(p, b, h, m_block, kBlockM, &list, &death_row);
  const int n_tiles = (limit + kBlockN - 1) / kBlockN;

  Element* dq_ptr = static_cast<Element*>(p.dq);
  if (dq_ptr != nullptr) dq_ptr += b * p.dq_stride[0] + h * p.dq_stride[2];
  if (n_tiles == 0) {  // nothing visible: dq 0 (ds stays as the caller zero-filled it)
    if (dq_ptr != nullptr) {
      fwd_impl::zero_block_rows<kBlockM, kHeadDim>(dq_ptr, p.dq_stride[1], m0, p.Q, tidx, Traits::kThreads);
    }
    return;
  }

  const Element* q_ptr = static_cast<const Element*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
  const Element* do_ptr = static_cast<const Element*>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[2];
  const Element* k_ptr = static_cast<const Element*>(p.k) + b * p.k_stride[0] + g * p.k_stride[2];
  const Element* v_ptr = static_cast<const Element*>(p.v) + b * p.v_stride[0] + g * p.v_stride[2];
  const int64_t bias_base = b * p.bias_stride[0] + int64_t(h) * p.bias_heads / p.H * p.bias_stride[1];
  const int64_t mask_base = b * p.mask_stride[0] + int64_t(h) * p.mask_heads / p.H * p.mask_stride[1];
  const bool bias_per_key = p.bias != nullptr && p.bias_stride[2] == 0;
  const bool mask_per_key = p.mask != nullptr && p.mask_stride[2] == 0;
  const int64_t bh = int64_t(b) * p.H + h;

  Element* smem_e = reinterpret_cast<Element*>(smem);
  Tensor sQ = make_tensor(make_smem_ptr(smem_e), typename Traits::SmemLayoutRows{});
  Tensor sdO = make_tensor(make_smem_ptr(smem_e + Traits::kRowsElems), typename Traits::SmemLayoutRows{});
  Element* kv_base = smem_e + 2 * Traits::kRowsElems;  // stage s: K at 2 s tiles, V right after
  auto sK_at = [&](int s) {
    return make_tensor(make_smem_ptr(kv_base + 2 * s * Traits::kColsElems), typename Traits::SmemLayoutCols{});
  };
  auto sV_at = [&](int s) {
    return make_tensor(make_smem_ptr(kv_base + (2 * s + 1) * Traits::kColsElems), typename Traits::SmemLayoutCols{});
  };
  auto sKt_at = [&](int s) {
    return make_tensor(make_smem_ptr(kv_base + 2 * s * Traits::kColsElems), typename Traits::SmemLayoutColsT{});
  };
  int* sKey = reinterpret_cast<int*>(smem + Traits::kSmemTileBytes);  // [2][kBlockN], -1: not visible
  float* sBias = reinterpret_cast<float*>(sKey + 2 * kBlockN);        // [2][kBlockN]
  int* sDeath = reinterpret_cast<int*>(sBias + 2 * kBlockN);          // [2][kBlockN], PREFIX

  // ---------------------------------------------------------------- global -> shared copies
  typename Traits::GmemCopyIn gmem_copy;
  auto gthr = gmem_copy.get_thread_slice(tidx);
  Tensor gQ = make_tensor(make_gmem_ptr(q_ptr + int64_t(m0) * p.q_stride[1]), Shape<Int<kBlockM>, Int<kHeadDim>>{},
                          make_stride(p.q_stride[1], _1{}));
  Tensor gdO = make_tensor(make_gmem_ptr(do_ptr + int64_t(m0) * p.dout_stride[1]),
                           Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_stride(p.dout_stride[1], _1{}));
  Tensor tQc = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor gKcols = make_tensor(make_gmem_ptr(k_ptr), Shape<Int<kBlockN>, Int<kHeadDim>>{}, Stride<_0, _1>{});
  Tensor gVcols = make_tensor(make_gmem_ptr(v_ptr), Shape<Int<kBlockN>, Int<kHeadDim>>{}, Stride<_0, _1>{});
  Tensor tKgK = gthr.partition_S(gKcols);
  Tensor tVgV = gthr.partition_S(gVcols);
  Tensor tKVc = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  constexpr int kLoadRows = Traits::kLoadRowsCols;
  const bool meta_writer = get<1>(tKVc(0, 0, 0)) == 0;

  // ---------------------------------------------------------------- MMA partitions
  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tidx);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
  Tensor tSrdO = thr_mma.partition_fragment_A(sdO);
  Tensor tSrK = thr_mma.partition_fragment_B(sK_at(0));
  Tensor tSrV = thr_mma.partition_fragment_B(sV_at(0));
  Tensor tdQrKt = thr_mma.partition_fragment_B(
      make_tensor(make_smem_ptr(kv_base), typename Traits::SmemLayoutColsTNoSwizzle{}));

  auto smem_copy_A = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto sthr_A = smem_copy_A.get_thread_slice(tidx);
  Tensor tSsQ = sthr_A.partition_S(sQ);
  Tensor tSsdO = sthr_A.partition_S(sdO);
  auto smem_copy_B = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto sthr_B = smem_copy_B.get_thread_slice(tidx);
  auto smem_copy_Bt = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, tiled_mma);
  auto sthr_Bt = smem_copy_Bt.get_thread_slice(tidx);

  Tensor acc_dq = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  clear(acc_dq);
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor c_rc = make_tensor(tScS.data(), rowcol(tScS.layout()));
  constexpr int kRowsT = decltype(size<0>(c_rc))::value;
  constexpr int kColsT = decltype(size<1>(c_rc))::value;

  // lse (in base 2, +inf for empty rows and rows past Q) and delta of this thread's rows.
  float row_lse[kRowsT];
  float row_delta[kRowsT];
  CUTE_UNROLL
  for (int mi = 0; mi < kRowsT; ++mi) {
    const int row = m0 + get<0>(c_rc(mi, 0));
    row_lse[mi] = lse2_of_row(p, b, h, row);
    row_delta[mi] = delta_of_row(p, b, h, row);
  }

  // ---------------------------------------------------------------- prologue: Q, dO, K(0), V(0)
  load_contiguous(gmem_copy, gthr.partition_S(gQ), gthr.partition_D(sQ), tQc, m0, p.Q);
  load_contiguous(gmem_copy, gthr.partition_S(gdO), gthr.partition_D(sdO), tQc, m0, p.Q);
  int keys[kLoadRows];
  fwd_impl::tile_keys<kBlockN>(0, tKVc, limit, list, p.K, keys);
  {
    Tensor tKsK = gthr.partition_D(sK_at(0));
    Tensor tVsV = gthr.partition_D(sV_at(0));
    fwd_impl::load_rows(gmem_copy, tKgK, tKsK, p.k_stride[1], keys);
    fwd_impl::load_rows(gmem_copy, tVgV, tVsV, p.v_stride[1], keys);
  }
  cp_async_fence();
  {
    fwd_impl::KeyMeta<kLoadRows> meta;
    meta.load(p, keys, meta_writer, bias_per_key, mask_per_key, bias_base, mask_base, death_row);
    meta.store(tKVc, keys, meta_writer, sKey, sBias, sDeath);
  }

  const bool write_ds = kPerQuery && p.ds != nullptr;
  const bool softcap = p.softcap > 0.f;
  const float inv_cap = softcap ? 1.f / p.softcap : 0.f;
  const float scale_over_cap = softcap ? p.scale / p.softcap : 0.f;
  float* ds_row = p.ds != nullptr ? p.ds + bh * p.Q * int64_t(p.K) : nullptr;

  for (int t = 0; t < n_tiles; ++t) {
    const int stage = t & 1;
    const bool has_next = t + 1 < n_tiles;
    cp_async_wait<0>();
    __syncthreads();  // tile t and its keys visible; everyone is done with tile t-1's stage

    int next_keys[kLoadRows];
    fwd_impl::KeyMeta<kLoadRows> next_meta;
    if (has_next) {
      fwd_impl::tile_keys<kBlockN>(t + 1, tKVc, limit, list, p.K, next_keys);
      Tensor tKsK = gthr.partition_D(sK_at(stage ^ 1));
      Tensor tVsV = gthr.partition_D(sV_at(stage ^ 1));
      fwd_impl::load_rows(gmem_copy, tKgK, tKsK, p.k_stride[1], next_keys);
      fwd_impl::load_rows(gmem_copy, tVgV, tVsV, p.v_stride[1], next_keys);
      cp_async_fence();
      next_meta.load(p, next_keys, meta_writer, bias_per_key, mask_per_key, bias_base, mask_base, death_row);
    }

    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    gemm_smem(acc_s, tSrQ, tSrK, tSsQ, sthr_B.partition_S(sK_at(stage)), tiled_mma, smem_copy_A, smem_copy_B,
              sthr_A, sthr_B);
    Tensor acc_dp = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_dp);
    gemm_smem(acc_dp, tSrdO, tSrV, tSsdO, sthr_B.partition_S(sV_at(stage)), tiled_mma, smem_copy_A, smem_copy_B,
              sthr_A, sthr_B);

    fwd_impl::scale_scores(acc_s, p.scale, p.softcap, scale_over_cap);
    Tensor s_rc = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    Tensor dp_rc = make_tensor(acc_dp.data(), rowcol(acc_dp.layout()));
    int col_key[kColsT];
    float col_bias[kColsT];
    int col_death[kColsT];
    CUTE_UNROLL
    for (int ni = 0; ni < kColsT; ++ni) {
      const int c = get<1>(c_rc(0, ni));
      col_key[ni] = sKey[stage * kBlockN + c];
      col_bias[ni] = sBias[stage * kBlockN + c];
      col_death[ni] = sDeath[stage * kBlockN + c];
    }
    // dS overwrites dP: P (dP - delta), times the softcap factor.
    CUTE_UNROLL
    for (int mi = 0; mi < kRowsT; ++mi) {
      const int row = m0 + get<0>(c_rc(mi, 0));
      const bool row_ok = row < p.Q;
      const int last_key = p.causal ? row + off : p.K;
      CUTE_UNROLL
      for (int ni = 0; ni < kColsT; ++ni) {
        const int key = col_key[ni];
        bool visible = row_ok && key >= 0 && key <= last_key && last_key < col_death[ni];
        float s = s_rc(mi, ni) + col_bias[ni];
        if constexpr (kPerQuery) {
          if (visible && p.bias != nullptr && !bias_per_key) {
            s += load_float(p.bias, p.bias_dtype, bias_base + row * p.bias_stride[2] + key * p.bias_stride[3]);
          }
          if (visible && p.mask != nullptr && !mask_per_key) {
            visible = __ldg(p.mask + mask_base + row * p.mask_stride[2] + key * p.mask_stride[3]) != 0;
          }
        }
        const float prob = visible ? fast_exp2(fmaf(s, kLog2e, -row_lse[mi])) : 0.f;
        const float ds = prob * (dp_rc(mi, ni) - row_delta[mi]);
        if (write_ds && visible) ds_row[int64_t(row) * p.K + key] = ds;
        dp_rc(mi, ni) = softcap ? ds * cap_factor(s_rc(mi, ni), inv_cap) : ds;
      }
    }

    Tensor rdS = convert_fragment<Element>(acc_dp);
    Tensor tdQrdS = make_tensor(rdS.data(), acc_as_a(rdS.layout()));
    gemm_reg_smem(acc_dq, tdQrdS, tdQrKt, sthr_Bt.partition_S(sKt_at(stage)), tiled_mma, smem_copy_Bt, sthr_Bt);

    if (has_next) {
      next_meta.store(tKVc, next_keys, meta_writer, sKey + (stage ^ 1) * kBlockN, sBias + (stage ^ 1) * kBlockN,
                      sDeath + (stage ^ 1) * kBlockN);
      CUTE_UNROLL
      for (int m = 0; m < kLoadRows; ++m) keys[m] = next_keys[m];
    }
  }

  // ---------------------------------------------------------------- epilogue: dq = scale * dS K
  if (dq_ptr != nullptr) {
    Tensor tOc = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    Tensor o_rc = make_tensor(tOc.data(), rowcol(tOc.layout()));
    int64_t row_offset[kRowsT];
    CUTE_UNROLL
    for (int mi = 0; mi < kRowsT; ++mi) {
      const int row = m0 + get<0>(o_rc(mi, 0));
      row_offset[mi] = row < p.Q ? int64_t(row) * p.dq_stride[1] : -1;
    }
    store_rows(dq_ptr, make_tensor(acc_dq.data(), rowcol(acc_dq.layout())), o_rc, p.scale, row_offset);
  }
}

template <class Traits, bool kPerQuery>
__global__ void __launch_bounds__(Traits::kThreads) dma_bwd_dkdv_kernel(const BwdParams p) {
  using Element = typename Traits::Element;
  constexpr int kBlockN = Traits::kRows;  // keys of this thread block
  constexpr int kBlockM = Traits::kCols;  // query rows per step
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ __align__(128) char smem[];

  const int n_tile = blockIdx.x;
  const int n_heads = p.dkdv_heads;
  const int progs_per_batch = p.H / n_heads;
  const int b = int(blockIdx.y) / progs_per_batch;
  const int h_out = int(blockIdx.y) % progs_per_batch;  // kv head, or query head with per-head lists
  const int h0 = h_out * n_heads;
  const int g = h0 / (p.H / p.H_kv);
  const int tidx = threadIdx.x;
  const int off = p.K - p.Q;

  // LIST: the row's list; PREFIX: the row's ever-alive keys (death_j > j) in the caller's order,
  // and their count; DENSE: contiguous keys.
  const int32_t* list = nullptr;
  const int32_t* death_row = nullptr;
  int limit = p.K;
  if (p.idx != nullptr) {
    const int64_t row0 = fwd_impl::selection_row(p, b, h0);
    if (p.death != nullptr) {
      list = p.dkdv_keys + row0 * p.K;
      limit = p.dkdv_count[row0];
      death_row = p.death + row0 * p.K;
    } else {
      list = p.idx + row0 * p.list_len;
      limit = int(p.list_len);
    }
  }

  const Element* k_ptr = static_cast<const Element*>(p.k) + b * p.k_stride[0] + g * p.k_stride[2];
  const Element* v_ptr = static_cast<const Element*>(p.v) + b * p.v_stride[0] + g * p.v_stride[2];
  const bool bias_per_key = p.bias != nullptr && p.bias_stride[2] == 0;
  const bool mask_per_key = p.mask != nullptr && p.mask_stride[2] == 0;

  Element* smem_e = reinterpret_cast<Element*>(smem);
  Tensor sK = make_tensor(make_smem_ptr(smem_e), typename Traits::SmemLayoutRows{});
  Tensor sV = make_tensor(make_smem_ptr(smem_e + Traits::kRowsElems), typename Traits::SmemLayoutRows{});
  Element* qdo_base = smem_e + 2 * Traits::kRowsElems;  // stage s: Q at 2 s tiles, dO right after
  auto sQ_at = [&](int s) {
    return make_tensor(make_smem_ptr(qdo_base + 2 * s * Traits::kColsElems), typename Traits::SmemLayoutCols{});
  };
  auto sdO_at = [&](int s) {
    return make_tensor(make_smem_ptr(qdo_base + (2 * s + 1) * Traits::kColsElems), typename Traits::SmemLayoutCols{});
  };
  auto sQt_at = [&](int s) {
    return make_tensor(make_smem_ptr(qdo_base + 2 * s * Traits::kColsElems), typename Traits::SmemLayoutColsT{});
  };
  auto sdOt_at = [&](int s) {
    return make_tensor(make_smem_ptr(qdo_base + (2 * s + 1) * Traits::kColsElems), typename Traits::SmemLayoutColsT{});
  };
  float* sLse = reinterpret_cast<float*>(smem + Traits::kSmemTileBytes);  // [2][kBlockM], base 2
  float* sDelta = sLse + 2 * kBlockM;                                      // [2][kBlockM]
  int* sKeyOut = reinterpret_cast<int*>(sDelta + 2 * kBlockM);            // [kBlockN], -1: no key
  int* sDeathOut = sKeyOut + kBlockN;                                      // [kBlockN], PREFIX

  // ---------------------------------------------------------------- K, V and the tile's keys
  typename Traits::GmemCopyIn gmem_copy;
  auto gthr = gmem_copy.get_thread_slice(tidx);
  Tensor gKcols = make_tensor(make_gmem_ptr(k_ptr), Shape<Int<kBlockN>, Int<kHeadDim>>{}, Stride<_0, _1>{});
  Tensor gVcols = make_tensor(make_gmem_ptr(v_ptr), Shape<Int<kBlockN>, Int<kHeadDim>>{}, Stride<_0, _1>{});
  Tensor tKVc = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  constexpr int kLoadRowsK = Traits::kLoadRowsFixed;
  {
    int keys[kLoadRowsK];
    fwd_impl::tile_keys<kBlockN>(n_tile, tKVc, limit, list, p.K, keys);
    Tensor tKsK = gthr.partition_D(sK);
    Tensor tVsV = gthr.partition_D(sV);
    fwd_impl::load_rows(gmem_copy, gthr.partition_S(gKcols), tKsK, p.k_stride[1], keys);
    fwd_impl::load_rows(gmem_copy, gthr.partition_S(gVcols), tVsV, p.v_stride[1], keys);
    cp_async_fence();
    if (get<1>(tKVc(0, 0, 0)) == 0) {
      CUTE_UNROLL
      for (int m = 0; m < kLoadRowsK; ++m) {
        const int r = get<0>(tKVc(0, m, 0));
        sKeyOut[r] = keys[m];
        sDeathOut[r] = death_row != nullptr && keys[m] >= 0 ? __ldg(death_row + keys[m]) : fwd_impl::kNoDeath;
      }
    }
  }
  __syncthreads();  // sKeyOut, sDeathOut visible

  // Queries before the causal reach of the tile's smallest key see none of its keys; on the PREFIX
  // path neither do those at or past the latest death.
  int first_key = p.K;
  int last_death = 0;
  for (int r = 0; r < kBlockN; ++r) {
    const int key = sKeyOut[r];
    if (key >= 0) {
      first_key = min(first_key, key);
      last_death = max(last_death, sDeathOut[r]);
    }
  }
  if (first_key == p.K) {  // only padding: the caller's zeros stand (LIST, PREFIX)
    cp_async_wait<0>();      // no copy may land in shared memory the block no longer owns
    return;
  }
  const int m_lo = p.causal ? max(first_key - off, 0) / kBlockM * kBlockM : 0;
  // Queries m < m_hi can see a key of the tile: on the PREFIX path those with m + off < last_death.
  const int m_hi = death_row != nullptr ? max(min(last_death - off, p.Q), m_lo) : p.Q;
  const int n_qblocks = (m_hi - m_lo + kBlockM - 1) / kBlockM;
  const int n_steps = n_heads * n_qblocks;

  // ---------------------------------------------------------------- MMA partitions
  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tidx);
  Tensor tSrK = thr_mma.partition_fragment_A(sK);
  Tensor tSrV = thr_mma.partition_fragment_A(sV);
  Tensor tSrQ = thr_mma.partition_fragment_B(sQ_at(0));
  Tensor tSrdO = thr_mma.partition_fragment_B(sdO_at(0));
  Tensor tdXrT = thr_mma.partition_fragment_B(
      make_tensor(make_smem_ptr(qdo_base), typename Traits::SmemLayoutColsTNoSwizzle{}));

  auto smem_copy_A = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto sthr_A = smem_copy_A.get_thread_slice(tidx);
  Tensor tSsK = sthr_A.partition_S(sK);
  Tensor tSsV = sthr_A.partition_S(sV);
  auto smem_copy_B = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto sthr_B = smem_copy_B.get_thread_slice(tidx);
  auto smem_copy_Bt = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, tiled_mma);
  auto sthr_Bt = smem_copy_Bt.get_thread_slice(tidx);

  Tensor acc_dk = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor acc_dv = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  clear(acc_dk);
  clear(acc_dv);
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{}));
  Tensor c_rc = make_tensor(tScS.data(), rowcol(tScS.layout()));
  constexpr int kRowsT = decltype(size<0>(c_rc))::value;
  constexpr int kColsT = decltype(size<1>(c_rc))::value;

  int row_key[kRowsT];    // the key of each of this thread's accumulator rows, -1: none
  int row_death[kRowsT];  // its death position (PREFIX), else kNoDeath
  CUTE_UNROLL
  for (int mi = 0; mi < kRowsT; ++mi) {
    row_key[mi] = sKeyOut[get<0>(c_rc(mi, 0))];
    row_death[mi] = sDeathOut[get<0>(c_rc(mi, 0))];
  }

  // ---------------------------------------------------------------- query blocks, head by head
  Tensor tQc = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  // Step j is query block m_lo + (j % n_qblocks) * kBlockM of head h0 + j / n_qblocks. issue(j)
  // starts its Q and dO copies into stage j & 1 and returns its lse and delta row (one per thread
  // of the first kBlockM), which are published in shared memory once the stage is free.
  float next_lse = INFINITY, next_delta = 0.f;
  auto issue = [&](int j) {
    const int h = h0 + j / n_qblocks;
    const int m0 = m_lo + (j % n_qblocks) * kBlockM;
    const Element* q_ptr = static_cast<const Element*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2] +
                           int64_t(m0) * p.q_stride[1];
    const Element* do_ptr = static_cast<const Element*>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[2] +
                            int64_t(m0) * p.dout_stride[1];
    Tensor gQ = make_tensor(make_gmem_ptr(q_ptr), Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_stride(p.q_stride[1], _1{}));
    Tensor gdO = make_tensor(make_gmem_ptr(do_ptr), Shape<Int<kBlockM>, Int<kHeadDim>>{},
                             make_stride(p.dout_stride[1], _1{}));
    load_contiguous(gmem_copy, gthr.partition_S(gQ), gthr.partition_D(sQ_at(j & 1)), tQc, m0, p.Q);
    load_contiguous(gmem_copy, gthr.partition_S(gdO), gthr.partition_D(sdO_at(j & 1)), tQc, m0, p.Q);
    cp_async_fence();
    next_lse = INFINITY;
    next_delta = 0.f;
    if (tidx < kBlockM) {
      next_lse = lse2_of_row(p, b, h, m0 + tidx);
      next_delta = delta_of_row(p, b, h, m0 + tidx);
    }
  };
  auto publish = [&](int j) {
    if (tidx < kBlockM) {
      sLse[(j & 1) * kBlockM + tidx] = next_lse;
      sDelta[(j & 1) * kBlockM + tidx] = next_delta;
    }
  };
  issue(0);
  publish(0);

  const bool softcap = p.softcap > 0.f;
  const float inv_cap = softcap ? 1.f / p.softcap : 0.f;
  const float scale_over_cap = softcap ? p.scale / p.softcap : 0.f;
  float row_bias[kRowsT];  // query-broadcast bias of each row's key for the current head
  int row_vis[kRowsT];     // row_key, or -1 where a query-broadcast mask drops the key
  float row_db[kRowsT];    // sum over the head's queries of dS
  int64_t bias_base = 0, mask_base = 0;

  for (int j = 0; j < n_steps; ++j) {
    const int stage = j & 1;
    const int h = h0 + j / n_qblocks;
    const int mb = j % n_qblocks;
    const int m0 = m_lo + mb * kBlockM;
    if (mb == 0) {
      bias_base = b * p.bias_stride[0] + int64_t(h) * p.bias_heads / p.H * p.bias_stride[1];
      mask_base = b * p.mask_stride[0] + int64_t(h) * p.mask_heads / p.H * p.mask_stride[1];
      CUTE_UNROLL
      for (int mi = 0; mi < kRowsT; ++mi) {
        const int key = row_key[mi];
        row_bias[mi] = bias_per_key && key >= 0 ? load_float(p.bias, p.bias_dtype, bias_base + key * p.bias_stride[3]) : 0.f;
        row_vis[mi] = mask_per_key && key >= 0 && __ldg(p.mask + mask_base + key * p.mask_stride[3]) == 0 ? -1 : key;
        row_db[mi] = 0.f;
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // step j's Q, dO, lse, delta visible; everyone is done with step j-1's stage
    const bool has_next = j + 1 < n_steps;
    if (has_next) issue(j + 1);

    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kBlockM>>{});
    clear(acc_s);
    gemm_smem(acc_s, tSrK, tSrQ, tSsK, sthr_B.partition_S(sQ_at(stage)), tiled_mma, smem_copy_A, smem_copy_B,
              sthr_A, sthr_B);
    Tensor acc_dp = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kBlockM>>{});
    clear(acc_dp);
    gemm_smem(acc_dp, tSrV, tSrdO, tSsV, sthr_B.partition_S(sdO_at(stage)), tiled_mma, smem_copy_A, smem_copy_B,
              sthr_A, sthr_B);

    fwd_impl::scale_scores(acc_s, p.scale, p.softcap, scale_over_cap);
    Tensor s_rc = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    Tensor dp_rc = make_tensor(acc_dp.data(), rowcol(acc_dp.layout()));
    // P^T overwrites S^T, dS^T (times the softcap factor) overwrites dP^T.
    CUTE_UNROLL
    for (int ni = 0; ni < kColsT; ++ni) {
      const int c = get<1>(c_rc(0, ni));
      const int query = m0 + c;
      const float lse = sLse[stage * kBlockM + c];
      const float delta = sDelta[stage * kBlockM + c];
      const int last_key = p.causal ? query + off : p.K;
      CUTE_UNROLL
      for (int mi = 0; mi < kRowsT; ++mi) {
        const int key = row_vis[mi];
        bool visible = query < p.Q && key >= 0 && key <= last_key && last_key < row_death[mi];
        float s = s_rc(mi, ni) + row_bias[mi];
        if constexpr (kPerQuery) {
          if (visible && p.bias != nullptr && !bias_per_key) {
            s += load_float(p.bias, p.bias_dtype, bias_base + query * p.bias_stride[2] + key * p.bias_stride[3]);
          }
          if (visible && p.mask != nullptr && !mask_per_key) {
            visible = __ldg(p.mask + mask_base + query * p.mask_stride[2] + key * p.mask_stride[3]) != 0;
          }
        }
        const float prob = visible ? fast_exp2(fmaf(s, kLog2e, -lse)) : 0.f;
        const float ds = prob * (dp_rc(mi, ni) - delta);
        row_db[mi] += ds;
        dp_rc(mi, ni) = softcap ? ds * cap_factor(s_rc(mi, ni), inv_cap) : ds;
        s_rc(mi, ni) = prob;
      }
    }

    Tensor rP = convert_fragment<Element>(acc_s);
    gemm_reg_smem(acc_dv, make_tensor(rP.data(), acc_as_a(rP.layout())), tdXrT, sthr_Bt.partition_S(sdOt_at(stage)),
                  tiled_mma, smem_copy_Bt, sthr_Bt);
    Tensor rdS = convert_fragment<Element>(acc_dp);
    gemm_reg_smem(acc_dk, make_tensor(rdS.data(), acc_as_a(rdS.layout())), tdXrT, sthr_Bt.partition_S(sQt_at(stage)),
                  tiled_mma, smem_copy_Bt, sthr_Bt);

    if (has_next) publish(j + 1);

    // The head's last query block: its dbias partial per key, one thread per quad.
    if (mb == n_qblocks - 1 && p.dbias_keys != nullptr) {
      float* db = p.dbias_keys + (int64_t(b) * p.H + h) * p.K;
      CUTE_UNROLL
      for (int mi = 0; mi < kRowsT; ++mi) {
        const float total = quad_sum(row_db[mi]);
        if (get<1>(c_rc(0, 0)) == 0 && row_key[mi] >= 0) db[row_key[mi]] = total;
      }
    }
  }

  // ---------------------------------------------------------------- epilogue: dk = scale dS^T Q, dv
  if (p.dk == nullptr) return;
  Tensor tOc = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  Tensor o_rc = make_tensor(tOc.data(), rowcol(tOc.layout()));
  Tensor dk_rc = make_tensor(acc_dk.data(), rowcol(acc_dk.layout()));
  Tensor dv_rc = make_tensor(acc_dv.data(), rowcol(acc_dv.layout()));
  int64_t k_rows[kRowsT];
  int64_t v_rows[kRowsT];
  if (p.dkdv_part != nullptr) {  // this query head's partials, by list position (h_out: query head)
    const int64_t half = int64_t(p.B) * p.H * p.list_len * kHeadDim;
    CUTE_UNROLL
    for (int mi = 0; mi < kRowsT; ++mi) {
      const int64_t pos = int64_t(n_tile) * kBlockN + get<0>(c_rc(mi, 0));
      k_rows[mi] = row_key[mi] >= 0 ? ((int64_t(b) * p.H + h_out) * p.list_len + pos) * kHeadDim : -1;
      v_rows[mi] = k_rows[mi] >= 0 ? half + k_rows[mi] : -1;
    }
    store_rows(p.dkdv_part, dk_rc, o_rc, p.scale, k_rows);
    store_rows(p.dkdv_part, dv_rc, o_rc, 1.f, v_rows);
    return;
  }
  CUTE_UNROLL
  for (int mi = 0; mi < kRowsT; ++mi) {
    const int key = row_key[mi];
    k_rows[mi] = key >= 0 ? b * p.dk_stride[0] + key * p.dk_stride[1] + h_out * p.dk_stride[2] : -1;
    v_rows[mi] = key >= 0 ? b * p.dv_stride[0] + key * p.dv_stride[1] + h_out * p.dv_stride[2] : -1;
  }
  if (p.dkdv_f32) {
    store_rows(static_cast<float*>(p.dk), dk_rc, o_rc, p.scale, k_rows);
    store_rows(static_cast<float*>(p.dv), dv_rc, o_rc, 1.f, v_rows);
  } else {
    store_rows(static_cast<Element*>(p.dk), dk_rc, o_rc, p.scale, k_rows);
    store_rows(static_cast<Element*>(p.dv), dv_rc, o_rc, 1.f, v_rows);
  }
}

}  // namespace bwd_impl

template <DType kDType, int kHeadDim, bool kPerQuery>
void launch_bwd_dq(const BwdParams& params, cudaStream_t stream) {
  constexpr BwdTile tile = bwd_tile(kHeadDim);
  using Traits = bwd_impl::BwdTraits<kDType, kHeadDim, tile.dq_block_m, tile.dq_block_n, tile.warps>;
  auto kernel = &bwd_impl::dma_bwd_dq_kernel<Traits, kPerQuery>;
  constexpr int smem = Traits::kSmemBytes;
  if (smem > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
               "cudaFuncSetAttribute(dma_bwd_dq_kernel, MaxDynamicSharedMemorySize)");
  }
  const dim3 grid(unsigned((params.Q + Traits::kRows - 1) / Traits::kRows), unsigned(params.H), unsigned(params.B));
  kernel<<<grid, Traits::kThreads, smem, stream>>>(params);
  check_cuda(cudaGetLastError(), "dma_bwd_dq_kernel launch");
}

template <DType kDType, int kHeadDim, bool kPerQuery>
void launch_bwd_dkdv(const BwdParams& params, cudaStream_t stream) {
  constexpr BwdTile tile = bwd_tile(kHeadDim);
  using Traits = bwd_impl::BwdTraits<kDType, kHeadDim, tile.dkdv_block_n, tile.dkdv_block_m, tile.warps>;
  auto kernel = &bwd_impl::dma_bwd_dkdv_kernel<Traits, kPerQuery>;
  constexpr int smem = Traits::kSmemBytes;
  if (smem > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
               "cudaFuncSetAttribute(dma_bwd_dkdv_kernel, MaxDynamicSharedMemorySize)");
  }
  const int64_t n_keys = params.idx != nullptr && params.death == nullptr ? params.list_len : params.K;
  const dim3 grid(unsigned((n_keys + Traits::kRows - 1) / Traits::kRows),
                  unsigned(params.B * (params.H / params.dkdv_heads)));
  kernel<<<grid, Traits::kThreads, smem, stream>>>(params);
  check_cuda(cudaGetLastError(), "dma_bwd_dkdv_kernel launch");
}

}  // namespace cuda
}  // namespace dmattn
