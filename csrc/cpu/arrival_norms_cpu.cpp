// fastscale::arrival_norms_ on the CPU: a micro-batch's gradient g as autograd hands it to
// .grad (from a tensor hook), and t = .grad before g is added: out <- (|g|^2, g.t, |t|^2) in
// one read of each, and with add t <- t + g in the same pass (AccumulateGrad's own add, so the
// norms cost no pass of their own), split in chunks over the threads. The math is
// fastscale/reference.py's arrival_norms_.
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/chunked.h"
#include "cpu/kernels.h"

namespace fastscale {

void arrival_norms_cpu(const at::Tensor& out, const at::Tensor& grad,
                       const std::optional<at::Tensor>& accumulated, bool add) {
  checks::check_arrival_norms_inputs(out, grad, accumulated, add);
  cpu::FlatTensors flat;
  if (accumulated) {
    flat.add_group({grad, *accumulated}, {false, add});
  } else {
    flat.add_group({grad}, {false});
  }
  const int64_t numel = grad.numel();
  const int64_t elem = static_cast<int64_t>(grad.element_size());
  const auto* g = static_cast<const char*>(flat.get(0, 0).const_data_ptr());
  auto* t = accumulated ? static_cast<char*>(flat.get(0, 1).data_ptr()) : nullptr;
  std::vector<cpu::ArrivalChunk> chunks;
  for (int64_t begin = 0; begin < numel; begin += cpu::kChunk) {
    const int64_t off = begin * elem;
    chunks.push_back({g + off, t ? t + off : nullptr, std::min(cpu::kChunk, numel - begin)});
  }
  const auto num_chunks = static_cast<int64_t>(chunks.size());
  std::vector<cpu::ArrivalSums> sums(num_chunks);
  const cpu::Kernels& k = cpu::kernels();
  const at::ScalarType dtype = grad.scalar_type();
  cpu::run_chunks(num_chunks, numel, [&](int64_t begin, int64_t end) {
    k.arrival(dtype, add, chunks.data() + begin, end - begin, sums.data() + begin);
  });
  flat.write_back();
  cpu::ArrivalSums total;  // in chunk order: the same for any number of threads
  for (const cpu::ArrivalSums& s : sums) {
    total.gg += s.gg;
    total.gt += s.gt;
    total.tt += s.tt;
  }
  if (out.scalar_type() == at::kDouble) {
    double* o = out.data_ptr<double>();
    o[0] = total.gg;
    o[1] = total.gt;
    o[2] = total.tt;
  } else {
    float* o = out.data_ptr<float>();
    o[0] = static_cast<float>(total.gg);
    o[1] = static_cast<float>(total.gt);
    o[2] = static_cast<float>(total.tt);
  }
}

}  // namespace fastscale

TORCH_LIBRARY_IMPL(fastscale, CPU, m) {
  m.impl("arrival_norms_", &fastscale::arrival_norms_cpu);
}
