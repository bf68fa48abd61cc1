// CUDA kernel of fastscale::accumulate_grad_: takes one micro-batch's gradient out of .grad as it
// accumulates. For each (snapshot s, grad g): n = sum((g - s)^2) (sum(g^2) when `first`, s not
// read), then s <- g; returns the n's as an fp32 vector. Grads are never written.
//
// The math is fastscale/reference.py's accumulate_grad_. One pass: read g (and s), write s.
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "multi_tensor_apply.cuh"

namespace fastscale {
namespace {

using cuda::kBlockThreads;
using cuda::kUnroll;
using cuda::Vec16;

// Two lists (snapshots, grads): arguments stay under 4 KiB.
constexpr int kMaxTensors = 120;

// Lists: 0 = snapshots (written), 1 = grads (read).
template <typename scalar_t>
struct AccumulateGradFunctor {
  // Differences in fp32 for fp16/bf16, fp64 for fp64 (reference.py).
  using opmath_t = at::opmath_type<scalar_t>;

  bool first;

  __device__ __forceinline__ opmath_t operator()(void* const (&ptrs)[2], int64_t begin,
                                                 int64_t n) const {
    scalar_t* s = static_cast<scalar_t*>(ptrs[0]) + begin;
    const scalar_t* g = static_cast<const scalar_t*>(ptrs[1]) + begin;
    return first ? run<true>(s, g, n) : run<false>(s, g, n);
  }

  template <bool kFirst>
  __device__ __forceinline__ opmath_t run(scalar_t* s, const scalar_t* g, int64_t n) const {
    constexpr int kVec = Vec16<scalar_t>::kSize;
    const bool aligned = cuda::is_aligned16(s) && cuda::is_aligned16(g);
    const int64_t n_vecs = aligned ? n / kVec : 0;
    opmath_t sum_sq = 0;

    for (int64_t v0 = threadIdx.x; v0 < n_vecs; v0 += kBlockThreads * kUnroll) {
      Vec16<scalar_t> gv[kUnroll];
      Vec16<scalar_t> sv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + u * kBlockThreads;
        if (v < n_vecs) {
          gv[u] = cuda::load_vec(g, v);
          if (!kFirst) {
            sv[u] = cuda::load_vec(static_cast<const scalar_t*>(s), v);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + u * kBlockThreads;
        if (v >= n_vecs) {
          continue;
        }
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          opmath_t d = static_cast<opmath_t>(gv[u].v[k]);
          if (!kFirst) {
            d = d - static_cast<opmath_t>(sv[u].v[k]);
          }
          sum_sq += d * d;
        }
        cuda::store_vec(s, v, gv[u]);  // s <- g, bit for bit
      }
    }

    for (int64_t i = n_vecs * kVec + threadIdx.x; i < n; i += kBlockThreads) {
      const scalar_t gi = g[i];
      opmath_t d = static_cast<opmath_t>(gi);
      if (!kFirst) {
        d = d - static_cast<opmath_t>(s[i]);
      }
      sum_sq += d * d;
      s[i] = gi;
    }
    return sum_sq;
  }
};

}  // namespace

at::Tensor accumulate_grad_cuda(at::TensorList snapshots, at::TensorList grads, bool first) {
  checks::check_accumulate_grad_inputs(snapshots, grads);
  if (grads.empty()) {
    // As the reference: an empty call has no device to speak of.
    return at::empty({0}, at::TensorOptions().dtype(at::kFloat));
  }
  TORCH_CHECK(grads[0].is_cuda(), "fastscale: grads[0] is on ", grads[0].device(),
              "; the CUDA kernel needs CUDA tensors");
  const at::Device device = grads[0].device();
  const c10::cuda::CUDAGuard device_guard(device);

  // Rows whose tensors are not laid out alike run on contiguous working copies.
  std::vector<at::Tensor> s_work(snapshots.begin(), snapshots.end());
  std::vector<at::Tensor> g_work(grads.begin(), grads.end());
  std::vector<cuda::CopyBack> copy_back;
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!cuda::same_dense_layout(snapshots[i], grads[i])) {
      s_work[i] = cuda::working_tensor(snapshots[i], /*written=*/true, copy_back);
      g_work[i] = cuda::working_tensor(grads[i], /*written=*/false, copy_back);
    }
  }

  at::Tensor norms;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grads[0].scalar_type(), "accumulate_grad_cuda", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        std::vector<cuda::TensorRow<2>> rows(grads.size());
        for (size_t i = 0; i < grads.size(); ++i) {
          rows[i].ptrs[0] = s_work[i].mutable_data_ptr();
          // Grads are only read; the kernel's pointer table is untyped.
          rows[i].ptrs[1] = const_cast<void*>(g_work[i].const_data_ptr());
          rows[i].numel = grads[i].numel();
        }
        AccumulateGradFunctor<scalar_t> functor{};
        functor.first = first;
        norms = cuda::multi_tensor_apply_with_norms<2, kMaxTensors, opmath_t>(rows, functor, device);
      });
  cuda::finish_copy_back(copy_back);
  return norms;
}

}  // namespace fastscale

TORCH_LIBRARY_IMPL(fastscale, CUDA, m) {
  m.impl("accumulate_grad_", &fastscale::accumulate_grad_cuda);
}
