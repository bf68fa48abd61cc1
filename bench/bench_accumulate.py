"""Micro-batch accumulation with statistics: fastscale against the torch equivalents.

  fastscale_native / fastscale_torch   opt.accumulate_grad() (not the first micro-batch):
                                       |g - snapshot|² per tensor and snapshot <- g, one pass
  torch_norm_add                       torch._foreach_norm(grads) + torch._foreach_add_(acc, grads):
                                       the norm and accumulation a user would write by hand
  torch_sub_norm_copy                  the same statistic computed as fastscale does, in torch ops
"""

import pytest
import torch

import fastscale
from models import ROUNDS, SIZES, make_params

NATIVE = "cpu" in fastscale._extension.native_device_types()


def fastscale_accumulate(fused):
    def make(params):
        opt = fastscale.FusedScaledSGD(params, lr=1e-4, batch_size=1024, noise_scale=True, fused=fused)
        opt.accumulate_grad()  # first micro-batch: snapshots exist from here on

        poke = params[0].grad

        def run():
            # accumulate_grad refuses a call with no backward since the last one (no gradient
            # changed); a no-op in-place edit of one gradient stands for that backward.
            poke.add_(0.0)
            opt.accumulate_grad()
        return run
    return make


def torch_norm_add(params):
    grads = [p.grad for p in params]
    acc = [torch.zeros_like(g) for g in grads]

    def run():
        norms = torch._foreach_norm(grads)
        torch._foreach_add_(acc, grads)
        return norms
    return run


def torch_sub_norm_copy(params):
    grads = [p.grad for p in params]
    snaps = [g.clone() for g in grads]

    def run():
        norms = torch._foreach_norm(torch._foreach_sub(grads, snaps))
        torch._foreach_copy_(snaps, grads)
        return norms
    return run


CANDIDATES = {
    "torch_norm_add": torch_norm_add,
    "torch_sub_norm_copy": torch_sub_norm_copy,
    "fastscale_native": fastscale_accumulate(True),
    "fastscale_torch": fastscale_accumulate(False),
}


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("candidate", list(CANDIDATES))
def bench_accumulate(benchmark, size, candidate):
    if candidate == "fastscale_native" and not NATIVE:
        pytest.skip("native CPU kernels not built")
    benchmark.group = f"accumulate {size}"
    benchmark.extra_info.update(size=size, elements=SIZES[size][0], candidate=candidate)
    run = CANDIDATES[candidate](make_params(size))
    benchmark.pedantic(run, rounds=ROUNDS[size], warmup_rounds=1)
