"""DTensor parameters (FSDP2 fully_shard, tensor parallelism, HSDP), 2 gloo processes on CPU.

One launch of two ranks runs every scenario and saves what it saw (parameters, momentum buffers
and statistics gathered whole); the tests compare that with single-process training on the same
global batches. FSDP2 averages gradients over the ranks, so .grad is the global batch's gradient
shard: the unsharded oracle trains on the whole batch. Run as a script (``--worker OUT``) this
file is the per-rank program.
"""

import contextlib
import math
import os
import sys
import warnings

import pytest
import torch

import fastscale
from conftest import error_of, gloo_rank, launch_ranks

WORLD = 2
LOCAL = 8  # examples per rank per step (FSDP2); TP ranks each take all WORLD × LOCAL
BATCH = WORLD * LOCAL
MICRO = 2  # micro-batches per step in the accumulation scenarios
STEPS = 4
DIM, HIDDEN, MID, OUT = 6, 16, 7, 4  # MID odd: uneven FSDP2 shards (TP needs even activations)
NOISE = dict(beta=0.5, min_updates=1, per_tensor=True)
# Every option the update has: momentum, nesterov, weight decay, batch-size scaling, warmup.
OPT = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2, batch_size=BATCH, base_batch_size=LOCAL,
           warmup_steps=2)
JOIN_TIMEOUT_S = 120
PG_TIMEOUT_S = 30


def make_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Linear(DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, MID), torch.nn.Tanh(),
        torch.nn.Linear(MID, OUT),
    )


def make_data():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(STEPS, BATCH, DIM, generator=g)
    y = torch.randn(STEPS, BATCH, OUT, generator=g) + x[..., :OUT]
    return x, y


def make_optimizer(params, **kw):
    return fastscale.FusedScaledSGD(params, **OPT, noise_scale=fastscale.NoiseScaleConfig(**NOISE), **kw)


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)  # mean over the examples


def micro_rows(rank, i):
    """Rows of global micro-batch i held by ``rank``: micro-batch i is the union over ranks."""
    start = rank * LOCAL + i * (LOCAL // MICRO)
    return slice(start, start + LOCAL // MICRO)


# --------------------------------------------------------------------------- per-rank program
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")


@contextlib.contextmanager
def host_reads_forbidden():
    """On the CPU no read is a sync; making every host read of a tensor raise during the step is
    how tests/test_no_sync.py checks that the same path would not synchronise on a device."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def boom(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name}() read a tensor on the host during the step")
        return method

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, boom(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def _whole(t):
    from fastscale.sharded import is_dtensor

    return (t.full_tensor() if is_dtensor(t) else t).detach().clone()


def _result(model, opt):
    params = list(model.parameters())
    return {
        "params": [_whole(p) for p in params],
        "bufs": [_whole(opt.state[p]["momentum_buffer"]) for p in params],
        "stats": opt.gradient_stats(),
        "placements": [tuple(repr(pl) for pl in p.placements) for p in params],
    }


def _fsdp_model(mesh=None):
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train_fsdp_per_example(rank, mesh=None, no_sync=False):
    """Per-example norms (B_small = 1). With ``no_sync``: two micro-batches, the first under
    set_requires_gradient_sync(False); their per-example norms together are the step's."""
    x, y = make_data()
    model = _fsdp_model(mesh)
    opt = make_optimizer(model.parameters())
    norms = fastscale.PerExampleGradNorms(model)
    rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
    for step in range(STEPS):
        opt.zero_grad()
        if no_sync:
            sq = []
            for i in range(MICRO):
                model.set_requires_gradient_sync(i == MICRO - 1)
                r = micro_rows(rank, i)
                (loss_fn(model, x[step, r], y[step, r]) / MICRO).backward()
                sq.append(norms.squared_norms() * MICRO**2)  # the 1/k on the loss, squared, divided out
            sq = torch.cat(sq)
        else:
            loss_fn(model, x[step, rows], y[step, rows]).backward()
            sq = norms.squared_norms()
        with host_reads_forbidden():
            opt.observe_per_example_norms(sq)
            opt.step()
    norms.detach()
    return _result(model, opt)


def _train_accumulate(rank, model, rows_of, amp=False, compiled=False, no_sync=False, **kw):
    """MICRO micro-batches, gradients synchronised after each (FSDP2's default): accumulate_grad
    sees each global micro-batch's gradient shard (B_small = global micro-batch). With
    ``no_sync`` the first ones run under set_requires_gradient_sync(False): nothing to measure."""
    x, y = make_data()
    opt = make_optimizer(model.parameters(), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if amp else None
    step_fn = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
    warned = []
    for step in range(STEPS):
        opt.zero_grad()
        for i in range(MICRO):
            if no_sync:
                model.set_requires_gradient_sync(i == MICRO - 1)
            r = rows_of(rank, i)
            loss = loss_fn(model, x[step, r], y[step, r]) / MICRO
            (scaler.scale(loss) if amp else loss).backward()
            forbid = host_reads_forbidden() if step else contextlib.nullcontext()
            with forbid, warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                opt.accumulate_grad(loss_scale=1 / MICRO, grad_scaler=scaler)
            warned += [str(w.message) for w in seen]
        if amp:
            scaler.step(opt)
            scaler.update()
        else:
            with host_reads_forbidden() if step and not compiled else contextlib.nullcontext():
                step_fn()
    result = _result(model, opt)
    result["warnings"] = warned
    if compiled:
        from torch._dynamo.utils import counters

        result["graph_breaks"] = sorted({reason.split("\n")[0] for reason in counters["graph_break"]})
    return result


def _overflow_on_one_rank(rank):
    """An inf in rank 1's shard only, at step 1: GradScaler's found_inf must agree across the ranks
    (DTensor reduces it over the mesh), so every rank skips that update and its statistics."""
    x, y = make_data()
    model = _fsdp_model()
    opt = make_optimizer(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    skipped = None
    for step in range(STEPS):
        opt.zero_grad()
        for i in range(MICRO):
            r = micro_rows(rank, i)
            scaler.scale(loss_fn(model, x[step, r], y[step, r]) / MICRO).backward()
            opt.accumulate_grad(loss_scale=1 / MICRO, grad_scaler=scaler)
        if step == 1:
            if rank == 1:
                list(model.parameters())[2].grad.to_local()[0, 0] = math.inf
            skipped = [_whole(p) for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if step == 1:
            unchanged = all(torch.equal(a, _whole(p)) for a, p in zip(skipped, model.parameters()))
    stats = opt.gradient_stats()
    return {"unchanged": unchanged, "steps": stats["steps"], "updates": stats["updates"]}


def _tp_model():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    # Colwise then rowwise (its bias replicated), then colwise again gathered to a replicated output.
    plan = {"0": ColwiseParallel(), "2": RowwiseParallel(), "4": ColwiseParallel(output_layouts=Replicate())}
    return parallelize_module(make_model(), mesh, plan)


def _tp_rows(rank, i):
    """Every TP rank sees the whole global micro-batch i (the union of the FSDP ranks' rows)."""
    return [j for r in range(WORLD) for j in range(BATCH)[micro_rows(r, i)]]


def _expect_error(fn):
    return error_of(fn, TypeError, ValueError)


def _snapshot(model, opt):
    return ([p.detach().to_local().clone() for p in model.parameters()],
            [b.to_local().clone() for b in (opt.state[p].get("momentum_buffer") for p in model.parameters())
             if b is not None],
            opt._step_count.clone(), len(opt.param_groups), opt.statistics, opt.statistics.pending)


def _unchanged(before, after):
    (p0, b0, s0, n0, t0, q0), (p1, b1, s1, n1, t1, q1) = before, after
    return (all(torch.equal(a, b) for a, b in zip(p0, p1)) and len(b0) == len(b1)
            and all(torch.equal(a, b) for a, b in zip(b0, b1))
            and torch.equal(s0, s1) and n0 == n1 and t0 is t1 and q0 == q1)


def _bad_input(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    out = {}
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("dp",))
    other = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    torch.manual_seed(3)
    a = torch.nn.Parameter(distribute_tensor(torch.randn(5, 3), mesh, [Shard(0)]))
    b = torch.nn.Parameter(distribute_tensor(torch.randn(4), other, [Shard(0)]))
    plain = torch.nn.Parameter(torch.randn(3))
    out["mixed"] = _expect_error(lambda: make_optimizer([a, plain]))

    # The op layer's rule, called directly: local shards in, local partial norms out.
    grad = distribute_tensor(torch.randn(5, 3), mesh, [Shard(0)])
    kw = dict(lr=torch.tensor(0.1), weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False,
              is_first_step=False)
    for name, op in (("op", fastscale.ops.fused_sgd_), ("twin", fastscale.ops.pure_torch.fused_sgd_)):
        p = distribute_tensor(torch.randn(5, 3), mesh, [Shard(0)])
        want = p.to_local() - 0.1 * grad.to_local()
        norms = op([p], [grad], [], **kw)
        out[f"{name}_local"] = (type(norms) is torch.Tensor and torch.allclose(norms, grad.to_local().square().sum())
                                and torch.allclose(p.to_local(), want))
        out[f"{name}_mixed"] = _expect_error(lambda: op([p], [grad.full_tensor()], [], **kw))
        out[f"{name}_layouts"] = _expect_error(lambda: op([p], [grad.redistribute(mesh, [Replicate()])], [], **kw))
    out["two_meshes_one_group"] = _expect_error(lambda: make_optimizer([a, b]))

    # A trained FSDP2 model: an error must leave params, buffers, counters, statistics as they were.
    x, y = make_data()
    model = _fsdp_model()
    opt = make_optimizer(model.parameters())
    rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
    for step in range(2):
        opt.zero_grad()
        loss_fn(model, x[step, rows], y[step, rows]).backward()
        opt.step()
    loss_fn(model, x[2, rows], y[2, rows]).backward()

    before = _snapshot(model, opt)
    out["add_group_other_mesh"] = _expect_error(lambda: opt.add_param_group({"params": [b]}))
    out["add_group_other_mesh_unchanged"] = _unchanged(before, _snapshot(model, opt))
    out["add_group_plain"] = _expect_error(lambda: opt.add_param_group({"params": [plain]}))
    out["add_group_plain_unchanged"] = _unchanged(before, _snapshot(model, opt))

    opt.param_groups[0]["batch_size"] = BATCH - 1  # 15 examples cannot split over 2 ranks
    out["batch_not_divisible"] = _expect_error(lambda: opt.observe_per_example_norms(torch.rand(LOCAL) + 0.5))
    out["batch_not_divisible_unchanged"] = _unchanged(before, _snapshot(model, opt))
    opt.param_groups[0]["batch_size"] = BATCH + 2
    out["batch_mismatch"] = _expect_error(lambda: opt.observe_per_example_norms(torch.rand(LOCAL) + 0.5))
    opt.param_groups[0]["batch_size"] = BATCH

    # The last parameter's gradient replicated while the parameter is sharded: refused before any write.
    params = list(model.parameters())
    good = params[-1].grad
    params[-1].grad = distribute_tensor(torch.randn(params[-1].shape), params[-1].device_mesh, [Replicate()])
    out["grad_layout"] = _expect_error(opt.step)
    out["grad_layout_unchanged"] = _unchanged(before, _snapshot(model, opt))
    params[-1].grad = good

    tp = _tp_model()
    tp_opt = make_optimizer(tp.parameters())
    loss_fn(tp, x[0], y[0]).backward()
    out["per_example_tp"] = _expect_error(lambda: tp_opt.observe_per_example_norms(torch.rand(BATCH) + 0.5))
    return out


def _scenarios(rank):
    from torch.distributed.device_mesh import init_device_mesh

    return {
        "fsdp_per_example": _train_fsdp_per_example(rank),
        "fsdp_no_sync_per_example": _train_fsdp_per_example(rank, no_sync=True),
        "fsdp_accumulate": _train_accumulate(rank, _fsdp_model(), micro_rows),
        "fsdp_accumulate_amp": _train_accumulate(rank, _fsdp_model(), micro_rows, amp=True),
        # fused=False: the pure-torch twins, called directly, follow the ops' DTensor rule too.
        "fsdp_accumulate_twin": _train_accumulate(rank, _fsdp_model(), micro_rows, fused=False),
        "tp_accumulate": _train_accumulate(rank, _tp_model(), _tp_rows),
        "fsdp_accumulate_compiled": _train_accumulate(rank, _fsdp_model(), micro_rows, compiled=True),
        "fsdp_accumulate_no_sync": _train_accumulate(rank, _fsdp_model(), micro_rows, no_sync=True),
        # HSDP: replicated over 2 ranks, sharded over 1: every tensor counted once, not twice.
        "hsdp_per_example": _train_fsdp_per_example(
            rank, mesh=init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("dp_replicate", "dp_shard"))),
        "overflow_on_one_rank": _overflow_on_one_rank(rank),
        "bad_input": _bad_input(rank),
    }


# --------------------------------------------------------------------------- launcher
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch_ranks(__file__, tmp_path_factory.mktemp("fsdp"), WORLD, JOIN_TIMEOUT_S)


# --------------------------------------------------------------------------- single-process oracle
def _single_process(source):
    """The same training on the unsharded model in one process, on the whole global batches."""
    x, y = make_data()
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make_optimizer(model.parameters())
        norms = fastscale.PerExampleGradNorms(model) if source == "per_example" else None
        for step in range(STEPS):
            opt.zero_grad()
            if source == "per_example":
                loss_fn(model, x[step], y[step]).backward()
                opt.observe_per_example_norms(norms.squared_norms())
            else:
                for i in range(MICRO):
                    r = _tp_rows(0, i)
                    (loss_fn(model, x[step, r], y[step, r]) / MICRO).backward()
                    opt.accumulate_grad(loss_scale=1 / MICRO)
            opt.step()
        return {"params": [p.detach().clone() for p in model.parameters()],
                "bufs": [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()],
                "stats": opt.gradient_stats()}


@pytest.fixture(scope="module")
def single_process():
    return {source: _single_process(source) for source in ("per_example", "accumulate")}


# scenario -> the oracle it must equal
SCENARIOS = {
    "fsdp_per_example": "per_example",
    "fsdp_no_sync_per_example": "per_example",
    "hsdp_per_example": "per_example",
    "fsdp_accumulate": "accumulate",
    "fsdp_accumulate_amp": "accumulate",
    "fsdp_accumulate_twin": "accumulate",
    "tp_accumulate": "accumulate",
    "fsdp_accumulate_compiled": "accumulate",
}
STAT_KEYS = ("grad_sq_norm", "trace_cov", "b_simple", "last_grad_sq_norm")
PER_TENSOR_KEYS = ("grad_sq_norm_per_tensor", "trace_cov_per_tensor", "b_simple_per_tensor",
                   "last_grad_sq_norm_per_tensor")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_parameters_and_buffers_match_single_process(ranks, single_process, scenario):
    want = single_process[SCENARIOS[scenario]]
    for rank in range(WORLD):
        got = ranks[rank][scenario]
        for key in ("params", "bufs"):
            for g, w in zip(got[key], want[key], strict=True):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_statistics_match_single_process(ranks, single_process, scenario):
    want = single_process[SCENARIOS[scenario]]["stats"]
    assert want["updates"] == STEPS and want["trace_cov"] > 0  # the oracle sees noise: a real comparison
    for rank in range(WORLD):
        got = ranks[rank][scenario]["stats"]
        assert got["updates"] == STEPS
        for key in STAT_KEYS + PER_TENSOR_KEYS:
            # Per-example norms have no per-tensor split: their per-tensor estimates are NaN.
            assert got[key] == pytest.approx(want[key], rel=1e-5, nan_ok=True), key
    if SCENARIOS[scenario] == "accumulate":
        assert all(math.isfinite(v) for key in PER_TENSOR_KEYS for v in want[key])


def test_overflow_on_one_rank_skips_the_step_on_every_rank(ranks):
    for rank in range(WORLD):
        assert ranks[rank]["overflow_on_one_rank"] == {"unchanged": True, "steps": STEPS - 1, "updates": STEPS - 1}


def test_accumulate_grad_under_no_sync_measures_nothing_and_says_so(ranks, single_process):
    for rank in range(WORLD):
        got = ranks[rank]["fsdp_accumulate_no_sync"]
        assert got["stats"]["updates"] == 0  # one micro-batch seen per step: no two batch sizes
        assert len(got["warnings"]) == STEPS and "set_requires_gradient_sync(False)" in got["warnings"][0]
        for g, w in zip(got["params"], single_process["accumulate"]["params"], strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)  # the update is unaffected
        assert all(not ranks[rank][s]["warnings"] for s in SCENARIOS if s.startswith(("fsdp_acc", "tp_acc")))


def test_compiled_step_traces_the_statistics_collective(ranks):
    # The one break is torch.optim's own (Optimizer.step's profiling hook); a collective with
    # async_op=True or a Work.wait() would add theirs.
    for rank in range(WORLD):
        assert ranks[rank]["fsdp_accumulate_compiled"]["graph_breaks"] == ["Call to `torch._dynamo.graph_break()`"]


def test_layouts_are_the_sharded_ones(ranks):
    # Guards the comparisons above: the parameters really were DTensors laid out as intended.
    got = ranks[0]
    assert all(pl == ("Shard(dim=0)",) for pl in got["fsdp_per_example"]["placements"])
    assert all(pl == ("Replicate()", "Shard(dim=0)") for pl in got["hsdp_per_example"]["placements"])
    tp = got["tp_accumulate"]["placements"]
    assert tp[0] == ("Shard(dim=0)",) and tp[2] == ("Shard(dim=1)",) and tp[3] == ("Replicate()",)


def test_op_rule_runs_on_local_shards(ranks):
    for rank in range(WORLD):
        assert ranks[rank]["bad_input"]["op_local"] is True
        assert ranks[rank]["bad_input"]["twin_local"] is True


BAD_INPUT = {
    "op_mixed": "TypeError: fastscale ops take all DTensors or no DTensors in their tensor lists; entry 0",
    "twin_mixed": "TypeError: fastscale ops take all DTensors or no DTensors in their tensor lists; entry 0",
    "op_layouts": "ValueError: fastscale ops need entry 0 of every list laid out alike, got placements "
                  "['(Shard(dim=0))', '(Replicate())']",
    "twin_layouts": "ValueError: fastscale ops need entry 0 of every list laid out alike",
    "mixed": "TypeError: FusedScaledSGD: parameter 1 is a plain tensor but parameter 0 is a DTensor",
    "two_meshes_one_group": "ValueError: FusedScaledSGD: parameter 1 is on device mesh",
    "add_group_other_mesh": "ValueError: FusedScaledSGD: parameter",
    "add_group_plain": "TypeError: FusedScaledSGD: parameter",
    "batch_not_divisible": "ValueError: the batch size 15 is not divisible by the 2 data-parallel ranks",
    "batch_mismatch": "ValueError: 8 examples on each of 2 data-parallel ranks make 16, but the optimizer's "
                      "batch_size is 18",
    "grad_layout": "ValueError: the gradient of parameter 5 is a DTensor (Replicate()) on DeviceMesh((2,), 'cpu', "
                   "stride=(1,)), the parameter is a DTensor (Shard(dim=0))",
    "per_example_tp": "ValueError: per-example norms on the mesh",
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_raises_a_clear_error(ranks, case):
    for rank in range(WORLD):
        got = ranks[rank]["bad_input"]
        assert got[case] is not None and got[case].startswith(BAD_INPUT[case]), got[case]
        if case + "_unchanged" in got:
            assert got[case + "_unchanged"] is True


def test_per_rank_norms_without_dtensors_raise_and_record_nothing():
    params = [torch.randn(4, 3, requires_grad=True)]
    params[0].grad = torch.randn(4, 3)
    opt = make_optimizer(params)
    with pytest.raises(ValueError, match=r"small-batch norms per rank need DTensor \(FSDP2/HSDP\) parameters"):
        opt.observe_small_batch_norms(torch.rand(1) + 0.5, 2, 8, per_rank=True)
    with pytest.raises(TypeError, match="per_rank must be a bool"):
        opt.observe_small_batch_norms(torch.rand(1) + 0.5, 2, 8, per_rank=1)
    assert not opt.statistics.pending
    opt.observe_small_batch_norms(torch.rand(1) + 0.5, 2, 8)  # the step's source is still free


# The default source only (~10 s a launch); the accumulate source's calls are the parity tests'.
@pytest.mark.parametrize("source", ["per_example"])
def test_fsdp_example_runs_under_torchrun(source):
    import re
    import socket
    import subprocess

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={port}", os.path.join(root, "examples", "fsdp_noise_scale.py"), "--source", source,
         "--steps", "50"],
        env=env, capture_output=True, text=True, timeout=JOIN_TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    found = re.search(r"step 50: .*B_simple=([0-9.]+) \(global batch 64", run.stdout)
    assert found and 5 < float(found.group(1)) < 500, run.stdout  # a finite, plausible estimate


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    gloo_rank(sys.argv[2], _scenarios, PG_TIMEOUT_S)
