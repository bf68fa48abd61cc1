"""Every public call validates everything before its first write.

For each way a call can fail, the test records the whole optimizer (parameters, momentum
buffers, step counter and warmup position, pending micro-batches, estimator), makes the call
fail, checks that nothing changed, then fixes the input and checks that the retry gives what a
clean optimizer gives.
"""

import copy

import pytest
import torch

from conftest import step_both
from fastscale import FusedScaledSGD, NoiseScaleConfig


def build(**kw):
    torch.manual_seed(0)
    a = [torch.randn(4, 3, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64, requires_grad=True)]
    b = [torch.randn(2, 2, dtype=torch.float64, requires_grad=True)]
    groups = [{"params": a}, {"params": b, "momentum": 0.5, "scaling": "sqrt"}]
    opt = FusedScaledSGD(groups, lr=0.1, momentum=0.9, batch_size=64, base_batch_size=16, warmup_steps=5,
                         noise_scale=NoiseScaleConfig(beta=0.5, min_updates=0), **kw)
    return a + b, opt


def train(params, opt, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(2):
            for p in params:  # as backward does: into the same .grad tensor
                g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
            opt.accumulate_grad(loss_scale=0.5)
        opt.step()


def record(params, opt):
    """Everything a failed call must leave alone, as comparable values."""
    acc = opt.statistics._accumulation
    return dict(
        params=[p.detach().clone() for p in params],
        state=copy.deepcopy(opt.state_dict()),
        groups=[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        stats=repr(opt.gradient_stats()),
        pending=None if acc is None else (acc.count, list(acc.batch_sizes), acc.small_pt.clone()),
        grads=[None if p.grad is None else p.grad.clone() for p in params],
    )


def same(x, y):
    if isinstance(x, torch.Tensor):
        if x.is_sparse or getattr(y, "is_sparse", False):
            x, y = x.to_dense(), y.to_dense()
        return isinstance(y, torch.Tensor) and x.shape == y.shape and bool(((x == y) | (x.isnan() & y.isnan())).all())
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(same(a, b) for a, b in zip(x, y))
    return x == y


def assert_unchanged(before, params, opt):
    after = record(params, opt)
    for key in before:
        assert same(before[key], after[key]), key


def set_grads(params, seed=5):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


GROUP_EDITS = [
    ("batch_size", 0, "batch_size must be a positive int"),
    ("scaling", "nosie", "scaling must be one of"),
    ("lr", -1.0, "Invalid learning rate"),
    ("momentum", "0.9", "momentum must be a float"),
    ("warmup_steps", 2.5, "warmup_steps must be an int >= 0"),
    ("nesterov", True, "Nesterov momentum requires"),  # group 1 has momentum 0.5 but...
    ("maximize", "yes", "maximize must be a bool"),
    ("scaling", "noise", None),  # valid: the optimizer has an estimator
]


@pytest.mark.parametrize("key,value,match", GROUP_EDITS, ids=[f"{k}={v!r}" for k, v, _ in GROUP_EDITS])
def test_step_validates_hand_edited_group_options_first(key, value, match, impl):
    """A later group edited by hand: the step raises before stepping the earlier group."""
    params, opt = build(**impl)
    train(params, opt, 3)
    opt.param_groups[1]["dampening"] = 0.1 if key == "nesterov" else 0.0
    set_grads(params)
    opt.param_groups[1][key] = value
    if match is None:
        opt.step()  # a valid edit is taken as it is
        return
    before = record(params, opt)
    with pytest.raises((ValueError, TypeError), match=match):
        opt.step()
    assert_unchanged(before, params, opt)


def test_failed_step_then_fixed_retry_matches_a_clean_run(impl):
    params, opt = build(**impl)
    twin_params, twin = build(**impl)
    train(params, opt, 3)
    train(twin_params, twin, 3)
    for ps in (params, twin_params):
        set_grads(ps)
    opt.param_groups[1]["batch_size"] = 0
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        opt.step()
    opt.param_groups[1]["batch_size"] = 64
    opt.step()
    twin.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))
    assert repr(opt.gradient_stats()) == repr(twin.gradient_stats())


def test_sparse_gradient_in_a_differentiable_group_is_refused_before_stepping(impl):
    params, opt = build(**impl)
    train(params, opt, 2)
    emb = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    opt.add_param_group({"params": [emb], "differentiable": False, "momentum": 0.0})
    set_grads(params)
    emb.grad = torch.sparse_coo_tensor([[1, 3]], torch.randn(2, 2, dtype=torch.float64), (5, 2),
                                       check_invariants=True)
    opt.param_groups[2]["differentiable"] = True  # sparse gradients cannot take the autograd path
    before = record(params + [emb], opt)
    with pytest.raises(RuntimeError, match="sparse gradients need"):
        opt.step()
    assert_unchanged(before, params + [emb], opt)


def corrupt_state_dicts(opt):
    good = opt.state_dict()

    def edit(fn):
        sd = copy.deepcopy(good)
        fn(sd)
        return sd

    def bad_group(sd):
        sd["param_groups"][1]["batch_size"] = 0

    def bad_step(sd):
        sd["state"]["fastscale"]["step"] = "7"

    def missing_key(sd):
        del sd["state"]["fastscale"]["noise_scale"]["fit"]

    def bad_measure_steps(value):
        def edit_it(sd):
            sd["state"]["fastscale"]["measure_steps"] = value
        return edit_it

    def per_tensor_mismatch(sd):
        ns = sd["state"]["fastscale"]["noise_scale"]
        for key, value in ns.items():
            ns[key] = value[..., :1]  # as saved with NoiseScaleConfig(per_tensor=False)

    def buffer_shape(sd):
        sd["state"][0]["momentum_buffer"] = torch.zeros(3, 4, dtype=torch.float64)

    def group_count(sd):
        sd["param_groups"] = sd["param_groups"][:1]

    return [
        (edit(bad_group), ValueError, "batch_size must be a positive int"),
        (edit(bad_step), ValueError, r"\['step'\] must be a 1-element tensor"),
        (edit(missing_key), KeyError, "missing 'fit'"),
        *((edit(bad_measure_steps(v)), ValueError, r"\['measure_steps'\] must be a 1-element integer tensor >= 0")
          for v in (torch.tensor(-1), torch.tensor(2.0), torch.tensor(True), torch.tensor([1, 2]), 3)),
        (edit(per_tensor_mismatch), ValueError, "saved under another NoiseScaleConfig"),
        (edit(buffer_shape), ValueError, "momentum_buffer of parameter 0 has shape"),
        (edit(group_count), ValueError, "different number of parameter groups"),
    ]


def test_load_state_dict_checks_everything_before_loading(impl):
    params, opt = build(**impl)
    train(params, opt, 3)
    saved = copy.deepcopy(opt.state_dict())
    train(params, opt, 2, seed=2)
    for sd, error, match in corrupt_state_dicts(opt):
        before = record(params, opt)
        with pytest.raises(error, match=match):
            opt.load_state_dict(sd)
        assert_unchanged(before, params, opt)
    # the next steps are those of an optimizer that never saw the corrupt dicts
    twin_params, twin = build(**impl)
    with torch.no_grad():
        for a, b in zip(twin_params, params):
            a.copy_(b)
    opt.load_state_dict(saved)
    twin.load_state_dict(copy.deepcopy(saved))
    train(params, opt, 3, seed=3)
    train(twin_params, twin, 3, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))
    assert all(torch.isfinite(p).all() for p in params)


def test_accumulate_and_observe_errors_change_nothing(impl):
    params, opt = build(**impl)
    train(params, opt, 2)
    opt.zero_grad()
    set_grads(params)
    opt.accumulate_grad(loss_scale=0.5)
    with torch.no_grad():  # a second backward accumulates into the same .grad tensors
        for p in params:
            p.grad.add_(torch.randn_like(p))
    calls = [
        (lambda: opt.accumulate_grad(loss_scale=0.0), ValueError, "loss_scale must be a finite number > 0"),
        (lambda: opt.accumulate_grad(loss_scale=float("nan")), ValueError, "loss_scale must be a finite number"),
        (lambda: opt.accumulate_grad(batch_size=0), ValueError, "batch_size must be a positive int"),
        (lambda: opt.accumulate_grad(batch_size=8), ValueError, "give batch_size= for every micro-batch"),
        (lambda: opt.accumulate_grad(grad_scaler=object()), TypeError, "grad_scaler must be a torch.amp.GradScaler"),
        (lambda: opt.observe_per_example_norms(torch.rand(8)), RuntimeError, "already has small-batch norms"),
        (lambda: opt.observe_small_batch_norms(torch.rand(()), 4, 2), ValueError, "must exceed small_batch_size"),
        (lambda: opt.observe_small_batch_norms(torch.rand(()), 1, 8, per_tensor=torch.rand(2)), ValueError,
         r"per_tensor must be a tensor of shape \(3,\)"),
        (lambda: opt.set_batch_size(32, group=2), ValueError, "group must be None or a group index"),
        (lambda: opt.set_batch_size(-4), ValueError, "batch_size must be a positive int"),
        (lambda: opt.add_param_group({"params": [params[0]]}), ValueError, "appear in more than one"),
        (lambda: opt.add_param_group({"params": [torch.randn(2, requires_grad=True)], "scaling": "cubic"}),
         ValueError, "scaling must be one of"),
        (lambda: opt.add_param_group({"params": [torch.randn(2, requires_grad=True)], "warmup_steps": 3,
                                      "batch_size": 16, "base_batch_size": 16}),
         ValueError, "would do nothing"),
    ]
    for call, error, match in calls:
        before = record(params, opt)
        n_groups, tracker = len(opt.param_groups), opt.statistics
        with pytest.raises(error, match=match):
            call()
        assert_unchanged(before, params, opt)
        assert len(opt.param_groups) == n_groups and opt.statistics is tracker


def test_observe_without_estimator_and_noise_scale_without_statistics():
    p = torch.randn(3, requires_grad=True)
    opt = FusedScaledSGD([p], lr=0.1)
    p.grad = torch.randn(3)
    with pytest.raises(RuntimeError, match="no noise-scale estimator"):
        opt.observe_per_example_norms(torch.rand(4))
    with pytest.raises(RuntimeError, match="noise_scale\\(\\) needs the optimizer built with noise_scale=True"):
        opt.noise_scale()
    assert "grad_sq_norm" not in opt.gradient_stats()


def test_parameters_appended_by_hand_are_stepped_and_measured(impl):
    """Unfreezing a layer by appending to a group's params, as torch's SGD allows: the step
    goes on like torch's and the new tensor joins the statistics; removing one is refused
    before anything is written."""
    torch.manual_seed(8)
    a, c = torch.randn(4, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64, requires_grad=True)
    a2, c2 = a.detach().clone().requires_grad_(True), c.detach().clone().requires_grad_(True)
    opt = FusedScaledSGD([a], lr=0.1, momentum=0.9, noise_scale=True, **impl)
    ref = torch.optim.SGD([a2], lr=0.1, momentum=0.9, foreach=False)
    step_both(ref, [a2], opt, [a], 2)
    opt.param_groups[0]["params"].append(c)
    ref.param_groups[0]["params"].append(c2)
    step_both(ref, [a2, c2], opt, [a, c], 3)
    torch.testing.assert_close(a, a2, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(c, c2, rtol=1e-14, atol=1e-15)
    assert len(opt.gradient_stats()["last_grad_sq_norm_per_tensor"]) == 2
    opt.param_groups[0]["params"].pop(0)
    before = ([a.detach().clone(), c.detach().clone()], repr(opt.gradient_stats()))
    with pytest.raises(ValueError, match="removed from or reordered within param_groups by hand"):
        opt.step()
    assert torch.equal(before[0][0], a) and torch.equal(before[0][1], c)
    assert before[1] == repr(opt.gradient_stats())


def test_module_cast_after_buffers_were_made_steps_like_torch(impl):
    """model.double() after the first step: torch's SGD goes on; so does this, its buffers
    following their parameters, and a failure later in the step changes nothing."""
    torch.manual_seed(9)
    model = torch.nn.Linear(3, 2)
    twin = copy.deepcopy(model)
    opt = FusedScaledSGD(model.parameters(), lr=0.1, momentum=0.9, **impl)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, foreach=False)
    step_both(ref, list(twin.parameters()), opt, list(model.parameters()), 1)
    model.double()
    twin.double()
    step_both(ref, list(twin.parameters()), opt, list(model.parameters()), 3)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert p.dtype == torch.float64 and opt.state[p]["momentum_buffer"].dtype == torch.float64
        torch.testing.assert_close(p, q)


def test_batch_size_changed_between_micro_batches_and_step(impl):
    """The micro-batches' shares come from the batch size while they were taken: setting
    the group batch size to None before step() neither fails after writing nor changes them."""
    params, opt = build(**impl)
    twin_params, twin = build(**impl)
    for ps, o, edit in ((params, opt, True), (twin_params, twin, False)):
        train(ps, o, 2)
        o.zero_grad()
        set_grads(ps)
        o.accumulate_grad(loss_scale=0.5)
        with torch.no_grad():
            for p in ps:
                p.grad.add_(1.0)
        o.accumulate_grad(loss_scale=0.5)
        if edit:
            o.param_groups[0]["batch_size"] = None
            o.param_groups[0]["warmup_steps"] = 0
            twin.param_groups[0]["warmup_steps"] = 0
            twin.param_groups[0]["base_batch_size"] = None
        o.step()
    assert opt.gradient_stats()["grad_sq_norm"] == twin.gradient_stats()["grad_sq_norm"]
    assert opt.gradient_stats()["updates"] == 3


def test_add_param_group_from_a_generator_can_be_retried(impl):
    params, opt = build(**impl)
    extra = [torch.randn(2, requires_grad=True), torch.randn(5, requires_grad=True)]
    group = {"params": (t for t in extra), "scaling": "lineer"}
    with pytest.raises(ValueError, match="scaling must be one of"):
        opt.add_param_group(group)
    group["scaling"] = "linear"
    opt.add_param_group(group)
    assert opt.param_groups[-1]["params"] == extra


def test_accumulate_grad_without_an_estimator_keeps_nothing(impl):
    p = torch.randn(1000, requires_grad=True)
    opt = FusedScaledSGD([p], lr=0.1, **impl)
    p.grad = torch.randn(1000)
    opt.accumulate_grad(batch_size=4)
    assert opt.statistics.snapshots == [None] and opt.statistics._accumulation is None
    with pytest.raises(ValueError, match="loss_scale must be a finite number > 0"):
        opt.accumulate_grad(loss_scale=-1.0)  # still checks its input
