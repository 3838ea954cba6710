// The forward of dynamic mask attention for sm_90a (Hopper), with warpgroup MMA (wgmma).
//
// Same contract as fwd_kernel.cuh (same FwdParams, same LIST counts per 128-row query block, same
// results up to rounding) for the calls fwd.cu sends here: head dims 64 and 128, float16 and
// bfloat16, DENSE or LIST keys, GQA, bottom-right causal, softcap, and a bias and mask that are
// broadcast over the query rows. A per-query bias or mask stays on the sm_80 kernel (its per-element
// gathers would cost this kernel registers that the common case should not pay for).
//
// One thread block = two consumer warpgroups (256 threads) owning 128 query rows of one (batch,
// head); warpgroup w computes rows 64w .. 64w+63 (tiles.h, fwd_sm90_tile, says why two). Per tile
// of block_n keys:
//   S = Q K^T       wgmma SS: Q and K from shared memory (K-major, 128-byte swizzle)
//   scores          scale or softcap, the query-broadcast bias, -inf where the key is not visible
//   online softmax  in registers, rows reduced over the 4 threads of a quad (as on sm_80)
//   O += P V        wgmma RS: P from registers (the S accumulator converted in place to the A
//                   operand layout), V from shared memory read as an MN-major B operand
// K/V rows are gathered row by row through the key list (LIST) or taken contiguously (DENSE), so
// tensor-memory-access (TMA) tile loads do not apply: every thread issues 16-byte cp.async copies
// into the swizzled layouts that wgmma reads. Two shared-memory stages: the copies of tile t+1 are
// issued right after the barrier that opens tile t, so they overlap both GEMMs and the softmax of t.
// The key indices of t+1 are read from the list one tile earlier still, so the copies never wait
// on that load.
//
// Status: passes tests/test_cuda_fwd_sm90.py (152 cases against the float64 reference) and
// compute-sanitizer memcheck on an H200, but runs slower than the sm_80 kernel (T32k 4.07 against
// 2.76 ms), so fwd.cu keeps it off by default. Written on a machine without a GPU: it compiles for
// sm_80, sm_90a and compute_90, its SASS holds HGMMA and no HMMA (`cuobjdump -sass _cuda*.so`: 16 HGMMA per variant
// at D = 128, 8 k-blocks of 64x128x16 for S and 8 for O; 12 at D = 64, 4 for S and 8 of 64x64x16
// for O), ptxas reports 250-255 registers and no spills, and the register and shared-memory layouts
// (accumulator rows/columns, P as the RS A operand, V read transposed, each warpgroup's Q rows)
// were checked on the host against the wgmma atom layouts.
//
// Non-sm_90a passes (sm_80 SASS, compute_90 PTX) compile an empty body that traps: fwd.cu never
// launches this kernel unless the build carries sm_90a code and the device is compute capability 9.0.
#pragma once

#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>

#include "fwd_kernel.cuh"

namespace dmattn {
namespace cuda {
namespace fwd_sm90_impl {

using namespace cute;

template <DType kDType, int kHeadDim_>
struct Sm90Traits {
  using Element = typename fwd_impl::CuteElement<kDType>::type;
  static constexpr FwdSm90Tile kTile = fwd_sm90_tile(kHeadDim_);
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kTile.block_m;
  static constexpr int kBlockN = kTile.block_n;
  static constexpr int kWarpgroups = kTile.warpgroups;
  static constexpr int kStages = kTile.stages;
  static constexpr int kThreads = 128 * kWarpgroups;
  static_assert(kBlockM == 64 * kWarpgroups, "one wgmma M of 64 rows per warpgroup");
  static_assert(kBlockM == fwd_tile(kHeadDim_).block_m, "the LIST counts are per fwd_block_m(D) query rows");
  static_assert(kHeadDim % 64 == 0, "rows are whole 128-byte swizzle atoms (64 elements)");
  static_assert(kBlockN % 64 == 0, "V's key dim is whole MN-major swizzle atoms");

  using WarpgroupLayout = Layout<Shape<Int<kWarpgroups>, _1, _1>>;
  // S (64 x block_n per warpgroup) += Q (64 x D) K^T, both operands K-major in shared memory.
  using TiledMmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockN>, Int<kHeadDim>>>(), WarpgroupLayout{}));
  // O (64 x D per warpgroup) += P (64 x block_n, registers) V, V as (D, block_n) with D contiguous.
  using TiledMmaO = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, Int<kBlockN>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      WarpgroupLayout{}));

  // 8 rows x 64 elements, 128-byte swizzle: the layout wgmma's descriptors describe, and the one
  // that keeps 16-byte cp.async stores free of bank conflicts.
  using SmemAtom = GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  // V stored as K is (block_n, D); the second GEMM reads it as (D, block_n): a view, not a copy.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{})));

  // Global -> shared: 16 bytes per thread per copy, 8 threads per 64-element row segment.
  static constexpr int kElemsPerCopy = 8;
  static constexpr int kThreadsPerRow = 8;
  using GmemThreads =
      Layout<Shape<Int<kThreads / kThreadsPerRow>, Int<kThreadsPerRow>>, Stride<Int<kThreadsPerRow>, _1>>;
  using GmemCopyIn = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{},
                                              GmemThreads{}, Layout<Shape<_1, Int<kElemsPerCopy>>>{}));
  using GmemCopyOut = decltype(make_tiled_copy(Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>{},
                                               GmemThreads{}, Layout<Shape<_1, Int<kElemsPerCopy>>>{}));
  using SmemCopyAtomO = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>;
  static_assert(kBlockN % (kThreads / kThreadsPerRow) == 0, "every thread loads the same number of key rows");
  static constexpr int kLoadRows = kBlockN / (kThreads / kThreadsPerRow);

  static constexpr int kSmemQBytes = int(cosize_v<SmemLayoutQ> * sizeof(Element));
  static constexpr int kSmemKVBytes = int(cosize_v<SmemLayoutKV> * sizeof(Element));
  static constexpr int kSmemQKVBytes = kSmemQBytes + 2 * kSmemKVBytes;
  static_assert(kSmemQBytes % 1024 == 0 && kSmemKVBytes % 1024 == 0, "every tile starts on a swizzle period");
  // sKey (int32) and sBias (float32) per key and stage, plus 1 KiB to align the dynamic shared
  // memory base to the 1024-byte period of the 128-byte swizzle (wgmma descriptors assume it).
  static constexpr int kSmemBytes = kSmemQKVBytes + kStages * kBlockN * 8 + 1024;
};

// GMMA accumulator ((2, 2, N/8), MMA_M, MMA_N) -> (rows (2, MMA_M), cols (2, N/8, MMA_N)): each
// thread holds 2 adjacent columns of every 8-column block, in rows r and r + 8 of its warp's 16.
template <class L>
CUTE_HOST_DEVICE auto rowcol(L layout) {
  return make_layout(make_layout(get<0, 1>(layout), get<1>(layout)),
                     make_layout(get<0, 0>(layout), get<0, 2>(layout), get<2>(layout)));
}

// The S accumulator ((2, 2, N/8), MMA_M, 1) as the A operand of the k16 wgmma with P:
// ((2, 2, 2), MMA_M, N/16). Columns 16j .. 16j+15 (8-column blocks 2j and 2j+1) are k-block j, and
// a thread's values of one k-block are exactly the register A fragment of wgmma's RS form.
template <class L>
CUTE_HOST_DEVICE auto acc_as_a(L layout) {
  auto blocks = logical_divide(get<0, 2>(layout), Layout<_2>{});  // (2, N/16)
  return make_layout(make_layout(get<0, 0>(layout), get<0, 1>(layout), get<0>(blocks)), get<1>(layout),
                     coalesce(make_layout(get<1>(blocks), get<2>(layout))));
}

// acc (+)= A B over the k-blocks of one tile, issued as one wgmma batch of the warpgroup and
// waited for before returning (the softmax needs S, and P's registers are reused next tile).
// kZeroInit: the first k-block overwrites acc instead of adding to it.
template <bool kZeroInit, class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void warpgroup_gemm(Mma& mma, TA& tA, TB const& tB, TC& tC) {
  constexpr bool kRegA = !is_base_of<GMMA::DescriptorIterator, typename Mma::FrgTypeA>::value;
  // The fences keep the compiler from moving register reads/writes of the operands across the
  // asynchronous wgmma (it does not see that the hardware reads them after the issue).
  if constexpr (kRegA) warpgroup_fence_operand(tA);
  warpgroup_fence_operand(tC);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(tA); ++k) {
    cute::gemm(mma, tA(_, _, k), tB(_, _, k), tC);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(tC);
  if constexpr (kRegA) warpgroup_fence_operand(tA);
}

// Shared memory written by cp.async or plain stores (the generic proxy) and read next by wgmma (the
// async proxy) needs this fence in each writing thread before the barrier that publishes it.
__device__ __forceinline__ void fence_generic_to_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1) dma_fwd_sm90_kernel(const FwdParams p) {
#if defined(__CUDA_ARCH__) && defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages;
  constexpr int kLoadRows = Traits::kLoadRows;
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ char smem_raw[];
  char* smem = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));

  // Last query blocks first: with causality they see the most keys, and starting them early keeps
  // the tail of the grid short.
  const int m_block = int(gridDim.x) - 1 - int(blockIdx.x);
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int tidx = threadIdx.x;
  const int m0 = m_block * kBlockM;
  const int off = p.K - p.Q;  // bottom-right causal: key j visible to query i iff j <= i + off
  const int g = h / (p.H / p.H_kv);

  const int32_t* list = nullptr;
  int limit;
  if (p.idx != nullptr) {
    const int64_t row = (p.sel_batched ? int64_t(b) : 0) * p.sel_heads + int64_t(h) * p.sel_heads / p.H;
    list = p.idx + row * p.list_len;
    limit = max(0, int(min(int64_t(p.counts[row * p.n_query_blocks + m_block]), p.list_len)));
  } else if (p.causal) {
    limit = max(0, min(min(m0 + kBlockM, p.Q) + off, p.K));
  } else {
    limit = p.K;
  }
  const int n_tiles = (limit + kBlockN - 1) / kBlockN;

  Element* out_ptr = static_cast<Element*>(p.out) + b * p.out_stride[0] + h * p.out_stride[2];
  float* lse_ptr = p.lse + b * p.lse_stride[0] + h * p.lse_stride[1];
  if (n_tiles == 0) {
    fwd_impl::write_empty_block<Traits>(out_ptr, p.out_stride[1], lse_ptr, m0, p.Q);
    return;
  }

  const Element* q_ptr = static_cast<const Element*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
  const Element* k_ptr = static_cast<const Element*>(p.k) + b * p.k_stride[0] + g * p.k_stride[2];
  const Element* v_ptr = static_cast<const Element*>(p.v) + b * p.v_stride[0] + g * p.v_stride[2];
  const int64_t bias_base = b * p.bias_stride[0] + int64_t(h) * p.bias_heads / p.H * p.bias_stride[1];
  const int64_t mask_base = b * p.mask_stride[0] + int64_t(h) * p.mask_heads / p.H * p.mask_stride[1];
  // fwd.cu sends only query-broadcast bias and mask here: both are per key.
  const bool bias_per_key = p.bias != nullptr;
  const bool mask_per_key = p.mask != nullptr;

  Element* q_smem = reinterpret_cast<Element*>(smem);
  Element* k_smem = reinterpret_cast<Element*>(smem + Traits::kSmemQBytes);
  Element* v_smem = reinterpret_cast<Element*>(smem + Traits::kSmemQBytes + Traits::kSmemKVBytes);
  Tensor sQ = make_tensor(make_smem_ptr(q_smem), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(k_smem), typename Traits::SmemLayoutKV{});   // (N, D, stage)
  Tensor sV = make_tensor(make_smem_ptr(v_smem), typename Traits::SmemLayoutKV{});   // (N, D, stage)
  Tensor sVt = make_tensor(make_smem_ptr(v_smem), typename Traits::SmemLayoutVt{});  // (D, N, stage)
  int* sKey = reinterpret_cast<int*>(smem + Traits::kSmemQKVBytes);  // [stage][key row]: key, -1 none
  float* sBias = reinterpret_cast<float*>(sKey + kStages * kBlockN); // [stage][key row]: its bias

  // ---------------------------------------------------------------- global -> shared copies
  typename Traits::GmemCopyIn gmem_copy;
  auto gthr = gmem_copy.get_thread_slice(tidx);

  Tensor gQ = make_tensor(make_gmem_ptr(q_ptr + int64_t(m0) * p.q_stride[1]), Shape<Int<kBlockM>, Int<kHeadDim>>{},
                          make_stride(p.q_stride[1], _1{}));
  Tensor tQgQ = gthr.partition_S(gQ);
  Tensor tQsQ = gthr.partition_D(sQ);
  Tensor tQcQ = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));

  // Column offsets of the thread's 16-byte chunks (row stride 0); the row's key index adds the rest.
  Tensor gKcols = make_tensor(make_gmem_ptr(k_ptr), Shape<Int<kBlockN>, Int<kHeadDim>>{}, Stride<_0, _1>{});
  Tensor gVcols = make_tensor(make_gmem_ptr(v_ptr), Shape<Int<kBlockN>, Int<kHeadDim>>{}, Stride<_0, _1>{});
  Tensor tKgK = gthr.partition_S(gKcols);  // (CPY, CPY_N, CPY_D)
  Tensor tVgV = gthr.partition_S(gVcols);
  Tensor tKsK = gthr.partition_D(sK);  // (CPY, CPY_N, CPY_D, stage)
  Tensor tVsV = gthr.partition_D(sV);
  Tensor tKVc = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  static_assert(decltype(size<1>(tKsK))::value == kLoadRows, "copy partition and key rows agree");
  const bool meta_writer = get<1>(tKVc(0, 0, 0)) == 0;

  // Copies of tile t's rows (keys from tile_keys) into stage s, and its key metadata.
  auto load_tile = [&](int stage, const int(&keys)[kLoadRows]) {
    Tensor tKs = tKsK(_, _, _, stage);
    Tensor tVs = tVsV(_, _, _, stage);
    fwd_impl::load_rows(gmem_copy, tKgK, tKs, p.k_stride[1], keys);
    fwd_impl::load_rows(gmem_copy, tVgV, tVs, p.v_stride[1], keys);
    cp_async_fence();
  };

  // ---------------------------------------------------------------- MMA partitions
  typename Traits::TiledMmaS mma_s;
  typename Traits::TiledMmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tidx);
  auto thr_o = mma_o.get_thread_slice(tidx);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);   // descriptors (MMA, 1, D/16)
  Tensor tSrK = thr_s.partition_fragment_B(sK);   // descriptors (MMA, 1, D/16, stage)
  Tensor tOrV = thr_o.partition_fragment_B(sVt);  // descriptors (MMA, 1, N/16, stage)

  Tensor acc_o = partition_fragment_C(mma_o, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  clear(acc_o);
  Tensor o_rc = make_tensor(acc_o.data(), rowcol(acc_o.layout()));
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor c_rc = make_tensor(tScS.data(), rowcol(tScS.layout()));
  constexpr int kRows = decltype(size<0>(c_rc))::value;
  constexpr int kCols = decltype(size<1>(c_rc))::value;
  static_assert(decltype(size<0>(o_rc))::value == kRows, "S and O share their rows");

  float row_max[kRows];
  float row_sum[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    row_max[mi] = -INFINITY;
    row_sum[mi] = 0.f;
  }

  // ---------------------------------------------------------------- prologue: Q, tile 0, keys of tile 1
  CUTE_UNROLL
  for (int m = 0; m < size<1>(tQsQ); ++m) {
    const bool row_ok = m0 + get<0>(tQcQ(0, m, 0)) < p.Q;
    CUTE_UNROLL
    for (int kk = 0; kk < size<2>(tQsQ); ++kk) {
      if (row_ok) {
        copy(gmem_copy, tQgQ(_, m, kk), tQsQ(_, m, kk));
      } else {
        clear(tQsQ(_, m, kk));
      }
    }
  }
  int keys[kLoadRows];
  fwd_impl::tile_keys<kBlockN>(0, tKVc, limit, list, p.K, keys);
  load_tile(0, keys);
  {
    fwd_impl::KeyMeta<kLoadRows> meta;
    meta.load(p, keys, meta_writer, bias_per_key, mask_per_key, bias_base, mask_base);
    meta.store(tKVc, keys, meta_writer, sKey, sBias);
  }
  fwd_impl::tile_keys<kBlockN>(1, tKVc, limit, list, p.K, keys);  // all -1 past the last tile

  const float scale = p.scale;
  const float softcap = p.softcap;
  const float scale_over_cap = softcap > 0.f ? p.scale / softcap : 0.f;

  for (int t = 0; t < n_tiles; ++t) {
    const int stage = t % kStages;
    const bool has_next = t + 1 < n_tiles;
    cp_async_wait<0>();
    fence_generic_to_async_smem();
    __syncthreads();  // tile t and its metadata visible; every warpgroup is done with tile t-1
    fwd_impl::KeyMeta<kLoadRows> next_meta;
    if (has_next) {
      load_tile(stage ^ 1, keys);
      next_meta.load(p, keys, meta_writer, bias_per_key, mask_per_key, bias_base, mask_base);
    }

    Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
    warpgroup_gemm<true>(mma_s, tSrQ, tSrK(_, _, _, stage), acc_s);

    // Scores: scale (or softcap), bias, then -inf wherever the key is not visible.
    Tensor s_rc = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    if (softcap > 0.f) {
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) acc_s(i) = softcap * tanhf(acc_s(i) * scale_over_cap);
    } else {
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) acc_s(i) *= scale;
    }
    const int* stage_key = sKey + stage * kBlockN;
    const float* stage_bias = sBias + stage * kBlockN;
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const int row = m0 + get<0>(c_rc(mi, 0));
      const bool row_ok = row < p.Q;
      const int last_key = p.causal ? row + off : p.K;
      CUTE_UNROLL
      for (int ni = 0; ni < kCols; ++ni) {
        const int c = get<1>(c_rc(0, ni));
        const int key = stage_key[c];
        const bool visible = row_ok && key >= 0 && key <= last_key;
        s_rc(mi, ni) = visible ? s_rc(mi, ni) + stage_bias[c] : -INFINITY;
      }
    }

    // Online softmax in base 2: p = 2^(s log2e - m log2e). A row whose max is still -inf shifts by 0.
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      float mx = row_max[mi];
      CUTE_UNROLL
      for (int ni = 0; ni < kCols; ++ni) mx = fmaxf(mx, s_rc(mi, ni));
      mx = fwd_impl::quad_max(mx);
      const float m_use = mx == -INFINITY ? 0.f : mx;
      const float alpha = exp2f((row_max[mi] - m_use) * kLog2e);
      row_max[mi] = mx;
      row_sum[mi] *= alpha;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(o_rc); ++j) o_rc(mi, j) *= alpha;
      const float shift = m_use * kLog2e;
      CUTE_UNROLL
      for (int ni = 0; ni < kCols; ++ni) {
        const float e = exp2f(fmaf(s_rc(mi, ni), kLog2e, -shift));
        s_rc(mi, ni) = e;
        row_sum[mi] += e;
      }
    }

    Tensor rP = fwd_impl::convert_fragment<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), acc_as_a(rP.layout()));
    warpgroup_gemm<false>(mma_o, tOrP, tOrV(_, _, _, stage), acc_o);

    if (has_next) {
      // Stage ^ 1's metadata was last read in tile t-1, before this tile's barrier.
      next_meta.store(tKVc, keys, meta_writer, sKey + (stage ^ 1) * kBlockN, sBias + (stage ^ 1) * kBlockN);
      // The list entries of tile t+2, read now so the copies of the next tile need not wait on them.
      fwd_impl::tile_keys<kBlockN>(t + 2, tKVc, limit, list, p.K, keys);
    }
  }

  // ---------------------------------------------------------------- epilogue
  float row_lse[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const float sum = fwd_impl::quad_sum(row_sum[mi]);
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
      if (row < p.Q) lse_ptr[row] = row_lse[mi];
    }
  }

  // O goes through shared memory (the Q tile) so the global stores are 16-byte rows. The barrier
  // makes sure no warpgroup still reads Q in its last S = Q K^T.
  Tensor rO = fwd_impl::convert_fragment<Element>(acc_o);
  __syncthreads();
  Tensor sO = make_tensor(make_smem_ptr(q_smem), typename Traits::SmemLayoutQ{});
  auto smem_copy_O = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, mma_o);
  auto sthr_O = smem_copy_O.get_thread_slice(tidx);
  Tensor taccOrO = sthr_O.retile_S(rO);
  Tensor taccOsO = sthr_O.partition_D(sO);
  copy(smem_copy_O, taccOrO, taccOsO);
  __syncthreads();

  typename Traits::GmemCopyOut gmem_copy_O;
  auto gthr_O = gmem_copy_O.get_thread_slice(tidx);
  Tensor gO = make_tensor(make_gmem_ptr(out_ptr + int64_t(m0) * p.out_stride[1]), Shape<Int<kBlockM>, Int<kHeadDim>>{},
                          make_stride(p.out_stride[1], _1{}));
  Tensor tOsO = gthr_O.partition_S(sO);
  Tensor tOgO = gthr_O.partition_D(gO);
  Tensor tOcO = gthr_O.partition_D(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tOrO = make_tensor<Element>(shape(tOgO));
  copy(gmem_copy_O, tOsO, tOrO);
  CUTE_UNROLL
  for (int m = 0; m < size<1>(tOgO); ++m) {
    if (m0 + get<0>(tOcO(0, m, 0)) < p.Q) {
      CUTE_UNROLL
      for (int kk = 0; kk < size<2>(tOgO); ++kk) copy(gmem_copy_O, tOrO(_, m, kk), tOgO(_, m, kk));
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // compiled without sm_90a features: fwd.cu must never launch this
#endif
}

}  // namespace fwd_sm90_impl

template <DType kDType, int kHeadDim>
void launch_fwd_sm90(const FwdParams& params, cudaStream_t stream) {
  using Traits = fwd_sm90_impl::Sm90Traits<kDType, kHeadDim>;
  auto kernel = &fwd_sm90_impl::dma_fwd_sm90_kernel<Traits>;
  constexpr int smem = Traits::kSmemBytes;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "cudaFuncSetAttribute(dma_fwd_sm90_kernel, MaxDynamicSharedMemorySize)");
  const dim3 grid(unsigned((params.Q + Traits::kBlockM - 1) / Traits::kBlockM), unsigned(params.H), unsigned(params.B));
  kernel<<<grid, Traits::kThreads, smem, stream>>>(params);
  check_cuda(cudaGetLastError(), "dma_fwd_sm90_kernel launch");
}

}  // namespace cuda
}  // namespace dmattn
