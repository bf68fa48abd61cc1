// fastscale::arrival_norms_ on the CPU: a micro-batch's gradient g as autograd hands it to
// .grad (from a tensor hook), and t = .grad before g is added: out <- (|g|^2, g.t, |t|^2) in
// one read of each, and with add t <- t + g in the same pass (AccumulateGrad's own add, so the
// norms cost no pass of their own), split in chunks over the threads. The math is
// fastscale/reference.py's arrival_norms_.
#include <optional>

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
  const cpu::ArrivalSums total =
      cpu::arrival_sums(grad.scalar_type(), flat.get(0, 0).const_data_ptr(),
                        accumulated ? flat.get(0, 1).data_ptr() : nullptr, grad.numel(), add);
  flat.write_back();
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
