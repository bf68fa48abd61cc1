"""Training runs: a from-scratch run under a scaling rule, a reference ("trunk") run that keeps
checkpoints, and a branch continued from a checkpoint at a fixed batch size and learning rate.

The from-scratch and trunk runs split each batch into micro-batches (2 by default) whose
gradients accumulate in .grad; ``opt.accumulate_grad`` takes each micro-batch's squared norm on
the way, so the optimizer's noise-scale estimator sees B_small = B/2 and B_big = B at no extra
backward pass (McCandlish et al. 2018, App. A). With ``noise_source="per-example"`` it uses
fastscale.PerExampleGradNorms instead (B_small = 1). Branches need no estimate: one backward per
step, no statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import fastscale
from fastscale import FusedScaledSGD, NoiseScaleConfig

from .tasks import StudyError

FUSED = {"auto": None, "native": True, "torch": False}  # --impl, in torch's flag


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


ONLINE_KEYS = ("b_simple", "b_simple_low", "b_simple_high", "b_simple_stderr")


def read_online(opt) -> dict:
    """The optimizer's online estimate with whatever error bars this fastscale reports: the
    interval keys and ``ready``/``not_ready`` are read with ``.get`` (None where absent)."""
    stats = opt.gradient_stats()
    out = {}
    for key in ONLINE_KEYS:
        value = stats.get(key)
        out[key] = float(value) if value is not None and math.isfinite(value) else None
    out["ready"] = stats.get("ready")
    out["not_ready"] = stats.get("not_ready")
    return out


def _noisy_optimizer(model, batch_size: int, rule: str, cfg: RunConfig, lr: float | None = None):
    beta = noise_beta_for(batch_size, cfg)
    opt = FusedScaledSGD(
        model.parameters(),
        lr=cfg.lr if lr is None else lr,
        momentum=cfg.momentum,
        batch_size=batch_size,
        base_batch_size=cfg.base_batch_size,
        scaling=rule,
        warmup_steps=warmup_steps_for(batch_size, rule, cfg),
        noise_fallback=cfg.noise_fallback,
        noise_scale=NoiseScaleConfig(beta=beta, per_tensor=False, min_updates=cfg.noise_min_updates),
        fused=FUSED[cfg.impl],
    )
    return opt, beta


class _MeasuredStep:
    """One optimizer step whose small-batch norms feed the noise-scale estimate."""

    def __init__(self, task, model, opt, batch_size: int, cfg: RunConfig):
        self.task, self.model, self.opt, self.batch_size = task, model, opt, batch_size
        self.per_example = _per_example_norms(model) if cfg.noise_source == "per-example" else None
        self.sizes = [batch_size] if self.per_example is not None else _split(batch_size, cfg.micro_batches)

    def __call__(self, generator: torch.Generator) -> None:
        task, model, opt = self.task, self.model, self.opt
        opt.zero_grad()
        if self.per_example is not None:
            with self.per_example:
                task.loss(model, task.sample(generator, self.batch_size)).backward()
                opt.observe_per_example_norms(self.per_example.squared_norms())
        else:
            for size in self.sizes:
                share = size / self.batch_size  # .grad ends as the mean gradient over the whole batch
                (task.loss(model, task.sample(generator, size)) * share).backward()
                opt.accumulate_grad(batch_size=size, loss_scale=share)
        opt.step()


def _fresh_model(task, state: dict, seed: int):
    torch.manual_seed(seed)  # dropout
    model = task.make_model()
    model.load_state_dict(state)
    model.train()
    return model


# ----------------------------------------------------------------- from scratch, under a rule
def train_run(task, init_state: dict, batch_size: int, rule: str, cfg: RunConfig, seed: int, target_loss: float) -> dict:
    """Train from ``init_state`` and return the run's curves and summary (plain Python numbers)."""
    generator = torch.Generator().manual_seed(seed)  # batches
    model = _fresh_model(task, init_state, seed)
    opt, beta = _noisy_optimizer(model, batch_size, rule, cfg)
    warmup = warmup_steps_for(batch_size, rule, cfg)
    step_fn = _MeasuredStep(task, model, opt, batch_size, cfg)
    true_stats = getattr(task, "true_stats", None)
    truth_ema = {"g2": 0.0, "trace": 0.0, "weight": 0.0}  # the estimator's EMA applied to the truth

    curve = {k: [] for k in ("steps", "examples", "loss", "accuracy", "b_simple", "lr")}
    if true_stats is not None:
        curve.update(b_simple_true=[], b_simple_true_ema=[], b_noise_true=[])

    def record(steps: int) -> float:
        ev = task.evaluate(model)
        curve["steps"].append(steps)
        curve["examples"].append(steps * batch_size)
        curve["loss"].append(ev["loss"])
        curve["accuracy"].append(ev["accuracy"])
        b_simple = read_online(opt)["b_simple"] if steps > 0 else None  # no not-ready warning
        curve["b_simple"].append(math.nan if b_simple is None else b_simple)
        curve["lr"].append(opt.current_lr()[0])
        if true_stats is not None:
            t = true_stats(model)
            curve["b_simple_true"].append(t["b_simple"])
            curve["b_noise_true"].append(t["b_noise"])
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
        if true_stats is not None:  # at the parameters this step's gradient is taken at
            t = true_stats(model)
            for key in ("g2", "trace"):
                truth_ema[key] = beta * truth_ema[key] + (1 - beta) * t["grad_sq_norm" if key == "g2" else "trace_cov"]
            truth_ema["weight"] = beta * truth_ema["weight"] + (1 - beta)
        step_fn(generator)
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
        "micro_batches": len(step_fn.sizes),
        "noise_beta": beta,
        "steps": steps,
        "examples": steps * batch_size,
        "diverged": diverged,
        "final_loss": curve["loss"][-1],
        "final_accuracy": curve["accuracy"][-1],
        "final_lr": curve["lr"][-1],
        "curve": curve,
    }


# ----------------------------------------------------------------- the reference run, with checkpoints
def trunk_run(task, init_state: dict, batch_size: int, cfg: RunConfig, seed: int, checkpoints: list[int],
              keep_states: bool) -> dict:
    """Train at ``batch_size`` with the base lr (no scaling, no warmup) up to the last of
    ``checkpoints`` (examples seen), recording the held-out loss and the online B_simple (with its
    interval where the optimizer reports one). At each checkpoint record the online estimate, the
    truth where the task knows it, and (``keep_states``) the model's weights to branch from."""
    generator = torch.Generator().manual_seed(seed)
    model = _fresh_model(task, init_state, seed)
    opt, beta = _noisy_optimizer(model, batch_size, "none", cfg)
    step_fn = _MeasuredStep(task, model, opt, batch_size, cfg)
    true_stats = getattr(task, "true_stats", None)
    at_step = {max(1, round(e / batch_size)): e for e in checkpoints}
    last = max(at_step)
    eval_every = max(1, round(cfg.eval_every_examples / batch_size))
    curve = {k: [] for k in ("steps", "examples", "loss", *ONLINE_KEYS)}
    if true_stats is not None:
        curve.update(b_simple_true=[], b_noise_true=[])
    points = []

    def record(steps: int) -> tuple[float, dict]:
        loss = task.evaluate(model)["loss"]
        online = read_online(opt) if steps > 0 else {k: None for k in (*ONLINE_KEYS, "ready", "not_ready")}
        curve["steps"].append(steps)
        curve["examples"].append(steps * batch_size)
        curve["loss"].append(loss)
        for key in ONLINE_KEYS:
            curve[key].append(online[key])
        truth = None
        if true_stats is not None:
            t = true_stats(model)
            truth = {"b_simple": t["b_simple"], "b_noise": t["b_noise"]}
            curve["b_simple_true"].append(t["b_simple"])
            curve["b_noise_true"].append(t["b_noise"])
        return loss, online, truth

    record(0)
    for steps in range(1, last + 1):
        step_fn(generator)
        if steps % eval_every == 0 or steps in at_step:
            loss, online, truth = record(steps)
            if steps in at_step:
                point = {"examples": steps * batch_size, "requested_examples": at_step[steps], "step": steps,
                         "loss": loss, "online": online, "truth": truth}
                if keep_states:
                    point["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
                points.append(point)
    return {"batch_size": batch_size, "seed": seed, "lr": cfg.lr, "noise_beta": beta, "steps": last,
            "curve": curve, "points": points}


# ----------------------------------------------------------------- a branch from a checkpoint
def crossing_step(steps: list[float], losses: list[float], target: float) -> float | None:
    """Steps at which the loss first falls to ``target``, interpolated linearly between the two
    evaluations around the crossing (0 if it starts there); None if it never does."""
    for i, value in enumerate(losses):
        if not math.isfinite(value):
            return None
        if value <= target:
            if i == 0:
                return float(steps[0])
            hi = losses[i - 1]
            t = (hi - target) / (hi - value) if hi != value else 1.0
            return steps[i - 1] + t * (steps[i] - steps[i - 1])
    return None


SMOOTH = 2  # the loss a branch is judged by: a centred mean over 2·SMOOTH + 1 evaluations


def smoothed(values: list[float], k: int = SMOOTH) -> list[float]:
    """Centred moving average over up to 2k + 1 values, the window shrunk symmetrically at the
    ends (so the first value, the branch point, is kept and nothing lags a steady trend).

    The held-out loss of a small-batch run fluctuates with its noisy weights; the first time a
    raw curve dips under a target comes early by an amount that grows with that noise, i.e. most
    at the smallest batch size, which would bias the examples ratio of every larger batch up."""
    n, out = len(values), []
    for i in range(n):
        m = min(k, i, n - 1 - i)
        window = values[i - m:i + m + 1]
        out.append(sum(window) / len(window) if all(math.isfinite(v) for v in window) else math.inf)
    return out


def branch_steps_to_target(curve: dict, target: float, k: int = SMOOTH) -> float | None:
    """Steps to ``target`` by the smoothed held-out loss (see :func:`smoothed`)."""
    return crossing_step(curve["steps"], smoothed(curve["loss"], k), target)


def branch_run(task, state: dict, batch_size: int, lr: float, momentum: float, seed: int, max_steps: int,
               eval_every: int, target: float | None, divergence_loss: float, impl: str, smooth: int = SMOOTH) -> dict:
    """Continue from ``state`` at ``batch_size`` and a constant ``lr`` (a fresh optimizer: no
    momentum carried over, no scaling, no warmup, no statistics) for at most ``max_steps`` steps.
    With a ``target`` the run stops once the smoothed loss (a centred mean over 2·smooth + 1
    evaluations) has reached it, i.e. ``smooth`` evaluations after it did; it stops as diverged
    when the held-out loss is not finite or exceeds ``divergence_loss``."""
    generator = torch.Generator().manual_seed(seed)
    model = _fresh_model(task, state, seed)
    opt = FusedScaledSGD(model.parameters(), lr=lr, momentum=momentum, scaling="none", fused=FUSED[impl])
    true_stats = getattr(task, "true_stats", None)
    curve = {"steps": [], "loss": []}
    if true_stats is not None:
        curve.update(b_simple_true=[], b_noise_true=[])

    def record(steps: int) -> float:
        loss = task.evaluate(model)["loss"]
        curve["steps"].append(steps)
        curve["loss"].append(loss)
        if true_stats is not None:
            t = true_stats(model)
            curve["b_simple_true"].append(t["b_simple"])
            curve["b_noise_true"].append(t["b_noise"])
        return loss

    record(0)
    diverged = False
    steps = 0
    while steps < max_steps:
        opt.zero_grad()
        task.loss(model, task.sample(generator, batch_size)).backward()
        opt.step()
        steps += 1
        if steps % eval_every == 0 or steps == max_steps:
            loss = record(steps)
            if not math.isfinite(loss) or loss > divergence_loss:
                diverged = True
                break
            tail = curve["loss"][-(2 * smooth + 1):]
            if target is not None and len(curve["loss"]) > 2 * smooth and sum(tail) / len(tail) <= target:
                break
    hit = None if target is None else branch_steps_to_target(curve, target, smooth)
    return {"batch_size": batch_size, "lr": lr, "seed": seed, "steps": steps, "max_steps": max_steps,
            "diverged": diverged, "steps_to_target": hit, "curve": curve}
