// Every CUDA runtime call of the module goes through check_cuda, so a failure surfaces as a Python
// RuntimeError naming the call instead of a silent wrong result.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace dmattn {
namespace cuda {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace dmattn
