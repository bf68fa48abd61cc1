"""Learning-rate scaling with the batch size and gradual warmup, value by value."""

import math

import pytest
import torch

from fastscale import FusedScaledSGD, NoiseScaleConfig
from conftest import make_params


def lrs_over(opt, steps):
    """The effective lr of group 0 before each of ``steps`` steps, and the step actually taken."""
    seen = []
    for _ in range(steps):
        seen.append(opt.current_lr()[0])
        p = opt.param_groups[0]["params"][0]
        p.grad = torch.ones_like(p)
        before = p.detach().clone()
        opt.step()
        taken = (before - p.detach()).double().mean().item()  # = lr_eff (grad 1, no momentum/wd)
        assert taken == pytest.approx(seen[-1], rel=1e-6)
    return seen


@pytest.mark.parametrize(
    "rule,expected", [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)]
)
def test_scale_rules(rule, expected, impl):
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = FusedScaledSGD([p], lr=0.1, batch_size=128, base_batch_size=32, scaling=rule, **impl)
    assert lrs_over(opt, 3) == pytest.approx([0.1 * expected] * 3, rel=1e-12)


def test_goyal_warmup_from_unscaled_to_scaled(impl):
    """Default warmup ramps linearly per step from η to kη over warmup_steps (Goyal et al.)."""
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = FusedScaledSGD([p], lr=0.1, batch_size=256, base_batch_size=32, warmup_steps=4, **impl)
    k = 8
    expected = [0.1 * (1 + (k - 1) * t / 4) for t in range(4)] + [0.1 * k] * 3
    assert lrs_over(opt, 7) == pytest.approx(expected, rel=1e-12)


def test_warmup_start_factor_and_sqrt(impl):
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = FusedScaledSGD(
        [p], lr=0.2, batch_size=64, base_batch_size=16, scaling="sqrt",
        warmup_steps=5, warmup_start_factor=0.0, **impl,
    )
    expected = [0.2 * 2 * t / 5 for t in range(5)] + [0.4, 0.4]
    assert lrs_over(opt, 7) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_set_batch_size_follows_and_per_group_overrides(impl):
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = FusedScaledSGD(
        [{"params": [a]}, {"params": [b], "scaling": "sqrt", "base_batch_size": 8}],
        lr=0.1, batch_size=32, **impl,
    )
    assert opt.param_groups[0]["base_batch_size"] == 32
    assert opt.current_lr() == pytest.approx([0.1, 0.1 * 2])
    opt.set_batch_size(128)
    assert opt.current_lr() == pytest.approx([0.1 * 4, 0.1 * 4])
    opt.set_batch_size(64, group=0)
    assert opt.current_lr() == pytest.approx([0.1 * 2, 0.1 * 4])


def test_lr_scheduler_edits_group_lr(impl):
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = FusedScaledSGD([p], lr=1.0, batch_size=64, base_batch_size=32, **impl)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    seen = []
    for _ in range(4):
        seen.append(opt.current_lr()[0])
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0, 1.0, 0.5, 0.25])


def test_tensor_lr(impl):
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    lr = torch.tensor(0.5, dtype=torch.float64)
    opt = FusedScaledSGD([p], lr=lr, batch_size=64, base_batch_size=16, scaling="linear", **impl)
    assert opt.current_lr() == pytest.approx([2.0])
    lr.fill_(0.25)  # a tensor lr edited in place takes effect at once, as in torch
    assert opt.current_lr() == pytest.approx([1.0])


def test_skipped_amp_step_does_not_advance_warmup(impl):
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = FusedScaledSGD([p], lr=0.1, batch_size=64, base_batch_size=16, warmup_steps=4, **impl)
    p.grad = torch.ones_like(p)
    opt.step()
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    del opt.found_inf
    assert opt.gradient_stats()["steps"] == 1
    assert opt.current_lr()[0] == pytest.approx(0.1 * (1 + 3 * 1 / 4))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scaling="cubic"), "scaling must be one of"),
        (dict(batch_size=0), "batch_size must be a positive int"),
        (dict(batch_size=32, base_batch_size=-1), "base_batch_size must be a positive int"),
        (dict(batch_size=3.5), "batch_size must be a positive int"),
        (dict(warmup_steps=-1), "warmup_steps must be an int >= 0"),
        (dict(warmup_steps=2.5), "warmup_steps must be an int >= 0"),
        (dict(warmup_start_factor=1.5), "warmup_start_factor must be None or a float in"),
        (dict(noise_fallback=-3.0), "noise_fallback must be None"),
        (dict(fused="yes"), "fused must be None or a bool"),
        (dict(scaling="noise", batch_size=64), "needs noise_scale=True"),
        (dict(maximize="yes"), "maximize must be a bool"),
        (dict(noise_scale="yes"), "noise_scale must be a bool or a NoiseScaleConfig"),
        (dict(lr="0.1"), "lr must be a float"),
        (dict(momentum=None), "momentum must be a float"),
    ],
)
def test_bad_input_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        FusedScaledSGD(make_params(), **{"lr": 0.1, **kwargs})


def test_bad_input_changes_nothing():
    a, b = make_params()[:2]
    opt = FusedScaledSGD([a], lr=0.1, batch_size=32)
    groups_before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match="scaling must be one of"):
        opt.add_param_group({"params": [b], "scaling": "quadratic"})
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        opt.set_batch_size(0)
    with pytest.raises(ValueError, match="Nesterov"):
        opt.add_param_group({"params": [b], "nesterov": True})
    assert [dict(g) for g in opt.param_groups] == groups_before
    assert len(opt.param_groups) == 1


def test_noise_rule_follows_the_live_estimate_once_warmed_up(impl):
    """Once min_updates updates are in, the "noise" rule uses the estimate, not its fallback:
    lr = lr0 · (1 + B_noise/B0) / (1 + B_noise/B) with B_noise = noise_scale()."""
    torch.manual_seed(3)
    p = torch.randn(6, dtype=torch.float64, requires_grad=True)
    opt = FusedScaledSGD([p], lr=0.1, batch_size=64, base_batch_size=16, scaling="noise",
                         noise_scale=NoiseScaleConfig(beta=0.9, min_updates=5), **impl)
    fallback_lr = 0.1 * (1 + 16 / 16) / (1 + 16 / 64)
    for step in range(8):
        if step < 5:  # fewer than min_updates updates: the fallback B_noise = base batch size
            assert opt.current_lr()[0] == pytest.approx(fallback_lr, rel=1e-12)
        per_example = torch.randn(256, 6, dtype=torch.float64) * 3 + 0.5  # B_simple = 6·9 / (6·0.5²) = 36
        p.grad = per_example.mean(0)
        opt.observe_per_example_norms(per_example.square().sum(1))
        opt.step()
    b_noise = opt.noise_scale()
    assert b_noise > 0 and abs(b_noise - 16) > 5  # far from the fallback: the test can tell them apart
    assert opt.current_lr()[0] == pytest.approx(0.1 * (1 + b_noise / 16) / (1 + b_noise / 64), rel=1e-9)


def test_noise_rule_needs_estimator_and_uses_fallback():
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="noise_scale=True"):
        FusedScaledSGD([p], lr=0.1, batch_size=64, base_batch_size=16, scaling="noise")
    opt = FusedScaledSGD([p], lr=0.1, batch_size=64, base_batch_size=16, scaling="noise", noise_scale=True)
    # no estimate yet: B_noise = base_batch_size, a cautious scale
    assert opt.current_lr()[0] == pytest.approx(0.1 * (1 + 16 / 16) / (1 + 16 / 64))
    opt = FusedScaledSGD(
        [p], lr=0.1, batch_size=64, base_batch_size=16, scaling="noise", noise_scale=True, noise_fallback=32.0
    )
    assert opt.current_lr()[0] == pytest.approx(0.1 * (1 + 32 / 16) / (1 + 32 / 64))
    assert not math.isnan(opt.current_lr()[0])


def test_applied_lr_is_what_the_next_step_applies(impl):
    """applied_lr(): per group, 1-element device tensors (read without a sync until logged)
    holding the rate the next step applies: scale × warmup × the scheduler's group["lr"]."""
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    q = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = FusedScaledSGD([{"params": [p]}, {"params": [q], "scaling": "sqrt"}], lr=0.1, batch_size=64,
                         base_batch_size=16, warmup_steps=3, **impl)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(6):
        applied = opt.applied_lr()
        assert all(isinstance(t, torch.Tensor) and t.numel() == 1 for t in applied)
        before = [p.detach().clone(), q.detach().clone()]
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
        opt.step()
        sched.step()
        taken = [(b - t.detach()).mean().item() for b, t in zip(before, (p, q))]
        assert taken == pytest.approx([t.item() for t in applied], rel=1e-12)
    # group["lr"] stays the rate the scheduler sets: 0.1 halved every 2 steps
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 / 8] * 2)


def test_warmup_without_a_ramp_is_refused_and_start_factor_makes_it_work(impl):
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="warmup_steps=4 would do nothing"):
        FusedScaledSGD([p], lr=0.1, warmup_steps=4, **impl)
    with pytest.raises(ValueError, match="warmup_steps=4 would do nothing"):
        FusedScaledSGD([p], lr=0.1, batch_size=32, warmup_steps=4, **impl)
    opt = FusedScaledSGD([p], lr=0.1, warmup_steps=4, warmup_start_factor=0.0, **impl)
    assert lrs_over(opt, 6) == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.1], abs=1e-15)
