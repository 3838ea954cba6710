#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "dmattn/cpu_kernels.h"
#include "dmattn/plan.h"

namespace dmattn {
namespace cpu {
namespace {

struct IsaKernels {
  const char* name;
  bool (*supported)();
  void (*forward)(const Selection&, const FwdArgs&, int);
  void (*backward)(const Selection&, const BwdArgs&, int);
};

#if defined(DMATTN_HAS_ISA_avx512)
bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif
#if defined(DMATTN_HAS_ISA_avx2)
bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
#endif
bool always() { return true; }

// Best first; each entry exists only when CMake compiled that variant.
const IsaKernels kIsas[] = {
#if defined(DMATTN_HAS_ISA_avx512)
    {"avx512", cpu_has_avx512, avx512::forward, avx512::backward},
#endif
#if defined(DMATTN_HAS_ISA_avx2)
    {"avx2", cpu_has_avx2, avx2::forward, avx2::backward},
#endif
    {"generic", always, generic::forward, generic::backward},
};
constexpr int kIsaCount = sizeof(kIsas) / sizeof(kIsas[0]);

// The best supported variant, no better than DMATTN_CPU_ISA when that names a built one.
const IsaKernels& pick() {
  const char* cap = getenv("DMATTN_CPU_ISA");
  int first = 0;
  for (int i = 0; cap && i < kIsaCount; ++i)
    if (strcmp(cap, kIsas[i].name) == 0) first = i;
  for (int i = first; i < kIsaCount; ++i)
    if (kIsas[i].supported()) return kIsas[i];
  return kIsas[kIsaCount - 1];
}

}  // namespace

int resolve_threads(int requested) {
  if (requested > 0) return requested;
  return max_threads();
}

void forward(const AttnProblem& problem, const FwdArgs& args) {
  const int threads = resolve_threads(problem.num_threads);
  const Selection selection(problem, threads);
  pick().forward(selection, args, threads);
}

void backward(const AttnProblem& problem, const BwdArgs& args) {
  const int threads = resolve_threads(problem.num_threads);
  const Selection selection(problem, threads);
  pick().backward(selection, args, threads);
}

const char* active_isa() { return pick().name; }

int built_isas(const char* const** names) {
  static const char* const kNames[] = {
#if defined(DMATTN_HAS_ISA_avx512)
      "avx512",
#endif
#if defined(DMATTN_HAS_ISA_avx2)
      "avx2",
#endif
      "generic",
  };
  *names = kNames;
  return int(sizeof(kNames) / sizeof(kNames[0]));
}

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace cpu
}  // namespace dmattn
