// fastscale::layer_norm_example_backward on the CPU: LayerNorm's backward, one read of its input
// and output gradient, that also gives every example's weight and bias gradient. Per row (token)
// t of example b, with x^ = (x - mean) rstd and g = weight * dy:
//   dx = rstd / k (k g - sum g - x^ sum g x^),   w_rows[b] += x^ dy,   b_rows[b] += dy.
// torch's backward sums x^ dy over all rows for the weight gradient; summing each example's rows
// apart costs nothing more, while the hooked rule reads x and dy again and forms x^. Each example
// is one task (its rows summed in order): results do not depend on the number of threads.
// The math is fastscale/reference.py's layer_norm_example_backward.
#include <algorithm>
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/examples.h"

namespace fastscale {
namespace {

template <typename T>
void example_rows(const T* dy, const T* x, const T* mean, const T* rstd, const T* w, int64_t tokens, int64_t k,
                  T* dx, T* w_row, T* b_row) {
  std::fill(w_row, w_row + k, T(0));
  std::fill(b_row, b_row + k, T(0));
  for (int64_t t = 0; t < tokens; ++t) {
    const T* dyr = dy + t * k;
    const T* xr = x + t * k;
    const T mu = mean[t], rs = rstd[t];
    T sum_g = 0, sum_gx = 0;
#pragma omp simd reduction(+ : sum_g, sum_gx)
    for (int64_t j = 0; j < k; ++j) {
      const T xh = (xr[j] - mu) * rs;
      const T g = w[j] * dyr[j];
      sum_g += g;
      sum_gx += g * xh;
      w_row[j] += xh * dyr[j];
      b_row[j] += dyr[j];
    }
    T* dxr = dx + t * k;
    const T scale = rs / static_cast<T>(k), kk = static_cast<T>(k);
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) {  // the row is in L1 from the loop above
      const T xh = (xr[j] - mu) * rs;
      dxr[j] = scale * (kk * w[j] * dyr[j] - sum_g - xh * sum_gx);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_example_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& mean_, const at::Tensor& rstd_,
    const at::Tensor& weight_) {
  checks::check_layer_norm_example_inputs(grad_output_, input_, mean_, rstd_, weight_);
  const at::Tensor dy = grad_output_.contiguous(), x = input_.contiguous();
  const at::Tensor mean = mean_.contiguous(), rstd = rstd_.contiguous(), weight = weight_.contiguous();
  const int64_t batch = x.size(0), tokens = x.size(1), k = x.size(2);
  at::Tensor dx = at::empty({batch, tokens, k}, x.options());
  at::Tensor w_rows = at::empty({batch, k}, x.options());
  at::Tensor b_rows = at::empty({batch, k}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "layer_norm_example_backward", [&] {
    at::parallel_for(0, batch, cpu::tasks_per_grain(tokens * k), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t row = b * tokens;
        example_rows(dy.const_data_ptr<scalar_t>() + row * k, x.const_data_ptr<scalar_t>() + row * k,
                     mean.const_data_ptr<scalar_t>() + row, rstd.const_data_ptr<scalar_t>() + row,
                     weight.const_data_ptr<scalar_t>(), tokens, k, dx.data_ptr<scalar_t>() + row * k,
                     w_rows.data_ptr<scalar_t>() + b * k, b_rows.data_ptr<scalar_t>() + b * k);
      }
    });
  });
  return {dx, w_rows, b_rows};
}

}  // namespace fastscale

TORCH_LIBRARY_IMPL(fastscale, CPU, m) {
  m.impl("layer_norm_example_backward", &fastscale::layer_norm_example_backward_cpu);
}
