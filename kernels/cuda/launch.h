// Programmatic dependent launch (PDL, compute capability 9.0+) for the module's short kernel chains
// (the radix select's passes, the split forward and its merge): a kernel launched with `overlap`
// may start while the kernel before it in the stream is still running, so its launch and whatever
// it does before pdl_wait() (address arithmetic, loads of the call's inputs) hide behind that
// kernel's tail. Decode is a chain of five short kernels whose launches and first loads otherwise
// add up to a large part of the call.
//
// The contract of a kernel launched with overlap:
// - before pdl_wait() it writes no global memory (the previous kernel may still read it: workspace
//   memory is reused call after call), and reads only inputs that were complete before the first
//   kernel of its chain started, which the caller guarantees by launching that first kernel without
//   overlap (it then waits for everything before it);
// - after pdl_wait() every earlier kernel of the stream has finished and its writes are visible.
// Without the launch attribute (or before sm_90) pdl_wait() returns at once and the launch is an
// ordinary one.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "check.h"

namespace dmattn {
namespace cuda {

// Compute capability (10 * major + minor) of device ordinal `device`, cached (fwd.cu).
int device_capability(int device);

// Process-wide switch (on by default; off: every launch is an ordinary one, for A/B timing and as
// a fallback), and whether launches on the current device use PDL: switched on and compute
// capability >= 9.0 (fwd.cu).
void set_pdl_enabled(bool enabled);
bool pdl_enabled();
bool pdl_available();

// Launches kernel<<<grid, block, 0, stream>>>(args...), with the PDL attribute when `overlap`.
template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, bool overlap,
                   const char* what, Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = overlap ? 1 : 0;
  check_cuda(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...), what);
}

#ifdef __CUDACC__
// Waits until the kernels before this one in the stream have finished and their writes are
// visible (a no-op without PDL).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Lets the next kernel of the stream, if launched with PDL, start now rather than when this one's
// blocks exit.
__device__ __forceinline__ void pdl_launch_next() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
#endif

}  // namespace cuda
}  // namespace dmattn
