"""Step time with the candidates alternating round by round, so drift over the run (frequency,
other load on a shared machine) falls on all of them alike. pytest-benchmark runs candidates
one after another; on a noisy machine compare both.

    python bench/interleaved.py [SIZE ...] [--rounds N]      (sizes from bench/models.py)
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import fastscale  # noqa: E402
from models import SIZES, make_params  # noqa: E402

HYPER = dict(lr=1e-4, momentum=0.9, weight_decay=5e-4)


def candidates(params):
    ours = fastscale.FusedScaledSGD(params, **HYPER, batch_size=1024, base_batch_size=256,
                                    warmup_steps=10**6, noise_scale=True, fused=True)
    fused = torch.optim.SGD(params, **HYPER, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(fused, lambda step: min(1.0, (step + 1) / 10**6))
    grads = [p.grad for p in params]

    def fused_norm_sched():
        torch._foreach_norm(grads)
        fused.step()
        sched.step()

    steps = {"fastscale_native": ours.step, "torch_fused": fused.step, "torch_fused_norm_sched": fused_norm_sched}
    for step in steps.values():
        step()  # momentum buffers exist from here on
    return steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", default=list(SIZES))
    parser.add_argument("--rounds", type=int, default=0, help="default: 200 at 1M, 30 at 25M, 10 at 100M")
    args = parser.parse_args()
    if "cpu" not in fastscale._extension.native_device_types():
        sys.exit("interleaved.py: the native CPU kernels are not built")
    print("| size | candidate | median ms | ratio vs torch_fused | ratio vs torch_fused_norm_sched |")
    print("| --- | --- | ---: | ---: | ---: |")
    for size in args.sizes:
        steps = candidates(make_params(size))
        rounds = args.rounds or {"1M-100": 200, "25M-200": 30}.get(size, 10)
        times = {name: [] for name in steps}
        for _ in range(rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        for name, m in med.items():
            print(f"| {size} | {name} | {m * 1e3:.2f} | {m / med['torch_fused']:.3f} | "
                  f"{m / med['torch_fused_norm_sched']:.3f} |")


if __name__ == "__main__":
    main()
