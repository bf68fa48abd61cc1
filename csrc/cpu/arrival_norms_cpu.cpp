// fastscale::arrival_norms_ on the CPU: a micro-batch's gradient g as autograd hands it to
// .grad (from a tensor hook), and t = .grad before g is added: out <- (|g|^2, g.t) in one read
// of each, split in chunks over the threads. The math is fastscale/reference.py's arrival_norms_.
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/chunked.h"
#include "cpu/kernels.h"

namespace fastscale {

void arrival_norms_cpu(const at::Tensor& out, const at::Tensor& grad,
                       const std::optional<at::Tensor>& accumulated) {
  checks::check_arrival_norms_inputs(out, grad, accumulated);
  cpu::FlatTensors flat;
  if (accumulated) {
    flat.add_group({grad, *accumulated}, {false, false});
  } else {
    flat.add_group({grad}, {false});
  }
  const int64_t numel = grad.numel();
  const int64_t elem = static_cast<int64_t>(grad.element_size());
  const auto* g = static_cast<const char*>(flat.get(0, 0).const_data_ptr());
  const auto* t = accumulated ? static_cast<const char*>(flat.get(0, 1).const_data_ptr()) : nullptr;
  std::vector<cpu::ArrivalChunk> chunks;
  for (int64_t begin = 0; begin < numel; begin += cpu::kChunk) {
    const int64_t off = begin * elem;
    chunks.push_back({g + off, t ? t + off : nullptr, std::min(cpu::kChunk, numel - begin)});
  }
  const auto num_chunks = static_cast<int64_t>(chunks.size());
  std::vector<double> gg(num_chunks, 0.0), gt(num_chunks, 0.0);
  const cpu::Kernels& k = cpu::kernels();
  const at::ScalarType dtype = grad.scalar_type();
  cpu::run_chunks(num_chunks, numel, [&](int64_t begin, int64_t end) {
    k.arrival(dtype, chunks.data() + begin, end - begin, gg.data() + begin, gt.data() + begin);
  });
  double sgg = 0, sgt = 0;  // in chunk order: the same for any number of threads
  for (int64_t c = 0; c < num_chunks; ++c) {
    sgg += gg[c];
    sgt += gt[c];
  }
  if (out.scalar_type() == at::kDouble) {
    double* o = out.data_ptr<double>();
    o[0] = sgg;
    o[1] = sgt;
  } else {
    float* o = out.data_ptr<float>();
    o[0] = static_cast<float>(sgg);
    o[1] = static_cast<float>(sgt);
  }
}

}  // namespace fastscale

TORCH_LIBRARY_IMPL(fastscale, CPU, m) {
  m.impl("arrival_norms_", &fastscale::arrival_norms_cpu);
}
