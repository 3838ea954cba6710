// Host entry points of the CUDA backward (no CuTe, no nanobind: the binding includes this).
#pragma once

#include <cuda_runtime.h>

#include "bwd_params.h"
#include "fwd.h"

namespace dmattn {
namespace cuda {

// Launches, on `stream`: delta = rowsum(dout * out) into params.delta; the dq kernel when dq or ds
// is wanted; the dk/dv kernel when dk/dv or dbias_keys is wanted. Throws std::invalid_argument for
// an unsupported dtype or head dim, std::runtime_error for a failed CUDA call. No allocation, no
// synchronisation; the caller zero-fills ds, dbias_keys and (LIST) dk/dv beforehand.
void bwd(const BwdParams& params, cudaStream_t stream);

// Query rows per dq thread block (the block size of the dq kernel's LIST counts) and keys per
// dk/dv thread block (LIST: list entries per block).
int bwd_dq_block_m(int head_dim);
int bwd_dkdv_block_n(int head_dim);

// Defined once per compiled variant in the generated translation units (see switch.h).
template <DType kDType, int kHeadDim, bool kPerQuery>
void launch_bwd_dq(const BwdParams& params, cudaStream_t stream);
template <DType kDType, int kHeadDim, bool kPerQuery>
void launch_bwd_dkdv(const BwdParams& params, cudaStream_t stream);
// The sm_90a backward (bwd_sm90_kernel.cuh), for head dims 64 and 128 in builds with sm_90a code:
// LIST calls with the forward's compact copy (params.compact), which it launches first, then its dq
// kernel (want_dq) and its dk/dv kernel (want_dkdv). Not the delta preprocess or the dkdv_part
// reduction (bwd does those).
template <DType kDType, int kHeadDim>
void launch_bwd_sm90(const BwdParams& params, cudaStream_t stream, bool want_dq, bool want_dkdv);

}  // namespace cuda
}  // namespace dmattn
