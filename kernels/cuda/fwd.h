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

// Off by default (see fwd.cu: correct on an H200 but slower so far); off sends every call to the
// sm_80 kernel (A/B measurements, a fallback).
void set_fwd_sm90_enabled(bool enabled);
bool fwd_sm90_enabled();

// Whether this build carries the sm_90a forward, and for which head dims (text for info()).
bool fwd_sm90_compiled();
const char* fwd_sm90_head_dims();

}  // namespace cuda
}  // namespace dmattn
