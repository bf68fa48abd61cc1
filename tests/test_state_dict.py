"""Checkpoints: bit-exact round trips, mid-warmup resume, and loading torch.optim.SGD's."""

import copy

import torch

from fastscale import FusedScaledSGD, NoiseScaleConfig
from conftest import clone_params, make_params

KW = dict(lr=0.05, momentum=0.9, weight_decay=0.01, batch_size=128, base_batch_size=32,
          warmup_steps=10, noise_scale=NoiseScaleConfig(beta=0.9))


def train(params, opt, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        if getattr(opt, "statistics", None) is not None and opt.statistics.estimator is not None:
            opt.observe_per_example_norms(torch.rand(16) + 1.0)
        opt.step()


def random_grads(params, steps):
    return [[torch.randn_like(p) for p in params] for _ in range(steps)]


def test_mid_warmup_resume_is_bit_exact(impl):
    params = make_params()
    opt = FusedScaledSGD(params, **impl, **KW)
    grads = random_grads(params, 15)
    torch.manual_seed(7)
    train(params, opt, grads[:6])  # 6 of 10 warmup steps
    saved_params = [p.detach().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    torch.manual_seed(8)
    train(params, opt, grads[6:])

    resumed = clone_params(saved_params)
    opt2 = FusedScaledSGD(resumed, **impl, **{**KW, "warmup_steps": 10})
    opt2.load_state_dict(saved)
    torch.manual_seed(8)
    train(resumed, opt2, grads[6:])
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    # repr: exact float text, and NaN (per-tensor entries no source fed) equal to itself
    assert repr(opt.gradient_stats()) == repr(opt2.gradient_stats())


def test_state_dict_is_a_snapshot_and_round_trips():
    params = make_params()
    opt = FusedScaledSGD(params, **KW)
    train(params, opt, random_grads(params, 3))
    sd = opt.state_dict()
    step_before = sd["state"]["fastscale"]["step"].item()
    train(params, opt, random_grads(params, 2))
    assert sd["state"]["fastscale"]["step"].item() == step_before  # not aliased to live state
    opt.load_state_dict(sd)
    assert opt.gradient_stats()["steps"] == step_before
    assert opt.param_groups[0]["warmup_steps"] == 10


def test_statistics_of_bf16_params_keep_fp32_and_fp64():
    """Optimizer.load_state_dict casts per-parameter float state to the parameter's dtype; the
    statistics live under a non-parameter key and must come back unrounded."""
    params = make_params(torch.bfloat16)
    opt = FusedScaledSGD(params, **KW)
    train(params, opt, random_grads(params, 4))
    sd = copy.deepcopy(opt.state_dict())
    opt2 = FusedScaledSGD(clone_params(params), **KW)
    opt2.load_state_dict(sd)
    noise, mine = opt2.statistics.estimator, opt.statistics.estimator
    for key in noise.state_dict():
        assert getattr(noise, key).dtype == torch.float64, key
        assert torch.equal(getattr(noise, key).nan_to_num(), getattr(mine, key).nan_to_num()), key
    assert all(opt2.state[p]["momentum_buffer"].dtype == torch.bfloat16 for p in opt2.param_groups[0]["params"])


def test_loads_plain_torch_sgd_state_dict(impl):
    params = make_params(torch.float64)
    ours = clone_params(params)
    ref_opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, foreach=False)
    grads = random_grads(params, 10)
    train(params, ref_opt, grads[:5])
    opt = FusedScaledSGD(ours, lr=0.05, momentum=0.9, nesterov=True, **impl, batch_size=64)
    for a, b in zip(params, ours):
        b.data.copy_(a.data)
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    assert opt.param_groups[0]["batch_size"] == 64  # our options survive a torch state dict
    train(params, ref_opt, grads[5:])
    train(ours, opt, grads[5:])
    for a, b in zip(params, ours):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    # and torch SGD can load ours back, and continues exactly where ours goes on
    theirs = clone_params(ours)
    ref2 = torch.optim.SGD(theirs, lr=0.05, momentum=0.9, nesterov=True, foreach=False)
    ref2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(ref2.state[b]["momentum_buffer"], opt.state[a]["momentum_buffer"], rtol=0, atol=0)
    more = random_grads(ours, 4)
    train(ours, opt, more)
    train(theirs, ref2, more)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
