// The chunk loops compiled for AVX2+FMA+F16C, chosen at run time (kernels.cpp) only on CPUs
// that have them, so the extension itself still loads on any x86-64.
//
// Why a pragma and not -mavx2 on this file: setup.py and the first-use compile
// (torch.utils.cpp_extension.load) share one flag list for all sources, and per-file flags
// would need a second build mechanism. GCC's `#pragma GCC target` placed before every include
// gives this translation unit (and only it) the ISA for code generation and intrinsics; g++
// does not define the ISA macros from the pragma, so they are defined by hand for the headers
// that test them (sleef.h, at::vec). CPU_CAPABILITY_AVX2 selects at::vec's AVX2 Vectorized,
// which lives in its own inline namespace (at::vec::AVX2): no clash with the baseline copy.
// Residual risk, as for any per-file ISA flags (PyTorch's own kernels included): an inline
// helper from a header instantiated here and in a baseline file is merged by the linker, which
// may keep this AVX2 copy. Checked with nm: this object shares no such function with the others
// (the error path was moved out for that reason; see unsupported_dtype in kernels.h).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("avx,avx2,fma,f16c")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define FASTSCALE_ISA isa_avx2
#include "cpu/kernels_impl.h"

namespace fastscale::cpu {
bool avx2_kernels(Kernels* out) {
  *out = isa_avx2::make_kernels("avx2");
  return true;
}
}  // namespace fastscale::cpu

#else  // no AVX2 build: the dispatcher keeps the baseline loops
#include "cpu/kernels.h"

namespace fastscale::cpu {
bool avx2_kernels(Kernels*) { return false; }
}  // namespace fastscale::cpu
#endif
