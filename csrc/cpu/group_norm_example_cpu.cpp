// fastscale::group_norm_example_backward on the CPU: GroupNorm's backward in the two passes
// torch's kernel makes, per example: the sums sum_k x dy and sum_k dy per channel, then the input
// gradient dx = rstd w dy + c2 x + c3 per (example, group). Every example's weight and bias
// gradients come from the first pass's sums: w_rows[n, c] = rstd (sum x dy - mean sum dy),
// b_rows[n, c] = sum dy, at no pass of their own. Each example is one task: the result does not
// depend on the number of threads. The math is fastscale/reference.py's group_norm_example_backward.
#include <tuple>
#include <vector>

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
void example_backward(const T* dy, const T* x, const T* mean, const T* rstd, const T* w, int64_t channels,
                      int64_t groups, int64_t hw, T* dx, T* w_row, T* b_row) {
  std::vector<T> sxd(channels);
  for (int64_t c = 0; c < channels; ++c) cpu::dot_and_sum(x + c * hw, dy + c * hw, hw, &sxd[c], &b_row[c]);
  const int64_t per_group = channels / groups;
  const T scale = T(1) / static_cast<T>(per_group * hw);
  for (int64_t g = 0; g < groups; ++g) {
    const T mu = mean[g], rs = rstd[g];
    T ds = 0, db = 0;
    for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
      w_row[c] = (sxd[c] - mu * b_row[c]) * rs;
      ds += sxd[c] * w[c];
      db += b_row[c] * w[c];
    }
    if (dx == nullptr) continue;
    const T c2 = (db * mu - ds) * rs * rs * rs * scale;
    const T c3 = -c2 * mu - db * rs * scale;
    for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
      const T a = rs * w[c];
      const T* dr = dy + c * hw;
      const T* xr = x + c * hw;
      T* o = dx + c * hw;
#pragma omp simd
      for (int64_t k = 0; k < hw; ++k) o[k] = a * dr[k] + c2 * xr[k] + c3;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_example_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& mean_, const at::Tensor& rstd_,
    const at::Tensor& weight_, int64_t groups, bool input_grad) {
  checks::check_group_norm_example_inputs(grad_output_, input_, mean_, rstd_, weight_, groups);
  const at::Tensor dy = grad_output_.contiguous(), x = input_.contiguous();
  const at::Tensor mean = mean_.contiguous(), rstd = rstd_.contiguous(), weight = weight_.contiguous();
  const int64_t batch = x.size(0), channels = x.size(1), hw = x.size(2);
  at::Tensor dx = at::empty(input_grad ? x.sizes() : at::IntArrayRef{0}, x.options());
  at::Tensor w_rows = at::empty({batch, channels}, x.options());
  at::Tensor b_rows = at::empty({batch, channels}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "group_norm_example_backward", [&] {
    at::parallel_for(0, batch, cpu::tasks_per_grain(channels * hw), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t at = n * channels * hw;
        example_backward(dy.const_data_ptr<scalar_t>() + at, x.const_data_ptr<scalar_t>() + at,
                         mean.const_data_ptr<scalar_t>() + n * groups, rstd.const_data_ptr<scalar_t>() + n * groups,
                         weight.const_data_ptr<scalar_t>(), channels, groups, hw,
                         input_grad ? dx.data_ptr<scalar_t>() + at : nullptr, w_rows.data_ptr<scalar_t>() + n * channels,
                         b_rows.data_ptr<scalar_t>() + n * channels);
      }
    });
  });
  return {dx, w_rows, b_rows};
}

}  // namespace fastscale

TORCH_LIBRARY_IMPL(fastscale, CPU, m) {
  m.impl("group_norm_example_backward", &fastscale::group_norm_example_backward_cpu);
}
