// Input checks shared by the CPU and CUDA kernels of fastscale's ops.
//
// Device-agnostic on purpose (only ATen's Tensor API, no device headers): csrc/cpu/ and
// csrc/cuda/ both include it, so the two backends reject the same inputs with the same
// messages. Every message names the argument (and the list index) it is about.
#pragma once

#include <optional>
#include <string>

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/safe_numerics.h>

namespace fastscale::checks {

// The dtypes the kernels are compiled for; fp16/bf16 are computed in fp32.
inline bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
         dtype == at::kBFloat16;
}

inline void check_same_length(const char* name, at::TensorList tensors, const char* ref_name,
                              at::TensorList ref) {
  TORCH_CHECK(tensors.size() == ref.size(), "fastscale: ", name, " has ", tensors.size(),
              " tensors but ", ref_name, " has ", ref.size(), "; they must be the same length");
}

// Every tensor of `tensors` is defined, dense (strided), of a supported dtype, and shares
// dtype and device with `ref` (the first tensor of the call, called `ref_name` in messages);
// tensors[i] has the shape of same_shape_as[i] when same_shape_as is given.
inline void check_tensor_list(const char* name, at::TensorList tensors, const at::Tensor& ref,
                              const char* ref_name, at::TensorList same_shape_as = {}) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), "fastscale: ", name, "[", i, "] is undefined (None)");
    TORCH_CHECK(t.layout() == at::kStrided, "fastscale: ", name, "[", i, "] has layout ",
                t.layout(), "; sparse and other non-strided tensors are not supported");
    TORCH_CHECK(is_supported_dtype(t.scalar_type()), "fastscale: ", name, "[", i, "] has dtype ",
                t.scalar_type(), "; supported are float32, float64, float16 and bfloat16");
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastscale: ", name, "[", i, "] has dtype ",
                t.scalar_type(), " but ", ref_name, " has ", ref.scalar_type(),
                "; all tensors of one call must share a dtype");
    TORCH_CHECK(t.device() == ref.device(), "fastscale: ", name, "[", i, "] is on ", t.device(),
                " but ", ref_name, " is on ", ref.device(),
                "; all tensors of one call must share a device");
    if (!same_shape_as.empty()) {
      TORCH_CHECK(t.sizes() == same_shape_as[i].sizes(), "fastscale: ", name, "[", i,
                  "] has shape ", t.sizes(), " but its counterpart has shape ",
                  same_shape_as[i].sizes());
    }
  }
}

// A tensor of a written list must not overlap itself: writing an expanded view (stride 0) would
// race and its result is undefined.
inline void check_no_internal_overlap(const char* name, at::TensorList tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(at::has_internal_overlap(tensors[i]) != at::MemOverlap::Yes, "fastscale: ",
                name, "[", i, "] has overlapping memory (an expanded view?) and is written; "
                "pass a tensor whose elements each have their own memory");
  }
}

// lr, grad_scale, found_inf: per-step scalars passed as tensors (no recompiles, no host sync
// on the device that owns them). 0-dim; lr may also be a 1-element tensor.
inline void check_scalar_tensor(const char* name, const at::Tensor& t, const at::Device& device,
                                bool allow_one_element, bool allow_bool) {
  TORCH_CHECK(t.defined(), "fastscale: ", name, " is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, "fastscale: ", name, " must be a dense tensor");
  const bool shape_ok = t.dim() == 0 || (allow_one_element && t.numel() == 1);
  TORCH_CHECK(shape_ok, "fastscale: ", name, " must be a 0-dim tensor",
              allow_one_element ? " (or have exactly one element)" : "", ", got shape ",
              t.sizes());
  TORCH_CHECK(is_supported_dtype(t.scalar_type()) || (allow_bool && t.scalar_type() == at::kBool),
              "fastscale: ", name, " must be a float32/float64/float16/bfloat16",
              allow_bool ? " or bool" : "", " tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == device || t.device().is_cpu(), "fastscale: ", name, " is on ",
              t.device(), " but the parameters are on ", device,
              "; it must be on the parameters' device or on the CPU");
}

// Every input of fastscale::fused_sgd_, checked alike by the CPU and the CUDA kernel.
inline void check_fused_sgd_inputs(at::TensorList params, at::TensorList grads,
                                   at::TensorList momentum_buffers, const at::Tensor& lr,
                                   double momentum, const std::optional<at::Tensor>& grad_scale,
                                   const std::optional<at::Tensor>& found_inf) {
  const at::Device device = params.empty() ? lr.device() : params[0].device();
  check_scalar_tensor("lr", lr, device, /*allow_one_element=*/true, /*allow_bool=*/false);
  if (grad_scale) check_scalar_tensor("grad_scale", *grad_scale, device, false, false);
  if (found_inf) check_scalar_tensor("found_inf", *found_inf, device, false, true);
  check_same_length("grads", grads, "params", params);
  const bool use_momentum = momentum != 0;
  if (use_momentum) {
    check_same_length("momentum_buffers", momentum_buffers, "params", params);
  } else {
    TORCH_CHECK(momentum_buffers.empty() || momentum_buffers.size() == params.size(),
                "fastscale: momentum_buffers has ", momentum_buffers.size(),
                " tensors; with momentum == 0 pass [] (or one per parameter, ignored)");
  }
  if (params.empty()) return;
  check_tensor_list("params", params, params[0], "params[0]");
  check_tensor_list("grads", grads, params[0], "params[0]", params);
  check_no_internal_overlap("params", params);
  if (use_momentum) {
    check_tensor_list("momentum_buffers", momentum_buffers, params[0], "params[0]", params);
    check_no_internal_overlap("momentum_buffers", momentum_buffers);
  }
}

// Every input of fastscale::accumulate_grad_.
inline void check_accumulate_grad_inputs(at::TensorList snapshots, at::TensorList grads) {
  check_same_length("snapshots", snapshots, "grads", grads);
  if (grads.empty()) return;
  check_tensor_list("grads", grads, grads[0], "grads[0]");
  check_tensor_list("snapshots", snapshots, grads[0], "grads[0]", grads);
  check_no_internal_overlap("snapshots", snapshots);
}

// Every input of fastscale::arrival_norms_: out a contiguous 3-element fp32/fp64 tensor on the
// gradient's device; accumulated (when given) like grad in dtype, device and shape, and given
// whenever add is (it is written then, so it must not overlap itself, out or grad).
inline void check_arrival_norms_inputs(const at::Tensor& out, const at::Tensor& grad,
                                       const std::optional<at::Tensor>& accumulated, bool add) {
  TORCH_CHECK(out.defined() && out.layout() == at::kStrided && out.numel() == 3 &&
                  out.is_contiguous(),
              "fastscale: out must be a contiguous dense tensor of 3 elements");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble,
              "fastscale: out has dtype ", out.scalar_type(), "; it must be float32 or float64");
  const at::Tensor grads[] = {grad};
  check_tensor_list("grad", grads, grad, "grad");
  TORCH_CHECK(out.device() == grad.device(), "fastscale: out is on ", out.device(),
              " but grad is on ", grad.device());
  TORCH_CHECK(accumulated || !add, "fastscale: add=True needs accumulated (the .grad to add into)");
  if (accumulated) {
    const at::Tensor acc[] = {*accumulated};
    check_tensor_list("accumulated", acc, grad, "grad", grads);
    if (add) {
      check_no_internal_overlap("accumulated", acc);
      // as torch's `t += g`: g may be t itself, not part of it; out is neither
      // (TooHard: strides torch cannot decide on either; it lets those through too)
      TORCH_CHECK(at::get_overlap_status(*accumulated, grad) != at::MemOverlapStatus::Partial,
                  "fastscale: accumulated and grad partly overlap in memory; they must be the same "
                  "tensor or apart");
      const auto with_out = at::get_overlap_status(*accumulated, out);
      TORCH_CHECK(with_out != at::MemOverlapStatus::Partial && with_out != at::MemOverlapStatus::Full,
                  "fastscale: out overlaps accumulated, which is written");
    }
  }
}

// The two tensors of a per-example op (a layer's input and output gradient, or x and d):
// defined, dense, `dims`-D (`shape` says what the dims are), float32 or float64 (the products are
// BLAS matmuls in that dtype), of one dtype and device.
inline void check_float_pair(const char* first_name, const at::Tensor& first, const char* second_name,
                             const at::Tensor& second, int64_t dims, const char* shape) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{first_name, first},
                                {second_name, second}}) {
    TORCH_CHECK(t.defined(), "fastscale: ", name, " is undefined (None)");
    TORCH_CHECK(t.layout() == at::kStrided, "fastscale: ", name, " has layout ", t.layout(),
                "; sparse and other non-strided tensors are not supported");
    TORCH_CHECK(t.dim() == dims, "fastscale: ", name, " must be ", dims, "-D ", shape, ", got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "fastscale: ", name,
                " has dtype ", t.scalar_type(), "; supported are float32 and float64");
  }
  TORCH_CHECK(first.scalar_type() == second.scalar_type(), "fastscale: ", second_name, " has dtype ",
              second.scalar_type(), " but ", first_name, " has ", first.scalar_type());
  TORCH_CHECK(first.device() == second.device(), "fastscale: ", second_name, " is on ", second.device(),
              " but ", first_name, " is on ", first.device());
}

// Every input of fastscale::linear_example_sq: input [B, T, d_in] and grad_output [B, T, d_out].
inline void check_linear_example_sq_inputs(const at::Tensor& input, const at::Tensor& grad_output) {
  check_float_pair("input", input, "grad_output", grad_output, 3, "[batch, tokens, features]");
  TORCH_CHECK(input.size(0) == grad_output.size(0) && input.size(1) == grad_output.size(1),
              "fastscale: input has shape ", input.sizes(), " and grad_output ", grad_output.sizes(),
              "; they must agree in batch and tokens (dims 0 and 1)");
}

// Every input of fastscale::conv_example_sq: input [B, C, H, W] and grad_output [B, O, Ho, Wo]
// as checked for linear_example_sq, two numbers per geometry argument, and grad_output's size
// the one a convolution of input with that geometry gives.
inline void check_conv_example_sq_inputs(const at::Tensor& input, const at::Tensor& grad_output,
                                         at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation,
                                         int64_t groups) {
  check_float_pair("input", input, "grad_output", grad_output, 4, "[batch, channels, height, width]");
  for (const auto& [name, v, least] : {std::tuple<const char*, at::IntArrayRef, int64_t>{"kernel_size", kernel_size, 1},
                                       {"stride", stride, 1}, {"padding", padding, 0}, {"dilation", dilation, 1}}) {
    TORCH_CHECK(v.size() == 2 && v[0] >= least && v[1] >= least, "fastscale: ", name,
                " must be two integers >= ", least, ", got ", v);
  }
  TORCH_CHECK(groups >= 1 && input.size(1) % groups == 0 && grad_output.size(1) % groups == 0,
              "fastscale: groups must be >= 1 and divide input's channels (", input.size(1),
              ") and grad_output's (", grad_output.size(1), "), got ", groups);
  TORCH_CHECK(input.size(0) == grad_output.size(0), "fastscale: input has batch ", input.size(0),
              " but grad_output has ", grad_output.size(0));
  for (int k = 0; k < 2; ++k) {
    // In overflow-safe arithmetic: a span past int64 covers more than any input, so no output.
    int64_t span = 0, padded = 0;
    const bool wide = c10::mul_overflows(dilation[k], kernel_size[k] - 1, &span) ||
                      c10::add_overflows(span, int64_t{1}, &span);
    TORCH_CHECK(!c10::mul_overflows(padding[k], int64_t{2}, &padded) &&
                    !c10::add_overflows(padded, input.size(2 + k), &padded),
                "fastscale: padding ", padding, " is too large");
    const int64_t out = wide || padded < span ? 0 : (padded - span) / stride[k] + 1;
    TORCH_CHECK(out >= 1, "fastscale: this geometry gives an empty output (", k == 0 ? "height" : "width", " 0)");
    TORCH_CHECK(grad_output.size(2 + k) == out, "fastscale: grad_output has spatial size ",
                grad_output.sizes().slice(2), " but this geometry gives ", k == 0 ? "height " : "width ", out);
  }
}

// Every input of fastscale::row_dot_sums: x and d 2-D [rows, n] of one shape, dtype (float32 or
// float64) and device, dense.
inline void check_row_dot_sums_inputs(const at::Tensor& x, const at::Tensor& d) {
  check_float_pair("x", x, "d", d, 2, "[rows, n]");
  TORCH_CHECK(x.sizes() == d.sizes(), "fastscale: d has shape ", d.sizes(), " but x has ", x.sizes());
}

// A norm's forward statistics (mean, rstd) and weight beside its input: dense, of the given
// shapes, of the input's dtype and device.
inline void check_norm_stats(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& rstd,
                             at::IntArrayRef stats_shape, const at::Tensor& weight, at::IntArrayRef weight_shape) {
  for (const auto& [name, t, want] : {std::tuple<const char*, const at::Tensor&, at::IntArrayRef>{"mean", mean, stats_shape},
                                      {"rstd", rstd, stats_shape}, {"weight", weight, weight_shape}}) {
    TORCH_CHECK(t.defined() && t.layout() == at::kStrided, "fastscale: ", name, " must be a dense tensor");
    TORCH_CHECK(t.sizes() == want, "fastscale: ", name, " must have shape ", want, ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == input.scalar_type(), "fastscale: ", name, " has dtype ", t.scalar_type(),
                " but input has ", input.scalar_type());
    TORCH_CHECK(t.device() == input.device(), "fastscale: ", name, " is on ", t.device(), " but input is on ",
                input.device());
  }
}

// Every input of fastscale::layer_norm_example_backward: grad_output and input [B, T, k] as for
// linear_example_sq; mean and rstd [B, T] and weight [k], dense, of their dtype and device.
inline void check_layer_norm_example_inputs(const at::Tensor& grad_output, const at::Tensor& input,
                                            const at::Tensor& mean, const at::Tensor& rstd,
                                            const at::Tensor& weight) {
  check_float_pair("input", input, "grad_output", grad_output, 3, "[batch, tokens, features]");
  TORCH_CHECK(input.sizes() == grad_output.sizes(), "fastscale: grad_output has shape ", grad_output.sizes(),
              " but input has ", input.sizes());
  check_norm_stats(input, mean, rstd, input.sizes().slice(0, 2), weight, input.sizes().slice(2));
}

// Every input of fastscale::group_norm_example_backward: grad_output and input [N, C, HW] as for
// linear_example_sq; mean and rstd [N, groups] and weight [C] of their dtype and device; groups
// divides C.
inline void check_group_norm_example_inputs(const at::Tensor& grad_output, const at::Tensor& input,
                                            const at::Tensor& mean, const at::Tensor& rstd,
                                            const at::Tensor& weight, int64_t groups) {
  check_float_pair("input", input, "grad_output", grad_output, 3, "[batch, channels, positions]");
  TORCH_CHECK(input.sizes() == grad_output.sizes(), "fastscale: grad_output has shape ", grad_output.sizes(),
              " but input has ", input.sizes());
  TORCH_CHECK(groups >= 1 && input.size(1) % groups == 0, "fastscale: groups must be >= 1 and divide the ",
              input.size(1), " channels, got ", groups);
  const int64_t rows[] = {input.size(0), groups};
  check_norm_stats(input, mean, rstd, rows, weight, input.sizes().slice(1, 1));
}

}  // namespace fastscale::checks
