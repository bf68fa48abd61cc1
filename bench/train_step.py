"""A whole training step (forward, backward, optimizer step) with and without statistics,
fastscale against torch's fused SGD in the same run, candidates alternating round by round.

    python bench/train_step.py [CASE ...] [--rounds N] [--only CANDIDATE,...]

Cases (fp32, CPU): ``mlp`` a 10-layer 1024-wide MLP (10.5M parameters), two micro-batches of
32 per step; ``transformer`` bench_per_example's 2-block causal transformer (d=128, T=64), two
micro-batches of 16 sequences. Candidates, each on its own copy of the same model:

  torch_fused          torch.optim.SGD(fused=True), no statistics (the reference)
  fastscale            FusedScaledSGD(fused=True), no statistics source
  fastscale_accum      + noise_scale=True and accumulate_grad() after each micro-batch
                       (micro-batch norms and |.grad|² from autograd hooks: |g|², g·T, |T|²;
                       the first micro-batch unread, later ones added into .grad by the hook)
  fastscale_accum_snap the same, measured from snapshots of .grad (the path before the hooks)
  fastscale_accum_every8
                       fastscale_accum with NoiseScaleConfig(measure_every=8): one step in 8
                       measured, the others only check accumulate_grad's arguments (compare
                       its ratio of totals: its per-round ratios are mostly unmeasured steps)
  fastscale_per_ex     + noise_scale=True and per-example norms (PerExampleGradNorms) over the
                       whole batch in one backward (B_small = 1)
  torch_fused_clip, fastscale_accum_clip
                       clip_grad_norm_ before the step;
                       ratio against torch_fused_clip

Every round runs one step of each candidate, in a shuffled order, and divides each one's time
by torch_fused's in the same round (neighbours in time share the machine's load); the table
gives the median of those per-round ratios over all rounds, their interquartile range, the
median step time, and the ratio of total times over all rounds (the amortised cost, for a
candidate whose steps differ from one another). On a shared machine believe the ratios, not the
milliseconds.
"""

import argparse
import copy
import random
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

    def accumulating(opt, model, accumulate, clip=False):
        def step():
            opt.zero_grad()
            for xi, yi in zip(xs, ys):
                (loss_fn(model(xi), yi) / MICRO).backward()
                if accumulate:
                    opt.accumulate_grad(loss_scale=1 / MICRO)
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            opt.step()
        return step

    def ours(stats, snapshots=False):
        model = copy.deepcopy(base)
        opt = fastscale.FusedScaledSGD(model.parameters(), **HYPER, fused=True, batch_size=batch, noise_scale=stats)
        if snapshots:
            opt.statistics._hooks_failed = True  # the snapshot path, as before the hooks
        return opt, model

    model = copy.deepcopy(base)
    out["torch_fused"] = accumulating(torch.optim.SGD(model.parameters(), **HYPER, fused=True), model, False)
    out["fastscale"] = accumulating(*ours(False), False)
    out["fastscale_accum"] = accumulating(*ours(True), True)
    out["fastscale_accum_snap"] = accumulating(*ours(True, snapshots=True), True)
    out["fastscale_accum_every8"] = accumulating(*ours(fastscale.NoiseScaleConfig(measure_every=8)), True)
    model = copy.deepcopy(base)
    out["torch_fused_clip"] = accumulating(torch.optim.SGD(model.parameters(), **HYPER, fused=True), model, False,
                                           clip=True)
    out["fastscale_accum_clip"] = accumulating(*ours(True), True, clip=True)

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


def reference(name: str) -> str:
    return "torch_fused_clip" if name.endswith("_clip") else "torch_fused"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=list(CASES))
    parser.add_argument("--rounds", type=int, default=64, help="a multiple of 8 (fastscale_accum_every8)")
    parser.add_argument("--only", default="", help="comma-separated candidates (and their references)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native: "
          f"{sorted(fastscale._extension.native_device_types())}")
    print("| case | candidate | median ms | ratio vs torch (median per round) | interquartile | ratio of totals |")
    print("| --- | --- | ---: | ---: | --- | ---: |")
    for case in args.cases:
        steps = candidates(case)
        if args.only:
            keep = {*args.only.split(","), *(reference(k) for k in args.only.split(","))}
            steps = {k: v for k, v in steps.items() if k in keep}
        for step in steps.values():
            for _ in range(2):
                step()  # warm up: buffers, hooks, first-step paths
        times = {name: [] for name in steps}
        order = list(steps)
        rng = random.Random(0)
        for _ in range(args.rounds):
            rng.shuffle(order)
            for name in order:
                start = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - start)
        for name in steps:
            r = sorted(t / ref for t, ref in zip(times[name], times[reference(name)]))
            q = statistics.quantiles(r, n=4)
            total = sum(times[name]) / sum(times[reference(name)])
            print(f"| {case} | {name} | {statistics.median(times[name]) * 1e3:.2f} | "
                  f"{statistics.median(r):.3f} | {q[0]:.3f}–{q[2]:.3f} | {total:.3f} |", flush=True)


if __name__ == "__main__":
    main()
