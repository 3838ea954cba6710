// Host entry points of the CUDA global-scope selection (no nanobind, no torch: the binding in
// module.cu includes this; the kernels are in select_kernel.cuh).
//
// For every selection row (b_s, h_s) of a query-broadcast bias (and optional mask): the keys among
// the first W = min(window, K) candidates, ranked by bias value descending then key index ascending
// (cpp/include/dmattn/selection.h), listed in ascending key order as int32 and padded with the
// sentinel K; then, per block of `block_m` queries, how many list entries that block can see at all
// (entries <= the causal limit of its last query): the LIST metadata of the CUDA forward.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace dmattn {
namespace cuda {

// n rounded up to a multiple of 16 bytes: the alignment of every workspace part.
inline size_t align16(size_t n) { return (n + 15) / 16 * 16; }

struct SelectParams {
  const void* bias = nullptr;
  int bias_bits = 0;           // 16 (float16/bfloat16), 32 (float32) or 64 (float64)
  int64_t bias_stride[3] = {};  // elements: batch (0 when size 1), head, key
  int bias_heads = 1;          // selection head h_s reads bias head h_s * bias_heads / H_s
  const uint8_t* mask = nullptr;  // bool, nullptr: every key is a candidate
  int64_t mask_stride[3] = {};
  int mask_heads = 1;
  int64_t B_s = 0, H_s = 0;  // selection rows, row = b_s * H_s + h_s
  int64_t K = 0;
  int64_t W = 0;            // min(window, K)
  int32_t* idx = nullptr;   // (rows, W), contiguous
  void* workspace = nullptr;  // select_plan(...).workspace_bytes, uninitialised is fine
  int64_t chunk = 0;        // keys per thread block: select_plan(...).chunk
  // Optional (rows,): each row's number of selected keys, written with the list. That is the LIST
  // count of a call whose queries fit one query block (the block's last query is the last query,
  // which sees every key, causal or not), so such a call needs no list_counts launch.
  int32_t* row_counts = nullptr;
};

struct CountsParams {
  const int32_t* idx = nullptr;  // (rows, W), contiguous, ascending, padded with K
  int32_t* counts = nullptr;     // (rows, n_blocks), contiguous
  int64_t rows = 0, W = 0, K = 0, Q = 0;
  int64_t block_m = 1, n_blocks = 0;
  bool causal = false;
};

struct SelectPlan {
  int64_t chunk;            // keys per thread block, a multiple of select_tile()
  int64_t chunks;           // thread blocks per row
  size_t workspace_bytes;   // what select_lists needs
};

// Keys per compaction step of one thread block; a forced chunk must be a multiple of it.
int64_t select_tile();

// The launch plan: `chunk` 0 picks one for `sm_count` multiprocessors, else that chunk (a positive
// multiple of select_tile(), throws std::invalid_argument otherwise) is used.
SelectPlan select_plan(int64_t rows, int64_t K, int bias_bits, int sm_count, int64_t chunk);

// Launches the select on `stream` (bias_bits / 8 + 1 kernels). No allocation, no synchronisation,
// nothing to zero: every workspace entry is written before it is read.
void select_lists(const SelectParams& params, cudaStream_t stream);

// Launches the per-query-block counts of a LIST selection (one thread per count).
void list_counts(const CountsParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace dmattn
