"""The study per task: the critical batch size measured by branching (measure.py), and every
batch size × scaling rule trained from scratch, with targets, mismatches and fits."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field

import torch

from . import adaptive, fit
from .measure import MeasureConfig, measure
from .tasks import StudyError, make_task
from .train import RunConfig

RULES = ("none", "linear", "sqrt", "noise")
PARTS = ("critical", "rules", "adaptive")


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
    tasks: list[str] = field(default_factory=lambda: ["digits", "lstsq", "charlm"])
    model: str | None = None
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    # --- from scratch, under each scaling rule
    batch_sizes: list[int] | None = None  # None: the task's ladder
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
    # --- the critical batch size, by branching
    branch_batch_sizes: list[int] | None = None  # None: the task's ladder
    branch_points: list[int] | None = None  # None: the task's points
    branch_examples: int | None = None  # None: the task's
    lr_factors: list[float] | None = None  # None: 4 factors (quick: 3)
    seeds: int | None = None  # None: 3 (quick: 2)
    crit_factor: float = 2.0
    bootstrap: int = 1000
    level: float = 0.9
    # --- the adaptive arm (fastscale.AdaptiveBatchSize), compared with the rules part's fixed runs
    # c = 2: the critical batch size measured 2–7× the online B_simple here (docs/study.md)
    adaptive_factor: float = 2.0
    adaptive_check_every: int = 5
    adaptive_max_growth: float = 4.0
    adaptive_rule: str = "linear"
    adaptive_rewarmup_steps: int = 3
    # --- everything
    device: str = "cpu"
    seed: int = 0
    quick: bool = False
    impl: str = "auto"


LR_FACTORS = (0.5, 2**-0.5, 1.0, 2**0.5)
QUICK_LR_FACTORS = (0.5, 1.0, 2.0)


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


def measure_config(cfg: StudyConfig, task) -> MeasureConfig:
    d, q = task.defaults, cfg.quick
    seeds = cfg.seeds or (2 if q else 3)
    return MeasureConfig(
        batch_sizes=tuple(sorted(set(cfg.branch_batch_sizes or (d.quick_branch_batch_sizes if q else d.branch_batch_sizes)))),
        branch_points=tuple(sorted(set(cfg.branch_points or (d.quick_branch_points if q else d.branch_points)))),
        branch_examples=cfg.branch_examples or (d.quick_branch_examples if q else d.branch_examples),
        lr_factors=tuple(cfg.lr_factors or (QUICK_LR_FACTORS if q else LR_FACTORS)),
        seeds=seeds,
        trunk_seeds=max(seeds, 2),
        crit_factor=cfg.crit_factor,
        eval_every_examples=d.branch_eval_every_examples,
        bootstrap=cfg.bootstrap,
        level=cfg.level,
        max_extend=2 if q else 3,
    )


def rule_batch_sizes(cfg: StudyConfig, task) -> list[int]:
    d = task.defaults
    return sorted(set(cfg.batch_sizes or (d.quick_batch_sizes if cfg.quick else d.batch_sizes)))


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
        run["b_noise_true_at_target"] = _at_target(run, "b_noise_true")
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


def _fits(runs: list[dict], rules: list[str], bootstrap: int, level: float, seed: int) -> dict:
    """The trade-off fitted per rule, and to the best rule at each batch size: the lower envelope
    over rules stands in for tuning the lr per batch size. Intervals: bootstrap over the points."""
    out = {}
    for k, rule in enumerate(rules):
        pts = [(r["batch_size"], r["steps_to_target"]) for r in runs if r["rule"] == rule and r["steps_to_target"]]
        out[rule] = _fit_with_interval(pts, bootstrap, level, seed + k)
    best: dict[int, float] = {}
    for r in runs:
        s = r["steps_to_target"]
        if s and (r["batch_size"] not in best or s < best[r["batch_size"]]):
            best[r["batch_size"]] = s
    out["best"] = _fit_with_interval(sorted(best.items()), bootstrap, level, seed + len(rules))
    out["best_points"] = [{"batch_size": b, "steps_to_target": s} for b, s in sorted(best.items())]
    return out


def _fit_with_interval(pts, bootstrap: int, level: float, seed: int) -> dict:
    b, s = ([p[0] for p in pts], [p[1] for p in pts])
    f = fit.fit_tradeoff(b, s)
    if f["ok"]:
        f["bootstrap"] = fit.bootstrap_points(b, s, bootstrap, level, seed)
    return f


def _rule_jobs(task_key, cfg: StudyConfig, run_cfg: RunConfig, init_state: dict, batch_sizes, target):
    """One job per (batch size, rule), except that at B = B0 every rule gives the base rate and
    no warmup: the first rule's run stands for all."""
    jobs, index = [], {}
    for b in batch_sizes:
        for rule in cfg.rules:
            if b == cfg.base_batch_size and index.get(b) is not None:
                continue
            index[(b, rule)] = len(jobs)
            if b == cfg.base_batch_size:
                index[b] = len(jobs)
            jobs.append(("train_run", task_key, dict(init_state=init_state, batch_size=b, rule=rule, cfg=run_cfg,
                                                      seed=cfg.seed * 100_003 + b, target_loss=target)))
    return jobs, index


def run_rules(task_key, task, cfg: StudyConfig, run_cfg: RunConfig, init_state: dict, runner) -> dict:
    target = task.defaults.target_loss if cfg.target_loss is None else cfg.target_loss
    batch_sizes = rule_batch_sizes(cfg, task)
    jobs, index = _rule_jobs(task_key, cfg, run_cfg, init_state, batch_sizes, target)
    labels = [f"{task.name} B={j[2]['batch_size']} {j[2]['rule']}" for j in jobs]
    done = runner.map(jobs, labels)
    runs = []
    for b in batch_sizes:
        for rule in cfg.rules:
            if (b, rule) in index:
                runs.append(done[index[(b, rule)]])
            else:  # shared B0 run
                first = done[index[b]]
                runs.append({**first, "rule": rule, "shared_with": first["rule"]})
    # Each rule's curves are compared with its own smallest-batch (k = 1) run; when that batch is
    # B0 the four references are one shared run.
    references = {rule: next(r for r in runs if r["rule"] == rule) for rule in cfg.rules}
    for run in runs:
        _summarise_run(run, target, references[run["rule"]])
    result = {
        "target_loss": target,
        "settings": {k: v for k, v in asdict(run_cfg).items()},
        "batch_sizes": batch_sizes,
        "rules": list(cfg.rules),
        "reference_batch_size": batch_sizes[0],
        "runs": runs,
        "fits": _fits(runs, cfg.rules, cfg.bootstrap, cfg.level, cfg.seed),
    }
    at_target = [r["b_simple_at_target"] for r in runs if r.get("b_simple_at_target") is not None
                 and math.isfinite(r["b_simple_at_target"]) and not r.get("shared_with")]
    result["b_simple_at_target_median"] = statistics.median(at_target) if at_target else None
    averaged = [r["b_simple_true_ema_at_target"] for r in runs if r.get("b_simple_true_ema_at_target") is not None
                and math.isfinite(r["b_simple_true_ema_at_target"]) and not r.get("shared_with")]
    if averaged:
        result["b_simple_true_averaged_at_target_median"] = statistics.median(averaged)
    for key in ("b_simple_true_at_target", "b_noise_true_at_target"):
        vals = [r[key] for r in runs if r.get(key) is not None and math.isfinite(r[key]) and not r.get("shared_with")]
        if vals:
            result[key + "_median"] = statistics.median(vals)
    return result


def task_key(name: str, cfg: StudyConfig) -> tuple:
    return (name, cfg.model if name == "digits" else None, cfg.device)  # --model picks the digits model


def run_task(name: str, cfg: StudyConfig, runner=None) -> dict:
    from .parallel import Runner

    runner = runner or Runner(1)
    key = task_key(name, cfg)
    task = make_task(*key)
    run_cfg = _run_config(cfg, task)
    torch.manual_seed(cfg.seed)  # the same initial weights for every run
    init_state = {k: v.detach().clone() for k, v in task.make_model().state_dict().items()}
    result = {"task": task.describe(), "example_unit": task.example_unit}
    if "critical" in cfg.parts:
        result["critical"] = measure(key, task, run_cfg, measure_config(cfg, task), cfg.seed, init_state, runner)
    if "rules" in cfg.parts:
        result["rules"] = run_rules(key, task, cfg, run_cfg, init_state, runner)
    if "adaptive" in cfg.parts and "rules" in cfg.parts:  # compared with the fixed batch sizes
        result["adaptive"] = run_adaptive(key, task, cfg, run_cfg, init_state, runner, result["rules"])
    return result


def adaptive_config(cfg: StudyConfig, task) -> adaptive.AdaptiveConfig:
    sizes = rule_batch_sizes(cfg, task)
    return adaptive.AdaptiveConfig(
        min_batch_size=sizes[0], max_batch_size=sizes[-1], multiple=math.gcd(*sizes), factor=cfg.adaptive_factor,
        check_every=cfg.adaptive_check_every, max_growth=cfg.adaptive_max_growth, rule=cfg.adaptive_rule,
        rewarmup_steps=cfg.adaptive_rewarmup_steps,
    )


def run_adaptive(task_key, task, cfg: StudyConfig, run_cfg: RunConfig, init_state: dict, runner, rules: dict) -> dict:
    """One adaptive run (seeded like the smallest batch's fixed run), against every fixed run."""
    acfg = adaptive_config(cfg, task)
    seed = cfg.seed * 100_003 + acfg.min_batch_size
    job = ("adaptive_run", task_key, dict(init_state=init_state, cfg=run_cfg, acfg=acfg, seed=seed,
                                          target_loss=rules["target_loss"]))
    run = runner.map([job], [f"{task.name} adaptive"])[0]
    fixed = [r for r in rules["runs"] if not r.get("shared_with")]  # the B0 run once, not once per rule
    return {"config": asdict(acfg), "run": run, "comparison": adaptive.compare(run, fixed, rules["target_loss"], acfg),
            "fixed": adaptive.summary(fixed)}


def count_runs(cfg: StudyConfig) -> int:
    """Runs the progress bar counts (the branches' total is an upper bound: a ladder stops early
    when no branch point is left)."""
    total = 0
    for name in cfg.tasks:
        from .tasks import TASKS

        d = TASKS[name].defaults
        if "rules" in cfg.parts:
            sizes = set(cfg.batch_sizes or (d.quick_batch_sizes if cfg.quick else d.batch_sizes))
            total += len(sizes) * len(cfg.rules) - (len(cfg.rules) - 1) * (cfg.base_batch_size in sizes)
        if "critical" in cfg.parts:
            seeds = cfg.seeds or (2 if cfg.quick else 3)
            ladder = set(cfg.branch_batch_sizes or (d.quick_branch_batch_sizes if cfg.quick else d.branch_batch_sizes))
            points = set(cfg.branch_points or (d.quick_branch_points if cfg.quick else d.branch_points))
            factors = cfg.lr_factors or (QUICK_LR_FACTORS if cfg.quick else LR_FACTORS)
            total += max(seeds, 2) + len(points) * len(ladder) * len(factors) * seeds
        if "adaptive" in cfg.parts and "rules" in cfg.parts:
            total += 1
    return total


def check_config(cfg: StudyConfig) -> None:
    for label, sizes in (("batch sizes", cfg.batch_sizes), ("branch batch sizes", cfg.branch_batch_sizes)):
        if sizes is not None:
            if not sizes:
                raise StudyError(f"no {label} given")
            for b in sizes:
                if b <= 0:
                    raise StudyError(f"{label} must be positive integers, got {b}")
    if cfg.branch_batch_sizes is not None and len(set(cfg.branch_batch_sizes)) < 2:
        raise StudyError("--branch-batch-sizes needs at least 2 batch sizes (the smallest is the reference)")
    if cfg.base_batch_size <= 0:
        raise StudyError(f"--base-batch-size must be a positive integer, got {cfg.base_batch_size}")
    for rule in cfg.rules:
        if rule not in RULES:
            raise StudyError(f"unknown scaling rule {rule!r} (choose from {', '.join(RULES)})")
    if not cfg.parts or cfg.parts == ["adaptive"]:
        raise StudyError("nothing to do: --skip removes the critical and rules parts of the study (the adaptive arm "
                         "is compared with the rules part)")
    if not (cfg.adaptive_factor > 0 and math.isfinite(cfg.adaptive_factor)):
        raise StudyError(f"--adaptive-factor must be a finite number > 0, got {cfg.adaptive_factor}")
    if cfg.adaptive_rule not in RULES:
        raise StudyError(f"unknown scaling rule {cfg.adaptive_rule!r} for --adaptive-rule "
                         f"(choose from {', '.join(RULES)})")
    if cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise StudyError(f"--device {cfg.device} was asked for but torch sees no CUDA device "
                             f"(torch {torch.__version__}, torch.cuda.is_available() is False)")
        index = torch.device(cfg.device).index
        if index is not None and index >= torch.cuda.device_count():
            raise StudyError(f"--device {cfg.device}: only {torch.cuda.device_count()} CUDA device(s)")
    if cfg.micro_batches < 2 and cfg.noise_source == "micro":
        raise StudyError("--micro-batches must be at least 2 (the noise scale compares micro-batch and batch gradients)")
