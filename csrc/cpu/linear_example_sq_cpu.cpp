// fastscale::linear_example_sq on the CPU: a Linear layer's weight gradient sum_b D_b^T A_b and
// every example's |D_b^T A_b|^2, one example at a time. Each example's gradient is one BLAS
// matmul into a scratch of d_out x d_in (in cache), then one pass adds it into the weight
// gradient and takes its squared norm (the arrival loop: |e|^2 while dw += e). So the
// per-example norms cost that pass, not a second computation: B small matmuls of depth T were
// measured as fast as autograd's one matmul of depth B*T on the bench transformer's layers, and
// memory is one example's gradient per thread block (cpu/examples.h), not B of them. The math is
// fastscale/reference.py's.
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/examples.h"

namespace fastscale {

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_example_sq_cpu(const at::Tensor& input_,
                                                        const at::Tensor& grad_output_) {
  checks::check_linear_example_sq_inputs(input_, grad_output_);
  const at::Tensor input = input_.contiguous();
  const at::Tensor grad_output = grad_output_.contiguous();
  const int64_t batch = input.size(0), tokens = input.size(1), in = input.size(2), out = grad_output.size(2);
  at::Tensor weight_grad = at::empty({out, in}, input.options());
  at::Tensor sq = at::empty({batch}, input.options());
  at::Tensor bias_grads = at::empty({batch, out}, input.options());
  if (batch == 0) return {weight_grad.zero_(), sq, bias_grads};
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "linear_example_sq", [&] {
    const scalar_t* a = input.const_data_ptr<scalar_t>();
    const scalar_t* d = grad_output.const_data_ptr<scalar_t>();
    const int64_t held = input.numel() + grad_output.numel();
    cpu::over_example_blocks(batch, weight_grad, held, [&](int64_t begin, int64_t end, const at::Tensor& sum) {
      const at::Tensor example = end - begin > 1 ? at::empty_like(sum) : sum;
      for (int64_t b = begin; b < end; ++b) {
        // d_b^T a_b, [out, in]; the block's first example straight into its sum
        scalar_t* target = (b == begin ? sum : example).data_ptr<scalar_t>();
        cpu::matmul(d + b * tokens * out, /*a_t=*/true, a + b * tokens * in, /*b_t=*/false, out, in, tokens, target);
        cpu::take_example(sum, example, b == begin, sq, b);
        cpu::column_sums(d + b * tokens * out, tokens, out, bias_grads.data_ptr<scalar_t>() + b * out);
      }
    });
  });
  return {weight_grad, sq, bias_grads};
}

}  // namespace fastscale

TORCH_LIBRARY_IMPL(fastscale, CPU, m) {
  m.impl("linear_example_sq", &fastscale::linear_example_sq_cpu);
}
