// Picks the chunk loops for the running CPU once (see kernels.h).
#include "cpu/kernels.h"

#include <cstdlib>
#include <cstring>

#include <c10/util/Exception.h>

namespace fastscale::cpu {
namespace {

bool cpu_has_avx2() {
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

Kernels choose() {
  const char* forced = std::getenv("FASTSCALE_CPU_ISA");
  Kernels avx2{};
  const bool want_default = forced != nullptr && std::strcmp(forced, "default") == 0;
  if (!want_default && cpu_has_avx2() && avx2_kernels(&avx2)) return avx2;
  return default_kernels();
}

}  // namespace

void unsupported_dtype(c10::ScalarType dtype) {
  TORCH_CHECK(false, "fastscale: the CPU loops have no ", dtype, " kernel");
  std::abort();  // unreachable: TORCH_CHECK(false, ...) throws
}

const Kernels& kernels() {
  static const Kernels chosen = choose();
  return chosen;
}

}  // namespace fastscale::cpu
