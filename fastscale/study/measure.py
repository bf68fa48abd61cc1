"""The critical batch size, measured by branching (McCandlish et al. 2018 §3; Merrill et al. 2025).

1. A reference run (the *trunk*) trains at the smallest batch size B_ref of the ladder with the
   task's lr, and its weights are kept at a few points of training (early, middle, late). The
   trunk is repeated with other seeds (same initial weights, other batches): the spread of the
   optimizer's online B_simple across those repeats is the estimate's interval until the
   optimizer reports its own.
2. From each point, *branches* continue at every batch size of the ladder, each with a fresh
   optimizer (no momentum carried over) at a constant lr, each lr of a small grid, each with
   several seeds. The grid is set per batch size around the linear-scaling guess from the previous
   batch size's best lr (``lr_factors`` × best(B_prev)·B/B_prev), as McCandlish et al. tune it.
3. The B_ref branches train for ``branch_examples`` examples; the lowest seed-mean held-out loss
   they reach there (over the lr grid) is the branch point's *target*. Every other branch stops
   when it reaches the target, or after max(budget_factor·branch_examples/B, step_slack × the
   previous batch size's steps) steps.
4. Steps to target S(B): where the held-out loss, smoothed by a centred mean over 5 evaluations,
   first reaches the target (interpolated), averaged over seeds at the lr that does best (a lr
   where any seed misses the target does not count).
   B_crit is the criterion of :func:`fit.critical_batch` (examples within ``crit_factor`` of the
   B_ref branch's); S = S_min(1 + B_noise/B) is also fitted. Bootstrap over seeds gives intervals.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import statistics
from dataclasses import dataclass

import numpy as np

from . import fit
from .train import RunConfig, branch_steps_to_target, smoothed


@dataclass(frozen=True)
class MeasureConfig:
    batch_sizes: tuple  # the ladder; the smallest is B_ref (the trunk's batch size too)
    branch_points: tuple  # examples into the trunk at which to branch
    branch_examples: int  # the B_ref branches train this long; their loss there is the target
    lr_factors: tuple = (0.5, 2**-0.5, 1.0, 2**0.5)  # × the linear-scaling guess
    seeds: int = 3  # repeated seeds per (batch size, lr)
    trunk_seeds: int = 3  # repeated trunks for the online estimate's spread
    crit_factor: float = 2.0  # a batch size passes while its examples to target <= this × B_ref's
    ref_factor: float = 1.5  # B_ref branches run ref_factor × branch_examples (their seeds must cross)
    budget_factor: float = 3.0  # other branches: up to budget_factor × branch_examples examples ...
    step_slack: float = 1.5  # ... or step_slack × the previous batch size's steps to target
    eval_every_examples: int = 64
    min_evals: int = 16  # at least this many evaluations before the previous batch size's crossing
    bootstrap: int = 1000
    level: float = 0.9
    min_improvement: float = 0.01  # the target must be this far (relative) below the branch's start
    max_extend: int = 3  # lrs added beyond the grid's edge while the best lr sits on it


def run_seed(*parts) -> int:
    """A seed from the run's identity (study seed, point, batch size, repeat): the same whatever
    ran before it or in which process."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**62


def _loss_at(curve: dict, step: float) -> float:
    """Smoothed held-out loss at ``step`` (linear between evaluations); inf past a diverged run's end."""
    s, l = curve["steps"], curve["loss"]
    if step > s[-1] or not all(math.isfinite(v) for v in l):
        return math.inf
    return float(np.interp(step, s, smoothed(l)))


def _value_at_crossing(curve: dict, key: str, target: float) -> float | None:
    at = branch_steps_to_target(curve, target)
    if at is None or key not in curve:
        return None
    return float(np.interp(at, curve["steps"], curve[key]))


def _mean(values) -> float:
    return math.inf if any(v is None or not math.isfinite(v) for v in values) else sum(values) / len(values)


def _best_lr(rung: dict, by_loss_at: float | None = None) -> None:
    """Fill in the rung's best lr: fewest seed-mean steps to target; if no lr reached it with
    every seed, the lr with the lowest seed-mean best loss (only to centre the next grid).
    ``edge``: "low"/"high" when the lr that is best (for the B_ref rung: by the seed-mean loss at
    ``by_loss_at`` steps, the target's definition) is the grid's smallest/largest."""
    means = [_mean([r["steps_to_target"] for r in runs]) for runs in rung["runs"]]
    rung["mean_steps"] = means
    j = int(np.argmin(means))
    if math.isfinite(means[j]):
        rung["best"], rung["steps"] = j, means[j]
    else:
        lowest = [_mean([min(smoothed(r["curve"]["loss"])) for r in runs]) for runs in rung["runs"]]
        j = int(np.argmin(lowest)) if any(math.isfinite(v) for v in lowest) else 0
        rung["best"], rung["steps"] = None, None
    rung["guide"] = j  # the lr the next grid is centred on
    rung["best_lr"] = rung["lrs"][rung["best"]] if rung["best"] is not None else None
    pick = rung["best"]
    if by_loss_at is not None:
        at = [_mean([_loss_at(r["curve"], by_loss_at) for r in runs]) for runs in rung["runs"]]
        pick = int(np.argmin(at)) if any(math.isfinite(v) for v in at) else None
    n = len(rung["lrs"])
    rung["edge"] = None if pick is None or n < 2 else "low" if pick == 0 else "high" if pick == n - 1 else None
    if rung["best"] is None and by_loss_at is None and any(r["diverged"] for r in rung["runs"][0]):
        rung["edge"] = "low"  # nothing reached the target and even the smallest lr diverged: go lower


def _run_lrs(points, grids: dict, task_key, task, run_cfg: RunConfig, m: "MeasureConfig", seed: int, runner,
             states) -> None:
    """Run every seed at each point's new lrs (``grids``: point index -> lrs) at its current rung,
    and merge the runs into the rung, kept sorted by lr."""
    jobs, owners = [], []
    for i, lrs in grids.items():
        pt, rung = points[i], points[i]["rungs"][-1]
        for lr in lrs:
            for s in range(m.seeds):
                jobs.append(("branch_run", task_key, dict(
                    state=states[i], batch_size=rung["batch_size"], lr=lr, momentum=run_cfg.momentum,
                    seed=run_seed(seed, "branch", i, rung["batch_size"], s), max_steps=rung["max_steps"],
                    eval_every=rung["eval_every"], target=rung["target"],
                    divergence_loss=run_cfg.divergence_factor * pt["start_loss"], impl=run_cfg.impl)))
                owners.append((i, lr, s))
    labels = [f"{task.name} point {i + 1} B={points[i]['rungs'][-1]['batch_size']} lr={lr:.3g}" for i, lr, _ in owners]
    results = runner.map(jobs, labels)
    new = {}
    for (i, lr, s), res in zip(owners, results):
        new.setdefault(i, {}).setdefault(lr, [None] * m.seeds)[s] = res
    for i, by_lr in new.items():
        rung = points[i]["rungs"][-1]
        merged = dict(zip(rung["lrs"], rung["runs"]))
        merged.update(by_lr)
        rung["lrs"] = sorted(merged)
        rung["runs"] = [merged[lr] for lr in rung["lrs"]]


def measure(task_key: tuple, task, run_cfg: RunConfig, m: MeasureConfig, seed: int, init_state: dict,
            runner) -> dict:
    ladder = sorted(set(m.batch_sizes))
    b_ref = ladder[0]
    lr_ref = run_cfg.lr * b_ref / run_cfg.base_batch_size  # the task lr, linearly scaled to B_ref
    trunk_cfg = dataclasses.replace(run_cfg, lr=lr_ref)
    points_requested = sorted(set(m.branch_points))

    # 1. Trunks.
    jobs = [("trunk_run", task_key, dict(init_state=init_state, batch_size=b_ref, cfg=trunk_cfg,
                                         seed=run_seed(seed, "trunk", r), checkpoints=points_requested,
                                         keep_states=(r == 0)))
            for r in range(m.trunk_seeds)]
    trunks = runner.map(jobs, [f"{task.name} trunk {r + 1}/{m.trunk_seeds}" for r in range(m.trunk_seeds)])
    states = [p.pop("state") for p in trunks[0]["points"]]
    points = []
    for i, p in enumerate(trunks[0]["points"]):
        points.append({"index": i, "examples": p["examples"], "step": p["step"], "start_loss": p["loss"],
                       "online": p["online"], "truth": p["truth"], "rungs": [], "status": "measured",
                       "online_seeds": [t["points"][i]["online"]["b_simple"] for t in trunks]})

    # 2-3. Branches, one batch size at a time (each grid is centred on the previous best lr).
    active = list(range(len(points)))
    for k, b in enumerate(ladder):
        grids = {}
        for i in active:
            pt = points[i]
            if k == 0:
                lrs = [lr_ref * f for f in m.lr_factors]
                max_steps, target = math.ceil(m.ref_factor * m.branch_examples / b), None
                eval_every = max(1, round(m.eval_every_examples / b))
            else:
                prev = pt["rungs"][-1]
                anchor = prev["lrs"][prev["guide"]]
                guess = anchor * b / prev["batch_size"]
                lrs = [guess * f for f in m.lr_factors]
                if anchor < min(lrs) / 1.01:  # a sparse ladder: keep "the lr has saturated" in the grid
                    lrs.append(anchor)
                s_prev = prev["steps"]
                max_steps = math.ceil(m.budget_factor * m.branch_examples / b)
                if s_prev is not None:
                    max_steps = max(max_steps, math.ceil(m.step_slack * s_prev))
                else:
                    max_steps = max(max_steps, prev["max_steps"])
                target = pt["target"]
                eval_every = max(1, round(m.eval_every_examples / b))
                if s_prev is not None:
                    eval_every = max(1, min(eval_every, int(s_prev // m.min_evals)))
            pt["rungs"].append({"batch_size": b, "lrs": [], "runs": [], "max_steps": max_steps,
                                "eval_every": eval_every, "target": target, "extended": 0})
            grids[i] = sorted(lrs)
        # The grid, then one more lr beyond whichever edge the best one sits on, until it is inside.
        while grids:
            _run_lrs(points, grids, task_key, task, run_cfg, m, seed, runner, states)
            if k == 0:
                for i in grids:
                    _set_target(points[i], m, b_ref)
            grids = {}
            for i in active:
                rung = points[i]["rungs"][-1]
                _best_lr(rung, by_loss_at=(m.branch_examples / b) if k == 0 else None)
                if points[i]["status"] == "measured" and rung["extended"] < m.max_extend:
                    edge = rung["edge"]
                    if edge is not None:
                        step = m.lr_factors[1] / m.lr_factors[0] if len(m.lr_factors) > 1 else 2.0
                        grids[i] = [rung["lrs"][-1] * step if edge == "high" else rung["lrs"][0] / step]
                        rung["extended"] += 1
        if k == 0:
            active = [i for i in active if points[i]["status"] == "measured"]
        if not active:
            break

    for pt in points:
        _analyse_point(pt, ladder, m, seed)
    for t in trunks:
        for p in t["points"]:
            p.pop("state", None)
    result = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(m).items()},
        "reference_batch_size": b_ref,
        "reference_lr": lr_ref,
        "momentum": run_cfg.momentum,
        "ladder": ladder,
        "trunks": trunks,
        "points": points,
    }
    result["recommendation"] = recommend(result)
    result["verdict"] = verdict(result)
    return result


def _set_target(pt: dict, m: MeasureConfig, b_ref: int) -> None:
    """Target = the lowest seed-mean (smoothed) held-out loss the B_ref branches reach at branch_examples."""
    rung = pt["rungs"][0]
    at = m.branch_examples / b_ref
    means = [_mean([_loss_at(r["curve"], at) for r in runs]) for runs in rung["runs"]]
    j = int(np.argmin(means))
    pt["target"] = means[j] if math.isfinite(means[j]) else None
    pt["target_lr"] = rung["lrs"][j]
    if pt["target"] is None:
        pt["status"] = "every lr of the B_ref grid diverged"
        return
    if not pt["target"] < pt["start_loss"] * (1 - m.min_improvement):
        pt["status"] = (f"no progress: the B_ref branches end at loss {pt['target']:.4g}, not {m.min_improvement:.0%} "
                        f"below the branch point's {pt['start_loss']:.4g}")
        return
    for runs in rung["runs"]:
        for r in runs:
            r["steps_to_target"] = branch_steps_to_target(r["curve"], pt["target"])


def _analyse_point(pt: dict, ladder: list[int], m: MeasureConfig, seed: int) -> None:
    rungs = pt["rungs"]
    reached = [r for r in rungs if r.get("steps") is not None]
    pt["batch_sizes"] = [r["batch_size"] for r in rungs]
    pt["steps"] = [r.get("steps") for r in rungs]
    pt["best_lrs"] = [r.get("best_lr") for r in rungs]
    ok = pt["status"] == "measured" and len(reached) >= 1
    if ok:
        steps = [math.inf if s is None else s for s in pt["steps"]]
        pt["criterion"] = fit.critical_batch(pt["batch_sizes"], steps, m.crit_factor)
        pt["fit"] = fit.fit_tradeoff(pt["batch_sizes"], pt["steps"])
        per_seed = [[[r["steps_to_target"] for r in runs] for runs in rung["runs"]] for rung in rungs]
        pt["bootstrap"] = fit.bootstrap_branch(pt["batch_sizes"], per_seed, m.crit_factor, m.bootstrap, m.level,
                                               seed=run_seed(seed, "bootstrap", pt["index"]) % 2**32)
        ref_runs = rungs[0]["runs"][rungs[0]["best"]] if rungs[0].get("best") is not None else []
        if pt["truth"] is not None and ref_runs:
            at_target = {}
            for key in ("b_simple", "b_noise"):
                vals = [_value_at_crossing(r["curve"], f"{key}_true", pt["target"]) for r in ref_runs]
                vals = [v for v in vals if v is not None]
                at_target[key] = statistics.median(vals) if vals else None
            pt["truth_at_target"] = at_target
    else:
        pt["criterion"], pt["fit"], pt["bootstrap"] = None, None, None
    for rung in rungs[1:]:  # results.json keeps all B_ref curves (the target), else the best (or guiding) lr's
        keep = rung.get("best") if rung.get("best") is not None else rung.get("guide")
        for j, runs in enumerate(rung["runs"]):
            if j != keep:
                for r in runs:
                    r["final_loss"] = r["curve"]["loss"][-1]
                    del r["curve"]
    seeds = [v for v in pt["online_seeds"] if v is not None]
    pt["online_median"] = statistics.median(seeds) if seeds else None
    pt["online_range"] = (min(seeds), max(seeds)) if seeds else None
    pt["comparison"] = compare(pt)


def online_estimate(pt: dict) -> tuple[float | None, tuple | None, str]:
    """The online estimate at a branch point and its interval: the optimizer's own 90% interval
    where it reports one (with the branched trunk's value), else the median and range over the
    repeated trunks (our own interval until then)."""
    low, high = pt["online"].get("b_simple_low"), pt["online"].get("b_simple_high")
    if low is not None and high is not None and pt["online"].get("b_simple") is not None:
        return pt["online"]["b_simple"], (low, high), "the optimizer's interval"
    return pt.get("online_median"), pt.get("online_range"), "the range over repeated trunks"


def compare(pt: dict) -> dict | None:
    """Estimate vs measurement at one branch point: ratio (online estimate / measured B_crit),
    whether the estimate lies inside the measured interval, whether the two intervals overlap."""
    crit = pt.get("criterion")
    est, est_ci, est_ci_kind = online_estimate(pt)
    if not crit or crit["value"] is None or est is None:
        return None
    measured = crit["value"]
    ci = (pt.get("bootstrap") or {}).get("b_crit")
    out = {"estimate": est, "measured": measured, "measured_interval": ci, "estimate_interval": est_ci,
           "estimate_interval_kind": est_ci_kind, "censored": crit["status"] == "above"}
    out["ratio"] = est / measured if math.isfinite(measured) and measured > 0 else None
    if crit["status"] == "above":
        out["ratio_bound"] = est / crit["largest_passing"]  # the ratio is at most this
    out["inside"] = bool(ci is not None and ci[0] <= est <= ci[1])
    out["overlap"] = bool(ci is not None and est_ci is not None and est_ci[0] <= ci[1] and ci[0] <= est_ci[1])
    truth = pt.get("truth")
    if truth:
        out["true_b_noise"] = truth["b_noise"]
        out["true_b_simple"] = truth["b_simple"]
        out["true_ratio"] = truth["b_noise"] / measured if math.isfinite(measured) and measured > 0 else None
        out["true_inside"] = bool(ci is not None and ci[0] <= truth["b_noise"] <= ci[1])
    return out


POINT_NAMES = ("early", "middle", "late")


def point_name(i: int, n: int) -> str:
    if n == 3:
        return POINT_NAMES[i]
    if n == 2:
        return ("early", "late")[i]
    if n == 1:
        return "single"
    return f"point {i + 1}"


def recommend(res: dict) -> dict:
    """"Use batch size X with lr Y; above Z the extra examples buy little."

    X: the largest ladder batch size that passes the criterion at every measured branch point
    (no examples wasted at any stage of training); Y: its tuned lr (median over the points);
    Z: the largest measured B_crit (above it, at no stage does a bigger batch pay);
    a growing B_crit (early → late) is reported as the range a batch-size ramp would follow."""
    pts = [p for p in res["points"] if p.get("criterion") and p["criterion"]["value"] is not None]
    if not pts:
        return {"ok": False, "reason": "no branch point gave a measurement"}
    x = min(p["criterion"]["largest_passing"] for p in pts)
    x = int(x)
    lrs = []
    for p in pts:
        for b, lr in zip(p["batch_sizes"], p["best_lrs"]):
            if b == x and lr is not None:
                lrs.append(lr)
    values = [p["criterion"]["value"] for p in pts]
    z = max(values)
    return {"ok": True, "batch_size": x, "lr": statistics.median(lrs) if lrs else None,
            "above": z, "above_censored": not math.isfinite(z), "largest_tried": res["ladder"][-1],
            "b_crit_by_point": values, "points": len(pts), "points_total": len(res["points"])}


def verdict(res: dict) -> dict:
    comps = [(i, p["comparison"]) for i, p in enumerate(res["points"]) if p.get("comparison")]
    ratios = [c["ratio"] for _, c in comps if c["ratio"] is not None and c["ratio"] > 0]
    out = {
        "points": len(comps),
        "ratios": [c["ratio"] for _, c in comps],
        "geometric_mean_ratio": math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None,
        "inside": sum(c["inside"] for _, c in comps),
        "overlap": sum(c["overlap"] for _, c in comps),
        "censored": sum(c["censored"] for _, c in comps),
    }
    true_ratios = [c["true_ratio"] for _, c in comps if c.get("true_ratio")]
    if true_ratios:
        out["true_geometric_mean_ratio"] = math.exp(sum(map(math.log, true_ratios)) / len(true_ratios))
        out["true_inside"] = sum(c.get("true_inside", False) for _, c in comps)
    return out
