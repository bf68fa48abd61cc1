"""Cost of per-example squared gradient norms: plain backward vs PerExampleGradNorms vs Opacus.

Run:  PYTHONPATH=$PWD python -m pytest bench/bench_per_example.py
      (pytest-benchmark table; peak memory goes into each row's extra_info, --benchmark-json)
      add --benchmark-timer time.process_time on a shared, loaded machine (CPU time of the
      process, all threads, instead of wall-clock)
or:   PYTHONPATH=$PWD python bench/bench_per_example.py [threads] [mlp|cnn|transformer ...]
      (summary table: candidates interleaved round by round, median and min wall-clock)
The compiled CPU kernels must be built (pip install -e . or setup.py build_ext --inplace): with
FASTSCALE_NO_NATIVE=1 the fused layers fall back to their pure-torch forms.

What is timed: the backward pass only (the forward runs in the untimed setup), plus whatever
the candidate needs to turn its hooks' output into a [B] vector of squared norms:
  plain      loss.backward()
  fastscale  loss.backward(); norms.squared_norms()
  fastscale-unfused
             the same with fused_conv=False, fused_linear=False, fused_norm=False
             (conv, GroupNorm and Linear layers on sequences keep their own forward/backward,
             the per-example gradients are computed on top; differs on the CNN and the
             transformer)
  opacus     loss.backward() through opacus.GradSampleModule (materialises p.grad_sample,
             [B, *p.shape] per parameter); then sum_p |grad_sample_p|^2 per example.
All candidates start from the same weights and inputs. Opacus is optional: if it does not
import, its rows are skipped.

What "peak memory" is: the highest number of bytes held by torch's CPU allocator during
backward (+ the norm reduction), above the level when backward starts, read from the
allocation records of torch.profiler(profile_memory=True) (``total_allocated``). It counts
tensor storage only (not the Python heap, not allocator slack) and is measured in a separate
untimed run, since profiling slows the pass down. On CUDA the same code would profile the
CPU side only; use torch.cuda.max_memory_allocated there.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastscale import PerExampleGradNorms

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from opacus import GradSampleModule
except Exception as exc:  # not installed, or broken against this torch
    GradSampleModule = None
    OPACUS_ERROR = f"{type(exc).__name__}: {exc}"
else:
    OPACUS_ERROR = None


# ---------------------------------------------------------------------------- models


class Block(nn.Module):
    """Pre-norm causal transformer block(s); attention from nn.Linear on [B, T, d]."""

    def __init__(self, vocab=1000, d=128, heads=4, t=64, layers=2):
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(t, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(ln1=nn.LayerNorm(d), qkv=nn.Linear(d, 3 * d), proj=nn.Linear(d, d),
                               ln2=nn.LayerNorm(d), fc=nn.Linear(d, 4 * d), out=nn.Linear(4 * d, d)))
            for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        b, t = ids.shape
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device).expand(b, t))
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + blk["proj"](y.transpose(1, 2).reshape(b, t, -1))
            x = x + blk["out"](F.gelu(blk["fc"](blk["ln2"](x))))
        return self.head(self.ln(x))


def mlp_case():
    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    return model, x, lambda out: F.cross_entropy(out, y)


def cnn_case():
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    return model, x, lambda out: F.cross_entropy(out, y)


def transformer_case():
    model = Block()
    ids, y = torch.randint(0, 1000, (32, 64)), torch.randint(0, 1000, (32, 64))
    return model, ids, lambda out: F.cross_entropy(out.flatten(0, 1), y.flatten())


CASES = {"mlp": mlp_case, "cnn": cnn_case, "transformer": transformer_case}
CANDIDATES = ["plain", "fastscale", "fastscale-unfused", "opacus"]


# ---------------------------------------------------------------------------- candidates


def make_step(case: str, candidate: str):
    """(setup, run): setup() does zero_grad + forward and returns the loss; run(loss) does the
    timed backward and the reduction to per-example squared norms."""
    torch.manual_seed(0)
    model, x, loss_fn = CASES[case]()
    model = copy.deepcopy(model)
    if candidate == "opacus":
        if GradSampleModule is None:
            pytest.skip(f"opacus unavailable: {OPACUS_ERROR}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = GradSampleModule(model)
        params = [p for p in model.parameters() if p.requires_grad]

        def reduce():
            return sum(p.grad_sample.flatten(1).square().sum(1) for p in params)
    elif candidate.startswith("fastscale"):
        fused = candidate == "fastscale"
        norms = PerExampleGradNorms(model, loss_reduction="mean", fused_conv=fused, fused_linear=fused,
                                    fused_norm=fused)
        reduce = norms.squared_norms
    else:
        reduce = None

    def setup():
        model.zero_grad(set_to_none=True)
        return (loss_fn(model(x)),), {}

    def run(loss):
        loss.backward()
        return reduce() if reduce is not None else None

    return setup, run


def peak_backward_bytes(setup, run) -> int:
    from torch.profiler import ProfilerActivity, profile

    args, _ = setup()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run(*args)
    allocations = []

    def walk(node):
        if node.typed[0] == torch._C._profiler._EventType.Allocation:
            allocations.append((node.start_time_ns, node.typed[1].alloc_size, node.typed[1].total_allocated))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    if not allocations:
        return 0
    allocations.sort()
    start = allocations[0][2] - allocations[0][1]
    return max(total for _, _, total in allocations) - start


# ---------------------------------------------------------------------------- pytest-benchmark


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("case", list(CASES))
def test_backward(benchmark, case, candidate):
    setup, run = make_step(case, candidate)
    for _ in range(2):
        args, _ = setup()
        run(*args)
    benchmark.group = case
    benchmark.extra_info["peak_backward_MiB"] = peak_backward_bytes(setup, run) / 2**20
    benchmark.pedantic(run, setup=setup, rounds=15, iterations=1, warmup_rounds=1)


# ---------------------------------------------------------------------------- summary table


def main(cases: list[str], rounds: int = 15) -> None:
    """Candidates interleaved round by round, so that load from other processes hits all of
    them alike. Reports the median and the minimum wall-clock time of the timed part; on a
    shared machine the minimum is the steadier estimate of what the work itself costs."""
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, rounds {rounds}, "
          f"opacus: {'ok' if OPACUS_ERROR is None else OPACUS_ERROR}")
    print(f"{'model':12s} {'candidate':17s} {'median ms':>10s} {'x plain':>8s} {'min ms':>9s} {'x plain':>8s} "
          f"{'peak MiB':>9s}")
    for case in cases:
        steps = {}
        for candidate in CANDIDATES:
            try:
                steps[candidate] = make_step(case, candidate)
            except pytest.skip.Exception as exc:
                print(f"{case:12s} {candidate:17s} skipped ({exc})")
        wall = {c: [] for c in steps}
        for r in range(rounds + 2):
            for candidate, (setup, run) in steps.items():
                args, _ = setup()
                t0 = time.perf_counter()
                run(*args)
                if r >= 2:  # two warm-up rounds
                    wall[candidate].append(time.perf_counter() - t0)
        med = {c: statistics.median(t) for c, t in wall.items()}
        low = {c: min(t) for c, t in wall.items()}
        for candidate, (setup, run) in steps.items():
            mib = peak_backward_bytes(setup, run) / 2**20
            print(f"{case:12s} {candidate:17s} {med[candidate] * 1e3:10.1f} {med[candidate] / med['plain']:8.2f} "
                  f"{low[candidate] * 1e3:9.1f} {low[candidate] / low['plain']:8.2f} {mib:9.1f}")
        sys.stdout.flush()


if __name__ == "__main__":
    if len(sys.argv) > 1:
        torch.set_num_threads(int(sys.argv[1]))
    unknown = [c for c in sys.argv[2:] if c not in CASES]
    if unknown:
        sys.exit(f"unknown model(s) {unknown}; choose from {list(CASES)}")
    main(sys.argv[2:] or list(CASES))
