"""One training run: a task at one batch size under one scaling rule, measured while it trains.

Each step splits the batch into micro-batches (2 by default) whose gradients accumulate in .grad;
``opt.accumulate_grad`` takes each micro-batch's squared norm on the way, so the optimizer's
noise-scale estimator sees B_small = B/2 and B_big = B at no extra backward pass (McCandlish et
al. 2018, App. A). With ``noise_source="per-example"`` it uses fastscale.PerExampleGradNorms
instead (B_small = 1), when the package has it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import fastscale
from fastscale import FusedScaledSGD, NoiseScaleConfig

from .tasks import StudyError


@dataclass(frozen=True)
class RunConfig:
    lr: float
    momentum: float
    base_batch_size: int
    warmup_examples: int  # Goyal et al. 2017 warm up over a fixed amount of data (5 epochs)
    min_warmup_steps: int  # ...but a large batch still needs a few steps to ramp over
    max_examples: int
    min_steps: int
    max_steps: int
    eval_every_examples: int
    micro_batches: int
    noise_window_examples: int  # the estimator averages over about this many examples
    noise_min_updates: int
    noise_fallback: float | None
    noise_source: str
    divergence_factor: float  # stop when the held-out loss exceeds this × the initial loss
    impl: str


def warmup_steps_for(batch_size: int, rule: str, cfg: RunConfig) -> int:
    if rule == "none" or batch_size <= cfg.base_batch_size:
        return 0  # nothing to ramp: the rate is the base rate
    return max(math.ceil(cfg.warmup_examples / batch_size), cfg.min_warmup_steps)


def noise_beta_for(batch_size: int, cfg: RunConfig) -> float:
    """EMA decay averaging over ~noise_window_examples: B/W per step, so every batch size's
    estimate rests on the same amount of data (a fixed beta would give a batch of 1024 128× more)."""
    return min(max(1.0 - batch_size / cfg.noise_window_examples, 0.5), 0.999)


def _split(batch_size: int, parts: int) -> list[int]:
    parts = max(1, min(parts, batch_size))
    sizes = [batch_size // parts] * parts
    for i in range(batch_size % parts):
        sizes[i] += 1
    return sizes


def _per_example_norms(model):
    cls = getattr(fastscale, "PerExampleGradNorms", None)
    if cls is None:
        raise StudyError("--noise-source per-example needs fastscale.PerExampleGradNorms, which this fastscale lacks")
    return cls(model, loss_reduction="mean")


def train_run(task, init_state: dict, batch_size: int, rule: str, cfg: RunConfig, seed: int, target_loss: float) -> dict:
    """Train from ``init_state`` and return the run's curves and summary (plain Python numbers)."""
    torch.manual_seed(seed)  # dropout
    generator = torch.Generator().manual_seed(seed)  # batches
    model = task.make_model()
    model.load_state_dict(init_state)
    model.train()
    warmup = warmup_steps_for(batch_size, rule, cfg)
    beta = noise_beta_for(batch_size, cfg)
    opt = FusedScaledSGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        batch_size=batch_size,
        base_batch_size=cfg.base_batch_size,
        scaling=rule,
        warmup_steps=warmup,
        noise_fallback=cfg.noise_fallback,
        noise_scale=NoiseScaleConfig(beta=beta, per_tensor=False, min_updates=cfg.noise_min_updates),
        fused={"auto": None, "native": True, "torch": False}[cfg.impl],  # --impl, in torch's flag
    )
    per_example = _per_example_norms(model) if cfg.noise_source == "per-example" else None
    sizes = [batch_size] if per_example is not None else _split(batch_size, cfg.micro_batches)
    true_stats = getattr(task, "true_stats", None)
    truth_ema = {"g2": 0.0, "trace": 0.0, "weight": 0.0}  # the estimator's EMA applied to the truth

    curve = {k: [] for k in ("steps", "examples", "loss", "accuracy", "b_simple", "lr")}
    if true_stats is not None:
        curve.update(b_simple_true=[], b_simple_true_ema=[])

    def record(steps: int) -> float:
        ev = task.evaluate(model)
        curve["steps"].append(steps)
        curve["examples"].append(steps * batch_size)
        curve["loss"].append(ev["loss"])
        curve["accuracy"].append(ev["accuracy"])
        curve["b_simple"].append(opt.noise_scale() if steps > 0 else math.nan)
        curve["lr"].append(opt.current_lr()[0])
        if true_stats is not None:
            curve["b_simple_true"].append(true_stats(model)["b_simple"])
            w = truth_ema["weight"]
            curve["b_simple_true_ema"].append(truth_ema["trace"] / truth_ema["g2"] if w > 0 else math.nan)
        return ev["loss"]

    initial_loss = record(0)
    eval_every = max(1, round(cfg.eval_every_examples / batch_size))
    # A fixed budget of examples, but at least min_steps steps: large batches need steps, not data.
    max_steps = min(cfg.max_steps, max(math.ceil(cfg.max_examples / batch_size), cfg.min_steps))
    diverged = False
    steps = 0
    while steps < max_steps:
        opt.zero_grad()
        if true_stats is not None:  # at the parameters this step's gradient is taken at
            t = true_stats(model)
            for key in ("g2", "trace"):
                truth_ema[key] = beta * truth_ema[key] + (1 - beta) * t["grad_sq_norm" if key == "g2" else "trace_cov"]
            truth_ema["weight"] = beta * truth_ema["weight"] + (1 - beta)
        if per_example is not None:
            with per_example:
                task.loss(model, task.sample(generator, batch_size)).backward()
                opt.observe_per_example_norms(per_example.squared_norms())
        else:
            for size in sizes:
                share = size / batch_size  # .grad ends as the mean gradient over the whole batch
                (task.loss(model, task.sample(generator, size)) * share).backward()
                opt.accumulate_grad(batch_size=size, loss_scale=share)
        opt.step()
        steps += 1
        if steps % eval_every == 0 or steps == max_steps:
            loss = record(steps)
            if not math.isfinite(loss) or loss > cfg.divergence_factor * initial_loss:
                diverged = True
                break
    if curve["steps"][-1] != steps:
        record(steps)
    return {
        "batch_size": batch_size,
        "rule": rule,
        "warmup_steps": warmup,
        "micro_batches": len(sizes),
        "noise_beta": beta,
        "steps": steps,
        "examples": steps * batch_size,
        "diverged": diverged,
        "final_loss": curve["loss"][-1],
        "final_accuracy": curve["accuracy"][-1],
        "final_lr": curve["lr"][-1],
        "curve": curve,
    }
