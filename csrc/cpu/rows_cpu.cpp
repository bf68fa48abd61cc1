// Row-wise ops on [R, N] tensors, the two passes of GroupNorm's backward with one row per
// (example, channel) (fastscale/per_example/norm.py), done here so that the per-example
// gradients of its weight and bias come from the first pass instead of a pass of their own:
// - fastscale::row_dot_sums: (sum_k x[r,k] d[r,k], sum_k d[r,k]) per row, one read of each;
// - fastscale::row_affine: a[r] d[r,k] + b[r] x[r,k] + c[r], the input gradient.
// The math is fastscale/reference.py's.
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

template <typename T>
void row_affine_range(const T* d, const T* x, const T* a, const T* b, const T* c, int64_t n, int64_t begin,
                      int64_t end, T* out) {
  for (int64_t r = begin; r < end; ++r) {
    const T* dr = d + r * n;
    const T* xr = x + r * n;
    T* o = out + r * n;
    const T ar = a[r], br = b[r], cr = c[r];
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) o[k] = ar * dr[k] + br * xr[k] + cr;
  }
}

int64_t rows_per_task(int64_t n) { return std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(n, 1)); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> row_dot_sums_cpu(const at::Tensor& x_, const at::Tensor& d_) {
  checks::check_row_dot_sums_inputs(x_, d_);
  const at::Tensor x = x_.contiguous();
  const at::Tensor d = d_.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor dots = at::empty({rows}, x.options());
  at::Tensor sums = at::empty({rows}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "row_dot_sums", [&] {
    at::parallel_for(0, rows, rows_per_task(n), [&](int64_t begin, int64_t end) {
      row_dot_sums_range(x.const_data_ptr<scalar_t>(), d.const_data_ptr<scalar_t>(), n, begin, end,
                         dots.data_ptr<scalar_t>(), sums.data_ptr<scalar_t>());
    });
  });
  return {dots, sums};
}

at::Tensor row_affine_cpu(const at::Tensor& d_, const at::Tensor& x_, const at::Tensor& a_, const at::Tensor& b_,
                          const at::Tensor& c_) {
  checks::check_row_affine_inputs(d_, x_, a_, b_, c_);
  const at::Tensor d = d_.contiguous(), x = x_.contiguous();
  const at::Tensor a = a_.contiguous(), b = b_.contiguous(), c = c_.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor out = at::empty({rows, n}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "row_affine", [&] {
    at::parallel_for(0, rows, rows_per_task(n), [&](int64_t begin, int64_t end) {
      row_affine_range(d.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
                       b.const_data_ptr<scalar_t>(), c.const_data_ptr<scalar_t>(), n, begin, end,
                       out.data_ptr<scalar_t>());
    });
  });
  return out;
}

}  // namespace fastscale

TORCH_LIBRARY_IMPL(fastscale, CPU, m) {
  m.impl("row_dot_sums", &fastscale::row_dot_sums_cpu);
  m.impl("row_affine", &fastscale::row_affine_cpu);
}
