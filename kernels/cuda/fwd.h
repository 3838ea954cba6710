// Host entry points of the CUDA forward (no CuTe, no nanobind: the binding includes this).
#pragma once

#include <cuda_runtime.h>

#include "fwd_params.h"

namespace dmattn {
namespace cuda {

// Launches the forward on `stream`; throws std::invalid_argument for an unsupported dtype or head
// dim and std::runtime_error for a failed CUDA call. No allocation, no synchronisation.
void fwd(const FwdParams& params, cudaStream_t stream);

// Query rows per thread block for head dim D: the block size of the LIST path's per-block counts.
int fwd_block_m(int head_dim);

// Whether the bias or the mask differs between query rows (a non-zero query stride).
inline bool fwd_per_query(const FwdParams& params) {
  return (params.bias != nullptr && params.bias_stride[2] != 0) || (params.mask != nullptr && params.mask_stride[2] != 0);
}

// Defined once per compiled variant in the generated translation units (see switch.h).
template <DType kDType, int kHeadDim, bool kPerQuery>
void launch_fwd(const FwdParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace dmattn
