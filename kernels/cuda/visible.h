// Host entry points of the CUDA visible-scope metadata (kernels in visible_kernel.cuh; no
// nanobind, no torch: the binding in module.cu includes this).
//
// The case: causal, topk_scope "visible", a bias and mask shared by every query. Query i sees the
// keys 0..c_i (c_i = i + K - Q) and keeps their top w (bias descending, then index ascending, the
// order of cpp/include/dmattn/selection.h). Key j is in the top w of the prefix 0..c exactly while
// fewer than w better keys lie at or before c, so each key is alive on one interval of limits:
//
//     key j is visible to query i  <=>  j <= c_i < death_j
//
// death_j being the position of the w-th key, in position order, among the keys better than j (K
// when fewer than w are; j itself for a masked key or one dead at birth). This is the definition
// the Triton backend uses (kernels/triton/prefix.py); the two compute it the same way:
//
// 1. visible_rank_keys: per key the int64 rank key (order_key(bias) << b) | (K - 1 - j), b the
//    position bits, so a larger key is a better key and keys are unique; masked-out keys have
//    order 0 (as in the global-scope select: so does a negative NaN with every payload bit set).
// 2. The caller sorts each row's keys descending (torch.sort): rank r's key is the r-th best.
// 3. visible_death: three kernels. A (rank chunk of kRanks, position bucket of P) prefix-count
//    table per row, built by chunk and scanned down the chunks; then per rank a binary search of
//    the table for the bucket holding the w-th smallest position among the better ranks, and an
//    exact pick inside it. O(K log K) per row, no O(Q*K) work.
// 4. visible_lists: per query block of block_m queries (limits c_lo..c_hi), the keys alive for at
//    least one of its queries (j <= c_hi, death_j > max(j, c_lo)): at most w + block_m, as two
//    ascending runs, those every query of the block sees (j <= c_lo, death_j > c_hi) first. The
//    row's ever-alive keys (death_j > j) are compacted first, so a block scans only those.
//
// Nothing here allocates or synchronises; every workspace entry is written before it is read.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "select.h"

namespace dmattn {
namespace cuda {

// Ranks per chunk of the death table (one warp).
constexpr int kVisibleRanks = 32;

// Position bits of the rank keys of K keys.
int visible_pos_bits(int64_t K);

// Positions per bucket of the death table for K keys: a power of two >= 32 that keeps the table
// at most 512 buckets wide (the Triton backend's choice, measured there on an H200).
int64_t visible_bucket(int64_t K);

// Step 1. `select` describes bias and mask as for select_lists (its idx, W, workspace and chunk
// are not used); keys: int64 (B_s * H_s, K), contiguous. Bias of 16 or 32 bits only (a 64-bit
// bias's order key leaves no room for the position: the backend declines it).
void visible_rank_keys(const SelectParams& select, int64_t* keys, cudaStream_t stream);

struct DeathParams {
  const int64_t* sorted = nullptr;  // (rows, K) rank keys, each row descending
  int64_t rows = 0, K = 0, W = 0;   // W = the window, 1 <= W
  int pos_bits = 1;
  int64_t bucket = 32;              // visible_bucket(K) (tests pass others: a power of two >= 32)
  int32_t* x = nullptr;             // (rows, K) workspace: the position of each rank
  int32_t* rank = nullptr;          // (rows, K) workspace: the rank of each position
  int32_t* table = nullptr;         // (rows, cdiv(K, kVisibleRanks), cdiv(K, bucket) + 1) workspace
  int32_t* death = nullptr;         // (rows, K) output
};

// Step 3 (three launches).
void visible_death(const DeathParams& params, cudaStream_t stream);

// Keys per chunk of the ever-alive compaction.
constexpr int kVisibleChunk = 1024;

struct ListsParams {
  const int32_t* death = nullptr;  // (rows, K)
  int64_t rows = 0, K = 0, Q = 0;
  int64_t block_m = 1, n_blocks = 0;  // n_blocks = cdiv(Q, block_m)
  int64_t list_len = 0;               // min(K, W + block_m)
  int32_t* ever = nullptr;            // (rows, K) workspace: the ever-alive keys, ascending
  int32_t* before = nullptr;          // (rows, K) workspace: ever-alive keys at or before each position
  int32_t* chunk_counts = nullptr;    // (rows, cdiv(K, kVisibleChunk)) workspace
  int32_t* idx = nullptr;             // (rows, n_blocks, list_len) output; entries past the count unset
  int32_t* counts = nullptr;          // (rows, n_blocks, 2) output: count, length of the first run
};

// Step 4 (three launches).
void visible_lists(const ListsParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace dmattn
