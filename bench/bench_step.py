"""One optimizer step on the CPU: fastscale against what users run today, in the same run.

Candidates (fp32, momentum 0.9, weight decay 5e-4):
  torch_foreach            torch.optim.SGD(foreach=True)
  torch_fused              torch.optim.SGD(fused=True)
  torch_fused_norm_sched   torch fused SGD + torch._foreach_norm of the grads (the statistics
                           a user would otherwise compute) + an lr scheduler step
  fastscale_native         FusedScaledSGD, compiled kernel: scaled + warmed-up lr, statistics
  fastscale_torch          FusedScaledSGD, pure-torch path, same work

Run:  pytest bench/bench_step.py --benchmark-json=bench/results/cpu.json
      python bench/summarize.py bench/results/cpu.json
"""

import pytest
import torch

import fastscale
from models import ROUNDS, SIZES, make_params

NATIVE = "cpu" in fastscale._extension.native_device_types()
HYPER = dict(lr=1e-4, momentum=0.9, weight_decay=5e-4)


def fastscale_step(fused):
    def make(params):
        opt = fastscale.FusedScaledSGD(
            params, **HYPER, batch_size=1024, base_batch_size=256, warmup_steps=10**6,
            noise_scale=True, fused=fused,
        )
        return opt.step
    return make


def torch_step(**flags):
    def make(params):
        return torch.optim.SGD(params, **HYPER, **flags).step
    return make


def torch_fused_norm_sched(params):
    opt = torch.optim.SGD(params, **HYPER, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10**6))
    grads = [p.grad for p in params]

    def step():
        norms = torch._foreach_norm(grads)
        opt.step()
        sched.step()
        return norms
    return step


CANDIDATES = {
    "torch_foreach": torch_step(foreach=True),
    "torch_fused": torch_step(fused=True),
    "torch_fused_norm_sched": torch_fused_norm_sched,
    "fastscale_native": fastscale_step(True),
    "fastscale_torch": fastscale_step(False),
}


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("candidate", list(CANDIDATES))
def bench_step(benchmark, size, candidate):
    if candidate == "fastscale_native" and not NATIVE:
        pytest.skip("native CPU kernels not built")
    benchmark.group = f"step {size}"
    benchmark.extra_info.update(size=size, elements=SIZES[size][0], candidate=candidate)
    step = CANDIDATES[candidate](make_params(size))
    step()  # momentum buffers exist from here on: time the steady state
    benchmark.pedantic(step, rounds=ROUNDS[size], warmup_rounds=1)


@pytest.mark.parametrize("size", list(SIZES))
def bench_copy(benchmark, size):
    """Memory bandwidth reference: one fp32 copy of the same number of elements (8 B/elem)."""
    n = SIZES[size][0]
    src, dst = torch.randn(n), torch.empty(n)
    benchmark.group = f"step {size}"
    benchmark.extra_info.update(size=size, elements=n, candidate="copy")
    benchmark.pedantic(dst.copy_, args=(src,), rounds=ROUNDS[size], warmup_rounds=1)
