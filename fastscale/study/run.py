"""The study: every task × batch size × scaling rule, then targets, mismatches and fits."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field

import torch

from . import fit
from .tasks import StudyError, make_task
from .train import RunConfig, train_run

RULES = ("none", "linear", "sqrt", "noise")


def default_batch_sizes(max_batch: int = 1024) -> list[int]:
    """8·k for k = 1..7 and the powers of two from 8 up to ``max_batch``, sorted, no repeats."""
    ladder = {8 * k for k in range(1, 8)}
    b = 8
    while b <= max_batch:
        ladder.add(b)
        b *= 2
    return sorted(ladder)


QUICK_BATCH_SIZES = [8, 32, 128, 512]


@dataclass
class StudyConfig:
    tasks: list[str] = field(default_factory=lambda: ["digits", "lstsq"])
    model: str | None = None
    batch_sizes: list[int] = field(default_factory=default_batch_sizes)
    rules: list[str] = field(default_factory=lambda: list(RULES))
    base_batch_size: int = 8
    lr: float | None = None  # None: the task's default (tuned at the base batch size)
    momentum: float | None = None
    target_loss: float | None = None
    max_examples: int | None = None
    min_steps: int = 60
    max_steps: int = 100_000
    warmup_examples: int | None = None  # None: the task's default
    min_warmup_steps: int = 3
    eval_every_examples: int | None = None  # None: the task's default
    micro_batches: int = 2
    noise_window_examples: int | None = None  # None: the task's default
    noise_min_updates: int = 10
    noise_fallback: float | None = None  # None: the base batch size (a cautious prior)
    noise_source: str = "micro"
    divergence_factor: float = 3.0
    device: str = "cpu"
    seed: int = 0
    quick: bool = False
    impl: str = "auto"


def _run_config(cfg: StudyConfig, task) -> RunConfig:
    d = task.defaults
    return RunConfig(
        lr=d.lr if cfg.lr is None else cfg.lr,
        momentum=d.momentum if cfg.momentum is None else cfg.momentum,
        base_batch_size=cfg.base_batch_size,
        warmup_examples=d.warmup_examples if cfg.warmup_examples is None else cfg.warmup_examples,
        min_warmup_steps=cfg.min_warmup_steps,
        max_examples=cfg.max_examples or (d.quick_max_examples if cfg.quick else d.max_examples),
        min_steps=cfg.min_steps,
        max_steps=cfg.max_steps,
        eval_every_examples=cfg.eval_every_examples or d.eval_every_examples,
        micro_batches=cfg.micro_batches,
        noise_window_examples=cfg.noise_window_examples or d.noise_window_examples,
        noise_min_updates=cfg.noise_min_updates,
        noise_fallback=float(cfg.noise_fallback or cfg.base_batch_size),
        noise_source=cfg.noise_source,
        divergence_factor=cfg.divergence_factor,
        impl=cfg.impl,
    )


def _at_target(run: dict, key: str):
    """``curve[key]`` at the first evaluation at or below the target loss (None if never)."""
    idx = run.get("_target_index")
    return None if idx is None else run["curve"][key][idx]


def _summarise_run(run: dict, target: float, reference: dict) -> None:
    hit = fit.crossing(run["curve"], target)
    run["steps_to_target"], run["examples_to_target"] = (None, None) if hit is None else hit
    run["_target_index"] = next((i for i, v in enumerate(run["curve"]["loss"]) if v <= target), None)
    run["mismatch"] = fit.curve_mismatch(run["curve"], reference["curve"])
    run["b_simple_at_target"] = _at_target(run, "b_simple")
    run["b_simple_final"] = run["curve"]["b_simple"][-1]
    if "b_simple_true" in run["curve"]:
        run["b_simple_true_at_target"] = _at_target(run, "b_simple_true")
        run["b_simple_true_ema_at_target"] = _at_target(run, "b_simple_true_ema")
        run["estimator_vs_truth"] = _estimator_vs_truth(run)
    del run["_target_index"]


def _estimator_vs_truth(run: dict) -> dict:
    """Median ratios of the estimate to the truth, over evaluations once the average has filled
    (after 1/(1 − beta) steps): against the instantaneous B_simple and against the same moving
    average applied to the true |G|² and tr(Σ) -- what the estimator tracks in expectation."""
    c = run["curve"]
    start = 1.0 / (1.0 - run["noise_beta"])
    to_now, to_avg = [], []
    for s, est, now, avg in zip(c["steps"], c["b_simple"], c["b_simple_true"], c["b_simple_true_ema"]):
        if s >= start and math.isfinite(est) and math.isfinite(now) and math.isfinite(avg) and avg > 0:
            to_now.append(est / now)
            to_avg.append(est / avg)
    if not to_avg:
        return {"evaluations": 0, "median_ratio_to_truth": None, "median_ratio_to_averaged_truth": None}
    return {
        "evaluations": len(to_avg),
        "median_ratio_to_truth": statistics.median(to_now),
        "median_ratio_to_averaged_truth": statistics.median(to_avg),
    }


def _fits(runs: list[dict], rules: list[str]) -> dict:
    """The trade-off fitted per rule, and to the best rule at each batch size: the lower envelope
    over rules stands in for McCandlish et al.'s learning rate tuned per batch size."""
    out = {}
    for rule in rules:
        pts = [(r["batch_size"], r["steps_to_target"]) for r in runs if r["rule"] == rule and r["steps_to_target"]]
        out[rule] = fit.fit_tradeoff(*zip(*pts)) if pts else None
    best: dict[int, float] = {}
    for r in runs:
        s = r["steps_to_target"]
        if s and (r["batch_size"] not in best or s < best[r["batch_size"]]):
            best[r["batch_size"]] = s
    out["best"] = fit.fit_tradeoff(list(best), list(best.values())) if best else None
    out["best_points"] = [{"batch_size": b, "steps_to_target": s} for b, s in sorted(best.items())]
    return out


def run_task(name: str, cfg: StudyConfig, progress=None) -> dict:
    task = make_task(name, cfg.model if name == "digits" else None, cfg.device)  # --model picks the digits model
    run_cfg = _run_config(cfg, task)
    target = task.defaults.target_loss if cfg.target_loss is None else cfg.target_loss
    torch.manual_seed(cfg.seed)  # the same initial weights for every run
    init_state = {k: v.detach().clone() for k, v in task.make_model().state_dict().items()}
    batch_sizes = sorted(set(cfg.batch_sizes))
    runs, shared = [], {}
    for b in batch_sizes:
        for rule in cfg.rules:
            if progress is not None:
                progress.set_postfix_str(f"{name} B={b} {rule}")
            if b == cfg.base_batch_size and shared:
                # At B = B0 every rule gives the base rate and no warmup: the same run.
                run = {**next(iter(shared.values())), "rule": rule, "shared_with": next(iter(shared))}
            else:
                run = train_run(task, init_state, b, rule, run_cfg, seed=cfg.seed * 100_003 + b, target_loss=target)
                if b == cfg.base_batch_size:
                    shared[rule] = run
            runs.append(run)
            if progress is not None:
                progress.update(1)
    # Each rule's curves are compared with its own smallest-batch (k = 1) run; when that batch is
    # B0 the four references are one shared run.
    references = {rule: next(r for r in runs if r["rule"] == rule) for rule in cfg.rules}
    for run in runs:
        _summarise_run(run, target, references[run["rule"]])
    result = {
        "task": task.describe(),
        "target_loss": target,
        "settings": {k: v for k, v in asdict(run_cfg).items()},
        "batch_sizes": batch_sizes,
        "rules": list(cfg.rules),
        "reference_batch_size": batch_sizes[0],
        "runs": runs,
        "fits": _fits(runs, cfg.rules),
    }
    at_target = [r["b_simple_at_target"] for r in runs if r.get("b_simple_at_target") is not None
                 and math.isfinite(r["b_simple_at_target"]) and not r.get("shared_with")]
    result["b_simple_at_target_median"] = statistics.median(at_target) if at_target else None
    averaged = [r["b_simple_true_ema_at_target"] for r in runs if r.get("b_simple_true_ema_at_target") is not None
                and math.isfinite(r["b_simple_true_ema_at_target"]) and not r.get("shared_with")]
    if averaged:
        result["b_simple_true_averaged_at_target_median"] = statistics.median(averaged)
    if name == "lstsq":
        delta_sq = 2.0 * target - task.sigma**2  # loss = ½(|δ|² + σ²)
        result["b_simple_true_at_target"] = task.dim + 1 + task.dim * task.sigma**2 / delta_sq if delta_sq > 0 else None
    return result


def count_runs(cfg: StudyConfig) -> int:
    return len(cfg.tasks) * len(set(cfg.batch_sizes)) * len(cfg.rules)


def check_config(cfg: StudyConfig) -> None:
    if not cfg.batch_sizes:
        raise StudyError("no batch sizes given")
    for b in cfg.batch_sizes:
        if b <= 0:
            raise StudyError(f"batch sizes must be positive integers, got {b}")
    if cfg.base_batch_size <= 0:
        raise StudyError(f"--base-batch-size must be a positive integer, got {cfg.base_batch_size}")
    for rule in cfg.rules:
        if rule not in RULES:
            raise StudyError(f"unknown scaling rule {rule!r} (choose from {', '.join(RULES)})")
    if cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise StudyError(f"--device {cfg.device} was asked for but torch sees no CUDA device "
                             f"(torch {torch.__version__}, torch.cuda.is_available() is False)")
        index = torch.device(cfg.device).index
        if index is not None and index >= torch.cuda.device_count():
            raise StudyError(f"--device {cfg.device}: only {torch.cuda.device_count()} CUDA device(s)")
    if cfg.micro_batches < 2 and cfg.noise_source == "micro":
        raise StudyError("--micro-batches must be at least 2 (the noise scale compares micro-batch and batch gradients)")
