// Attention kernels of the CPU core. cpu_attention.cpp is compiled once per instruction set into
// dmattn::cpu::<isa>; forward()/backward() below pick the best variant the running CPU supports.
#pragma once

#include "dmattn/params.h"

namespace dmattn {

class Selection;

namespace cpu {

#define DMATTN_DECLARE_ISA_KERNELS(isa)                                                  \
  namespace isa {                                                                        \
  void forward(const Selection& selection, const FwdArgs& args, int num_threads);        \
  void backward(const Selection& selection, const BwdArgs& args, int num_threads);       \
  }

DMATTN_DECLARE_ISA_KERNELS(generic)
DMATTN_DECLARE_ISA_KERNELS(avx2)
DMATTN_DECLARE_ISA_KERNELS(avx512)

#undef DMATTN_DECLARE_ISA_KERNELS

// Thread count a call uses: `requested`, or the OpenMP default when 0.
int resolve_threads(int requested);

void forward(const AttnProblem& problem, const FwdArgs& args);
void backward(const AttnProblem& problem, const BwdArgs& args);

// Name of the variant forward()/backward() run ("avx512", "avx2" or "generic"). The environment
// variable DMATTN_CPU_ISA may lower it (for testing the other variants on one machine).
const char* active_isa();
// The variants compiled into this binary, best first.
int built_isas(const char* const** names);
bool has_openmp();
int max_threads();

}  // namespace cpu
}  // namespace dmattn
