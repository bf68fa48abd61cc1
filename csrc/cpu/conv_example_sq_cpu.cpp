// fastscale::conv_example_sq on the CPU: a Conv2d layer's weight gradient, every example's
// squared share of it and every example's bias gradient, one example at a time, as
// linear_example_sq_cpu.cpp does for Linear: the example's input patches (im2col,
// [C*kh*kw, Ho*Wo]) into a scratch, one BLAS matmul per group with its output gradient into a
// scratch of the weight's shape, then one pass that adds that into the weight gradient and takes
// its squared norm. Memory: one example's patches and gradient per thread block
// (cpu/examples.h), not B of them. The math is fastscale/reference.py's conv_example_sq.
#include <cstring>
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/examples.h"

namespace fastscale {
namespace {

struct ConvGeometry {
  int64_t channels, height, width;  // the input's
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t out_h, out_w;
};

// One example's input x [C, H, W] copied into the interior of padded [C, H + 2ph, W + 2pw], whose
// border was zeroed once and stays zero: im2col then reads without bounds checks.
template <typename T>
void pad_into(const T* x, const ConvGeometry& g, T* padded) {
  const int64_t hp = g.height + 2 * g.ph, wp = g.width + 2 * g.pw;
  for (int64_t c = 0; c < g.channels; ++c) {
    for (int64_t h = 0; h < g.height; ++h) {
      std::memcpy(padded + (c * hp + h + g.ph) * wp + g.pw, x + (c * g.height + h) * g.width, g.width * sizeof(T));
    }
  }
}

// patches[(c*kh + i)*kw + j][ho*out_w + wo] = xp[c][ho*sh + i*dh][wo*sw + j*dw] for one example's
// padded input xp [C, H + 2ph, W + 2pw] (every index inside it, by the output size's formula).
template <typename T>
void im2col(const T* xp, const ConvGeometry& g, T* patches) {
  const int64_t hp = g.height + 2 * g.ph, wp = g.width + 2 * g.pw;
  const int64_t positions = g.out_h * g.out_w;
  for (int64_t c = 0; c < g.channels; ++c) {
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j) {
        const T* src = xp + (c * hp + i * g.dh) * wp + j * g.dw;
        T* out = patches + ((c * g.kh + i) * g.kw + j) * positions;
        for (int64_t ho = 0; ho < g.out_h; ++ho, out += g.out_w) {
          const T* in = src + ho * g.sh * wp;
          if (g.sw == 1) {
            std::memcpy(out, in, g.out_w * sizeof(T));
          } else if (g.sw == 2) {  // a constant stride the compiler vectorises (measured: 1.8x faster)
            for (int64_t wo = 0; wo < g.out_w; ++wo) out[wo] = in[2 * wo];
          } else {
            for (int64_t wo = 0; wo < g.out_w; ++wo) out[wo] = in[wo * g.sw];
          }
        }
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_example_sq_cpu(const at::Tensor& input_, const at::Tensor& grad_output_,
                                                      at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                                      int64_t groups) {
  checks::check_conv_example_sq_inputs(input_, grad_output_, kernel_size, stride, padding, dilation, groups);
  const at::Tensor input = input_.contiguous();
  const at::Tensor grad_output = grad_output_.contiguous();
  const int64_t batch = input.size(0), out_channels = grad_output.size(1);
  ConvGeometry g{input.size(1), input.size(2), input.size(3), kernel_size[0], kernel_size[1],
                 stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                 grad_output.size(2), grad_output.size(3)};
  const int64_t in_per_group = g.channels / groups * g.kh * g.kw;  // a weight row's length
  const int64_t out_per_group = out_channels / groups;
  const int64_t positions = g.out_h * g.out_w;
  at::Tensor weight_grad = at::empty({out_channels, g.channels / groups, g.kh, g.kw}, input.options());
  at::Tensor sq = at::empty({batch}, input.options());
  // every example's bias gradient, its output gradient summed over positions: taken here while
  // that is in cache after the matmul, so neither the bias gradient nor its norm reads it again
  at::Tensor bias_grads = at::empty({batch, out_channels}, input.options());
  if (batch == 0) return {weight_grad.zero_(), sq, bias_grads};
  const bool pad = g.ph > 0 || g.pw > 0;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_example_sq", [&] {
    const int64_t held = input.numel() + grad_output.numel();
    cpu::over_example_blocks(batch, weight_grad, held, [&](int64_t begin, int64_t end, const at::Tensor& sum) {
      const at::Tensor example = end - begin > 1 ? at::empty_like(sum) : sum;
      const at::Tensor patches = at::empty({groups, in_per_group, positions}, input.options());
      const at::Tensor padded =
          pad ? at::zeros({g.channels, g.height + 2 * g.ph, g.width + 2 * g.pw}, input.options()) : at::Tensor();
      scalar_t* p = patches.data_ptr<scalar_t>();
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* x = input.const_data_ptr<scalar_t>() + b * g.channels * g.height * g.width;
        const scalar_t* d = grad_output.const_data_ptr<scalar_t>() + b * out_channels * positions;
        if (pad) pad_into(x, g, padded.data_ptr<scalar_t>());
        im2col(pad ? padded.const_data_ptr<scalar_t>() : x, g, p);
        // per group: d [out/g, positions] patches^T [positions, in/g*kh*kw]; the block's first
        // example straight into its sum
        scalar_t* target = (b == begin ? sum : example).data_ptr<scalar_t>();
        for (int64_t k = 0; k < groups; ++k) {
          cpu::matmul(d + k * out_per_group * positions, /*a_t=*/false, p + k * in_per_group * positions,
                      /*b_t=*/true, out_per_group, in_per_group, positions, target + k * out_per_group * in_per_group);
        }
        cpu::take_example(sum, example, b == begin, sq, b);
        cpu::row_sums(d, out_channels, positions, bias_grads.data_ptr<scalar_t>() + b * out_channels);
      }
    });
  });
  return {weight_grad, sq, bias_grads};
}

}  // namespace fastscale

TORCH_LIBRARY_IMPL(fastscale, CPU, m) {
  m.impl("conv_example_sq", &fastscale::conv_example_sq_cpu);
}
