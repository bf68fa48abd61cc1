"""Batch-size schedules (fastscale/schedules.py): the adaptive decisions on synthetic statistics,
the fixed ramps, lr coupling (each rule, re-warmup, torch schedulers), the two realisations,
resume bit for bit mid-ramp, bad input, and 2-rank agreement over gloo."""

import io
import math
import sys

import pytest
import torch

import fastscale
from fastscale import AdaptiveBatchSize, BatchSizeSampler, FusedScaledSGD, LinearRampBatchSize, StepBatchSize

from conftest import launch_ranks


class FakeStats:
    """Synthetic estimates: a list of (b_simple, b_simple_low, ready), one per read; counts reads."""

    def __init__(self, values):
        self.values, self.reads = list(values), 0

    def __call__(self):
        v = self.values[min(self.reads, len(self.values) - 1)]
        self.reads += 1
        return {"b_simple": v[0], "b_simple_low": v[1], "ready": v[2]}


def _opt(scaling="linear", base=8, **kw):
    p = torch.nn.Parameter(torch.zeros(3))
    return FusedScaledSGD([p], lr=0.1, batch_size=base, base_batch_size=base, scaling=scaling, **kw)


def _run(schedule, steps, step_optimizer=False):
    sizes = []
    for _ in range(steps):
        sizes.append(schedule.batch_size)
        if step_optimizer:  # (no gradients: nothing moves) so torch's schedulers see the order they expect
            schedule.optimizer.step()
        schedule.step()
    return sizes


# ----------------------------------------------------------------- decisions on synthetic statistics
def test_grows_towards_c_times_b_simple_by_at_most_max_growth_per_check():
    stats = FakeStats([(100.0, 80.0, True)])
    s = AdaptiveBatchSize(_opt(), 8, 256, factor=1.0, check_every=5, statistics=stats)
    sizes = _run(s, 30)
    assert sizes[:5] == [8] * 5
    # 8 -> 16 -> 32 -> 64 (max_growth 2 per check), then c·B_simple = 100, then it holds
    assert s.history == [(0, 8), (5, 16), (10, 32), (15, 64), (20, 100)]
    assert stats.reads == 6  # read only at every check_every-th step: one sync per 5 steps


def test_factor_multiplies_and_multiples_round_down():
    stats = FakeStats([(50.0, 45.0, True)])
    s = AdaptiveBatchSize(_opt(), 16, 512, factor=3.0, check_every=1, max_growth=100.0, micro_batch_size=4,
                          world_size=2, statistics=stats)
    s.step()
    assert s.batch_size == 144  # 3 × 50 = 150, rounded down to a multiple of 4 × 2
    assert s.accumulation_steps == 18 and s.local_batch_size == 72


@pytest.mark.parametrize("figures", [
    (100.0, 80.0, False),  # not ready
    (100.0, math.nan, True),  # no interval
    (100.0, -5.0, True),  # interval includes zero
    (100.0, 9.0, True),  # lower end below (1 + hysteresis) × B = 10
    (math.nan, math.nan, False),
])
def test_holds_unless_the_interval_supports_growth(figures):
    s = AdaptiveBatchSize(_opt(), 8, 256, check_every=1, statistics=FakeStats([figures]))
    assert _run(s, 10) == [8] * 10


def test_hysteresis_margin_is_the_threshold():
    s = AdaptiveBatchSize(_opt(), 8, 256, check_every=1, hysteresis=0.25, statistics=FakeStats([(40.0, 10.0, True)]))
    s.step()
    assert s.batch_size == 16  # 10 >= 1.25 × 8
    s.step()
    assert s.batch_size == 16  # 10 < 1.25 × 16


def test_never_oscillates_on_a_noisy_estimate():
    gen = torch.Generator().manual_seed(0)
    values = []
    for i in range(400):  # a noisy estimate that rises, falls back and wobbles
        centre = 30 + 40 * math.sin(i / 40) ** 2
        b = centre * (1 + 0.5 * torch.randn((), generator=gen).item())
        values.append((b, b - 0.4 * centre, True))
    s = AdaptiveBatchSize(_opt(), 8, 1024, check_every=2, statistics=FakeStats(values))
    sizes = _run(s, 800)
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))  # never shrinks
    assert max(sizes) > 8  # it did grow


def test_respects_the_bounds():
    s = AdaptiveBatchSize(_opt(), 8, 48, check_every=1, max_growth=10.0, statistics=FakeStats([(1e6, 1e6, True)]))
    assert _run(s, 5) == [8, 48, 48, 48, 48]


# ----------------------------------------------------------------- fixed ramps
def test_linear_ramp_in_examples():
    s = LinearRampBatchSize(_opt(), 8, 64, ramp=1000, micro_batch_size=8)
    sizes = _run(s, 60)
    assert sizes[0] == 8 and sizes[-1] == 64
    examples = 0
    for b in sizes:
        assert b == max(8, int((8 + 56 * min(examples / 1000, 1)) // 8) * 8)
        examples += b
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))


def test_step_schedule_in_tokens():
    s = StepBatchSize(_opt(), [(0, 8), (100, 16), (300, 32)], unit="tokens", tokens_per_example=2)
    sizes = _run(s, 16)
    # 100 tokens = 50 examples: reached after 7 steps of 8; 300 tokens = 150: after 6 more of 16
    assert sizes == [8] * 7 + [16] * 6 + [32] * 3
    # a milestone is in force from the step that starts at it
    s = StepBatchSize(_opt(), [(0, 8), (32, 16)])
    assert _run(s, 6) == [8, 8, 8, 8, 16, 16]


# ----------------------------------------------------------------- lr coupling
def _applied_lrs(opt, schedule, steps):
    """The lr each step really applied: with momentum 0 and a gradient of ones, Δp = −lr."""
    p = opt.param_groups[0]["params"][0]
    lrs, sizes = [], []
    for _ in range(steps):
        before = p.detach().clone()
        p.grad = torch.ones_like(p)
        sizes.append(schedule.batch_size)
        opt.step()
        lrs.append((before - p.detach())[0].item())
        schedule.step()
    return sizes, lrs


@pytest.mark.parametrize("rule", ["linear", "sqrt", "noise", "none"])
def test_lr_follows_each_rule(rule):
    extra = dict(noise_scale=True, noise_fallback=32.0) if rule == "noise" else {}
    opt = _opt(rule, **extra)
    s = LinearRampBatchSize(opt, 8, 64, ramp=200)
    sizes, lrs = _applied_lrs(opt, s, 20)
    assert len(set(sizes)) > 3
    for b, lr in zip(sizes, lrs):
        k = b / 8
        scale = {"linear": k, "sqrt": math.sqrt(k), "none": 1.0,
                 "noise": (1 + 32 / 8) / (1 + 32 / b)}[rule]
        assert lr == pytest.approx(0.1 * scale, rel=1e-6)


@pytest.mark.parametrize("rule", ["linear", "sqrt"])
def test_rewarmup_ramps_from_the_old_rate_and_never_shows_in_group_lr(rule):
    opt = _opt(rule)
    s = AdaptiveBatchSize(opt, 8, 64, check_every=3, rewarmup_steps=4, statistics=FakeStats([(16.0, 16.0, True)]))
    sizes, lrs = _applied_lrs(opt, s, 10)
    assert sizes == [8, 8, 8] + [16] * 7
    # from the old rate 0.1 to the new one (0.2 linear, 0.1·√2 sqrt) linearly over 4 steps
    new = 0.2 if rule == "linear" else 0.1 * math.sqrt(2)
    ramp = [new * (0.1 / new + (1 - 0.1 / new) * t / 4) for t in range(4)]
    assert lrs == pytest.approx([0.1, 0.1, 0.1, *ramp, new, new, new])
    assert opt.param_groups[0]["lr"] == 0.1


def test_with_a_torch_scheduler_stepped_in_steps():
    opt = _opt("sqrt")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    s = LinearRampBatchSize(opt, 8, 32, ramp=100)
    p = opt.param_groups[0]["params"][0]
    for t in range(15):
        before = p.detach().clone()
        p.grad = torch.ones_like(p)
        b = s.batch_size
        opt.step()
        assert (before - p.detach())[0].item() == pytest.approx(0.1 * 0.5 ** (t // 5) * math.sqrt(b / 8), rel=1e-6)
        sched.step()
        s.step()


def test_scheduler_kept_in_examples():
    opt = _opt("linear")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    s = LinearRampBatchSize(opt, 8, 64, ramp=300, lr_scheduler=sched, scheduler_unit="examples")
    _run(s, 12, step_optimizer=True)
    assert sched.last_epoch == s.examples // 8  # one scheduler step per base batch of examples
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / (1 + s.examples // 8))
    # in steps instead: one per optimizer step
    opt2 = _opt("linear")
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda t: 1.0 / (1 + t))
    _run(LinearRampBatchSize(opt2, 8, 64, ramp=300, lr_scheduler=sched2), 12, step_optimizer=True)
    assert sched2.last_epoch == 12


# ----------------------------------------------------------------- the two realisations, on a small model
def _data(n=512, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g)
    y = x @ w + 2.0 * torch.randn(n, 1, generator=g)
    return x, y


def test_accumulation_realisation_matches_one_big_batch():
    x, y = _data()
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    ref = torch.nn.Linear(6, 1)
    ref.load_state_dict(model.state_dict())
    opt = FusedScaledSGD(model.parameters(), lr=0.05, batch_size=8, noise_scale=True)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    s = LinearRampBatchSize(opt, 8, 32, ramp=200, micro_batch_size=4)
    pos = 0
    for _ in range(15):
        b, k = s.batch_size, s.accumulation_steps
        assert k * 4 == b
        opt.zero_grad()
        for i in range(k):
            xs, ys = x[pos + 4 * i:pos + 4 * (i + 1)], y[pos + 4 * i:pos + 4 * (i + 1)]
            (torch.nn.functional.mse_loss(model(xs), ys) / k).backward()
            opt.accumulate_grad(batch_size=4, loss_scale=1 / k)
        opt.step()
        # the reference: the whole batch at once, torch's SGD at the linearly scaled lr
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x[pos:pos + b]), y[pos:pos + b]).backward()
        ref_opt.param_groups[0]["lr"] = 0.05 * b / 8
        ref_opt.step()
        pos += b
        s.step()
    assert s.examples == pos and s.batch_size == 32
    for a, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    assert opt.gradient_stats()["updates"] == 15  # every step fed the estimator


def test_sampler_realisation_batches_follow_the_schedule():
    x, y = _data(n=200)
    ds = torch.utils.data.TensorDataset(x, y)
    opt = _opt("linear")
    s = StepBatchSize(opt, [(0, 8), (40, 16), (100, 32)])
    sampler = BatchSizeSampler(len(ds), s, seed=3, drop_last=True)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler)
    seen, sizes = [], []
    for xb, _ in loader:
        assert len(xb) == s.batch_size
        sizes.append(len(xb))
        seen.extend(xb[:, 0].tolist())
        s.step()
    assert sizes == [8] * 5 + [16] * 4 + [32] * 3  # 40 + 64 + 96 = 200
    assert len(seen) == len(set(seen)) == 200  # an epoch: every example once
    assert sampler.epoch == 1 and sampler.offset == 0


def test_sampler_ranks_split_one_global_batch():
    opt = _opt("linear")
    s0 = StepBatchSize(opt, [(0, 8), (16, 12)], world_size=2)
    s1 = StepBatchSize(_opt("linear"), [(0, 8), (16, 12)], world_size=2)
    r0, r1 = BatchSizeSampler(50, s0, rank=0, seed=1), BatchSizeSampler(50, s1, rank=1, seed=1)
    g = BatchSizeSampler(50, StepBatchSize(_opt(), [(0, 8), (16, 12)]), seed=1)
    for a, b, whole in zip(r0, r1, g):
        assert len(a) == len(b) == s0.local_batch_size
        assert sorted(a + b) == sorted(whole) and not set(a) & set(b)
        for sch in (s0, s1, g.schedule):
            sch.step()
    assert s0.history == s1.history == [(0, 8), (2, 12)]


# ----------------------------------------------------------------- resume bit for bit
def _make_run(x, y):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    opt = FusedScaledSGD(model.parameters(), lr=0.02, momentum=0.9, batch_size=8, base_batch_size=8,
                         noise_scale=fastscale.NoiseScaleConfig(min_updates=3))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.7)
    s = AdaptiveBatchSize(opt, 8, 128, factor=8.0, check_every=3, micro_batch_size=4, rewarmup_steps=3,
                          lr_scheduler=sched, scheduler_unit="examples")
    sampler = BatchSizeSampler(len(x), s, seed=5)
    return model, opt, s, sampler


def _accumulate(model, opt, schedule, x, y, idx, micro=4):
    """Backward over the batch ``idx`` in micro-batches of ``micro``, each fed to accumulate_grad."""
    k = schedule.accumulation_steps
    opt.zero_grad()
    for i in range(k):
        part = idx[micro * i:micro * (i + 1)]
        (torch.nn.functional.mse_loss(model(x[part]), y[part]) / k).backward()
        opt.accumulate_grad(batch_size=micro, loss_scale=1 / k)


def _train(x, y, run, steps, log):
    model, opt, s, sampler = run
    it = iter(sampler)
    for _ in range(steps):
        try:
            idx = next(it)
        except StopIteration:  # the epoch is over: the sampler starts the next one
            it = iter(sampler)
            idx = next(it)
        _accumulate(model, opt, s, x, y, idx)
        lr = opt.current_lr()[0] * s.lr_factor
        opt.step()
        log.append((s.batch_size, lr, [p.detach().clone() for p in model.parameters()]))
        s.step()


def test_resume_mid_ramp_is_bit_for_bit():
    x, y = _data(n=300)
    straight = []
    _train(x, y, _make_run(x, y), 60, straight)
    sizes = [b for b, _, _ in straight]
    change_steps = [i for i in range(1, 60) if sizes[i] != sizes[i - 1]]
    assert any(c < 30 for c in change_steps) and any(c > 30 for c in change_steps), sizes  # mid-ramp

    first = _make_run(x, y)
    resumed = []
    _train(x, y, first, 30, resumed)
    model, opt, s, sampler = first
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "schedule": s.state_dict(),
                "sampler": sampler.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    second = _make_run(x, y)
    second[0].load_state_dict(ck["model"])
    second[1].load_state_dict(ck["opt"])
    second[2].load_state_dict(ck["schedule"])
    second[3].load_state_dict(ck["sampler"])
    _train(x, y, second, 30, resumed)
    for t, ((b1, lr1, p1), (b2, lr2, p2)) in enumerate(zip(straight, resumed)):
        assert (b1, lr1) == (b2, lr2), t
        for a, b in zip(p1, p2):
            assert torch.equal(a, b), t


# ----------------------------------------------------------------- no host read between checks
def test_reads_the_estimate_only_at_checks(monkeypatch):
    """Between checks neither schedule.step() nor the re-warmup inside opt.step() reads a tensor on
    the host (on a GPU: no sync); the check step is the one that does (test_no_sync's method)."""
    from test_no_sync import host_reads_forbidden

    x, y = _data(n=2000)
    model, opt, s, sampler = _make_run(x, y)
    it = iter(sampler)
    reads_at = []
    for _ in range(40):
        _accumulate(model, opt, s, x, y, next(it))
        check = (s.steps + 1) % s.check_every == 0
        if check:
            opt.step()
            s.step()
            reads_at.append(s.steps)
        else:
            with host_reads_forbidden(monkeypatch):
                opt.step()  # re-warmup hooks included
                s.step()
    assert len(s.history) > 1 and s._hooks  # it grew, with re-warmups, under the forbidding
    with pytest.raises(AssertionError, match="read a tensor on the host"):  # the check does read
        with host_reads_forbidden(monkeypatch):
            s.steps = s.check_every - 1
            s.step()


def test_noise_hook_state_follows_the_local_batch():
    class Hook:
        local_batch_size = 0

    hook = Hook()
    s = StepBatchSize(_opt(), [(0, 8), (16, 32)], world_size=4, noise_hook_state=hook)
    assert hook.local_batch_size == 2
    _run(s, 3)
    assert s.batch_size == 32 and hook.local_batch_size == 8


# ----------------------------------------------------------------- bad input
def _hooks(opt):
    return len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)


@pytest.mark.parametrize("make, error, message", [
    (lambda o: AdaptiveBatchSize(o, 64, 8), ValueError, r"min_batch_size \(64\) must be <= max_batch_size \(8\)"),
    (lambda o: AdaptiveBatchSize(o, 12, 64, micro_batch_size=8), ValueError, r"min_batch_size=12 is not a multiple of 8"),
    (lambda o: AdaptiveBatchSize(o, 8, 60, world_size=8), ValueError, r"max_batch_size=60 is not a multiple of 8 \(micro_batch_size 1 × world_size 8\)"),
    (lambda o: AdaptiveBatchSize(o, 8, 64, factor=0), ValueError, r"factor must be a finite number > 0, got 0.0"),
    (lambda o: AdaptiveBatchSize(o, 8, 64, factor=-1.0), ValueError, r"factor must be a finite number > 0"),
    (lambda o: AdaptiveBatchSize(o, 8, 64, factor="2"), TypeError, r"factor must be a number > 0, got str"),
    (lambda o: AdaptiveBatchSize(o, 8.0, 64), TypeError, r"min_batch_size must be an int >= 1, got float"),
    (lambda o: AdaptiveBatchSize(o, 8, 64, check_every=0), ValueError, r"check_every must be an int >= 1, got 0"),
    (lambda o: AdaptiveBatchSize(o, 8, 64, max_growth=1.0), ValueError, r"max_growth must be a finite number > 1"),
    (lambda o: AdaptiveBatchSize(o, 8, 64, rewarmup_steps=-1), ValueError, r"rewarmup_steps must be an int >= 0"),
    (lambda o: AdaptiveBatchSize(o, 8, 64, statistics=3), TypeError, r"statistics must be a callable"),
    (lambda o: AdaptiveBatchSize(o, 8, 64, scheduler_unit="epochs"), ValueError, r"scheduler_unit must be one of \('steps', 'examples'\)"),
    (lambda o: LinearRampBatchSize(o, 64, 8, ramp=10), ValueError, r"end \(8\) must be >= start \(64\)"),
    (lambda o: LinearRampBatchSize(o, 8, 64, ramp=0), ValueError, r"ramp must be an int >= 1, got 0"),
    (lambda o: LinearRampBatchSize(o, 8, 60, ramp=10, micro_batch_size=8), ValueError, r"end=60 is not a multiple of 8"),
    (lambda o: LinearRampBatchSize(o, 8, 64, ramp=10, unit="tokens"), ValueError, r'unit="tokens" needs tokens_per_example'),
    (lambda o: LinearRampBatchSize(o, 8, 64, ramp=10, unit="words"), ValueError, r"unit must be one of \('examples', 'tokens'\)"),
    (lambda o: StepBatchSize(o, [(0, 8), (100, 16), (100, 32)]), ValueError, r"milestone positions must be strictly increasing: milestones\[2\]"),
    (lambda o: StepBatchSize(o, [(0, 8), (50, 16), (10, 32)]), ValueError, r"strictly increasing"),
    (lambda o: StepBatchSize(o, [(5, 8)]), ValueError, r"milestones must start at position 0"),
    (lambda o: StepBatchSize(o, [(0, 8), (10, 12)], micro_batch_size=8), ValueError, r"milestones\[1\] batch_size=12 is not a multiple of 8"),
    (lambda o: StepBatchSize(o, [8, 16]), TypeError, r"milestones\[0\] must be a \(position, batch_size\) pair"),
    (lambda o: StepBatchSize(o, []), TypeError, r"milestones must be a non-empty list"),
    (lambda o: AdaptiveBatchSize(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]), 8, 64), TypeError, r"optimizer must be a fastscale.FusedScaledSGD"),
])
def test_bad_input_raises_at_construction_and_changes_nothing(make, error, message):
    opt = _opt("linear", noise_scale=True)
    with pytest.raises(error, match=message):
        make(opt)
    assert opt.param_groups[0]["batch_size"] == 8 and _hooks(opt) == 0


def test_adaptive_needs_an_estimate():
    with pytest.raises(ValueError, match="needs the optimizer built with noise_scale=True"):
        AdaptiveBatchSize(_opt(), 8, 64)


def test_bad_sampler_and_state():
    s = LinearRampBatchSize(_opt(), 8, 16, ramp=10, world_size=2)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        BatchSizeSampler(10, s, rank=2)
    with pytest.raises(TypeError, match="schedule must be a fastscale BatchSizeSchedule"):
        BatchSizeSampler(10, object())
    other = LinearRampBatchSize(_opt(), 8, 16, ramp=10, micro_batch_size=4)
    before = s.state_dict()
    with pytest.raises(ValueError, match="saved with batch sizes in multiples of 4"):
        s.load_state_dict(other.state_dict())
    assert s.state_dict() == before


# ----------------------------------------------------------------- 2 ranks agree (gloo)
WORKER = __file__


def _worker(out):
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    opt = FusedScaledSGD(model.parameters(), lr=0.02, momentum=0.9, batch_size=16,
                         noise_scale=fastscale.NoiseScaleConfig(min_updates=3))
    s = AdaptiveBatchSize(opt, 16, 256, factor=8.0, check_every=3, micro_batch_size=4)
    assert s.world_size == 2
    # Each rank's own data, with very different noise: each rank's estimator sees something else,
    # and only the all-reduced statistic keeps their decisions equal.
    x, y = _data(n=4000, seed=10 + rank)
    y = y + (1.5 if rank else 0.0) * torch.randn(y.shape, generator=torch.Generator().manual_seed(rank))
    sampler = BatchSizeSampler(len(x), s, seed=2)
    it = iter(sampler)
    local = []
    for _ in range(60):
        idx = next(it)
        assert len(idx) == s.local_batch_size
        _accumulate(model, opt, s, x, y, idx)
        opt.step()
        s.step()
        if s.last_check is not None and s.last_check["step"] == s.steps:
            st = opt.gradient_stats()
            local.append((st["b_simple"], st["b_simple_low"], st["ready"]))
    # What this rank alone would have decided at each check, from its own figures.
    alone = AdaptiveBatchSize(opt, 16, 256, factor=8.0, check_every=1, micro_batch_size=4, world_size=1,
                              statistics=FakeStats(local))
    for _ in local:
        alone.step()
    torch.save({"history": s.history, "checks": local, "alone": alone.history, "rank": rank}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_agree_on_the_batch_size(tmp_path):
    r0, r1 = launch_ranks(WORKER, tmp_path, 2, timeout=120)
    assert r0["history"] == r1["history"]
    assert len(r0["history"]) > 1  # it grew
    assert r0["checks"] != r1["checks"]  # from different local estimates,
    assert r0["alone"] != r1["alone"]  # on which the ranks alone would have disagreed


def _ddp_worker(out):
    """The DDP loop of docs/batch_size_schedules.md: the replica hook feeds the estimate, micro-
    batches accumulate under no_sync(), the sampler gives each rank its slice of the global batch."""
    import contextlib
    import os

    import torch.distributed as dist

    from fastscale.distributed import register_noise_scale_hook

    dist.init_process_group("gloo", init_method="env://")
    rank = dist.get_rank()
    torch.manual_seed(0)
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(6, 1))
    opt = FusedScaledSGD(ddp.parameters(), lr=0.02, momentum=0.9, batch_size=16,
                         noise_scale=fastscale.NoiseScaleConfig(min_updates=3))
    hook = register_noise_scale_hook(ddp, opt, local_batch_size=8)
    s = AdaptiveBatchSize(opt, 16, 256, factor=8.0, check_every=3, micro_batch_size=4, noise_hook_state=hook)
    x, y = _data(n=4000)  # one data set; the sampler gives each rank its half of every batch
    sampler = BatchSizeSampler(len(x), s, seed=2)
    it = iter(sampler)
    seen, local_sizes = [], []
    for _ in range(60):
        idx = next(it)
        seen.append(idx)
        k = s.accumulation_steps
        opt.zero_grad()
        for i in range(k):
            part = idx[4 * i:4 * (i + 1)]
            with ddp.no_sync() if i < k - 1 else contextlib.nullcontext():
                (torch.nn.functional.mse_loss(ddp(x[part]), y[part]) / k).backward()
        opt.step()
        local_sizes.append(hook.local_batch_size)
        s.step()
    torch.save({"history": s.history, "checks": s.last_check, "seen": seen, "local_sizes": local_sizes,
                "updates": opt.gradient_stats()["updates"], "params": [p.detach() for p in ddp.parameters()]},
               os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_loop_with_the_replica_hook(tmp_path):
    r0, r1 = launch_ranks(WORKER, tmp_path, 2, timeout=120, FASTSCALE_TEST_MODE="ddp")
    assert r0["history"] == r1["history"] and len(r0["history"]) > 1
    assert r0["updates"] == 60  # the hook fed the estimate at every step, at every batch size
    sizes = dict(r0["history"])
    batch = [sizes[max(k for k in sizes if k <= t)] for t in range(60)]
    assert r0["local_sizes"] == [b // 2 for b in batch]  # the hook's B_small followed the schedule
    for a, b, n in zip(r0["seen"], r1["seen"], batch):
        assert len(a) == len(b) == n // 2 and not set(a) & set(b)
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)


if __name__ == "__main__" and "--worker" in sys.argv:
    import os

    out = sys.argv[sys.argv.index("--worker") + 1]
    _ddp_worker(out) if os.environ.get("FASTSCALE_TEST_MODE") == "ddp" else _worker(out)
