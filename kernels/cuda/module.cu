// The CUDA module `dmattn._cuda`: build information and the global-scope key selection on the GPU,
// compiled from the same selection header as the CPU core (cpp/include/dmattn/selection.h).
//
// The selection here is one thread per broadcast row with a running top-w heap: exact and simple,
// the first GPU consumer of the shared header and the CUDA backend's starting point. The attention
// backend will bring its own parallel select; the tie rule and threshold logic stay in the header.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "dmattn/selection.h"

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

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
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
  check(cudaGetLastError(), "topk_rows_kernel launch");
}

nb::dict info() {
  nb::dict d;
  d["cuda_runtime"] = CUDART_VERSION;
  d["archs"] = std::string(DMATTN_CUDA_ARCHS_STRING);
  int count = 0;
  d["device_count"] = cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
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
}
