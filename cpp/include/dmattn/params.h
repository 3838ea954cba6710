// Plain descriptions of the tensors and flags of one attention call. The bindings fill these from
// DLPack tensors; the kernels never see Python or PyTorch.
#pragma once

#include <stdint.h>

#include "dmattn/half.h"

namespace dmattn {

enum class DType : uint8_t { f16, bf16, f32, f64, boolean, i64 };

// A strided view; strides are in elements and may be zero or negative.
struct View {
  void* data = nullptr;
  DType dtype = DType::f32;
  int ndim = 0;
  int64_t size[4] = {1, 1, 1, 1};
  int64_t stride[4] = {0, 0, 0, 0};

  bool present() const { return data != nullptr; }
  int64_t offset(int64_t i0, int64_t i1, int64_t i2, int64_t i3) const {
    return i0 * stride[0] + i1 * stride[1] + i2 * stride[2] + i3 * stride[3];
  }
};

// Shapes and flags shared by every entry point. bias and mask are 4-D (size-1 dims have stride 0)
// or absent. window 0 means no top-w selection.
struct AttnProblem {
  int64_t B = 1, Q = 1, K = 1, H = 1, Hkv = 1, D = 1;
  View q, k, v;
  View bias, mask;
  double scale = 1.0;
  double softcap = 0.0;
  bool causal = false;
  bool scope_global = false;
  int64_t window = 0;
  int num_threads = 0;

  int64_t offset() const { return K - Q; }
  int64_t group() const { return H / Hkv; }
};

struct FwdArgs {
  View out;  // (B, Q, H, D), q's dtype
  View lse;  // (B, H, Q), float32
};

// Any of dq, dk, dv, dbias may be absent; it is then not computed.
struct BwdArgs {
  View out, dout, lse;
  View dq, dk, dv;
  View dbias;  // contiguous, the bias's shape and dtype
};

// Reads one floating element as double (exact for every floating dtype).
static inline double load_double(const void* base, DType dtype, int64_t offset) {
  switch (dtype) {
    case DType::f16: return half_to_float(static_cast<const uint16_t*>(base)[offset]);
    case DType::bf16: return bf16_to_float(static_cast<const uint16_t*>(base)[offset]);
    case DType::f32: return static_cast<const float*>(base)[offset];
    case DType::f64: return static_cast<const double*>(base)[offset];
    default: return 0.0;
  }
}

}  // namespace dmattn
