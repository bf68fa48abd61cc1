// Input checks for the CUDA kernels (csrc/cuda/*.cu).
//
// Stand-in until csrc/checks.h (shared with the CPU kernels) lands on main; the messages follow
// the same pattern (name the argument and the list index) so the two can be unified.
#pragma once

#include <cstddef>

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

namespace fastscale::cuda_checks {

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

// Every tensor is defined, strided, of a supported dtype, on a CUDA device, and shares dtype
// and device with `ref`; tensors[i] has the shape of same_shape_as[i] when that is given.
inline void check_tensor_list(const char* name, at::TensorList tensors, const at::Tensor& ref,
                              at::TensorList same_shape_as = {}) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), "fastscale: ", name, "[", i, "] is undefined (None)");
    TORCH_CHECK(t.layout() == at::kStrided, "fastscale: ", name, "[", i, "] has layout ",
                t.layout(), "; sparse and other non-strided tensors are not supported");
    TORCH_CHECK(t.is_cuda(), "fastscale: ", name, "[", i, "] is on ", t.device(),
                "; the CUDA kernel needs CUDA tensors");
    TORCH_CHECK(is_supported_dtype(t.scalar_type()), "fastscale: ", name, "[", i, "] has dtype ",
                t.scalar_type(), "; supported are float32, float64, float16 and bfloat16");
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastscale: ", name, "[", i, "] has dtype ",
                t.scalar_type(), " but the first tensor of the call has ", ref.scalar_type(),
                "; all tensors of one call must share a dtype");
    TORCH_CHECK(t.device() == ref.device(), "fastscale: ", name, "[", i, "] is on ", t.device(),
                " but the first tensor of the call is on ", ref.device(),
                "; all tensors of one call must share a device");
    if (!same_shape_as.empty()) {
      TORCH_CHECK(t.sizes() == same_shape_as[i].sizes(), "fastscale: ", name, "[", i,
                  "] has shape ", t.sizes(), " but its partner has shape ",
                  same_shape_as[i].sizes());
    }
  }
}

// A written tensor must not overlap itself: writing an expanded view (stride 0) would race.
inline void check_no_internal_overlap(const char* name, at::TensorList tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(at::has_internal_overlap(tensors[i]) != at::MemOverlap::Yes, "fastscale: ", name,
                "[", i, "] has overlapping memory (an expanded view?) and is written");
  }
}

// lr, grad_scale, found_inf: per-step scalars passed as tensors. One element; float32/64,
// float16, bfloat16 (and bool where allowed); on the tensors' device or on the CPU.
inline void check_scalar_tensor(const char* name, const at::Tensor& t, const at::Device& device,
                                bool allow_bool) {
  TORCH_CHECK(t.defined(), "fastscale: ", name, " is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, "fastscale: ", name, " must be a dense tensor");
  TORCH_CHECK(t.numel() == 1, "fastscale: ", name, " must be a 0-dim tensor, got shape ",
              t.sizes());
  const bool dtype_ok = is_supported_dtype(t.scalar_type()) ||
                        (allow_bool && t.scalar_type() == at::kBool);
  TORCH_CHECK(dtype_ok, "fastscale: ", name, " must be a float32/float64/float16/bfloat16",
              allow_bool ? " or bool" : "", " tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == device || t.device().is_cpu(), "fastscale: ", name, " is on ",
              t.device(), " but the tensors are on ", device,
              "; it must be on their device or on the CPU");
}

}  // namespace fastscale::cuda_checks
