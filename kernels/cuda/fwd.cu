// Dispatch of the CUDA forward to its compiled variants (the kernels themselves are in
// fwd_kernel.cuh and fwd_sm90_kernel.cuh, instantiated per head dim in translation units generated
// by CMake).
#include <atomic>
#include <stdexcept>

#include "check.h"
#include "fwd.h"
#include "fwd_split.h"
#include "launch.h"
#include "switch.h"
#include "tiles.h"

namespace dmattn {
namespace cuda {

namespace {

// On by default since its LIST calls load compact tile images (FwdParams::compact): H200, bf16, H 32,
// H_kv 8, D 128, w 2048, causal, kernels only (selection apart): T32k 1.42 ms against the sm_80
// kernel's 3.07, T8k 0.39 against 0.88 (benchmarks/results/cuda-fwd-compact-h200-2026-11-29.log).
// Without the copy (row gathers in its producer) it was slower than sm_80 (T32k 3.18 against 2.74).
// Off sends every call to the sm_80 kernel (A/B measurements, a fallback).
std::atomic<bool> g_sm90_enabled{true};

}  // namespace

// Compute capability (10 * major + minor) per device ordinal, 0 until first read: the dispatch (and
// launch.h's PDL check) runs on every call, and a device attribute query is a driver call.
// Concurrent first reads store the same value, so relaxed atomics suffice.
namespace {
constexpr int kMaxDevices = 64;
std::atomic<int> g_capability[kMaxDevices];
}  // namespace

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

namespace {
std::atomic<bool> g_pdl_enabled{true};
}  // namespace

void set_pdl_enabled(bool enabled) { g_pdl_enabled.store(enabled, std::memory_order_relaxed); }
bool pdl_enabled() { return g_pdl_enabled.load(std::memory_order_relaxed); }

bool pdl_available() {
  if (!pdl_enabled()) return false;
  int device = -1;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  return device_capability(device) >= 90;
}

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

int fwd_compact_heads(int H, int H_kv, int sel_heads, int bias_heads, int mask_heads) {
  // Query heads that share a selection row and a kv head: per query head when the selection is,
  // else per kv head (selection heads are 1, H_kv or H). A compact head carries one bias value per
  // key, so the bias and mask heads must not split it either: query head h reads selection row,
  // bias head and mask head h * n / H, constant over a compact head's H / ch query heads when n
  // divides ch.
  const int ch = sel_heads == H ? H : H_kv;
  const auto splits_not = [ch](int n) { return n > 0 && ch % n == 0; };
  if (H <= 0 || H_kv <= 0 || H % H_kv != 0) return 0;
  return splits_not(sel_heads) && splits_not(bias_heads) && splits_not(mask_heads) ? ch : 0;
}

int64_t fwd_compact_bytes(int head_dim, int64_t B, int H, int H_kv, int sel_heads, int bias_heads, int mask_heads,
                          int64_t list_len, bool per_query) {
  if (B <= 0 || list_len <= 0 || !fwd_uses_sm90(head_dim, per_query)) return 0;
  const int ch = fwd_compact_heads(H, H_kv, sel_heads, bias_heads, mask_heads);
  if (ch == 0) return 0;
  const int block_n = fwd_sm90_tile(head_dim).block_n;
  return B * ch * ((list_len + block_n - 1) / block_n) * fwd_sm90_compact_tile_bytes(head_dim);
}

int fwd_block_m(int head_dim) {
  int block_m = 0;
  head_dim_switch(head_dim, [&](auto hd) { block_m = fwd_tile(decltype(hd)::value).block_m; });
  return block_m;
}

}  // namespace cuda
}  // namespace dmattn
