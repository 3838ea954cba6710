// Host entry points of the CUDA forward (no CuTe, no nanobind: the binding includes this).
#pragma once

#include <cuda_runtime.h>

#include "fwd_params.h"

namespace dmattn {
namespace cuda {

// Launches the forward on `stream`: the split forward (fwd_split.h) when params.splits > 0, else the
// one-block-per-query-block kernels. Returns the splits run (0: not the split forward). Throws
// std::invalid_argument for an unsupported dtype or head dim and std::runtime_error for a failed
// CUDA call. No allocation, no synchronisation.
int fwd(const FwdParams& params, cudaStream_t stream);

// Multiprocessor count of a CUDA device ordinal (cached after the first query).
int device_sm_count(int device);

// Query rows per thread block for head dim D: the block size of the LIST path's per-block counts.
int fwd_block_m(int head_dim);

// Whether the bias or the mask differs between query rows (a non-zero query stride).
inline bool fwd_per_query(const FwdParams& params) {
  return (params.bias != nullptr && params.bias_stride[2] != 0) || (params.mask != nullptr && params.mask_stride[2] != 0);
}

// Defined once per compiled variant in the generated translation units (see switch.h).
template <DType kDType, int kHeadDim, bool kPerQuery>
void launch_fwd(const FwdParams& params, cudaStream_t stream);

// The sm_90a (wgmma) forward, fwd_sm90_kernel.cuh: one variant per dtype and head dim of
// fwd_sm90_head_dim_switch (switch.h), for query-broadcast bias and mask only.
template <DType kDType, int kHeadDim>
void launch_fwd_sm90(const FwdParams& params, cudaStream_t stream);

// Whether fwd() runs the sm_90a kernel for this head dim and kind of bias/mask on the current
// device: the build carries sm_90a code for that head dim, the device is compute capability 9.0,
// the bias and mask are query-broadcast, and the kernel is enabled (set_fwd_sm90_enabled).
bool fwd_uses_sm90(int head_dim, bool per_query);

// The sm_90a forward's compact LIST copy (FwdParams::compact). fwd_compact_heads: its compact heads
// for these head counts (bias_heads / mask_heads 1 when absent), 0 when a compact head would mix
// bias or mask heads. fwd_compact_bytes: the workspace bytes a LIST call with these sizes should
// pass (0: the call does not take the sm_90a kernel on the current device, or cannot use the copy;
// it then runs without one).
int fwd_compact_heads(int H, int H_kv, int sel_heads, int bias_heads, int mask_heads);
int64_t fwd_compact_bytes(int head_dim, int64_t B, int H, int H_kv, int sel_heads, int bias_heads, int mask_heads,
                          int64_t list_len, bool per_query);

// On by default (fwd.cu says why); off sends every call to the sm_80 kernel (A/B measurements, a
// fallback).
void set_fwd_sm90_enabled(bool enabled);
bool fwd_sm90_enabled();

// Whether this build carries the sm_90a forward, and for which head dims (text for info()).
bool fwd_sm90_compiled();
const char* fwd_sm90_head_dims();

}  // namespace cuda
}  // namespace dmattn
