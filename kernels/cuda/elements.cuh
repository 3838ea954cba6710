// Element loads that every kernel shares (no CuTe: the split forward includes this without it).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "dmattn/params.h"

namespace dmattn {
namespace cuda {

// Bias element i split into a load and a later conversion, so that a thread can issue several
// loads before it waits for any (a conversion right after its load, under a branch, makes the
// thread wait there). load_bits gives the 16-bit value of a float16/bfloat16 bias and the float32
// bits of a float32 bias (a float64 one is converted here, and waited for); bits_to_float reads
// either back.
__device__ __forceinline__ uint32_t load_bits(const void* base, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::f16:
    case DType::bf16: return __ldg(static_cast<const unsigned short*>(base) + i);
    case DType::f32: return __ldg(static_cast<const unsigned int*>(base) + i);
    default: return __float_as_uint(float(__ldg(static_cast<const double*>(base) + i)));
  }
}

__device__ __forceinline__ float bits_to_float(uint32_t bits, DType dtype) {
  if (dtype == DType::f16) return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  return __uint_as_float(dtype == DType::bf16 ? bits << 16 : bits);
}

// One bias element as float32, whatever its dtype (the dtype is uniform across the block, so the
// switches do not diverge), for a thread that uses it right away.
__device__ __forceinline__ float load_float(const void* base, DType dtype, int64_t i) {
  return bits_to_float(load_bits(base, dtype, i), dtype);
}

}  // namespace cuda
}  // namespace dmattn
