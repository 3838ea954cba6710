// The CUDA module `dmattn._cuda`: build information, the global-scope key selection on the GPU
// (compiled from the same selection header as the CPU core, cpp/include/dmattn/selection.h), and
// the bindings of the attention forward (fwd.h; kernels in fwd_kernel.cuh and, for sm_90a,
// fwd_sm90_kernel.cuh) and backward (bwd.h;
// kernels in bwd_kernel.cuh).
//
// `topk_indices` here is one thread per broadcast row with a running top-w heap: exact and simple,
// for any broadcast row (per-query ones included). The attention backend's LIST metadata comes from
// the parallel radix select of select.h (`select_lists`, `list_counts`); both take the tie rule and
// threshold logic from the shared header.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>

#include "check.h"
#include "dmattn/selection.h"
#include "select.h"
#include "visible.h"
#include "bwd.h"
#include "fwd.h"
#include "fwd_split.h"
#include "launch.h"
#include "switch.h"

namespace nb = nanobind;

namespace {

using dmattn::sel::Key;

enum class BiasType : int { f16, bf16, f32, f64 };

struct RowsParams {
  const void* bias;
  BiasType bias_type;
  int64_t bias_size[3];    // (Bb, Hb, Qb)
  int64_t bias_stride[4];  // elements; 0 on broadcast dims
  const bool* mask;        // nullptr: every key allowed
  int64_t mask_size[3];
  int64_t mask_stride[4];
  int64_t rows[3];  // (Bs, Hs, Qs): the broadcast of bias and mask
  int64_t K;
  int window;
  Key* heap;      // rows * window entries of workspace
  int64_t* out;   // (rows, min(window, K)), contiguous
  int64_t out_w;  // min(window, K)
};

__device__ double load_value(const void* p, BiasType t, int64_t i) {
  switch (t) {
    case BiasType::f16: return __half2float(static_cast<const __half*>(p)[i]);
    case BiasType::bf16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case BiasType::f32: return static_cast<const float*>(p)[i];
    default: return static_cast<const double*>(p)[i];
  }
}

// Row-major (b, h, q) of the broadcast rows -> offset in a tensor with its own (maybe size-1) dims;
// head h of H_s rows reads head h * heads / H_s, as everywhere in dmattn.
__device__ int64_t row_offset(int64_t b, int64_t h, int64_t q, const int64_t* size, const int64_t* stride,
                              const int64_t* rows) {
  return (size[0] == 1 ? 0 : b) * stride[0] + (h * size[1] / rows[1]) * stride[1] +
         (size[2] == 1 ? 0 : q) * stride[2];
}

// In-place heapsort of n indices, ascending (no recursion, no allocation).
__device__ void sort_indices(int64_t* a, int64_t n) {
  auto sift = [a](int64_t i, int64_t end) {
    const int64_t moving = a[i];
    for (int64_t child = 2 * i + 1; child < end; child = 2 * i + 1) {
      if (child + 1 < end && a[child + 1] > a[child]) ++child;
      if (a[child] <= moving) break;
      a[i] = a[child];
      i = child;
    }
    a[i] = moving;
  };
  for (int64_t i = n / 2 - 1; i >= 0; --i) sift(i, n);
  for (int64_t end = n - 1; end > 0; --end) {
    const int64_t top = a[0];
    a[0] = a[end];
    a[end] = top;
    sift(0, end);
  }
}

__global__ void topk_rows_kernel(RowsParams p) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_rows = p.rows[0] * p.rows[1] * p.rows[2];
  if (row >= n_rows) return;
  const int64_t q = row % p.rows[2], h = row / p.rows[2] % p.rows[1], b = row / (p.rows[2] * p.rows[1]);
  const int64_t bias_row = row_offset(b, h, q, p.bias_size, p.bias_stride, p.rows);
  const int64_t mask_row = p.mask ? row_offset(b, h, q, p.mask_size, p.mask_stride, p.rows) : 0;

  dmattn::sel::TopW top = dmattn::sel::topw_make(p.heap + row * p.window, p.window);
  for (int64_t j = 0; j < p.K; ++j) {
    if (p.mask && !p.mask[mask_row + j * p.mask_stride[3]]) continue;
    dmattn::sel::topw_push(top, Key{load_value(p.bias, p.bias_type, bias_row + j * p.bias_stride[3]), j});
  }
  int64_t* out = p.out + row * p.out_w;
  for (int i = 0; i < top.size; ++i) out[i] = top.heap[i].index;
  sort_indices(out, top.size);
  for (int64_t i = top.size; i < p.out_w; ++i) out[i] = -1;
}

using CudaArray = nb::ndarray<nb::device::cuda, nb::c_contig>;
using AnyCuda = nb::ndarray<nb::device::cuda>;

BiasType bias_type(const nb::dlpack::dtype& t) {
  if (t.code == uint8_t(nb::dlpack::dtype_code::Float) && t.bits == 16) return BiasType::f16;
  if (t.code == uint8_t(nb::dlpack::dtype_code::Bfloat) && t.bits == 16) return BiasType::bf16;
  if (t.code == uint8_t(nb::dlpack::dtype_code::Float) && t.bits == 32) return BiasType::f32;
  if (t.code == uint8_t(nb::dlpack::dtype_code::Float) && t.bits == 64) return BiasType::f64;
  throw std::invalid_argument("bias must be float16, bfloat16, float32 or float64");
}

void topk_indices(AnyCuda bias, std::optional<AnyCuda> mask, CudaArray out, CudaArray workspace, int window,
                  uintptr_t stream) {
  if (bias.ndim() != 4 || out.ndim() != 4) throw std::invalid_argument("bias and out must be 4-D");
  if (window < 1) throw std::invalid_argument("window must be >= 1");
  RowsParams p{};
  p.bias = bias.data();
  p.bias_type = bias_type(bias.dtype());
  p.K = bias.shape(3);
  for (int d = 0; d < 4; ++d) p.bias_stride[d] = bias.shape(d) == 1 ? 0 : bias.stride(d);
  for (int d = 0; d < 3; ++d) p.bias_size[d] = bias.shape(d);
  if (mask) {
    if (mask->ndim() != 4 || mask->shape(3) != p.K || mask->dtype() != nb::dtype<bool>())
      throw std::invalid_argument("mask must be a 4-D bool tensor with bias's key count");
    p.mask = static_cast<const bool*>(mask->data());
    for (int d = 0; d < 4; ++d) p.mask_stride[d] = mask->shape(d) == 1 ? 0 : mask->stride(d);
    for (int d = 0; d < 3; ++d) p.mask_size[d] = mask->shape(d);
  }
  for (int d = 0; d < 3; ++d) {
    p.rows[d] = out.shape(d);
    const bool bias_ok = p.bias_size[d] == 1 || p.bias_size[d] == p.rows[d] ||
                         (d == 1 && p.rows[d] % p.bias_size[d] == 0);
    const bool mask_ok = !mask || p.mask_size[d] == 1 || p.mask_size[d] == p.rows[d] ||
                         (d == 1 && p.rows[d] % p.mask_size[d] == 0);
    if (!bias_ok || !mask_ok) throw std::invalid_argument("out rows do not match the broadcast of bias and mask");
  }
  p.window = window;
  p.out = static_cast<int64_t*>(out.data());
  p.out_w = out.shape(3);
  if (p.out_w != (window < p.K ? window : p.K)) throw std::invalid_argument("out's last dim must be min(window, K)");
  const int64_t n_rows = p.rows[0] * p.rows[1] * p.rows[2];
  if (workspace.nbytes() < size_t(n_rows) * size_t(window) * sizeof(Key))
    throw std::invalid_argument("workspace too small: needs rows * window * 16 bytes");
  p.heap = static_cast<Key*>(workspace.data());
  if (n_rows == 0) return;
  const int threads = 128;
  const unsigned blocks = unsigned((n_rows + threads - 1) / threads);
  topk_rows_kernel<<<blocks, threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(p);
  dmattn::cuda::check_cuda(cudaGetLastError(), "topk_rows_kernel launch");
}

// ---------------------------------------------------------------- attention forward and shared checks

using dmattn::DType;
using dmattn::cuda::BwdParams;
using dmattn::cuda::FwdParams;

std::string shape_str(const AnyCuda& t) {
  std::string s = "(";
  for (size_t d = 0; d < t.ndim(); ++d) s += (d ? ", " : "") + std::to_string(t.shape(d));
  return s + ")";
}

// Whether a tensor is laid out contiguously (size-1 dims may have any stride).
bool is_contiguous(const AnyCuda& t) {
  int64_t expected = 1;
  for (int d = int(t.ndim()) - 1; d >= 0; --d) {
    if (t.shape(d) > 1 && t.stride(d) != expected) return false;
    expected *= int64_t(t.shape(d));
  }
  return true;
}

DType qkv_dtype(const nb::dlpack::dtype& t) {
  if (t.code == uint8_t(nb::dlpack::dtype_code::Float) && t.bits == 16) return DType::f16;
  if (t.code == uint8_t(nb::dlpack::dtype_code::Bfloat) && t.bits == 16) return DType::bf16;
  throw nb::type_error("query must be float16 or bfloat16 for the CUDA forward");
}

DType float_dtype(const nb::dlpack::dtype& t) {
  switch (bias_type(t)) {
    case BiasType::f16: return DType::f16;
    case BiasType::bf16: return DType::bf16;
    case BiasType::f32: return DType::f32;
    default: return DType::f64;
  }
}

void expect_shape(const AnyCuda& t, const char* name, std::initializer_list<int64_t> shape) {
  bool ok = t.ndim() == shape.size();
  size_t d = 0;
  for (int64_t s : shape) ok = ok && d < t.ndim() && int64_t(t.shape(d++)) == s;
  if (!ok) {
    std::string want = "(";
    d = 0;
    for (int64_t s : shape) want += (d++ ? ", " : "") + std::to_string(s);
    throw std::invalid_argument(std::string(name) + " must have shape " + want + "), got " + shape_str(t));
  }
}

// The data of `t`, checked to be a contiguous T (int32 or int64) tensor of `shape` on `device`.
template <class T>
T* int_buffer(const AnyCuda& t, const char* name, int device, std::initializer_list<int64_t> shape) {
  if (t.dtype() != nb::dtype<T>())
    throw nb::type_error((std::string(name) + " must be " + (sizeof(T) == 8 ? "int64" : "int32")).c_str());
  if (t.device_id() != device) throw std::invalid_argument(std::string(name) + " must be on the same CUDA device");
  expect_shape(t, name, shape);
  if (!is_contiguous(t)) throw std::invalid_argument(std::string(name) + " must be contiguous");
  return static_cast<T*>(t.data());
}

// 16-byte rows for cp.async and vector stores: contiguous head dim, data and every stride of a
// dimension larger than 1 a multiple of 16 bytes.
void rows_aligned(const AnyCuda& t, const char* name, int64_t out[3]) {
  const bool base_ok = reinterpret_cast<uintptr_t>(t.data()) % 16 == 0;
  bool ok = base_ok && (t.stride(3) == 1 || t.shape(3) == 1);
  for (int d = 0; d < 3; ++d) {  // batch, row, head
    out[d] = t.shape(d) == 1 ? 0 : t.stride(d);
    ok = ok && out[d] % 8 == 0;
  }
  if (!ok) {
    throw std::invalid_argument(std::string(name) +
                                " needs a contiguous last dim, 16-byte aligned data and strides that are "
                                "multiples of 8 elements (call .contiguous())");
  }
}

// A bias or mask of shape (B|1, H|H_kv|1, Q|1, K): strides with 0 on size-1 dims, and its heads.
void broadcast_view(const AnyCuda& t, const char* name, int64_t B, int64_t H, int64_t H_kv, int64_t Q, int64_t K,
                    int64_t stride[4], int* heads) {
  if (t.ndim() != 4) throw std::invalid_argument(std::string(name) + " must be 4-D (B|1, H|H_kv|1, Q|1, K), got " + shape_str(t));
  const int64_t s0 = t.shape(0), s1 = t.shape(1), s2 = t.shape(2), s3 = t.shape(3);
  if ((s0 != 1 && s0 != B) || (s1 != 1 && s1 != H && s1 != H_kv) || (s2 != 1 && s2 != Q) || s3 != K) {
    throw std::invalid_argument(std::string(name) + " must broadcast as (B|1, H|H_kv|1, Q|1, K) = (" +
                                std::to_string(B) + "|1, " + std::to_string(H) + "|" + std::to_string(H_kv) +
                                "|1, " + std::to_string(Q) + "|1, " + std::to_string(K) + "), got " + shape_str(t));
  }
  for (int d = 0; d < 4; ++d) stride[d] = t.shape(d) == 1 ? 0 : t.stride(d);
  *heads = int(s1);
}

// Checks the arguments the forward and the backward share and fills their part of the params:
// q/k/v, bias/mask broadcast, out (B, Q, H, D) and lse (B, H, Q) float32, the LIST metadata with
// counts per query block of `block_m_of(D)` rows (with `death`, the PREFIX metadata: per-block
// lists and death positions), sizes and flags.
void fill_common(FwdParams& p, const AnyCuda& q, const AnyCuda& k, const AnyCuda& v,
                 const std::optional<AnyCuda>& bias, const std::optional<AnyCuda>& mask, const AnyCuda& out,
                 const AnyCuda& lse, const std::optional<AnyCuda>& idx, const std::optional<AnyCuda>& counts,
                 double scale, double softcap, bool causal, int (*block_m_of)(int),
                 const std::optional<AnyCuda>& death = std::nullopt) {
  if (q.ndim() != 4) throw std::invalid_argument("query must be 4-D (B, Q, H, D), got " + shape_str(q));
  p.dtype = qkv_dtype(q.dtype());
  const int64_t B = q.shape(0), Q = q.shape(1), H = q.shape(2), D = q.shape(3);
  if (k.ndim() != 4) throw std::invalid_argument("key must be 4-D (B, K, H_kv, D), got " + shape_str(k));
  const int64_t K = k.shape(1), H_kv = k.shape(2);
  expect_shape(k, "key", {B, K, H_kv, D});
  expect_shape(v, "value", {B, K, H_kv, D});
  expect_shape(out, "out", {B, Q, H, D});
  expect_shape(lse, "lse", {B, H, Q});
  if (k.dtype() != q.dtype() || v.dtype() != q.dtype() || out.dtype() != q.dtype())
    throw nb::type_error("key, value and out must have query's dtype");
  if (lse.dtype() != nb::dtype<float>()) throw nb::type_error("lse must be float32");
  const int device = q.device_id();
  for (const AnyCuda* t : {&k, &v, &out, &lse}) {
    if (t->device_id() != device) throw std::invalid_argument("every tensor must be on query's CUDA device");
  }
  if (H_kv < 1 || H % H_kv != 0) throw std::invalid_argument("query heads H must be a multiple of key/value heads H_kv");
  if (B > 65535 || H > 65535) throw std::invalid_argument("B and H must be at most 65535 (CUDA grid limits)");
  if (Q >= (int64_t(1) << 31) - 256 || K >= (int64_t(1) << 31) - 256)
    throw std::invalid_argument("Q and K must be below 2^31 - 256");
  if (!(scale == scale) || scale - scale != 0) throw std::invalid_argument("scale must be finite");
  if (!(softcap >= 0) || softcap - softcap != 0) throw std::invalid_argument("softcap must be finite and >= 0 (0: none)");
  const int block_m = block_m_of(int(D));  // rejects head dims that are not compiled

  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.data();
  p.lse = static_cast<float*>(lse.data());
  rows_aligned(q, "query", p.q_stride);
  rows_aligned(k, "key", p.k_stride);
  rows_aligned(v, "value", p.v_stride);
  rows_aligned(out, "out", p.out_stride);
  if (lse.stride(2) != 1 && Q > 1) throw std::invalid_argument("lse must have contiguous rows (last dim stride 1)");
  p.lse_stride[0] = lse.stride(0);
  p.lse_stride[1] = lse.stride(1);

  if (bias) {
    if (bias->device_id() != device) throw std::invalid_argument("bias must be on query's CUDA device");
    p.bias = bias->data();
    p.bias_dtype = float_dtype(bias->dtype());
    broadcast_view(*bias, "bias", B, H, H_kv, Q, K, p.bias_stride, &p.bias_heads);
  }
  if (mask) {
    if (mask->device_id() != device) throw std::invalid_argument("mask must be on query's CUDA device");
    if (mask->dtype() != nb::dtype<bool>()) throw nb::type_error("mask must be a bool tensor");
    p.mask = static_cast<const uint8_t*>(mask->data());
    broadcast_view(*mask, "mask", B, H, H_kv, Q, K, p.mask_stride, &p.mask_heads);
  }

  if (idx.has_value() != counts.has_value()) throw std::invalid_argument("idx and counts come together (LIST path)");
  if (death && !idx) throw std::invalid_argument("death comes with idx and counts (PREFIX path)");
  if (idx) {
    const size_t dims = death ? 4 : 3;
    for (const AnyCuda* t : {&*idx, &*counts}) {
      if (t->device_id() != device) throw std::invalid_argument("idx and counts must be on query's CUDA device");
      if (t->dtype() != nb::dtype<int32_t>()) throw nb::type_error("idx and counts must be int32");
      if (t->ndim() != dims)
        throw std::invalid_argument(death ? "idx and counts must be 4-D (B_s, H_s, query blocks, ...) with death"
                                          : "idx and counts must be 3-D (B_s, H_s, ...)");
      if (!is_contiguous(*t)) throw std::invalid_argument("idx and counts must be contiguous");
    }
    const int64_t B_s = idx->shape(0), H_s = idx->shape(1), W = idx->shape(dims - 1);
    if ((B_s != 1 && B_s != B) || H_s < 1 || H % H_s != 0)
      throw std::invalid_argument("idx must be (B|1, H_s, ...) with H a multiple of H_s, got " + shape_str(*idx));
    if (W >= (int64_t(1) << 31)) throw std::invalid_argument("idx lists must be shorter than 2^31");
    const int64_t n_blocks = (Q + block_m - 1) / block_m;
    if (death) {
      if (!causal) throw std::invalid_argument("the PREFIX path (death) is causal");
      if (p.bias_stride[2] != 0 || mask)
        throw std::invalid_argument("the PREFIX path (death) takes a query-broadcast bias and no mask (the mask is "
                                    "folded into death)");
      expect_shape(*idx, "idx", {B_s, H_s, n_blocks, W});
      expect_shape(*counts, "counts", {B_s, H_s, n_blocks, 2});
      p.death = int_buffer<int32_t>(*death, "death", device, {B_s, H_s, K});
    } else {
      expect_shape(*counts, "counts", {B_s, H_s, n_blocks});
    }
    p.idx = static_cast<const int32_t*>(idx->data());
    p.counts = static_cast<const int32_t*>(counts->data());
    p.list_len = W;
    p.sel_heads = int(H_s);
    p.sel_batched = B_s > 1;
    p.n_query_blocks = int(n_blocks);
  }

  p.B = int(B);
  p.Q = int(Q);
  p.K = int(K);
  p.H = int(H);
  p.H_kv = int(H_kv);
  p.D = int(D);
  p.scale = float(scale);
  p.softcap = float(softcap);
  p.causal = causal;
}

// The current device must be the tensors' one, with mma.sync bf16 and cp.async (sm_80+).
void check_device(int device, const char* what) {
  int current = -1, major = 0;
  dmattn::cuda::check_cuda(cudaGetDevice(&current), "cudaGetDevice");
  if (current != device)
    throw std::invalid_argument("the current CUDA device (" + std::to_string(current) + ") is not query's (" +
                                std::to_string(device) + ")");
  dmattn::cuda::check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
                           "cudaDeviceGetAttribute(ComputeCapabilityMajor)");
  if (major < 8)
    throw std::invalid_argument(std::string("the CUDA ") + what +
                                " needs compute capability >= 8.0 (mma.sync bf16, cp.async)");
}

// The sm_90a kernels' compact LIST copy (FwdParams::compact) in `workspace`, where the call takes
// those kernels (fwd_compact_bytes > 0: a LIST call, no PREFIX, compute capability 9.0, ...); else
// the workspace is ignored.
void attach_compact(FwdParams& p, const AnyCuda& workspace, int device) {
  if (p.idx == nullptr || p.death != nullptr) return;
  const int bias_heads = p.bias != nullptr ? p.bias_heads : 1, mask_heads = p.mask != nullptr ? p.mask_heads : 1;
  const int64_t need = dmattn::cuda::fwd_compact_bytes(p.D, p.B, p.H, p.H_kv, p.sel_heads, bias_heads, mask_heads,
                                                       p.list_len, dmattn::cuda::fwd_per_query(p));
  if (need <= 0) return;
  if (workspace.dtype() != nb::dtype<float>() || workspace.ndim() != 1 || !is_contiguous(workspace))
    throw nb::type_error("workspace must be a contiguous 1-D float32 tensor");
  if (workspace.device_id() != device) throw std::invalid_argument("workspace must be on query's CUDA device");
  if (int64_t(workspace.shape(0)) * 4 < need || reinterpret_cast<uintptr_t>(workspace.data()) % 16 != 0)
    throw std::invalid_argument("workspace must hold at least " + std::to_string(need) +
                                " bytes (fwd_compact_bytes) from a 16-byte aligned address, got " +
                                std::to_string(int64_t(workspace.shape(0)) * 4));
  p.compact = workspace.data();
  p.compact_heads = dmattn::cuda::fwd_compact_heads(p.H, p.H_kv, p.sel_heads, bias_heads, mask_heads);
}

// Returns the splits the split forward ran with (0: the one-block-per-query-block kernels).
int fwd(AnyCuda q, AnyCuda k, AnyCuda v, std::optional<AnyCuda> bias, std::optional<AnyCuda> mask, AnyCuda out,
        AnyCuda lse, std::optional<AnyCuda> idx, std::optional<AnyCuda> counts, double scale, double softcap,
        bool causal, uintptr_t stream, int splits, std::optional<AnyCuda> workspace, std::optional<AnyCuda> death) {
  FwdParams p;
  fill_common(p, q, k, v, bias, mask, out, lse, idx, counts, scale, softcap, causal, &dmattn::cuda::fwd_block_m,
              death);
  if (splits != 0 && death) throw std::invalid_argument("the split forward (splits > 0) has no PREFIX path (death)");
  if (splits != 0) {
    if (splits < 0 || splits > dmattn::cuda::kFwdSplitMaxSplits)
      throw std::invalid_argument("splits must be 0 (no split) or 1.." +
                                  std::to_string(dmattn::cuda::kFwdSplitMaxSplits) + ", got " + std::to_string(splits));
    if (p.Q > dmattn::cuda::kFwdSplitMaxQ)
      throw std::invalid_argument("the split forward (splits > 0) takes Q <= " +
                                  std::to_string(dmattn::cuda::kFwdSplitMaxQ) + ", got Q=" + std::to_string(p.Q));
    if (!workspace) throw std::invalid_argument("splits > 0 needs a float32 workspace");
    const int64_t need = dmattn::cuda::fwd_split_workspace(p.B, p.Q, p.H, p.D, splits);
    if (workspace->dtype() != nb::dtype<float>() || workspace->ndim() != 1 || !is_contiguous(*workspace))
      throw nb::type_error("workspace must be a contiguous 1-D float32 tensor");
    if (workspace->device_id() != q.device_id())
      throw std::invalid_argument("workspace must be on query's CUDA device");
    if (int64_t(workspace->shape(0)) < need || reinterpret_cast<uintptr_t>(workspace->data()) % 16 != 0)
      throw std::invalid_argument("workspace must hold at least " + std::to_string(need) +
                                  " float32 (splits * B * H * Q * (D + 2)) from a 16-byte aligned address, got " +
                                  std::to_string(workspace->shape(0)));
    p.splits = splits;
    p.split_workspace = static_cast<float*>(workspace->data());
  } else if (workspace) {
    attach_compact(p, *workspace, q.device_id());
  }
  if (p.B == 0 || p.Q == 0 || p.H == 0) return 0;
  check_device(q.device_id(), "forward");
  return dmattn::cuda::fwd(p, reinterpret_cast<cudaStream_t>(stream));
}

int fwd_split_count(int64_t B, int64_t Q, int64_t H, int64_t H_kv, int head_dim, int64_t n_keys, int device) {
  return dmattn::cuda::fwd_split_count_on(device, B, Q, H, H_kv, head_dim, n_keys);
}

// ---------------------------------------------------------------- attention backward

// A float32 tensor of exactly `shape`, contiguous, on `device`.
void expect_f32_contiguous(const AnyCuda& t, const char* name, std::initializer_list<int64_t> shape, int device) {
  expect_shape(t, name, shape);
  if (t.dtype() != nb::dtype<float>()) throw nb::type_error((std::string(name) + " must be float32").c_str());
  if (t.device_id() != device) throw std::invalid_argument(std::string(name) + " must be on query's CUDA device");
  int64_t expected = 1;
  for (int d = int(t.ndim()) - 1; d >= 0; --d) {
    if (t.shape(d) > 1 && t.stride(d) != expected)
      throw std::invalid_argument(std::string(name) + " must be contiguous");
    expected *= int64_t(t.shape(d));
  }
}

void bwd(AnyCuda q, AnyCuda k, AnyCuda v, AnyCuda out, AnyCuda lse, AnyCuda dout, std::optional<AnyCuda> bias,
         std::optional<AnyCuda> mask, std::optional<AnyCuda> idx, std::optional<AnyCuda> counts, AnyCuda delta,
         std::optional<AnyCuda> dq, std::optional<AnyCuda> dk, std::optional<AnyCuda> dv,
         std::optional<AnyCuda> dbias_keys, std::optional<AnyCuda> ds, double scale, double softcap, bool causal,
         uintptr_t stream, std::optional<AnyCuda> death, std::optional<AnyCuda> dkdv_keys,
         std::optional<AnyCuda> dkdv_count, std::optional<AnyCuda> dkdv_part, std::optional<AnyCuda> workspace) {
  BwdParams p;
  fill_common(p, q, k, v, bias, mask, out, lse, idx, counts, scale, softcap, causal, &dmattn::cuda::bwd_dq_block_m,
              death);
  if (death.has_value() != (dkdv_keys.has_value() && dkdv_count.has_value()) ||
      dkdv_keys.has_value() != dkdv_count.has_value())
    throw std::invalid_argument("death, dkdv_keys and dkdv_count come together (PREFIX path)");
  const int64_t B = p.B, Q = p.Q, K = p.K, H = p.H, H_kv = p.H_kv, D = p.D;
  const int device = q.device_id();
  if (death) {
    const int64_t B_s = idx->shape(0), H_s = idx->shape(1);
    p.dkdv_keys = int_buffer<int32_t>(*dkdv_keys, "dkdv_keys", device, {B_s, H_s, K});
    p.dkdv_count = int_buffer<int32_t>(*dkdv_count, "dkdv_count", device, {B_s, H_s});
  }
  if (B * H > 65535) throw std::invalid_argument("B * H must be at most 65535 (CUDA grid limit of the dk/dv kernel)");

  expect_shape(dout, "dout", {B, Q, H, D});
  if (dout.dtype() != q.dtype()) throw nb::type_error("dout must have query's dtype");
  if (dout.device_id() != device) throw std::invalid_argument("dout must be on query's CUDA device");
  p.dout = dout.data();
  rows_aligned(dout, "dout", p.dout_stride);
  expect_f32_contiguous(delta, "delta", {B, H, Q}, device);
  p.delta = static_cast<float*>(delta.data());

  if (dq) {
    expect_shape(*dq, "dq", {B, Q, H, D});
    if (dq->dtype() != q.dtype()) throw nb::type_error("dq must have query's dtype");
    if (dq->device_id() != device) throw std::invalid_argument("dq must be on query's CUDA device");
    p.dq = dq->data();
    rows_aligned(*dq, "dq", p.dq_stride);
  }

  // One list per query head of a group: per-head float32 partials, summed over the group by the caller.
  const bool per_head = idx && p.sel_heads > H_kv;
  p.dkdv_heads = per_head ? 1 : int(H / H_kv);
  if (dk.has_value() != dv.has_value()) throw std::invalid_argument("dk and dv come together");
  if (dk) {
    const int64_t heads_out = per_head ? H : H_kv;
    for (auto [t, name, stride] : {std::tuple{&*dk, "dk", p.dk_stride}, std::tuple{&*dv, "dv", p.dv_stride}}) {
      expect_shape(*t, name, {B, K, heads_out, D});
      if (t->device_id() != device) throw std::invalid_argument(std::string(name) + " must be on query's CUDA device");
      if (per_head && t->dtype() != nb::dtype<float>())
        throw nb::type_error((std::string(name) + " must be float32 (B, K, H, D) per-head partials when the lists "
                              "are per query head (idx has more heads than key/value)").c_str());
      if (!per_head && t->dtype() != q.dtype()) throw nb::type_error((std::string(name) + " must have query's dtype").c_str());
      if (t->stride(3) != 1 && D > 1) throw std::invalid_argument(std::string(name) + " needs a contiguous last dim");
      for (int d = 0; d < 3; ++d) stride[d] = t->stride(d);
    }
    p.dk = dk->data();
    p.dv = dv->data();
    p.dkdv_f32 = per_head;
  }
  if (dkdv_part) {  // one dk/dv program per query head, partials by list position (bwd_params.h)
    if (!idx || death || per_head || H == H_kv || !dk)
      throw std::invalid_argument("dkdv_part is for the LIST path with one list per kv head (or fewer), more query "
                                  "heads than kv heads, and dk/dv wanted");
    expect_f32_contiguous(*dkdv_part, "dkdv_part", {2, B, H, p.list_len, D}, device);
    p.dkdv_part = static_cast<float*>(dkdv_part->data());
    p.dkdv_heads = 1;
  }

  if (dbias_keys) {
    if (!bias || p.bias_stride[2] != 0)
      throw std::invalid_argument("dbias_keys is the dbias partial of a query-broadcast bias (B|1, H|H_kv|1, 1, K)");
    expect_f32_contiguous(*dbias_keys, "dbias_keys", {B, H, K}, device);
    p.dbias_keys = static_cast<float*>(dbias_keys->data());
  }
  if (ds) {
    if (!bias || p.bias_stride[2] == 0)
      throw std::invalid_argument("ds is the dbias buffer of a per-query bias (B|1, H|H_kv|1, Q, K) with Q > 1");
    expect_f32_contiguous(*ds, "ds", {B, H, Q, K}, device);
    p.ds = static_cast<float*>(ds->data());
  }

  // The compact copy for the sm_90a backward (bwd.cu); a per-query bias (ds) has none.
  if (workspace && p.ds == nullptr) attach_compact(p, *workspace, device);

  if (B == 0 || Q == 0 || H == 0) return;
  check_device(device, "backward");
  dmattn::cuda::bwd(p, reinterpret_cast<cudaStream_t>(stream));
}

// ---------------------------------------------------------------- LIST selection (select.h)

// The CUDA device a tensor lives on must be the current one (kernels launch there).
void expect_current_device(int device, const char* name) {
  int current = -1;
  dmattn::cuda::check_cuda(cudaGetDevice(&current), "cudaGetDevice");
  if (current != device)
    throw std::invalid_argument(std::string(name) + " is on CUDA device " + std::to_string(device) +
                                " but the current device is " + std::to_string(current));
}

int bias_bits(const nb::dlpack::dtype& t) {
  const bool is_float = t.code == uint8_t(nb::dlpack::dtype_code::Float) ||
                        t.code == uint8_t(nb::dlpack::dtype_code::Bfloat);
  if (!is_float || (t.bits != 16 && t.bits != 32 && t.bits != 64))
    throw nb::type_error("bias must be float16, bfloat16, float32 or float64");
  return t.bits;
}

// A query-broadcast selection input (B_s|1, heads, 1, K) whose heads divide H_s: its batch
// (0 when size 1), head and key strides, and its heads.
void selection_view(const AnyCuda& t, const char* name, int64_t B_s, int64_t H_s, int64_t K, int64_t stride[3],
                    int* heads) {
  if (t.ndim() != 4 || (t.shape(0) != 1 && int64_t(t.shape(0)) != B_s) || t.shape(1) < 1 ||
      H_s % int64_t(t.shape(1)) != 0 || t.shape(2) != 1 || int64_t(t.shape(3)) != K)
    throw std::invalid_argument(std::string(name) + " must be (" + std::to_string(B_s) + "|1, a divisor of " +
                                std::to_string(H_s) + ", 1, " + std::to_string(K) +
                                ") (query-broadcast, matching idx), got " + shape_str(t));
  stride[0] = t.shape(0) == 1 ? 0 : t.stride(0);
  stride[1] = t.shape(1) == 1 ? 0 : t.stride(1);
  stride[2] = t.stride(3);
  *heads = int(t.shape(1));
}

nb::tuple select_plan(int64_t rows, int64_t K, int bias_bits, int device, int64_t chunk) {
  if (rows < 0 || K < 0) throw std::invalid_argument("rows and K must be >= 0");
  const int sms = dmattn::cuda::device_sm_count(device);  // cached: a driver call otherwise
  const dmattn::cuda::SelectPlan plan = dmattn::cuda::select_plan(rows, K, bias_bits, sms, chunk);
  return nb::make_tuple(plan.chunk, plan.chunks, plan.workspace_bytes);
}

// Checks a query-broadcast bias and optional mask for a selection of B_s x H_s rows of their K
// keys and fills those fields of `p` (not idx, workspace, chunk); returns W = min(window, K).
int64_t fill_select(dmattn::cuda::SelectParams& p, const AnyCuda& bias, const std::optional<AnyCuda>& mask,
                    int64_t B_s, int64_t H_s, int64_t window) {
  p.bias_bits = bias_bits(bias.dtype());
  if (window < 1) throw std::invalid_argument("window must be >= 1, got " + std::to_string(window));
  if (bias.ndim() != 4) throw std::invalid_argument("bias must be 4-D (B|1, heads, 1, K), got " + shape_str(bias));
  const int64_t K = bias.shape(3);
  if (K >= (int64_t(1) << 31) - 1) throw std::invalid_argument("K must be below 2^31 - 1 (int32 key indices)");
  const int device = bias.device_id();
  selection_view(bias, "bias", B_s, H_s, K, p.bias_stride, &p.bias_heads);
  if (mask) {
    if (mask->dtype() != nb::dtype<bool>()) throw nb::type_error("mask must be a bool tensor");
    if (mask->device_id() != device) throw std::invalid_argument("mask must be on bias's CUDA device");
    selection_view(*mask, "mask", B_s, H_s, K, p.mask_stride, &p.mask_heads);
    p.mask = static_cast<const uint8_t*>(mask->data());
  }
  p.bias = bias.data();
  p.B_s = B_s;
  p.H_s = H_s;
  p.K = K;
  p.W = window < K ? window : K;
  return p.W;
}

void select_lists(AnyCuda bias, std::optional<AnyCuda> mask, AnyCuda idx, std::optional<AnyCuda> counts,
                  AnyCuda workspace, int64_t window, int64_t Q, int64_t block_m, bool causal, int64_t chunk,
                  uintptr_t stream) {
  if (idx.dtype() != nb::dtype<int32_t>()) throw nb::type_error("idx must be int32");
  if (idx.ndim() != 3 || !is_contiguous(idx))
    throw std::invalid_argument("idx must be a contiguous (B_s, H_s, min(window, K)) tensor, got " + shape_str(idx));
  const int64_t B_s = idx.shape(0), H_s = idx.shape(1);
  dmattn::cuda::SelectParams p;
  const int64_t W = fill_select(p, bias, mask, B_s, H_s, window);
  const int64_t K = p.K;
  if (int64_t(idx.shape(2)) != W)
    throw std::invalid_argument("idx must be a contiguous (B_s, H_s, min(window, K) = " + std::to_string(W) +
                                ") tensor, got " + shape_str(idx));
  const int device = bias.device_id();
  if (idx.device_id() != device) throw std::invalid_argument("idx must be on bias's CUDA device");
  if (block_m < 1) throw std::invalid_argument("block_m must be >= 1, got " + std::to_string(block_m));
  if (Q < 1) throw std::invalid_argument("Q must be >= 1, got " + std::to_string(Q));
  const int64_t n_blocks = (Q + block_m - 1) / block_m;
  if (counts) {
    if (counts->dtype() != nb::dtype<int32_t>()) throw nb::type_error("counts must be int32");
    if (counts->device_id() != device) throw std::invalid_argument("counts must be on bias's CUDA device");
    expect_shape(*counts, "counts", {B_s, H_s, n_blocks});
    if (!is_contiguous(*counts)) throw std::invalid_argument("counts must be contiguous");
  }
  if (workspace.device_id() != device) throw std::invalid_argument("workspace must be on bias's CUDA device");
  if (workspace.dtype() != nb::dtype<uint8_t>() || workspace.ndim() != 1 || !is_contiguous(workspace))
    throw nb::type_error("workspace must be a contiguous 1-D uint8 tensor");
  const int sms = dmattn::cuda::device_sm_count(device);  // cached: a driver call otherwise
  const dmattn::cuda::SelectPlan plan = dmattn::cuda::select_plan(B_s * H_s, K, p.bias_bits, sms, chunk);
  if (workspace.nbytes() < plan.workspace_bytes)
    throw std::invalid_argument("workspace must hold at least " + std::to_string(plan.workspace_bytes) +
                                " bytes (select_plan), got " + std::to_string(workspace.nbytes()));
  expect_current_device(device, "bias");

  p.idx = static_cast<int32_t*>(idx.data());
  p.workspace = workspace.data();
  p.chunk = plan.chunk;
  // One query block (decode, short calls): the compaction writes the counts itself, one launch
  // fewer. select_lists launches nothing for an empty selection, so list_counts writes those.
  const bool counts_with_list = counts && n_blocks == 1 && W > 0 && B_s * H_s > 0;
  if (counts_with_list) p.row_counts = static_cast<int32_t*>(counts->data());
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dmattn::cuda::select_lists(p, s);
  if (counts && !counts_with_list) {
    dmattn::cuda::CountsParams c;
    c.idx = p.idx;
    c.counts = static_cast<int32_t*>(counts->data());
    c.rows = B_s * H_s;
    c.W = W;
    c.K = K;
    c.Q = Q;
    c.block_m = block_m;
    c.n_blocks = n_blocks;
    c.causal = causal;
    dmattn::cuda::list_counts(c, s);
  }
}

// ---------------------------------------------------------------- decode: select + split forward

// The decode workspace (bytes from its start, each part 16-byte aligned): the lists (rows x W
// int32), the select's workspace, the split forward's float32 partials.
struct DecodeLayout {
  size_t select = 0, partials = 0, total = 0;
  int64_t chunk = 0;
};

DecodeLayout decode_layout(int64_t B, int64_t Q, int64_t H, int64_t D, int64_t rows, int64_t K, int64_t W,
                           int bias_bits, int splits, int device) {
  const dmattn::cuda::SelectPlan plan =
      dmattn::cuda::select_plan(rows, K, bias_bits, dmattn::cuda::device_sm_count(device), 0);
  DecodeLayout l;
  l.chunk = plan.chunk;
  l.select = dmattn::cuda::align16(size_t(rows) * size_t(W) * sizeof(int32_t));
  l.partials = l.select + dmattn::cuda::align16(plan.workspace_bytes);
  l.total = l.partials + size_t(dmattn::cuda::fwd_split_workspace(B, Q, H, int(D), splits)) * sizeof(float);
  return l;
}

// (splits, workspace bytes) of `decode` for these sizes on CUDA device `device`; splits 0 when the
// call should not take it (too many queries for the split forward, heads that do not divide).
nb::tuple decode_plan(int64_t B, int64_t Q, int64_t H, int64_t H_kv, int head_dim, int64_t B_s, int64_t H_s,
                      int64_t K, int64_t window, int bias_bits, int device) {
  if (B < 1 || Q < 1 || H < 1 || H_kv < 1 || B_s < 1 || H_s < 1 || K < 1 || window < 1 || H % H_s != 0 ||
      H % H_kv != 0 || (B_s != 1 && B_s != B))
    return nb::make_tuple(0, 0);
  const int64_t W = window < K ? window : K;
  const int splits = dmattn::cuda::fwd_split_count_on(device, B, Q, H, H_kv, head_dim, W);
  if (splits == 0) return nb::make_tuple(0, 0);
  const DecodeLayout l = decode_layout(B, Q, H, head_dim, B_s * H_s, K, W, bias_bits, splits, device);
  return nb::make_tuple(splits, l.total);
}

// A windowed call over a query-broadcast bias (and mask) with few queries, in one call and one
// chain of kernels: the radix select (select.h) into lists in the workspace, then the split forward
// over them and its merge (fwd_split.h), which overlap the kernels before them (launch.h). The same
// kernels and results as select_lists followed by fwd(..., splits) on the LIST path, with one
// workspace instead of four tensors and one binding call instead of two.
int decode(AnyCuda q, AnyCuda k, AnyCuda v, AnyCuda bias, std::optional<AnyCuda> mask, AnyCuda out, AnyCuda lse,
           AnyCuda workspace, int64_t window, double scale, double softcap, bool causal, int splits,
           uintptr_t stream) {
  FwdParams p;
  // The mask is folded into the lists, so the forward itself takes none.
  fill_common(p, q, k, v, bias, std::nullopt, out, lse, std::nullopt, std::nullopt, scale, softcap, causal,
              &dmattn::cuda::fwd_block_m);
  if (p.bias_stride[2] != 0) throw std::invalid_argument("decode takes a query-broadcast bias (B|1, heads, 1, K)");
  if (mask && mask->ndim() != 4) throw std::invalid_argument("mask must be 4-D (B|1, heads, 1, K), got " + shape_str(*mask));
  // The selection rows: the broadcast of bias and mask over batch and heads.
  int64_t B_s = bias.shape(0), H_s = bias.shape(1);
  if (mask) {
    B_s = std::max<int64_t>(B_s, mask->shape(0));
    H_s = std::max<int64_t>(H_s, mask->shape(1));
  }
  if (H_s < 1 || p.H % H_s != 0)
    throw std::invalid_argument("the selection heads (" + std::to_string(H_s) + ") must divide H = " +
                                std::to_string(p.H));
  dmattn::cuda::SelectParams sp;
  const int64_t W = fill_select(sp, bias, mask, B_s, H_s, window);
  if (W >= p.K) throw std::invalid_argument("decode needs window < K (a window that keeps every key is DENSE)");
  if (splits < 1 || splits > dmattn::cuda::kFwdSplitMaxSplits)
    throw std::invalid_argument("splits must be in 1.." + std::to_string(dmattn::cuda::kFwdSplitMaxSplits) + ", got " +
                                std::to_string(splits));
  if (p.Q > dmattn::cuda::kFwdSplitMaxQ)
    throw std::invalid_argument("decode takes Q <= " + std::to_string(dmattn::cuda::kFwdSplitMaxQ) + ", got Q=" +
                                std::to_string(p.Q));
  const int device = q.device_id();
  if (workspace.device_id() != device) throw std::invalid_argument("workspace must be on query's CUDA device");
  if (workspace.dtype() != nb::dtype<uint8_t>() || workspace.ndim() != 1 || !is_contiguous(workspace))
    throw nb::type_error("workspace must be a contiguous 1-D uint8 tensor");
  const DecodeLayout l = decode_layout(p.B, p.Q, p.H, p.D, B_s * H_s, p.K, W, sp.bias_bits, splits, device);
  if (workspace.nbytes() < l.total || reinterpret_cast<uintptr_t>(workspace.data()) % 16 != 0)
    throw std::invalid_argument("workspace must hold at least " + std::to_string(l.total) +
                                " bytes (decode_plan) from a 16-byte aligned address, got " +
                                std::to_string(workspace.nbytes()));
  if (p.B == 0 || p.Q == 0 || p.H == 0) return 0;
  check_device(device, "forward");

  char* base = static_cast<char*>(workspace.data());
  sp.idx = reinterpret_cast<int32_t*>(base);
  sp.workspace = base + l.select;
  sp.chunk = l.chunk;
  p.idx = sp.idx;
  p.list_len = W;
  p.sel_heads = int(H_s);
  p.sel_batched = B_s > 1;
  p.n_query_blocks = 1;  // the split kernel reads no counts (fwd_split_kernel.cuh)
  p.splits = splits;
  p.split_workspace = reinterpret_cast<float*>(base + l.partials);
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dmattn::cuda::select_lists(sp, s);
  // The select launched its first kernel without overlap, so q was complete before the chain began.
  return dmattn::cuda::fwd_split(p, s, /*inputs_ready=*/true);
}

void list_counts(AnyCuda idx, AnyCuda counts, int64_t K, int64_t Q, int64_t block_m, bool causal, uintptr_t stream) {
  if (idx.dtype() != nb::dtype<int32_t>()) throw nb::type_error("idx must be int32");
  if (counts.dtype() != nb::dtype<int32_t>()) throw nb::type_error("counts must be int32");
  if (idx.ndim() != 3 || !is_contiguous(idx))
    throw std::invalid_argument("idx must be a contiguous (B_s, H_s, W) tensor, got " + shape_str(idx));
  if (K < 0 || int64_t(idx.shape(2)) > K) throw std::invalid_argument("K must be >= idx's list length");
  if (block_m < 1) throw std::invalid_argument("block_m must be >= 1, got " + std::to_string(block_m));
  if (Q < 1) throw std::invalid_argument("Q must be >= 1, got " + std::to_string(Q));
  const int64_t B_s = idx.shape(0), H_s = idx.shape(1), n_blocks = (Q + block_m - 1) / block_m;
  expect_shape(counts, "counts", {B_s, H_s, n_blocks});
  if (!is_contiguous(counts)) throw std::invalid_argument("counts must be contiguous");
  if (counts.device_id() != idx.device_id()) throw std::invalid_argument("counts must be on idx's CUDA device");
  expect_current_device(idx.device_id(), "idx");
  dmattn::cuda::CountsParams c;
  c.idx = static_cast<const int32_t*>(idx.data());
  c.counts = static_cast<int32_t*>(counts.data());
  c.rows = B_s * H_s;
  c.W = idx.shape(2);
  c.K = K;
  c.Q = Q;
  c.block_m = block_m;
  c.n_blocks = n_blocks;
  c.causal = causal;
  dmattn::cuda::list_counts(c, reinterpret_cast<cudaStream_t>(stream));
}

// ---------------------------------------------------------------- visible-scope metadata (visible.h)

void visible_rank_keys(AnyCuda bias, std::optional<AnyCuda> mask, AnyCuda keys, uintptr_t stream) {
  dmattn::cuda::SelectParams p;
  p.bias_bits = bias_bits(bias.dtype());
  if (p.bias_bits == 64)
    throw nb::type_error("the visible-scope rank keys take a float16, bfloat16 or float32 bias, got float64");
  if (bias.ndim() != 4) throw std::invalid_argument("bias must be 4-D (B|1, heads, 1, K), got " + shape_str(bias));
  const int64_t K = bias.shape(3);
  if (K >= (int64_t(1) << 31) - 1) throw std::invalid_argument("K must be below 2^31 - 1 (int32 key indices)");
  if (keys.ndim() != 3) throw std::invalid_argument("keys must be (B_s, H_s, K), got " + shape_str(keys));
  const int64_t B_s = keys.shape(0), H_s = keys.shape(1);
  const int device = bias.device_id();
  int_buffer<int64_t>(keys, "keys", device, {B_s, H_s, K});
  selection_view(bias, "bias", B_s, H_s, K, p.bias_stride, &p.bias_heads);
  if (mask) {
    if (mask->dtype() != nb::dtype<bool>()) throw nb::type_error("mask must be a bool tensor");
    if (mask->device_id() != device) throw std::invalid_argument("mask must be on bias's CUDA device");
    selection_view(*mask, "mask", B_s, H_s, K, p.mask_stride, &p.mask_heads);
    p.mask = static_cast<const uint8_t*>(mask->data());
  }
  expect_current_device(device, "bias");
  p.bias = bias.data();
  p.B_s = B_s;
  p.H_s = H_s;
  p.K = K;
  dmattn::cuda::visible_rank_keys(p, static_cast<int64_t*>(keys.data()), reinterpret_cast<cudaStream_t>(stream));
}

void visible_death(AnyCuda sorted, AnyCuda x, AnyCuda rank, AnyCuda table, AnyCuda death, int64_t window,
                   int64_t bucket, uintptr_t stream) {
  if (sorted.ndim() != 2) throw std::invalid_argument("sorted must be (rows, K), got " + shape_str(sorted));
  const int64_t rows = sorted.shape(0), K = sorted.shape(1);
  const int device = sorted.device_id();
  if (window < 1) throw std::invalid_argument("window must be >= 1, got " + std::to_string(window));
  if (bucket < 32 || (bucket & (bucket - 1)) != 0)
    throw std::invalid_argument("bucket must be a power of two >= 32, got " + std::to_string(bucket));
  dmattn::cuda::DeathParams p;
  p.sorted = int_buffer<int64_t>(sorted, "sorted", device, {rows, K});
  p.x = int_buffer<int32_t>(x, "x", device, {rows, K});
  p.rank = int_buffer<int32_t>(rank, "rank", device, {rows, K});
  const int64_t nc = (K + dmattn::cuda::kVisibleRanks - 1) / dmattn::cuda::kVisibleRanks;
  p.table = int_buffer<int32_t>(table, "table", device, {rows, nc, (K + bucket - 1) / bucket + 1});
  p.death = int_buffer<int32_t>(death, "death", device, {rows, K});
  expect_current_device(device, "sorted");
  p.rows = rows;
  p.K = K;
  p.W = window;
  p.pos_bits = dmattn::cuda::visible_pos_bits(K);
  p.bucket = bucket;
  dmattn::cuda::visible_death(p, reinterpret_cast<cudaStream_t>(stream));
}

void visible_lists(AnyCuda death, AnyCuda ever, AnyCuda before, AnyCuda chunk_counts, AnyCuda idx, AnyCuda counts,
                   int64_t Q, int64_t block_m, uintptr_t stream) {
  if (death.ndim() != 2) throw std::invalid_argument("death must be (rows, K), got " + shape_str(death));
  const int64_t rows = death.shape(0), K = death.shape(1);
  const int device = death.device_id();
  if (Q < 1) throw std::invalid_argument("Q must be >= 1, got " + std::to_string(Q));
  if (block_m < 1) throw std::invalid_argument("block_m must be >= 1, got " + std::to_string(block_m));
  if (idx.ndim() != 3) throw std::invalid_argument("idx must be (rows, n_blocks, list_len), got " + shape_str(idx));
  const int64_t n_blocks = (Q + block_m - 1) / block_m, list_len = idx.shape(2);
  if (list_len < 1 || list_len > K) throw std::invalid_argument("idx's list length must be in [1, K]");
  dmattn::cuda::ListsParams p;
  p.death = int_buffer<int32_t>(death, "death", device, {rows, K});
  p.ever = int_buffer<int32_t>(ever, "ever", device, {rows, K});
  p.before = int_buffer<int32_t>(before, "before", device, {rows, K});
  const int64_t n_chunks = (K + dmattn::cuda::kVisibleChunk - 1) / dmattn::cuda::kVisibleChunk;
  p.chunk_counts = int_buffer<int32_t>(chunk_counts, "chunk_counts", device, {rows, n_chunks});
  p.idx = int_buffer<int32_t>(idx, "idx", device, {rows, n_blocks, list_len});
  p.counts = int_buffer<int32_t>(counts, "counts", device, {rows, n_blocks, 2});
  expect_current_device(device, "death");
  p.rows = rows;
  p.K = K;
  p.Q = Q;
  p.block_m = block_m;
  p.n_blocks = n_blocks;
  p.list_len = list_len;
  dmattn::cuda::visible_lists(p, reinterpret_cast<cudaStream_t>(stream));
}

nb::dict info() {
  nb::dict d;
  d["cuda_runtime"] = CUDART_VERSION;
  d["archs"] = std::string(DMATTN_CUDA_ARCHS_STRING);
  int count = 0;
  d["device_count"] = cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
  d["fwd_head_dims"] = std::string(dmattn::cuda::compiled_head_dims());
  d["fwd_sm90a"] = dmattn::cuda::fwd_sm90_compiled();
  d["fwd_sm90_head_dims"] = std::string(dmattn::cuda::fwd_sm90_head_dims());
  d["bwd_head_dims"] = std::string(dmattn::cuda::compiled_head_dims());
  return d;
}

}  // namespace

NB_MODULE(_cuda, m) {
  m.doc() = "dmattn CUDA kernels (torch-free; tensors cross as DLPack, the stream as an integer)";
  m.def("info", &info, "Build information: CUDA runtime version, compiled architectures, visible devices.");
  m.def("topk_indices", &topk_indices, nb::arg("bias"), nb::arg("mask").none(), nb::arg("out").noconvert(),
        nb::arg("workspace").noconvert(), nb::kw_only(), nb::arg("window"), nb::arg("stream"),
        "Global-scope top-w key indices per broadcast row, ascending, padded with -1 (see dmattn.topk_indices).\n"
        "workspace: CUDA bytes, at least rows * window * 16. stream: cudaStream_t as an integer.");
  m.def("fwd", &fwd, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("bias").none(), nb::arg("mask").none(),
        nb::arg("out").noconvert(), nb::arg("lse").noconvert(), nb::arg("idx").none(), nb::arg("counts").none(),
        nb::kw_only(), nb::arg("scale"), nb::arg("softcap"), nb::arg("causal"), nb::arg("stream"),
        nb::arg("splits") = 0, nb::arg("workspace").noconvert().none() = nb::none(),
        nb::arg("death").none() = nb::none(),
        "Attention forward into out (B, Q, H, D) and lse (B, H, Q) float32 (see dmattn.cuda_ext.forward).\n"
        "q (B, Q, H, D), k/v (B, K, H_kv, D): float16 or bfloat16, contiguous head dim, 16-byte rows.\n"
        "bias/mask: (B|1, H|H_kv|1, Q|1, K), any float dtype / bool. idx (B_s, H_s, W) and counts\n"
        "(B_s, H_s, cdiv(Q, fwd_block_m(D))) int32 select the LIST path; with death (B_s, H_s, K) int32 the\n"
        "PREFIX path (visible scope, causal, no mask): idx (B_s, H_s, blocks, W) and counts (B_s, H_s,\n"
        "blocks, 2) from visible_lists. softcap 0: none. splits > 0 (Q <= 16, not PREFIX):\n"
        "the split (decode) forward with up to that many splits per list, partials in workspace, float32 of at\n"
        "least splits * B * H * Q * (D + 2) entries (see fwd_split_count). splits 0 on the LIST path: workspace\n"
        "of fwd_compact_bytes bytes, ignored where that is 0. stream: an integer.\n"
        "Returns the splits run (0: not the split forward).");
  m.def("fwd_compact_bytes", &dmattn::cuda::fwd_compact_bytes, nb::arg("head_dim"), nb::arg("B"), nb::arg("H"),
        nb::arg("H_kv"), nb::arg("sel_heads"), nb::arg("bias_heads"), nb::arg("mask_heads"), nb::arg("list_len"),
        nb::arg("per_query"),
        "Bytes of float32 workspace a LIST forward (splits 0) with these sizes should pass: the sm_90a kernel's\n"
        "compact copy of the listed key and value rows. 0: the call does not take that kernel on the current\n"
        "device (or its heads cannot share a copy) and needs none. bias_heads/mask_heads: 1 when absent.");
  m.def("fwd_split_count", &fwd_split_count, nb::arg("B"), nb::arg("Q"), nb::arg("H"), nb::arg("H_kv"),
        nb::arg("head_dim"), nb::arg("n_keys"), nb::arg("device"),
        "Splits the split (decode) forward should use for these sizes on a CUDA device (n_keys: the LIST length,\n"
        "or K without a list); 0 when the call should take the one-block-per-query-block forward (Q > 16, or more\n"
        "than 32 query rows Q x H / H_kv per kv head).");
  m.def("bwd", &bwd, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("out"), nb::arg("lse"), nb::arg("dout"),
        nb::arg("bias").none(), nb::arg("mask").none(), nb::arg("idx").none(), nb::arg("counts").none(),
        nb::arg("delta").noconvert(), nb::arg("dq").noconvert().none(), nb::arg("dk").noconvert().none(),
        nb::arg("dv").noconvert().none(), nb::arg("dbias_keys").noconvert().none(), nb::arg("ds").noconvert().none(),
        nb::kw_only(), nb::arg("scale"), nb::arg("softcap"), nb::arg("causal"), nb::arg("stream"),
        nb::arg("death").none() = nb::none(), nb::arg("dkdv_keys").none() = nb::none(),
        nb::arg("dkdv_count").none() = nb::none(), nb::arg("dkdv_part").noconvert().none() = nb::none(),
        nb::arg("workspace").noconvert().none() = nb::none(),
        "Attention backward (see dmattn.cuda_ext.backward). Inputs as fwd plus out, lse and dout (B, Q, H, D);\n"
        "counts (LIST) per block of bwd_dq_block_m(D) query rows. PREFIX: death with idx/counts of blocks of\n"
        "bwd_dq_block_m(D) rows, and the dk/dv kernel's keys: the first dkdv_count (B_s, H_s) int32 entries of\n"
        "each row of dkdv_keys (B_s, H_s, K) int32 (its ever-alive keys, tiled in that order). Workspaces and\n"
        "outputs, all allocated by the caller: delta float32 (B, H, Q); dq (B, Q, H, D); dk, dv (B, K, H_kv, D)\n"
        "in q's dtype, or float32 (B, K, H, D) per-head partials when idx has more heads than H_kv; dbias_keys\n"
        "float32 (B, H, K) (query-broadcast bias) or ds float32 (B, H, Q, K) (per-query bias), zero-filled.\n"
        "dkdv_part: LIST with idx of at most H_kv heads and H > H_kv, float32 (2, B, H, list_len, D) (no zeroing):\n"
        "one dk/dv thread block per query head, whose partials are summed per kv head in head order.\n"
        "workspace: as fwd's on the LIST path (fwd_compact_bytes bytes, float32; ignored where that is 0): the\n"
        "compact copy the sm_90a dq and dk/dv kernels read. Deterministic.");
  m.def("bwd_dkdv_block_n", &dmattn::cuda::bwd_dkdv_block_n, nb::arg("head_dim"),
        "Keys per thread block of the CUDA dk/dv kernel for a head dim (the tile of the PREFIX key order).");
  m.def("bwd_dq_block_m", &dmattn::cuda::bwd_dq_block_m, nb::arg("head_dim"),
        "Query rows per block of the CUDA dq kernel for a head dim (the block size of the backward's LIST counts).");
  m.def("set_fwd_sm90_enabled", &dmattn::cuda::set_fwd_sm90_enabled, nb::arg("enabled"),
        "Lets the forward use its sm_90a (wgmma) kernel where it applies (True) or sends every call to the sm_80\n"
        "kernel (False), for A/B measurements; True by default. Process-wide. The sm_90a backward follows it (it\n"
        "runs where the forward's compact copy applies).");
  m.def("set_pdl_enabled", &dmattn::cuda::set_pdl_enabled, nb::arg("enabled"),
        "Lets the select, split forward and merge kernels overlap the kernel before them (programmatic\n"
        "dependent launch, sm_90+; True, the default) or launches every kernel plainly (False). Process-wide.");
  m.def("pdl_enabled", &dmattn::cuda::pdl_enabled, "Whether set_pdl_enabled left overlapping launches on.");
  m.def("set_split_mma_enabled", &dmattn::cuda::set_split_mma_enabled, nb::arg("enabled"),
        "Lets the split (decode) forward run its tensor-core kernel where it applies (head dim 64 or 128, no\n"
        "softcap, no mask, one bias row per thread block; True, the default) or the CUDA-core kernel for every\n"
        "call (False), for A/B measurements and tests. Process-wide.");
  m.def("split_mma_enabled", &dmattn::cuda::split_mma_enabled,
        "Whether set_split_mma_enabled left the tensor-core split kernel on.");
  m.def("fwd_sm90_enabled", &dmattn::cuda::fwd_sm90_enabled, "Whether set_fwd_sm90_enabled left the sm_90a forward on.");
  m.def("fwd_uses_sm90", &dmattn::cuda::fwd_uses_sm90, nb::arg("head_dim"), nb::arg("per_query") = false,
        "Whether a forward call with this head dim (and a per-query bias/mask or not) runs the sm_90a kernel on the\n"
        "current device: built with sm_90a code for that head dim, compute capability 9.0, enabled.");
  m.def("fwd_block_m", &dmattn::cuda::fwd_block_m, nb::arg("head_dim"),
        "Query rows per block of the CUDA forward for a head dim (the block size of the LIST counts).");
  m.def("decode_plan", &decode_plan, nb::arg("B"), nb::arg("Q"), nb::arg("H"), nb::arg("H_kv"), nb::arg("head_dim"),
        nb::arg("B_s"), nb::arg("H_s"), nb::arg("K"), nb::arg("window"), nb::arg("bias_bits"), nb::arg("device"),
        "(splits, workspace_bytes) of decode for these sizes (selection rows B_s x H_s of K keys, a bias of\n"
        "bias_bits 16/32/64) on a CUDA device; splits 0: the call does not take decode.");
  m.def("decode", &decode, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("bias"), nb::arg("mask").none(),
        nb::arg("out").noconvert(), nb::arg("lse").noconvert(), nb::arg("workspace").noconvert(), nb::kw_only(),
        nb::arg("window"), nb::arg("scale"), nb::arg("softcap"), nb::arg("causal"), nb::arg("splits"),
        nb::arg("stream"),
        "A windowed global-scope forward with few queries in one call: the radix select of the query-broadcast\n"
        "bias (B|1, heads, 1, K) and optional bool mask into lists, then the split forward over them and its\n"
        "merge, into out (B, Q, H, D) and lse (B, H, Q) float32. q/k/v as for fwd; window < K; splits and the\n"
        "uint8 workspace size from decode_plan (nothing needs zeroing). stream: an integer. Returns the splits.");
  m.def("select_plan", &select_plan, nb::arg("rows"), nb::arg("K"), nb::arg("bias_bits"), nb::arg("device"),
        nb::arg("chunk") = 0,
        "(chunk, chunks, workspace_bytes) of select_lists for rows x K keys of a bias of bias_bits (16/32/64)\n"
        "on a CUDA device. chunk 0: keys per thread block picked for the device; else a multiple of the tile.");
  m.def("select_lists", &select_lists, nb::arg("bias"), nb::arg("mask").none(), nb::arg("idx").noconvert(),
        nb::arg("counts").noconvert().none(), nb::arg("workspace").noconvert(), nb::kw_only(), nb::arg("window"),
        nb::arg("Q"), nb::arg("block_m"), nb::arg("causal"), nb::arg("chunk"), nb::arg("stream"),
        "Global-scope LIST selection of a query-broadcast bias (B_s|1, heads, 1, K) (float16/bfloat16/float32/\n"
        "float64, any strides; selection head h_s reads head h_s * heads // H_s) and optional bool mask:\n"
        "idx int32 (B_s, H_s, min(window, K)) gets each row's selected keys ascending, padded with K; counts\n"
        "int32 (B_s, H_s, cdiv(Q, block_m)) (optional) the entries visible to each query block. workspace:\n"
        "uint8, select_plan's bytes for the same chunk; nothing needs zeroing. stream: an integer.");
  m.def("visible_bucket", &dmattn::cuda::visible_bucket, nb::arg("K"),
        "Positions per bucket of visible_death's table for K keys.");
  m.def("visible_chunk", []() { return dmattn::cuda::kVisibleChunk; },
        "Keys per chunk of visible_lists' ever-alive compaction (chunk_counts has cdiv(K, this) per row).");
  m.def("visible_ranks", []() { return dmattn::cuda::kVisibleRanks; },
        "Ranks per chunk of visible_death's table (its table has cdiv(K, this) rows of buckets per row).");
  m.def("visible_rank_keys", &visible_rank_keys, nb::arg("bias"), nb::arg("mask").none(), nb::arg("keys").noconvert(),
        nb::kw_only(), nb::arg("stream"),
        "Visible scope, step 1: keys int64 (B_s, H_s, K) gets each key's rank key (order key of its bias value\n"
        "<< position bits | K - 1 - j; 0 order for masked-out keys) of a query-broadcast float16/bfloat16/\n"
        "float32 bias (B_s|1, heads, 1, K) and optional bool mask. Sort each row descending for visible_death.");
  m.def("visible_death", &visible_death, nb::arg("sorted"), nb::arg("x").noconvert(), nb::arg("rank").noconvert(),
        nb::arg("table").noconvert(), nb::arg("death").noconvert(), nb::kw_only(), nb::arg("window"),
        nb::arg("bucket"), nb::arg("stream"),
        "Visible scope, step 3: death int32 (rows, K) of each key from its row's rank keys sorted descending\n"
        "(rows, K) int64. Workspaces: x, rank int32 (rows, K), table int32 (rows, cdiv(K, visible_ranks()),\n"
        "cdiv(K, bucket) + 1); bucket: visible_bucket(K) or another power of two >= 32.");
  m.def("visible_lists", &visible_lists, nb::arg("death"), nb::arg("ever").noconvert(), nb::arg("before").noconvert(),
        nb::arg("chunk_counts").noconvert(), nb::arg("idx").noconvert(), nb::arg("counts").noconvert(),
        nb::kw_only(), nb::arg("Q"), nb::arg("block_m"), nb::arg("stream"),
        "Visible scope, step 4: per query block of block_m rows its alive keys into idx int32 (rows, cdiv(Q,\n"
        "block_m), min(K, window + block_m)) (entries past the count unset), and counts int32 (rows, blocks, 2):\n"
        "the count and how many lead the list that every query of the block sees. Workspaces: ever, before\n"
        "int32 (rows, K), chunk_counts int32 (rows, cdiv(K, visible_chunk())).");
  m.def("list_counts", &list_counts, nb::arg("idx"), nb::arg("counts").noconvert(), nb::kw_only(), nb::arg("K"),
        nb::arg("Q"), nb::arg("block_m"), nb::arg("causal"), nb::arg("stream"),
        "Per query block of block_m rows, how many entries of each ascending LIST idx (B_s, H_s, W) it can see:\n"
        "counts int32 (B_s, H_s, cdiv(Q, block_m)).");
}
