// The backward of dynamic mask attention for sm_90a (Hopper), with warpgroup MMA (wgmma): a dq kernel
// and a dk/dv kernel for the LIST calls of head dims 64 and 128 whose forward reads the compact copy
// (FwdParams::compact). They compute what bwd_kernel.cuh's kernels compute for the same calls
// (query-broadcast bias and mask, GQA/MQA, causal, softcap, every dk/dv output form of BwdParams),
// deterministically (no atomics), and are built like the sm_90a forward (fwd_sm90_kernel.cuh): a
// producer warpgroup that loads, two consumer warpgroups that compute, mbarriers between them.
//
// Measured (H200, bf16, T32k global: H 32, H_kv 8, D 128, w 2048, causal; kernel times per fwd+bwd
// call from torch.profiler, 2026-11-29; benchmarks/results/cuda-bwd-sm90-h200-2026-11-29.log):
// - first version against the sm_80 kernels: dq 5.8 -> 2.67 ms, dk/dv 6.71 -> 3.80 ms; T32k
//   fwd+bwd 15.4 -> 9.37 ms, T8k 3.6 -> 2.8 ms;
// - then the element-wise steps below (one MUFU.EX2 per score, the scale folded into its FMA,
//   missing keys and empty rows as -inf terms instead of tests, the causal test skipped where a
//   whole dk/dv step is visible): dq 2.67 -> 2.22, dk/dv 3.80 -> 2.42 ms, T32k fwd+bwd 7.1 ms;
// - FlashAttention-3's ping-pong (the consumer warpgroups taking turns to issue S and dP through
//   named barriers, as the forward does) lost in both kernels: dq 2.22 -> 2.52, dk/dv 2.42 -> 2.49;
//   three dk/dv stages instead of two lost too (2.42 -> 2.60). Neither is built.
// - dk/dv thread blocks in launch order by list tile, then program row, so that every program
//   row's first tile (its smallest keys, which the most query blocks see) starts in the first
//   wave and the light tiles fill the last one (longest first; by program row, then tile, heavy
//   tiles could start last): dk/dv 2.38 -> 1.84 ms at T32k (session 11, its numbers in
//   benchmarks/results/bench-nvidia-h200-2026-11-29-v11.log). Harness T32k fwd+bwd 6.37
//   -> 5.96 ms (6.03 in harness v11, where dense cuDNN also ran 3% slower than in v10), B32k 6.04
//   -> 5.73 (5.71), T8k 1.69 -> 1.27 (1.45).
// - dQ inside the dk/dv kernel (FlashAttention-3's way, for deterministic=False; session 11): dS^T
//   to shared memory, dQ = dS K as a third wgmma (the two warpgroups taking 64 columns each), and
//   its float32 block added to a zero-filled (B, H, Q, D) buffer, then converted to dq. It lost,
//   because dQ's float32 additions (64 x 128 per step: 4.3 GB at T32k) cost more than the dq
//   kernel's recomputation of S and dP: with one bulk reduce-add (cp.reduce.async.bulk) per
//   warpgroup and step the kernel took 4.50 ms (3.68 without the reduce, 2.38 without dQ), plus
//   0.29 ms for the conversion and 0.07 for the zero fill, against 2.22 + 2.38; red.global.add.v2
//   from registers took 5.40 ms. Harness T32k fwd+bwd: 6.60 against 6.37 ms. Not built.
// - The dq and dk/dv thread blocks in one launch (dk/dv blocks first), for the two last waves to
//   overlap: ptxas spilled 250 bytes in the combined kernel (56 and 8 apart), and its tests did
//   not finish on the H200 (a hang, not investigated). Not built.
// tests/test_cuda_bwd.py passes on both sets of kernels; compute-sanitizer memcheck, racecheck and
// synccheck are clean on five small LIST shapes (D 64 and 128, split and per-kv-head dk/dv,
// per-head lists, a key mask, softcap).
//
// The dq kernel:
// - one thread block per work item of 128 query rows of one (batch, head), items heaviest first;
//   3 warpgroups: a producer that moves each key tile of the item's list prefix from the compact
//   copy into a stage with bulk copies (K, V, the keys and their bias values), and two consumers of
//   64 query rows each;
// - the consumers hold Q and dO (the forward's two Q buffers) and, per key tile:
//     S  = Q K^T     wgmma SS (as the forward's S)
//     dP = dO V^T    wgmma SS: V's stage read as a K-major B operand, exactly as S reads K
//     P  = exp(S - lse), dS = P (dP - delta) (times the softcap factor), in registers
//     dQ += dS K     wgmma RS: dS converted in place to the A operand layout, K's stage read as an
//                    MN-major (D, block_n) B operand, exactly as the forward's O += P V reads V
//   "V empty" is signalled once dP is done, "K empty" once dQ += dS K is;
// - dq = scale * dQ leaves through shared memory (the Q buffer) in 16-byte rows.
// The LIST counts passed to the backward are per bwd_dq_block_m(D) = 64 query rows (the sm_80 dq
// kernel's block): an item of 128 rows walks the longer prefix of its two halves (counts never
// decrease along the query blocks), and the per-element visibility test drops the rest.
// Registers: each consumer thread holds dQ (D / 2 floats), S and dP (64 floats each at
// block_n = 128) at once, then dS as 32 16-bit pairs (the forward's 40 / 232 budgets; ptxas: 8
// bytes of spills at D = 128, none at 64); the tile loop does not overlap one tile's dQ += dS K with the next tile's S and dP (that
// would keep 32 more registers live), so the two consumer warpgroups' GEMMs interleave on the
// tensor cores instead.
//
// The dk/dv kernel: see its own comment below.
#pragma once

#include "bwd.h"
#include "bwd_kernel.cuh"
#include "fwd_sm90_kernel.cuh"

namespace dmattn {
namespace cuda {
namespace bwd_sm90_impl {

using namespace cute;
using fwd_sm90_impl::acc_as_a;
using fwd_sm90_impl::convert_into;
using fwd_sm90_impl::fence_generic_to_async_smem;
using fwd_sm90_impl::gemm_done;
using fwd_sm90_impl::gemm_issue;
using fwd_sm90_impl::kBarConsumers;
using fwd_sm90_impl::named_sync;
using fwd_sm90_impl::rowcol;
using bwd_impl::cap_factor;
using fwd_impl::fast_exp2;
using fwd_impl::quad_sum;

// One score of the backward: from the S accumulator value `acc` (before scale), its bias minus the
// row's lse in base 2 (`shift2`: -inf for a key that is missing or masked, or a row without keys),
// P = 2^(s log2e + shift2) with s the scaled (or softcapped) score, and the factor dS is multiplied
// by: 1, or the softcap's 1 - tanh^2 (kCap).
template <bool kCap>
__device__ __forceinline__ void dS_elements(float acc, float shift2, float scale_log2e, float softcap,
                                            float scale_over_cap, float inv_cap, float* prob, float* factor) {
  if constexpr (kCap) {
    const float s = softcap * tanhf(acc * scale_over_cap);
    *prob = fast_exp2(fmaf(s, 1.4426950408889634f, shift2));
    *factor = cap_factor(s, inv_cap);
  } else {
    *prob = fast_exp2(fmaf(acc, scale_log2e, shift2));
    *factor = 1.f;
  }
}

// The dq kernel's element-wise step over a tile: dS (times the softcap factor) into dp_rc, from S in
// s_rc, per column (key) its bias in base 2 (-inf for a missing or masked key and for columns at or
// past tile_keys) and per row its lse (base 2), delta and last visible key (last_key: the causal
// test, which runs on every tile; skipping it on tiles the whole warpgroup sees, a second variant of
// this loop, made ptxas spill ~1 KB per thread). Columns go in chunks of 8 whose sKey/sBias reads
// stay below the previous chunk (as in the forward: hoisting all of them costs registers the
// consumers do not have). A function, not a lambda, so that its instantiations are inlined and the
// row arrays stay in registers.
template <bool kCap, class TS, class TC, int kRows>
__device__ __forceinline__ void dq_elements(TS& s_rc, TS& dp_rc, TC const& c_rc, const int* stage_key,
                                            const float* stage_bias, int tile_keys, const float (&row_lse)[kRows],
                                            const float (&row_delta)[kRows], const int (&last_key)[kRows],
                                            float scale_log2e, float softcap, float scale_over_cap, float inv_cap) {
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr int kCols = decltype(size<1>(c_rc))::value;
  constexpr int kChunk = 8;
  static_assert(kCols % kChunk == 0, "whole chunks of columns");
  CUTE_UNROLL
  for (int n0 = 0; n0 < kCols; n0 += kChunk) {
    CUTE_UNROLL
    for (int ni = n0; ni < n0 + kChunk; ++ni) {
      const int c = get<1>(c_rc(0, ni));
      const int key = c < tile_keys ? stage_key[c] : -1;
      const float bias2 = key >= 0 ? stage_bias[c] * kLog2e : -INFINITY;
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) {
        float prob, factor;
        dS_elements<kCap>(s_rc(mi, ni), bias2 - row_lse[mi], scale_log2e, softcap, scale_over_cap, inv_cap, &prob,
                          &factor);
        if (key > last_key[mi]) prob = 0.f;
        dp_rc(mi, ni) = prob * (dp_rc(mi, ni) - row_delta[mi]) * factor;
      }
    }
    asm volatile("" ::: "memory");
  }
}

// The dk/dv kernel's element-wise step over a step's scores: P^T into s_rc and dS^T (times the
// softcap factor) into dp_rc, per row (key) its bias in base 2 (-inf for no key) and per column
// (query) lse (base 2) and delta from shared memory; row_db accumulates dS^T per key; kCausal: also
// zero P where the key is past the query's reach (first_reach + column).
template <bool kCap, bool kCausal, class TS, class TC, int kRows>
__device__ __forceinline__ void dkdv_elements(TS& s_rc, TS& dp_rc, TC const& c_rc, const float* stage_lse,
                                              const float* stage_delta, int first_reach, const int (&vis_key)[kRows],
                                              const float (&row_bias2)[kRows], float (&row_db)[kRows],
                                              float scale_log2e, float softcap, float scale_over_cap, float inv_cap) {
  constexpr int kCols = decltype(size<1>(c_rc))::value;
  constexpr int kChunk = 8;
  static_assert(kCols % kChunk == 0, "whole chunks of columns");
  CUTE_UNROLL
  for (int n0 = 0; n0 < kCols; n0 += kChunk) {
    CUTE_UNROLL
    for (int ni = n0; ni < n0 + kChunk; ++ni) {
      const int c = get<1>(c_rc(0, ni));
      const float lse = stage_lse[c];
      const float delta = stage_delta[c];
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) {
        float prob, factor;
        dS_elements<kCap>(s_rc(mi, ni), row_bias2[mi] - lse, scale_log2e, softcap, scale_over_cap, inv_cap, &prob,
                          &factor);
        if constexpr (kCausal) prob = vis_key[mi] <= first_reach + c ? prob : 0.f;
        const float ds = prob * (dp_rc(mi, ni) - delta);
        row_db[mi] += ds;
        dp_rc(mi, ni) = ds * factor;
        s_rc(mi, ni) = prob;
      }
    }
    asm volatile("" ::: "memory");
  }
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1) dma_bwd_dq_sm90_kernel(const BwdParams p) {
#if defined(__CUDA_ARCH__) && defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  using Element = typename Traits::Element;
  using Barrier = cutlass::arch::ClusterBarrier;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages;
  constexpr int kConsumerThreads = Traits::kConsumerThreads;
  constexpr float kLog2e = 1.4426950408889634f;
  static_assert(2 * bwd_tile(kHeadDim).dq_block_m == kBlockM, "an item is two blocks of the backward's LIST counts");

  extern __shared__ char smem_raw[];
  char* smem = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));

  // The item: last query blocks first over all heads, as the forward (they walk the most keys).
  const int n_m = (p.Q + kBlockM - 1) / kBlockM;
  const int bh = p.B * p.H;
  const int m_block = n_m - 1 - int(blockIdx.x) / bh;
  const int h = int(blockIdx.x) % bh % p.H;
  const int b = int(blockIdx.x) % bh / p.H;
  const int m0 = m_block * kBlockM;
  const int tidx = threadIdx.x;

  // Its list prefix: the longer of its two halves' counts.
  const int32_t* counts = p.counts + selection_row(p, b, h) * p.n_query_blocks;
  int limit = counts[2 * m_block];
  if (2 * m_block + 1 < p.n_query_blocks) limit = max(limit, int(counts[2 * m_block + 1]));
  limit = max(0, int(min(int64_t(limit), p.list_len)));
  const int n_tiles = (limit + kBlockN - 1) / kBlockN;

  Element* dq_ptr = static_cast<Element*>(p.dq) + b * p.dq_stride[0] + h * p.dq_stride[2];
  if (n_tiles == 0) {  // no key: dq 0
    fwd_impl::zero_block_rows<kBlockM, kHeadDim>(dq_ptr, p.dq_stride[1], m0, p.Q, tidx, Traits::kThreads);
    return;
  }

  Element* q_smem = reinterpret_cast<Element*>(smem);
  Element* k_smem = reinterpret_cast<Element*>(smem + Traits::kSmemQBytes);
  Element* v_smem = reinterpret_cast<Element*>(smem + Traits::kSmemQBytes + Traits::kSmemKVBytes);
  Tensor sQ = make_tensor(make_smem_ptr(q_smem), typename Traits::SmemLayoutQ2{});   // (M, D, 0: Q, 1: dO)
  Tensor sK = make_tensor(make_smem_ptr(k_smem), typename Traits::SmemLayoutKV{});   // (N, D, stage)
  Tensor sV = make_tensor(make_smem_ptr(v_smem), typename Traits::SmemLayoutKV{});   // (N, D, stage)
  Tensor sKt = make_tensor(make_smem_ptr(k_smem), typename Traits::SmemLayoutVt{});  // (D, N, stage)
  int* sKey = reinterpret_cast<int*>(smem + Traits::kSmemQKVBytes);  // [stage][key row]: key, -1 none
  float* sBias = reinterpret_cast<float*>(sKey + kStages * kBlockN); // [stage][key row]: its bias
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + Traits::kSmemBarrierOffset);
  uint64_t* full_k = bars;                 // K(t), sKey/sBias(t) landed
  uint64_t* empty_k = bars + kStages;      // every consumer's dQ += dS K(t) has completed
  uint64_t* full_v = bars + 2 * kStages;   // V(t) landed
  uint64_t* empty_v = bars + 3 * kStages;  // every consumer's dP = dO V(t)^T has completed
  if (tidx == 0) fwd_sm90_impl::init_stage_barriers<Traits>(bars, 1);  // one producer thread, bulk copies
  __syncthreads();  // the last block-wide barrier: the producer leaves early

  // Tile t lives in stage t % kStages; its barriers complete phase t / kStages (the producer's
  // first pass waits for parity 1, which a fresh barrier reports as complete).
  const int warpgroup = __shfl_sync(0xffffffffu, tidx / 128, 0);
  if (warpgroup == 0) {
    // ============================================================== producer: the compact tiles
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (tidx == 0) {
      const int list_tiles = int((p.list_len + kBlockN - 1) / kBlockN);
      const char* src = static_cast<const char*>(p.compact) +
                        (int64_t(b) * p.compact_heads + h * p.compact_heads / p.H) * list_tiles *
                            int64_t(Traits::kCompactTileBytes);
      for (int t = 0; t < n_tiles; ++t, src += Traits::kCompactTileBytes) {
        fwd_sm90_impl::copy_compact_tile<Traits>(src, t % kStages, ((t / kStages) & 1) ^ 1, bars, k_smem, v_smem, sKey,
                                                 sBias);
      }
    }
    return;
  }

  // ================================================================ consumers
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int ctidx = tidx - Traits::kProducerThreads;  // 0 .. 255: rows 0..63 are warpgroup 0's
  {
    const Element* q_ptr = static_cast<const Element*>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
    const Element* do_ptr = static_cast<const Element*>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[2];
    fwd_sm90_impl::load_block_rows<Traits>(q_ptr, p.q_stride[1], m0, p.Q, sQ(_, _, 0), ctidx);
    fwd_sm90_impl::load_block_rows<Traits>(do_ptr, p.dout_stride[1], m0, p.Q, sQ(_, _, 1), ctidx);
    cp_async_fence();
  }

  typename Traits::TiledMmaS mma_s;   // S and dP: (64 x block_n) per warpgroup, both operands in smem
  typename Traits::TiledMmaO mma_dq;  // dQ: (64 x D) per warpgroup += dS (registers) K
  auto thr_s = mma_s.get_thread_slice(ctidx);
  auto thr_dq = mma_dq.get_thread_slice(ctidx);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);    // descriptors (MMA, 1, D/16, 0: Q, 1: dO)
  Tensor tSrQ0 = tSrQ(_, _, _, 0);
  Tensor tSrdO = tSrQ(_, _, _, 1);
  Tensor tSrK = thr_s.partition_fragment_B(sK);    // descriptors (MMA, 1, D/16, stage)
  Tensor tSrV = thr_s.partition_fragment_B(sV);    // descriptors (MMA, 1, D/16, stage)
  Tensor tdQrK = thr_dq.partition_fragment_B(sKt); // descriptors (MMA, 1, N/16, stage)
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor c_rc = make_tensor(tScS.data(), rowcol(tScS.layout()));
  constexpr int kRows = decltype(size<0>(c_rc))::value;

  // lse in base 2 (+inf for rows without keys and rows past Q: P = 0 there) and delta per row.
  const int off = p.K - p.Q;
  float row_lse[kRows];
  float row_delta[kRows];
  int last_key[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const int row = m0 + get<0>(c_rc(mi, 0));
    row_lse[mi] = bwd_impl::lse2_of_row(p, b, h, row);
    row_delta[mi] = bwd_impl::delta_of_row(p, b, h, row);
    last_key[mi] = row >= p.Q ? -1 : p.causal ? row + off : p.K;
  }

  const float scale = p.scale;
  const float softcap = p.softcap;
  const float scale_over_cap = softcap > 0.f ? p.scale / softcap : 0.f;
  const float inv_cap = softcap > 0.f ? 1.f / softcap : 0.f;
  const float scale_log2e = p.scale * kLog2e;

  Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  clear(acc_dq);
  Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor acc_dp = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor s_rc = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
  Tensor dp_rc = make_tensor(acc_dp.data(), rowcol(acc_dp.layout()));
  Tensor rdS = make_tensor<Element>(acc_dp.layout());
  Tensor tdQrdS = make_tensor(rdS.data(), acc_as_a(rdS.layout()));

  cp_async_wait<0>();
  fence_generic_to_async_smem();
  named_sync(kBarConsumers, kConsumerThreads);  // Q and dO, copied by all consumers, visible to each

  for (int t = 0; t < n_tiles; ++t) {
    const int stage = t % kStages;
    const uint32_t full_parity = (t / kStages) & 1;
    Barrier::wait(full_k + stage, full_parity);
    Barrier::wait(full_v + stage, full_parity);
    gemm_issue<true>(mma_s, tSrQ0, tSrK(_, _, _, stage), acc_s);
    gemm_issue<true>(mma_s, tSrdO, tSrV(_, _, _, stage), acc_dp);
    warpgroup_wait<0>();
    gemm_done(acc_s);
    gemm_done(acc_dp);
    Barrier::arrive(empty_v + stage);

    // dS overwrites dP: P (dP - delta), times the softcap factor (dS_elements says how). Columns at
    // or past the item's limit hold the list's next entries (the compact copy's): their bias term is
    // -inf, like a missing or masked key's.
    const int tile_keys = limit - t * kBlockN;
    const int* stage_key = sKey + stage * kBlockN;
    const float* stage_bias = sBias + stage * kBlockN;
    if (softcap > 0.f) {
      dq_elements<true>(s_rc, dp_rc, c_rc, stage_key, stage_bias, tile_keys, row_lse, row_delta, last_key,
                        scale_log2e, softcap, scale_over_cap, inv_cap);
    } else {
      dq_elements<false>(s_rc, dp_rc, c_rc, stage_key, stage_bias, tile_keys, row_lse, row_delta, last_key,
                         scale_log2e, softcap, scale_over_cap, inv_cap);
    }
    convert_into(acc_dp, rdS);

    gemm_issue<false>(mma_dq, tdQrdS, tdQrK(_, _, _, stage), acc_dq);
    warpgroup_wait<0>();
    gemm_done(acc_dq);
    gemm_done(tdQrdS);
    Barrier::arrive(empty_k + stage);
  }

  // ---------------------------------------------------------------- epilogue: dq = scale dQ
  CUTE_UNROLL
  for (int i = 0; i < size(acc_dq); ++i) acc_dq(i) *= scale;
  fwd_sm90_impl::store_acc_rows<Traits>(acc_dq, q_smem, ctidx, dq_ptr, p.dq_stride[1], m0, p.Q);
#elif defined(__CUDA_ARCH__)
  __trap();  // compiled without sm_90a features: bwd.cu must never launch this
#endif
}

// ================================================================================ dk/dv kernel
// The dk/dv kernel for sm_90a: the LIST calls with a compact copy, as the dq kernel above. One
// thread block per (tile of kBlockN list positions, program row) exactly as bwd_kernel.cuh's dk/dv
// kernel (program row: a kv head looping over its query heads, or one query head with per-head
// lists or with dkdv_part), with the same outputs (dk/dv rows of the listed keys, float32 per-head
// rows, or dkdv_part partials by list position, and dbias_keys), 3 warpgroups:
// - the tile's K and V (keys on the M side: 64 per consumer warpgroup) come from the compact copy
//   in two bulk copies and stay in shared memory, with the keys and their bias values;
// - the producer streams the query blocks that can see the tile (64 rows each; per query head of
//   the program, from the block of the tile's smallest key with causality) into kStages stages:
//   thread 0 loads Q and dO with TMA (the rows are contiguous, so one tensor copy each, zero-filled
//   past Q), the others lse (base 2, +inf for empty rows and rows past Q) and delta, and every
//   producer thread arrives once per phase (thread 0 through arrive.expect_tx);
// - the consumers compute the transposed products, so P^T and dS^T come out of the first GEMMs in
//   the layout of the register A operand of the next ones:
//     S^T = K Q^T, dP^T = V dO^T                 wgmma SS (64 keys x 64 queries per warpgroup)
//     P^T = exp(S^T - lse), dS^T = P^T (dP^T - delta) (times the softcap factor)
//     dV += P^T dO, dK += dS^T Q                 wgmma RS, dO and Q read as MN-major (D, 64)
//   and for a query-broadcast bias the per-key sum of dS over each query head's rows (dbias_keys).
// Registers per consumer thread: dK and dV (D floats together), S^T and dP^T (32 each), then P^T
// and dS^T (16 32-bit registers each).

template <DType kDType, int kHeadDim_>
struct DkdvSm90Traits {
  using Element = typename fwd_impl::CuteElement<kDType>::type;
  using Fwd = fwd_sm90_impl::Sm90Traits<kDType, kHeadDim_>;  // the compact copy's tiles
  static constexpr BwdSm90Tile kTile = bwd_sm90_tile(kHeadDim_);
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kTile.dkdv_block_n;  // keys: 64 per consumer warpgroup
  static constexpr int kBlockM = kTile.dkdv_block_m;  // query rows per step
  static constexpr int kStages = kTile.dkdv_stages;
  static constexpr int kConsumerThreads = 256;
  static constexpr int kProducerThreads = 128;
  static constexpr int kThreads = kProducerThreads + kConsumerThreads;
  static_assert(kBlockN == Fwd::kBlockN, "a tile of keys is one compact tile image");
  static_assert(kBlockN == 128 && kBlockM % 64 == 0 && kBlockM <= 128, "two consumer warpgroups of 64 keys");
  static_assert(kBlockM <= kProducerThreads / 2, "one producer thread per lse and per delta row");

  // setmaxnreg budgets (ptxas -v, nvcc 13, sm_90a): D = 64 has no spills at 32 / 232 (16 bytes in
  // the producer at 24); D = 128 spills 60 bytes in the consumers' main loop at 24 / 240 (more at
  // 32 / 232): dK, dV, S^T and dP^T alone are 192 registers there.
  static constexpr int kProducerRegs = kHeadDim_ <= 64 ? 32 : 24;
  static constexpr int kConsumerRegs = kHeadDim_ <= 64 ? 232 : 240;
  static_assert(kProducerRegs * kProducerThreads + kConsumerRegs * kConsumerThreads <= (65536 / kThreads) / 8 * 8 * kThreads,
                "the consumers take only what the producer gives back");

  using WarpgroupLayout = Layout<Shape<_2, _1, _1>>;
  // S^T (64 keys x kBlockM per warpgroup) = K Q^T, both K-major in shared memory.
  using TiledMmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockM>, Int<kHeadDim>>>(), WarpgroupLayout{}));
  // dK, dV (64 keys x D per warpgroup) += P^T / dS^T (registers) times Q / dO read as (D, kBlockM).
  using TiledMmaDKV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, Int<kBlockM>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      WarpgroupLayout{}));

  using SmemAtom = GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutKV = typename Fwd::SmemLayoutTile;  // (kBlockN, D, 1): the compact image
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockM>, Int<kStages>>{}, Step<_2, _1, _3>{})));
  using SmemLayoutQTile = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));  // one TMA box
  static constexpr int kQTileBytes = kBlockM * kHeadDim * int(sizeof(Element));

  static constexpr int kSmemKVBytes = Fwd::kTileBytes;  // each of K, V
  static constexpr int kSmemQBytes = kStages * kQTileBytes;  // each of Q, dO
  static constexpr int kSmemTileBytes = 2 * kSmemKVBytes + 2 * kSmemQBytes;
  static_assert(kSmemKVBytes % 1024 == 0 && kQTileBytes % 1024 == 0, "every tile starts on a swizzle period");
  // Then: the tile's keys and bias values (kBlockN each), lse and delta per stage (kBlockM each),
  // per-warp key bounds (for the query range), and the barriers: full and empty per stage, one for K/V.
  static constexpr int kMetaOffset = kSmemTileBytes;
  static constexpr int kBarrierOffset = kMetaOffset + 8 * kBlockN + 8 * kStages * kBlockM + 8 * 4;
  static constexpr int kSmemBytes = kBarrierOffset + (2 * kStages + 1) * 8 + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "sm_90 gives a block at most 227 KiB of shared memory");
};

// The query-row tensors (q, dout) as TMA sees them: (Q, D, H, B) with the row, 1, head and batch
// strides. Size-1 dims have stride 0 in BwdParams, which a tensor map does not take; any multiple
// of 16 bytes serves there, since their only index is 0.
template <class Element, int kHeadDim>
auto tma_rows_tensor(const void* ptr, const int64_t* stride, const BwdParams& p) {
  const auto fix = [](int64_t s) { return s == 0 ? int64_t(8) : s; };
  return make_tensor(make_gmem_ptr(static_cast<const Element*>(ptr)),
                     make_layout(make_shape(p.Q, Int<kHeadDim>{}, p.H, p.B),
                                 make_stride(fix(stride[1]), _1{}, fix(stride[2]), fix(stride[0]))));
}

template <class Traits>
using TmaRows = decltype(make_tma_copy(
    SM90_TMA_LOAD{}, tma_rows_tensor<typename Traits::Element, Traits::kHeadDim>(nullptr, nullptr, BwdParams{}),
    typename Traits::SmemLayoutQTile{}));

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    dma_bwd_dkdv_sm90_kernel(const BwdParams p, CUTE_GRID_CONSTANT TmaRows<Traits> const tma_q,
                             CUTE_GRID_CONSTANT TmaRows<Traits> const tma_do) {
#if defined(__CUDA_ARCH__) && defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  using Element = typename Traits::Element;
  using Barrier = cutlass::arch::ClusterBarrier;
  using TxBarrier = cutlass::arch::ClusterTransactionBarrier;
  using Fwd = typename Traits::Fwd;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages;
  constexpr int kConsumerThreads = Traits::kConsumerThreads;
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ char smem_raw[];
  char* smem = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));

  // Thread block: list tile blockIdx / programs of program row blockIdx % programs (longest first,
  // see the top of this file).
  const int n_heads = p.dkdv_heads;
  const int progs_per_batch = p.H / n_heads;
  const int programs = p.B * progs_per_batch;
  const int n_tile = int(blockIdx.x) / programs;
  const int b = int(blockIdx.x) % programs / progs_per_batch;
  const int h_out = int(blockIdx.x) % programs % progs_per_batch;  // kv head, or query head (per-head lists, dkdv_part)
  const int h0 = h_out * n_heads;
  const int tidx = threadIdx.x;
  const int off = p.K - p.Q;

  Element* k_smem = reinterpret_cast<Element*>(smem);
  Element* v_smem = reinterpret_cast<Element*>(smem + Traits::kSmemKVBytes);
  Element* q_smem = reinterpret_cast<Element*>(smem + 2 * Traits::kSmemKVBytes);
  Element* do_smem = reinterpret_cast<Element*>(smem + 2 * Traits::kSmemKVBytes + Traits::kSmemQBytes);
  int* sKey = reinterpret_cast<int*>(smem + Traits::kMetaOffset);         // [kBlockN] compact keys, -1 none
  float* sBias = reinterpret_cast<float*>(sKey + kBlockN);                // [kBlockN]
  float* sLse = sBias + kBlockN;                                          // [stage][kBlockM], base 2
  float* sDelta = sLse + kStages * kBlockM;                               // [stage][kBlockM]
  int* sBounds = reinterpret_cast<int*>(sDelta + kStages * kBlockM);      // [2][4 warps]: smallest, largest key
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + Traits::kBarrierOffset);
  uint64_t* full = bars;                // Q, dO, lse and delta of stage s landed
  uint64_t* empty = bars + kStages;     // every consumer is done with stage s
  uint64_t* kv_full = bars + 2 * kStages;

  const char* src = static_cast<const char*>(p.compact) +
                    ((int64_t(b) * p.compact_heads + int64_t(h0) * p.compact_heads / p.H) *
                         ((p.list_len + kBlockN - 1) / kBlockN) + n_tile) * int64_t(Fwd::kCompactTileBytes);
  if (tidx == 0) {
    CUTE_UNROLL
    for (int s = 0; s < kStages; ++s) {
      Barrier::init(full + s, Traits::kProducerThreads);
      Barrier::init(empty + s, kConsumerThreads);
    }
    Barrier::init(kv_full, 1);
    cutlass::arch::fence_barrier_init();
  }
  // The tile's smallest key (keys of a list tile ascend; the mask's -1 and the padding's -1 are
  // skipped), which bounds the query blocks that can see it: the first warps read the keys.
  if (tidx < kBlockN) {
    const int key = reinterpret_cast<const int*>(src + Fwd::kCompactKeyOffset)[tidx];
    int low = key >= 0 ? key : p.K;
    int high = key;
    CUTE_UNROLL
    for (int s = 16; s > 0; s /= 2) {
      low = min(low, __shfl_xor_sync(0xffffffffu, low, s));
      high = max(high, __shfl_xor_sync(0xffffffffu, high, s));
    }
    if (tidx % 32 == 0) {
      sBounds[tidx / 32] = low;
      sBounds[kBlockN / 32 + tidx / 32] = high;
    }
  }
  __syncthreads();
  int first_key = p.K, last_key = -1;  // the tile's smallest and largest key
  CUTE_UNROLL
  for (int w = 0; w < kBlockN / 32; ++w) {
    first_key = min(first_key, sBounds[w]);
    last_key = max(last_key, sBounds[kBlockN / 32 + w]);
  }
  if (first_key == p.K) return;  // no key the queries see: the caller's zeros stand
  const int m_lo = p.causal ? max(first_key - off, 0) / kBlockM * kBlockM : 0;
  const int n_qblocks = (p.Q - m_lo + kBlockM - 1) / kBlockM;
  const int n_steps = n_heads * n_qblocks;

  const int warpgroup = __shfl_sync(0xffffffffu, tidx / 128, 0);
  if (warpgroup == 0) {
    // ============================================================== producer
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (tidx == 0) {
      TxBarrier::arrive_and_expect_tx(kv_full, 2 * Fwd::kTileBytes + 8 * kBlockN);
      SM90_BULK_COPY_G2S::copy(src, kv_full, k_smem, Fwd::kTileBytes);
      SM90_BULK_COPY_G2S::copy(src + Fwd::kTileBytes, kv_full, v_smem, Fwd::kTileBytes);
      SM90_BULK_COPY_G2S::copy(src + Fwd::kCompactKeyOffset, kv_full, sKey, 4 * kBlockN);
      SM90_BULK_COPY_G2S::copy(src + Fwd::kCompactBiasOffset, kv_full, sBias, 4 * kBlockN);
    }
    Tensor mQ = tma_q.get_tma_tensor(make_shape(p.Q, Int<kHeadDim>{}, p.H, p.B));
    Tensor mdO = tma_do.get_tma_tensor(make_shape(p.Q, Int<kHeadDim>{}, p.H, p.B));
    Tensor sQ = make_tensor(make_smem_ptr(q_smem), typename Traits::SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(do_smem), typename Traits::SmemLayoutQ{});
    auto thr_q = tma_q.get_slice(_0{});
    auto thr_do = tma_do.get_slice(_0{});
    for (int j = 0; j < n_steps; ++j) {
      const int stage = j % kStages;
      const int h = h0 + j / n_qblocks;
      const int mb = m_lo / kBlockM + j % n_qblocks;
      const int m0 = mb * kBlockM;
      // lse (threads 0 .. kBlockM - 1) or delta (kBlockM .. 2 kBlockM - 1) of one row, loaded before
      // the stage is free.
      const int r = tidx % kBlockM;
      const int row = m0 + r;
      float value = 0.f;
      if (tidx < kBlockM) {
        value = bwd_impl::lse2_of_row(p, b, h, row);
      } else if (tidx < 2 * kBlockM) {
        value = bwd_impl::delta_of_row(p, b, h, row);
      }
      Barrier::wait(empty + stage, ((j / kStages) & 1) ^ 1);
      if (tidx < 2 * kBlockM) (tidx < kBlockM ? sLse : sDelta)[stage * kBlockM + r] = value;
      if (tidx == 0) {  // its one arrival of the phase: the expect_tx one (it also publishes its lse)
        TxBarrier::arrive_and_expect_tx(full + stage, 2 * Traits::kQTileBytes);
        Tensor gQ = local_tile(mQ(_, _, h, b), Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(mb, _0{}));
        Tensor gdO = local_tile(mdO(_, _, h, b), Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(mb, _0{}));
        copy(tma_q.with(full[stage]), thr_q.partition_S(gQ), thr_q.partition_D(sQ(_, _, stage)));
        copy(tma_do.with(full[stage]), thr_do.partition_S(gdO), thr_do.partition_D(sdO(_, _, stage)));
      } else {
        Barrier::arrive(full + stage);
      }
    }
    return;
  }

  // ================================================================ consumers
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int ctidx = tidx - Traits::kProducerThreads;
  Tensor sK = make_tensor(make_smem_ptr(k_smem), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(v_smem), typename Traits::SmemLayoutKV{});
  Tensor sQ = make_tensor(make_smem_ptr(q_smem), typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(do_smem), typename Traits::SmemLayoutQ{});
  Tensor sQt = make_tensor(make_smem_ptr(q_smem), typename Traits::SmemLayoutQt{});
  Tensor sdOt = make_tensor(make_smem_ptr(do_smem), typename Traits::SmemLayoutQt{});

  typename Traits::TiledMmaSdP mma_sdp;
  typename Traits::TiledMmaDKV mma_dkv;
  auto thr_sdp = mma_sdp.get_thread_slice(ctidx);
  auto thr_dkv = mma_dkv.get_thread_slice(ctidx);
  Tensor tSrK = thr_sdp.partition_fragment_A(sK(_, _, 0));  // descriptors (MMA, 1, D/16)
  Tensor tSrV = thr_sdp.partition_fragment_A(sV(_, _, 0));
  Tensor tSrQ = thr_sdp.partition_fragment_B(sQ);            // (MMA, 1, D/16, stage)
  Tensor tSrdO = thr_sdp.partition_fragment_B(sdO);
  Tensor tdKrQt = thr_dkv.partition_fragment_B(sQt);         // (MMA, 1, kBlockM/16, stage)
  Tensor tdVrdOt = thr_dkv.partition_fragment_B(sdOt);
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{}));
  Tensor c_rc = make_tensor(tScS.data(), rowcol(tScS.layout()));
  constexpr int kRows = decltype(size<0>(c_rc))::value;

  Tensor acc_dk = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor acc_dv = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  clear(acc_dk);
  clear(acc_dv);
  Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{});
  Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{});
  Tensor s_rc = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
  Tensor dp_rc = make_tensor(acc_dp.data(), rowcol(acc_dp.layout()));
  Tensor rP = make_tensor<Element>(acc_s.layout());
  Tensor rdS = make_tensor<Element>(acc_dp.layout());
  Tensor tdVrP = make_tensor(rP.data(), acc_as_a(rP.layout()));
  Tensor tdKrdS = make_tensor(rdS.data(), acc_as_a(rdS.layout()));

  Barrier::wait(kv_full, 0);
  // This thread's key rows: the compact key (-1 where none or masked: not visible) and bias, and
  // the list's key (its output row; the mask's keys get zeros, as on the sm_80 kernel).
  const int32_t* list = p.idx + fwd_impl::selection_row(p, b, h0) * p.list_len;
  int vis_key[kRows];
  float row_bias2[kRows];  // the key's bias in base 2, -inf for no key (missing, or masked)
  int out_key[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const int r = get<0>(c_rc(mi, 0));
    vis_key[mi] = sKey[r];
    row_bias2[mi] = vis_key[mi] >= 0 ? sBias[r] * kLog2e : -INFINITY;
    const int64_t pos = int64_t(n_tile) * kBlockN + r;
    const int key = pos < p.list_len ? __ldg(list + pos) : -1;
    out_key[mi] = key >= 0 && key < p.K ? key : -1;
  }

  const float softcap = p.softcap;
  const float scale_over_cap = softcap > 0.f ? p.scale / softcap : 0.f;
  const float inv_cap = softcap > 0.f ? 1.f / softcap : 0.f;
  const float scale_log2e = p.scale * kLog2e;
  float row_db[kRows];

  for (int j = 0; j < n_steps; ++j) {
    const int stage = j % kStages;
    const int h = h0 + j / n_qblocks;
    const int mb = j % n_qblocks;
    const int m0 = m_lo + mb * kBlockM;
    if (mb == 0) {
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) row_db[mi] = 0.f;
    }
    Barrier::wait(full + stage, (j / kStages) & 1);
    Tensor tSrQs = tSrQ(_, _, _, stage);
    Tensor tSrdOs = tSrdO(_, _, _, stage);
    gemm_issue<true>(mma_sdp, tSrK, tSrQs, acc_s);
    gemm_issue<true>(mma_sdp, tSrV, tSrdOs, acc_dp);
    warpgroup_wait<0>();
    gemm_done(acc_s);
    gemm_done(acc_dp);

    // P^T overwrites S^T, dS^T (times the softcap factor) overwrites dP^T. Keys that are missing or
    // masked have a -inf bias term, queries past Q or without keys a +inf lse, so both give P = 0
    // without a test; the causal test is needed only when the block's first query cannot see the
    // tile's largest key.
    const float* stage_lse = sLse + stage * kBlockM;
    const float* stage_delta = sDelta + stage * kBlockM;
    auto elements = [&](auto cap, auto causal) {
      dkdv_elements<decltype(cap)::value, decltype(causal)::value>(s_rc, dp_rc, c_rc, stage_lse, stage_delta, m0 + off,
                                                                   vis_key, row_bias2, row_db, scale_log2e, softcap,
                                                                   scale_over_cap, inv_cap);
    };
    const bool boundary = p.causal && m0 + off < last_key;
    if (softcap > 0.f) {
      if (boundary) elements(cute::true_type{}, cute::true_type{});
      else elements(cute::true_type{}, cute::false_type{});
    } else {
      if (boundary) elements(cute::false_type{}, cute::true_type{});
      else elements(cute::false_type{}, cute::false_type{});
    }
    // Each converted operand goes to its GEMM at once, so S^T's registers are free before dS^T is
    // converted.
    convert_into(acc_s, rP);
    gemm_issue<false>(mma_dkv, tdVrP, tdVrdOt(_, _, _, stage), acc_dv);
    convert_into(acc_dp, rdS);
    gemm_issue<false>(mma_dkv, tdKrdS, tdKrQt(_, _, _, stage), acc_dk);
    warpgroup_wait<0>();
    gemm_done(acc_dv);
    gemm_done(acc_dk);
    gemm_done(tdVrP);
    gemm_done(tdKrdS);
    Barrier::arrive(empty + stage);

    // The head's last query block: its dbias partial per key, one thread per quad.
    if (mb == n_qblocks - 1 && p.dbias_keys != nullptr) {
      float* db = p.dbias_keys + (int64_t(b) * p.H + h) * p.K;
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) {
        const float total = quad_sum(row_db[mi]);
        if (ctidx % 4 == 0 && out_key[mi] >= 0) db[out_key[mi]] = total;
      }
    }
  }

  // ---------------------------------------------------------------- epilogue: dk = scale dS^T Q, dv
  if (p.dk == nullptr) return;
  Tensor tOc = thr_dkv.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  Tensor o_rc = make_tensor(tOc.data(), rowcol(tOc.layout()));
  Tensor dk_rc = make_tensor(acc_dk.data(), rowcol(acc_dk.layout()));
  Tensor dv_rc = make_tensor(acc_dv.data(), rowcol(acc_dv.layout()));
  static_assert(decltype(size<0>(o_rc))::value == kRows, "dK and S^T share their rows");
  int64_t k_rows[kRows];
  int64_t v_rows[kRows];
  if (p.dkdv_part != nullptr) {  // this query head's partials, by list position (h_out: query head)
    const int64_t half = int64_t(p.B) * p.H * p.list_len * kHeadDim;
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const int64_t pos = int64_t(n_tile) * kBlockN + get<0>(c_rc(mi, 0));
      k_rows[mi] = out_key[mi] >= 0 ? ((int64_t(b) * p.H + h_out) * p.list_len + pos) * kHeadDim : -1;
      v_rows[mi] = k_rows[mi] >= 0 ? half + k_rows[mi] : -1;
    }
    bwd_impl::store_rows(p.dkdv_part, dk_rc, o_rc, p.scale, k_rows);
    bwd_impl::store_rows(p.dkdv_part, dv_rc, o_rc, 1.f, v_rows);
    return;
  }
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const int key = out_key[mi];
    k_rows[mi] = key >= 0 ? b * p.dk_stride[0] + key * p.dk_stride[1] + h_out * p.dk_stride[2] : -1;
    v_rows[mi] = key >= 0 ? b * p.dv_stride[0] + key * p.dv_stride[1] + h_out * p.dv_stride[2] : -1;
  }
  if (p.dkdv_f32) {
    bwd_impl::store_rows(static_cast<float*>(p.dk), dk_rc, o_rc, p.scale, k_rows);
    bwd_impl::store_rows(static_cast<float*>(p.dv), dv_rc, o_rc, 1.f, v_rows);
  } else {
    bwd_impl::store_rows(static_cast<Element*>(p.dk), dk_rc, o_rc, p.scale, k_rows);
    bwd_impl::store_rows(static_cast<Element*>(p.dv), dv_rc, o_rc, 1.f, v_rows);
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // compiled without sm_90a features: bwd.cu must never launch this
#endif
}

}  // namespace bwd_sm90_impl

template <DType kDType, int kHeadDim>
void launch_bwd_sm90(const BwdParams& params, cudaStream_t stream, bool want_dq, bool want_dkdv) {
  using namespace cute;
  using Traits = fwd_sm90_impl::Sm90Traits<kDType, kHeadDim>;
  using DkdvTraits = bwd_sm90_impl::DkdvSm90Traits<kDType, kHeadDim>;
  using Element = typename Traits::Element;
  if (params.compact == nullptr || params.idx == nullptr || params.death != nullptr)
    throw std::invalid_argument("the sm_90a backward takes LIST calls with a compact copy");
  fwd_sm90_impl::launch_compact<Traits>(params, stream);
  if (want_dq && params.dq != nullptr) {
    auto kernel = &bwd_sm90_impl::dma_bwd_dq_sm90_kernel<Traits>;
    constexpr int smem = Traits::kSmemBytes;
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
               "cudaFuncSetAttribute(dma_bwd_dq_sm90_kernel, MaxDynamicSharedMemorySize)");
    const int64_t items = (params.Q + Traits::kBlockM - 1) / Traits::kBlockM * int64_t(params.B) * params.H;
    if (items >= (int64_t(1) << 31))
      throw std::invalid_argument("the sm_90a dq kernel takes fewer than 2^31 query blocks");
    kernel<<<unsigned(items), Traits::kThreads, smem, stream>>>(params);
    check_cuda(cudaGetLastError(), "dma_bwd_dq_sm90_kernel launch");
  }
  if (want_dkdv) {
    // Tensor maps of q and dout for the producer's TMA loads (encoded on the host per call; the
    // binding has checked 16-byte aligned rows and strides, which TMA needs).
    auto tma_q = make_tma_copy(SM90_TMA_LOAD{},
                               bwd_sm90_impl::tma_rows_tensor<Element, kHeadDim>(params.q, params.q_stride, params),
                               typename DkdvTraits::SmemLayoutQTile{});
    auto tma_do = make_tma_copy(
        SM90_TMA_LOAD{}, bwd_sm90_impl::tma_rows_tensor<Element, kHeadDim>(params.dout, params.dout_stride, params),
        typename DkdvTraits::SmemLayoutQTile{});
    auto kernel = &bwd_sm90_impl::dma_bwd_dkdv_sm90_kernel<DkdvTraits>;
    constexpr int smem = DkdvTraits::kSmemBytes;
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
               "cudaFuncSetAttribute(dma_bwd_dkdv_sm90_kernel, MaxDynamicSharedMemorySize)");
    const int64_t blocks = (params.list_len + DkdvTraits::kBlockN - 1) / DkdvTraits::kBlockN * int64_t(params.B) *
                           (params.H / params.dkdv_heads);
    if (blocks >= (int64_t(1) << 31))
      throw std::invalid_argument("the sm_90a dk/dv kernel takes fewer than 2^31 thread blocks");
    kernel<<<unsigned(blocks), DkdvTraits::kThreads, smem, stream>>>(params, tma_q, tma_do);
    check_cuda(cudaGetLastError(), "dma_bwd_dkdv_sm90_kernel launch");
  }
}

}  // namespace cuda
}  // namespace dmattn
