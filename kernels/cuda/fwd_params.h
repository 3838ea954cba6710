// The plain description of one forward call of the CUDA kernels: pointers, sizes, strides and
// flags, filled by the binding from DLPack tensors. Nothing here knows about Python or PyTorch.
#pragma once

#include <stdint.h>

#include "dmattn/params.h"

namespace dmattn {
namespace cuda {

// Strides are in elements. q/k/v/out have a contiguous head dim (stride 1) and 16-byte aligned
// rows, which the binding checks; bias and mask have stride 0 on every broadcast dimension.
struct FwdParams {
  const void* q = nullptr;  // (B, Q, H, D)
  const void* k = nullptr;  // (B, K, H_kv, D)
  const void* v = nullptr;  // (B, K, H_kv, D)
  void* out = nullptr;      // (B, Q, H, D), q's dtype
  float* lse = nullptr;     // (B, H, Q), rows contiguous
  DType dtype = DType::f16;
  int64_t q_stride[3] = {0, 0, 0};  // batch, row, head
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};
  int64_t out_stride[3] = {0, 0, 0};
  int64_t lse_stride[2] = {0, 0};  // batch, head

  // (B|1, H|H_kv|1, Q|1, K); query head h reads head h * heads / H. Absent: nullptr.
  const void* bias = nullptr;
  DType bias_dtype = DType::f32;
  int64_t bias_stride[4] = {0, 0, 0, 0};
  int bias_heads = 1;
  const uint8_t* mask = nullptr;  // bool, true = may attend
  int64_t mask_stride[4] = {0, 0, 0, 0};
  int mask_heads = 1;

  // LIST path (idx != nullptr): per selection row (b_s, h_s) an ascending int32 list of list_len
  // key indices padded with K, and per (row, query block) the count of entries the block may see.
  // Selection row of (b, h): (sel_batched ? b : 0) * sel_heads + h * sel_heads / H.
  const int32_t* idx = nullptr;    // (B_s, H_s, list_len), contiguous
  const int32_t* counts = nullptr; // (B_s, H_s, n_query_blocks), contiguous
  int64_t list_len = 0;
  int sel_heads = 1;
  bool sel_batched = false;
  int n_query_blocks = 0;
  // PREFIX path (visible scope, causal): death != nullptr, with idx (B_s, H_s, n_query_blocks,
  // list_len) holding each query block's own list of alive keys and counts (B_s, H_s,
  // n_query_blocks, 2) its length first (visible.h); death (B_s, H_s, K) the keys' death
  // positions: query i sees key j iff j <= i + K - Q < death_j.
  const int32_t* death = nullptr;

  // The split (decode) forward (fwd_split.h): splits > 0 spreads each key list (or the K keys,
  // DENSE) over up to that many thread blocks, whose float32 partials go to split_workspace (at
  // least splits * B * H * Q * (D + 2) floats, uninitialised is fine) and are merged by a second
  // kernel. 0: the kernels of fwd_kernel.cuh / fwd_sm90_kernel.cuh.
  int splits = 0;
  float* split_workspace = nullptr;

  // The sm_90a forward's compact LIST copy (fwd_sm90_kernel.cuh; LIST path only, never PREFIX):
  // when set, a first kernel gathers the listed K and V rows of every (batch, compact head) into
  // images of the shared-memory tiles (fwd_compact_bytes bytes, 16-byte aligned), and the forward's
  // producer loads each tile with three bulk copies instead of gathering rows with 16-byte cp.async
  // (which left the tensor cores waiting: T32k 3.2 ms with the gather against 1.6 without loads).
  // Compact head c of compact_heads serves query heads c * H / compact_heads .. (c + 1) * H /
  // compact_heads - 1, which share a kv head, a selection row, a bias head and a mask head.
  void* compact = nullptr;
  int compact_heads = 0;

  int B = 1, Q = 1, K = 1, H = 1, H_kv = 1, D = 0;
  float scale = 1.f;
  float softcap = 0.f;  // 0: no softcap
  bool causal = false;
};

#if defined(__CUDACC__)
#define DMATTN_PARAMS_HD __host__ __device__
#else
#define DMATTN_PARAMS_HD
#endif

// The selection row (b_s, h_s) flattened, whose list (LIST, PREFIX) query head h of batch b reads.
DMATTN_PARAMS_HD inline int64_t selection_row(const FwdParams& p, int b, int h) {
  return (p.sel_batched ? int64_t(b) : 0) * p.sel_heads + int64_t(h) * p.sel_heads / p.H;
}

}  // namespace cuda
}  // namespace dmattn
