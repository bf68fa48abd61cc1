"""The noise-scale estimator against a problem whose true noise scale is known in closed form.

Least squares, loss_i = ½(x_i·w − y_i)², x ~ N(0, I_d), y = x·w* + σε. With δ = w − w* and
r = x·δ − σε the per-example gradient is g = x·r, so G = E[g] = δ and

    E|g|² = E[|x|²(x·δ)²] + σ²E|x|² = (d + 2)|δ|² + dσ²
    tr(Σ) = E|g|² − |G|² = (d + 1)|δ|² + dσ²,   B_simple = tr(Σ)/|G|².

Per tensor (w split into blocks k of size d_k): G_k = δ_k and
    tr(Σ_k) = E[|x_k|² r²] − |δ_k|² = d_k(|δ|² + σ²) + |δ_k|².
lr = 0 keeps w fixed so the truth stays put while the averages converge.
"""

import math

import pytest
import torch

from fastscale import FusedScaledSGD

D1, D2, SIGMA = 6, 4, 0.7


def problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w_star = torch.randn(D1 + D2, generator=gen, dtype=torch.float64)
    w = w_star + torch.randn(D1 + D2, generator=gen, dtype=torch.float64) * 0.5
    delta = w - w_star
    truth = {
        "grad_sq_norm": delta.square().sum().item(),
        "trace_cov": (D1 + D2 + 1) * delta.square().sum().item() + (D1 + D2) * SIGMA**2,
    }
    truth["b_simple"] = truth["trace_cov"] / truth["grad_sq_norm"]
    d2 = delta.square().sum().item()
    truth["trace_per_tensor"] = [
        D1 * (d2 + SIGMA**2) + delta[:D1].square().sum().item(),
        D2 * (d2 + SIGMA**2) + delta[D1:].square().sum().item(),
    ]
    truth["g2_per_tensor"] = [delta[:D1].square().sum().item(), delta[D1:].square().sum().item()]
    return w_star, w, truth, gen


def batch(w_star, n, gen):
    x = torch.randn(n, D1 + D2, generator=gen, dtype=torch.float64)
    y = x @ w_star + SIGMA * torch.randn(n, generator=gen, dtype=torch.float64)
    return x, y


def make(w, **kw):
    # Two parameter tensors with a gradient-less one and an empty one between them: per-tensor
    # statistics must stay indexed by parameter position.
    w1 = w[:D1].clone().requires_grad_(True)
    frozen = torch.randn(3, dtype=torch.float64, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    w2 = w[D1:].clone().requires_grad_(True)
    params = [w1, frozen, empty, w2]
    opt = FusedScaledSGD(params, lr=0.0, noise_scale=True, **kw)  # default settings
    return params, opt


def loss_fn(params, x, y):
    w1, _, empty, w2 = params
    return 0.5 * (x[:, :D1] @ w1 + x[:, D1:] @ w2 + empty.sum() - y).square()


def check(stats, truth, per_tensor):
    for key in ("grad_sq_norm", "trace_cov", "b_simple"):
        assert stats[key] == pytest.approx(truth[key], rel=0.05), key  # default settings: within 5%
        assert stats["ready"] and stats[f"{key}_low"] < stats[key] < stats[f"{key}_high"]
    if per_tensor:
        g2, tr = stats["grad_sq_norm_per_tensor"], stats["trace_cov_per_tensor"]
        assert [g2[0], g2[3]] == pytest.approx(truth["g2_per_tensor"], rel=0.15)
        assert [tr[0], tr[3]] == pytest.approx(truth["trace_per_tensor"], rel=0.10)
        assert math.isnan(g2[1])  # never had a gradient: no estimate, not a wrong one


def test_micro_batch_source(impl):
    w_star, w, truth, gen = problem()
    params, opt = make(w, batch_size=64, **impl)
    for _ in range(2500):
        opt.zero_grad()
        for _ in range(4):  # 4 micro-batches of 16, each loss divided by 4 as users do
            x, y = batch(w_star, 16, gen)
            (loss_fn(params, x, y).mean() / 4).backward()
            opt.accumulate_grad(loss_scale=0.25)
        opt.step()
    check(opt.gradient_stats(), truth, per_tensor=True)


def test_micro_batch_source_unequal_sizes_sum_loss(impl):
    """Micro-batches of 8, 24, 16, 16 examples with sum-reduced losses: each micro-batch
    declares its size and loss scale, and the estimate stays unbiased."""
    w_star, w, truth, gen = problem(1)
    params, opt = make(w, **impl)
    for _ in range(2500):
        opt.zero_grad()
        for b in (8, 24, 16, 16):
            x, y = batch(w_star, b, gen)
            loss_fn(params, x, y).sum().backward()
            opt.accumulate_grad(batch_size=b, loss_scale=b)
        opt.step()
    check(opt.gradient_stats(), truth, per_tensor=True)


def test_per_example_source(impl):
    w_star, w, truth, gen = problem(2)
    params, opt = make(w, **impl)
    for _ in range(1500):
        opt.zero_grad()
        x, y = batch(w_star, 32, gen)
        loss_fn(params, x, y).mean().backward()
        with torch.no_grad():
            r = x @ torch.cat([params[0], params[3]]) - y
            opt.observe_per_example_norms(x.square().sum(1) * r.square())
        opt.step()
    check(opt.gradient_stats(), truth, per_tensor=False)
    stats = opt.gradient_stats()
    b = 32
    assert stats["steps_over_min"] == pytest.approx(1 + stats["b_simple"] / b)
    assert stats["examples_over_min"] == pytest.approx(1 + b / stats["b_simple"])


def test_replica_source(impl):
    """Data-parallel replicas as the DDP hook feeds them: 4 replicas of 16 examples, the mean of
    their squared gradient norms per tensor, .grad their mean (B_small 16, B_big 64)."""
    w_star, w, truth, gen = problem(5)
    params, opt = make(w, **impl)
    stepped = [params[0], params[3]]
    for _ in range(2500):
        opt.zero_grad()
        grads = []
        for _ in range(4):
            x, y = batch(w_star, 16, gen)
            grads.append(torch.autograd.grad(loss_fn(params, x, y).mean(), stepped))
        per_tensor = torch.zeros(4, dtype=torch.float64)
        per_tensor[[0, 3]] = torch.stack([torch.stack([g.square().sum() for g in gs]) for gs in grads]).mean(0)
        for i, p in enumerate(stepped):
            p.grad = torch.stack([gs[i] for gs in grads]).mean(0)
        opt.observe_small_batch_norms(per_tensor.sum(), 16, 64, per_tensor=per_tensor)
        opt.step()
    check(opt.gradient_stats(), truth, per_tensor=True)


def test_non_finite_steps_do_not_poison_the_averages(impl):
    w_star, w, truth, gen = problem(3)
    params, opt = make(w, **impl)

    def one_step(poison=None):
        opt.zero_grad()
        x, y = batch(w_star, 16, gen)
        loss_fn(params, x, y).mean().backward()
        with torch.no_grad():
            r = x @ torch.cat([params[0], params[3]]) - y
            sq = x.square().sum(1) * r.square()
        if poison == "norms":
            sq[3] = float("nan")
        if poison == "grad":
            params[0].grad[0] = float("inf")
        opt.observe_per_example_norms(sq)
        opt.step()

    for _ in range(20):
        one_step()
    before = opt.gradient_stats()
    one_step("norms")
    after_bad_norms = opt.gradient_stats()
    assert after_bad_norms["updates"] == before["updates"]
    assert after_bad_norms["b_simple"] == before["b_simple"]
    params[0].data.copy_(w[:D1])  # lr=0, but the inf gradient's update is lr·inf = nan: restore
    one_step("grad")
    params[0].data.copy_(w[:D1])
    params[3].data.copy_(w[D1:])
    assert opt.gradient_stats()["updates"] == before["updates"]
    for _ in range(5):
        one_step()
    assert math.isfinite(opt.noise_scale())
    assert opt.gradient_stats()["updates"] == before["updates"] + 5


def test_last_norms_indexed_by_parameter_position(impl):
    a = torch.randn(4, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    e = torch.zeros(0, requires_grad=True)
    c = torch.randn((), requires_grad=True)
    opt = FusedScaledSGD([{"params": [a, b]}, {"params": [e, c], "momentum": 0.9}], lr=0.1, **impl)
    a.grad, e.grad, c.grad = torch.randn(4), torch.zeros(0), torch.randn(())
    opt.step()
    got = opt.gradient_stats()["last_grad_sq_norm_per_tensor"]
    want = [a.grad.square().sum().item(), 0.0, 0.0, c.grad.square().item()]
    assert got == pytest.approx(want, rel=1e-6)


def test_one_source_per_step():
    p = torch.randn(3, requires_grad=True)
    opt = FusedScaledSGD([p], lr=0.1, noise_scale=True, batch_size=8)
    p.grad = torch.randn(3)
    opt.accumulate_grad()
    with pytest.raises(RuntimeError, match="one per step"):
        opt.observe_per_example_norms(torch.rand(8))
    with pytest.raises(TypeError, match="sq_norms must be a 1-D float tensor"):
        opt.observe_per_example_norms(torch.rand(8, 2))
    with pytest.raises(ValueError, match="loss_scale must be a finite number > 0"):
        opt.accumulate_grad(loss_scale=0.0)
    opt2 = FusedScaledSGD([p], lr=0.1, noise_scale=True)
    with pytest.raises(ValueError, match="accumulate_grad needs batch_size"):
        opt2.accumulate_grad()


def test_per_example_hooks_feed_the_estimator(impl):
    """fastscale.PerExampleGradNorms on an nn.Linear gives the per-example source end to end."""
    from fastscale import PerExampleGradNorms

    w_star, w, truth, gen = problem(4)
    model = torch.nn.Linear(D1 + D2, 1, bias=False).double()
    model.weight.data.copy_(w.reshape(1, -1))
    opt = FusedScaledSGD(model.parameters(), lr=0.0, noise_scale=True, **impl)  # default settings
    with PerExampleGradNorms(model, loss_reduction="mean") as norms:
        for _ in range(1500):
            opt.zero_grad()
            x, y = batch(w_star, 32, gen)
            (0.5 * (model(x).squeeze(1) - y).square()).mean().backward()
            opt.observe_per_example_norms(norms.squared_norms())
            opt.step()
    check(opt.gradient_stats(), truth, per_tensor=False)
