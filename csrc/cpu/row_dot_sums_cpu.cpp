// fastscale::row_dot_sums on the CPU: for x, d of shape [R, N], (sum_k x[r,k] d[r,k], sum_k d[r,k])
// per row in one read of each. GroupNorm's per-example weight and bias gradients are these per
// (example, channel) (fastscale/per_example/norm.py); torch needs a product temporary and two
// more passes for them. The math is fastscale/reference.py's row_dot_sums.
#include <algorithm>
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"

namespace fastscale {

namespace {

// Rows [begin, end): each by one thread, summed in a fixed order, so the result is the same for
// any number of threads. (A function of its own: a pragma cannot sit inside AT_DISPATCH.)
template <typename T>
void row_dot_sums_range(const T* x, const T* d, int64_t n, int64_t begin, int64_t end, T* dots, T* sums) {
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * n;
    const T* dr = d + r * n;
    T dot = 0, sum = 0;
#pragma omp simd reduction(+ : dot, sum)
    for (int64_t k = 0; k < n; ++k) {
      dot += xr[k] * dr[k];
      sum += dr[k];
    }
    dots[r] = dot;
    sums[r] = sum;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> row_dot_sums_cpu(const at::Tensor& x_, const at::Tensor& d_) {
  checks::check_row_dot_sums_inputs(x_, d_);
  const at::Tensor x = x_.contiguous();
  const at::Tensor d = d_.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor dots = at::empty({rows}, x.options());
  at::Tensor sums = at::empty({rows}, x.options());
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(n, 1));  // ~32K elements a task
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "row_dot_sums", [&] {
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      row_dot_sums_range(x.const_data_ptr<scalar_t>(), d.const_data_ptr<scalar_t>(), n, begin, end,
                         dots.data_ptr<scalar_t>(), sums.data_ptr<scalar_t>());
    });
  });
  return {dots, sums};
}

}  // namespace fastscale

TORCH_LIBRARY_IMPL(fastscale, CPU, m) {
  m.impl("row_dot_sums", &fastscale::row_dot_sums_cpu);
}
