// fastscale::fused_sgd_ on the CPU: SGD (weight decay, momentum, dampening, Nesterov,
// maximize) over a list of tensors, with each gradient's squared norm accumulated in the same
// pass over memory. The math is fastscale/reference.py's fused_sgd_ (the test oracle).
//
// Per element, one pass: read g, p (and b unless it is the first step); write p (and b).
// lr, grad_scale and found_inf are read on the host: they are CPU tensors here, so that costs
// no device synchronisation.
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/chunked.h"
#include "cpu/kernels.h"

namespace fastscale {

at::Tensor fused_sgd_cpu(at::TensorList params, at::TensorList grads,
                         at::TensorList momentum_buffers, const at::Tensor& lr,
                         double weight_decay, double momentum, double dampening, bool nesterov,
                         bool maximize, bool is_first_step,
                         const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf) {
  checks::check_fused_sgd_inputs(params, grads, momentum_buffers, lr, momentum, grad_scale,
                                 found_inf);
  if (params.empty()) return at::zeros({0}, lr.options().dtype(at::kFloat));
  const bool use_momentum = momentum != 0;

  cpu::SgdHyper h;
  h.lr = lr.item<double>();
  h.weight_decay = weight_decay;
  h.momentum = momentum;
  h.dampening = dampening;
  h.nesterov = nesterov;
  h.maximize = maximize;
  h.first_step = is_first_step;
  if (grad_scale) {
    h.has_grad_scale = true;
    h.grad_scale = grad_scale->item<double>();
  }
  // Any non-zero (NaN included, as torch.where(found_inf.bool(), ...) in the reference).
  h.write = !(found_inf && found_inf->item<double>() != 0);

  cpu::FlatTensors flat;
  std::vector<int64_t> numels;
  for (size_t i = 0; i < params.size(); ++i) {
    if (use_momentum) {
      flat.add_group({params[i], grads[i], momentum_buffers[i]}, {true, false, true});
    } else {
      flat.add_group({params[i], grads[i]}, {true, false});
    }
    numels.push_back(params[i].numel());
  }
  const std::vector<int64_t> first_chunk = cpu::chunk_starts(numels);
  const int64_t num_chunks = first_chunk.back();
  const int64_t elem = static_cast<int64_t>(params[0].element_size());
  std::vector<cpu::SgdChunk> chunks;
  chunks.reserve(num_chunks);
  int64_t total = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    auto* p = static_cast<char*>(flat.get(i, 0).data_ptr());
    const auto* g = static_cast<const char*>(flat.get(i, 1).const_data_ptr());
    auto* b = use_momentum ? static_cast<char*>(flat.get(i, 2).data_ptr()) : nullptr;
    for (int64_t begin = 0; begin < numels[i]; begin += cpu::kChunk) {
      const int64_t off = begin * elem;
      chunks.push_back({p + off, g + off, b ? b + off : nullptr,
                        std::min(cpu::kChunk, numels[i] - begin)});
    }
    total += numels[i];
  }

  std::vector<double> partial(num_chunks, 0.0);
  const cpu::Kernels& k = cpu::kernels();
  const at::ScalarType dtype = params[0].scalar_type();
  cpu::run_chunks(num_chunks, total, [&](int64_t begin, int64_t end) {
    k.sgd(dtype, h, chunks.data() + begin, end - begin, partial.data() + begin);
  });
  if (h.write) flat.write_back();
  return cpu::sum_partials(partial, first_chunk);
}

}  // namespace fastscale

TORCH_LIBRARY_IMPL(fastscale, CPU, m) { m.impl("fused_sgd_", &fastscale::fused_sgd_cpu); }
