"""A whole training step under pytest-benchmark, each candidate of bench/train_step.py in turn.

    pytest bench/bench_train_step.py --benchmark-json=bench/results/train_step_cpu.json

Candidates run one after another here; on a shared machine the interleaved ratios of
``python bench/train_step.py`` are the figures to believe (see its docstring).
"""

import pytest

from train_step import CASES, candidates

NAMES = ["torch_fused", "fastscale", "fastscale_accum", "fastscale_accum_snap", "torch_fused_clip",
         "fastscale_accum_clip", "fastscale_per_ex"]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("candidate", NAMES)
def bench_train_step(benchmark, case, candidate):
    benchmark.group = f"train step {case}"
    benchmark.extra_info.update(case=case, candidate=candidate)
    step = candidates(case)[candidate]
    benchmark.pedantic(step, rounds=15, warmup_rounds=3)
