"""Accuracy, tracking, lag and interval coverage of the noise-scale estimator against the
closed-form truth of least squares (the problems of tests/test_estimator.py).

    python bench/estimator_accuracy.py [--runs 32]

Prints the tables of docs/estimator.md. Independent problems run side by side as the
estimator's per-tensor columns, so one pass gives many seeds.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_estimator import Problems, feed  # noqa: E402

from fastscale import NoiseScaleConfig  # noqa: E402
from fastscale.noise_scale import NoiseScaleEstimator  # noqa: E402

SOURCES = {  # name: (batch, parts): B_small = batch / parts, B_big = batch
    "per-example (1 vs 256)": (256, 256),
    "micro-batches (64 vs 256)": (256, 4),
    "replicas (32 vs 256)": (256, 8),
}


def readout(est):
    s = est.read()
    b = torch.tensor(s["b_simple_per_tensor"], dtype=torch.float64)
    sd = torch.tensor(s["b_simple_stderr_per_tensor"], dtype=torch.float64)
    return b, sd


def moving(config, runs, batch, parts, steps=1500, lr=0.0018, warm=100, seed=0):
    """SGD from far away (the truth grows ~8x). Returns median and p90 of |ln(est/truth)|,
    non-positive estimates, coverage of the 90% interval, and the lag in steps."""
    problems = Problems(runs, seed=seed)
    est = NoiseScaleEstimator(config, runs, torch.device("cpu"))
    truths, ests, sds, times = [], [], [], []
    for t in range(steps):
        small, big_sq, grad = problems.measure(batch, parts)
        truths.append(problems.truth())
        feed(est, small, big_sq, batch // parts, batch)
        if t >= warm and t % 5 == 0:
            b, sd = readout(est)
            ests.append(b)
            sds.append(sd)
            times.append(t)
        problems.w -= lr * grad
    all_truth = torch.stack(truths)
    truth, est_, sd = all_truth[times], torch.stack(ests), torch.stack(sds)
    err = (est_ / truth).log().abs()
    z = config.z
    cover = ((est_ - z * sd <= truth) & (truth <= est_ + z * sd)).double().mean().item()
    # Lag: the delay k at which the estimate best matches the truth k steps earlier.
    lag = min(range(0, warm, 2), key=lambda k: (est_ / all_truth[[t - k for t in times]]).log().abs().median().item())
    return err.median().item(), err.quantile(0.9).item(), int((est_ <= 0).sum()), cover, lag, \
        (all_truth[-1] / all_truth[0]).median().item()


def fixed(config, runs, batch, parts, steps, seed=1, start_sq=10.0):
    """At fixed parameters: fraction of runs within 5% of the truth after ``steps`` updates,
    the worst relative error, and the coverage of the 90% interval at that time."""
    problems = Problems(runs, seed=seed, start_sq=start_sq)
    truth = problems.truth()
    est = NoiseScaleEstimator(config, runs, torch.device("cpu"))
    for _ in range(steps):
        small, big_sq, _ = problems.measure(batch, parts)
        feed(est, small, big_sq, batch // parts, batch)
    b, sd = readout(est)
    rel = (b / truth - 1).abs()
    z = config.z
    cover = ((b - z * sd <= truth) & (truth <= b + z * sd)).double().mean().item()
    return (rel <= 0.05).double().mean().item(), rel.max().item(), cover, truth.median().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=32)
    args = parser.parse_args()
    configs = {"default (adaptive windows)": NoiseScaleConfig(), "fixed beta=0.99 (the old default)":
               NoiseScaleConfig(beta=0.99), "fixed beta=0.999": NoiseScaleConfig(beta=0.999)}
    print(f"## Moving target: SGD from far away, {args.runs} runs, steps 100-1500\n")
    print("| estimator | source | truth grows | median abs ln | p90 | non-positive | 90% coverage | lag (steps) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, config in configs.items():
        for source, (batch, parts) in SOURCES.items():
            med, p90, nonpos, cover, lag, growth = moving(config, args.runs, batch, parts)
            print(f"| {name} | {source} | {growth:.1f}x | {med:.3f} | {p90:.3f} | {nonpos} | {cover:.2f} | {lag} |")
    print(f"\n## Fixed parameters, {args.runs} runs per row, batch 64\n")
    print("| estimator | source | B_simple (truth) | updates | within 5% | worst error | 90% coverage |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, config in configs.items():
        for source, parts in (("per-example (1 vs 64)", 64), ("micro-batches (16 vs 64)", 4), ("replicas (8 vs 64)", 8)):
            for start_sq in (10.0, 0.5):
                for steps in (500, 2000):
                    within, worst, cover, truth = fixed(config, args.runs, 64, parts, steps, start_sq=start_sq)
                    print(f"| {name} | {source} | {truth:.0f} | {steps} | {within:.0%} | {worst:.3f} | {cover:.2f} |")


if __name__ == "__main__":
    main()
