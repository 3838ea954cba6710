// Tiled attention over the keys the selection keeps: an online-softmax forward and a backward
// that recomputes the probabilities from lse. Compiled once per instruction set; DMATTN_ISA names
// the namespace and the compiler flags decide the vector width.
//
// Everything but the two entry points has internal linkage and no library template is
// instantiated here: the per-ISA objects are linked into one binary, and a shared out-of-line copy
// compiled for AVX-512 could otherwise be called on a CPU without it.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <new>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "dmattn/cpu_kernels.h"
#include "dmattn/plan.h"

#ifndef DMATTN_ISA
#error "compile with -DDMATTN_ISA=<generic|avx2|avx512>"
#endif

namespace dmattn {
namespace cpu {
namespace DMATTN_ISA {
namespace {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kColVecs = 4;
#elif defined(__AVX2__)
constexpr int kVecBytes = 32;
constexpr int kColVecs = 2;
#else
constexpr int kVecBytes = 16;
constexpr int kColVecs = 2;
#endif
// Register block of the matrix products: kRowBlock x kColVecs accumulator vectors, 16 of the 32
// AVX-512 registers or 8 of the 16 AVX2/SSE ones, leaving room for the loaded operands.
constexpr int kRowBlock = 4;
// Queries per task and keys per tile: a 64x64 float score tile and the K/V tiles (64 x D) stay in
// L2 for every D up to 256.
constexpr int kBlockM = 64;
constexpr int kBlockN = 64;

template <class T>
struct Simd {
  typedef T vec __attribute__((vector_size(kVecBytes)));
  static constexpr int lanes = kVecBytes / int(sizeof(T));
};
template <class T>
using Vec = typename Simd<T>::vec;

template <class T>
inline Vec<T> vload(const T* p) {
  Vec<T> v;
  memcpy(&v, p, sizeof v);
  return v;
}

template <class T>
inline void vstore(T* p, Vec<T> v) {
  memcpy(p, &v, sizeof v);
}

template <class T>
inline Vec<T> vsplat(T x) {
  return Vec<T>{} + x;
}

template <class T>
inline T neg_inf() {
  return T(-HUGE_VAL);
}

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Index of the calling thread inside a parallel region (0 without OpenMP): picks its workspace.
inline int this_thread() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Zero-initialised, 64-byte aligned storage, allocated before parallel regions so that a failed
// allocation surfaces as an exception instead of terminating inside OpenMP.
template <class T>
class Buffer {
 public:
  explicit Buffer(int64_t count) {
    const size_t bytes = size_t(round_up((count > 0 ? count : 1) * int64_t(sizeof(T)), 64));
    data_ = static_cast<T*>(aligned_alloc(64, bytes));
    if (!data_) throw std::bad_alloc();
    memset(data_, 0, bytes);
  }
  ~Buffer() { free(data_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* get() const { return data_; }

 private:
  T* data_;
};

// exp(x) for a vector of floats: Cephes' polynomial after reducing by n*ln2 (ln2 split in two so
// the reduction is exact), 2^n put into the exponent bits. Inputs below -86 give exactly 0 (this
// covers -inf); NaN propagates.
inline Vec<float> exp_vec(Vec<float> x) {
  typedef int32_t ivec __attribute__((vector_size(kVecBytes)));
  const Vec<float> lo = vsplat(-86.0f), hi = vsplat(88.0f), magic = vsplat(12582912.0f);
  Vec<float> xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  // Adding 1.5*2^23 rounds to an integer held in the low mantissa bits.
  const Vec<float> t = xc * 1.44269504088896341f + magic;
  const Vec<float> n = t - magic;
  const ivec n_int = __builtin_bit_cast(ivec, t) - __builtin_bit_cast(ivec, magic);
  Vec<float> r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  Vec<float> p = vsplat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Vec<float> y = p * (r * r) + r + 1.0f;
  const Vec<float> result = __builtin_bit_cast(Vec<float>, __builtin_bit_cast(ivec, y) + (n_int << 23));
  return x < lo ? vsplat(0.0f) : result;
}

// row[c] = exp(row[c] - shift) for c < n (n a multiple of the vector width).
inline void exp_shifted(float* row, int64_t n, float shift) {
  for (int64_t c = 0; c < n; c += Simd<float>::lanes)
    vstore(row + c, exp_vec(vload(row + c) - shift));
}

inline void exp_shifted(double* row, int64_t n, double shift) {
  for (int64_t c = 0; c < n; ++c) row[c] = exp(row[c] - shift);
}

template <class T>
T row_max(const T* row, int64_t n) {
  Vec<T> acc = vload(row);
  for (int64_t c = Simd<T>::lanes; c < n; c += Simd<T>::lanes) {
    const Vec<T> v = vload(row + c);
    acc = v > acc ? v : acc;
  }
  T best = acc[0];
  for (int i = 1; i < Simd<T>::lanes; ++i) best = acc[i] > best ? acc[i] : best;
  return best;
}

template <class T>
T row_sum(const T* row, int64_t n) {
  Vec<T> acc = vload(row);
  for (int64_t c = Simd<T>::lanes; c < n; c += Simd<T>::lanes) acc += vload(row + c);
  T total = 0;
  for (int i = 0; i < Simd<T>::lanes; ++i) total += acc[i];
  return total;
}

// C[kRowBlock x NV vectors] (+)= A[kRowBlock x L] * B[L x NV vectors], accumulators in registers.
template <class T, int NV>
inline void gemm_micro(int64_t L, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                       int64_t ldc, bool accumulate) {
  constexpr int W = Simd<T>::lanes;
  Vec<T> acc[kRowBlock][NV];
#pragma GCC unroll 4
  for (int r = 0; r < kRowBlock; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? vload(C + r * ldc + v * W) : Vec<T>{};
  for (int64_t l = 0; l < L; ++l) {
    Vec<T> b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = vload(B + l * ldb + v * W);
#pragma GCC unroll 4
    for (int r = 0; r < kRowBlock; ++r) {
      const Vec<T> a = vsplat(A[r * lda + l]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRowBlock; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vstore(C + r * ldc + v * W, acc[r][v]);
}

// C[M x N] (+)= A[M x L] * B[L x N], all row-major; M a multiple of kRowBlock, N of the vector
// width. Every product in this file has this shape, with B pre-arranged by the gathers.
template <class T>
void gemm(int64_t M, int64_t N, int64_t L, const T* A, int64_t lda, const T* B, int64_t ldb,
          T* C, int64_t ldc, bool accumulate) {
  constexpr int W = Simd<T>::lanes;
  for (int64_t i = 0; i < M; i += kRowBlock) {
    int64_t j = 0;
    for (; j + kColVecs * W <= N; j += kColVecs * W)
      gemm_micro<T, kColVecs>(L, A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc, accumulate);
    for (; j < N; j += W)
      gemm_micro<T, 1>(L, A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc, accumulate);
  }
}

// dst[i] = src[i * stride] * mul for i < n, converting from the stored dtype.
template <class T>
void load_row(const View& v, int64_t offset, int64_t n, T mul, T* dst) {
  const int64_t st = v.stride[3];
  switch (v.dtype) {
    case DType::f16: {
      const uint16_t* p = static_cast<const uint16_t*>(v.data) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = T(half_to_float(p[i * st])) * mul;
      break;
    }
    case DType::bf16: {
      const uint16_t* p = static_cast<const uint16_t*>(v.data) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = T(bf16_to_float(p[i * st])) * mul;
      break;
    }
    case DType::f32: {
      const float* p = static_cast<const float*>(v.data) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = T(p[i * st]) * mul;
      break;
    }
    default: {
      const double* p = static_cast<const double*>(v.data) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = T(p[i * st]) * mul;
      break;
    }
  }
}

// dst[i * stride] = src[i] * mul for i < n, rounding to the stored dtype.
template <class T>
void store_row(const T* src, T mul, const View& v, int64_t offset, int64_t n) {
  const int64_t st = v.stride[3];
  switch (v.dtype) {
    case DType::f16: {
      uint16_t* p = static_cast<uint16_t*>(v.data) + offset;
      for (int64_t i = 0; i < n; ++i) p[i * st] = float_to_half(float(src[i] * mul));
      break;
    }
    case DType::bf16: {
      uint16_t* p = static_cast<uint16_t*>(v.data) + offset;
      for (int64_t i = 0; i < n; ++i) p[i * st] = float_to_bf16(float(src[i] * mul));
      break;
    }
    case DType::f32: {
      float* p = static_cast<float*>(v.data) + offset;
      for (int64_t i = 0; i < n; ++i) p[i * st] = float(src[i] * mul);
      break;
    }
    default: {
      double* p = static_cast<double*>(v.data) + offset;
      for (int64_t i = 0; i < n; ++i) p[i * st] = double(src[i] * mul);
      break;
    }
  }
}

void store_value(const View& v, int64_t offset, double x) {
  switch (v.dtype) {
    case DType::f16: static_cast<uint16_t*>(v.data)[offset] = float_to_half(float(x)); break;
    case DType::bf16: static_cast<uint16_t*>(v.data)[offset] = float_to_bf16(float(x)); break;
    case DType::f32: static_cast<float*>(v.data)[offset] = float(x); break;
    default: static_cast<double*>(v.data)[offset] = x; break;
  }
}

// One thread's tiles. Row strides: Dp (head dim padded to the vector width) for [.. x D] tiles,
// kBlockN for score tiles, kBlockM for transposed score tiles. Padding stays zero.
template <class T>
struct Tiles {
  T *q, *kt, *rows, *s, *add, *o, *m, *l, *row;
  T *dout, *vt, *dp, *tanh_s, *tr, *tile_out, *dk, *dv, *delta, *lse;
  int32_t* keys;

  // Points the tiles into `base` (when not null) and returns how many elements they take.
  int64_t carve(T* base, int64_t Dp, int64_t K, bool backward) {
    int64_t used = 0;
    auto take = [&](int64_t n) {
      T* at = base ? base + used : nullptr;
      used += round_up(n, 16);
      return at;
    };
    q = take(kBlockM * Dp), kt = take(Dp * kBlockN), rows = take(kBlockN * Dp);
    s = take(kBlockM * kBlockN), add = take(kBlockM * kBlockN), o = take(kBlockM * Dp);
    m = take(kBlockM), l = take(kBlockM), row = take(Dp);
    if (backward) {
      dout = take(kBlockM * Dp), vt = take(Dp * kBlockN), dp = take(kBlockM * kBlockN);
      tanh_s = take(kBlockM * kBlockN), tr = take(kBlockN * kBlockM), tile_out = take(kBlockN * Dp);
      dk = take(K * Dp), dv = take(K * Dp), delta = take(kBlockM), lse = take(kBlockM);
    }
    return used;
  }
};

// Elements of one thread's slice of the workspace.
template <class T>
int64_t tiles_stride(int64_t Dp, int64_t K, bool backward) {
  Tiles<T> probe;
  return probe.carve(nullptr, Dp, K, backward);
}

template <class T>
struct Context {
  const Selection& sel;
  const AttnProblem& p;
  int64_t D, Dp;
  T qscale;   // folded into the gathered queries: scale, or scale / softcap
  T softcap;  // 0 when off

  explicit Context(const Selection& s)
      : sel(s), p(s.problem()), D(p.D), Dp(round_up(p.D, Simd<T>::lanes)),
        qscale(T(p.softcap > 0 ? p.scale / p.softcap : p.scale)), softcap(T(p.softcap)) {}
  int64_t kv_head(int64_t h) const { return h / p.group(); }
};

// Scaled query rows [m0, m0+rows) of head h; rows up to rows_pad are zero.
template <class T>
void load_queries(const Context<T>& cx, int64_t b, int64_t h, int64_t m0, int64_t rows,
                  int64_t rows_pad, T* q) {
  for (int64_t r = 0; r < rows; ++r)
    load_row(cx.p.q, cx.p.q.offset(b, m0 + r, h, 0), cx.D, cx.qscale, q + r * cx.Dp);
  memset(q + rows * cx.Dp, 0, size_t((rows_pad - rows) * cx.Dp) * sizeof(T));
}

// dst[d * kBlockN + c] = v[b, keys[c], g, d]; columns n..kBlockN zero.
template <class T>
void gather_transposed(const Context<T>& cx, const View& v, int64_t b, int64_t g,
                       const int32_t* keys, int64_t n, T* row, T* dst) {
  for (int64_t c = 0; c < n; ++c) {
    load_row(v, v.offset(b, keys[c], g, 0), cx.D, T(1), row);
    for (int64_t d = 0; d < cx.D; ++d) dst[d * kBlockN + c] = row[d];
  }
  for (int64_t d = 0; d < cx.D; ++d)
    for (int64_t c = n; c < kBlockN; ++c) dst[d * kBlockN + c] = 0;
}

// dst[c * Dp + d] = v[b, keys[c], g, d]; rows n..kBlockN zero.
template <class T>
void gather_rows(const Context<T>& cx, const View& v, int64_t b, int64_t g, const int32_t* keys,
                 int64_t n, T* dst) {
  for (int64_t c = 0; c < n; ++c) load_row(v, v.offset(b, keys[c], g, 0), cx.D, T(1), dst + c * cx.Dp);
  memset(dst + n * cx.Dp, 0, size_t((kBlockN - n) * cx.Dp) * sizeof(T));
}

// w.s = scores of query rows [m0, m0+rows) against keys[0..n): softcapped, bias added, -inf where
// not visible and in the padding. With softcap, w.tanh_s (when set) receives tanh for backward.
template <class T>
void score_tile(const Context<T>& cx, Tiles<T>& w, const SelectionScratch& scratch, int64_t b,
                int64_t h, int64_t m0, int64_t rows, int64_t rows_pad, const int32_t* keys,
                int64_t n, bool keep_tanh) {
  gather_transposed(cx, cx.p.k, b, cx.kv_head(h), keys, n, w.row, w.kt);
  cx.sel.tile(b, h, m0, rows, keys, n, scratch, w.add, kBlockN);
  for (int64_t r = 0; r < rows_pad; ++r)
    for (int64_t c = r < rows ? n : 0; c < kBlockN; ++c) w.add[r * kBlockN + c] = neg_inf<T>();
  gemm(rows_pad, kBlockN, cx.D, w.q, cx.Dp, w.kt, kBlockN, w.s, kBlockN, false);
  const int64_t count = rows_pad * kBlockN;
  if (cx.softcap > 0) {
    for (int64_t e = 0; e < count; ++e) {
      const T t = tanh(w.s[e]);
      if (keep_tanh) w.tanh_s[e] = t;
      w.s[e] = cx.softcap * t;
    }
  }
  for (int64_t e = 0; e < count; e += Simd<T>::lanes)
    vstore(w.s + e, vload(w.s + e) + vload(w.add + e));
}

// Folds the score tile into the running max m, sum l and (unless `stats_only`) output o; leaves
// the tile's unnormalised probabilities in w.s.
template <class T>
void online_softmax(const Context<T>& cx, Tiles<T>& w, int64_t rows_pad, bool stats_only) {
  for (int64_t r = 0; r < rows_pad; ++r) {
    T* s = w.s + r * kBlockN;
    const T tile_max = row_max(s, kBlockN);
    const T m_new = tile_max > w.m[r] ? tile_max : w.m[r];
    if (m_new == neg_inf<T>()) {
      memset(s, 0, kBlockN * sizeof(T));
      continue;
    }
    exp_shifted(s, kBlockN, m_new);
    const T alpha = exp(w.m[r] - m_new);
    w.l[r] = w.l[r] * alpha + row_sum(s, kBlockN);
    w.m[r] = m_new;
    if (!stats_only && alpha != T(1)) {
      T* o = w.o + r * cx.Dp;
      for (int64_t d = 0; d < cx.Dp; d += Simd<T>::lanes) vstore(o + d, vload(o + d) * alpha);
    }
  }
}

template <class T>
void write_forward(const Context<T>& cx, const FwdArgs& a, Tiles<T>& w, int64_t b, int64_t h,
                   int64_t m0, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = m0 + r;
    const bool empty = !(w.l[r] > 0);
    const T inv = empty ? T(0) : T(1) / w.l[r];
    store_row(w.o + r * cx.Dp, inv, a.out, a.out.offset(b, i, h, 0), cx.D);
    static_cast<float*>(a.lse.data)[a.lse.offset(b, h, i, 0)] =
        empty ? -HUGE_VALF : float(w.m[r] + log(w.l[r]));
  }
}

template <class T>
void forward_block(const Context<T>& cx, const FwdArgs& a, Tiles<T>& w, SelectionScratch& scratch,
                   int64_t b, int64_t h, int64_t m0) {
  const int64_t rows = min64(kBlockM, cx.p.Q - m0), rows_pad = round_up(rows, kRowBlock);
  const int64_t n = cx.sel.block_keys(b, h, m0, rows, w.keys, scratch);
  load_queries(cx, b, h, m0, rows, rows_pad, w.q);
  for (int64_t r = 0; r < rows_pad; ++r) w.m[r] = neg_inf<T>(), w.l[r] = 0;
  memset(w.o, 0, size_t(rows_pad * cx.Dp) * sizeof(T));
  for (int64_t c0 = 0; c0 < n; c0 += kBlockN) {
    const int64_t nc = min64(kBlockN, n - c0);
    score_tile(cx, w, scratch, b, h, m0, rows, rows_pad, w.keys + c0, nc, false);
    gather_rows(cx, cx.p.v, b, cx.kv_head(h), w.keys + c0, nc, w.rows);
    online_softmax(cx, w, rows_pad, false);
    gemm(rows_pad, cx.Dp, nc, w.s, kBlockN, w.rows, cx.Dp, w.o, cx.Dp, true);
  }
  write_forward(cx, a, w, b, h, m0, rows);
}

template <class T>
void run_forward(const Selection& sel, const FwdArgs& a, int num_threads) {
  const Context<T> cx(sel);
  const AttnProblem& p = cx.p;
  const int64_t blocks = (p.Q + kBlockM - 1) / kBlockM, tasks = p.B * p.H * blocks;
  const int threads = int(min64(num_threads, tasks));
  const int64_t stride = tiles_stride<T>(cx.Dp, p.K, false);
  Buffer<T> work(stride * threads);
  Buffer<int32_t> keys(p.K * threads);
  ScratchSet scratch(sel, threads, kBlockM);
#pragma omp parallel num_threads(threads)
  {
    const int tid = this_thread();
    Tiles<T> w;
    w.carve(work.get() + tid * stride, cx.Dp, p.K, false);
    w.keys = keys.get() + tid * p.K;
    // Later query blocks see more keys under causality: start them first.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t bh = task / blocks, block = blocks - 1 - task % blocks;
      forward_block(cx, a, w, scratch[tid], bh / p.H, bh % p.H, block * kBlockM);
    }
  }
}

// dst[c * kBlockM + r] = src[r * kBlockN + c].
template <class T>
void transpose_tile(const T* src, int64_t rows_pad, T* dst) {
  for (int64_t r = 0; r < rows_pad; ++r)
    for (int64_t c = 0; c < kBlockN; ++c) dst[c * kBlockM + r] = src[r * kBlockN + c];
}

// acc[keys[c]] += tile[c] for c < n: scatters a key tile's gradient rows.
template <class T>
void scatter_add(const Context<T>& cx, const T* tile, const int32_t* keys, int64_t n, T* acc) {
  for (int64_t c = 0; c < n; ++c) {
    T* dst = acc + int64_t(keys[c]) * cx.Dp;
    const T* src = tile + c * cx.Dp;
    for (int64_t d = 0; d < cx.Dp; d += Simd<T>::lanes) vstore(dst + d, vload(dst + d) + vload(src + d));
  }
}

// Where a backward task accumulates dbias: per task a [slots][Qb][K] slab, slots = the bias heads
// one kv-head group touches (H/Hkv when the bias has H heads, else 1).
struct DbiasLayout {
  int64_t slots, Qb, K;
  int64_t slot(const AttnProblem& p, int64_t h) const {
    return p.bias.size[1] == p.H ? h % p.group() : 0;
  }
  int64_t task_size() const { return slots * Qb * K; }
};

template <class T>
struct Gradients {
  const BwdArgs& a;
  bool dq, dk, dv;
  T* dbias;  // this head's [Qb][K] slab of the task's partial, or null
  int64_t Qb;
};

// Loads dO and lse of the block and delta = rowsum(dO * O).
template <class T>
void load_backward_rows(const Context<T>& cx, const BwdArgs& a, Tiles<T>& w, int64_t b, int64_t h,
                        int64_t m0, int64_t rows, int64_t rows_pad) {
  for (int64_t r = 0; r < rows_pad; ++r) {
    w.delta[r] = 0;
    w.lse[r] = neg_inf<T>();
  }
  memset(w.dout, 0, size_t(rows_pad * cx.Dp) * sizeof(T));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = m0 + r;
    T* dout = w.dout + r * cx.Dp;
    load_row(a.dout, a.dout.offset(b, i, h, 0), cx.D, T(1), dout);
    load_row(a.out, a.out.offset(b, i, h, 0), cx.D, T(1), w.row);
    T delta = 0;
    for (int64_t d = 0; d < cx.D; ++d) delta += dout[d] * w.row[d];
    w.delta[r] = delta;
    w.lse[r] = T(static_cast<const float*>(a.lse.data)[a.lse.offset(b, h, i, 0)]);
  }
}

// Turns the score tile in w.s into P = exp(s - lse), zero for rows without visible keys.
template <class T>
void probabilities(Tiles<T>& w, int64_t rows_pad) {
  for (int64_t r = 0; r < rows_pad; ++r) {
    T* s = w.s + r * kBlockN;
    if (w.lse[r] == neg_inf<T>())
      memset(s, 0, kBlockN * sizeof(T));
    else
      exp_shifted(s, kBlockN, w.lse[r]);
  }
}

// w.dp = dS = P * (dP - delta); dbias takes dS, then the softcap chain rule makes it dX.
template <class T>
void score_gradient(const Context<T>& cx, Tiles<T>& w, const Gradients<T>& g, int64_t m0,
                    int64_t rows, int64_t rows_pad, const int32_t* keys, int64_t n) {
  for (int64_t r = 0; r < rows_pad; ++r) {
    const Vec<T> delta = vsplat(w.delta[r]);
    for (int64_t c = 0; c < kBlockN; c += Simd<T>::lanes) {
      const int64_t e = r * kBlockN + c;
      vstore(w.dp + e, vload(w.s + e) * (vload(w.dp + e) - delta));
    }
  }
  if (g.dbias) {
    for (int64_t r = 0; r < rows; ++r) {
      T* dst = g.dbias + (g.Qb == 1 ? 0 : (m0 + r) * cx.p.K);
      for (int64_t c = 0; c < n; ++c) dst[keys[c]] += w.dp[r * kBlockN + c];
    }
  }
  if (cx.softcap > 0)
    for (int64_t e = 0; e < rows_pad * kBlockN; ++e) w.dp[e] *= T(1) - w.tanh_s[e] * w.tanh_s[e];
}

template <class T>
void backward_tile(const Context<T>& cx, Tiles<T>& w, const Gradients<T>& g,
                   const SelectionScratch& scratch, int64_t b, int64_t h, int64_t m0,
                   int64_t rows, int64_t rows_pad, const int32_t* keys, int64_t n) {
  const int64_t kvh = cx.kv_head(h), Dp = cx.Dp;
  score_tile(cx, w, scratch, b, h, m0, rows, rows_pad, keys, n, true);
  probabilities(w, rows_pad);
  if (g.dv) {
    transpose_tile(w.s, rows_pad, w.tr);
    gemm(kBlockN, Dp, rows_pad, w.tr, kBlockM, w.dout, Dp, w.tile_out, Dp, false);
    scatter_add(cx, w.tile_out, keys, n, w.dv);
  }
  gather_transposed(cx, cx.p.v, b, kvh, keys, n, w.row, w.vt);
  gemm(rows_pad, kBlockN, cx.D, w.dout, Dp, w.vt, kBlockN, w.dp, kBlockN, false);
  score_gradient(cx, w, g, m0, rows, rows_pad, keys, n);
  if (g.dq) {
    gather_rows(cx, cx.p.k, b, kvh, keys, n, w.rows);
    gemm(rows_pad, Dp, n, w.dp, kBlockN, w.rows, Dp, w.o, Dp, true);
  }
  if (g.dk) {
    transpose_tile(w.dp, rows_pad, w.tr);
    gemm(kBlockN, Dp, rows_pad, w.tr, kBlockM, w.q, Dp, w.tile_out, Dp, false);
    scatter_add(cx, w.tile_out, keys, n, w.dk);
  }
}

// float64 problems recompute lse in double: the forward's float32 lse would otherwise limit the
// float64 gradients (the ones gradcheck looks at) to float32 accuracy.
template <class T>
void recompute_lse(const Context<T>& cx, Tiles<T>& w, const SelectionScratch& scratch, int64_t b,
                   int64_t h, int64_t m0, int64_t rows, int64_t rows_pad, int64_t n) {
  for (int64_t r = 0; r < rows_pad; ++r) w.m[r] = neg_inf<T>(), w.l[r] = 0;
  for (int64_t c0 = 0; c0 < n; c0 += kBlockN) {
    score_tile(cx, w, scratch, b, h, m0, rows, rows_pad, w.keys + c0, min64(kBlockN, n - c0), false);
    online_softmax(cx, w, rows_pad, true);
  }
  for (int64_t r = 0; r < rows; ++r) w.lse[r] = w.l[r] > 0 ? w.m[r] + log(w.l[r]) : neg_inf<T>();
}

template <class T>
void backward_block(const Context<T>& cx, Tiles<T>& w, const Gradients<T>& g,
                    SelectionScratch& scratch, int64_t b, int64_t h, int64_t m0) {
  const int64_t rows = min64(kBlockM, cx.p.Q - m0), rows_pad = round_up(rows, kRowBlock);
  const int64_t n = cx.sel.block_keys(b, h, m0, rows, w.keys, scratch);
  load_queries(cx, b, h, m0, rows, rows_pad, w.q);
  load_backward_rows(cx, g.a, w, b, h, m0, rows, rows_pad);
  if (sizeof(T) == sizeof(double)) recompute_lse(cx, w, scratch, b, h, m0, rows, rows_pad, n);
  memset(w.o, 0, size_t(rows_pad * cx.Dp) * sizeof(T));
  for (int64_t c0 = 0; c0 < n; c0 += kBlockN)
    backward_tile(cx, w, g, scratch, b, h, m0, rows, rows_pad, w.keys + c0, min64(kBlockN, n - c0));
  if (!g.dq) return;
  const T dq_scale = T(cx.p.scale);
  for (int64_t r = 0; r < rows; ++r)
    store_row(w.o + r * cx.Dp, dq_scale, g.a.dq, g.a.dq.offset(b, m0 + r, h, 0), cx.D);
}

// One task per (batch, kv head): it owns dk/dv of that head, dq of the head's query heads and its
// own dbias slab, so every sum runs in a fixed order whatever the thread count.
template <class T>
void backward_task(const Context<T>& cx, const BwdArgs& a, Tiles<T>& w, SelectionScratch& scratch,
                   int64_t b, int64_t kvh, T* dbias_slab, const DbiasLayout& layout) {
  const AttnProblem& p = cx.p;
  const int64_t K = p.K, Dp = cx.Dp, G = p.group();
  Gradients<T> g{a, a.dq.present(), a.dk.present(), a.dv.present(), nullptr, layout.Qb};
  if (g.dk) memset(w.dk, 0, size_t(K * Dp) * sizeof(T));
  if (g.dv) memset(w.dv, 0, size_t(K * Dp) * sizeof(T));
  for (int64_t h = kvh * G; h < (kvh + 1) * G; ++h) {
    g.dbias = dbias_slab ? dbias_slab + layout.slot(p, h) * layout.Qb * K : nullptr;
    for (int64_t m0 = 0; m0 < p.Q; m0 += kBlockM) backward_block(cx, w, g, scratch, b, h, m0);
  }
  const T dk_scale = T(p.softcap > 0 ? p.softcap : 1.0);
  for (int64_t j = 0; j < K; ++j) {
    if (g.dk) store_row(w.dk + j * Dp, dk_scale, a.dk, a.dk.offset(b, j, kvh, 0), cx.D);
    if (g.dv) store_row(w.dv + j * Dp, T(1), a.dv, a.dv.offset(b, j, kvh, 0), cx.D);
  }
}

// dbias[bb, hb, qb, k] = sum of the slabs of every task that touched it, in (batch, kv head) order.
template <class T>
void reduce_dbias(const AttnProblem& p, const View& dbias, const T* partial,
                  const DbiasLayout& layout, int num_threads) {
  const int64_t Bb = p.bias.size[0], Hb = p.bias.size[1], K = p.K, G = p.group();
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t row = 0; row < Bb * Hb * layout.Qb; ++row) {
    const int64_t bb = row / (Hb * layout.Qb), hb = row / layout.Qb % Hb, qb = row % layout.Qb;
    const int64_t b_first = Bb == 1 ? 0 : bb, b_last = Bb == 1 ? p.B - 1 : bb;
    int64_t g_first = 0, g_last = p.Hkv - 1, slot = 0;
    if (Hb == p.H) g_first = g_last = hb / G, slot = hb % G;
    else if (Hb == p.Hkv) g_first = g_last = hb;
    for (int64_t k = 0; k < K; ++k) {
      T sum = 0;
      for (int64_t b = b_first; b <= b_last; ++b)
        for (int64_t g = g_first; g <= g_last; ++g)
          sum += partial[(b * p.Hkv + g) * layout.task_size() + (slot * layout.Qb + qb) * K + k];
      store_value(dbias, dbias.offset(bb, hb, qb, k), double(sum));
    }
  }
}

template <class T>
void run_backward(const Selection& sel, const BwdArgs& a, int num_threads) {
  const Context<T> cx(sel);
  const AttnProblem& p = cx.p;
  const int64_t tasks = p.B * p.Hkv;
  const int threads = int(min64(num_threads, tasks));
  const int64_t stride = tiles_stride<T>(cx.Dp, p.K, true);
  const bool want_dbias = a.dbias.present();
  const DbiasLayout layout{want_dbias && p.bias.size[1] == p.H ? p.group() : 1,
                           want_dbias ? p.bias.size[2] : 1, p.K};
  // dbias workspace: B * Hkv * slots * Qb * K accumulators, i.e. B*Hkv*K for the usual
  // query-broadcast bias; a per-query bias costs one bias-sized slab per task.
  Buffer<T> partial(want_dbias ? tasks * layout.task_size() : 0);
  Buffer<T> work(stride * threads);
  Buffer<int32_t> keys(p.K * threads);
  ScratchSet scratch(sel, threads, kBlockM);
#pragma omp parallel num_threads(threads)
  {
    const int tid = this_thread();
    Tiles<T> w;
    w.carve(work.get() + tid * stride, cx.Dp, p.K, true);
    w.keys = keys.get() + tid * p.K;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      T* slab = want_dbias ? partial.get() + task * layout.task_size() : nullptr;
      backward_task(cx, a, w, scratch[tid], task / p.Hkv, task % p.Hkv, slab, layout);
    }
  }
  if (want_dbias) reduce_dbias(p, a.dbias, partial.get(), layout, num_threads);
}

}  // namespace

void forward(const Selection& selection, const FwdArgs& args, int num_threads) {
  if (selection.problem().q.dtype == DType::f64)
    run_forward<double>(selection, args, num_threads);
  else
    run_forward<float>(selection, args, num_threads);
}

void backward(const Selection& selection, const BwdArgs& args, int num_threads) {
  if (selection.problem().q.dtype == DType::f64)
    run_backward<double>(selection, args, num_threads);
  else
    run_backward<float>(selection, args, num_threads);
}

}  // namespace DMATTN_ISA
}  // namespace cpu
}  // namespace dmattn
