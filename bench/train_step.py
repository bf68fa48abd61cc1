"""A whole training step (forward, backward, optimizer step) with and without statistics,
fastscale against torch's fused SGD in the same run, candidates alternating round by round.

    python bench/train_step.py [CASE ...] [--rounds N] [--repeats R]

Cases (fp32, CPU): ``mlp`` a 10-layer 1024-wide MLP (10.5M parameters), two micro-batches of
32 per step; ``transformer`` bench_per_example's 2-block causal transformer (d=128, T=64), two
micro-batches of 16 sequences. Candidates, each on its own copy of the same model:

  torch_fused          torch.optim.SGD(fused=True), no statistics (the reference)
  fastscale            FusedScaledSGD(fused=True), no statistics source
  fastscale_accum      + noise_scale=True and accumulate_grad() after each micro-batch
  fastscale_per_ex     + noise_scale=True and per-example norms (PerExampleGradNorms) over the
                       whole batch in one backward (B_small = 1)

Every round runs one step of each candidate, in turn; a repeat is ``--rounds`` rounds, and the
table gives, per candidate, the median over repeats of (median step time of the repeat / the
torch_fused median of the same repeat), with the spread (min–max) of that ratio over repeats.
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import fastscale  # noqa: E402
from bench_per_example import Block  # noqa: E402

HYPER = dict(lr=1e-3, momentum=0.9, weight_decay=5e-4)


def mlp_case():
    layers = []
    for _ in range(10):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1024, generator=gen), torch.randint(0, 1024, (64,), generator=gen)
    return model, x, y, lambda out, y: F.cross_entropy(out, y)


def transformer_case():
    model = Block()
    gen = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, 1000, (32, 64), generator=gen), torch.randint(0, 1000, (32, 64), generator=gen)
    return model, ids, y, lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())


CASES = {"mlp": mlp_case, "transformer": transformer_case}
MICRO = 2


def candidates(case):
    torch.manual_seed(0)
    base, x, y, loss_fn = CASES[case]()
    xs, ys = x.chunk(MICRO), y.chunk(MICRO)
    batch = len(x)
    out = {}

    def accumulating(opt, model, accumulate):
        def step():
            opt.zero_grad()
            for xi, yi in zip(xs, ys):
                (loss_fn(model(xi), yi) / MICRO).backward()
                if accumulate:
                    opt.accumulate_grad(loss_scale=1 / MICRO)
            opt.step()
        return step

    model = copy.deepcopy(base)
    out["torch_fused"] = accumulating(torch.optim.SGD(model.parameters(), **HYPER, fused=True), model, False)
    model = copy.deepcopy(base)
    out["fastscale"] = accumulating(fastscale.FusedScaledSGD(model.parameters(), **HYPER, fused=True), model, False)
    model = copy.deepcopy(base)
    opt = fastscale.FusedScaledSGD(model.parameters(), **HYPER, fused=True, batch_size=batch, noise_scale=True)
    out["fastscale_accum"] = accumulating(opt, model, True)

    model = copy.deepcopy(base)
    opt_pe = fastscale.FusedScaledSGD(model.parameters(), **HYPER, fused=True, batch_size=batch, noise_scale=True)
    norms = fastscale.PerExampleGradNorms(model, loss_reduction="mean")

    def per_example(model=model, opt=opt_pe, norms=norms):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.observe_per_example_norms(norms.squared_norms())
        opt.step()
    out["fastscale_per_ex"] = per_example
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=list(CASES))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated candidates (torch_fused always runs)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native: "
          f"{sorted(fastscale._extension.native_device_types())}")
    print("| case | candidate | median ms | ratio vs torch_fused (median of repeats) | spread |")
    print("| --- | --- | ---: | ---: | --- |")
    for case in args.cases:
        steps = candidates(case)
        if args.only:
            keep = {"torch_fused", *args.only.split(",")}
            steps = {k: v for k, v in steps.items() if k in keep}
        for step in steps.values():
            for _ in range(2):
                step()  # warm up: buffers, hooks, first-step paths
        ratios = {name: [] for name in steps}
        medians = {name: [] for name in steps}
        for _ in range(args.repeats):
            times = {name: [] for name in steps}
            for _ in range(args.rounds):
                for name, step in steps.items():
                    start = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - start)
            ref = statistics.median(times["torch_fused"])
            for name, t in times.items():
                medians[name].append(statistics.median(t))
                ratios[name].append(statistics.median(t) / ref)
        for name in steps:
            r = ratios[name]
            print(f"| {case} | {name} | {statistics.median(medians[name]) * 1e3:.2f} | "
                  f"{statistics.median(r):.3f} | {min(r):.3f}–{max(r):.3f} |", flush=True)


if __name__ == "__main__":
    main()
