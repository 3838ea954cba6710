// The plain description of one backward call of the CUDA kernels. It extends the forward's
// description (same inputs, bias/mask broadcast, LIST metadata) with the gradient inputs, the
// workspaces that Python allocates, and the gradient outputs. Nothing here knows about PyTorch.
#pragma once

#include <stdint.h>

#include "fwd_params.h"

namespace dmattn {
namespace cuda {

// FwdParams::out and lse are inputs here (the forward's results). On the LIST path, counts and
// n_query_blocks describe the dq kernel's query blocks (bwd_dq_block_m), not the forward's.
struct BwdParams : FwdParams {
  const void* dout = nullptr;         // (B, Q, H, D), q's dtype
  int64_t dout_stride[3] = {0, 0, 0};  // batch, row, head
  float* delta = nullptr;              // (B, H, Q) contiguous workspace: rowsum(dout * out)

  void* dq = nullptr;  // (B, Q, H, D), q's dtype; nullptr: not wanted
  int64_t dq_stride[3] = {0, 0, 0};

  // (B, K, dkdv_heads_out, D). Either q's dtype with dkdv_heads_out = H_kv (one program owns a kv
  // head's keys), or float32 with dkdv_heads_out = H (LIST with one list per query head: per-head
  // partials that the caller sums over each group). nullptr: only dbias_keys is wanted.
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t dk_stride[3] = {0, 0, 0};  // batch, key, head
  int64_t dv_stride[3] = {0, 0, 0};
  bool dkdv_f32 = false;
  // Query heads one dk/dv program loops over: H / H_kv, or 1 with one list per query head or with
  // dkdv_part.
  int dkdv_heads = 1;
  // LIST with one list per kv head (or fewer) and H > H_kv, when set: one dk/dv program per query
  // head instead of per kv head, each writing its float32 partials by list position into dkdv_part
  // (2, B, H, list_len, D) contiguous (dk's, then dv's; entries of padding never written); then
  // dma_bwd_dkdv_reduce_kernel sums each group's partials in head order into the dk/dv rows of the
  // listed keys. Why: one program per kv head gave the T32k workload 256 thread blocks, under one
  // wave on an H200 at two blocks per SM, with SMs busy 54% of the kernel (ncu); see bwd.cu.
  float* dkdv_part = nullptr;

  // PREFIX path (FwdParams::death): the dk/dv kernel tiles each selection row's ever-alive keys
  // (death_j > j): the first dkdv_count[row] entries of dkdv_keys (B_s, H_s, K), in any order (the
  // caller's, dmattn.key_order.alive_order: keys born and dying together share a tile). The dq
  // kernel walks the forward's per-block lists (idx/counts for its own block size).
  const int32_t* dkdv_keys = nullptr;
  const int32_t* dkdv_count = nullptr;  // (B_s, H_s)

  // dbias of a query-broadcast bias: float32 (B, H, K) contiguous, per (batch, query head) the sum
  // over query rows of dS, written once per listed key by the dk/dv kernel.
  float* dbias_keys = nullptr;
  // dbias of a per-query bias: float32 (B, H, Q, K) contiguous, zero-filled by the caller; the dq
  // kernel writes dS at every visible element.
  float* ds = nullptr;
};

}  // namespace cuda
}  // namespace dmattn
