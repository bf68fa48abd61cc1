"""The study's ``adaptive`` arm: one run from scratch whose batch size follows the online noise
scale (:class:`fastscale.AdaptiveBatchSize`), set against the fixed batch sizes of the rules part.

The criterion (issue #12): the adaptive run reaches the target loss using no more than
``budget`` (1.1) × the examples of the smallest-batch fixed run, in at least ``fewer`` (20%) fewer
optimizer steps than the fewest-step fixed run (any batch size, any scaling rule) that also stays
within that example budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastscale import AdaptiveBatchSize, FusedScaledSGD, NoiseScaleConfig

from . import fit
from .train import FUSED, RunConfig, _fresh_model, _MeasuredStep, _split, read_online


@dataclass(frozen=True)
class AdaptiveConfig:
    min_batch_size: int  # the smallest batch of the ladder
    max_batch_size: int  # the largest
    multiple: int  # batch sizes are multiples of this (the ladder's step, 8)
    factor: float  # c in B = clamp(c·B_simple, ...)
    check_every: int
    max_growth: float  # largest factor of one increase
    rule: str  # the optimizer's lr rule
    rewarmup_steps: int
    budget: float = 1.1
    fewer: float = 0.2


def adaptive_run(task, init_state: dict, cfg: RunConfig, acfg: AdaptiveConfig, seed: int, target_loss: float) -> dict:
    """Train from ``init_state`` for the smallest batch's example budget, the batch size chosen by
    :class:`fastscale.AdaptiveBatchSize`. Each step feeds the estimate as every from-scratch run
    does: ``cfg.micro_batches`` parts through ``opt.accumulate_grad``, or per-example norms."""
    generator = torch.Generator().manual_seed(seed)
    model = _fresh_model(task, init_state, seed)
    opt = FusedScaledSGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, batch_size=acfg.min_batch_size,
        base_batch_size=cfg.base_batch_size, scaling=acfg.rule, noise_fallback=cfg.noise_fallback,
        noise_scale=NoiseScaleConfig(per_tensor=False, min_updates=cfg.noise_min_updates), fused=FUSED[cfg.impl],
    )
    schedule = AdaptiveBatchSize(opt, acfg.min_batch_size, acfg.max_batch_size, factor=acfg.factor,
                                 check_every=acfg.check_every, max_growth=acfg.max_growth,
                                 micro_batch_size=acfg.multiple,
                                 rewarmup_steps=acfg.rewarmup_steps)
    step_fn = _MeasuredStep(task, model, opt, acfg.min_batch_size, cfg)
    curve = {k: [] for k in ("steps", "examples", "loss", "accuracy", "batch_size", "lr", "b_simple", "b_simple_low")}

    def record() -> float:
        ev = task.evaluate(model)
        online = read_online(opt) if schedule.steps else {"b_simple": None, "b_simple_low": None}
        curve["steps"].append(schedule.steps)
        curve["examples"].append(schedule.examples)
        curve["loss"].append(ev["loss"])
        curve["accuracy"].append(ev["accuracy"])
        curve["batch_size"].append(schedule.batch_size)
        curve["lr"].append(opt.current_lr()[0] * schedule.lr_factor)
        for key in ("b_simple", "b_simple_low"):
            curve[key].append(math.nan if online[key] is None else online[key])
        return ev["loss"]

    initial_loss = record()
    next_eval = cfg.eval_every_examples
    diverged = False
    while schedule.examples < cfg.max_examples and schedule.steps < cfg.max_steps:
        if step_fn.batch_size != schedule.batch_size:  # the realisation follows the schedule
            step_fn.batch_size = schedule.batch_size
            step_fn.sizes = [schedule.batch_size] if step_fn.per_example else _split(schedule.batch_size,
                                                                                        cfg.micro_batches)
        step_fn(generator)  # zero_grad, the measured backward(s), opt.step()
        schedule.step()
        if schedule.examples >= next_eval:
            next_eval = (schedule.examples // cfg.eval_every_examples + 1) * cfg.eval_every_examples
            loss = record()
            if not math.isfinite(loss) or loss > cfg.divergence_factor * initial_loss:
                diverged = True
                break
    if curve["steps"][-1] != schedule.steps:
        record()
    return {"rule": acfg.rule, "factor": acfg.factor, "check_every": acfg.check_every, "steps": schedule.steps,
            "examples": schedule.examples, "diverged": diverged, "history": [list(h) for h in schedule.history],
            "final_loss": curve["loss"][-1], "curve": curve}


def compare(run: dict, fixed_runs: list[dict], target: float, acfg: AdaptiveConfig) -> dict:
    """The criterion: the adaptive run against the fixed batch sizes (every rule's runs)."""
    hit = fit.crossing(run["curve"], target)
    run["steps_to_target"], run["examples_to_target"] = (None, None) if hit is None else hit
    smallest = min(r["batch_size"] for r in fixed_runs)
    ref = [r for r in fixed_runs if r["batch_size"] == smallest and r.get("examples_to_target") is not None]
    out = {"target_loss": target, "smallest_batch_size": smallest, "budget_factor": acfg.budget,
           "fewer_steps_needed": acfg.fewer, "adaptive_steps": run["steps_to_target"],
           "adaptive_examples": run["examples_to_target"]}
    if not ref:
        return {**out, "met": False, "why": f"the smallest batch size ({smallest}) never reached the target loss "
                                            f"{target:g}, so there is no example budget to compare against"}
    budget = acfg.budget * min(r["examples_to_target"] for r in ref)
    within = [r for r in fixed_runs if r.get("steps_to_target") is not None and r["examples_to_target"] <= budget]
    best = min(within, key=lambda r: r["steps_to_target"])
    out.update(example_budget=budget, best_fixed={"batch_size": best["batch_size"], "rule": best["rule"],
                                                  "steps": best["steps_to_target"],
                                                  "examples": best["examples_to_target"]})
    if hit is None:
        return {**out, "met": False, "why": "the adaptive run never reached the target loss"}
    steps_ratio = run["steps_to_target"] / best["steps_to_target"] if best["steps_to_target"] else math.inf
    out.update(steps_ratio=steps_ratio, examples_ratio=run["examples_to_target"] / (budget / acfg.budget))
    reasons = []
    if run["examples_to_target"] > budget:
        reasons.append(f"it used {out['examples_ratio']:.2f}× the smallest batch's examples (allowed "
                       f"{acfg.budget:g}×)")
    if steps_ratio > 1 - acfg.fewer:
        reasons.append(f"it took {steps_ratio:.2f}× the steps of the fewest-step fixed run within the budget "
                       f"(B={best['batch_size']} {best['rule']}; needed <= {1 - acfg.fewer:.2f}×)")
    return {**out, "met": not reasons, "why": "; ".join(reasons) if reasons else None}


# ----------------------------------------------------------------- report
def report_section(name: str, res: dict, plots: list[str], unit: str) -> list[str]:
    a = res["adaptive"]
    run, c = a["run"], a["comparison"]
    lines = ["### Adaptive batch size (`fastscale.AdaptiveBatchSize`)", "",
             f"Batch from {a['config']['min_batch_size']} to {a['config']['max_batch_size']}{unit}, "
             f"B = clamp({a['config']['factor']:g} × B_simple), checked every {a['config']['check_every']} steps "
             f"(growing at most {a['config']['max_growth']:g}× at a time), "
             f"lr rule `{a['config']['rule']}`, re-warmup {a['config']['rewarmup_steps']} steps. "
             f"Batch sizes over training (step: batch): "
             + ", ".join(f"{s}: {b}" for s, b in run["history"]) + ".", ""]
    rows = [["adaptive", "—", _n(c["adaptive_steps"]), _n(c["adaptive_examples"])]]
    for r in sorted(a["fixed"], key=lambda r: (r["batch_size"], r["rule"])):
        rows.append([f"fixed B={r['batch_size']}", r["rule"], _n(r["steps"]), _n(r["examples"])])
    lines += ["| run | rule | steps to target | examples to target |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    lines.append(f"**Criterion** (≤ {c['budget_factor']:g}× the examples of B={c['smallest_batch_size']}, "
                 f"≥ {c['fewer_steps_needed']:.0%} fewer steps than the fewest-step fixed run within that budget): "
                 + ("**met**" if c["met"] else f"**not met**: {c['why']}") + ".")
    if c.get("best_fixed"):
        bf = c["best_fixed"]
        lines.append(f"Fewest-step fixed run within the budget: B={bf['batch_size']} ({bf['rule']}), "
                     f"{_n(bf['steps'])} steps, {_n(bf['examples'])} examples.")
    lines.append("")
    lines += [f"![{p}]({p})" for p in plots]
    lines.append("")
    return lines


def _n(x) -> str:
    return "not reached" if x is None else f"{x:,.0f}"


def summary(fixed_runs: list[dict]) -> list[dict]:
    """The fixed runs as the report shows them (steps and examples to target)."""
    return [{"batch_size": r["batch_size"], "rule": r["rule"], "steps": r.get("steps_to_target"),
             "examples": r.get("examples_to_target")} for r in fixed_runs]


def plot(name: str, res: dict, out, save) -> list[str]:
    """Batch size and lr over training (examples), against c·B_simple online and the measured
    critical batch size at the branch points (with its interval) where the study measured it."""
    import matplotlib.pyplot as plt

    a = res["adaptive"]
    c = a["run"]["curve"]
    files: list[str] = []
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    ax.step(c["examples"], c["batch_size"], where="post", color="C0", label="adaptive batch size")
    factor = a["config"]["factor"]
    b = [factor * v if v is not None and math.isfinite(v) else math.nan for v in c["b_simple"]]
    ax.plot(c["examples"], b, color="C1", alpha=0.8, label=f"{factor:g} × online B_simple")
    low = [factor * v if v is not None and math.isfinite(v) and v > 0 else math.nan for v in c["b_simple_low"]]
    ax.plot(c["examples"], low, color="C1", alpha=0.4, ls=":", label=f"{factor:g} × its 90% lower end")
    crit = (res.get("critical") or {}).get("points") or []
    labelled = False
    for pt in crit:
        cr = pt.get("criterion") or {}
        if cr.get("value") is None or not math.isfinite(cr["value"]):
            continue
        ci = (pt.get("bootstrap") or {}).get("b_crit")
        err = None
        if ci and all(v is not None and math.isfinite(v) for v in ci):
            err = [[cr["value"] - ci[0]], [ci[1] - cr["value"]]]
        ax.errorbar([pt["examples"]], [cr["value"]], yerr=err, fmt="s", color="C3", capsize=3,
                    label=None if labelled else "measured B_crit [90%] (branching)")
        labelled = True
    hit = a["comparison"].get("adaptive_examples")
    if hit is not None:
        for axis in (ax, ax_lr):
            axis.axvline(hit, color="0.5", ls="--", lw=1, label="target loss reached" if axis is ax else None)
    ax.set_yscale("log")
    ax.set_ylabel("batch size")
    ax.legend(fontsize=8)
    ax.set_title(f"{name}: adaptive batch size")
    ax_lr.plot(c["examples"], c["lr"], color="C2")
    ax_lr.set_ylabel("applied lr")
    ax_lr.set_xlabel("examples seen")
    fig.tight_layout()
    save(fig, out, f"{name}_adaptive.png", files)
    return files
