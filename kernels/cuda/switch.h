// The one place that turns run-time properties into the compile-time variants that exist:
// dtype x head dim x "bias or mask per query row". Every other feature (causality, bias dtype,
// softcap, DENSE or LIST keys, per-head dk/dv partials) is a run-time flag inside the kernels, so
// a head dim costs four forward instantiations and four of each backward kernel, plus two (one per
// dtype) of the split (decode) forward, whose translation unit CMake generates the same way.
//
// Head dims are compiled per build: CMake (DMATTN_CUDA_HEADDIMS) generates per head dim one
// translation unit that includes fwd_kernel.cuh and expands DMATTN_INSTANTIATE_FWD and one that
// includes bwd_kernel.cuh and expands DMATTN_INSTANTIATE_BWD, and defines DMATTN_HAS_HDIM_<D>; a
// head dim left out is rejected here with its reason.
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

#include "dmattn/params.h"

#ifndef DMATTN_CUDA_HEADDIMS_STRING
#define DMATTN_CUDA_HEADDIMS_STRING ""
#endif

namespace dmattn {
namespace cuda {

template <DType kDType>
using DTypeTag = std::integral_constant<DType, kDType>;
template <int kHeadDim>
using HeadDimTag = std::integral_constant<int, kHeadDim>;

// The head dims of this build, as text for messages and info().
inline const char* compiled_head_dims() { return DMATTN_CUDA_HEADDIMS_STRING; }

template <class F>
void head_dim_switch(int head_dim, F&& f) {
  switch (head_dim) {
#ifdef DMATTN_HAS_HDIM_32
    case 32: return f(HeadDimTag<32>{});
#endif
#ifdef DMATTN_HAS_HDIM_64
    case 64: return f(HeadDimTag<64>{});
#endif
#ifdef DMATTN_HAS_HDIM_96
    case 96: return f(HeadDimTag<96>{});
#endif
#ifdef DMATTN_HAS_HDIM_128
    case 128: return f(HeadDimTag<128>{});
#endif
#ifdef DMATTN_HAS_HDIM_256
    case 256: return f(HeadDimTag<256>{});
#endif
    default:
      throw std::invalid_argument("head dim D=" + std::to_string(head_dim) +
                                  " is not supported by the CUDA kernels; this build has D in {" +
                                  compiled_head_dims() + "} (CMake option DMATTN_CUDA_HEADDIMS)");
  }
}

template <class F>
void dtype_switch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f16: return f(DTypeTag<DType::f16>{});
    case DType::bf16: return f(DTypeTag<DType::bf16>{});
    default: throw std::invalid_argument("the CUDA kernels support float16 and bfloat16 query/key/value only");
  }
}

template <class F>
void bool_switch(bool value, F&& f) {
  if (value) return f(std::true_type{});
  return f(std::false_type{});
}

// f(DTypeTag, HeadDimTag, per-query bool_constant) for a compiled variant.
template <class F>
void fwd_switch(DType dtype, int head_dim, bool per_query, F&& f) {
  dtype_switch(dtype, [&](auto dt) {
    head_dim_switch(head_dim, [&](auto hd) { bool_switch(per_query, [&](auto pq) { f(dt, hd, pq); }); });
  });
}

// The sm_90a forward: head dims 64 and 128 (when the build has them and sm_90a code), each for
// float16 and bfloat16 (dtype_switch), query-broadcast bias and mask only: two variants per head
// dim. DMATTN_HAS_SM90A is defined by CMake when DMATTN_CUDA_ARCHS names a 90a target; CMake then
// also generates per such head dim one translation unit that includes fwd_sm90_kernel.cuh and
// expands DMATTN_INSTANTIATE_FWD_SM90. Returns false (without calling f) for any other head dim.
template <class F>
bool fwd_sm90_head_dim_switch(int head_dim, F&& f) {
  switch (head_dim) {
#if defined(DMATTN_HAS_SM90A) && defined(DMATTN_HAS_HDIM_64)
    case 64: f(HeadDimTag<64>{}); return true;
#endif
#if defined(DMATTN_HAS_SM90A) && defined(DMATTN_HAS_HDIM_128)
    case 128: f(HeadDimTag<128>{}); return true;
#endif
    default: (void)f; return false;
  }
}

// The head dims fwd_sm90_head_dim_switch takes, for messages and info().
inline const char* fwd_sm90_head_dims_string() {
#ifdef DMATTN_HAS_SM90A
#if defined(DMATTN_HAS_HDIM_64) && defined(DMATTN_HAS_HDIM_128)
  return "64, 128";
#elif defined(DMATTN_HAS_HDIM_64)
  return "64";
#elif defined(DMATTN_HAS_HDIM_128)
  return "128";
#else
  return "";
#endif
#else
  return "";
#endif
}

// The backward has the same variants as the forward.
template <class F>
void bwd_switch(DType dtype, int head_dim, bool per_query, F&& f) {
  fwd_switch(dtype, head_dim, per_query, f);
}

}  // namespace cuda
}  // namespace dmattn

// Every variant of one head dim: the list fwd_switch dispatches over.
#define DMATTN_INSTANTIATE_FWD_ONE(DTYPE, HEAD_DIM, PER_QUERY)                       \
  template void dmattn::cuda::launch_fwd<dmattn::DType::DTYPE, HEAD_DIM, PER_QUERY>( \
      const dmattn::cuda::FwdParams&, cudaStream_t);
#define DMATTN_INSTANTIATE_FWD(HEAD_DIM)            \
  DMATTN_INSTANTIATE_FWD_ONE(f16, HEAD_DIM, false)  \
  DMATTN_INSTANTIATE_FWD_ONE(f16, HEAD_DIM, true)   \
  DMATTN_INSTANTIATE_FWD_ONE(bf16, HEAD_DIM, false) \
  DMATTN_INSTANTIATE_FWD_ONE(bf16, HEAD_DIM, true)

// The sm_90a forward (generated only for head dims 64 and 128, see fwd_sm90_head_dim_switch).
#define DMATTN_INSTANTIATE_FWD_SM90(HEAD_DIM)                                                                   \
  template void dmattn::cuda::launch_fwd_sm90<dmattn::DType::f16, HEAD_DIM>(const dmattn::cuda::FwdParams&,  \
                                                                            cudaStream_t);                    \
  template void dmattn::cuda::launch_fwd_sm90<dmattn::DType::bf16, HEAD_DIM>(const dmattn::cuda::FwdParams&, \
                                                                             cudaStream_t);

// The split (decode) forward of one head dim (fwd_split_kernel.cuh): one variant per dtype; bias,
// mask, causality, softcap and LIST or DENSE keys are run-time flags.
#define DMATTN_INSTANTIATE_FWD_SPLIT(HEAD_DIM)                                                                    \
  template void dmattn::cuda::launch_fwd_split<dmattn::DType::f16, HEAD_DIM>(                                  \
      const dmattn::cuda::FwdParams&, const dmattn::cuda::FwdSplitLaunch&, cudaStream_t);                      \
  template void dmattn::cuda::launch_fwd_split<dmattn::DType::bf16, HEAD_DIM>(                                 \
      const dmattn::cuda::FwdParams&, const dmattn::cuda::FwdSplitLaunch&, cudaStream_t);

#define DMATTN_INSTANTIATE_BWD_ONE(DTYPE, HEAD_DIM, PER_QUERY)                            \
  template void dmattn::cuda::launch_bwd_dq<dmattn::DType::DTYPE, HEAD_DIM, PER_QUERY>(   \
      const dmattn::cuda::BwdParams&, cudaStream_t);                                       \
  template void dmattn::cuda::launch_bwd_dkdv<dmattn::DType::DTYPE, HEAD_DIM, PER_QUERY>( \
      const dmattn::cuda::BwdParams&, cudaStream_t);
#define DMATTN_INSTANTIATE_BWD(HEAD_DIM)            \
  DMATTN_INSTANTIATE_BWD_ONE(f16, HEAD_DIM, false)  \
  DMATTN_INSTANTIATE_BWD_ONE(f16, HEAD_DIM, true)   \
  DMATTN_INSTANTIATE_BWD_ONE(bf16, HEAD_DIM, false) \
  DMATTN_INSTANTIATE_BWD_ONE(bf16, HEAD_DIM, true)

// The sm_90a backward (generated only for head dims 64 and 128, like the sm_90a forward).
#define DMATTN_INSTANTIATE_BWD_SM90(HEAD_DIM)                                                                   \
  template void dmattn::cuda::launch_bwd_sm90<dmattn::DType::f16, HEAD_DIM>(const dmattn::cuda::BwdParams&,  \
                                                                            cudaStream_t, bool, bool);        \
  template void dmattn::cuda::launch_bwd_sm90<dmattn::DType::bf16, HEAD_DIM>(const dmattn::cuda::BwdParams&, \
                                                                             cudaStream_t, bool, bool);
