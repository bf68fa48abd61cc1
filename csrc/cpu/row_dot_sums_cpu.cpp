// fastscale::row_dot_sums on the CPU: for x, d of shape [R, N], (sum_k x[r,k] d[r,k], sum_k d[r,k])
// per row in one read of each. GroupNorm's per-example weight and bias gradients are these per
// (example, channel), for the hooked rule of a GroupNorm that is not fused
// (fastscale/per_example/norm.py); torch needs a product temporary and two more passes for them.
// The math is fastscale/reference.py's row_dot_sums.
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/examples.h"

namespace fastscale {

std::tuple<at::Tensor, at::Tensor> row_dot_sums_cpu(const at::Tensor& x_, const at::Tensor& d_) {
  checks::check_row_dot_sums_inputs(x_, d_);
  const at::Tensor x = x_.contiguous();
  const at::Tensor d = d_.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor dots = at::empty({rows}, x.options());
  at::Tensor sums = at::empty({rows}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "row_dot_sums", [&] {
    // each row by one thread: the same for any number of threads
    at::parallel_for(0, rows, cpu::tasks_per_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        cpu::dot_and_sum(x.const_data_ptr<scalar_t>() + r * n, d.const_data_ptr<scalar_t>() + r * n, n,
                         dots.data_ptr<scalar_t>() + r, sums.data_ptr<scalar_t>() + r);
      }
    });
  });
  return {dots, sums};
}

}  // namespace fastscale

TORCH_LIBRARY_IMPL(fastscale, CPU, m) {
  m.impl("row_dot_sums", &fastscale::row_dot_sums_cpu);
}
