// The seam between the host functions (fused_sgd_cpu.cpp, accumulate_grad_cpu.cpp) and the
// vectorised loops, which are compiled twice: once for the baseline x86-64/whatever ISA the
// extension is built for (kernels_default.cpp) and once for AVX2+FMA+F16C (kernels_avx2.cpp).
// The host code splits every tensor into fixed-size chunks, runs at::parallel_for over the
// flat chunk list and calls the loop of the best ISA the running CPU supports on each range.
#pragma once

#include <cstdint>

#include <c10/core/ScalarType.h>

namespace fastscale::cpu {

// Elements per chunk. Fixed, so the per-chunk partial norms, and their sum taken in chunk
// order, do not depend on the number of threads. A multiple of every vector width.
constexpr int64_t kChunk = 1 << 14;

// Hyper-parameters of one fused_sgd_ call, already read from their tensors on the host and
// in double; the loops round them to the compute type (fp32, or fp64 for fp64) as the
// pure-torch reference does.
struct SgdHyper {
  double lr = 0;
  double weight_decay = 0;
  double momentum = 0;
  double dampening = 0;
  double grad_scale = 1;
  bool has_grad_scale = false;
  bool nesterov = false;
  bool maximize = false;
  bool first_step = false;
  bool write = true;  // false when found_inf is set: only the norms are computed
};

// One chunk of one tensor: pointers already offset to the chunk's first element.
struct SgdChunk {
  void* param;
  const void* grad;
  void* buf;  // nullptr when momentum == 0
  int64_t numel;
};

struct AccumulateChunk {
  void* snapshot;
  const void* grad;
  int64_t numel;
};

struct ArrivalChunk {
  const void* grad;
  void* accumulated;  // nullptr: no .grad yet, only |g|^2
  int64_t numel;
};

// One chunk's partial sums of fastscale::arrival_norms_.
struct ArrivalSums {
  double gg = 0, gt = 0, tt = 0;
};

// Process chunks[0, n); partial[i] <- sum of squares of chunk i's (unscaled) gradient.
using SgdChunksFn = void (*)(c10::ScalarType, const SgdHyper&, const SgdChunk*, int64_t n,
                             double* partial);
// partial[i] <- sum((g - s)^2) (or sum(g^2) when first); s <- g.
using AccumulateChunksFn = void (*)(c10::ScalarType, bool first, const AccumulateChunk*,
                                    int64_t n, double* partial);
// sums[i] <- (sum(g^2), sum(g * t), sum(t^2)) of chunk i (the last two 0 when accumulated is
// nullptr), t before the add; with add, t <- t + g in the same pass.
using ArrivalChunksFn = void (*)(c10::ScalarType, bool add, const ArrivalChunk*, int64_t n,
                                 ArrivalSums* sums);

struct Kernels {
  SgdChunksFn sgd;
  AccumulateChunksFn accumulate;
  ArrivalChunksFn arrival;
  const char* isa;
};

// The loops' error path, compiled in the baseline kernels.cpp: the host checks dtypes first,
// and an inline TORCH_CHECK in the AVX2 file could give the linker an AVX2 copy of a helper
// that baseline code shares (see kernels_avx2.cpp).
[[noreturn]] void unsupported_dtype(c10::ScalarType dtype);

// Defined in kernels_default.cpp / kernels_avx2.cpp.
Kernels default_kernels();
bool avx2_kernels(Kernels* out);  // false when not compiled in (non-x86, non-GCC)

// The kernels for the running CPU, chosen once. FASTSCALE_CPU_ISA=default forces the baseline.
const Kernels& kernels();

}  // namespace fastscale::cpu
