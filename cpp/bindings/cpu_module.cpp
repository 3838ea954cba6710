// nanobind module `_C`: the CPU core's entry points. Tensors arrive as DLPack views, are checked
// cheaply (Python validates first; this is defence in depth) and are never copied.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <string>

#include "dmattn/cpu_kernels.h"
#include "dmattn/plan.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace dmattn {
namespace {

using Array = nb::ndarray<nb::device::cpu>;
using OptionalArray = std::optional<Array>;

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

DType dtype_of(const Array& a, const char* name) {
  const nb::dlpack::dtype dt = a.dtype();
  if (dt.lanes == 1) {
    if (dt.code == uint8_t(nb::dlpack::dtype_code::Float)) {
      if (dt.bits == 16) return DType::f16;
      if (dt.bits == 32) return DType::f32;
      if (dt.bits == 64) return DType::f64;
    }
    if (dt.code == uint8_t(nb::dlpack::dtype_code::Bfloat) && dt.bits == 16) return DType::bf16;
    if (dt.code == uint8_t(nb::dlpack::dtype_code::Bool) && dt.bits == 8) return DType::boolean;
    if (dt.code == uint8_t(nb::dlpack::dtype_code::Int) && dt.bits == 64) return DType::i64;
  }
  fail(std::string(name) + ": unsupported dtype");
}

bool is_floating(DType t) { return t != DType::boolean && t != DType::i64; }

std::string shape_text(const View& v) {
  std::string s = "(";
  for (int d = 0; d < v.ndim; ++d) s += (d ? ", " : "") + std::to_string(v.size[d]);
  return s + ")";
}

View view_of(const Array& a, const char* name) {
  if (a.ndim() < 1 || a.ndim() > 4) fail(std::string(name) + ": expected 1 to 4 dimensions");
  View v;
  v.data = a.data();
  v.dtype = dtype_of(a, name);
  v.ndim = int(a.ndim());
  for (int d = 0; d < v.ndim; ++d) {
    v.size[d] = int64_t(a.shape(size_t(d)));
    v.stride[d] = int64_t(a.stride(size_t(d)));
  }
  return v;
}

// A view of exactly `shape`; `dtype` checked unless it is null.
View expect(const Array& a, const char* name, const DType* dtype,
            std::initializer_list<int64_t> shape) {
  View v = view_of(a, name);
  bool same = v.ndim == int(shape.size());
  int d = 0;
  for (int64_t s : shape) same = same && v.size[d++] == s;
  if (!same) fail(std::string(name) + ": wrong shape " + shape_text(v));
  if (dtype && v.dtype != *dtype) fail(std::string(name) + ": wrong dtype");
  return v;
}

// bias / mask: 4-D (B|1, H|Hkv|1, Q|1, K); size-1 dims get stride 0 so they broadcast.
View broadcast_operand(const OptionalArray& a, const char* name, bool want_bool, int64_t B,
                       int64_t H, int64_t Hkv, int64_t Q, int64_t K) {
  if (!a) return View{};
  View v = view_of(*a, name);
  if (v.ndim != 4) fail(std::string(name) + ": expected 4 dimensions, got " + shape_text(v));
  if (want_bool ? v.dtype != DType::boolean : !is_floating(v.dtype))
    fail(std::string(name) + (want_bool ? ": expected bool" : ": expected a floating dtype"));
  const bool ok = (v.size[0] == 1 || v.size[0] == B) &&
                  (v.size[1] == 1 || v.size[1] == Hkv || v.size[1] == H) &&
                  (v.size[2] == 1 || v.size[2] == Q) && v.size[3] == K;
  if (!ok) fail(std::string(name) + ": shape " + shape_text(v) + " does not broadcast");
  for (int d = 0; d < 4; ++d)
    if (v.size[d] == 1) v.stride[d] = 0;
  return v;
}

struct Flags {
  double scale, softcap;
  bool is_causal;
  int64_t window;
  bool scope_global;
  int num_threads;
};

void set_flags(AttnProblem& p, const Flags& f) {
  if (f.window < 0) fail("window must be >= 0 (0 = no window)");
  if (f.num_threads < 0) fail("num_threads must be >= 0");
  p.scale = f.scale;
  p.softcap = f.softcap;
  p.causal = f.is_causal;
  p.window = f.window;
  p.scope_global = f.scope_global;
  p.num_threads = f.num_threads;
  if (p.window > 0 && p.window < p.K && !p.bias.present()) fail("window requires a bias");
}

AttnProblem make_problem(const Array& q, const Array& k, const Array& v, const OptionalArray& bias,
                         const OptionalArray& mask, const Flags& flags) {
  AttnProblem p;
  p.q = view_of(q, "q");
  if (p.q.ndim != 4) fail("q: expected (B, Q, H, D)");
  if (!is_floating(p.q.dtype)) fail("q: expected a floating dtype");
  p.B = p.q.size[0], p.Q = p.q.size[1], p.H = p.q.size[2], p.D = p.q.size[3];
  p.k = view_of(k, "k");
  if (p.k.ndim != 4) fail("k: expected (B, K, Hkv, D)");
  p.K = p.k.size[1], p.Hkv = p.k.size[2];
  p.k = expect(k, "k", &p.q.dtype, {p.B, p.K, p.Hkv, p.D});
  p.v = expect(v, "v", &p.q.dtype, {p.B, p.K, p.Hkv, p.D});
  if (p.Hkv < 1 || p.H % p.Hkv != 0) fail("H must be a multiple of Hkv");
  if (p.D < 1 || p.D > 256) fail("head dim must be in 1..256");
  if (p.B < 1 || p.Q < 1 || p.K < 1 || p.K > INT32_MAX) fail("B, Q and K must be >= 1, K < 2^31");
  p.bias = broadcast_operand(bias, "bias", false, p.B, p.H, p.Hkv, p.Q, p.K);
  p.mask = broadcast_operand(mask, "mask", true, p.B, p.H, p.Hkv, p.Q, p.K);
  set_flags(p, flags);
  return p;
}

View optional_output(const OptionalArray& a, const char* name, const DType* dtype,
                     std::initializer_list<int64_t> shape) {
  return a ? expect(*a, name, dtype, shape) : View{};
}

void fwd(const Array& q, const Array& k, const Array& v, const OptionalArray& bias,
         const OptionalArray& mask, const Array& out, const Array& lse, double scale,
         double softcap, bool is_causal, int64_t window, bool scope_global, int num_threads) {
  const AttnProblem p = make_problem(q, k, v, bias, mask,
                                     {scale, softcap, is_causal, window, scope_global, num_threads});
  const DType f32 = DType::f32;
  FwdArgs args;
  args.out = expect(out, "out", &p.q.dtype, {p.B, p.Q, p.H, p.D});
  args.lse = expect(lse, "lse", &f32, {p.B, p.H, p.Q});
  nb::gil_scoped_release release;
  cpu::forward(p, args);
}

void bwd(const Array& q, const Array& k, const Array& v, const OptionalArray& bias,
         const OptionalArray& mask, const Array& out, const Array& dout, const Array& lse,
         const OptionalArray& dq, const OptionalArray& dk, const OptionalArray& dv,
         const OptionalArray& dbias, double scale, double softcap, bool is_causal, int64_t window,
         bool scope_global, bool deterministic, int num_threads) {
  (void)deterministic;  // the CPU backward is deterministic whatever is asked
  const AttnProblem p = make_problem(q, k, v, bias, mask,
                                     {scale, softcap, is_causal, window, scope_global, num_threads});
  const DType f32 = DType::f32;
  BwdArgs args;
  args.out = expect(out, "out", &p.q.dtype, {p.B, p.Q, p.H, p.D});
  args.dout = expect(dout, "dout", &p.q.dtype, {p.B, p.Q, p.H, p.D});
  args.lse = expect(lse, "lse", &f32, {p.B, p.H, p.Q});
  args.dq = optional_output(dq, "dq", &p.q.dtype, {p.B, p.Q, p.H, p.D});
  args.dk = optional_output(dk, "dk", &p.q.dtype, {p.B, p.K, p.Hkv, p.D});
  args.dv = optional_output(dv, "dv", &p.q.dtype, {p.B, p.K, p.Hkv, p.D});
  if (dbias) {
    if (!p.bias.present()) fail("dbias given without bias");
    args.dbias = expect(*dbias, "dbias", &p.bias.dtype,
                        {p.bias.size[0], p.bias.size[1], p.bias.size[2], p.K});
  }
  nb::gil_scoped_release release;
  cpu::backward(p, args);
}

void visible_mask(const OptionalArray& bias, const OptionalArray& mask, const Array& out,
                  int64_t B, int64_t H, int64_t Hkv, int64_t Q, int64_t K, bool is_causal,
                  int64_t window, bool scope_global, int num_threads) {
  if (B < 1 || Q < 1 || K < 1 || K > INT32_MAX || Hkv < 1 || H % Hkv != 0)
    fail("visible_mask: bad sizes");
  AttnProblem p;
  p.B = B, p.H = H, p.Hkv = Hkv, p.Q = Q, p.K = K;
  p.bias = broadcast_operand(bias, "bias", false, B, H, Hkv, Q, K);
  p.mask = broadcast_operand(mask, "mask", true, B, H, Hkv, Q, K);
  set_flags(p, {1.0, 0.0, is_causal, window, scope_global, num_threads});
  const DType boolean = DType::boolean;
  const View dst = expect(out, "out", &boolean, {B, H, Q, K});
  nb::gil_scoped_release release;
  write_visible_mask(p, dst, cpu::resolve_threads(num_threads));
}

// Rows broadcast over max(bias, mask) sizes, so each dim must be 1 or that maximum, and a head
// count must divide the row head count (head of row hs = hs * heads / Hs).
void topk_indices(const Array& bias, const OptionalArray& mask, const Array& out, int64_t window,
                  int num_threads) {
  if (window < 1) fail("window must be >= 1");
  if (num_threads < 0) fail("num_threads must be >= 0");
  const View b = view_of(bias, "bias");
  if (b.ndim != 4 || !is_floating(b.dtype)) fail("bias: expected a 4-D floating tensor");
  View m;
  if (mask) {
    m = view_of(*mask, "mask");
    if (m.ndim != 4 || m.dtype != DType::boolean || m.size[3] != b.size[3])
      fail("mask: expected a 4-D bool tensor with the bias's key length");
  }
  View bv = b, mv = m;
  int64_t rows[3];
  for (int d = 0; d < 3; ++d) {
    rows[d] = mask && m.size[d] > b.size[d] ? m.size[d] : b.size[d];
    if (rows[d] % b.size[d] != 0 || (mask && rows[d] % m.size[d] != 0) ||
        (d != 1 && (b.size[d] != 1 && b.size[d] != rows[d])))
      fail("topk_indices: bias and mask do not broadcast");
  }
  for (int d = 0; d < 4; ++d) {
    if (bv.size[d] == 1) bv.stride[d] = 0;
    if (mask && mv.size[d] == 1) mv.stride[d] = 0;
  }
  const int64_t K = b.size[3], width = window < K ? window : K;
  const DType i64 = DType::i64;
  const View dst = expect(out, "out", &i64, {rows[0], rows[1], rows[2], width});
  nb::gil_scoped_release release;
  write_topk_indices(bv, mv, dst, window, cpu::resolve_threads(num_threads));
}

nb::dict info() {
  nb::dict d;
  d["isa"] = cpu::active_isa();
  const char* const* names = nullptr;
  const int count = cpu::built_isas(&names);
  nb::list built;
  for (int i = 0; i < count; ++i) built.append(names[i]);
  d["isas_built"] = built;
  d["openmp"] = cpu::has_openmp();
  d["max_threads"] = cpu::max_threads();
#if defined(__clang__)
  d["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = "gcc " __VERSION__;
#else
  d["compiler"] = "unknown";
#endif
  return d;
}

}  // namespace
}  // namespace dmattn

NB_MODULE(_C, m) {
  using namespace dmattn;
  m.doc() = "dmattn CPU core: dynamic mask (top-k) attention kernels";
  m.def("fwd", &fwd, "q"_a.noconvert(), "k"_a.noconvert(), "v"_a.noconvert(),
        "bias"_a.noconvert().none(), "mask"_a.noconvert().none(), "out"_a.noconvert(),
        "lse"_a.noconvert(), nb::kw_only(), "scale"_a, "softcap"_a, "is_causal"_a, "window"_a,
        "scope_global"_a, "num_threads"_a,
        "Forward: writes out (B,Q,H,D) and lse (B,H,Q) float32.");
  m.def("bwd", &bwd, "q"_a.noconvert(), "k"_a.noconvert(), "v"_a.noconvert(),
        "bias"_a.noconvert().none(), "mask"_a.noconvert().none(), "out"_a.noconvert(),
        "dout"_a.noconvert(), "lse"_a.noconvert(), "dq"_a.noconvert().none(),
        "dk"_a.noconvert().none(), "dv"_a.noconvert().none(), "dbias"_a.noconvert().none(),
        nb::kw_only(), "scale"_a, "softcap"_a, "is_causal"_a, "window"_a, "scope_global"_a,
        "deterministic"_a, "num_threads"_a,
        "Backward: writes the gradients that are not None; deterministic always.");
  m.def("visible_mask", &visible_mask, "bias"_a.noconvert().none(), "mask"_a.noconvert().none(),
        "out"_a.noconvert(), nb::kw_only(), "B"_a, "H"_a, "Hkv"_a, "Q"_a, "K"_a, "is_causal"_a,
        "window"_a, "scope_global"_a, "num_threads"_a,
        "Writes the dense bool visible mask (B,H,Q,K) the attention uses.");
  m.def("topk_indices", &topk_indices, "bias"_a.noconvert(), "mask"_a.noconvert().none(),
        "out"_a.noconvert(), nb::kw_only(), "window"_a, "num_threads"_a,
        "Global-scope selected key indices per broadcast row, ascending, padded with -1.");
  m.def("info", &info, "Build and runtime facts: isa, isas_built, openmp, max_threads, compiler.");
}
