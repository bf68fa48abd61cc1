"""The noise-scale estimator against closed-form truth: tracking a moving target, intervals that
cover, and a figure that says when it is not ready.

Least squares with x ~ N(0, I_d), y = x·w* + σε: at w = w* + δ the per-example gradient is
x(x·δ − σε), so |G|² = |δ|², tr(Σ) = (d + 1)|δ|² + dσ² and B_simple = (d + 1) + dσ²/|δ|².
Many independent problems run side by side as the estimator's per-tensor columns (each column
is estimated on its own; column 0, their sum, is not used), so one run gives many seeds.
"""

import math
import warnings

import pytest
import torch

from fastscale import FusedScaledSGD, NoiseScaleConfig
from fastscale.noise_scale import Measurement, NoiseScaleEstimator

D, SIGMA = 16, 0.5


class Problems:
    """``runs`` independent least-squares problems, each measured once per step."""

    def __init__(self, runs, seed, start_sq=10.0):
        self.gen = torch.Generator().manual_seed(seed)
        self.w_star = torch.randn(runs, D, generator=self.gen, dtype=torch.float64)
        delta = torch.randn(runs, D, generator=self.gen, dtype=torch.float64)
        self.w = self.w_star + delta * (start_sq / delta.square().sum(1, keepdim=True)).sqrt()

    def truth(self):
        dd = (self.w - self.w_star).square().sum(1)
        return ((D + 1) * dd + D * SIGMA**2) / dd

    def measure(self, batch, parts):
        """Mean |g_small|² over ``parts`` equal parts of the batch and |g_big|², per problem;
        and the big-batch gradient (for an SGD step)."""
        runs = self.w.shape[0]
        x = torch.randn(runs, batch, D, generator=self.gen, dtype=torch.float64)
        y = (x @ self.w_star[:, :, None])[..., 0] + SIGMA * torch.randn(runs, batch, generator=self.gen,
                                                                       dtype=torch.float64)
        r = (x @ self.w[:, :, None])[..., 0] - y
        per_example = x * r[..., None]  # runs × batch × D
        big = per_example.mean(1)
        small = per_example.reshape(runs, parts, batch // parts, D).mean(2).square().sum(2).mean(1)
        return small, big.square().sum(1), big


def feed(est, small, big, b_small, b_big):
    est.update(Measurement(small.sum().reshape(1), big.sum().reshape(1), b_small, b_big,
                           small_pt=small.float(), big_pt=big.float()), None)


def per_problem(est):
    s = est.read()
    b = torch.tensor(s["b_simple_per_tensor"], dtype=torch.float64)
    sd = torch.tensor(s["b_simple_stderr_per_tensor"], dtype=torch.float64)
    return b, sd, s


def test_tracks_a_moving_target_without_lag():
    """SGD from far away: the true B_simple grows 8× over 1500 steps. With per-example norms
    (B_small = 1, B_big = 256), after a warm-up of 100 steps: the median of |ln(estimate/truth)|
    over steps and 8 runs is <= 0.05, its 90th percentile <= 0.15, and no estimate is <= 0.
    The 90% interval covers the moving truth 85-95% of the time (0.898 here). The 1120 checks
    (140 steps × 8 runs) would give a binomial s.e. of 0.9% if independent; checks of one run
    a few steps apart are not, and over seeds 0-9 this figure has mean 0.910 and s.d. 0.020, so
    the bounds sit 2.4 and 2.6 of those s.d. from seed 0's figure. With the window chosen on
    B_simple alone (not also on |G|² and tr(Σ)) it was 0.83, see docs/estimator.md."""
    runs, steps, warm = 8, 1500, 100
    problems = Problems(runs, seed=0)
    est = NoiseScaleEstimator(NoiseScaleConfig(), runs, torch.device("cpu"))
    errors, hits, first, last = [], [], problems.truth(), None
    z = NoiseScaleConfig().z
    for t in range(steps):
        small, big_sq, grad = problems.measure(256, 256)
        truth = problems.truth()
        feed(est, small, big_sq, 1, 256)
        if t >= warm and t % 10 == 0:
            b, sd, _ = per_problem(est)
            assert (b > 0).all(), f"non-positive estimate at step {t}: {b}"
            errors.append((b / truth).log().abs())
            hits.append(((b - z * sd <= truth) & (truth <= b + z * sd)).double())
        problems.w -= 0.0018 * grad
        last = truth
    growth = (last / first).min().item()
    assert 5 <= growth <= 12, growth  # the target really moves 5-10×
    errors = torch.cat(errors)
    assert errors.median().item() <= 0.05
    assert errors.quantile(0.9).item() <= 0.15
    coverage = torch.cat(hits).mean().item()
    assert 0.85 <= coverage <= 0.95, coverage


@pytest.mark.parametrize("source,parts", [("per-example", 32), ("micro-batches", 4)])
def test_interval_covers_the_truth_at_a_fixed_parameter(source, parts):
    """At fixed parameters the 90% interval of B_simple covers the truth in 85-95% of 200 runs,
    read at 2 times each (400 checks; binomial s.e. of the coverage 1.5%)."""
    runs = 200
    problems = Problems(runs, seed=1)
    truth = problems.truth()
    est = NoiseScaleEstimator(NoiseScaleConfig(), runs, torch.device("cpu"))
    hits = []
    for t in range(1, 401):
        small, big_sq, _ = problems.measure(32, parts)
        feed(est, small, big_sq, 32 // parts, 32)
        if t in (200, 400):
            b, sd, stats = per_problem(est)
            z = NoiseScaleConfig().z
            hits.append(((b - z * sd <= truth) & (truth <= b + z * sd)).double())
            assert (sd > 0).all() and torch.isfinite(sd).all()
    coverage = torch.cat(hits).mean().item()
    assert 0.85 <= coverage <= 0.95, coverage


def test_standard_error_shrinks_like_one_over_root_n():
    """At a fixed parameter the reported standard error falls as 1/sqrt(updates): 4× the
    updates, half the error (within 25%), and it matches the spread across runs (within 25%)."""
    runs = 100
    problems = Problems(runs, seed=2)
    est = NoiseScaleEstimator(NoiseScaleConfig(), runs, torch.device("cpu"))
    seen = {}
    for t in range(1, 801):
        small, big_sq, _ = problems.measure(32, 4)
        feed(est, small, big_sq, 8, 32)
        if t in (200, 800):
            b, sd, _ = per_problem(est)
            seen[t] = (b, sd)
    ratio = (seen[200][1].median() / seen[800][1].median()).item()
    assert 1.5 <= ratio <= 2.5, ratio
    err = seen[800][0] / problems.truth() - 1
    rel_spread = 1.4826 * (err - err.median()).abs().median().item()  # robust s.d. (MAD): runs that took a
    # short trend window are the heavy tail the ICI choice accepts
    rel_sd = (seen[800][1] / seen[800][0]).median().item()
    assert rel_sd == pytest.approx(rel_spread, rel=0.25)


def lstsq_optimizer(batch=64, **config):
    gen = torch.Generator().manual_seed(3)
    w_star = torch.randn(D, generator=gen, dtype=torch.float64)
    w = (w_star + 0.2 * torch.randn(D, generator=gen, dtype=torch.float64)).requires_grad_(True)
    opt = FusedScaledSGD([w], lr=0.0, noise_scale=NoiseScaleConfig(**config))

    def step():
        x = torch.randn(batch, D, generator=gen, dtype=torch.float64)
        y = x @ w_star + SIGMA * torch.randn(batch, generator=gen, dtype=torch.float64)
        per_example = x * (x @ w.detach() - y)[:, None]
        w.grad = per_example.mean(0)
        opt.observe_per_example_norms(per_example.square().sum(1))
        opt.step()
    return opt, step


def test_not_ready_says_why_and_noise_scale_returns_nan_with_a_warning():
    opt, step = lstsq_optimizer(min_updates=10)
    for _ in range(3):
        step()
    stats = opt.gradient_stats()
    assert stats["ready"] is False and stats["not_ready"] == "warming up: 3 of 10 updates"
    with pytest.warns(UserWarning, match="not ready yet, noise_scale\\(\\) returns NaN"):
        assert math.isnan(opt.noise_scale())
    for _ in range(40):
        step()
    stats = opt.gradient_stats()
    assert stats["ready"] and stats["not_ready"] is None
    assert stats["b_simple_low"] < stats["b_simple"] < stats["b_simple_high"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert opt.noise_scale() == stats["b_simple"]


def feed_estimates(est, g2s, trs, b_small=1, b_big=2):
    """Measurements whose two-batch estimates are exactly the given |G|² and tr(Σ)."""
    for g2, tr in zip(g2s, trs):
        small, big = g2 + tr / b_small, g2 + tr / b_big
        est.update(Measurement(torch.tensor([small], dtype=torch.float64), torch.tensor([big], dtype=torch.float64),
                               b_small, b_big), None)


def test_a_figure_whose_interval_includes_zero_is_not_ready():
    """|G|² estimates of mean +0.05 swinging by ±1 (batches far below the noise scale): the
    averages are positive but B_simple's interval includes zero, so it is refused, and the lr
    rule keeps its fallback, rather than a huge or negative figure being used."""
    est = NoiseScaleEstimator(NoiseScaleConfig(min_updates=5), 0, torch.device("cpu"))
    feed_estimates(est, [0.05 + (-1) ** t for t in range(40)], [10.0] * 40)
    stats = est.read()
    assert stats["grad_sq_norm"] > 0 and stats["trace_cov"] > 0 and stats["b_simple"] > 0
    assert stats["b_simple_low"] < 0
    assert stats["ready"] is False and stats["not_ready"] == "the interval of B_simple still includes zero"
    assert est.b_noise(123.0).item() == 123.0
    # the same averages with little noise are ready
    steady = NoiseScaleEstimator(NoiseScaleConfig(min_updates=5), 0, torch.device("cpu"))
    feed_estimates(steady, [0.05 + 0.001 * (-1) ** t for t in range(40)], [10.0] * 40)
    assert steady.read()["ready"] and steady.b_noise(123.0).item() == pytest.approx(200.0, rel=1e-3)


def test_per_tensor_figures_have_error_bars_too():
    runs = 3
    problems = Problems(runs, seed=5)
    est = NoiseScaleEstimator(NoiseScaleConfig(), runs, torch.device("cpu"))
    for _ in range(300):
        small, big_sq, _ = problems.measure(64, 64)
        feed(est, small, big_sq, 1, 64)
    s = est.read()
    for key in ("grad_sq_norm", "trace_cov", "b_simple"):
        assert len(s[f"{key}_per_tensor"]) == len(s[f"{key}_stderr_per_tensor"]) == runs
        assert all(sd > 0 for sd in s[f"{key}_stderr_per_tensor"])
    assert s["ready_per_tensor"] == [True] * runs
    truth = problems.truth()
    b, sd, _ = per_problem(est)
    assert ((b - truth).abs() < 4 * sd).all()
