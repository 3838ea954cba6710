// Element loads that every kernel shares (no CuTe: the split forward includes this without it).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "dmattn/params.h"

namespace dmattn {
namespace cuda {

// One bias element as float32, whatever its dtype (the dtype is uniform across the block, so the
// switch does not diverge).
__device__ __forceinline__ float load_float(const void* base, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::f16: return __half2float(__ushort_as_half(__ldg(static_cast<const unsigned short*>(base) + i)));
    case DType::bf16: return __uint_as_float(uint32_t(__ldg(static_cast<const unsigned short*>(base) + i)) << 16);
    case DType::f32: return __ldg(static_cast<const float*>(base) + i);
    default: return float(__ldg(static_cast<const double*>(base) + i));
  }
}

}  // namespace cuda
}  // namespace dmattn
