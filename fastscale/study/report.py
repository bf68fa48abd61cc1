"""The study's report folder: results.json, report.md and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _clean(value):
    """JSON has no NaN or infinity: write them as null (strict parsers reject NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(results: dict, out: Path) -> Path:
    path = out / "results.json"
    path.write_text(json.dumps(_clean(results), indent=1, allow_nan=False) + "\n")
    return path


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, int):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return lines


# ----------------------------------------------------------------- plots
def _layout(fig) -> None:
    # Fixed margins: tight_layout measures every log-axis tick label and costs seconds per figure.
    fig.subplots_adjust(left=0.08 if len(fig.axes) > 1 else 0.14, right=0.98, bottom=0.14, top=0.9, wspace=0.08)


def _plots(name: str, res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    rules, sizes = res["rules"], res["batch_sizes"]
    cmap = plt.get_cmap("viridis")
    color = {b: cmap(i / max(len(sizes) - 1, 1)) for i, b in enumerate(sizes)}
    runs = {(r["batch_size"], r["rule"]): r for r in res["runs"]}

    def finite(xs, ys, positive=False):
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y) and (y > 0 or not positive)]
        return [p[0] for p in pts], [p[1] for p in pts]

    # Learning curves per rule, against examples seen (Goyal et al.: they should coincide).
    fig, axes = plt.subplots(1, len(rules), figsize=(4.2 * len(rules), 3.6), sharey=True, squeeze=False)
    for ax, rule in zip(axes[0], rules):
        for b in sizes:
            c = runs[(b, rule)]["curve"]
            x, y = finite(c["examples"][1:], c["loss"][1:], positive=True)
            ax.plot(x, y, color=color[b], lw=1.2, label=f"B={b}")
        ax.axhline(res["target_loss"], color="k", ls="--", lw=0.8)
        ax.set(xscale="log", yscale="log", title=f"{name}: scaling={rule}", xlabel="examples seen")
    axes[0][0].set_ylabel("held-out loss")
    axes[0][-1].legend(fontsize=6, ncol=2)
    _layout(fig)
    files.append(f"{name}_learning_curves.png")
    fig.savefig(out / files[-1], dpi=110)
    plt.close(fig)

    # Steps vs examples to target, with the fitted S = S_min(1 + B_noise/B), E = E_min(1 + B/B_noise).
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    for rule, marker in zip(rules, "osD^v<>"):
        pts = [(r["examples_to_target"], r["steps_to_target"]) for r in res["runs"]
               if r["rule"] == rule and r["steps_to_target"]]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, s=22, label=rule, alpha=0.8)
    best = res["fits"].get("best")
    if best and best["b_noise"] and math.isfinite(best["b_noise"]) and best["b_noise"] > 0:
        import numpy as np

        bs = np.geomspace(min(sizes) / 4, max(sizes) * 4, 100)
        s = best["s_min"] * (1 + best["b_noise"] / bs)
        ax.plot(s * bs, s, "k-", lw=1, label=f"fit (best rule per B): B_noise={best['b_noise']:.0f}")
        ax.axhline(best["s_min"], color="gray", ls=":", lw=0.8)
        ax.axvline(best["e_min"], color="gray", ls=":", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="examples to target", ylabel="steps to target",
           title=f"{name}: steps vs examples to loss {res['target_loss']:g}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    _layout(fig)
    files.append(f"{name}_tradeoff.png")
    fig.savefig(out / files[-1], dpi=110)
    plt.close(fig)

    # B_simple over training, per rule (with the truth for least squares).
    has_truth = "b_simple_true" in res["runs"][0]["curve"]
    fig, axes = plt.subplots(1, len(rules), figsize=(4.2 * len(rules), 3.6), sharey=True, squeeze=False)
    for ax, rule in zip(axes[0], rules):
        for b in sizes:
            c = runs[(b, rule)]["curve"]
            x, y = finite(c["examples"], c["b_simple"], positive=True)
            ax.plot(x, y, color=color[b], lw=1.1, label=f"B={b}")
            if has_truth:
                x, y = finite(c["examples"], c["b_simple_true"], positive=True)
                ax.plot(x, y, color=color[b], lw=0.8, ls="--")
        ax.set(xscale="log", yscale="log", xlabel="examples seen", title=f"{name}: scaling={rule}")
    axes[0][0].set_ylabel("B_simple estimate" + (" (dashed: truth)" if has_truth else ""))
    axes[0][-1].legend(fontsize=6, ncol=2)
    _layout(fig)
    files.append(f"{name}_b_simple.png")
    fig.savefig(out / files[-1], dpi=110)
    plt.close(fig)

    if has_truth:
        fig, ax = plt.subplots(figsize=(5, 4.6))
        lo, hi = math.inf, 0.0
        for r in res["runs"]:
            c, start = r["curve"], 1.0 / (1.0 - r["noise_beta"])
            pts = [(t, e) for s, t, e in zip(c["steps"], c["b_simple_true_ema"], c["b_simple"])
                   if s >= start and t and e and math.isfinite(t) and math.isfinite(e) and t > 0 and e > 0]
            if pts:
                ax.scatter(*zip(*pts), s=5, color=color[r["batch_size"]], alpha=0.5)
                lo, hi = min(lo, *(min(p) for p in pts)), max(hi, *(max(p) for p in pts))
        if hi > 0:
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="estimate = truth")
            ax.legend(fontsize=7)
        ax.set(xscale="log", yscale="log", xlabel="true B_simple (same moving average)",
               ylabel="estimated B_simple", title="lstsq: estimator vs truth (colour: batch size)")
        _layout(fig)
        files.append(f"{name}_estimator_vs_truth.png")
        fig.savefig(out / files[-1], dpi=110)
        plt.close(fig)
    return files


# ----------------------------------------------------------------- markdown
def _rules_table(res: dict) -> list[str]:
    """One line per rule over the batch sizes above the reference: how often it reached the
    target, diverged, and how far its learning curves sat from the small-batch one."""
    import statistics

    rows = []
    for rule in res["rules"]:
        runs = [r for r in res["runs"] if r["rule"] == rule and r["batch_size"] > res["reference_batch_size"]]
        if not runs:
            continue
        reached = [r for r in runs if r["steps_to_target"] is not None]
        mism = [m for m in (r["mismatch"]["mean_abs"] for r in runs) if m is not None and math.isfinite(m)]
        rows.append([
            rule, f"{len(reached)}/{len(runs)}", sum(r["diverged"] for r in runs),
            statistics.median(mism) if mism else None,
            max((r["batch_size"] for r in reached), default=None),
            min((r["steps_to_target"] for r in reached), default=None),
        ])
    return _table(["rule", "reached target", "diverged", "median mismatch", "largest B reaching target",
                   "fewest steps to target"], rows)


def _task_section(name: str, res: dict, plots: list[str]) -> list[str]:
    t = res["task"]
    st = res["settings"]
    lines = [f"## Task `{name}`", ""]
    lines += [f"- {k}: {v}" for k, v in t.items() if k != "name"]
    lines += [
        f"- base batch size B0 = {st['base_batch_size']}, base lr = {st['lr']:g}, momentum = {st['momentum']:g}; "
        f"lr = base lr × scale(B/B0) × warmup",
        f"- warmup (scaled rules, B > B0): max(⌈{st['warmup_examples']}/B⌉, {st['min_warmup_steps']}) steps, "
        f"from the base lr up to the scaled lr (Goyal et al. 2017)",
        f"- run length: max(⌈{st['max_examples']}/B⌉, {st['min_steps']}) steps (at most {st['max_steps']}), "
        f"held-out evaluation every ~{st['eval_every_examples']} examples; a run stops as diverged when the "
        f"held-out loss exceeds {st['divergence_factor']:g}× its initial value",
        f"- noise scale: {st['micro_batches']} micro-batches per step via `opt.accumulate_grad` "
        f"(B_small = B/{st['micro_batches']}, B_big = B), moving average over ~{st['noise_window_examples']} examples "
        f"(beta = 1 − B/{st['noise_window_examples']}, clamped to [0.5, 0.999]); `scaling=\"noise\"` uses "
        f"B_noise = {st['noise_fallback']:g} until {st['noise_min_updates']} updates"
        if st["noise_source"] == "micro" else "- noise scale: per-example gradient norms (B_small = 1)",
        f"- target loss: **{res['target_loss']:g}** (held-out); reference curve: B = {res['reference_batch_size']} "
        "under the same rule",
        "",
        "### Runs",
        "",
    ]
    truth = "b_simple_true_at_target" in res["runs"][0]
    header = ["B", "rule", "warmup", "steps", "final loss", "final acc", "diverged", "steps→target",
              "examples→target", "mismatch", "B_simple@target", "B_simple final"]
    if truth:
        header.insert(11, "true B_simple@target")
    rows = []
    for r in res["runs"]:
        row = [r["batch_size"], r["rule"] + (" (=)" if r.get("shared_with") else ""), r["warmup_steps"], r["steps"],
               r["final_loss"], r["final_accuracy"], r["diverged"], r["steps_to_target"], r["examples_to_target"],
               r["mismatch"]["mean_abs"], r["b_simple_at_target"], r["b_simple_final"]]
        if truth:
            row.insert(11, r["b_simple_true_at_target"])
        rows.append(row)
    lines += _table(header, rows)
    lines += [
        "",
        "(=): at B = B0 every rule gives the base rate with no warmup, so that run is shared. "
        "mismatch: mean over 64 evenly spaced e in (0, e_max] of |loss_B(e) − loss_ref(e)|, both held-out curves "
        "linearly interpolated in examples seen e, e_max the shorter run's last evaluation. "
        "steps→target: linear interpolation between the evaluations around the first crossing; — = not reached. "
        "B_simple is the optimizer's online estimate (a ratio of moving averages); it can be negative or huge "
        "when the batch is far below B_simple, where the |G|² estimate is mostly noise.",
        "",
        "### Rules compared",
        "",
        *_rules_table(res),
        "",
        "### Steps/examples trade-off fit (McCandlish et al. 2018)",
        "",
        "S = S_min(1 + B_noise/B), E = E_min(1 + B/B_noise), E_min = S_min·B_noise; fitted as S = a + b/B by "
        "least squares relative to S. `best`: at each B, the rule that reached the target in the fewest steps "
        "(a stand-in for tuning the lr per batch size).",
        "",
    ]
    fit_rows = []
    for key in [*res["rules"], "best"]:
        f = res["fits"].get(key)
        if f is None:
            fit_rows.append([key, 0, None, None, None, None, "fewer than 2 batch sizes reached the target"])
        else:
            fit_rows.append([key, f["points"], f["s_min"], f["e_min"], f["b_noise"], f["rel_rms"], f["note"]])
    lines += _table(["rule", "points", "S_min", "E_min", "B_noise (fit)", "rel. RMS", "note"], fit_rows)
    best = res["fits"].get("best")
    b_fit = best["b_noise"] if best else None
    lines += ["", "### Critical batch size: fit vs online estimate", ""]
    lines.append(f"- fitted B_crit (best rule per B): **{_fmt(b_fit)}**")
    lines.append(f"- online B_simple at the target (median over runs that reached it): "
                 f"**{_fmt(res['b_simple_at_target_median'])}**")
    if "b_simple_true_at_target" in res:
        lines.append(f"- true B_simple at the target loss (closed form; here B_noise = B_simple since the Hessian "
                     f"is I): **{_fmt(res['b_simple_true_at_target'])}**")
        lines.append(f"- the truth under the estimator's own moving average, at the target (median over runs): "
                     f"**{_fmt(res.get('b_simple_true_averaged_at_target_median'))}** -- the online estimate tracks "
                     "this; it trails the instantaneous value because |G|² falls fast and the averages of |G|² "
                     "and tr(Σ) still hold earlier, larger |G|²")
    if b_fit and res["b_simple_at_target_median"] and math.isfinite(b_fit) and b_fit > 0:
        lines.append(f"- ratio fit / online B_simple: {b_fit / res['b_simple_at_target_median']:.2f}. McCandlish et "
                     "al. 2018 find B_crit ≈ B_noise within a small factor of B_simple (B_noise = B_simple only when "
                     "the Hessian is a multiple of I); B_simple also changes along training, while the fit "
                     "summarises the whole path to the target.")
    if truth:
        lines += ["", "### Estimator vs truth", "",
                  "Median over evaluations (after the moving average has filled) of estimate / truth, per run. "
                  "'averaged truth' applies the estimator's moving average to the true |G|² and tr(Σ) along "
                  "the run: what the estimate tracks in expectation; 'truth' is the instantaneous B_simple.", ""]
        rows = []
        for r in res["runs"]:
            if r.get("shared_with"):
                continue
            ev = r["estimator_vs_truth"]
            rows.append([r["batch_size"], r["rule"], ev["evaluations"], ev["median_ratio_to_averaged_truth"],
                         ev["median_ratio_to_truth"], r["b_simple_final"], r["curve"]["b_simple_true"][-1]])
        lines += _table(["B", "rule", "evaluations", "estimate / averaged truth", "estimate / truth",
                         "final estimate", "final truth"], rows)
    lines += [""] + [f"![{p}]({p})" for p in plots] + [""]
    return lines


def write_report(results: dict, out: Path, wall_seconds: float) -> list[Path]:
    """Write results.json, the plots and report.md into ``out``; return the paths written.

    The wall time goes into report.md only: results.json holds nothing that differs between two
    runs with the same seed."""
    written = [write_json(results, out)]
    sections = []
    for name, res in results["tasks"].items():
        plots = _plots(name, res, out)
        written += [out / p for p in plots]
        sections += _task_section(name, res, plots)
    env = results["environment"]
    head = [
        "# fastscale study: critical batch size and learning-rate scaling rules",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Environment: torch {env['torch']}, device {env['device']}, {env['threads']} thread(s), "
        f"fastscale ops: {env['ops']}. Training wall time: {wall_seconds:.1f} s. Seed {results['config']['seed']}.",
        "",
        "Every run starts from the same initial weights; runs at one batch size see the same batches under "
        "every rule (common random numbers). Optimizer: `fastscale.FusedScaledSGD(batch_size=B, "
        "base_batch_size=B0, scaling=rule, warmup_steps=..., noise_scale=True)`.",
        "",
    ]
    (out / "report.md").write_text("\n".join(head + sections))
    written.append(out / "report.md")
    return written
