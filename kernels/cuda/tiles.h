// Tile sizes of the CUDA kernels, chosen in one place. Host code (the Python-facing block size of
// the LIST metadata) and device code (the kernel templates) read the same constexpr function.
#pragma once

#include <stdint.h>

namespace dmattn {
namespace cuda {

// Tile sweeps (benchmarks/cuda_tile_sweep.sh) build the module with the tiles of one head dim
// DMATTN_SWEEP_D replaced, every translation unit alike (host code reads block sizes from these same
// functions), by -D definitions (one per number: nvcc splits option values at commas):
//   forward:  DMATTN_SWEEP_FWD_M, DMATTN_SWEEP_FWD_N, DMATTN_SWEEP_FWD_WARPS
//   backward: DMATTN_SWEEP_DQ_M, DMATTN_SWEEP_DQ_N, DMATTN_SWEEP_DKDV_N, DMATTN_SWEEP_DKDV_M,
//             DMATTN_SWEEP_BWD_WARPS
//   sm_90a dk/dv stages (every head dim): DMATTN_SWEEP_DKDV90_STAGES
// All undefined in a normal build. A candidate the kernels cannot take fails a static_assert.

struct FwdTile {
  int block_m;  // query rows per thread block
  int block_n;  // keys per tile of the inner loop
  int warps;    // warps per thread block, stacked along the query rows
};

// The reasons are register and shared-memory budgets read from `ptxas -v` for sm_80, plus one
// measurement of a related kernel; no other tile has been timed against these (each is a compile-time
// variant, so a sweep needs a build per candidate). What the chosen D = 128 tile measures (H200,
// 2026-11-29, ncu, benchmarks/results/ncu-cuda-t32k-h200-2026-11-29.log): T32k forward 3.04 ms,
// 255 registers per thread, 12.5% occupancy, tensor pipe active 29%, issue-bound at 1.8
// instructions per cycle (2.6x the Triton forward's instructions: mma.sync, not the tile, is the
// limit there).
// - D <= 64: 128 x 64, 4 warps (FlashAttention-2's sm80 shape). Each warp owns 32 query rows;
//   S (64 floats per thread) and O (<= 64) fit in registers (no spills in the per-key variant,
//   ~150 bytes per thread in the per-query one).
// - D = 96, 128: 128 x 32, 4 warps. With 64 keys per tile S and O need 192 accumulator registers
//   per thread and the D = 128 kernel spilled ~190 bytes per thread; 32 keys halve S and leave
//   under 100 bytes. The Triton forward's sweep on H200 (kernels/triton,
//   launch_config) also found 128 x 32 fastest at D = 128 for gathered key tiles. Q, K, V tiles
//   take (128 + 2 * 32) * D * 2 bytes (48 KiB at D = 128).
// - D = 256: 64 x 32, 4 warps: O is 128 registers per thread, and Q, K, V take 64 KiB.
// block_m depends on D only (not on the dtype or the variant), so the LIST metadata built for a
// head dim (per query block counts, see fwd_block_m) serves every kernel of that head dim.
constexpr FwdTile fwd_tile(int head_dim) {
#if defined(DMATTN_SWEEP_D) && defined(DMATTN_SWEEP_FWD_M)
  if (head_dim == DMATTN_SWEEP_D) return FwdTile{DMATTN_SWEEP_FWD_M, DMATTN_SWEEP_FWD_N, DMATTN_SWEEP_FWD_WARPS};
#endif
  return head_dim <= 64 ? FwdTile{128, 64, 4} : head_dim <= 128 ? FwdTile{128, 32, 4} : FwdTile{64, 32, 4};
}

struct FwdSm90Tile {
  int block_m;     // query rows per thread block: 64 per consumer warpgroup
  int block_n;     // keys per tile (the N of S = Q K^T, the K of O += P V)
  int warpgroups;  // consumer warpgroups per thread block, stacked along the query rows (plus one
                   // producer warpgroup that gathers K and V)
  int stages;      // shared-memory buffers for K and for V, each with its own full/empty mbarriers
};

// The sm_90a forward (fwd_sm90_kernel.cuh), head dims 64 and 128.
// Measured (H200, 2026-11-28): the first version (same tiles, no producer, no overlap) T32k 4.07
// against 2.76 ms for the sm_80 kernel; the producer/consumer version with overlapped GEMMs 3.18
// against 2.74, T8k 0.89 against 0.80 (benchmarks/results/cuda-fwd-sm90b-h200-2026-11-28.json);
// 2026-11-29, with LIST tiles loaded from the compact copy: T32k 1.42 against 3.07, T8k 0.39
// against 0.88 (benchmarks/results/cuda-fwd-compact-h200-2026-11-29.log); persistent (one block
// per SM walking items, the next item's tiles and Q loading under the current one's end): T32k
// 1.37, T8k 0.37 (cuda-fwd-persistent-h200-2026-11-29.json). Estimated from the kernel times, an
// item still costs about 8 us beyond its key tiles (T32k: 62 items per SM in 1.34 ms, 21.6 us for
// ~8 tiles; the harness's T8k, w = 1024: 15.5 items per SM, ~15 us for ~4 tiles): the first tile's
// S and softmax, which nothing overlaps, and the epilogue. No other tile of it has been timed; the
// choices below come from budgets:
// - block_m = 128 as two consumer warpgroups of 64 rows (one wgmma M of 64 each): the same query
//   block as fwd_tile, so the LIST counts built for fwd_block_m(D) serve both kernels and the Python
//   side never needs to know which one runs; two warpgroups also share one K/V tile, halving the
//   shared-memory fill per query row against one warpgroup with 64 rows, and they take turns on the
//   tensor cores (one's softmax under the other's GEMMs).
// - block_n = 128 (FlashAttention-3's causal D = 128 tile): the consumers hold O (D / 2 floats), S
//   (64 floats) and the previous tile's P (32 registers) at once, which fits the 232 registers
//   setmaxnreg gives them (ptxas: no spills); the wgmma shapes are 64x128x16 (S) and 64xDx16 (O). A
//   larger block_n wastes more of the last (partial) tile of a LIST block: w = 2048 gives ~1024
//   visible entries per causal block on average, so 128 loses ~6%.
// - stages: Q + stages x (K + V) of shared memory, one block per SM (384 threads at 168 registers
//   fill the register file anyway). D = 128: 32 KiB + 2 x 64 KiB = 160 KiB (3 stages would need
//   224 KiB + metadata, over the 227 KiB a block may have). D = 64: 16 KiB + 4 x 32 KiB = 144 KiB,
//   so the producer can run up to 3 tiles ahead.
constexpr FwdSm90Tile fwd_sm90_tile(int head_dim) {
  return head_dim <= 64 ? FwdSm90Tile{128, 128, 2, 4} : FwdSm90Tile{128, 128, 2, 2};
}

// Bytes of the sm_90a LIST forward's compact copy per compact head and key tile (FwdParams::compact):
// the K and V tile images (block_n x D 16-bit elements each) and the tile's block_n int32 keys and
// float32 bias values.
constexpr int64_t fwd_sm90_compact_tile_bytes(int head_dim) {
  return int64_t(fwd_sm90_tile(head_dim).block_n) * (2 * head_dim * 2 + 8);
}

struct FwdSplitTile {
  int rows;    // query rows (head, query) per thread block, held in registers by every lane
  int warps;   // warps per thread block, each taking its own keys of the block's chunk
  int lanes;   // lanes that share one key row, 8 elements (one 16-byte load) each
  int unroll;  // keys per lane group per step, all loaded before any is used
  int step;    // keys per thread block per step: warps * (32 / lanes) * unroll
  int blocks_per_sm;  // __launch_bounds__ minimum, and what fwd_split_count fills the device with
};

// The split (decode) forward, fwd_split_kernel.cuh. Measured with these tiles (H200, 2026-11-28,
// benchmarks/results/cuda-decode-h200-2026-11-28.json): the D128k kernel 0.149 -> 0.025 ms against
// one block per query block, D32k-B8 0.285 -> 0.179 ms (backend call in a CUDA graph); other tiles
// not timed. The reasons are traffic and registers:
// - 8 elements per lane and lanes = D / 8 rounded up to a power of two (4 at D = 32, 16 at 96 and
//   128, 32 at 256), so every key row is one 16-byte copy per lane and a warp holds 32 / lanes keys
//   at once; a lane's share of Q and of the output accumulator is rows x 8 floats at every D.
// - unroll 4: a step copies 4 K and 4 V rows per lane group, 16 KiB per thread block of 4 warps
//   at every D (12 KiB at D = 96), into one of two shared-memory stages while the other is used.
// - rows 4: the query heads of one kv head at GQA group 4 and Q = 1 (the D128k workload) in one
//   block.
// - blocks_per_sm 3: ptxas (sm_80, sm_90a, every D) gives 160-168 registers with no spills at the
//   168 that __launch_bounds__(128, 3) allows (at 128 registers for 4 blocks it spills ~300
//   bytes), and a block has 33 KiB of shared memory. Larger groups
//   and Q > 1 take several thread blocks per chunk, which read the same K/V rows (from L2 when they
//   run together: they are adjacent in the grid).
constexpr int fwd_split_lanes(int head_dim) {
  return head_dim <= 32 ? 4 : head_dim <= 64 ? 8 : head_dim <= 128 ? 16 : 32;
}
constexpr FwdSplitTile fwd_split_tile(int head_dim) {
  return FwdSplitTile{4, 4, fwd_split_lanes(head_dim), 4, 4 * (32 / fwd_split_lanes(head_dim)) * 4, 3};
}

// The tensor-core split kernel (fwd_split_mma_kernel.cuh), for head dims 64 and 128 without softcap,
// mask or a bias row that differs within a block (fwd_split.cu, split_mma_applies): the block's
// query rows are one m16 tile of mma.sync m16n8k16, and each 64-key step is cut into 16 keys per
// warp (lanes and unroll do not apply). blocks_per_sm 3: ptxas gives it 162 registers at D = 128
// (sm_90a; 126 at D = 64 for sm_80), no spills, and 38 KiB of shared memory per block at D = 128.
// H200, D128k (torch.profiler, PDL off): 6.8 us against 8.3 for the CUDA-core kernel; Q = 8
// (32 rows per kv head) 10.4 against 40.3 us (benchmarks/results/cuda-split-mma-h200-2026-11-29.log).
constexpr bool fwd_split_mma_head_dim(int head_dim) { return head_dim == 64 || head_dim == 128; }
constexpr FwdSplitTile kFwdSplitMmaTile{16, 4, 0, 1, 64, 3};

struct BwdTile {
  int dq_block_m;    // query rows per dq thread block
  int dq_block_n;    // keys per tile of the dq loop
  int dkdv_block_n;  // keys per dk/dv thread block
  int dkdv_block_m;  // query rows per step of the dk/dv loop
  int warps;         // warps per thread block, stacked along the block's fixed rows
};

// From register budgets; no other tile timed against these. What they measure (H200, 2026-11-29,
// T32k global, ncu-cuda-t32k-h200-2026-11-29.log): dq 5.84 ms at 216 registers, dk/dv 10.18 ms at
// 250 (6.49 ms with the per-query-head split of bwd_params.h's dkdv_part, which fills the GPU: one
// block per kv head left SMs idle 46% of the kernel), both at 12.5% occupancy and issue-bound on
// mma.sync (3.4x and 2x the Triton kernels' instructions). Both kernels keep their gradient
// accumulator in registers with 16 rows per warp (D floats per thread for dk + dv, D / 2 for dq)
// and stream tiles of 32 (D > 64) or 64 rows whose two score-sized fragments (S, dP) take 16 or 32
// floats per thread. D = 256 holds 256 accumulator floats per thread in the dk/dv kernel and
// spills; a variant that splits D across warps would not.
// Shared memory (bf16, D = 128): dq 64 KiB (Q, dO, two stages of K and V), dk/dv 64 KiB (K, V, two
// stages of Q and dO); D = 256 doubles both (sm_80 allows 163 KiB per block).
constexpr BwdTile bwd_tile(int head_dim) {
#if defined(DMATTN_SWEEP_D) && defined(DMATTN_SWEEP_DQ_M)
  if (head_dim == DMATTN_SWEEP_D)
    return BwdTile{DMATTN_SWEEP_DQ_M, DMATTN_SWEEP_DQ_N, DMATTN_SWEEP_DKDV_N, DMATTN_SWEEP_DKDV_M, DMATTN_SWEEP_BWD_WARPS};
#endif
  return head_dim <= 64 ? BwdTile{64, 64, 64, 64, 4} : BwdTile{64, 32, 64, 32, 4};
}

struct BwdSm90Tile {
  int dkdv_block_n;  // keys per dk/dv thread block (64 per consumer warpgroup): one compact tile image
  int dkdv_block_m;  // query rows per step of the dk/dv loop
  int dkdv_stages;   // shared-memory stages of Q, dO, lse and delta
};

// The sm_90a backward (bwd_sm90_kernel.cuh), head dims 64 and 128. Its dq kernel takes the forward's
// tiles (fwd_sm90_tile: 128 query rows, key tiles of 128 from the compact copy). The dk/dv kernel:
// - dkdv_block_n = 128 = the compact copy's tile, so a thread block's K and V are one image each
//   (two bulk copies), and two consumer warpgroups of 64 keys share every streamed Q/dO tile.
// - dkdv_block_m = 64 (FlashAttention-3's D = 128 backward tile): each consumer thread holds dK and
//   dV (D floats together), S^T and dP^T (32 floats each at 64 query rows) and then P^T and dS^T
//   (16 registers each): about 200 of the 240 registers setmaxnreg gives it.
// - 2 stages: K, V (2 x 32 KiB at D = 128) + 2 x (Q + dO) (64 KiB) = 128 KiB.
constexpr BwdSm90Tile bwd_sm90_tile(int head_dim) {
  (void)head_dim;
#if defined(DMATTN_SWEEP_DKDV90_STAGES)
  return BwdSm90Tile{128, 64, DMATTN_SWEEP_DKDV90_STAGES};
#endif
  return BwdSm90Tile{128, 64, 2};
}

}  // namespace cuda
}  // namespace dmattn
