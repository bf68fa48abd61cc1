// fastscale::accumulate_grad_ on the CPU: one micro-batch's gradient taken out of the
// accumulating .grad in one pass: n = sum((g - s)^2) (sum(g^2) when first, s not read),
// s <- g. Grads are never written. The math is fastscale/reference.py's accumulate_grad_.
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/chunked.h"
#include "cpu/kernels.h"

namespace fastscale {

at::Tensor accumulate_grad_cpu(at::TensorList snapshots, at::TensorList grads, bool first) {
  checks::check_accumulate_grad_inputs(snapshots, grads);
  if (grads.empty()) return at::zeros({0}, at::TensorOptions().dtype(at::kFloat));

  cpu::FlatTensors flat;
  std::vector<int64_t> numels;
  for (size_t i = 0; i < grads.size(); ++i) {
    flat.add_group({snapshots[i], grads[i]}, {true, false});
    numels.push_back(grads[i].numel());
  }
  const std::vector<int64_t> first_chunk = cpu::chunk_starts(numels);
  const int64_t num_chunks = first_chunk.back();
  const int64_t elem = static_cast<int64_t>(grads[0].element_size());
  std::vector<cpu::AccumulateChunk> chunks;
  chunks.reserve(num_chunks);
  int64_t total = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    auto* s = static_cast<char*>(flat.get(i, 0).data_ptr());
    const auto* g = static_cast<const char*>(flat.get(i, 1).const_data_ptr());
    for (int64_t begin = 0; begin < numels[i]; begin += cpu::kChunk) {
      const int64_t off = begin * elem;
      chunks.push_back({s + off, g + off, std::min(cpu::kChunk, numels[i] - begin)});
    }
    total += numels[i];
  }

  std::vector<double> partial(num_chunks, 0.0);
  const cpu::Kernels& k = cpu::kernels();
  const at::ScalarType dtype = grads[0].scalar_type();
  cpu::run_chunks(num_chunks, total, [&](int64_t begin, int64_t end) {
    k.accumulate(dtype, first, chunks.data() + begin, end - begin, partial.data() + begin);
  });
  flat.write_back();
  return cpu::sum_partials(partial, first_chunk);
}

}  // namespace fastscale

TORCH_LIBRARY_IMPL(fastscale, CPU, m) {
  m.impl("accumulate_grad_", &fastscale::accumulate_grad_cpu);
}
