// The chunk loops compiled for the baseline ISA of the build (SSE2 on x86-64): always safe to
// run, used when the CPU lacks AVX2/FMA/F16C or FASTSCALE_CPU_ISA=default.
#define CPU_CAPABILITY DEFAULT
#define FASTSCALE_ISA isa_default
#include "cpu/kernels_impl.h"

namespace fastscale::cpu {
Kernels default_kernels() { return isa_default::make_kernels("default"); }
}  // namespace fastscale::cpu
