// CUDA kernel of fastscale::fused_sgd_: one SGD step over many tensors per launch, returning
// each tensor's squared gradient norm, computed while the gradient is read.
//
// The math is fastscale/reference.py's fused_sgd_ (torch.optim.SGD's update, AMP unscale first).
// Memory traffic per element is the floor for the update: read g, p (and b); write p (and b).
// lr, grad_scale and found_inf are read on the device, so the step never waits on the GPU and
// can be captured in a CUDA graph.
#include <optional>
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
using cuda::ScalarArg;
using cuda::Vec16;

// Tensors per launch, so the arguments stay under 4 KiB: 3 lists (p, g, b) with momentum.
constexpr int kMaxTensorsMomentum = 88;
constexpr int kMaxTensorsPlain = 120;

// One chunk's hyper-parameters in the compute type, and the per-element update.
template <typename opmath_t, bool kMomentum>
struct SgdStep {
  opmath_t lr;
  opmath_t grad_scale;
  opmath_t weight_decay;
  opmath_t momentum;
  opmath_t one_minus_dampening;
  bool has_grad_scale;
  bool has_weight_decay;
  bool nesterov;
  bool maximize;
  bool is_first_step;

  // AMP: GradScaler's unscale, fused into the pass (torch's fused SGD divides the same way).
  __device__ __forceinline__ opmath_t unscale(opmath_t g) const {
    return has_grad_scale ? g / grad_scale : g;
  }

  // torch.optim.SGD on one element; g is the unscaled gradient, p and b are updated.
  __device__ __forceinline__ void apply(opmath_t g, opmath_t& p, opmath_t& b) const {
    if (maximize) {
      g = -g;
    }
    if (has_weight_decay) {
      g = g + weight_decay * p;
    }
    if constexpr (kMomentum) {
      // torch.optim.SGD: the first buffer is the gradient itself, undampened.
      b = is_first_step ? g : momentum * b + one_minus_dampening * g;
      g = nesterov ? g + momentum * b : b;
    }
    p = p - lr * g;
  }
};

// Lists: 0 = params (written), 1 = grads (read), 2 = momentum buffers (written, kMomentum only).
template <typename scalar_t, bool kMomentum>
struct FusedSgdFunctor {
  using opmath_t = at::opmath_type<scalar_t>;
  static constexpr int kDepth = kMomentum ? 3 : 2;

  ScalarArg lr;
  ScalarArg grad_scale;
  ScalarArg found_inf;
  double weight_decay;
  double momentum;
  double one_minus_dampening;
  bool has_grad_scale;
  bool has_found_inf;
  bool nesterov;
  bool maximize;
  bool is_first_step;

  __device__ __forceinline__ opmath_t operator()(void* const (&ptrs)[kDepth], int64_t begin,
                                                 int64_t n) const {
    SgdStep<opmath_t, kMomentum> step;
    step.lr = static_cast<opmath_t>(cuda::read_scalar(lr));
    step.grad_scale = static_cast<opmath_t>(cuda::read_scalar(grad_scale));
    step.weight_decay = static_cast<opmath_t>(weight_decay);
    step.momentum = static_cast<opmath_t>(momentum);
    step.one_minus_dampening = static_cast<opmath_t>(one_minus_dampening);
    step.has_grad_scale = has_grad_scale;
    step.has_weight_decay = weight_decay != 0.0;
    step.nesterov = nesterov;
    step.maximize = maximize;
    step.is_first_step = is_first_step;

    scalar_t* p = static_cast<scalar_t*>(ptrs[0]) + begin;
    const scalar_t* g = static_cast<const scalar_t*>(ptrs[1]) + begin;
    scalar_t* b = nullptr;
    if constexpr (kMomentum) {
      b = static_cast<scalar_t*>(ptrs[2]) + begin;
    }
    // AMP: an inf/nan step writes nothing (checked here, on the device); norms still come back.
    const bool skip = has_found_inf && cuda::read_scalar(found_inf) != 0.0;
    return skip ? run<false>(step, p, g, b, n) : run<true>(step, p, g, b, n);
  }

  // kWrite = false: only the norm (found_inf set), so p and b are neither read nor written.
  template <bool kWrite>
  __device__ __forceinline__ opmath_t run(const SgdStep<opmath_t, kMomentum>& step, scalar_t* p,
                                          const scalar_t* g, scalar_t* b, int64_t n) const {
    constexpr int kVec = Vec16<scalar_t>::kSize;
    const bool read_buffer = kWrite && kMomentum && !step.is_first_step;
    const bool aligned = cuda::is_aligned16(p) && cuda::is_aligned16(g) &&
                         (!kMomentum || cuda::is_aligned16(b));
    const int64_t n_vecs = aligned ? n / kVec : 0;
    opmath_t sum_sq = 0;

    for (int64_t v0 = threadIdx.x; v0 < n_vecs; v0 += kBlockThreads * kUnroll) {
      Vec16<scalar_t> gv[kUnroll];
      Vec16<scalar_t> pv[kUnroll];
      Vec16<scalar_t> bv[kUnroll];
      // All loads first, so kUnroll x lists 16-byte loads are in flight together.
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + u * kBlockThreads;
        if (v < n_vecs) {
          gv[u] = cuda::load_vec(g, v);
          if (kWrite) {
            pv[u] = cuda::load_vec(static_cast<const scalar_t*>(p), v);
          }
          if (read_buffer) {
            bv[u] = cuda::load_vec(static_cast<const scalar_t*>(b), v);
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
          const opmath_t gk = step.unscale(static_cast<opmath_t>(gv[u].v[k]));
          sum_sq += gk * gk;
          if (kWrite) {
            opmath_t pk = static_cast<opmath_t>(pv[u].v[k]);
            opmath_t bk = read_buffer ? static_cast<opmath_t>(bv[u].v[k]) : opmath_t(0);
            step.apply(gk, pk, bk);
            pv[u].v[k] = static_cast<scalar_t>(pk);
            if constexpr (kMomentum) {
              bv[u].v[k] = static_cast<scalar_t>(bk);
            }
          }
        }
        if (kWrite) {
          cuda::store_vec(p, v, pv[u]);
          if constexpr (kMomentum) {
            cuda::store_vec(b, v, bv[u]);
          }
        }
      }
    }

    // The tail after the last whole vector (or the whole chunk when not 16-byte aligned).
    for (int64_t i = n_vecs * kVec + threadIdx.x; i < n; i += kBlockThreads) {
      const opmath_t gi = step.unscale(static_cast<opmath_t>(g[i]));
      sum_sq += gi * gi;
      if (kWrite) {
        opmath_t pi = static_cast<opmath_t>(p[i]);
        opmath_t bi = read_buffer ? static_cast<opmath_t>(b[i]) : opmath_t(0);
        step.apply(gi, pi, bi);
        p[i] = static_cast<scalar_t>(pi);
        if constexpr (kMomentum) {
          b[i] = static_cast<scalar_t>(bi);
        }
      }
    }
    return sum_sq;
  }
};

template <typename scalar_t, bool kMomentum>
at::Tensor launch_fused_sgd(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                            const std::vector<at::Tensor>& buffers,
                            const FusedSgdFunctor<scalar_t, kMomentum>& functor,
                            const at::Device& device) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kDepth = FusedSgdFunctor<scalar_t, kMomentum>::kDepth;
  constexpr int kMaxTensors = kMomentum ? kMaxTensorsMomentum : kMaxTensorsPlain;
  std::vector<cuda::TensorRow<kDepth>> rows(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    rows[i].ptrs[0] = params[i].mutable_data_ptr();
    // Grads are only read; the kernel's pointer table is untyped.
    rows[i].ptrs[1] = const_cast<void*>(grads[i].const_data_ptr());
    if constexpr (kMomentum) {
      rows[i].ptrs[2] = buffers[i].mutable_data_ptr();
    }
    rows[i].numel = params[i].numel();
  }
  return cuda::multi_tensor_apply_with_norms<kDepth, kMaxTensors, opmath_t>(rows, functor, device);
}

}  // namespace

at::Tensor fused_sgd_cuda(at::TensorList params, at::TensorList grads,
                          at::TensorList momentum_buffers, const at::Tensor& lr,
                          double weight_decay, double momentum, double dampening, bool nesterov,
                          bool maximize, bool is_first_step,
                          const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf) {
  checks::check_fused_sgd_inputs(params, grads, momentum_buffers, lr, momentum, grad_scale,
                                 found_inf);
  const at::Device device = params.empty() ? lr.device() : params[0].device();
  if (params.empty()) {
    return at::empty({0}, at::TensorOptions().dtype(at::kFloat).device(device));
  }
  TORCH_CHECK(device.is_cuda(), "fastscale: params[0] is on ", device, "; the CUDA kernel needs CUDA tensors");
  const bool use_momentum = momentum != 0.0;
  // momentum == 0: the buffers (normally []) are neither read nor written, as in the reference.

  const c10::cuda::CUDAGuard device_guard(device);

  // Rows whose tensors are not laid out alike run on contiguous working copies.
  std::vector<at::Tensor> p_work(params.begin(), params.end());
  std::vector<at::Tensor> g_work(grads.begin(), grads.end());
  std::vector<at::Tensor> b_work;
  if (use_momentum) {
    b_work.assign(momentum_buffers.begin(), momentum_buffers.end());
  }
  std::vector<cuda::CopyBack> copy_back;
  for (size_t i = 0; i < params.size(); ++i) {
    const bool alike = cuda::same_dense_layout(params[i], grads[i]) &&
                       (!use_momentum || cuda::same_dense_layout(params[i], momentum_buffers[i]));
    if (!alike) {
      p_work[i] = cuda::working_tensor(params[i], /*written=*/true, copy_back);
      g_work[i] = cuda::working_tensor(grads[i], /*written=*/false, copy_back);
      if (use_momentum) {
        b_work[i] = cuda::working_tensor(momentum_buffers[i], /*written=*/true, copy_back);
      }
    }
  }

  const ScalarArg lr_arg = cuda::make_scalar_arg(lr, 0.0);
  const ScalarArg grad_scale_arg = cuda::make_scalar_arg(grad_scale, 1.0);
  const ScalarArg found_inf_arg = cuda::make_scalar_arg(found_inf, 0.0);

  at::Tensor norms;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "fused_sgd_cuda", [&] {
        auto fill = [&](auto& f) {
          f.lr = lr_arg;
          f.grad_scale = grad_scale_arg;
          f.found_inf = found_inf_arg;
          f.weight_decay = weight_decay;
          f.momentum = momentum;
          // Computed in double on the host, rounded once to the compute type on the device,
          // as torch's alpha=1 - dampening is.
          f.one_minus_dampening = 1.0 - dampening;
          f.has_grad_scale = grad_scale.has_value();
          f.has_found_inf = found_inf.has_value();
          f.nesterov = nesterov;
          f.maximize = maximize;
          f.is_first_step = is_first_step;
        };
        if (use_momentum) {
          FusedSgdFunctor<scalar_t, true> functor{};
          fill(functor);
          norms = launch_fused_sgd<scalar_t, true>(p_work, g_work, b_work, functor, device);
        } else {
          FusedSgdFunctor<scalar_t, false> functor{};
          fill(functor);
          norms = launch_fused_sgd<scalar_t, false>(p_work, g_work, b_work, functor, device);
        }
      });
  cuda::finish_copy_back(copy_back);
  return norms;
}

}  // namespace fastscale

TORCH_LIBRARY_IMPL(fastscale, CUDA, m) { m.impl("fused_sgd_", &fastscale::fused_sgd_cuda); }
