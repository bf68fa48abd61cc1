"""FusedScaledSGD with scaling off must compute what torch.optim.SGD computes, step for step."""

import copy

import pytest
import torch
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    optim_error_inputs_func_sgd,
    optim_inputs_func_sgd,
)

from fastscale import FusedScaledSGD
from conftest import clone_params, make_params, step_both

CONFIGS = optim_inputs_func_sgd("cpu")
# fp32/fp64 differ from torch only by rounding (p - lr·g vs p + (-lr)·g); reduced precision is
# computed in fp32 and rounded once, where torch rounds after every op, so it gets a documented
# tolerance relative to the parameter magnitude.
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=2e-6, atol=2e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def run_both(kwargs, dtype, impl, steps=12, fs_extra=None):
    params = make_params(dtype)
    ours = clone_params(params)
    ref_opt = torch.optim.SGD(params, **kwargs, foreach=False)
    opt = FusedScaledSGD(ours, **copy.deepcopy(kwargs), **impl, **(fs_extra or {}))
    step_both(ref_opt, params, opt, ours, steps)
    return params, ours, ref_opt, opt


@pytest.mark.parametrize("config", CONFIGS, ids=[c.desc for c in CONFIGS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_matches_torch_sgd(config, dtype, impl):
    steps = 12 if dtype in (torch.float32, torch.float64) else 4
    params, ours, ref_opt, opt = run_both(config.kwargs, dtype, impl, steps)
    for a, b in zip(params, ours):
        torch.testing.assert_close(b, a, **TOLERANCES[dtype])
    for a, b in zip(params, ours):
        ref_buf = ref_opt.state[a].get("momentum_buffer")
        buf = opt.state[b].get("momentum_buffer")
        assert (ref_buf is None) == (buf is None)
        if buf is not None:
            torch.testing.assert_close(buf, ref_buf, **TOLERANCES[dtype])


@pytest.mark.parametrize("config", CONFIGS, ids=[c.desc for c in CONFIGS])
def test_scaling_with_unit_ratio_is_still_sgd(config, impl):
    """batch_size == base_batch_size under every rule is plain SGD (scale 1, warmup flat)."""
    for rule in ("linear", "sqrt"):
        params, ours, _, _ = run_both(
            config.kwargs, torch.float64, impl, 5, dict(batch_size=32, scaling=rule, warmup_steps=3, warmup_start_factor=1.0)
        )
        for a, b in zip(params, ours):
            torch.testing.assert_close(b, a, **TOLERANCES[torch.float64])


ERROR_INPUTS = optim_error_inputs_func_sgd("cpu", torch.float32)


@pytest.mark.parametrize("error", ERROR_INPUTS, ids=[e.optimizer_error_input.desc for e in ERROR_INPUTS])
def test_error_inputs_like_torch(error):
    inp = error.optimizer_error_input
    params = inp.params if inp.params is not None else make_params()
    assert error.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR
    if issubclass(error.error_type, Warning):
        with pytest.warns(error.error_type, match=error.error_regex):
            FusedScaledSGD(params, **inp.kwargs)
    else:
        with pytest.raises(error.error_type, match=error.error_regex):
            FusedScaledSGD(params, **inp.kwargs)
        # torch raises the same error for the same input
        with pytest.raises(error.error_type, match=error.error_regex):
            torch.optim.SGD(params, **inp.kwargs)


def test_param_groups_closure_and_zero_grad(impl):
    params = make_params(torch.float64)
    ours = clone_params(params)
    groups = lambda ps: [  # noqa: E731
        {"params": ps[:2], "lr": 0.05, "momentum": 0.9, "nesterov": True},
        {"params": ps[2:4], "weight_decay": 0.3},
    ]
    ref_opt = torch.optim.SGD(groups(params), lr=0.01, foreach=False)
    opt = FusedScaledSGD(groups(ours), lr=0.01, **impl)
    ref_opt.add_param_group({"params": params[4:], "momentum": 0.5, "dampening": 0.2})
    opt.add_param_group({"params": ours[4:], "momentum": 0.5, "dampening": 0.2})
    x = torch.randn(7, 5, dtype=torch.float64)

    def closure_for(ps, o):
        def closure():
            o.zero_grad()
            loss = (ps[0] @ ps[1]).sin().sum() + ps[2].square().sum() + ps[3] * ps[5].sum() + (x * ps[0]).sum()
            loss.backward()
            return loss
        return closure

    for _ in range(8):
        l1 = ref_opt.step(closure_for(params, ref_opt))
        l2 = opt.step(closure_for(ours, opt))
        torch.testing.assert_close(l2, l1)
    for a, b in zip(params, ours):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is None or not p.grad.any() for p in ours)
    opt.zero_grad()
    assert all(p.grad is None for p in ours)


def test_amp_overflow_leaves_no_momentum_buffers(impl):
    """torch's fused SGD stores uninitialised buffers on a skipped first step; the next step
    then goes NaN. A skipped step here leaves no buffer, and the next one starts them right."""
    params = make_params()
    ours = clone_params(params)
    opt = FusedScaledSGD(ours, lr=0.1, momentum=0.9, **impl, noise_scale=True)
    ref_opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=False)
    before = [p.detach().clone() for p in ours]
    for p in ours:
        p.grad = torch.full_like(p, float("inf"))
    opt.found_inf = torch.tensor(1.0)  # what GradScaler passes to an amp-aware step()
    opt.grad_scale = torch.tensor(1024.0)
    opt.step()
    del opt.found_inf, opt.grad_scale
    assert all("momentum_buffer" not in opt.state[p] for p in ours)
    assert all(torch.equal(a, b) for a, b in zip(before, ours))
    assert opt.gradient_stats()["steps"] == 0
    step_both(ref_opt, params, opt, ours, 3)
    for a, b in zip(params, ours):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a)


def test_late_parameter_gets_its_buffer(impl):
    """torch's fused SGD raises a TypeError when one parameter's first gradient arrives after
    the others have momentum buffers; here it gets its buffer on that step, as in foreach SGD."""
    params = make_params()
    ours = clone_params(params)
    ref_opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.3, foreach=False)
    opt = FusedScaledSGD(ours, lr=0.1, momentum=0.9, dampening=0.3, **impl)
    for step in range(4):
        for i, (a, b) in enumerate(zip(params, ours)):
            if i == 0 and step < 2:
                a.grad = b.grad = None
                continue
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        ref_opt.step()
        opt.step()
        assert ("momentum_buffer" in opt.state[ours[0]]) == (step >= 2)
    for a, b in zip(params, ours):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reduced_precision_updates_every_element(dtype, impl):
    """torch 2.13's CPU fused kernel updates only the tail of fp16/bf16 tensors; every element
    must move, to the fp32 math rounded once."""
    p = torch.randn(1000, dtype=dtype, requires_grad=True)
    p.grad = torch.randn_like(p).abs() + 0.5
    expected = (p.detach().float() - 0.5 * (p.grad.float() + 0.01 * p.detach().float())).to(dtype)
    opt = FusedScaledSGD([p], lr=0.5, weight_decay=0.01, **impl)
    old = p.detach().clone()
    opt.step()
    assert (p != old).all()
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=0)


def test_grad_scaler_skips_and_steps(impl):
    """With torch.amp.GradScaler: an overflowing step changes neither parameters, momentum nor
    statistics; later steps match torch SGD under the same scaler."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    ref_model = copy.deepcopy(model)
    opt = FusedScaledSGD(model.parameters(), lr=0.05, momentum=0.9, **impl, noise_scale=True, batch_size=8)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9, foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(6):
        x = torch.randn(8, 6)
        for m, o, s in ((model, opt, scaler), (ref_model, ref_opt, ref_scaler)):
            o.zero_grad()
            for half in (x[:4], x[4:]):
                loss = m(half).square().mean() / 2
                if step == 2:
                    loss = loss * float("inf")  # overflow this step
                s.scale(loss).backward()
                if o is opt:
                    o.accumulate_grad(grad_scaler=s, loss_scale=0.5)
            if step == 2 and o is opt:
                params_before = [p.detach().clone() for p in model.parameters()]
                bufs_before = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
                stats_before = opt.gradient_stats()
            s.step(o)
            s.update()
        if step == 2:
            assert all(torch.equal(a, b) for a, b in zip(params_before, model.parameters()))
            assert all(torch.equal(a, opt.state[p]["momentum_buffer"]) for a, p in zip(bufs_before, model.parameters()))
            after = opt.gradient_stats()
            for key in ("steps", "grad_sq_norm", "trace_cov", "updates"):
                assert after[key] == stats_before[key], key
    assert opt.gradient_stats()["steps"] == 5
    assert opt.gradient_stats()["updates"] == 5
    for a, b in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a)


def test_parameter_listed_twice_is_stepped_once(impl):
    """torch warns about a parameter listed twice in a group (and will make it an error); it is
    stepped once here, as if listed once."""
    params = make_params(torch.float64)
    ours = clone_params(params)
    ref_opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=False)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = FusedScaledSGD(ours + ours[:2], lr=0.1, momentum=0.9, noise_scale=True, **impl)
    step_both(ref_opt, params, opt, ours, 3)
    for a, b in zip(params, ours):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert len(opt.gradient_stats()["last_grad_sq_norm_per_tensor"]) == len(ours)
