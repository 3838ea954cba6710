// The forward of dynamic mask attention for sm_90a (Hopper), with warpgroup MMA (wgmma), organised
// the FlashAttention-3 way: a producer warpgroup loads K and V while two consumer warpgroups
// overlap their matrix products with their softmax.
//
// Same contract as fwd_kernel.cuh (same FwdParams, same LIST counts per 128-row query block, same
// results up to rounding) for the calls fwd.cu sends here: head dims 64 and 128, float16 and
// bfloat16, DENSE or LIST keys, GQA, bottom-right causal, softcap, and a bias and mask that are
// broadcast over the query rows. A per-query bias or mask stays on the sm_80 kernel (its per-element
// gathers would cost this kernel registers that the common case should not pay for).
//
// One thread block = 3 warpgroups (384 threads), at most one per SM, persistent: it walks work
// items of 128 query rows of one (batch, head) each, and the producer runs ahead into the next item
// while the consumers finish the current one.
// - warpgroup 0, the producer: walks the items' key tiles and fills, per tile, a stage of sK and sV
//   and the keys' indices and query-broadcast bias values (sKey/sBias), signalling "K full" and
//   "V full" on one mbarrier each per stage. It waits on "K empty" / "V empty" before reusing a
//   stage, keeps 40 registers (setmaxnreg) and hands the rest to the consumers. Two ways to fill:
//   * LIST calls with a compact copy (FwdParams::compact, the default where it applies): a first
//     kernel (dma_fwd_sm90_compact_kernel) has gathered each list's rows into images of the stages,
//     so one producer thread moves a tile with three bulk copies (cp.async.bulk) that complete the
//     stage's barrier by their byte count. This is what made the kernel fast: with row gathers in
//     the producer the tensor cores waited on loads (H200, T32k: 3.2 ms; 1.6 ms with the producer's
//     loads removed, results wrong; 1.42 ms with the compact copy, the copy included).
//   * Otherwise (DENSE, or heads that cannot share a copy) every producer thread gathers rows with
//     16-byte cp.async (rows come through the key list, so TMA tile loads do not apply) and arrives
//     once per phase when its copies land (cp.async.mbarrier.arrive.noinc).
// - warpgroups 1 and 2, the consumers: rows 0..63 and 64..127 (tiles.h, fwd_sm90_tile, says why two),
//   232 registers each. Per key tile t:
//     S(t) = Q K(t)^T    wgmma SS: Q and K from shared memory (K-major, 128-byte swizzle)
//     O += P(t-1) V(t-1) wgmma RS: P in registers (the S accumulator converted in place to the A
//                        operand layout), V from shared memory read as an MN-major B operand
//   both issued back to back and not waited for; then wait for S(t) only, and compute its scores
//   (scale or softcap, bias, -inf where not visible) and online softmax while O += P(t-1) V(t-1)
//   still runs on the tensor cores (intra-warpgroup overlap). O's rescale by the new row max is
//   applied just before the next O += P V is issued, so it never touches an accumulator in flight.
//   The two consumers also take turns to issue their GEMMs (two named barriers, FlashAttention-3's
//   "ping-pong"): while one computes its softmax the other's GEMMs run, so the tensor cores see the
//   GEMMs of both warpgroups back to back instead of both warpgroups' softmax at the same time.
// K and V have separate barriers so that a K stage is handed back as soon as S(t) and its masking
// are done, a whole GEMM earlier than V's: the producer's next K gather starts that much sooner.
//
// Status: correct on an H200 (tests/test_cuda_fwd_sm90.py, 162 tests against the float64
// reference; compute-sanitizer memcheck clean), but compute-sanitizer --tool synccheck reported
// "Barrier error detected. Missing wait" on the producer's "K full" arrivals: one error per producer
// thread and key tile (128 on the one-tile smoke shape), at the plain mbarrier.arrive on full_k
// (shared address 0x25400 at D = 64: full_k of stage 0). Each producer thread arrived twice per
// phase, once through cp.async.mbarrier.arrive (without .noinc, which raises the pending count and
// arrives when the copies land) and once with a plain mbarrier.arrive, and synccheck takes a
// thread's second arrival on a phase it has not waited for as a missing wait. Fixed in this
// version: the copies' arrival (cp.async.mbarrier.arrive.noinc, on "V full" as well) is the thread's
// only one, which the barriers' count of 128 producer threads already expected (the producer loop
// says what that means for sKey/sBias). Re-checked on an H200: a standalone driver of this kernel
// (fp16, D = 64 and 128, 10 shapes: one tile, stage reuse, blocks without keys, Q smaller than a
// warpgroup's rows, LIST with causal prefixes and empty blocks, bias and mask) gives synccheck 0
// errors and unchanged outputs, and tests/test_cuda_fwd_sm90.py passes (162 tests) with synccheck
// clean on its smoke and LIST-length cases. Timed on an H200 before the compact copy: T32k 3.18 ms
// against the sm_80 kernel's 2.74 ms; with it 1.42 against 3.07, so fwd.cu now enables it by
// default. It compiles for sm_80, sm_90a and compute_90
// (nvcc 13): 168 registers at launch, setmaxnreg 40 / 232, no spills, no wgmma serialisation
// warning; the SASS holds 32 HGMMA per variant at D = 128 (8 for S of the peeled first tile, 8 for
// S and 8 for O in the loop, 8 for the last O) and 24 at D = 64, and no HMMA; shared memory 163 KiB
// (D = 128) and 149 KiB (D = 64).
//
// Non-sm_90a passes (sm_80 SASS, compute_90 PTX) compile an empty body that traps: fwd.cu never
// launches this kernel unless the build carries sm_90a code and the device is compute capability 9.0.
#pragma once

#include <stdexcept>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

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
  static constexpr int kWarpgroups = kTile.warpgroups;  // consumer warpgroups
  static constexpr int kStages = kTile.stages;
  static constexpr int kConsumerThreads = 128 * kWarpgroups;
  static constexpr int kProducerThreads = 128;
  static constexpr int kThreads = kProducerThreads + kConsumerThreads;
  static_assert(kBlockM == 64 * kWarpgroups, "one wgmma M of 64 rows per consumer warpgroup");
  static_assert(kWarpgroups == 2, "the ping-pong of the consumers is written for two warpgroups");
  static_assert(kBlockM == fwd_tile(kHeadDim_).block_m, "the LIST counts are per fwd_block_m(D) query rows");
  static_assert(kHeadDim % 64 == 0, "rows are whole 128-byte swizzle atoms (64 elements)");
  static_assert(kBlockN % 64 == 0, "V's key dim is whole MN-major swizzle atoms");

  // setmaxnreg budgets: the kernel starts at 65536 / 384 = 168 registers per thread
  // (__launch_bounds__(384, 1)); the producer drops to kProducerRegs and the consumers take what it
  // frees. The consumers hold O (D / 2 floats), S (block_n / 2 floats) and P (block_n / 4 32-bit
  // registers) at once: 160 at D = 128, block_n = 128, plus the softmax state and addresses.
  // ptxas -v (nvcc 13, sm_90a): no spills at 40 / 232, once the producer keeps one metadata row
  // per thread (not 8) and the consumers read the score columns' keys in chunks (see scores); with
  // 56 / 224 the consumers spilled.
  static constexpr int kProducerRegs = 40;
  static constexpr int kConsumerRegs = 232;
  // setmaxnreg.inc draws from the registers the block was launched with (168 x 384 = 64512), not
  // from the whole register file.
  static constexpr int kLaunchRegs = (65536 / kThreads) / 8 * 8;
  static_assert(kProducerRegs * kProducerThreads + kConsumerRegs * kConsumerThreads <= kLaunchRegs * kThreads,
                "the consumers take only what the producer gives back");
  static_assert(kProducerRegs % 8 == 0 && kConsumerRegs % 8 == 0, "setmaxnreg takes multiples of 8");

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
  // Two Q buffers (the persistent block loads the next item's Q during the current item); O is
  // staged in the current item's buffer for its 16-byte stores.
  using SmemLayoutQ2 = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>, _2>{}));
  static constexpr int kQElems = kBlockM * kHeadDim;
  using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  // V stored as K is (block_n, D); the second GEMM reads it as (D, block_n): a view, not a copy.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{})));

  // Global <-> shared: 16 bytes per thread per copy, 8 threads per 64-element row segment (a
  // quarter warp stores one 128-byte swizzle row: no bank conflicts). Q in and O out are copied by
  // the consumers, K and V by the producer.
  static constexpr int kElemsPerCopy = 8;
  static constexpr int kThreadsPerRow = 8;
  using ConsumerThreads =
      Layout<Shape<Int<kConsumerThreads / kThreadsPerRow>, Int<kThreadsPerRow>>, Stride<Int<kThreadsPerRow>, _1>>;
  using ProducerThreads =
      Layout<Shape<Int<kProducerThreads / kThreadsPerRow>, Int<kThreadsPerRow>>, Stride<Int<kThreadsPerRow>, _1>>;
  using GmemCopyQ = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{},
                                             ConsumerThreads{}, Layout<Shape<_1, Int<kElemsPerCopy>>>{}));
  using GmemCopyKV = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{},
                                              ProducerThreads{}, Layout<Shape<_1, Int<kElemsPerCopy>>>{}));
  using GmemCopyOut = decltype(make_tiled_copy(Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>{},
                                               ConsumerThreads{}, Layout<Shape<_1, Int<kElemsPerCopy>>>{}));
  using SmemCopyAtomO = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>;
  static_assert(kBlockN % (kProducerThreads / kThreadsPerRow) == 0, "every producer thread loads as many key rows");
  static constexpr int kLoadRows = kBlockN / (kProducerThreads / kThreadsPerRow);

  // One stage of sK or sV, alone: the compact LIST copy (FwdParams::compact) stores each key tile
  // as this image, bytes for bytes, so the forward reloads it into a stage with one bulk copy.
  using SmemLayoutTile = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>, _1>{}));
  static constexpr int kTileElems = kBlockN * kHeadDim;
  static constexpr int kTileBytes = kTileElems * int(sizeof(Element));
  static_assert(cosize_v<SmemLayoutTile> == kTileElems && cosize_v<SmemLayoutKV> == kStages * kTileElems,
                "a stage of sK/sV is one dense tile image");
  // Per compact head and key tile: K image, V image, the keys (int32, -1: none) and their bias
  // values (float32), in that order (tiles.h sizes the workspace with the same formula).
  static constexpr int kCompactKeyOffset = 2 * kTileBytes;
  static constexpr int kCompactBiasOffset = kCompactKeyOffset + kBlockN * 4;
  static constexpr int kCompactTileBytes = kCompactBiasOffset + kBlockN * 4;
  static_assert(kCompactTileBytes == fwd_sm90_compact_tile_bytes(kHeadDim), "tiles.h sizes the same tiles");
  static_assert(kTileBytes % 16 == 0 && kBlockN * 4 % 16 == 0, "bulk copies move multiples of 16 bytes");

  static_assert(cosize_v<SmemLayoutQ2> == 2 * kQElems && cosize_v<SmemLayoutQ> == kQElems, "Q buffers are dense");
  static constexpr int kSmemQBytes = int(cosize_v<SmemLayoutQ2> * sizeof(Element));
  static constexpr int kSmemKVBytes = int(cosize_v<SmemLayoutKV> * sizeof(Element));
  static constexpr int kSmemQKVBytes = kSmemQBytes + 2 * kSmemKVBytes;
  static_assert(kSmemQBytes % 1024 == 0 && kSmemKVBytes % 1024 == 0, "every tile starts on a swizzle period");
  // sKey (int32) and sBias (float32) per key and stage.
  static constexpr int kSmemMetaBytes = kStages * kBlockN * 8;
  // mbarriers: K full, K empty, V full, V empty, one each per stage.
  static constexpr int kSmemBarrierOffset = kSmemQKVBytes + kSmemMetaBytes;
  // Plus 1 KiB to align the dynamic shared memory base to the 1024-byte period of the 128-byte
  // swizzle (wgmma descriptors assume it).
  static constexpr int kSmemBytes = kSmemBarrierOffset + 4 * kStages * 8 + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "sm_90 gives a block at most 227 KiB of shared memory");
};

// Named barriers (bar.sync / bar.arrive ids; 0 is __syncthreads): the consumers among themselves,
// and one per consumer warpgroup that says "your turn to issue GEMMs".
enum : int { kBarConsumers = 1, kBarTurn0 = 2 };

__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// The consumers' accumulator of a (block_m x D) output block in TiledMmaO's layout (O of the
// forward, dQ of the sm_90a dq kernel), converted to Element and written to rows m0 .. (those below
// Q) of a (rows, D) global tensor with row_stride: staged in the shared-memory tile `tile` (the
// block's Q buffer) so that the global stores are 16-byte rows. The first barrier makes sure no
// consumer still reads Q in its last GEMM; `thread`: 0 .. kConsumerThreads - 1.
template <class Traits, class Acc>
__device__ __forceinline__ void store_acc_rows(Acc const& acc, typename Traits::Element* tile, int thread,
                                               typename Traits::Element* out_ptr, int64_t row_stride, int m0, int Q) {
  Tensor r = fwd_impl::convert_fragment<typename Traits::Element>(acc);
  named_sync(kBarConsumers, Traits::kConsumerThreads);
  Tensor s = make_tensor(make_smem_ptr(tile), typename Traits::SmemLayoutQ{});
  auto smem_copy = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, typename Traits::TiledMmaO{});
  auto sthr = smem_copy.get_thread_slice(thread);
  Tensor tr = sthr.retile_S(r);
  Tensor ts = sthr.partition_D(s);
  copy(smem_copy, tr, ts);
  named_sync(kBarConsumers, Traits::kConsumerThreads);
  fwd_impl::store_out_rows<Traits>(s, thread, out_ptr, row_stride, m0, Q);
}

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

// Issues acc (+)= A B over the k-blocks of one tile as one wgmma batch of the warpgroup, and
// returns without waiting: the caller waits with warpgroup_wait<n>() and then calls gemm_done.
// kZeroInit: the first k-block overwrites acc instead of adding to it.
template <bool kZeroInit, class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void gemm_issue(Mma& mma, TA& tA, TB const& tB, TC& tC) {
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
  warpgroup_fence_operand(tC);
  if constexpr (kRegA) warpgroup_fence_operand(tA);
}

// After the warpgroup_wait that covers a gemm_issue: no register access of its operands may move
// above the wait.
template <class TC>
__device__ __forceinline__ void gemm_done(TC& tC) {
  warpgroup_fence_operand(tC);
}

// Shared memory written by plain stores (the generic proxy) and read next by wgmma (the async
// proxy) needs this fence between the two. The producer issues it after its zero-fill stores (the
// only plain stores of K/V: sKey/sBias are read by plain loads, the mbarrier orders those); the
// consumers issue it after each "full" wait, so the cp.async writes they have just acquired are
// ordered before their wgmma reads as well (CUTLASS's cp.async + wgmma mainloops rely on the
// mbarrier alone; the fence costs a few cycles per tile and removes the question).
__device__ __forceinline__ void fence_generic_to_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// A register fragment converted to another element type, into an existing tensor of the same size.
template <class Src, class Dst>
__device__ __forceinline__ void convert_into(Src const& src, Dst& dst) {
  using From = typename Src::value_type;
  using To = typename Dst::value_type;
  constexpr int N = decltype(size(src))::value;
  static_assert(N == decltype(size(dst))::value, "same number of values");
  cutlass::NumericArrayConverter<To, From, N> convert;
  *reinterpret_cast<cutlass::Array<To, N>*>(dst.data()) =
      convert(*reinterpret_cast<cutlass::Array<From, N> const*>(src.data()));
}

// Rows m0 .. m0 + block_m - 1 of a (rows, D) global tensor (contiguous rows of row_stride
// elements) into a shared-memory tile sX (block_m, D), with cp.async by the consumer warpgroups'
// threads (`thread`: 0 .. kConsumerThreads - 1); rows at or past n_rows are zero-filled. The caller
// fences and waits.
template <class Traits, class TS>
__device__ __forceinline__ void load_block_rows(const typename Traits::Element* ptr, int64_t row_stride, int m0,
                                                int n_rows, TS&& sX, int thread) {
  typename Traits::GmemCopyQ gmem_copy;
  auto thr = gmem_copy.get_thread_slice(thread);
  Tensor gX = make_tensor(make_gmem_ptr(ptr + int64_t(m0) * row_stride),
                          Shape<Int<Traits::kBlockM>, Int<Traits::kHeadDim>>{}, make_stride(row_stride, _1{}));
  fwd_impl::load_contiguous(gmem_copy, thr.partition_S(gX), thr.partition_D(sX),
                            thr.partition_S(make_identity_tensor(Shape<Int<Traits::kBlockM>, Int<Traits::kHeadDim>>{})),
                            m0, n_rows);
}

// The stage barriers of a kernel laid out as the forward (Sm90Traits; bars: K full, K empty, V full,
// V empty, kStages each): "full" completes on `producer_arrivals` arrivals (and, with bulk copies,
// their transaction bytes), "empty" on every consumer thread's. One thread, before the block's last
// __syncthreads.
template <class Traits>
__device__ __forceinline__ void init_stage_barriers(uint64_t* bars, int producer_arrivals) {
  using Barrier = cutlass::arch::ClusterBarrier;
  constexpr int kStages = Traits::kStages;
  CUTE_UNROLL
  for (int s = 0; s < kStages; ++s) {
    Barrier::init(bars + s, producer_arrivals);                       // K full
    Barrier::init(bars + kStages + s, Traits::kConsumerThreads);      // K empty
    Barrier::init(bars + 2 * kStages + s, producer_arrivals);         // V full
    Barrier::init(bars + 3 * kStages + s, Traits::kConsumerThreads);  // V empty
  }
  cutlass::arch::fence_barrier_init();
}

// One key tile of the compact LIST copy (src: its K image, V image, keys and bias values) into
// stage `stage` of a kernel laid out as the forward (Sm90Traits; bars: K full, K empty, V full,
// V empty, kStages each): waits for the stage's "K empty" and moves K, the keys and the bias values
// onto "K full", then waits for "V empty" and moves V onto "V full", with bulk copies that complete
// the barriers by their byte count. One producer thread (the forward's and the sm_90a dq kernel's).
template <class Traits>
__device__ __forceinline__ void copy_compact_tile(const char* src, int stage, uint32_t empty_parity, uint64_t* bars,
                                                  typename Traits::Element* k_smem,
                                                  typename Traits::Element* v_smem, int* sKey, float* sBias) {
  using Barrier = cutlass::arch::ClusterBarrier;
  using TxBarrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kStages = Traits::kStages;
  uint64_t* full_k = bars + stage;
  uint64_t* empty_k = bars + kStages + stage;
  uint64_t* full_v = bars + 2 * kStages + stage;
  uint64_t* empty_v = bars + 3 * kStages + stage;
  Barrier::wait(empty_k, empty_parity);
  TxBarrier::arrive_and_expect_tx(full_k, Traits::kTileBytes + 8 * kBlockN);
  SM90_BULK_COPY_G2S::copy(src, full_k, k_smem + stage * Traits::kTileElems, Traits::kTileBytes);
  SM90_BULK_COPY_G2S::copy(src + Traits::kCompactKeyOffset, full_k, sKey + stage * kBlockN, 4 * kBlockN);
  SM90_BULK_COPY_G2S::copy(src + Traits::kCompactBiasOffset, full_k, sBias + stage * kBlockN, 4 * kBlockN);
  Barrier::wait(empty_v, empty_parity);
  TxBarrier::arrive_and_expect_tx(full_v, Traits::kTileBytes);
  SM90_BULK_COPY_G2S::copy(src + Traits::kTileBytes, full_v, v_smem + stage * Traits::kTileElems, Traits::kTileBytes);
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1) dma_fwd_sm90_kernel(const FwdParams p) {
#if defined(__CUDA_ARCH__) && defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  using Element = typename Traits::Element;
  using Barrier = cutlass::arch::ClusterBarrier;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages;
  constexpr int kLoadRows = Traits::kLoadRows;
  constexpr int kConsumerThreads = Traits::kConsumerThreads;

  extern __shared__ char smem_raw[];
  char* smem = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));

  // Persistent: the grid holds at most one block per SM, and block x takes the work items x,
  // x + gridDim.x, ... (an item is 128 query rows of one (batch, head)). Items go last query block
  // first over all heads: with causality those see the most keys, so the heavy items start early
  // and the tail is short. Producer and consumers walk the same items, so the next item's key tiles
  // and Q stream in while the consumers finish the current one (its last products, its epilogue):
  // with one block per SM and a few key tiles per item, that was time the tensor cores sat idle
  // (tiles.h has the measurement).
  const int n_m = (p.Q + kBlockM - 1) / kBlockM;
  const int bh = p.B * p.H;
  const int n_items = n_m * bh;
  const int tidx = threadIdx.x;
  const int off = p.K - p.Q;  // bottom-right causal: key j visible to query i iff j <= i + off
  const int group = p.H / p.H_kv;
  struct Item {
    int m_block, h, b;
  };
  auto item_at = [&](int i) { return Item{n_m - 1 - i / bh, i % bh % p.H, i % bh / p.H}; };
  // The item's keys, LIST or DENSE (fwd.cu never sends the PREFIX path here): returns the count.
  auto item_keys = [&](const Item& item, const int32_t** list) {
    const int32_t* death_row;
    return fwd_impl::block_keys(p, item.b, item.h, item.m_block, kBlockM, list, &death_row);
  };

  Element* q_smem = reinterpret_cast<Element*>(smem);
  Element* k_smem = reinterpret_cast<Element*>(smem + Traits::kSmemQBytes);
  Element* v_smem = reinterpret_cast<Element*>(smem + Traits::kSmemQBytes + Traits::kSmemKVBytes);
  Tensor sQ = make_tensor(make_smem_ptr(q_smem), typename Traits::SmemLayoutQ2{});   // (M, D, buffer)
  Tensor sK = make_tensor(make_smem_ptr(k_smem), typename Traits::SmemLayoutKV{});   // (N, D, stage)
  Tensor sV = make_tensor(make_smem_ptr(v_smem), typename Traits::SmemLayoutKV{});   // (N, D, stage)
  Tensor sVt = make_tensor(make_smem_ptr(v_smem), typename Traits::SmemLayoutVt{});  // (D, N, stage)
  int* sKey = reinterpret_cast<int*>(smem + Traits::kSmemQKVBytes);  // [stage][key row]: key, -1 none
  float* sBias = reinterpret_cast<float*>(sKey + kStages * kBlockN); // [stage][key row]: its bias
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + Traits::kSmemBarrierOffset);
  uint64_t* full_k = bars;                 // K(t) and sKey/sBias(t) landed (see the producer)
  uint64_t* empty_k = bars + kStages;      // every consumer is done with K(t) and sKey/sBias(t)
  uint64_t* full_v = bars + 2 * kStages;   // V(t) landed
  uint64_t* empty_v = bars + 3 * kStages;  // every consumer's O += P(t) V(t) has completed
  // The gathering producer arrives once per thread and phase, the compact one once per phase (its
  // one thread's arrive.expect_tx; the bulk copies complete the transaction bytes).
  const bool compact = p.compact != nullptr;
  if (tidx == 0) init_stage_barriers<Traits>(bars, compact ? 1 : Traits::kProducerThreads);
  __syncthreads();  // the last block-wide barrier: the producer leaves early

  // Key tiles are numbered over all of the block's items (the running index `it`): tile it lives in
  // stage it % kStages, its barriers complete phase it / kStages, and a wait takes the parity of
  // the phase it waits for. The producer's first pass over the stages waits for parity 1, which a
  // fresh barrier reports as complete. An item without keys takes no tile.
  const int warpgroup = __shfl_sync(0xffffffffu, tidx / 128, 0);  // uniform, and the compiler knows

  if (warpgroup == 0) {
    // ============================================================== producer: K, V and key metadata
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    int it = 0;
    if (compact) {
      // The compact LIST copy: each tile of an item's list prefix is one K image, one V image and
      // its keys and bias values, laid out as the stages hold them, so one thread moves a tile
      // with bulk copies (cp.async.bulk, completing on the stage's "full" barrier with the bytes
      // it announced). The other producer threads have nothing to do.
      if (tidx == 0) {
        const int list_tiles = int((p.list_len + kBlockN - 1) / kBlockN);
        for (int i = blockIdx.x; i < n_items; i += gridDim.x) {
          const Item item = item_at(i);
          const int32_t* list;
          const int n_tiles = (item_keys(item, &list) + kBlockN - 1) / kBlockN;
          const char* src = static_cast<const char*>(p.compact) +
                            (int64_t(item.b) * p.compact_heads + item.h * p.compact_heads / p.H) * list_tiles *
                                int64_t(Traits::kCompactTileBytes);
          for (int t = 0; t < n_tiles; ++t, ++it, src += Traits::kCompactTileBytes) {
            copy_compact_tile<Traits>(src, it % kStages, ((it / kStages) & 1) ^ 1, bars, k_smem, v_smem, sKey, sBias);
          }
        }
      }
      return;
    }
    // fwd.cu sends only query-broadcast bias and mask here: both are per key.
    const bool bias_per_key = p.bias != nullptr;
    const bool mask_per_key = p.mask != nullptr;
    typename Traits::GmemCopyKV gmem_copy;
    auto gthr = gmem_copy.get_thread_slice(tidx);
    Tensor tKsK = gthr.partition_D(sK);  // (CPY, CPY_N, CPY_D, stage)
    Tensor tVsV = gthr.partition_D(sV);
    Tensor tKVc = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
    static_assert(decltype(size<1>(tKsK))::value == kLoadRows, "copy partition and key rows agree");
    static_assert(kBlockN == Traits::kProducerThreads, "one metadata row per producer thread");
    for (int i = blockIdx.x; i < n_items; i += gridDim.x) {
      const Item item = item_at(i);
      const int32_t* list;
      const int limit = item_keys(item, &list);
      const int n_tiles = (limit + kBlockN - 1) / kBlockN;
      const int g = item.h / group;
      const Element* k_ptr = static_cast<const Element*>(p.k) + item.b * p.k_stride[0] + g * p.k_stride[2];
      const Element* v_ptr = static_cast<const Element*>(p.v) + item.b * p.v_stride[0] + g * p.v_stride[2];
      const int64_t bias_base = item.b * p.bias_stride[0] + int64_t(item.h) * p.bias_heads / p.H * p.bias_stride[1];
      const int64_t mask_base = item.b * p.mask_stride[0] + int64_t(item.h) * p.mask_heads / p.H * p.mask_stride[1];
      // Column offsets of the thread's 16-byte chunks (row stride 0); the row's key index adds the rest.
      Tensor tKgK = gthr.partition_S(
          make_tensor(make_gmem_ptr(k_ptr), Shape<Int<kBlockN>, Int<kHeadDim>>{}, Stride<_0, _1>{}));
      Tensor tVgV = gthr.partition_S(
          make_tensor(make_gmem_ptr(v_ptr), Shape<Int<kBlockN>, Int<kHeadDim>>{}, Stride<_0, _1>{}));

      int keys[kLoadRows];
      fwd_impl::tile_keys<kBlockN>(0, tKVc, limit, list, p.K, keys);
      for (int t = 0; t < n_tiles; ++t, ++it) {
        const int stage = it % kStages;
        const uint32_t empty_parity = ((it / kStages) & 1) ^ 1;
        // This thread's metadata row (one key row per producer thread, not the copy partition's 8:
        // their bias values and mask bits would not fit in the producer's registers). Its loads fly
        // while the stage is still in use.
        int meta_key = -1;
        float meta_bias = 0.f;
        {
          const int pos = t * kBlockN + tidx;
          if (pos < limit) {
            meta_key = list != nullptr ? __ldg(list + pos) : pos;
            if (meta_key < 0 || meta_key >= p.K) meta_key = -1;
          }
          if (meta_key >= 0) {
            if (bias_per_key) {
              meta_bias = fwd_impl::load_float(p.bias, p.bias_dtype, bias_base + meta_key * p.bias_stride[3]);
            }
            if (mask_per_key && __ldg(p.mask + mask_base + meta_key * p.mask_stride[3]) == 0) meta_key = -1;
          }
        }

        Barrier::wait(empty_k + stage, empty_parity);
        Tensor tKs = tKsK(_, _, _, stage);
        fwd_impl::load_rows(gmem_copy, tKgK, tKs, p.k_stride[1], keys);
        sKey[stage * kBlockN + tidx] = meta_key;
        sBias[stage * kBlockN + tidx] = meta_bias;
        // Rows of missing keys (the tail of the last tile) are zero-filled with plain stores, which
        // wgmma reads through the async proxy. Only those threads fence: the fence is a MEMBAR, and
        // the other tiles should not pay for it behind their in-flight copies.
        bool zero_rows = false;
        CUTE_UNROLL
        for (int m = 0; m < kLoadRows; ++m) zero_rows |= keys[m] < 0;
        if (zero_rows) fence_generic_to_async_smem();
        // This thread's one arrival of the phase, performed once its copies of the stage have landed
        // (.noinc: the barrier's count of 128 producer threads already counts it). The previous
        // version added a plain mbarrier.arrive to a counting cp.async.mbarrier.arrive: two arrivals
        // per thread and phase, which compute-sanitizer's synccheck reports as "Missing wait" (a
        // thread arriving again on a phase it has not waited for). The price: sKey/sBias are no longer
        // published by a release arrive. Their stores precede the arrival in program order and take a
        // few cycles, against the global round trip of the copies the arrival waits for; a thread with
        // no copy in flight (all its rows zero-filled, so it arrives at once) has fenced them above
        // (fence.proxy.async compiles to MEMBAR.ALL.CTA).
        cutlass::arch::cpasync_barrier_arrive_noinc(full_k + stage);

        Barrier::wait(empty_v + stage, empty_parity);
        Tensor tVs = tVsV(_, _, _, stage);
        fwd_impl::load_rows(gmem_copy, tVgV, tVs, p.v_stride[1], keys);
        if (zero_rows) fence_generic_to_async_smem();
        cutlass::arch::cpasync_barrier_arrive_noinc(full_v + stage);

        fwd_impl::tile_keys<kBlockN>(t + 1, tKVc, limit, list, p.K, keys);  // all -1 past the last tile
      }
    }
    cp_async_wait<0>();  // leave only once this thread's copies have landed
    return;
  }

  // ================================================================ consumers
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int ctidx = tidx - Traits::kProducerThreads;  // 0 .. 255: rows 0..63 are warpgroup 0's
  const int wg = warpgroup - 1;

  typename Traits::TiledMmaS mma_s;
  typename Traits::TiledMmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(ctidx);
  auto thr_o = mma_o.get_thread_slice(ctidx);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);   // descriptors (MMA, 1, D/16, buffer)
  Tensor tSrK = thr_s.partition_fragment_B(sK);   // descriptors (MMA, 1, D/16, stage)
  Tensor tOrV = thr_o.partition_fragment_B(sVt);  // descriptors (MMA, 1, N/16, stage)
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor c_rc = make_tensor(tScS.data(), rowcol(tScS.layout()));
  constexpr int kRows = decltype(size<0>(c_rc))::value;
  constexpr int kCols = decltype(size<1>(c_rc))::value;

  const float scale = p.scale;
  const float softcap = p.softcap;
  const float scale_over_cap = softcap > 0.f ? p.scale / softcap : 0.f;

  // Ping-pong: a consumer issues its GEMMs only on its turn (named_sync on its barrier) and then
  // gives the turn to the other (named_arrive on the other's), 128 + 128 threads per barrier phase.
  // Warpgroup 0 goes first. Each warpgroup has n_tiles + 1 turns per item; warpgroup 1 skips its
  // last hand-over, so every barrier sees as many arrivals as waits per item and none is left
  // pending at exit. (The turns strictly alternate, so an item's first arrival cannot complete a
  // phase of the previous item.)
  const int my_turn = kBarTurn0 + wg;
  const int other_turn = kBarTurn0 + (wg ^ 1);

  // Q of item i into buffer qb (rows past Q are zeros). Two buffers: the next item's Q loads while
  // the current item runs; its buffer is free once both consumer warpgroups are past the previous
  // item's epilogue, which staged O in it.
  auto load_q = [&](int i, int qb) {
    const Item item = item_at(i);
    const Element* q_ptr = static_cast<const Element*>(p.q) + item.b * p.q_stride[0] + item.h * p.q_stride[2];
    load_block_rows<Traits>(q_ptr, p.q_stride[1], item.m_block * kBlockM, p.Q, sQ(_, _, qb), ctidx);
  };

  if (int(blockIdx.x) < n_items) load_q(blockIdx.x, 0);
  cp_async_fence();
  int it0 = 0;  // the running index of the current item's first key tile
  for (int i = blockIdx.x, ord = 0; i < n_items; i += gridDim.x, ++ord) {
    const int qb = ord & 1;
    const int next = i + int(gridDim.x);
    const Item item = item_at(i);
    const int h = item.h;
    const int b = item.b;
    const int m0 = item.m_block * kBlockM;
    const int32_t* list;
    const int limit = item_keys(item, &list);
    const int n_tiles = (limit + kBlockN - 1) / kBlockN;
    Element* out_ptr = static_cast<Element*>(p.out) + b * p.out_stride[0] + h * p.out_stride[2];
    float* lse_ptr = p.lse + b * p.lse_stride[0] + h * p.lse_stride[1];
    if (n_tiles == 0) {  // no key: out 0 and lse -inf; no barrier, no tile
      fwd_impl::write_empty_block<Traits>(out_ptr, p.out_stride[1], lse_ptr, m0, p.Q, ctidx, kConsumerThreads);
      if (next < n_items) load_q(next, qb ^ 1);
      cp_async_fence();
      continue;
    }
    cp_async_wait<0>();
    fence_generic_to_async_smem();
    // Q(i) is visible to both consumer warpgroups, and both are past the previous item's epilogue:
    // the other buffer is free for the next item's Q.
    named_sync(kBarConsumers, kConsumerThreads);
    if (next < n_items) load_q(next, qb ^ 1);
    cp_async_fence();
    if (wg == 1) named_arrive(kBarTurn0, kConsumerThreads);

    Tensor tSrQb = tSrQ(_, _, _, qb);
    Tensor acc_o = partition_fragment_C(mma_o, Shape<Int<kBlockM>, Int<kHeadDim>>{});
    clear(acc_o);
    Tensor o_rc = make_tensor(acc_o.data(), rowcol(acc_o.layout()));
    Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor s_rc = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    // P of the previous tile, kept while S of the current one is computed.
    Tensor rP = make_tensor<Element>(acc_s.layout());
    Tensor tOrP = make_tensor(rP.data(), acc_as_a(rP.layout()));
    static_assert(decltype(size<0>(o_rc))::value == kRows, "S and O share their rows");

    float row_max[kRows];
    float row_sum[kRows];
    float alpha[kRows];  // O's rescale for the P it is about to add
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      row_max[mi] = -INFINITY;
      row_sum[mi] = 0.f;
    }

    // This warpgroup's rows are m0 + 64 wg .. + 63 (the wgmma M of each warpgroup); the earliest of
    // them sees keys up to wg_last_key.
    const int wg_row0 = m0 + 64 * wg;
    const bool interior_ok = p.mask == nullptr && wg_row0 + 63 < p.Q;
    const int wg_last_key = p.causal ? wg_row0 + off : p.K - 1;

    // Scores of tile t in stage `stage`: scale (or softcap), bias, then -inf wherever the key is not
    // visible. Columns at or past the block's limit hold no key of the block: the gathering producer
    // stores key -1 there, the compact copy the list's next entries, which the column test drops.
    auto scores = [&](int stage, int t) {
      const int tile_keys = limit - t * kBlockN;  // >= kBlockN except in the last tile
      fwd_impl::scale_scores(acc_s, scale, softcap, scale_over_cap);
      const int* stage_key = sKey + stage * kBlockN;
      const float* stage_bias = sBias + stage * kBlockN;
      // Interior tile: every key present and visible to every row of this warpgroup, so only the bias
      // is added (the per-element test is about a third of the softmax's instructions, and the
      // softmax has to fit under the other warpgroup's GEMMs). Keys of a tile are ascending (LIST
      // lists are sorted, DENSE keys consecutive), so its first and last key bound all of them; a
      // key mask can drop keys in between, so with a mask every tile takes the full test.
      const int first_key = stage_key[0];
      const int last_tile_key = stage_key[kBlockN - 1];
      // Columns go in chunks of 8 whose sKey/sBias reads may not move above the previous chunk (the
      // empty asm with a memory clobber): hoisting all of them costs 64 registers that the consumers,
      // holding S, P and O at once, do not have (ptxas spilled).
      constexpr int kChunk = 8;
      static_assert(kCols % kChunk == 0, "whole chunks of columns");
      if (interior_ok && tile_keys >= kBlockN && first_key >= 0 && last_tile_key >= 0 && last_tile_key <= wg_last_key) {
        CUTE_UNROLL
        for (int n0 = 0; n0 < kCols; n0 += kChunk) {
          CUTE_UNROLL
          for (int ni = n0; ni < n0 + kChunk; ++ni) {
            const float bias = stage_bias[get<1>(c_rc(0, ni))];
            CUTE_UNROLL
            for (int mi = 0; mi < kRows; ++mi) s_rc(mi, ni) += bias;
          }
          asm volatile("" ::: "memory");
        }
        return;
      }
      int last_key[kRows];
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) {
        const int row = m0 + get<0>(c_rc(mi, 0));
        // A row past Q sees nothing (its results are not stored either; this keeps them finite).
        last_key[mi] = row >= p.Q ? -1 : p.causal ? row + off : p.K;
      }
      CUTE_UNROLL
      for (int n0 = 0; n0 < kCols; n0 += kChunk) {
        CUTE_UNROLL
        for (int ni = n0; ni < n0 + kChunk; ++ni) {
          const int c = get<1>(c_rc(0, ni));
          const int key = c < tile_keys ? stage_key[c] : -1;
          const float bias = stage_bias[c];
          CUTE_UNROLL
          for (int mi = 0; mi < kRows; ++mi) {
            const bool visible = key >= 0 && key <= last_key[mi];
            s_rc(mi, ni) = visible ? s_rc(mi, ni) + bias : -INFINITY;
          }
        }
        asm volatile("" ::: "memory");
      }
    };

    // The online softmax of a tile (fwd_impl::softmax_row). O's rescale by alpha waits until O is not
    // in flight (rescale_o).
    auto softmax = [&]() {
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) alpha[mi] = fwd_impl::softmax_row(s_rc, mi, row_max[mi], row_sum[mi]);
    };

    auto rescale_o = [&]() {
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) {
        CUTE_UNROLL
        for (int j = 0; j < size<1>(o_rc); ++j) o_rc(mi, j) *= alpha[mi];
      }
    };

    // Tile 0: S only (there is no P yet).
    Barrier::wait(full_k + it0 % kStages, (it0 / kStages) & 1);
    fence_generic_to_async_smem();
    named_sync(my_turn, kConsumerThreads);
    gemm_issue<true>(mma_s, tSrQb, tSrK(_, _, _, it0 % kStages), acc_s);
    named_arrive(other_turn, kConsumerThreads);
    warpgroup_wait<0>();
    gemm_done(acc_s);
    scores(it0 % kStages, 0);
    Barrier::arrive(empty_k + it0 % kStages);
    softmax();
    convert_into(acc_s, rP);

    for (int t = 1; t < n_tiles; ++t) {
      const int stage = (it0 + t) % kStages;
      const int prev = (it0 + t - 1) % kStages;
      Barrier::wait(full_k + stage, ((it0 + t) / kStages) & 1);
      Barrier::wait(full_v + prev, ((it0 + t - 1) / kStages) & 1);
      fence_generic_to_async_smem();
      named_sync(my_turn, kConsumerThreads);
      gemm_issue<true>(mma_s, tSrQb, tSrK(_, _, _, stage), acc_s);  // S(t)
      rescale_o();
      gemm_issue<false>(mma_o, tOrP, tOrV(_, _, _, prev), acc_o);  // O += P(t-1) V(t-1)
      named_arrive(other_turn, kConsumerThreads);
      warpgroup_wait<1>();  // S(t) done; O += P V may still run
      gemm_done(acc_s);
      scores(stage, t);
      Barrier::arrive(empty_k + stage);
      softmax();
      warpgroup_wait<0>();  // O += P(t-1) V(t-1) done: V(t-1) and P's registers are free
      gemm_done(acc_o);
      gemm_done(tOrP);
      Barrier::arrive(empty_v + prev);
      convert_into(acc_s, rP);
    }

    {  // O += P V of the last tile
      const int last = (it0 + n_tiles - 1) % kStages;
      Barrier::wait(full_v + last, ((it0 + n_tiles - 1) / kStages) & 1);
      fence_generic_to_async_smem();
      named_sync(my_turn, kConsumerThreads);
      rescale_o();
      gemm_issue<false>(mma_o, tOrP, tOrV(_, _, _, last), acc_o);
      if (wg == 0) named_arrive(other_turn, kConsumerThreads);
      warpgroup_wait<0>();
      gemm_done(acc_o);
      gemm_done(tOrP);
      Barrier::arrive(empty_v + last);  // the producer refills this stage for a later item
    }

    // ---------------------------------------------------------------- epilogue
    fwd_impl::finish_rows(o_rc, c_rc, row_max, row_sum, lse_ptr, m0, p.Q);

    // O goes through shared memory (the item's Q buffer) so the global stores are 16-byte rows.
    store_acc_rows<Traits>(acc_o, q_smem + qb * Traits::kQElems, ctidx, out_ptr, p.out_stride[1], m0, p.Q);
    it0 += n_tiles;
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // compiled without sm_90a features: fwd.cu must never launch this
#endif
}

// The compact LIST copy (FwdParams::compact), one thread block per (key tile t of the list, compact
// head c, batch b): the tile's listed K and V rows are gathered into shared memory with the
// gathering producer's own partition and layout (swizzle included), then each tile leaves as one
// contiguous image (bulk store), so the forward reloads it into a stage with one bulk copy. Its
// keys and bias values are written next to them: key -1 (and zero rows, bias 0) past the list, for
// the sentinel K and for keys a query-broadcast mask drops.
template <class Traits>
__global__ void __launch_bounds__(Traits::kProducerThreads) dma_fwd_sm90_compact_kernel(const FwdParams p) {
#if defined(__CUDA_ARCH__) && defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  using Element = typename Traits::Element;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kLoadRows = Traits::kLoadRows;
  static_assert(kBlockN == Traits::kProducerThreads, "one metadata entry per thread");

  extern __shared__ char smem_raw[];
  char* smem = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Traits::SmemLayoutTile{});
  Tensor sV = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem + Traits::kTileBytes)),
                          typename Traits::SmemLayoutTile{});

  const int t = blockIdx.x;
  const int b = blockIdx.z;
  const int64_t crow = int64_t(b) * p.compact_heads + blockIdx.y;
  const int h = int(blockIdx.y) * (p.H / p.compact_heads);  // the compact head's first query head
  const int g = h / (p.H / p.H_kv);
  const int tidx = threadIdx.x;
  const int32_t* list = p.idx + selection_row(p, b, h) * p.list_len;
  const int limit = int(p.list_len);
  const int list_tiles = (limit + kBlockN - 1) / kBlockN;
  char* dst = static_cast<char*>(p.compact) + (crow * list_tiles + t) * int64_t(Traits::kCompactTileBytes);

  const Element* k_ptr = static_cast<const Element*>(p.k) + b * p.k_stride[0] + g * p.k_stride[2];
  const Element* v_ptr = static_cast<const Element*>(p.v) + b * p.v_stride[0] + g * p.v_stride[2];
  typename Traits::GmemCopyKV gmem_copy;
  auto gthr = gmem_copy.get_thread_slice(tidx);
  Tensor tKgK = gthr.partition_S(
      make_tensor(make_gmem_ptr(k_ptr), Shape<Int<kBlockN>, Int<kHeadDim>>{}, Stride<_0, _1>{}));
  Tensor tVgV = gthr.partition_S(
      make_tensor(make_gmem_ptr(v_ptr), Shape<Int<kBlockN>, Int<kHeadDim>>{}, Stride<_0, _1>{}));
  Tensor tKsK = gthr.partition_D(sK);  // (CPY, CPY_N, CPY_D, 1)
  Tensor tVsV = gthr.partition_D(sV);
  Tensor tKVc = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  int keys[kLoadRows];
  fwd_impl::tile_keys<kBlockN>(t, tKVc, limit, list, p.K, keys);
  Tensor tKs = tKsK(_, _, _, 0);
  Tensor tVs = tVsV(_, _, _, 0);
  fwd_impl::load_rows(gmem_copy, tKgK, tKs, p.k_stride[1], keys);
  fwd_impl::load_rows(gmem_copy, tVgV, tVs, p.v_stride[1], keys);
  cp_async_fence();

  int key = -1;
  float bias = 0.f;
  const int pos = t * kBlockN + tidx;
  if (pos < limit) {
    key = __ldg(list + pos);
    if (key < 0 || key >= p.K) key = -1;
  }
  if (key >= 0) {
    // The forward sends only query-broadcast bias and mask here (fwd_compact_bytes): one per key.
    const int64_t bias_base = b * p.bias_stride[0] + int64_t(h) * p.bias_heads / p.H * p.bias_stride[1];
    const int64_t mask_base = b * p.mask_stride[0] + int64_t(h) * p.mask_heads / p.H * p.mask_stride[1];
    if (p.bias != nullptr) bias = fwd_impl::load_float(p.bias, p.bias_dtype, bias_base + key * p.bias_stride[3]);
    if (p.mask != nullptr && __ldg(p.mask + mask_base + key * p.mask_stride[3]) == 0) {
      key = -1;
      bias = 0.f;
    }
  }
  reinterpret_cast<int*>(dst + Traits::kCompactKeyOffset)[tidx] = key;
  reinterpret_cast<float*>(dst + Traits::kCompactBiasOffset)[tidx] = bias;

  // Every thread's cp.async and zero-fill stores (generic proxy) before the bulk stores (async
  // proxy) read the tiles.
  cp_async_wait<0>();
  fence_generic_to_async_smem();
  __syncthreads();
  if (tidx == 0) {
    SM90_BULK_COPY_S2G::copy(smem, dst, Traits::kTileBytes);
    SM90_BULK_COPY_S2G::copy(smem + Traits::kTileBytes, dst + Traits::kTileBytes, Traits::kTileBytes);
    tma_store_arrive();
    // Complete, not only read out of shared memory: the block's shared memory must outlive the reads,
    // and the forward (the next launch on the stream) reads the images.
    asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // compiled without sm_90a features: fwd.cu must never launch this
#endif
}

// The compact LIST copy of a call (FwdParams::compact), when it has one: launched on `stream`
// before the kernel that reads it (the forward, or the sm_90a dq kernel).
template <class Traits>
void launch_compact(const FwdParams& params, cudaStream_t stream) {
  if (params.compact == nullptr) return;
  auto gather = &dma_fwd_sm90_compact_kernel<Traits>;
  constexpr int gather_smem = 2 * Traits::kTileBytes + 1024;
  check_cuda(cudaFuncSetAttribute(gather, cudaFuncAttributeMaxDynamicSharedMemorySize, gather_smem),
             "cudaFuncSetAttribute(dma_fwd_sm90_compact_kernel, MaxDynamicSharedMemorySize)");
  const dim3 tiles(unsigned((params.list_len + Traits::kBlockN - 1) / Traits::kBlockN),
                   unsigned(params.compact_heads), unsigned(params.B));
  gather<<<tiles, Traits::kProducerThreads, gather_smem, stream>>>(params);
  check_cuda(cudaGetLastError(), "dma_fwd_sm90_compact_kernel launch");
}

}  // namespace fwd_sm90_impl

template <DType kDType, int kHeadDim>
void launch_fwd_sm90(const FwdParams& params, cudaStream_t stream) {
  using Traits = fwd_sm90_impl::Sm90Traits<kDType, kHeadDim>;
  auto kernel = &fwd_sm90_impl::dma_fwd_sm90_kernel<Traits>;
  constexpr int smem = Traits::kSmemBytes;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "cudaFuncSetAttribute(dma_fwd_sm90_kernel, MaxDynamicSharedMemorySize)");
  fwd_sm90_impl::launch_compact<Traits>(params, stream);
  // Persistent: one block per SM at most (the kernel walks the work items itself).
  const int64_t items = (params.Q + Traits::kBlockM - 1) / Traits::kBlockM * int64_t(params.B) * params.H;
  if (items >= (int64_t(1) << 31)) throw std::invalid_argument("the sm_90a forward takes fewer than 2^31 query blocks");
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  const unsigned grid = unsigned(items < device_sm_count(device) ? items : device_sm_count(device));
  kernel<<<grid, Traits::kThreads, smem, stream>>>(params);
  check_cuda(cudaGetLastError(), "dma_fwd_sm90_kernel launch");
}

}  // namespace cuda
}  // namespace dmattn
