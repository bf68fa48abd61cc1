"""Statistics that survive real training loops, each held to an oracle computed by hand.

Every step's micro-batch gradients are recomputed with ``torch.autograd.grad`` and the two-batch
estimates formed from them (McCandlish et al. Appendix A). With ``beta=0`` the estimator's
average is exactly the last step's estimate, so each step is checked on its own:

- a parameter whose gradient first appears in a later micro-batch (a branch, an MoE expert);
- gradients reset outside the optimizer (``model.zero_grad()``, ``p.grad = None``);
- clipping and GradScaler's ``unscale_`` between the last ``accumulate_grad`` and ``step()``;
- misuse that cannot be made right (two calls with no backward) raises and changes nothing.
"""

import copy

import pytest
import torch
from torch import nn

from fastscale import FusedScaledSGD, NoiseScaleConfig, noise_scale
from fastscale.noise_scale import two_batch_estimates

EXACT = NoiseScaleConfig(beta=0.0, min_updates=0)


class Net(nn.Module):
    """A shared trunk, a head, and an expert used only by the micro-batches that ask for it."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)
        self.expert = nn.Linear(4, 3)

    def forward(self, x, use_expert=True):
        h = torch.tanh(self.trunk(x))
        return self.head(h) + (self.expert(h) if use_expert else 0.0)


def make(seed=0, **kw):
    torch.manual_seed(seed)
    model = Net().double()
    opt = FusedScaledSGD(model.parameters(), lr=0.05, momentum=0.9, noise_scale=EXACT, **kw)
    return model, opt


def micro_batches(k, sizes=None, experts=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    sizes = sizes or [6] * k
    experts = experts or [True] * k
    return [(torch.randn(b, 5, generator=gen, dtype=torch.float64),
             torch.randn(b, 3, generator=gen, dtype=torch.float64), e) for b, e in zip(sizes, experts)]


def loss_of(model, batch, scale):
    x, y, expert = batch
    return scale * (model(x, expert) - y).square().mean()


def oracle(model, batches, scales):
    """Per-tensor (|G|², tr(Σ)) and the mask of tensors with a gradient, by hand."""
    params = list(model.parameters())
    raw = [torch.autograd.grad(loss_of(model, b, c), params, allow_unused=True) for b, c in zip(batches, scales)]
    present = torch.tensor([any(g is not None for g in col) for col in zip(*raw)])
    grads = [[torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)] for gs in raw]
    k, sizes, total_c = len(batches), [len(b[0]) for b in batches], sum(scales)
    small = torch.stack([torch.stack([g.square().sum() for g in gs]) / c**2 for gs, c in zip(grads, scales)]).mean(0)
    big = torch.stack([sum(col).square().sum() for col in zip(*grads)]) / total_c**2
    b_small = k / sum(1 / b for b in sizes)
    b_big = total_c**2 / sum(c * c / b for c, b in zip(scales, sizes))
    g2, trace = two_batch_estimates(small, big, b_small, b_big)
    return g2, trace, present


def check(opt, expected):
    g2, trace, present = expected
    stats = opt.gradient_stats()
    # Squared norms come back from the kernels in fp32, and |G|² is a difference of terms of
    # the size of tr(Σ)/B: the tolerance is fp32 rounding of those terms.
    atol = 1e-6 * trace[present].abs().sum().item()
    assert stats["grad_sq_norm"] == pytest.approx(g2[present].sum().item(), rel=1e-6, abs=atol)
    assert stats["trace_cov"] == pytest.approx(trace[present].sum().item(), rel=1e-6)
    got_g2 = torch.tensor(stats["grad_sq_norm_per_tensor"], dtype=torch.float64)
    got_tr = torch.tensor(stats["trace_cov_per_tensor"], dtype=torch.float64)
    torch.testing.assert_close(got_g2[present], g2[present], rtol=1e-5, atol=atol)
    torch.testing.assert_close(got_tr[present], trace[present], rtol=1e-5, atol=atol)


def run_step(model, opt, batches, scales, reset="opt", between=None):
    expected = oracle(model, batches, scales)
    if reset == "opt":
        opt.zero_grad()
    elif reset == "model":
        model.zero_grad()
    elif reset == "none":
        for p in model.parameters():
            p.grad = None
    for batch, c in zip(batches, scales):
        loss_of(model, batch, c).backward()
        opt.accumulate_grad(loss_scale=c)
    if between is not None:
        between()
    opt.step()
    return expected


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "after-steps"])
def test_parameter_whose_grad_appears_in_a_later_micro_batch(fresh, impl):
    """The expert's gradient first appears in micro-batch 2 (then 3, then 1): counted from
    there, never diffed against another step's snapshot, never a KeyError."""
    model, opt = make(batch_size=18, **impl)
    patterns = [[False, True, True], [False, False, True], [True, False, False], [False, True, False]]
    if not fresh:
        patterns = [[True] * 3] * 2 + patterns
    for step, experts in enumerate(patterns):
        batches = micro_batches(3, experts=experts, seed=step)
        check(opt, run_step(model, opt, batches, [1 / 3] * 3))


@pytest.mark.parametrize("reset", ["model", "none"])
def test_gradients_reset_outside_the_optimizer(reset, impl):
    """model.zero_grad() or p.grad = None instead of opt.zero_grad(): each step's statistics
    are its own micro-batches', as in a loop that resets with the optimizer."""
    model, opt = make(batch_size=12, **impl)
    for step in range(4):
        check(opt, run_step(model, opt, micro_batches(2, seed=step), [0.5, 0.5], reset=reset))


def test_micro_batches_discarded_mid_step_are_forgotten(impl):
    """A micro-batch whose gradient the loop throws away (model.zero_grad() before the step)
    does not count: the step's statistics are those of the micro-batches after the reset."""
    model, opt = make(batch_size=12, **impl)
    for step in range(3):
        opt.zero_grad()
        loss_of(model, micro_batches(1, seed=100 + step)[0], 1.0).backward()
        opt.accumulate_grad(batch_size=6)
        model.zero_grad()  # e.g. a skipped batch with a NaN loss
        batches = micro_batches(2, seed=step)
        expected = oracle(model, batches, [0.5, 0.5])
        for batch in batches:
            loss_of(model, batch, 0.5).backward()
            opt.accumulate_grad(batch_size=6, loss_scale=0.5)
        opt.step()
        check(opt, expected)


def test_clipping_before_step_leaves_the_statistics_alone(impl):
    """clip_grad_norm_ between the last accumulate_grad and step() (Hugging Face's default)
    changes the update, never the statistics: they describe the raw gradients."""
    model, opt = make(batch_size=12, **impl)
    for step in range(4):
        clip = lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)  # noqa: E731
        check(opt, run_step(model, opt, micro_batches(2, seed=step), [0.5, 0.5], between=clip))


def test_clipping_after_per_example_norms(impl):
    """The per-example source reads the big-batch norm when it is fed, before clipping."""
    model, opt = make(**impl)
    params = list(model.parameters())
    for step in range(3):
        x, y, _ = micro_batches(1, sizes=[8], seed=step)[0]
        per_example = []
        for i in range(8):
            gs = torch.autograd.grad((model(x[i:i + 1]) - y[i:i + 1]).square().mean(), params)
            per_example.append(torch.stack([g.square().sum() for g in gs]))
        per_example = torch.stack(per_example)
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        big = torch.stack([p.grad.square().sum() for p in params])
        opt.observe_per_example_norms(per_example.sum(1))
        torch.nn.utils.clip_grad_norm_(params, max_norm=1e-3)
        opt.step()
        g2, trace = two_batch_estimates(per_example.mean(0), big, 1, 8)
        stats = opt.gradient_stats()
        assert stats["grad_sq_norm"] == pytest.approx(g2.sum().item(), rel=1e-6)
        assert stats["trace_cov"] == pytest.approx(trace.sum().item(), rel=1e-6)


@pytest.mark.parametrize("unscale", [True, False], ids=["unscale_-then-clip", "plain"])
def test_grad_scaler_scale_is_divided_out(unscale, impl):
    """With GradScaler (scale 2^12): scaled losses, accumulate_grad(grad_scaler=), optionally
    unscale_ + clipping, scaler.step: the statistics are the unscaled gradients' exactly."""
    model, opt = make(batch_size=12, **impl)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    for step in range(3):
        batches = micro_batches(2, seed=step)
        expected = oracle(model, batches, [0.5, 0.5])
        opt.zero_grad()
        for batch in batches:
            scaler.scale(loss_of(model, batch, 0.5)).backward()
            opt.accumulate_grad(loss_scale=0.5, grad_scaler=scaler)
        if unscale:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
        scaler.step(opt)
        scaler.update()
        check(opt, expected)


def snapshot(opt):
    stats = opt.statistics
    acc = stats._accumulation
    return (
        [p.detach().clone() for p in stats.params],
        repr(opt.gradient_stats()),
        None if acc is None else (acc.count, list(acc.batch_sizes), acc.small_pt.clone(), dict(acc.seen)),
    )


def assert_unchanged(before, opt):
    after = snapshot(opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert before[1] == after[1]
    if before[2] is None:
        assert after[2] is None
    else:
        assert before[2][:2] == after[2][:2] and torch.equal(before[2][2], after[2][2]) and before[2][3] == after[2][3]


def test_two_calls_without_a_backward_raise_and_change_nothing(impl):
    model, opt = make(batch_size=12, **impl)
    batches = micro_batches(2)
    expected = oracle(model, batches, [0.5, 0.5])
    opt.zero_grad()
    loss_of(model, batches[0], 0.5).backward()
    opt.accumulate_grad(loss_scale=0.5)
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match="called twice without a backward"):
        opt.accumulate_grad(loss_scale=0.5)
    assert_unchanged(before, opt)
    loss_of(model, batches[1], 0.5).backward()
    opt.accumulate_grad(loss_scale=0.5)
    opt.step()
    check(opt, expected)


def test_micro_batch_sizes_given_for_some_calls_only(impl):
    """An explicit size is never silently replaced by an equal share: mixing raises."""
    model, opt = make(batch_size=12, **impl)
    batches = micro_batches(2, sizes=[4, 8])
    opt.zero_grad()
    loss_of(model, batches[0], 0.5).backward()
    opt.accumulate_grad(batch_size=4, loss_scale=0.5)
    loss_of(model, batches[1], 0.5).backward()
    before = snapshot(opt)
    with pytest.raises(ValueError, match="give batch_size= for every micro-batch of a step or for none"):
        opt.accumulate_grad(loss_scale=0.5)
    assert_unchanged(before, opt)
    opt.accumulate_grad(batch_size=8, loss_scale=0.5)  # the retry with the size works
    expected_sizes = opt.statistics._accumulation.batch_sizes
    assert expected_sizes == [4, 8]


def test_accumulate_without_any_batch_size_raises_and_retry_works(impl):
    model, opt = make(**impl)  # no batch_size: the micro-batch size must be given
    batches = micro_batches(2)
    expected = oracle(model, batches, [0.5, 0.5])
    opt.zero_grad()
    loss_of(model, batches[0], 0.5).backward()
    before = snapshot(opt)
    with pytest.raises(ValueError, match="accumulate_grad needs batch_size="):
        opt.accumulate_grad(loss_scale=0.5)
    assert_unchanged(before, opt)
    opt.accumulate_grad(batch_size=6, loss_scale=0.5)
    loss_of(model, batches[1], 0.5).backward()
    opt.accumulate_grad(batch_size=6, loss_scale=0.5)
    opt.step()
    check(opt, expected)


# ----------------------------------------------------------------- micro-batch norms from hooks
# From the second accumulation on, accumulate_grad takes each micro-batch's norms from autograd
# hooks as the gradient arrives (no snapshot of .grad); the snapshot path is the oracle.


def loop_step(model, opt, batches, dtype, reset="opt", clip=None, edit=None, accumulate=True):
    """One step of three (or k) micro-batches with loss scale 1/k; returns whether the hooks
    measured it (None: not measured). ``edit(model, i)`` runs after micro-batch i's backward
    (its own backwards); ``accumulate=False`` leaves out the accumulate_grad() calls."""
    if reset == "opt":
        opt.zero_grad()
    elif reset == "model":
        model.zero_grad()
    else:
        for p in model.parameters():
            p.grad = None
    k = len(batches)
    for i, (x, y, expert) in enumerate(batches):
        if edit is None or not edit(model, i, x.to(dtype), y.to(dtype), expert):
            ((model(x.to(dtype), expert) - y.to(dtype)).square().mean() / k).backward()
        if accumulate:
            opt.accumulate_grad(loss_scale=1 / k)
    acc = opt.statistics._accumulation
    hooked = None if acc is None else acc.hooks
    if callable(clip):
        clip(model)
    elif clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=clip)
    opt.step()
    return hooked


def hooked_and_snapshot(seed, dtype, batch_size, impl):
    """Two identical models and optimizers; the second measures from snapshots only (the path
    the hooks replace: their oracle)."""
    torch.manual_seed(seed)
    model = Net().to(dtype)
    twin = copy.deepcopy(model)
    opt = FusedScaledSGD(model.parameters(), lr=0.05, momentum=0.9, noise_scale=EXACT, batch_size=batch_size, **impl)
    ref = FusedScaledSGD(twin.parameters(), lr=0.05, momentum=0.9, noise_scale=EXACT, batch_size=batch_size, **impl)
    ref.statistics._hooks_failed = True
    return model, opt, twin, ref


def assert_same_figures(opt, ref, rtol):
    """|G|², tr(Σ), total and per tensor, equal up to ``rtol`` of their size; |G|² is a
    difference of terms of the size of tr(Σ)/B, so its rounding is relative to tr(Σ) (check())."""
    got, want = opt.gradient_stats(), ref.gradient_stats()
    atol = rtol * abs(want["trace_cov"])
    for key in ("grad_sq_norm", "trace_cov", "grad_sq_norm_per_tensor", "trace_cov_per_tensor"):
        torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")


@pytest.fixture(params=["add_here", "read"])
def add_here(request, monkeypatch):
    """The hooks add each later micro-batch's gradient into .grad themselves (every tensor, as
    large ones do), or only read it (as small ones do); yields the list of positions added."""
    added = []
    real = noise_scale._can_add_here

    def spy(grad, old):
        ok = real(grad, old)
        added.append(ok)
        return ok
    monkeypatch.setattr(noise_scale, "_can_add_here", spy)
    monkeypatch.setattr(noise_scale, "_ADD_HERE_MIN_NUMEL", 0 if request.param == "add_here" else 2**62)
    yield request.param, added
    if request.param == "add_here":
        assert any(added), "the hooks never added a gradient themselves"
    else:
        assert not any(added)


@pytest.mark.parametrize("clip", [1e-2, None], ids=["clipped", "unclipped"])
@pytest.mark.parametrize("reset", ["opt", "model", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
def test_hooked_norms_equal_the_snapshot_path(dtype, reset, clip, impl, add_here):
    """Three micro-batches, an expert whose gradient appears late, early only, or not at all,
    with or without clipping before the step (|.grad|² from the hooks' cross terms either way),
    each way of resetting, the hooks adding the gradients themselves or not: every figure
    equals the snapshot path's, and the models stay equal."""
    model, opt, twin, ref = hooked_and_snapshot(5, dtype, 18, impl)
    patterns = [[True] * 3, [False, True, True], [True, False, True], [False, False, True], [False] * 3,
                [True, False, False], [True] * 3]
    hooked = []
    # The snapshot kernels return squared norms rounded to fp32, the hooks in the gradient's dtype.
    # In fp16/bf16 the snapshots see .grad = T + g rounded to the storage type, the hooks g
    # itself: they differ by about a storage ulp (2e-3 measured passes, 5e-4 does not).
    rtol = {torch.float64: 1e-5, torch.float32: 2e-4}.get(dtype, 1e-2)
    for step, experts in enumerate(patterns):
        batches = micro_batches(3, experts=experts, seed=step)
        hooked.append(loop_step(model, opt, batches, dtype, reset, clip=clip))
        assert not loop_step(twin, ref, batches, dtype, reset, clip=clip)
        assert_same_figures(opt, ref, rtol)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p, q), "the gradients added by the hooks are AccumulateGrad's, to the bit"
    assert hooked == [False] + [True] * (len(patterns) - 1)
    assert all(snap is None for snap in opt.statistics.snapshots)  # no parameter-sized buffer kept


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(48, 96), nn.Linear(96, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def wide_step(model, opt, k, seed, accumulate=True, hook_grads=None, create_graph=()):
    """k micro-batches into .grad (no step); ``hook_grads(model, i)`` after each backward and
    its accumulate_grad();
    ``create_graph``: the micro-batches whose backward records a graph."""
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for i in range(k):
        x = torch.randn(5, 48, generator=gen).to(dtype)
        model(x).square().mean().backward(create_graph=i in create_graph)
        if accumulate:
            opt.accumulate_grad(loss_scale=1 / k)
        if hook_grads is not None:
            hook_grads(model, i)


def wide_hooked_and_snapshot(seed, impl):
    """hooked_and_snapshot's pair of fp64 Wide models (whose weights are large enough to be
    added into .grad by the hooks where the threshold allows)."""
    torch.manual_seed(seed)
    model = Wide().double()
    plain = copy.deepcopy(model)
    opt = FusedScaledSGD(model.parameters(), lr=0.1, batch_size=10, noise_scale=EXACT, **impl)
    ref = FusedScaledSGD(plain.parameters(), lr=0.1, batch_size=10, noise_scale=EXACT, **impl)
    ref.statistics._hooks_failed = True
    return model, opt, plain, ref


def hooked_with_plain_twin(seed, impl):
    """A Wide model after two hooked steps, and a plain copy of it (no fastscale); both with
    their gradients zeroed. Returns (model, opt, plain)."""
    model, opt, plain, _ = wide_hooked_and_snapshot(seed, impl)
    for step in range(2):
        opt.zero_grad()
        wide_step(model, opt, 2, seed=step)
        opt.step()
    with torch.no_grad():
        plain.load_state_dict(model.state_dict())
    opt.zero_grad()
    plain.zero_grad()
    return model, opt, plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_gradients_the_hooks_add_are_torchs_own(dtype, impl, monkeypatch):
    """Where the hooks add a micro-batch's gradient into .grad themselves, .grad is what
    AccumulateGrad would have stored, to the bit, in the same tensor (the same Python object,
    as torch keeps it), and the first micro-batch's gradients are not read at all."""
    monkeypatch.setattr(noise_scale, "_ADD_HERE_MIN_NUMEL", 1000)  # a.weight, b.weight; not the biases
    calls = []
    for ops in (noise_scale.ops.dispatched, noise_scale.ops.pure_torch):
        monkeypatch.setattr(ops, "arrival_norms_",
                            lambda out, g, t, f=ops.arrival_norms_, add=False: (calls.append((g.numel(), add)), f(out, g, t, add=add))[1])
    torch.manual_seed(0)
    model = Wide().to(dtype)
    plain = copy.deepcopy(model)
    opt = FusedScaledSGD(model.parameters(), lr=0.1, momentum=0.9, batch_size=15, noise_scale=EXACT, **impl)
    for step in range(3):
        opt.zero_grad()
        plain.zero_grad()
        calls.clear()
        held = {}

        def same_objects(m, i, held=held):
            for name, p in m.named_parameters():
                if i == 0:
                    held[name] = p.grad
                assert p.grad is held[name], "AccumulateGrad keeps .grad the same tensor"
        wide_step(model, opt, 3, seed=step, hook_grads=same_objects)
        wide_step(plain, None, 3, seed=step, accumulate=False)
        for p, q in zip(model.parameters(), plain.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)
        if step > 0:  # hooked from the second step: micro-batch 0 unread, 1 and 2 read once each
            assert sorted(calls) == sorted([(48 * 96, True), (96, False), (96 * 8, False), (8, False)] * 2)
        opt.step()
        with torch.no_grad():
            plain.load_state_dict(model.state_dict())


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_a_hook_registered_later_turns_the_added_gradient_back_into_autograds(impl, monkeypatch):
    """A tensor hook the user registers after fastscale's sees (and may change) the gradient
    itself: that step is not measured (a warning), .grad is torch's; create_graph backwards
    add as torch does."""
    monkeypatch.setattr(noise_scale, "_ADD_HERE_MIN_NUMEL", 0)
    monkeypatch.setattr(noise_scale, "_hooks_warned", False)
    model, opt, plain = hooked_with_plain_twin(1, impl)
    # the second backward records a graph: grad mode is on in the hooks, AccumulateGrad adds
    # out of place (.grad gets a grad_fn), so the hooks only read
    wide_step(model, opt, 2, seed=6, create_graph=(1,))
    wide_step(plain, None, 2, seed=6, accumulate=False, create_graph=(1,))
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad) and p.grad.requires_grad == q.grad.requires_grad
    assert opt.statistics._capture is not None, "still measured by the hooks"
    for m in (model, plain):
        m.a.weight.register_hook(lambda g: g * 3)
    opt.zero_grad()
    plain.zero_grad()
    with pytest.warns(UserWarning, match="changed by a tensor hook"):
        wide_step(model, opt, 2, seed=5)
    wide_step(plain, None, 2, seed=5, accumulate=False)
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_autograd_grad_between_micro_batches_is_not_a_micro_batch(impl, add_here):
    """torch.autograd.grad() runs the parameters' tensor hooks but adds nothing into .grad (a
    gradient penalty, an input gradient): the hooks let it pass untouched, whatever it returns
    is torch's, and every step is measured from the hooks as the snapshot path measures it."""
    model, opt, plain, ref = wide_hooked_and_snapshot(3, impl)

    def penalty_grads(m, i):
        x = torch.randn(3, 48, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        return torch.autograd.grad(m(x).sum(), list(m.parameters()))
    for step in range(4):
        between = (lambda m, i: penalty_grads(m, i)) if step >= 2 else None  # once the hooks measure
        for m, o in ((model, opt), (plain, ref)):
            o.zero_grad()
            wide_step(m, o, 2, seed=step, hook_grads=between)
        if between is not None:
            for got, want in zip(penalty_grads(model, 9), penalty_grads(plain, 9), strict=True):
                assert type(got) is torch.Tensor and torch.equal(got, want)
        for p, q in zip(model.parameters(), plain.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)
        assert opt.statistics._accumulation.hooks == (step > 0)
        opt.step()
        ref.step()
        assert_same_figures(opt, ref, 1e-6)


def test_hooks_made_under_inference_mode(impl, monkeypatch):
    """accumulate_grad() first called under torch.inference_mode() hooks the parameters as
    outside it; and hooks that do not know a parameter's AccumulateGrad node (whatever the
    cause) only read, since they cannot tell autograd.grad() from a backward: an
    autograd.grad() between micro-batches then changes no .grad and gets torch's gradients."""
    monkeypatch.setattr(noise_scale, "_ADD_HERE_MIN_NUMEL", 0)
    model, opt, plain, ref = wide_hooked_and_snapshot(6, impl)
    for step in range(3):
        for m, o in ((model, opt), (plain, ref)):
            o.zero_grad()
            for i in range(2):
                m(torch.randn(5, 48, generator=torch.Generator().manual_seed(step * 2 + i),
                              dtype=torch.float64)).square().mean().backward()
                with torch.inference_mode():
                    o.accumulate_grad(loss_scale=0.5)
            o.step()
        assert_same_figures(opt, ref, 1e-6)
    cap = opt.statistics._capture
    assert opt.statistics._accumulation is None and all(cap.nodes.values())
    cap.nodes = {i: None for i in cap.nodes}
    with torch.no_grad():
        plain.load_state_dict(model.state_dict())
    opt.zero_grad()
    plain.zero_grad()
    x = torch.randn(5, 48, dtype=torch.float64)
    for m in (model, plain):
        m(x).square().mean().backward()
    opt.accumulate_grad(loss_scale=0.5)
    got = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    want = torch.autograd.grad(plain(x).sum(), list(plain.parameters()))
    assert all(type(a) is torch.Tensor and torch.equal(a, b) for a, b in zip(got, want, strict=True))
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_a_parameter_given_new_data_keeps_its_hooks(impl, add_here):
    """``p.data = ...`` of another dtype (or device) gives the parameter a new AccumulateGrad
    node: the hooks follow it, so the steps after are still measured by them, as by snapshots."""
    model, opt, plain, ref = wide_hooked_and_snapshot(4, impl)
    for step in range(4):
        if step == 2:
            for p in model.parameters():
                p.data = p.data.float()
                p.data = p.data.double()  # back to fp64, on a new node
        for m, o in ((model, opt), (plain, ref)):
            o.zero_grad()
            wide_step(m, o, 2, seed=step)
        assert opt.statistics._accumulation.hooks == (step > 0)
        opt.step()
        ref.step()
        assert_same_figures(opt, ref, 1e-6)
        assert int(opt.statistics.estimator.updates[0]) == step + 1


def node_hooks_step(impl, node_hooks, seed=2):
    """hooked_with_plain_twin, then ``node_hooks(model)`` on each and one more accumulation;
    returns (model, plain)."""
    model, opt, plain = hooked_with_plain_twin(seed, impl)
    node_hooks(model), node_hooks(plain)
    wide_step(model, opt, 2, seed=3)
    wide_step(plain, None, 2, seed=3, accumulate=False)
    return model, plain


def test_hooks_on_the_accumulate_grad_node_read_the_gradient_itself(impl, monkeypatch):
    """Pre- and post-hooks on a parameter's AccumulateGrad node (they run after every tensor
    hook) that read the gradient see the gradient itself, as without fastscale."""
    monkeypatch.setattr(noise_scale, "_ADD_HERE_MIN_NUMEL", 0)
    seen, nodes = {}, []

    def reading(model):
        node = model.a.weight.view_as(model.a.weight).grad_fn.next_functions[0][0]
        nodes.append(node)  # autograd keeps a node (and its hooks) only while someone holds it
        got = seen.setdefault(id(model), [])
        node.register_prehook(lambda grads: got.append(grads[0].square().sum()))
        node.register_hook(lambda grad_in, grad_out: got.append(grad_out[0] * 2))
    model, plain = node_hooks_step(impl, reading)
    ours, theirs = seen[id(model)], seen[id(plain)]
    assert len(ours) == len(theirs) == 4
    assert all(type(a) is torch.Tensor and torch.equal(a, b) for a, b in zip(ours, theirs))
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_an_accumulate_grad_pre_hook_that_replaces_the_gradient_fails_loudly(impl, monkeypatch):
    """A pre-hook on the AccumulateGrad node that hands on another gradient would have the one
    already added counted twice: the backward raises, naming the way out."""
    monkeypatch.setattr(noise_scale, "_ADD_HERE_MIN_NUMEL", 0)

    nodes = []

    def replacing(model):
        node = model.a.weight.view_as(model.a.weight).grad_fn.next_functions[0][0]
        nodes.append(node)
        node.register_prehook(lambda grads: (grads[0] * 1.0,))
    with pytest.raises(RuntimeError, match="already added into .grad.*register_hook"):
        node_hooks_step(impl, replacing)


def test_a_grad_reset_between_micro_batches_costs_that_step_only(impl, add_here):
    """Some .grad set to None after the first micro-batch, whose norm the hooks had left for
    the next arrival to take: that step gives no measurement (never a wrong one), and the steps
    after read first micro-batches as they arrive, measured as the snapshot path measures them."""
    model, opt, plain, ref = wide_hooked_and_snapshot(5, impl)

    def reset_b(m, i):
        if i == 0:
            m.b.weight.grad = None
    for step in range(5):
        for m, o in ((model, opt), (plain, ref)):
            o.zero_grad()
            wide_step(m, o, 3, seed=step, hook_grads=reset_b if step >= 2 else None)
        before = int(opt.statistics.estimator.updates[0])
        opt.step()
        ref.step()
        assert int(opt.statistics.estimator.updates[0]) == before + (step != 2)
        if step != 2:
            assert_same_figures(opt, ref, 1e-6)
    assert not opt.statistics._defer_first and opt.statistics._accumulation is None


def two_backwards(model, i, x, y, expert):
    """Micro-batch 1's loss backpropagated in two halves: two gradients in one micro-batch."""
    if i != 1:
        return False
    for half in ((model(x, expert) - y).square().mean() / 2 / 2, (model(x, expert) - y).square().mean() / 2 / 2):
        half.backward()
    return True


def clip_after_backward(model, i, x, y, expert):
    """A .grad edited after micro-batch 1's backward (per-micro-batch clipping)."""
    if i == 1:
        ((model(x, expert) - y).square().mean() / 2).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
        return True
    return False


def unmeasured_step_then_snapshots(monkeypatch, impl, seed, edit=None, before=None):
    """Two hooked steps, then one the hooks cannot measure (``edit`` in the loop, or ``before``
    called with the optimizer first): it gives no measurement and warns, and from the next
    step on the snapshot path measures, exactly as a loop that never trusted the hooks."""
    monkeypatch.setattr(noise_scale, "_hooks_warned", False)
    model, opt, twin, ref = hooked_and_snapshot(seed, torch.float64, 12, impl)
    for step in range(2):
        batches = micro_batches(2, seed=step)
        loop_step(model, opt, batches, torch.float64)
        loop_step(twin, ref, batches, torch.float64)
    updates = opt.statistics.estimator.updates.clone()
    batches = micro_batches(2, seed=2)
    if before is not None:
        before(opt)
    with pytest.warns(UserWarning, match="did not arrive through autograd"):
        assert loop_step(model, opt, batches, torch.float64, edit=edit)
    loop_step(twin, ref, batches, torch.float64, edit=edit)
    assert torch.equal(opt.statistics.estimator.updates, updates)  # no measurement this step
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)  # the same update: .grad was right
    for step in range(3, 5):
        batches = micro_batches(2, seed=step)
        assert not loop_step(model, opt, batches, torch.float64, edit=edit)
        loop_step(twin, ref, batches, torch.float64, edit=edit)
        assert_same_figures(opt, ref, 1e-5)


@pytest.mark.parametrize("edit", [two_backwards, clip_after_backward], ids=["two-backwards", "clip-after-backward"])
def test_a_gradient_the_hooks_cannot_account_for(edit, monkeypatch, impl):
    """Two backwards in one micro-batch, or .grad edited after a backward."""
    unmeasured_step_then_snapshots(monkeypatch, impl, 6, edit=edit)


def test_a_gradient_the_op_refuses_costs_a_measurement_not_the_backward(monkeypatch, impl):
    """The hooks' op raising inside autograd (a gradient it cannot take) must not break the
    backward: that parameter is left unmeasured, which the call handles as above."""
    def refuse(out, grad, accumulated, add=False):
        raise RuntimeError("fastscale: refused")

    def refusing(opt):
        monkeypatch.setattr(noise_scale.ops.dispatched, "arrival_norms_", refuse)
        monkeypatch.setattr(noise_scale.ops.pure_torch, "arrival_norms_", refuse)
        opt.statistics._capture.arrival = refuse  # already chosen for the first micro-batch's hooks

    unmeasured_step_then_snapshots(monkeypatch, impl, 8, before=refusing)


def _shrink_through_data(model):
    for p in model.parameters():
        p.grad.data.mul_(1e-3)  # an old-style edit: .grad's version counter does not move


@pytest.mark.parametrize("clip", [1e-3, _shrink_through_data], ids=["clip_grad_norm_", "through_.data"])
def test_a_loop_that_starts_editing_grads_is_measured_at_every_step(clip, impl):
    """A loop that starts shrinking .grad before the step part-way, with clip_grad_norm_ or
    through .data (which no version counter sees): every step, the first edited one included,
    is measured as the snapshot path measures it, from the raw accumulated gradient."""
    model, opt, twin, ref = hooked_and_snapshot(7, torch.float64, 12, impl)
    for step in range(7):
        updates = opt.statistics.estimator.updates.clone()
        batches = micro_batches(2, seed=step)
        edit = clip if step >= 4 else None
        assert loop_step(model, opt, batches, torch.float64, clip=edit) == (step > 0)
        loop_step(twin, ref, batches, torch.float64, clip=edit)
        assert (opt.statistics.estimator.updates > updates).any()
        assert_same_figures(opt, ref, 1e-5)


# ----------------------------------------------------------------- measure_every


def assert_same_estimator(a, b):
    sa, sb = a.statistics.estimator.state_dict(), b.statistics.estimator.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key].nan_to_num(), sb[key].nan_to_num()), key


@pytest.mark.parametrize("every", [1, 3])
def test_measure_every_measures_one_step_in_n(every, monkeypatch, impl):
    """measure_every=n: accumulate_grad() called on every step measures step() calls 0, n, 2n, …
    exactly as a loop that calls it on those steps only (the estimator bit for bit, the
    parameters too); on the other steps the hooks read no gradient; a state_dict keeps the
    phase, so a loaded copy measures the same steps as the original."""
    reads = []
    for ops in (noise_scale.ops.dispatched, noise_scale.ops.pure_torch):
        monkeypatch.setattr(ops, "arrival_norms_", lambda *a, f=ops.arrival_norms_, **k: (reads.append(1), f(*a, **k))[1])
    torch.manual_seed(7)
    model = Net().double()
    twin = copy.deepcopy(model)
    config = dict(min_updates=0, windows=(2, 4))
    opt = FusedScaledSGD(model.parameters(), lr=0.05, momentum=0.9, batch_size=18,
                         noise_scale=NoiseScaleConfig(**config, measure_every=every), **impl)
    ref = FusedScaledSGD(twin.parameters(), lr=0.05, momentum=0.9, batch_size=18,
                         noise_scale=NoiseScaleConfig(**config), **impl)
    copied = None
    for step in range(8):
        batches = micro_batches(3, seed=step)
        if step == 5:
            copied = copy.deepcopy(model)
            loaded = FusedScaledSGD(copied.parameters(), lr=0.05, momentum=0.9, batch_size=18,
                                    noise_scale=NoiseScaleConfig(**config, measure_every=every), **impl)
            loaded.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch's load shares the buffers
        reads.clear()
        fired = []

        def watch(model, i, *_):  # before micro-batch i's backward: what the hooks did since
            if i > 0 and opt.statistics._capture is not None:
                fired.append(len(opt.statistics._capture.fired))
            return False
        loop_step(model, opt, batches, torch.float64, edit=watch)
        # the hooks read gradients on measured steps only (from step 0's third micro-batch on,
        # once trusted), and on the others return at once
        assert bool(reads) == (step % every == 0), (step, len(reads))
        if step % every:
            assert not any(fired), (step, fired)
        loop_step(twin, ref, batches, torch.float64, accumulate=step % every == 0)
        if copied is not None:
            loop_step(copied, loaded, batches, torch.float64)
            # the same steps measured; its first accumulation from snapshots, opt's from hooks
            assert torch.equal(loaded.statistics.estimator.updates, opt.statistics.estimator.updates)
            assert_same_figures(loaded, opt, 1e-5)
        assert_same_estimator(opt, ref)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p, q)
    assert int(opt.statistics.estimator.updates[0]) == len(range(0, 8, every))


def test_a_loaded_measure_every_phase_turns_the_hooks_on(impl):
    """Loading a state dict at a measured step into an optimizer whose hooks are off (its
    next step was not measured) turns them on: the step is measured from the hooks, no warning."""
    import warnings

    torch.manual_seed(8)
    model = Net().double()
    opt = FusedScaledSGD(model.parameters(), lr=0.05, momentum=0.9, batch_size=18,
                         noise_scale=NoiseScaleConfig(min_updates=0, measure_every=2), **impl)
    saved = copy.deepcopy(opt.state_dict())  # phase 0: the next step is measured
    loop_step(model, opt, micro_batches(3, seed=0), torch.float64)
    assert opt.statistics._hooks_trusted and not opt.statistics._capture.active  # step 1: not measured
    opt.load_state_dict(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loop_step(model, opt, micro_batches(3, seed=1), torch.float64)
    assert not opt.statistics._hooks_failed
    assert int(opt.statistics.estimator.updates[0]) == 1


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "3"])
def test_measure_every_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="measure_every must be an int >= 1"):
        NoiseScaleConfig(measure_every=bad)
