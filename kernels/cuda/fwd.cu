// Dispatch of the CUDA forward to its compiled variants (the kernels themselves are in
// fwd_kernel.cuh and fwd_sm90_kernel.cuh, instantiated per head dim in translation units generated
// by CMake).
#include <atomic>
#include <stdexcept>

#include "check.h"
#include "fwd.h"
#include "fwd_split.h"
#include "switch.h"
#include "tiles.h"

namespace dmattn {
namespace cuda {

namespace {

// Off by default: the sm_90a kernel passes tests/test_cuda_fwd_sm90.py on an H200 (152 cases) but
// is slower than the sm_80 kernel (T32k 4.07 against 2.76 ms, T8k 1.11 against 0.81;
// benchmarks/results/cuda-fwd-sm90-h200-2026-11-28.json), since nothing overlaps its softmax with
// the products. Flip to true once it is faster.
std::atomic<bool> g_sm90_enabled{false};

// Compute capability (10 * major + minor) per device ordinal, 0 until first read: the dispatch runs
// on every call, and a device attribute query is a driver call. Concurrent first reads store the
// same value, so relaxed atomics suffice.
constexpr int kMaxDevices = 64;
std::atomic<int> g_capability[kMaxDevices];

int device_capability(int device) {
  if (device < 0 || device >= kMaxDevices) return 0;
  int cc = g_capability[device].load(std::memory_order_relaxed);
  if (cc == 0) {
    int major = 0, minor = 0;
    check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
               "cudaDeviceGetAttribute(ComputeCapabilityMajor)");
    check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device),
               "cudaDeviceGetAttribute(ComputeCapabilityMinor)");
    cc = 10 * major + minor;
    g_capability[device].store(cc, std::memory_order_relaxed);
  }
  return cc;
}

}  // namespace

void set_fwd_sm90_enabled(bool enabled) { g_sm90_enabled.store(enabled, std::memory_order_relaxed); }
bool fwd_sm90_enabled() { return g_sm90_enabled.load(std::memory_order_relaxed); }

bool fwd_sm90_compiled() {
#ifdef DMATTN_HAS_SM90A
  return true;
#else
  return false;
#endif
}

const char* fwd_sm90_head_dims() { return fwd_sm90_head_dims_string(); }

bool fwd_uses_sm90(int head_dim, bool per_query) {
  if (per_query || !fwd_sm90_enabled() || !fwd_sm90_head_dim_switch(head_dim, [](auto) {})) return false;
  int device = -1;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  // Exactly 9.0: sm_90a code runs on that compute capability only (a later 9.x device would JIT
  // the compute_90 PTX, whose copy of this kernel is an empty body).
  return device_capability(device) == 90;
}

int fwd(const FwdParams& params, cudaStream_t stream) {
  if (params.death != nullptr && params.splits > 0)
    throw std::invalid_argument("the split forward has no PREFIX (visible-scope) path");
  if (params.splits > 0) return fwd_split(params, stream);
  const bool per_query = fwd_per_query(params);
  // The PREFIX path (death) runs on the sm_80 kernel only.
  if (params.death == nullptr && fwd_uses_sm90(params.D, per_query)) {
    fwd_sm90_head_dim_switch(params.D, [&](auto hd) {
      dtype_switch(params.dtype, [&](auto dt) {
        launch_fwd_sm90<decltype(dt)::value, decltype(hd)::value>(params, stream);
      });
    });
    return 0;
  }
  fwd_switch(params.dtype, params.D, per_query, [&](auto dt, auto hd, auto pq) {
    launch_fwd<decltype(dt)::value, decltype(hd)::value, decltype(pq)::value>(params, stream);
  });
  return 0;
}

int fwd_block_m(int head_dim) {
  int block_m = 0;
  head_dim_switch(head_dim, [&](auto hd) { block_m = fwd_tile(decltype(hd)::value).block_m; });
  return block_m;
}

}  // namespace cuda
}  // namespace dmattn
