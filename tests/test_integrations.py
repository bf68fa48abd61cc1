"""Integrations (fastscale.integrations): Lightning, the Hugging Face Trainer, loggers, DDP closures.

Every framework run is held to a plain loop over the same batches: the same estimate (rtol
1e-5), the same parameters, and the logged lr equal to the rate each step applied. The
2-process runs (Lightning's DDP strategy, plain DDP with and without ``step(closure)``) share
one launch of two gloo processes; run as a script (``--worker OUT``) this file is the per-rank
program. Framework tests skip with one reason when the framework is not installed.
"""

import datetime
import math
import os
import sys
import warnings

import pytest
import torch

import fastscale
from conftest import launch_ranks

DIM, MICRO, STEPS, WORLD = 6, 4, 6, 2
OPT = dict(lr=0.02, momentum=0.9)
NOISE = dict(beta=0.5, min_updates=1)
STAT_KEYS = ("grad_sq_norm", "trace_cov", "b_simple", "b_simple_low", "b_simple_high")

warnings.filterwarnings("ignore", message="fastscale: no compiled kernel")


def make_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def make_optimizer(params, **extra):
    extra = {"warmup_steps": 4, "warmup_start_factor": 0.25, **extra}  # the applied lr moves, group["lr"] does not
    return fastscale.FusedScaledSGD(params, **OPT, noise_scale=fastscale.NoiseScaleConfig(**NOISE), **extra)


def make_data(n):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, DIM, generator=g)
    return x, 3 * x[:, :1] + 1 + torch.randn(n, 1, generator=g)


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _batches(x, y, k, offset=0, stride=1):
    """Micro-batches of MICRO rows: step s, micro-batch i takes block (s·k + i)·stride + offset."""
    return [[(x[sl], y[sl]) for i in range(k)
             for sl in [slice(((s * k + i) * stride + offset) * MICRO, ((s * k + i) * stride + offset + 1) * MICRO)]]
            for s in range(STEPS)]


def _figures(opt):
    stats = opt.gradient_stats()
    return {key: stats[key] for key in STAT_KEYS} | {"ready": stats["ready"], "updates": stats["updates"]}


def plain_loop(k, source="accumulate"):
    """The oracle: one process, the same batches; figures after every step, and each step's applied lr."""
    x, y = make_data(STEPS * k * MICRO)
    model = make_model()
    opt = make_optimizer(model.parameters())
    norms = fastscale.PerExampleGradNorms(model) if source == "per_example" else None
    lrs, after = [], []
    for micro_batches in _batches(x, y, k):
        lrs.append(opt.current_lr()[0])
        opt.zero_grad()
        for xb, yb in micro_batches:
            (loss_fn(model, xb, yb) / k).backward()
            if source == "accumulate":
                opt.accumulate_grad(batch_size=MICRO, loss_scale=1 / k)
            else:
                opt.observe_per_example_norms(norms.squared_norms())
        opt.step()
        after.append(_figures(opt))
    lrs.append(opt.current_lr()[0])  # the rate a next step would apply
    return {"params": [p.detach().clone() for p in model.parameters()], "lrs": lrs, "after": after}


def assert_same_estimate(got, want):
    assert want["updates"] == STEPS and got["updates"] == STEPS
    for key in STAT_KEYS:
        assert math.isfinite(want[key]) and want[key] != 0, key
        assert got[key] == pytest.approx(want[key], rel=1e-5), key


# =========================================================================== logging helper
def test_figures_are_device_tensors_equal_to_gradient_stats():
    from fastscale.integrations.logging import figures

    x, y = make_data(STEPS * 2 * MICRO)
    model = make_model()
    opt = make_optimizer(model.parameters(), batch_size=2 * MICRO, base_batch_size=MICRO, warmup_steps=10)
    for micro_batches in _batches(x, y, 2):
        opt.zero_grad()
        for xb, yb in micro_batches:
            (loss_fn(model, xb, yb) / 2).backward()
            opt.accumulate_grad(loss_scale=0.5)
        lr_before = opt.applied_lr()
        opt.step()
    got = figures(opt, prefix="train/")
    assert all(isinstance(v, torch.Tensor) and v.numel() == 1 for v in got.values())
    want = opt.gradient_stats()
    for key in STAT_KEYS:
        assert got["train/" + key].item() == pytest.approx(want[key], rel=1e-9), key
    assert got["train/noise_scale_ready"].item() == float(want["ready"])
    assert got["train/lr"].item() == pytest.approx(opt.current_lr()[0], rel=1e-12)  # the next step's rate
    assert figures(opt, applied_lr=lr_before)["lr"].item() == lr_before[0].item() != got["train/lr"].item()


def test_figures_name_each_group_and_reject_other_optimizers():
    from fastscale.integrations.logging import figures

    a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    opt = fastscale.FusedScaledSGD([{"params": a.parameters()}, {"params": b.parameters(), "lr": 0.5}], lr=0.1)
    got = figures(opt)
    assert sorted(got) == ["lr/group0", "lr/group1"]  # no estimator: no noise figures
    assert got["lr/group1"].item() == pytest.approx(0.5)
    with pytest.raises(TypeError, match="expected a fastscale.FusedScaledSGD .* got SGD"):
        figures(torch.optim.SGD(a.parameters(), lr=0.1))


# =========================================================================== Lightning
def _lightning():
    return pytest.importorskip("lightning.pytorch", reason="lightning is not installed (pip install fastscale[lightning])")


def _lightning_run(k, manual=False, log_every=2, strategy="auto", devices=1, rank=0, source="auto", monitor=None):
    """Train with lightning.Trainer; returns the optimizer's figures, params, and what was logged."""
    L = _lightning()
    from torch.utils.data import DataLoader, TensorDataset

    from fastscale.integrations.lightning import NoiseScaleCallback

    x, y = make_data(STEPS * k * MICRO * devices)
    # Each rank its own blocks (rank r: blocks r, r+W, ...), as the DDP oracle below splits them.
    rows = torch.cat([torch.arange(b * MICRO, (b + 1) * MICRO) for b in range(rank, STEPS * k * devices, devices)])

    class Captured(L.loggers.Logger):
        name, version = "captured", 0

        def __init__(self):
            super().__init__()
            self.rows = []

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, dict(metrics)))

        def log_hyperparams(self, *args, **kwargs):
            pass

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()
            self.automatic_optimization = not manual

        def training_step(self, batch, batch_idx):
            loss = loss_fn(self.net, *batch)
            if not manual:
                return loss
            opt = self.optimizers()  # Lightning's wrapper: fastscale's methods must reach our optimizer
            self.manual_backward(loss / k)
            opt.accumulate_grad(batch_size=MICRO, loss_scale=1 / k)
            if (batch_idx + 1) % k == 0:
                opt.step()
                opt.zero_grad()

        def configure_optimizers(self):
            return make_optimizer(self.parameters())

        def log(self, name, value, *args, **kwargs):
            if name.startswith("fastscale/"):
                log_calls.append(name)  # the callback computes and logs at the logging interval only
            return super().log(name, value, *args, **kwargs)

        def train_dataloader(self):
            return DataLoader(TensorDataset(x[rows], y[rows]), batch_size=MICRO, shuffle=False)

    log_calls = []
    callback = NoiseScaleCallback(source="none" if manual else source)
    logger = Captured()
    trainer = L.Trainer(
        max_steps=STEPS, accumulate_grad_batches=1 if manual else k, accelerator="cpu", devices=devices,
        strategy=strategy, logger=logger, log_every_n_steps=log_every, callbacks=[callback, *([monitor] if monitor else [])],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False,
    )
    module = Module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    opt = callback.optimizer
    return {"params": [p.detach().clone() for p in module.net.parameters()], "after": _figures(opt),
            "logged": logger.rows, "steps": trainer.global_step, "log_calls": log_calls}


def _assert_logged(logged, want, log_every, batches_per_step=None):
    """Logged at the interval only, after the step; each figure as the plain loop had it then.
    ``batches_per_step``: manual optimization, where Lightning's logging interval counts batches."""
    ours = [(step, m) for step, m in logged if any(k.startswith("fastscale/") for k in m)]
    if batches_per_step is None:
        expected, steps_done = [s for s in range(STEPS) if (s + 1) % log_every == 0], lambda s: s + 1
    else:
        n = STEPS * batches_per_step
        expected = [b for b in range(n) if (b + 1) % log_every == 0 and b + 1 >= batches_per_step]
        steps_done = lambda b: (b + 1) // batches_per_step  # noqa: E731
    assert [step for step, _ in ours] == expected
    assert len({want["lrs"][steps_done(step) - 1] for step, _ in ours}) > 1  # a moving rate is compared
    for step, metrics in ours:
        truth = want["after"][steps_done(step) - 1]
        assert metrics["fastscale/lr"] == pytest.approx(want["lrs"][steps_done(step) - 1], rel=1e-6)
        for key in ("grad_sq_norm", "trace_cov"):
            assert metrics["fastscale/" + key] == pytest.approx(truth[key], rel=1e-5), (step, key)
        if truth["ready"]:
            for key in ("b_simple", "b_simple_low", "b_simple_high"):
                assert metrics["fastscale/" + key] == pytest.approx(truth[key], rel=1e-5), (step, key)
        else:  # not the last ready value: NaN until ready
            assert all(math.isnan(metrics["fastscale/" + k]) for k in ("b_simple", "b_simple_low", "b_simple_high"))
    assert any(math.isfinite(m["fastscale/b_simple_low"]) for _, m in ours)


@pytest.fixture(scope="module")
def oracle():
    return {1: plain_loop(1, "per_example"), 4: plain_loop(4)}


@pytest.mark.parametrize("k", [4, 1], ids=["accumulate_grad_batches=4", "no_accumulation"])
def test_lightning_estimate_and_logs_equal_the_plain_loop(oracle, k):
    got = _lightning_run(k)
    want = oracle[k]
    assert got["steps"] == STEPS
    assert_same_estimate(got["after"], want["after"][-1])
    for a, b in zip(got["params"], want["params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    _assert_logged(got["logged"], want, log_every=2)
    assert len(got["log_calls"]) == 6 * (STEPS // 2)  # 6 figures, every second step


def test_lightning_manual_optimization_through_the_wrapper(oracle):
    # self.optimizers().accumulate_grad() / .step() / .zero_grad() on Lightning's wrapper
    got = _lightning_run(4, manual=True, log_every=3)
    assert_same_estimate(got["after"], oracle[4]["after"][-1])
    _assert_logged(got["logged"], oracle[4], log_every=3, batches_per_step=4)


def test_lightning_lr_monitor_shows_the_applied_rate(oracle):
    # fastscale's LearningRateMonitor logs, where the stock one logs group["lr"] (0.02 throughout),
    # the rate the next step applies: each logged value is the plain loop's rate for that step.
    L = _lightning()
    from fastscale.integrations.lightning import LearningRateMonitor

    want = oracle[4]["lrs"]
    for cls, expect in ((LearningRateMonitor, lambda s: want[s]), (L.callbacks.LearningRateMonitor, lambda s: OPT["lr"])):
        monitor = cls(logging_interval="step")
        got = _lightning_run(4, log_every=1, monitor=monitor)
        shown = [(step, m["lr-FusedScaledSGD"]) for step, m in got["logged"] if "lr-FusedScaledSGD" in m]
        # at each batch's start (4 per step), tagged with the steps done so far
        assert [step for step, _ in shown] == [s for s in range(STEPS) for _ in range(4)], cls
        for step, value in shown:
            assert value == pytest.approx(expect(step), rel=1e-6), (cls, step)
        assert monitor.lrs["lr-FusedScaledSGD"] == [v for _, v in shown]
    assert len(set(want[:STEPS])) > 1 and want[0] != OPT["lr"]  # a moving rate, not group["lr"] in warmup


def test_lightning_wrapper_runs_fastscale_methods_on_the_optimizer():
    _lightning()
    from lightning.pytorch.core.optimizer import LightningOptimizer

    from fastscale.integrations.lightning import _forward_fastscale_methods

    a, b = torch.nn.Linear(2, 1), torch.nn.Linear(3, 1)
    opt = make_optimizer(a.parameters())
    wrapper = LightningOptimizer(opt)
    _forward_fastscale_methods(wrapper, opt)  # what NoiseScaleCallback does at on_fit_start
    wrapper.add_param_group({"params": b.parameters()})  # replaces the optimizer's statistics tracker
    assert "statistics" not in vars(wrapper)  # not a copy on the wrapper...
    assert len(opt.statistics.params) == 4  # ...but on the optimizer, which now tracks b too
    assert wrapper.gradient_stats()["steps"] == 0


def test_lightning_callback_rejects_bad_arguments():
    _lightning()
    from fastscale.integrations.lightning import NoiseScaleCallback

    with pytest.raises(ValueError, match="source must be one of"):
        NoiseScaleCallback(source="replicas")
    with pytest.raises(ValueError, match="batch_size must be a positive int or None, got 0"):
        NoiseScaleCallback(batch_size=0)


# =========================================================================== Hugging Face Trainer
HF_K, HF_SEQ = 4, 5


def _tiny_bert():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install fastscale[hf])")
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install fastscale[hf])")
    config = transformers.BertConfig(
        vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, num_labels=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(3)
    return transformers.BertForSequenceClassification(config)  # num_labels=1: regression, mean MSE


def _hf_data():
    g = torch.Generator().manual_seed(4)
    n = STEPS * HF_K * MICRO
    ids = torch.randint(0, 32, (n, HF_SEQ), generator=g)
    labels = (ids[:, 0] % 5).float() + torch.randn(n, generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(HF_SEQ, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def _hf_optimizer(model):
    # our warmup and batch-size scaling: the applied lr differs from group["lr"] and moves
    return make_optimizer(model.parameters(), batch_size=HF_K * MICRO, base_batch_size=MICRO, warmup_start_factor=None)


def _hf_plain_loop(model, data):
    opt = _hf_optimizer(model)
    lrs, after = [], []
    for s in range(STEPS):
        lrs.append(opt.current_lr()[0])
        opt.zero_grad()
        for i in range(HF_K):
            rows = data[(s * HF_K + i) * MICRO:(s * HF_K + i + 1) * MICRO]
            batch = {key: torch.stack([r[key] for r in rows]) for key in rows[0]}
            (model(**batch).loss / HF_K).backward()
            opt.accumulate_grad(batch_size=MICRO, loss_scale=1 / HF_K)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the Trainer's default max_grad_norm
        opt.step()
        after.append(_figures(opt))
    lrs.append(opt.current_lr()[0])  # the rate a next step would apply
    return {"params": [p.detach().clone() for p in model.parameters()], "lrs": lrs, "after": after}


def _hf_trainer(model, data, tmp_path, accepts_loss_kwargs=False):
    import transformers
    from torch.utils.data import SequentialSampler

    from fastscale.integrations.hf import NoiseScaleTrainer

    class Sequential(NoiseScaleTrainer):  # the plain loop's batch order
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    class Record(transformers.TrainerCallback):
        rows = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.rows.append((state.global_step, dict(logs)))

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=STEPS, per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=HF_K, logging_steps=2, save_strategy="no", disable_tqdm=True,
        lr_scheduler_type="constant", dataloader_num_workers=0, seed=0,
    )
    trainer = Sequential(model=model, args=args, train_dataset=data, optimizers=(_hf_optimizer(model), None),
                         callbacks=[Record()])
    if not accepts_loss_kwargs:
        trainer.model_accepts_loss_kwargs = False  # a mean loss per micro-batch, divided by the Trainer
    return trainer, Record.rows


def test_hf_trainer_estimate_and_logs_equal_the_plain_loop(tmp_path):
    model = _tiny_bert()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    data = _hf_data()
    trainer, logged = _hf_trainer(model, data, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    got_params = [p.detach().clone() for p in trainer.model.parameters()]
    got = _figures(trainer._fastscale_opt)
    oracle_model = _tiny_bert()
    oracle_model.load_state_dict(initial)
    want = _hf_plain_loop(oracle_model, data)
    assert_same_estimate(got, want["after"][-1])
    for a, b in zip(got_params, want["params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ours = [(step, m) for step, m in logged if "fastscale/lr" in m]
    assert [step for step, _ in ours] == [s for s in range(1, STEPS + 1) if s % 2 == 0]
    assert len(set(want["lrs"])) > 1  # the warmup moves the applied rate
    assert want["lrs"][-1] == pytest.approx(HF_K * OPT["lr"])  # the batch-size scale, not group["lr"]
    assert max(m.get("grad_norm", 0) for _, m in logged) > 1.0  # max_grad_norm=1.0 clipped some steps
    for step, metrics in ours:
        truth = want["after"][step - 1]
        assert metrics["fastscale/lr"] == pytest.approx(want["lrs"][step - 1], rel=1e-6)
        # the Trainer's own key, read after its scheduler stepped: the applied rate of the next step
        assert metrics["learning_rate"] == pytest.approx(want["lrs"][step], rel=1e-6)
        for key in STAT_KEYS if truth["ready"] else ("grad_sq_norm", "trace_cov"):
            assert metrics["fastscale/" + key] == pytest.approx(truth[key], rel=1e-5), (step, key)
        if not truth["ready"]:
            assert math.isnan(metrics["fastscale/b_simple"])


def test_hf_trainer_refuses_a_loss_normalised_by_items(tmp_path):
    model = _tiny_bert()
    trainer, _ = _hf_trainer(model, _hf_data(), tmp_path, accepts_loss_kwargs=True)
    trainer.model_accepts_loss_kwargs = True
    with pytest.raises(NotImplementedError, match="normalised by num_items_in_batch"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()


# =========================================================================== 2 processes (gloo)
def _plain_ddp(rank, k, closure):
    """Plain DDP loop with fastscale's hook; ``closure``: the backward runs inside step(closure)."""
    from fastscale.distributed import register_noise_scale_hook

    x, y = make_data(STEPS * k * MICRO * WORLD)
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    opt = make_optimizer(model.parameters())
    register_noise_scale_hook(model, opt, local_batch_size=k * MICRO)
    lrs = []
    for micro_batches in _batches(x, y, k, offset=rank, stride=WORLD):
        lrs.append(opt.current_lr()[0])
        opt.zero_grad()
        for xb, yb in micro_batches[:-1]:
            with model.no_sync():
                (loss_fn(model, xb, yb) / k).backward()
        xb, yb = micro_batches[-1]

        def last_backward():
            loss = loss_fn(model, xb, yb) / k
            loss.backward()
            return loss

        if closure:
            opt.step(last_backward)
        else:
            last_backward()
            opt.step()
    return {"params": [p.detach().clone() for p in model.module.parameters()], "after": _figures(opt), "lrs": lrs}


def _worker(out_dir):
    import torch.distributed as dist

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    results = {"plain": _plain_ddp(rank, 2, closure=False), "closure": _plain_ddp(rank, 2, closure=True)}
    try:
        from lightning.pytorch.strategies import DDPStrategy
    except ImportError:
        results["lightning"] = None
    else:
        results["plain_k1"] = _plain_ddp(rank, 1, closure=False)
        for k in (2, 1):
            results[f"lightning_k{k}"] = _lightning_run(
                k, strategy=DDPStrategy(process_group_backend="gloo"), devices=WORLD, rank=rank)
    dist.barrier()  # every rank done with collectives before any tears its group down
    dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    # torchelastic's variables: Lightning then joins this launch instead of spawning its own.
    return launch_ranks(__file__, tmp_path_factory.mktemp("ddp"), WORLD, 150, LOCAL_WORLD_SIZE=str(WORLD),
                        GROUP_RANK="0", TORCHELASTIC_RUN_ID="fastscale-test")


def test_ddp_step_with_closure_feeds_the_estimator(ranks):
    for rank in ranks:
        assert_same_estimate(rank["closure"]["after"], rank["plain"]["after"])
        for a, b in zip(rank["closure"]["params"], rank["plain"]["params"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [2, 1], ids=["accumulate_grad_batches=2", "no_accumulation"])
def test_lightning_ddp_estimate_equals_the_plain_ddp_loop(ranks, k):
    _lightning()
    if ranks[0].get(f"lightning_k{k}") is None:
        pytest.skip("lightning is not installed in the worker's environment")
    plain = "plain" if k == 2 else "plain_k1"
    for rank in ranks:
        got, want = rank[f"lightning_k{k}"], rank[plain]
        assert got["steps"] == STEPS
        assert_same_estimate(got["after"], want["after"])
        for a, b in zip(got["params"], want["params"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        logged = [(step, m["fastscale/lr"]) for step, m in got["logged"] if "fastscale/lr" in m]
        assert [step for step, _ in logged] == [s for s in range(STEPS) if (s + 1) % 2 == 0]
        assert [lr for _, lr in logged] == pytest.approx([want["lrs"][step] for step, _ in logged], rel=1e-6)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2])
