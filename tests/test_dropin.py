"""FusedScaledSGD as a drop-in torch.optim.SGD where the plain parity tests do not reach.

* sparse gradients (``nn.Embedding(sparse=True)``) and complex parameters step as torch's SGD
  steps them, and their statistics are |g|² (sum of |z|², of the coalesced sparse values);
* ``differentiable=True`` gives the autograd gradients torch's SGD gives (gradcheck in fp64,
  one step like torch's own test, and several steps compared with torch);
* the constructor raises torch's exception type and message for each invalid option;
* ``copy.deepcopy``, ``pickle`` and ``torch.save``/``torch.load`` give an independent optimizer
  that steps, measures and warms up exactly as the original from then on.

Each test compares against torch.optim.SGD run on the same fresh random inputs.
"""

import copy
import io
import math
import pickle
import re

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck
from torch.testing._internal.common_optimizers import optim_inputs_func_sgd

from conftest import step_both
from fastscale import FusedScaledSGD, NoiseScaleConfig


def whole(message: str) -> str:
    """A ``match=`` pattern for exactly this message."""
    return "^" + re.escape(message) + "$"


def dense(t):
    return t.to_dense() if t.is_sparse else t


# ============================================================== sparse gradients

SPARSE_CONFIGS = [
    dict(),
    dict(maximize=True),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3, maximize=True),
    dict(momentum=0.8, nesterov=True),
    dict(momentum=0.8, nesterov=True, maximize=True),
]


def _embedding_model(seed):
    torch.manual_seed(seed)
    return nn.ModuleDict({"emb": nn.Embedding(12, 4, sparse=True), "head": nn.Linear(4, 3)})


def _embedding_batches(steps):
    # Repeated indices: the sparse gradient has duplicate rows until coalesced.
    return [(torch.randint(0, 12, (9,)), torch.randn(9, 3)) for _ in range(steps)]


def _embedding_loss(model, idx, target):
    return ((model["head"](model["emb"](idx)) - target) ** 2).mean()


@pytest.mark.parametrize("config", SPARSE_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_sparse_embedding_steps_like_torch(impl, config):
    """An Embedding(sparse=True) beside a dense layer, one group: params, (sparse) momentum
    buffers and the per-tensor |g|² match torch.optim.SGD over several steps."""
    ref_model, model = _embedding_model(3), _embedding_model(3)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.2, **config)
    opt = FusedScaledSGD(model.parameters(), lr=0.2, **config, **impl)
    for idx, target in _embedding_batches(4):
        for m, o in ((ref_model, ref), (model, opt)):
            o.zero_grad()
            _embedding_loss(m, idx, target).backward()
            o.step()
        assert model["emb"].weight.grad.is_sparse
        # The dense layer's step may differ from torch's in the last bit (fp32), and the next
        # sparse gradient reads it: close, not equal (the sparse path alone is held to equality
        # in test_sparse_complex_gradient_steps_like_torch_and_measures_abs_squared).
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-6)
            if config.get("momentum"):
                buf, ref_buf = opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"]
                assert buf.is_sparse == ref_buf.is_sparse
                torch.testing.assert_close(dense(buf), dense(ref_buf), rtol=2e-6, atol=2e-6)
            else:
                assert "momentum_buffer" not in opt.state[p]
    stats = opt.gradient_stats()["last_grad_sq_norm_per_tensor"]
    want = [dense(p.grad).double().square().sum().item() for p in model.parameters()]
    torch.testing.assert_close(torch.tensor(stats, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sparse_gradient_with_weight_decay_raises_like_torch_and_writes_nothing(impl, momentum, maximize):
    """torch.optim.SGD cannot add a dense weight decay to a sparse gradient and raises; so does
    ours, with torch's message, and before writing anything (the dense layer, listed first, is
    not stepped either, nor the step counter or the warmup)."""
    ref_model, model = _embedding_model(4), _embedding_model(4)
    params = [*model["head"].parameters(), model["emb"].weight]
    ref_params = [*ref_model["head"].parameters(), ref_model["emb"].weight]
    kw = dict(lr=0.1, momentum=momentum, weight_decay=0.01, maximize=maximize)
    ref = torch.optim.SGD(ref_params, **kw)
    opt = FusedScaledSGD(params, **kw, **impl, batch_size=8, base_batch_size=2, warmup_steps=3)
    (idx, target), = _embedding_batches(1)
    _embedding_loss(ref_model, idx, target).backward()
    _embedding_loss(model, idx, target).backward()
    message = "add(sparse, dense) is not supported. Use add(dense, sparse) instead."
    with pytest.raises(RuntimeError, match=whole(message)):
        ref.step()
    before = [p.detach().clone() for p in params]
    lr_before = opt.current_lr()
    with pytest.raises(RuntimeError, match=whole(message)):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert all("momentum_buffer" not in s for s in opt.state.values())
    assert opt.gradient_stats()["steps"] == 0
    assert opt.current_lr() == lr_before


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128, torch.float64])
def test_sparse_complex_gradient_steps_like_torch_and_measures_abs_squared(impl, dtype):
    """A sparse gradient of a complex (and an fp64) parameter: torch's steps, and the statistics
    hold sum |z|² over the coalesced gradient (not the real part's square, not fp32-reduced)."""
    torch.manual_seed(5)
    p0 = torch.randn(7, 3, dtype=dtype)
    ref_p, p = p0.clone().requires_grad_(True), p0.clone().requires_grad_(True)
    ref = torch.optim.SGD([ref_p], lr=0.1, momentum=0.9, nesterov=True)
    opt = FusedScaledSGD([p], lr=0.1, momentum=0.9, nesterov=True, **impl)
    for _ in range(3):
        rows = torch.randint(0, 7, (1, 5))  # duplicates: coalescing sums them
        grad = torch.sparse_coo_tensor(rows, torch.randn(5, 3, dtype=dtype), (7, 3), check_invariants=True)
        ref_p.grad, p.grad = grad.clone(), grad.clone()
        ref.step()
        opt.step()
        assert torch.equal(p, ref_p)
        want = dense(grad).abs().double().square().sum().item()
        got = opt.gradient_stats()["last_grad_sq_norm_per_tensor"][0]
        assert got == pytest.approx(want, rel=1e-6)


# ============================================================== complex parameters

SGD_INPUTS = optim_inputs_func_sgd("cpu")
COMPLEX_TOL = {torch.complex64: dict(rtol=2e-6, atol=2e-6), torch.complex128: dict(rtol=1e-12, atol=1e-12)}


def _fresh(kwargs):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("optim_input", SGD_INPUTS, ids=[o.desc for o in SGD_INPUTS])
def test_complex_params_step_like_torch(impl, dtype, optim_input):
    """Complex parameters (beside a real one of the same precision) over several steps with
    every torch SGD option set: params, momentum buffers, and |g|² = sum |z|² per tensor."""
    real = torch.float32 if dtype == torch.complex64 else torch.float64
    torch.manual_seed(11)
    init = [torch.randn(s, dtype=dtype) for s in ((4, 3), (5,), ())] + [torch.randn(6, dtype=real)]
    ref_params = [t.clone().requires_grad_(True) for t in init]
    params = [t.clone().requires_grad_(True) for t in init]
    ref = torch.optim.SGD(ref_params, **_fresh(optim_input.kwargs))
    opt = FusedScaledSGD(params, **_fresh(optim_input.kwargs), **impl)
    for _ in range(4):
        grads = [torch.randn_like(t) for t in init]
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p, q, **COMPLEX_TOL[dtype])
            if optim_input.kwargs.get("momentum"):
                torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"],
                                           **COMPLEX_TOL[dtype])
        stats = opt.gradient_stats()["last_grad_sq_norm_per_tensor"]
        want = [g.abs().double().square().sum().item() for g in grads]
        torch.testing.assert_close(torch.tensor(stats, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                                   rtol=2e-6, atol=0)


def test_complex_params_measure_as_their_real_views(impl):
    """A complex parameter and its real view (..., 2) are the same SGD problem: with the same
    gradients, micro-batch accumulation and noise-scale estimate, both give the same steps and
    the same statistics, per tensor and in total."""
    torch.manual_seed(12)
    init = [torch.randn(5, 3, dtype=torch.complex128), torch.randn(4, dtype=torch.complex128)]
    zs = [t.clone().requires_grad_(True) for t in init]
    rs = [torch.view_as_real(t).clone().requires_grad_(True) for t in init]
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.01, batch_size=16,
              noise_scale=NoiseScaleConfig(beta=0.5, min_updates=0), **impl)
    opt_z, opt_r = FusedScaledSGD(zs, **kw), FusedScaledSGD(rs, **kw)
    for _ in range(3):
        opt_z.zero_grad()
        opt_r.zero_grad()
        for _ in range(2):  # two micro-batches, accumulated in place as autograd would
            gs = [torch.randn_like(t) for t in init]
            for z, r, g in zip(zs, rs, gs):
                if z.grad is None:
                    z.grad, r.grad = g.clone(), torch.view_as_real(g).clone()
                else:
                    z.grad.add_(g)
                    r.grad.add_(torch.view_as_real(g))
            opt_z.accumulate_grad()
            opt_r.accumulate_grad()
        opt_z.step()
        opt_r.step()
        for z, r in zip(zs, rs):
            torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), rtol=1e-12, atol=1e-12)
        sz, sr = opt_z.gradient_stats(), opt_r.gradient_stats()
        assert sz.keys() == sr.keys()
        for key in sz:
            if isinstance(sz[key], (str, bool)) or sz[key] is None:
                assert sz[key] == sr[key], key
                continue
            torch.testing.assert_close(torch.tensor(sz[key], dtype=torch.float64),
                                       torch.tensor(sr[key], dtype=torch.float64), rtol=1e-6, atol=0)
    assert sz["updates"] == 3


# ============================================================== differentiable=True

DIFF_CONFIGS = [
    dict(lr=0.9),
    dict(lr=0.9, weight_decay=0.1, maximize=True),
    dict(lr=0.7, momentum=0.9),
    dict(lr=0.5, momentum=0.7, dampening=0.3, weight_decay=0.2),
    dict(lr=0.6, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True),
]
DIFF_IDS = [",".join(f"{k}={v}" for k, v in c.items()) for c in DIFF_CONFIGS]


def _one_step(opt_class, kwargs, p, grad, state):
    """torch's test/optim _diff_fn: one step of a fresh optimizer on a non-leaf clone of ``p``
    whose state is a clone of ``state``; returns the new parameter and differentiable state."""
    p = p.clone()
    p.grad = grad
    opt = opt_class([p], **kwargs)
    opt.state[p].update({k: v.clone() for k, v in state.items()})
    opt.step()
    return (p,) + tuple(v for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.requires_grad)


def _vjp(outputs, inputs, weights):
    loss = sum((w * o).sum() for w, o in zip(weights, outputs))
    return torch.autograd.grad(loss, inputs, allow_unused=True)


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("config", DIFF_CONFIGS, ids=DIFF_IDS)
def test_differentiable_step_gradcheck_and_matches_torch(config, tensor_lr):
    """One step through autograd, as torch tests it: gradcheck (fp64) with respect to the
    parameter, the gradient, the momentum buffer (and a tensor lr), and the same vector-Jacobian
    products as torch.optim.SGD(differentiable=True)."""
    torch.manual_seed(21)
    p = torch.randn(6, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(6, dtype=torch.float64, requires_grad=True)
    buf = torch.randn(6, dtype=torch.float64, requires_grad=True)
    lr = torch.tensor(config["lr"], dtype=torch.float64, requires_grad=True)
    state = {"momentum_buffer": buf} if config.get("momentum") else {}
    inputs = (p, grad, *state.values()) + ((lr,) if tensor_lr else ())

    def fn(opt_class):
        def f(p, grad, *rest):
            kwargs = {**config, "differentiable": True, **({"lr": rest[-1]} if tensor_lr else {})}
            return _one_step(opt_class, kwargs, p, grad, dict(zip(state, rest)))
        return f

    assert gradcheck(fn(FusedScaledSGD), inputs)
    ours, theirs = fn(FusedScaledSGD)(*inputs), fn(torch.optim.SGD)(*inputs)
    assert len(ours) == len(theirs) == 1 + len(state)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    weights = [torch.randn_like(o) for o in ours]
    for a, b in zip(_vjp(ours, inputs, weights), _vjp(theirs, inputs, weights)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _unrolled(opt_class, kwargs, p0, gs, b0=None, lr=None):
    """Three steps on a non-leaf copy of ``p0`` (momentum buffer: a copy of ``b0``, or none):
    each gradient is 0.5·p + g_k, so it depends on the parameter through the previous steps;
    returns the final parameter and momentum buffer."""
    p = p0.clone()
    opt = opt_class([p], **kwargs, **({} if lr is None else {"lr": lr}), differentiable=True)
    if b0 is not None:
        opt.state[p]["momentum_buffer"] = b0.clone()
    for g in gs:
        p.grad = 0.5 * p + g
        opt.step()
    buf = opt.state[p].get("momentum_buffer")
    return (p,) if buf is None else (p, buf)


MULTI_STEP_CONFIGS = [
    dict(lr=0.3),
    dict(lr=0.3, weight_decay=0.1, maximize=True),
    dict(lr=0.3, momentum=0.9),
    dict(lr=0.3, momentum=0.8, dampening=0.4, weight_decay=0.1, maximize=True),
    dict(lr=0.3, momentum=0.9, nesterov=True, weight_decay=0.05),
]


@pytest.mark.parametrize("config", MULTI_STEP_CONFIGS, ids=[",".join(f"{k}={v}" for k, v in c.items())
                                                             for c in MULTI_STEP_CONFIGS])
def test_differentiable_unrolled_steps_match_torch(config):
    """The parameter and buffer after three steps, and their gradients with respect to the
    initial parameter, the initial momentum buffer and each step's gradient input, equal
    torch's; gradcheck (fp64) agrees."""
    torch.manual_seed(22)
    p0 = torch.randn(5, dtype=torch.float64, requires_grad=True)
    b0 = torch.randn(5, dtype=torch.float64, requires_grad=True) if config.get("momentum") else None
    gs = [torch.randn(5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    inputs = (p0, *gs) + (() if b0 is None else (b0,))

    def run(opt_class):
        return lambda p0, *rest: _unrolled(opt_class, config, p0, rest[:3], b0=rest[3] if b0 is not None else None)

    ours, theirs = run(FusedScaledSGD)(*inputs), run(torch.optim.SGD)(*inputs)
    assert len(ours) == len(theirs) == (1 if b0 is None else 2)
    weights = [torch.randn_like(o) for o in ours]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    for a, b in zip(_vjp(ours, inputs, weights), _vjp(theirs, inputs, weights)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert gradcheck(run(FusedScaledSGD), inputs)


@pytest.mark.parametrize("nesterov", [False, True])
def test_differentiable_first_momentum_buffer_is_detached_as_in_torch(nesterov):
    """torch.optim.SGD starts a momentum buffer as ``grad.detach().clone()``, so no gradient
    flows through the first step's buffer; ours gives torch's gradients there too (drop-in
    parity, not the full derivative: gradcheck would fail for both)."""
    torch.manual_seed(25)
    p0 = torch.randn(5, dtype=torch.float64, requires_grad=True)
    gs = [torch.randn(5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    config = dict(lr=0.3, momentum=0.9, nesterov=nesterov)
    ours, theirs = _unrolled(FusedScaledSGD, config, p0, gs), _unrolled(torch.optim.SGD, config, p0, gs)
    weights = [torch.randn_like(o) for o in ours]
    inputs = (p0, *gs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    grads_ours, grads_theirs = _vjp(ours, inputs, weights), _vjp(theirs, inputs, weights)
    for a, b in zip(grads_ours, grads_theirs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # Without Nesterov the first step moves p by the detached buffer alone: g_1 is not reached.
    assert (grads_ours[1] is None) == (not nesterov)


def test_differentiable_hypergradient_of_a_tensor_lr_matches_torch():
    """d(loss after three Nesterov steps)/d(lr) for a tensor lr (the meta-learning use), and
    with respect to the initial parameter and buffer: torch's values; gradcheck agrees."""
    torch.manual_seed(23)
    p0 = torch.randn(5, dtype=torch.float64, requires_grad=True)
    b0 = torch.randn(5, dtype=torch.float64, requires_grad=True)
    gs = [torch.randn(5, dtype=torch.float64) for _ in range(3)]
    lr = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    config = dict(momentum=0.9, nesterov=True, weight_decay=0.1)

    def loss(opt_class, lr, p0, b0):
        return _unrolled(opt_class, config, p0, gs, b0=b0, lr=lr)[0].square().sum()

    ours, theirs = loss(FusedScaledSGD, lr, p0, b0), loss(torch.optim.SGD, lr, p0, b0)
    torch.testing.assert_close(ours, theirs, rtol=1e-14, atol=1e-14)
    g_ours = torch.autograd.grad(ours, (lr, p0, b0))
    g_theirs = torch.autograd.grad(theirs, (lr, p0, b0))
    assert g_ours[0].abs() > 0
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert gradcheck(lambda lr, p0, b0: loss(FusedScaledSGD, lr, p0, b0), (lr, p0, b0))


def test_differentiable_step_runs_under_no_grad_and_records_statistics():
    """Like torch's, the differentiable step enables autograd itself (even inside no_grad),
    and the statistics are plain detached numbers: |g|² per tensor."""
    torch.manual_seed(24)
    p0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    p = p0.clone()
    p.grad = grad
    opt = FusedScaledSGD([p], lr=0.1, momentum=0.9, differentiable=True)
    with torch.no_grad():
        opt.step()
    assert p.grad_fn is not None
    (d_p0,) = torch.autograd.grad(p.sum(), p0)
    torch.testing.assert_close(d_p0, torch.ones_like(p0))
    assert opt.gradient_stats()["last_grad_sq_norm_per_tensor"] == [pytest.approx(grad.square().sum().item(), rel=1e-6)]
    assert not opt.statistics.last_norms.requires_grad


# ============================================================== constructor errors

INVALID = [
    (dict(lr=-0.1), ValueError, "Invalid learning rate: -0.1"),
    # a 0-dim tensor formats as its float
    (dict(lr=torch.tensor(-0.1)), ValueError, "Invalid learning rate: -0.10000000149011612"),
    (dict(lr=torch.tensor([0.1, 0.2])), ValueError, "Tensor lr must be 1-element"),
    (dict(momentum=-0.5), ValueError, "Invalid momentum value: -0.5"),
    (dict(weight_decay=-1e-4), ValueError, "Invalid weight_decay value: -0.0001"),
    (dict(nesterov=True), ValueError, "Nesterov momentum requires a momentum and zero dampening"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError,
     "Nesterov momentum requires a momentum and zero dampening"),
    (dict(foreach=True, fused=True), RuntimeError, "`fused` and `foreach` cannot be `True` together."),
    (dict(fused=True, differentiable=True), RuntimeError, "`fused` does not support `differentiable`"),
    (dict(fused=True, differentiable=True, foreach=True), RuntimeError, "`fused` does not support `differentiable`"),
]


@pytest.mark.parametrize("kwargs,exc,message", INVALID, ids=[m + " " + ",".join(k) for k, _, m in INVALID])
def test_constructor_raises_what_torch_raises(kwargs, exc, message):
    """Each invalid option raises torch.optim.SGD's exception type and whole message."""
    torch.manual_seed(31)
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(exc, match=whole(message)) as theirs:
        torch.optim.SGD([p], **kwargs)
    with pytest.raises(exc, match=whole(message)) as ours:
        FusedScaledSGD([p], **kwargs)
    assert ours.type is theirs.type
    assert str(ours.value) == str(theirs.value)


def test_constructor_accepts_what_torch_accepts():
    """The boundary cases torch accepts (zero lr/momentum/decay, Nesterov with momentum and no
    dampening, fused alone, foreach alone, a 1-element tensor lr) construct and step."""
    torch.manual_seed(32)
    for kwargs in (dict(lr=0.0, momentum=0.0, weight_decay=0.0), dict(momentum=0.9, nesterov=True),
                   dict(fused=True), dict(foreach=True), dict(foreach=False, fused=False),
                   dict(lr=torch.tensor([0.01]))):
        p, q = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
        q.data.copy_(p.data)
        g = torch.randn(3)
        p.grad, q.grad = g.clone(), g.clone()
        torch.optim.SGD([q], **_fresh(kwargs)).step()
        FusedScaledSGD([p], **_fresh(kwargs)).step()
        torch.testing.assert_close(p, q)


# ============================================================== copies

def _copy_model(seed):
    torch.manual_seed(seed)
    shapes = ((6, 4), (6,), (3, 6), (3,))
    return [torch.randn(s, requires_grad=True) for s in shapes]


def _forward(params, x):
    w1, b1, w2, b2 = params
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def _copy_optimizer(params, impl):
    groups = [{"params": params[:2]},
              {"params": params[2:], "momentum": 0.5, "nesterov": False, "scaling": "sqrt", "warmup_steps": 4}]
    return FusedScaledSGD(groups, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, batch_size=32,
                          base_batch_size=8, scaling="noise", warmup_steps=6,
                          noise_scale=NoiseScaleConfig(beta=0.5, min_updates=2), **impl)


def _micro_batches(steps, micro=2):
    return [[(torch.randn(8, 4), torch.randn(8, 3)) for _ in range(micro)] for _ in range(steps)]


def _train_step(params, opt, batch):
    opt.zero_grad()
    for x, y in batch:
        ((_forward(params, x) - y) ** 2).mean().backward()
        opt.accumulate_grad()
    opt.step()


def _snapshot(params, opt):
    """Everything that must agree between an optimizer and its copy, as comparable values."""
    return dict(
        params=[p.detach().clone() for p in params],
        bufs=[opt.state[p]["momentum_buffer"].clone() for p in params],
        stats=opt.gradient_stats(),
        lr=opt.current_lr(),
    )


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            _assert_same(x, y)
        elif isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            assert len(x) == len(y) and all(torch.equal(s, t) for s, t in zip(x, y)), key
        elif isinstance(x, list):
            assert len(x) == len(y) and all(s == t or (math.isnan(s) and math.isnan(t)) for s, t in zip(x, y)), key
        else:
            assert x == y or (math.isnan(x) and math.isnan(y)), key


def _copy(kind, params, opt):
    """The copy's parameters (as its optimizer holds them) and the copied optimizer."""
    if kind == "deepcopy(opt)":
        new = copy.deepcopy(opt)
    elif kind == "deepcopy(params, opt)":
        new_params, new = copy.deepcopy((params, opt))
    elif kind == "pickle(params, opt)":
        new_params, new = pickle.loads(pickle.dumps((params, opt)))
    else:
        buf = io.BytesIO()
        torch.save(opt, buf)
        buf.seek(0)
        new = torch.load(buf, weights_only=False)
    held = [p for g in new.param_groups for p in g["params"]]
    if kind in ("deepcopy(params, opt)", "pickle(params, opt)"):
        assert all(a is b for a, b in zip(held, new_params))  # pickled together: shared, not duplicated
    assert all(a is not b for a, b in zip(held, params))
    assert len(new.statistics.params) == len(held)
    assert all(a is b for a, b in zip(new.statistics.params, held))  # the tracker indexes the copy's params
    return held, new


COPY_KINDS = ["deepcopy(opt)", "deepcopy(params, opt)", "pickle(params, opt)", "torch.save(opt)"]


@pytest.mark.parametrize("kind", COPY_KINDS)
def test_copy_steps_identically_and_independently(impl, kind):
    """A copy taken mid-warmup, after three accumulated steps with the noise-scale estimate
    live (scaling="noise": the rate itself reads the estimator), steps exactly as the original:
    params, momentum buffers, every gradient statistic and the warmup position. Stepping the
    copy first leaves the original untouched; the original then catches up bit for bit."""
    params = _copy_model(41)
    opt = _copy_optimizer(params, impl)
    for batch in _micro_batches(3):
        _train_step(params, opt, batch)
    assert opt.gradient_stats()["updates"] == 3
    lr_at_copy = opt.current_lr()
    new_params, new = _copy(kind, params, opt)
    _assert_same(_snapshot(params, opt), _snapshot(new_params, new))

    future = _micro_batches(4)
    original_before = _snapshot(params, opt)
    for batch in future[:2]:
        _train_step(new_params, new, batch)
    _assert_same(_snapshot(params, opt), original_before)  # the copy shares nothing mutable
    assert new.current_lr() != lr_at_copy  # the warmup moved on in the copy only

    for batch in future[:2]:
        _train_step(params, opt, batch)
    _assert_same(_snapshot(params, opt), _snapshot(new_params, new))
    for batch in future[2:]:
        _train_step(params, opt, batch)
        _train_step(new_params, new, batch)
        _assert_same(_snapshot(params, opt), _snapshot(new_params, new))
    assert opt.gradient_stats()["updates"] == 7


@pytest.mark.parametrize("kind", COPY_KINDS)
def test_copy_state_dict_equals_the_original(impl, kind):
    """The copy's state_dict (momentum buffers, fastscale step counter and estimator) equals
    the original's."""
    params = _copy_model(42)
    opt = _copy_optimizer(params, impl)
    for batch in _micro_batches(2):
        _train_step(params, opt, batch)
    new_params, new = _copy(kind, params, opt)
    a, b = opt.state_dict(), new.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert set(a["state"]) == set(range(len(params))) | {"fastscale"}
    assert "noise_scale" in a["state"]["fastscale"]

    def same(x, y):
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        return isinstance(y, torch.Tensor) and torch.equal(x, y)

    assert same(a["state"], b["state"])


def test_deepcopy_mid_accumulation_continues_the_accumulation(impl):
    """Copied between two micro-batches (deepcopy copies plain tensors' .grad), the copy
    finishes the step with the same statistics as the original."""
    params = _copy_model(43)
    opt = _copy_optimizer(params, impl)
    for batch in _micro_batches(2):
        _train_step(params, opt, batch)
    batch = _micro_batches(1, micro=3)[0]
    opt.zero_grad()
    x, y = batch[0]
    ((_forward(params, x) - y) ** 2).mean().backward()
    opt.accumulate_grad()
    new_params, new = copy.deepcopy((params, opt))
    assert all(p.grad is not None for p in new_params)
    for ps, o in ((params, opt), (new_params, new)):
        for x, y in batch[1:]:
            ((_forward(ps, x) - y) ** 2).mean().backward()
            o.accumulate_grad()
        o.step()
    _assert_same(_snapshot(params, opt), _snapshot(new_params, new))


@pytest.mark.parametrize("kind", ["pickle(params, opt)", "torch.save(opt)"])
def test_pickle_mid_accumulation_gives_a_working_optimizer(impl, kind):
    """A checkpoint taken between micro-batches pickles; the copy (whose params come back
    without .grad, as pickled tensors do) steps like the original from the next zero_grad."""
    params = _copy_model(44)
    opt = _copy_optimizer(params, impl)
    for batch in _micro_batches(2):
        _train_step(params, opt, batch)
    opt.zero_grad()
    x, y = _micro_batches(1)[0][0]
    ((_forward(params, x) - y) ** 2).mean().backward()
    opt.accumulate_grad()
    new_params, new = _copy(kind, params, opt)
    for batch in _micro_batches(2):
        _train_step(params, opt, batch)
        _train_step(new_params, new, batch)
        _assert_same(_snapshot(params, opt), _snapshot(new_params, new))


def test_tensor_weight_decay_like_torch(impl):
    """torch's signature takes ``weight_decay: float | Tensor``; a 1-element tensor steps the same."""
    torch.manual_seed(5)
    p = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    q = p.detach().clone().requires_grad_(True)
    ours = FusedScaledSGD([p], lr=0.1, momentum=0.9, weight_decay=torch.tensor(0.05), **impl)
    theirs = torch.optim.SGD([q], lr=0.1, momentum=0.9, weight_decay=torch.tensor(0.05), foreach=False)
    step_both(theirs, [q], ours, [p], 4)
    torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="Tensor weight_decay must be 1-element"):
        FusedScaledSGD([p], lr=0.1, weight_decay=torch.tensor([0.1, 0.2]))


def test_sparse_weight_decay_in_a_later_group_raises_before_the_first_group_steps(impl):
    torch.manual_seed(6)
    dense = torch.randn(3, requires_grad=True)
    emb = torch.randn(5, 2, requires_grad=True)
    opt = FusedScaledSGD([{"params": [dense]}, {"params": [emb], "weight_decay": 0.01}], lr=0.1, **impl)
    dense.grad = torch.randn(3)
    emb.grad = torch.sparse_coo_tensor([[1, 4]], torch.randn(2, 2), (5, 2), check_invariants=True)
    before = dense.detach().clone()
    with pytest.raises(RuntimeError, match=r"add\(sparse, dense\) is not supported"):
        opt.step()
    assert torch.equal(dense, before)
    assert opt.gradient_stats()["steps"] == 0
