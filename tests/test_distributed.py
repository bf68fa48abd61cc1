"""Noise-scale statistics from DDP replicas (fastscale.distributed), 2 gloo processes on CPU.

One launch of two ranks runs every scenario (a few seconds of process start-up each time) and
saves what it saw; the tests compare that with single-process training on the same data split
the same way: each replica's half of the batch is a small batch, the whole batch the big one.
Run as a script (``--worker OUT``) this file is the per-rank program.
"""

import datetime
import math
import os
import sys
import time
import warnings

import pytest
import torch

import fastscale
from conftest import error_of, launch_ranks

WORLD = 2
LOCAL_BATCH = 4
STEPS = 5
DIM = 6
NOISE = dict(beta=0.5, min_updates=1, per_tensor=True)
OPT = dict(lr=0.1, momentum=0.9)
JOIN_TIMEOUT_S = 120  # whole launch; the process group itself times out after PG_TIMEOUT_S
PG_TIMEOUT_S = 30


def make_model() -> torch.nn.Module:
    torch.manual_seed(1)
    # Tensors above the tiny bucket cap below, so DDP splits them over several buckets.
    return torch.nn.Sequential(
        torch.nn.Linear(DIM, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    )


def make_data():
    """STEPS global batches of WORLD × LOCAL_BATCH examples; rank r takes rows [r·b, (r+1)·b)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(STEPS, WORLD * LOCAL_BATCH, DIM, generator=g)
    y = torch.randn(STEPS, WORLD * LOCAL_BATCH, 1, generator=g) + x[..., :1]
    return x, y


def make_optimizer(params, lr=OPT["lr"]):
    return fastscale.FusedScaledSGD(
        params, lr=lr, momentum=OPT["momentum"], noise_scale=fastscale.NoiseScaleConfig(**NOISE)
    )


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)  # mean over the examples


# --------------------------------------------------------------------------- per-rank program
CLIP = 1e-2  # max_norm far below the gradients' norms: clipping changes every update


def _train_ddp(rank, micro_batches=1, loss_scale=1.0, bucket_view=False, amp=False, clip=False):
    from fastscale.distributed import register_noise_scale_hook

    x, y = make_data()
    model = torch.nn.parallel.DistributedDataParallel(
        make_model(), bucket_cap_mb=0.0001, gradient_as_bucket_view=bucket_view
    )
    # With loss_scale k, .grad is k × the mean gradient: lr / k takes the same SGD steps.
    opt = make_optimizer(model.parameters(), lr=OPT["lr"] / loss_scale)
    # A GradScaler's scale (2^10, no overflow in fp32) must be divided out of the statistics.
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if amp else None
    register_noise_scale_hook(model, opt, LOCAL_BATCH, loss_scale=loss_scale, grad_scaler=scaler)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    micro = LOCAL_BATCH // micro_batches
    for step in range(STEPS):
        opt.zero_grad()
        xs, ys = x[step, rows], y[step, rows]
        for i in range(micro_batches):
            part = slice(i * micro, (i + 1) * micro)
            last = i == micro_batches - 1
            with torch.enable_grad() if last else model.no_sync():
                loss = loss_fn(model, xs[part], ys[part]) * (loss_scale / micro_batches)
                (scaler.scale(loss) if amp else loss).backward()
        if clip:  # between the backward and step(): the statistics must not see it
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP * loss_scale)
        if amp:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    return {"params": [p.detach().clone() for p in model.parameters()], "stats": opt.gradient_stats()}


def _expect_error(fn):
    return error_of(fn, ValueError, RuntimeError)


def _mismatched_batch(rank):
    from fastscale.distributed import register_noise_scale_hook

    model = torch.nn.parallel.DistributedDataParallel(make_model())
    opt = make_optimizer(model.parameters())
    return _expect_error(lambda: register_noise_scale_hook(model, opt, LOCAL_BATCH + rank))


def _no_noise_scale_on_rank_1(rank):
    from fastscale.distributed import register_noise_scale_hook

    model = torch.nn.parallel.DistributedDataParallel(make_model())
    opt = fastscale.FusedScaledSGD(model.parameters(), lr=0.1, noise_scale=rank == 0)
    return _expect_error(lambda: register_noise_scale_hook(model, opt, LOCAL_BATCH))


def _both_sources(rank):
    from fastscale.distributed import register_noise_scale_hook

    x, y = make_data()
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    opt = make_optimizer(model.parameters())
    register_noise_scale_hook(model, opt, LOCAL_BATCH)
    loss_fn(model, x[0, :LOCAL_BATCH], y[0, :LOCAL_BATCH]).backward()
    opt.accumulate_grad(batch_size=LOCAL_BATCH)
    return _expect_error(opt.step)


def _two_synced_backwards(rank):
    from fastscale.distributed import register_noise_scale_hook

    x, y = make_data()
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    opt = make_optimizer(model.parameters())
    register_noise_scale_hook(model, opt, LOCAL_BATCH)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    for step in range(2):  # accumulation without no_sync(): the local norms are not small-batch ones
        loss_fn(model, x[step, rows], y[step, rows]).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    return {"warnings": [str(w.message) for w in caught], "updates": opt.gradient_stats()["updates"]}


def _rank_1_never_registers(rank):
    """Last scenario: rank 1 skips the registration, so the two ranks' call counts differ."""
    import torch.distributed as dist
    from fastscale.distributed import register_noise_scale_hook

    model = torch.nn.parallel.DistributedDataParallel(make_model())
    opt = make_optimizer(model.parameters())
    t0 = time.monotonic()
    message = _expect_error(lambda: register_noise_scale_hook(model, opt, LOCAL_BATCH, timeout=2)) if rank == 0 else None
    waited = time.monotonic() - t0
    dist.barrier()  # rank 1 waits here for rank 0 to give up
    return {"message": message, "waited_s": waited}


def _worker(out_dir):
    import torch.distributed as dist

    warnings.simplefilter("ignore")  # the pure-torch fallback warning, once per process
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    rank = dist.get_rank()
    results = {
        "plain": _train_ddp(rank),
        "no_sync": _train_ddp(rank, micro_batches=2, bucket_view=True),
        "loss_scale": _train_ddp(rank, micro_batches=2, loss_scale=2.0),
        "grad_scaler": _train_ddp(rank, amp=True),
        "clipped": _train_ddp(rank, clip=True),
        "mismatched_batch": _mismatched_batch(rank),
        "no_noise_scale_on_rank_1": _no_noise_scale_on_rank_1(rank),
        "both_sources": _both_sources(rank),
        "two_synced_backwards": _two_synced_backwards(rank),
        "rank_1_never_registers": _rank_1_never_registers(rank),
    }
    dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


# --------------------------------------------------------------------------- launcher
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch_ranks(__file__, tmp_path_factory.mktemp("ddp"), WORLD, JOIN_TIMEOUT_S)


# --------------------------------------------------------------------------- single-process oracle
@pytest.fixture(scope="module")
def single_process():
    return {clip: _single_process(clip) for clip in (False, True)}


def _single_process(clip):
    """The same training in one process: each replica's half-batch gradient is computed on its
    own, the mean of their squared norms fed as the small-batch source, their mean as .grad
    (with ``clip``, clipped after it is fed, as the DDP loop clips before step())."""
    x, y = make_data()
    model = make_model()
    params = list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make_optimizer(params)
        for step in range(STEPS):
            halves = []
            for r in range(WORLD):
                rows = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
                halves.append(torch.autograd.grad(loss_fn(model, x[step, rows], y[step, rows]), params))
            per_tensor = torch.stack([torch.stack([g.double().square().sum() for g in h]) for h in halves]).mean(0)
            for i, p in enumerate(params):
                p.grad = torch.stack([h[i] for h in halves]).mean(0)
            opt.observe_small_batch_norms(
                per_tensor.sum(), LOCAL_BATCH, WORLD * LOCAL_BATCH, per_tensor=per_tensor
            )
            if clip:
                torch.nn.utils.clip_grad_norm_(params, CLIP)
            opt.step()
        return {"params": [p.detach().clone() for p in params], "stats": opt.gradient_stats()}


SCENARIOS = ["plain", "no_sync", "loss_scale", "grad_scaler", "clipped"]
STAT_KEYS = ("grad_sq_norm", "trace_cov", "b_simple")
PER_TENSOR_KEYS = ("grad_sq_norm_per_tensor", "trace_cov_per_tensor", "b_simple_per_tensor")


def _assert_same_estimate(got, want):
    assert got["updates"] == want["updates"] == STEPS
    for key in STAT_KEYS:
        assert math.isfinite(want[key]) and want[key] != 0
    for key in STAT_KEYS + PER_TENSOR_KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-5), key


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_estimate_matches_single_process(ranks, single_process, scenario):
    want = single_process[scenario == "clipped"]
    for rank in range(WORLD):
        _assert_same_estimate(ranks[rank][scenario]["stats"], want["stats"])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_parameters_match_single_process(ranks, single_process, scenario):
    for rank in range(WORLD):
        for got, want in zip(ranks[rank][scenario]["params"], single_process[scenario == "clipped"]["params"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_estimate_sees_noise(single_process):
    # Guards the comparison above: replicas with different data disagree, so tr(Σ) > 0.
    assert single_process[False]["stats"]["trace_cov"] > 0


def test_mismatched_local_batch_size_raises_on_every_rank(ranks):
    messages = [ranks[r]["mismatched_batch"] for r in range(WORLD)]
    assert messages[0] is not None and messages[0] == messages[1]
    assert messages[0].startswith("ValueError") and "local_batch_size differs across ranks" in messages[0]


def test_invalid_optimizer_on_one_rank_raises_on_every_rank(ranks):
    messages = [ranks[r]["no_noise_scale_on_rank_1"] for r in range(WORLD)]
    assert messages[0] is not None and messages[0] == messages[1]
    assert "rank 1: optimizer was built without noise_scale=True" in messages[0]


def test_hook_and_accumulate_grad_in_one_step_raise(ranks):
    for r in range(WORLD):
        message = ranks[r]["both_sources"]
        assert message is not None and message.startswith("RuntimeError")
        assert "no_sync" in message


def test_two_synced_backwards_drop_the_step_statistics(ranks):
    for r in range(WORLD):
        got = ranks[r]["two_synced_backwards"]
        assert got["updates"] == 0
        assert any("several synchronised DDP backwards" in w for w in got["warnings"])


def test_rank_that_never_registers_is_named_not_a_hang(ranks):
    got = ranks[0]["rank_1_never_registers"]
    assert got["message"] is not None and got["message"].startswith("RuntimeError")
    assert "rank(s) [1] did not call register_noise_scale_hook within 2 s" in got["message"]
    assert got["waited_s"] < PG_TIMEOUT_S  # the store timeout, not the process group's


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2])
