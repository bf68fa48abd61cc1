"""The study's report folder: report.md, results.json and PNG plots (matplotlib, Agg backend).

The folder is written whole into a temporary sibling and swapped into place at the end (see
:func:`replace_dir`): a second run into the same ``--out`` leaves no file of the first beside
its report, and an interrupted run leaves the previous report as it was.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import tempfile
import textwrap
import threading
from pathlib import Path

from . import adaptive
from .measure import online_estimate, point_name
from .train import smoothed
from .tasks import StudyError

MARKER = ".fastscale-study"  # a report folder this command may replace whole


# ----------------------------------------------------------------- the folder, replaced atomically
def is_study_folder(path: Path) -> bool:
    return (path / MARKER).is_file() or ((path / "report.md").is_file() and (path / "results.json").is_file())


def check_out(path: str) -> Path:
    """Before any training: the report can be written there. ``--out`` is created or replaced
    whole at the end, so it must be new, empty, or a folder a previous study wrote."""
    out = Path(path).expanduser()
    if out.is_symlink():
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise StudyError(f"cannot write to output folder {str(out)!r}: it is a file")
    if out.is_dir() and any(out.iterdir()) and not is_study_folder(out):
        raise StudyError(f"output folder {str(out)!r} holds files that are not a fastscale study report; the study "
                         "replaces its --out folder whole, so choose a new or empty folder")
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=out.absolute().parent))
        probe.rmdir()
    except OSError as exc:
        raise StudyError(f"cannot write to output folder {str(out)!r}: {exc.strerror or exc}") from None
    return out


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    return False  # EINVAL (file system), ENOSYS (kernel): the two-rename path below


@contextlib.contextmanager
def _signals_deferred():
    """Ctrl-C and SIGTERM wait until the block ends, then are delivered as usual. A Python-level
    handler, not a signal mask: whichever thread the kernel hands the signal to, Python runs
    handlers in the main thread, so nothing interrupts the block (outside the main thread,
    where no handler can be set, the block runs unguarded)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught, previous = [], {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in caught:
            signal.raise_signal(sig)  # now, through the handler that was there before


def replace_dir(new: Path, out: Path) -> None:
    """Put the finished folder ``new`` at ``out``: a rename when ``out`` is absent, else an atomic
    exchange (the old folder then sits at ``new`` and is deleted), else -- where the file system
    cannot exchange -- two renames. Interrupts are deferred until the old folder is gone, so an
    interrupt leaves the old report or the new one at ``out``, and no stray folder beside it."""
    with _signals_deferred():
        if not out.exists():
            os.rename(new, out)
            return
        if _exchange(new, out):
            shutil.rmtree(new, ignore_errors=True)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        os.rename(out, old)
        os.rename(new, out)
        shutil.rmtree(old, ignore_errors=True)


def write_report(results: dict, out: Path, wall_seconds: float) -> list[Path]:
    """Write results.json, the plots and report.md into a temporary sibling of ``out`` and swap
    it into place; return the paths written (under ``out``). On any error or interrupt the
    temporary folder is removed and ``out`` is as it was."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the swap
        names = _write_files(results, tmp, wall_seconds)
        (tmp / MARKER).write_text("written by `fastscale study`; the next run into this folder replaces it whole\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out / n for n in names]


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


def _write_files(results: dict, out: Path, wall_seconds: float) -> list[str]:
    names = [write_json(results, out).name]
    sections = []
    for name, res in results["tasks"].items():
        plots = _plots(name, res, out)
        names += plots
        sections += _task_section(name, res, plots)
    (out / "report.md").write_text("\n".join(_head(results, wall_seconds) + sections))
    names.append("report.md")
    return names


# ----------------------------------------------------------------- numbers
def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "—"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if abs(value) >= min(1000, 10**digits):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _ci(pair, digits: int = 3) -> str:
    if not pair:
        return "n/a"
    return f"[{_fmt(pair[0], digits)}, {_fmt(pair[1], digits)}]"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return lines


def _b_crit_text(pt: dict) -> str:
    """Measured B_crit as text: the value, '> B_max' when every batch size passed, '≈ B' when
    the first failing batch size never reached the target."""
    c = pt.get("criterion")
    if not c or c["value"] is None:
        return "—"
    if c["status"] == "above":
        return f"> {_fmt(c['largest_passing'])}"
    if c["status"] == "unreached":
        return f"{_fmt(c['largest_passing'])}–{_fmt(c['first_failing'])}"
    return _fmt(c["value"])


def _unit(res: dict) -> str:
    return {"sequence": " (sequences)", "image": " (images)"}.get(res.get("example_unit"), "")


# ----------------------------------------------------------------- the answer, first
def recommendation_line(name: str, res: dict) -> str:
    """"use batch size X with lr Y; above Z the extra examples buy little" for one task."""
    crit = res.get("critical")
    if not crit:
        return f"**{name}**: no critical-batch-size measurement in this run (--skip critical)."
    rec = crit["recommendation"]
    if not rec["ok"]:
        return f"**{name}**: no recommendation: {rec['reason']}."
    unit = {"sequence": " sequences", "image": " images"}.get(res.get("example_unit"), "")
    mom = crit.get("momentum")
    lr = f"lr **{_fmt(rec['lr'])}**" + (f" (SGD, momentum {mom:g})" if mom else " (plain SGD)") if rec["lr"] else "its tuned lr"
    finite = [v for v in rec["b_crit_by_point"] if math.isfinite(v)]
    line = f"**{name}**: use batch size **{rec['batch_size']}**{unit} with {lr}; "
    if not finite:
        line += (f"up to {rec['largest_tried']}, the largest batch size tried, the extra examples still paid at every "
                 "branch point: B_crit is above the ladder (try larger --branch-batch-sizes).")
    elif rec["above_censored"]:
        line += (f"above **{_fmt(max(finite), 2)}** the extra examples buy little until late in training, when "
                 f"B_crit exceeds {rec['largest_tried']}, the largest batch size tried.")
    else:
        line += f"above **{_fmt(rec['above'], 2)}** the extra examples buy little."
    return line


def _evidence_line(res: dict) -> str:
    crit = res["critical"]
    parts = []
    n = len(crit["points"])
    for i, pt in enumerate(crit["points"]):
        ci = (pt.get("bootstrap") or {}).get("b_crit")
        parts.append(f"{point_name(i, n)} ({pt['examples']:,} examples in) {_b_crit_text(pt)}"
                     + (f" {_ci(ci, 2)}" if ci else ""))
    return "measured B_crit " + ", ".join(parts) + "; the recommended batch size passes the criterion at every point."


def verdict_line(name: str, res: dict) -> str:
    """How far the online estimate is from the measurement, and whether within the interval."""
    crit = res.get("critical")
    if not crit:
        return f"{name}: not measured."
    v = crit["verdict"]
    if not v["points"]:
        return f"{name}: no branch point with both an estimate and a measurement."
    n = len(crit["points"])
    bits = []
    for i, pt in enumerate(crit["points"]):
        c = pt.get("comparison")
        if not c:
            continue
        if c["ratio"] is not None:
            bits.append(f"{_fmt(c['ratio'], 2)}× {point_name(i, n)}"
                        + (" (estimate not ready)" if pt["online"].get("ready") is False else ""))
        elif c.get("ratio_bound") is not None:
            bits.append(f"< {_fmt(c['ratio_bound'], 2)}× {point_name(i, n)} (B_crit above the ladder)")
    line = f"{name}: online B_simple / measured B_crit = " + ", ".join(bits)
    if v["geometric_mean_ratio"] is not None:
        line += f" (geometric mean {_fmt(v['geometric_mean_ratio'], 2)}×)"
    line += (f"; the estimate lies inside the measured 90% interval at {v['inside']} of {v['points']} points, "
             f"and its own interval overlaps it at {v['overlap']} of {v['points']}")
    if "true_geometric_mean_ratio" in v:
        line += (f". The closed-form B_noise at the branch points is {_fmt(v['true_geometric_mean_ratio'], 2)}× the "
                 f"measurement (geometric mean), inside its interval at {v['true_inside']} of {v['points']}")
    return line + "."


def _head(results: dict, wall_seconds: float) -> list[str]:
    env = results["environment"]
    lines = ["# fastscale study: the critical batch size, measured and estimated", "", "## Recommendation", ""]
    for name, res in results["tasks"].items():
        lines.append(f"- {recommendation_line(name, res)}")
        if res.get("critical") and res["critical"]["recommendation"]["ok"]:
            lines.append(f"  Evidence: {_evidence_line(res)}")
    lines += ["", "## The optimizer's online estimate against the measurement", ""]
    lines += [f"- {verdict_line(name, res)}" for name, res in results["tasks"].items()]
    lines += [
        "",
        "How these are found (details per task below, and in docs/study.md): a reference run at the smallest "
        "batch size is branched early, in the middle and late in training; each branch continues at every batch "
        "size of a ladder, with the lr tuned per batch size over a grid around the linear-scaling guess, until "
        "it reaches the loss the smallest batch size reaches in a fixed budget. **B_crit** is the largest batch "
        "size whose examples to that target stay within "
        f"{_crit_factor(results)}× the smallest batch size's (steps within {_crit_factor(results)}× perfect linear "
        "scaling), interpolated on the ladder; 90% intervals by bootstrap over the repeated seeds. The "
        "**online B_simple** is what `FusedScaledSGD(noise_scale=...)` reported at the branch point.",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Environment: torch {env['torch']}, device {env['device']}, {env['threads']} thread(s) per worker, "
        f"{env.get('jobs', 1)} worker process(es), fastscale ops: {env['ops']}. Wall time: {wall_seconds:.1f} s. "
        f"Seed {results['config']['seed']}.",
        "",
    ]
    return lines


def _crit_factor(results: dict) -> str:
    return f"{results['config'].get('crit_factor', 2.0):g}"


# ----------------------------------------------------------------- per task
def _task_section(name: str, res: dict, plots: list[str]) -> list[str]:
    lines = [f"## Task `{name}`", ""]
    lines += [f"- {k}: {v}" for k, v in res["task"].items() if k != "name"]
    lines.append("")
    if res.get("critical"):
        lines += _critical_section(name, res, [p for p in plots if p.startswith(f"{name}_critical")
                                               or p.startswith(f"{name}_estimate") or p.startswith(f"{name}_branches")])
    if res.get("rules"):
        lines += _rules_section(name, res["rules"], [p for p in plots if p.startswith(f"{name}_rules")])
    if res.get("adaptive"):
        lines += adaptive.report_section(name, res, [p for p in plots if p.startswith(f"{name}_adaptive")], _unit(res))
    return lines


def _critical_section(name: str, res: dict, plots: list[str]) -> list[str]:
    crit = res["critical"]
    cfg = crit["config"]
    b_ref = crit["reference_batch_size"]
    unit = _unit(res)
    lines = [
        "### The critical batch size, measured by branching",
        "",
        f"- reference run (trunk): B_ref = {b_ref}{unit}, lr {_fmt(crit['reference_lr'])}, momentum "
        f"{_fmt(crit['momentum'])}, no scaling; {cfg['trunk_seeds']} repeats (same initial weights, other batches) "
        f"for the online estimate's spread; branched from the first at {', '.join(f'{e:,}' for e in cfg['branch_points'])} "
        "examples",
        f"- ladder: {', '.join(map(str, crit['ladder']))}; per batch size the lrs "
        f"{', '.join(_fmt(f, 3) for f in cfg['lr_factors'])} × the linear-scaling guess (previous batch size's best lr "
        "× B/B_prev; for B_ref the task lr), plus one more beyond the grid's edge while the best lr sits on it "
        f"(at most {cfg['max_extend']}); {cfg['seeds']} seeds each",
        f"- target per branch point: the lowest seed-mean held-out loss the B_ref branches reach after "
        f"{cfg['branch_examples']:,} examples; other branches stop at the target or after "
        f"max({cfg['budget_factor']:g}·{cfg['branch_examples']:,}/B, {cfg['step_slack']:g} × the previous batch size's "
        "steps). The loss a branch is judged by is a centred mean over 5 evaluations: a raw small-batch curve dips "
        "under a target early, by its own noise",
        f"- criterion: B passes while B·S(B) ≤ {cfg['crit_factor']:g}·B_ref·S(B_ref) (S: seed-mean steps to target at "
        f"the best lr); B_crit: the crossing, interpolated in log B between the last passing and first failing batch "
        f"size (were S = S_min(1 + B_noise/B) exact, it would sit at {_fmt(cfg['crit_factor'] - 1)}·B_noise + "
        f"{cfg['crit_factor']:g}·B_ref); intervals: {cfg['level']:.0%} percentile bootstrap over seeds ({cfg['bootstrap']} replicates, lr "
        "re-tuned in each, target held fixed)",
        "",
    ]
    truth = any(p.get("truth") for p in crit["points"])
    header = ["point", "examples in", "loss at point", "target", "measured B_crit [90%]", "largest passing B",
              "fit B_noise [90%]", "fit S_min [90%]", "online B_simple [interval]", "online, trunk seeds: median [range]",
              "ratio", "inside", "overlap"]
    if truth:
        header[10:10] = ["true B_simple", "true B_noise", "true B_noise at target"]
    rows = []
    n = len(crit["points"])
    for i, pt in enumerate(crit["points"]):
        boot = pt.get("bootstrap") or {}
        f = pt.get("fit") or {}
        c = pt.get("comparison") or {}
        est, est_ci, kind = online_estimate(pt)
        online = pt["online"]
        ready = "" if online.get("ready") in (None, True) else f" (not ready: {online.get('not_ready')})"
        fit_text = (f"{_fmt(f['b_noise'])} {_ci(boot.get('fit_b_noise'))}" if f.get("ok")
                    else (f.get("note") or "—"))
        row = [
            point_name(i, n), pt["examples"], pt["start_loss"], pt.get("target"),
            f"{_b_crit_text(pt)} {_ci(boot.get('b_crit'))}" if pt.get("criterion") else pt["status"],
            (pt.get("criterion") or {}).get("largest_passing"),
            fit_text,
            f"{_fmt(f['s_min'])} {_ci(boot.get('fit_s_min'))}" if f.get("ok") else "—",
            f"{_fmt(online.get('b_simple'))} {_ci(_optimizer_interval(online))}{ready}",
            f"{_fmt(pt.get('online_median'))} {_ci(pt.get('online_range'))}",
            _fmt(c["ratio"], 2) if c.get("ratio") is not None else (
                f"< {_fmt(c['ratio_bound'], 2)}" if c.get("ratio_bound") is not None else "—"),
            "yes" if c.get("inside") else "no" if c else "—",
            "yes" if c.get("overlap") else "no" if c else "—",
        ]
        if truth:
            t = pt.get("truth") or {}
            tt = pt.get("truth_at_target") or {}
            row[10:10] = [t.get("b_simple"), t.get("b_noise"), tt.get("b_noise")]
        rows.append(row)
    lines += _table(header, rows)
    lines += [
        "",
        "online B_simple: the branched trunk's estimate at the point, with the optimizer's own 90% interval "
        "(n/a where this fastscale reports none). ratio, inside, overlap: the estimate "
        f"({online_estimate(crit['points'][0])[2] if crit['points'] else ''}) against the measured B_crit: "
        "estimate / measured; whether the estimate lies inside the measured interval; whether the two intervals overlap. "
        "fit: S = S_min(1 + B_noise/B) by least squares relative to S, on the seed-mean steps of every batch size "
        "that reached the target.",
    ]
    if truth:
        lines.append("true B_simple = tr(Σ)/|G|², true B_noise = tr(HΣ)/(GᵀHG) at the branch point, in closed form "
                     "(tasks.py); 'at target': along the B_ref branches where they reach the target.")
    lines.append("")
    for i, pt in enumerate(crit["points"]):
        lines += _point_table(i, n, pt, crit, unit)
    lines += [f"![{p}]({p})" for p in plots] + [""]
    return lines


def _optimizer_interval(online: dict):
    low, high = online.get("b_simple_low"), online.get("b_simple_high")
    return (low, high) if low is not None and high is not None else None


def _point_table(i: int, n: int, pt: dict, crit: dict, unit: str) -> list[str]:
    lines = [f"#### {point_name(i, n).capitalize()} branch point: {pt['examples']:,} examples into the trunk, "
             f"loss {_fmt(pt['start_loss'])} → target {_fmt(pt.get('target'))}", ""]
    if pt["status"] != "measured":
        return lines + [f"Not measured: {pt['status']}.", ""]
    ratios = (pt.get("criterion") or {}).get("ratios") or []
    factor = crit["config"]["crit_factor"]
    rows = []
    for k, rung in enumerate(pt["rungs"]):
        best = rung.get("best")
        seeds = [r["steps_to_target"] for r in rung["runs"][best]] if best is not None else []
        r = ratios[k] if k < len(ratios) else None
        rows.append([
            rung["batch_size"],
            ", ".join(_fmt(lr) + ("*" if j == best else "") for j, lr in enumerate(rung["lrs"])),
            rung.get("steps"),
            ", ".join(_fmt(s) for s in seeds) if seeds else "—",
            (rung.get("steps") or 0) * rung["batch_size"] or None,
            r if r is not None and math.isfinite(r) else None,
            "yes" if r is not None and r <= factor else "no",
        ])
    lines += _table([f"B{unit}", "lrs tried (* best)", "steps to target", "per seed", "examples", "examples / B_ref's",
                     "passes"], rows)
    f = pt.get("fit") or {}
    lines += ["", f"B_crit {_b_crit_text(pt)} {_ci((pt.get('bootstrap') or {}).get('b_crit'))}; fit: "
              + (f"B_noise {_fmt(f['b_noise'])}, S_min {_fmt(f['s_min'])}, relative RMS residual {_fmt(f['rel_rms'], 2)}"
                 + (f" ({f['note']})" if f.get("note") else "") if f.get("ok") else f.get("note", "—"))
              + ("; the best lr sat on the grid's edge at B = " + ", ".join(
                  str(r["batch_size"]) for r in pt["rungs"] if r.get("edge") and r.get("best") is not None)
                 if any(r.get("edge") and r.get("best") is not None for r in pt["rungs"]) else ""), ""]
    return lines


def _rules_section(name: str, res: dict, plots: list[str]) -> list[str]:
    st = res["settings"]
    lines = [
        "### Scaling rules from scratch",
        "",
        f"Every batch size trained from scratch under each rule: lr = base lr × scale(B/B0) × warmup, B0 = "
        f"{st['base_batch_size']}, base lr = {st['lr']:g}, momentum = {st['momentum']:g}; warmup (scaled rules, B > B0) "
        f"max(⌈{st['warmup_examples']}/B⌉, {st['min_warmup_steps']}) steps from the base lr (Goyal et al. 2017); run "
        f"length max(⌈{st['max_examples']}/B⌉, {st['min_steps']}) steps, held-out evaluation every "
        f"~{st['eval_every_examples']} examples, stopped as diverged above {st['divergence_factor']:g}× the initial "
        "loss. Noise scale: "
        + (f"{st['micro_batches']} micro-batches per step via `opt.accumulate_grad`, moving average over "
           f"~{st['noise_window_examples']} examples; `scaling=\"noise\"` uses B_noise = {st['noise_fallback']:g} until "
           f"{st['noise_min_updates']} updates." if st["noise_source"] == "micro" else "per-example gradient norms.")
        + f" Target loss **{res['target_loss']:g}** (held-out); reference curve: B = {res['reference_batch_size']} "
        "under the same rule.",
        "",
        *_rules_table(res),
        "",
        "Fit of S = S_min(1 + B_noise/B) to the steps to target (one run per batch size; `best`: the rule that "
        "reached the target in the fewest steps at each B, a stand-in for tuning the lr). Intervals: bootstrap "
        "over the (B, steps) points.",
        "",
    ]
    lines += fit_table(res["fits"], [*res["rules"], "best"])
    lines += ["", "#### Runs", ""]
    truth = "b_simple_true_at_target" in res["runs"][0]
    header = ["B", "rule", "warmup", "steps", "final loss", "final acc", "diverged", "steps→target",
              "examples→target", "mismatch", "B_simple@target", "B_simple final"]
    if truth:
        header[11:11] = ["true B_simple@target", "true B_noise@target"]
    rows = []
    for r in res["runs"]:
        row = [r["batch_size"], r["rule"] + (" (=)" if r.get("shared_with") else ""), r["warmup_steps"], r["steps"],
               r["final_loss"], r["final_accuracy"], r["diverged"], r["steps_to_target"], r["examples_to_target"],
               r["mismatch"]["mean_abs"], r["b_simple_at_target"], r["b_simple_final"]]
        if truth:
            row[11:11] = [r.get("b_simple_true_at_target"), r.get("b_noise_true_at_target")]
        rows.append(row)
    lines += _table(header, rows)
    lines += [
        "",
        "(=): at B = B0 every rule gives the base rate with no warmup, so that run is shared. mismatch: mean over "
        "64 evenly spaced e of |loss_B(e) − loss_ref(e)|, held-out curves interpolated in examples seen. "
        "steps→target: interpolated at the first crossing; — = not reached.",
        "",
    ]
    lines += [f"![{p}]({p})" for p in plots] + [""]
    return lines


def fit_table(fits: dict, keys: list[str]) -> list[str]:
    """One row per fit: its figures with bootstrap intervals, or -- with too few points -- the
    reason, never the residual of a curve drawn through two points."""
    rows = []
    for key in keys:
        f = fits.get(key) or {}
        boot = f.get("bootstrap") or {}
        if not f.get("ok"):
            rows.append([key, f.get("points", 0), "—", "—", "—", "—", f.get("note", "")])
        else:
            rows.append([key, f["points"], f"{_fmt(f['s_min'])} {_ci(boot.get('fit_s_min'))}", f["e_min"],
                         f"{_fmt(f['b_noise'])} {_ci(boot.get('fit_b_noise'))}", f["rel_rms"], f["note"]])
    return _table(["rule", "points", "S_min [90%]", "E_min", "B_noise (fit) [90%]", "rel. RMS", "note"], rows)


def _rules_table(res: dict) -> list[str]:
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


# ----------------------------------------------------------------- plots
def _plots(name: str, res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    files = []
    if res.get("critical"):
        files += _critical_plots(name, res, out)
    if res.get("rules"):
        files += _rule_plots(name, res["rules"], out)
    if res.get("adaptive"):
        files += adaptive.plot(name, res, out, _save)
    return files


def _save(fig, out: Path, filename: str, files: list[str]) -> None:
    import matplotlib.pyplot as plt

    _tidy_log_axes(fig)
    fig.savefig(out / filename, dpi=110)
    plt.close(fig)
    files.append(filename)


def _batch_axis(ax, sizes) -> None:
    """A log x axis whose ticks are the ladder's batch sizes, labelled as plain numbers."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sizes))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(sizes, [str(b) for b in sizes])


def _log_axis(axis) -> None:
    """Mark a log axis for :func:`_tidy_log_axes`: ticks at 1, 2, 5 × 10^k (fewer over wide
    ranges) labelled as plain numbers, no minor-tick labels such as '2.175×10³'."""
    axis._fastscale_tidy = True


def _tidy_log_axes(fig) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter

    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if not getattr(axis, "_fastscale_tidy", False) or axis.get_scale() != "log":
                continue
            lo, hi = sorted(axis.get_view_interval())
            if not (lo > 0 and hi > lo):
                continue
            decades = math.log10(hi / lo)
            subs = (1, 2, 5) if decades <= 2.2 else (1, 3) if decades <= 3.5 else (1,)
            ticks = [m * 10**e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
                     for m in subs if lo <= m * 10**e <= hi]
            if len(ticks) < 3 and decades < 1:  # a narrow range: evenly spaced round numbers instead
                ticks = [t for t in MaxNLocator(4).tick_values(lo, hi) if lo <= t <= hi and t > 0]
            if len(ticks) < 2:
                continue
            axis.set_major_locator(FixedLocator(ticks))
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1000 else f"{v:.3g}"))
            axis.set_minor_formatter(NullFormatter())


def _finite(xs, ys, positive=True):
    pts = [(x, y) for x, y in zip(xs, ys)
           if x is not None and y is not None and math.isfinite(y) and (y > 0 or not positive)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _span(ax, interval, view, **style) -> None:
    """Shade an interval of batch sizes, clipped to the plotted range ``view`` (an infinite bound
    is the edge)."""
    if not interval or any(v is None or math.isnan(v) for v in interval):
        return
    lo, hi = max(interval[0], view[0]), min(interval[1], view[-1])
    if lo < hi:
        ax.axvspan(lo, hi, **style)


def _in_view(value, view) -> bool:
    return value is not None and math.isfinite(value) and view[0] <= value <= view[-1]


def _critical_plots(name: str, res: dict, out: Path) -> list[str]:
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    files = []
    crit = res["critical"]
    points = crit["points"]
    n = len(points)
    unit = _unit(res)
    ladder = crit["ladder"]
    b_ref = crit["reference_batch_size"]
    factor = crit["config"]["crit_factor"]
    has_truth = any(p.get("truth") for p in points)

    # 1. Steps to target vs batch size, per branch point: the measurement itself.
    all_lrs = [lr for p in points for lr in p.get("best_lrs") or [] if lr]
    norm = LogNorm(min(all_lrs), max(all_lrs) * 1.0001) if all_lrs else None
    width = 4.3 * n + 1.4
    fig, axes = plt.subplots(1, n, figsize=(width, 4.5), squeeze=False)
    for i, (ax, pt) in enumerate(zip(axes[0], points)):
        ax.set_title(f"{point_name(i, n)}: {pt['examples']:,} examples in, loss {_fmt(pt['start_loss'])} → "
                     f"{_fmt(pt.get('target'))}", fontsize=9)
        _batch_axis(ax, ladder)
        ax.set_yscale("log")
        _log_axis(ax.yaxis)
        ax.set_xlabel(f"batch size B{unit}")
        est, est_ci, _ = online_estimate(pt)
        truth = pt.get("truth") or {}
        shown = [v for v in (est, truth.get("b_noise")) if v is not None and ladder[0] / 8 <= v <= ladder[-1] * 8]
        view = (min([ladder[0], *shown]) / 1.3, max([ladder[-1], *shown]) * 1.3)
        ax.set_xlim(*view)
        if i == 0:
            ax.set_ylabel("steps to the branch's target")
        if pt["status"] != "measured" or not pt.get("criterion"):
            ax.text(0.5, 0.5, "not measured:\n" + pt["status"], transform=ax.transAxes, ha="center", va="center",
                    fontsize=8, wrap=True)
            continue
        c = pt["criterion"]
        boot = pt.get("bootstrap") or {}
        ci = boot.get("b_crit")
        _span(ax, ci, view, color="C1", alpha=0.18, lw=0)
        if math.isfinite(c["value"]):
            ax.axvline(c["value"], color="C1", lw=2)
        _span(ax, est_ci, view, facecolor="none", edgecolor="C0", alpha=0.35, hatch="//", lw=0)
        if _in_view(est, view):
            ax.axvline(est, color="C0", lw=1.5, ls="-.")
        if _in_view(truth.get("b_noise"), view):
            ax.axvline(truth["b_noise"], color="k", lw=1.2, ls=":")
        bs, ss = _finite(pt["batch_sizes"], pt["steps"])
        lrs = [lr for lr, s in zip(pt["best_lrs"], pt["steps"]) if s]
        lo, hi = [], []
        for rung in pt["rungs"]:
            if rung.get("best") is None:
                continue
            vals = [r["steps_to_target"] for r in rung["runs"][rung["best"]]]
            lo.append(rung["steps"] - min(vals))
            hi.append(max(vals) - rung["steps"])
        ax.errorbar(bs, ss, yerr=[lo, hi], fmt="none", ecolor="0.4", lw=1, capsize=3, zorder=2)
        ax.scatter(bs, ss, c=lrs, cmap="viridis", norm=norm, s=46, zorder=3, edgecolors="k", linewidths=0.6)
        s_ref = pt["steps"][0]
        grid = np.geomspace(ladder[0], ladder[-1], 100)
        ax.plot(grid, s_ref * b_ref / grid, color="0.45", ls="--", lw=1)
        ax.plot(grid, factor * s_ref * b_ref / grid, color="0.45", ls=(0, (1, 2)), lw=1.2)
        f = pt.get("fit") or {}
        if f.get("ok") and f["b_noise"] and math.isfinite(f["b_noise"]) and f["b_noise"] > 0:
            ax.plot(grid, f["s_min"] * (1 + f["b_noise"] / grid), color="C3", lw=1.2)
        unreached = [r["batch_size"] for r in pt["rungs"] if r.get("steps") is None]
        for b in unreached:
            ax.annotate("target\nnot reached", (b, 1), xycoords=("data", "axes fraction"), xytext=(0, -4),
                        textcoords="offset points", ha="center", va="top", fontsize=7, color="C3")
        text = [f"B_crit {_b_crit_text(pt)} {_ci(ci, 2)}"]
        if f.get("ok"):
            text.append(f"fit B_noise {_fmt(f['b_noise'], 2)} {_ci(boot.get('fit_b_noise'), 2)}")
        text.append(f"online B_simple {_fmt(est, 2)} {_ci(est_ci, 2)}")
        if truth:
            text.append(f"true B_noise {_fmt(truth.get('b_noise'), 2)}")
        ax.text(0.98, 0.98, "\n".join(text), transform=ax.transAxes, ha="right", va="top", fontsize=7.5,
                bbox=dict(boxstyle="round,pad=0.3", fc="white", ec="0.8", alpha=0.9))
    handles = [
        Line2D([], [], marker="o", ls="none", mfc="0.7", mec="k", label="steps to target, best lr (bars: seeds)"),
        Line2D([], [], color="0.45", ls="--", label="perfect linear scaling from B_ref"),
        Line2D([], [], color="0.45", ls=(0, (1, 2)), lw=1.2, label=f"{factor:g}× that: the criterion"),
        Line2D([], [], color="C3", label="fit S_min(1 + B_noise/B)"),
        Line2D([], [], color="C1", lw=2, label="measured B_crit"),
        Patch(color="C1", alpha=0.18, label="its 90% bootstrap interval"),
        Line2D([], [], color="C0", ls="-.", label="online B_simple"),
        Patch(facecolor="none", edgecolor="C0", alpha=0.35, hatch="//", label="its interval"),
    ]
    if has_truth:
        handles.append(Line2D([], [], color="k", ls=":", lw=1.2, label="true B_noise (closed form)"))
    fig.legend(handles=handles, loc="lower center", ncol=5 if n > 1 else 3, fontsize=8, frameon=False)
    right = 1 - 1.2 / width
    if norm is not None:
        cax = fig.add_axes([right + 0.015, 0.3, 0.012, 0.55])
        cb = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), cax=cax)
        cb.set_label("best lr at that batch size (colour of the dots)", fontsize=8)
        _log_axis(cb.ax.yaxis)
    fig.suptitle(f"{name}: steps to target after branching, by batch size", fontsize=11)
    fig.subplots_adjust(left=0.6 / width * 1.1, right=right, bottom=0.25, top=0.86, wspace=0.22)
    _save(fig, out, f"{name}_critical.png", files)

    # 2. Estimate vs measurement over training: the trunk's online B_simple, the measured B_crit.
    trunks = crit["trunks"]
    fig, (ax_loss, ax) = plt.subplots(2, 1, figsize=(7.8, 6.6), sharex=True, gridspec_kw={"height_ratios": [1, 2.2]})
    t0 = trunks[0]["curve"]
    x, y = _finite(t0["examples"][1:], t0["loss"][1:])
    ax_loss.plot(x, y, color="k", lw=1)
    for pt in points:
        ax_loss.axvline(pt["examples"], color="C1", lw=0.8, ls="--")
    ax_loss.set(yscale="log", ylabel="held-out loss", title=f"{name}: the reference run at batch size {b_ref}; "
                "branch points dashed")
    _log_axis(ax_loss.yaxis)
    y_lo, y_hi = ladder[0] / 4, ladder[-1] * 8
    ex = t0["examples"]
    per_seed = [t["curve"]["b_simple"] for t in trunks if len(t["curve"]["b_simple"]) == len(ex)]
    band_lo, band_hi = [], []
    for j in range(len(ex)):
        vals = [s[j] for s in per_seed if s[j] is not None and math.isfinite(s[j])]
        band_lo.append(min(vals) if vals else math.nan)
        band_hi.append(max(vals) if vals else math.nan)
    xs = np.array(ex[1:], float)
    lo_a, hi_a = np.array(band_lo[1:], float), np.array(band_hi[1:], float)
    ok = np.isfinite(lo_a) & np.isfinite(hi_a)
    ax.fill_between(xs[ok], np.clip(lo_a[ok], y_lo, y_hi), np.clip(hi_a[ok], y_lo, y_hi), color="C0", alpha=0.15,
                    lw=0, label=f"online B_simple: range over {len(per_seed)} reference runs (seeds)")
    x, y = _finite(t0["examples"][1:], t0["b_simple"][1:])
    ax.plot(x, y, color="C0", lw=1.3, label="online B_simple, the branched reference run")
    if any(v is not None for v in t0.get("b_simple_low", [])):
        xl, lo1 = _finite(t0["examples"][1:], t0["b_simple_low"][1:])
        xh, hi1 = _finite(t0["examples"][1:], t0["b_simple_high"][1:])
        ax.plot(xl, lo1, color="C0", lw=0.6, ls="--", label="the optimizer's 90% interval")
        ax.plot(xh, hi1, color="C0", lw=0.6, ls="--")
    if "b_noise_true" in t0:
        x, y = _finite(t0["examples"], t0["b_simple_true"])
        ax.plot(x, y, color="0.35", lw=1, ls=":", label="true B_simple")
        x, y = _finite(t0["examples"], t0["b_noise_true"])
        ax.plot(x, y, color="k", lw=1, ls="-.", label="true B_noise")
    first = True
    for pt in points:
        c = pt.get("criterion")
        if not c or c["value"] is None:
            continue
        ci = (pt.get("bootstrap") or {}).get("b_crit")
        label = "measured B_crit with 90% interval" if first else None
        first = False
        if math.isfinite(c["value"]):
            yerr = None
            if ci:
                yerr = [[c["value"] - max(ci[0], y_lo)], [min(ci[1], y_hi) - c["value"]]]
            ax.errorbar([pt["examples"]], [c["value"]], yerr=yerr, fmt="o", color="C1", ms=8, capsize=5, lw=1.8,
                        label=label, zorder=5)
        else:
            ax.plot([pt["examples"]], [ladder[-1]], "^", color="C1", ms=10, label=label, zorder=5)
            ax.annotate(f"B_crit > {ladder[-1]}", (pt["examples"], ladder[-1]), xytext=(-8, 8),
                        textcoords="offset points", ha="right", color="C1", fontsize=8)
        f = pt.get("fit") or {}
        if f.get("ok") and f["b_noise"] and math.isfinite(f["b_noise"]) and f["b_noise"] > 0:
            ax.plot([pt["examples"]], [f["b_noise"]], "s", mfc="none", color="C3", ms=8, mew=1.5,
                    label="fitted B_noise (same branches)" if label else None, zorder=5)
    ax.axhspan(ladder[0], ladder[-1], color="0.5", alpha=0.06, lw=0)
    ax.annotate("batch sizes tried", (0.0, ladder[-1]), xycoords=("axes fraction", "data"),
                xytext=(4, 3), textcoords="offset points", ha="left", fontsize=7, color="0.4")
    ax.set(xscale="log", yscale="log", xlabel="examples into the reference run", ylabel=f"batch size{unit}",
           ylim=(y_lo, y_hi))
    _log_axis(ax.yaxis)
    _log_axis(ax.xaxis)
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.19, top=0.95, hspace=0.06)
    _save(fig, out, f"{name}_estimate_vs_measured.png", files)

    # 3. The branches' learning curves at their best lr, against examples since the branch.
    cmap = plt.get_cmap("plasma")
    bnorm = LogNorm(ladder[0], ladder[-1] * 1.0001)
    width = 4.2 * n + 1.4
    fig, axes = plt.subplots(1, n, figsize=(width, 3.9), squeeze=False)
    for i, (ax, pt) in enumerate(zip(axes[0], points)):
        ax.set_title(f"{point_name(i, n)}: {pt['examples']:,} examples in", fontsize=10)
        top = pt["start_loss"]
        for rung in pt["rungs"]:
            j = rung.get("best") if rung.get("best") is not None else rung.get("guide")
            if j is None or not rung["runs"]:
                continue
            run = rung["runs"][j][0]
            x = [s * rung["batch_size"] for s in run["curve"]["steps"]]
            reached = rung.get("best") is not None
            colour = cmap(bnorm(rung["batch_size"]))
            ax.plot(x[1:], run["curve"]["loss"][1:], color=colour, lw=0.6, alpha=0.25)
            ax.plot(x[1:], smoothed(run["curve"]["loss"])[1:], color=colour, lw=1.4 if reached else 0.9,
                    ls="-" if reached else "--")
        ax.axhline(top, color="0.5", ls=":", lw=0.9)
        if pt.get("target"):
            ax.axhline(pt["target"], color="k", ls="--", lw=0.9)
            ax.set_ylim(pt["target"] - 0.15 * (top - pt["target"]), top + 0.35 * (top - pt["target"]))
        ax.set(xscale="log", xlabel="examples since the branch")
        _log_axis(ax.xaxis)
        if i == 0:
            ax.set_ylabel("held-out loss, smoothed (faint: raw)")
    right = 1 - 1.2 / width
    cax = fig.add_axes([right + 0.015, 0.2, 0.012, 0.6])
    cb = fig.colorbar(plt.cm.ScalarMappable(norm=bnorm, cmap=cmap), cax=cax)
    cb.set_label(f"batch size{unit}", fontsize=8)
    cb.set_ticks(ladder, labels=[str(b) for b in ladder])
    cb.minorticks_off()
    title = (f"{name}: each batch size's branch (best lr, first seed) from the branch point's loss (dotted) to the "
             "target (dashed); a dashed curve never reached it. Smoothed as judged (centred mean over 5 evaluations). "
             "Curves on top of each other: perfect scaling (the same examples at any batch size).")
    fig.suptitle(textwrap.fill(title, int(width * 11.5)), fontsize=9.5)
    fig.subplots_adjust(left=0.85 / width, right=right, bottom=0.16, top=0.74, wspace=0.22)
    _save(fig, out, f"{name}_branches.png", files)
    return files


def _rule_plots(name: str, res: dict, out: Path) -> list[str]:
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    files = []
    rules, sizes = res["rules"], res["batch_sizes"]
    cmap = plt.get_cmap("viridis")
    bnorm = LogNorm(min(sizes), max(sizes) * 1.0001)
    runs = {(r["batch_size"], r["rule"]): r for r in res["runs"]}

    def colorbar(fig, right: float) -> None:
        cax = fig.add_axes([right + 0.012, 0.2, 0.01, 0.6])
        cb = fig.colorbar(plt.cm.ScalarMappable(norm=bnorm, cmap=cmap), cax=cax)
        cb.set_label("batch size", fontsize=8)
        ticks = [b for b in sizes if b & (b - 1) == 0] or sizes  # powers of two: readable
        cb.set_ticks(ticks, labels=[str(b) for b in ticks])
        cb.minorticks_off()

    width = 3.9 * len(rules) + 1.2
    right = 1 - 1.0 / width
    # Learning curves per rule, against examples seen (Goyal et al.: they should coincide).
    fig, axes = plt.subplots(1, len(rules), figsize=(width, 3.6), sharey=True, squeeze=False)
    for ax, rule in zip(axes[0], rules):
        for b in sizes:
            c = runs[(b, rule)]["curve"]
            x, y = _finite(c["examples"][1:], c["loss"][1:])
            ax.plot(x, y, color=cmap(bnorm(b)), lw=1.1)
        ax.axhline(res["target_loss"], color="k", ls="--", lw=0.8)
        ax.set(xscale="log", yscale="log", title=f"scaling={rule}", xlabel="examples seen")
        _log_axis(ax.yaxis)
    axes[0][0].set_ylabel("held-out loss (dashed: target)")
    colorbar(fig, right)
    fig.suptitle(f"{name}: learning curves from scratch per scaling rule", fontsize=11)
    fig.subplots_adjust(left=0.7 / width, right=right, bottom=0.15, top=0.82, wspace=0.08)
    _save(fig, out, f"{name}_rules_learning_curves.png", files)

    # Steps vs examples to target, each point labelled by its batch size, with the fitted curve.
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for rule, marker in zip(rules, "osD^v<>"):
        pts = [(r["examples_to_target"], r["steps_to_target"], r["batch_size"]) for r in res["runs"]
               if r["rule"] == rule and r["steps_to_target"] and not r.get("shared_with")]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=26, label=rule, alpha=0.85)
    for bp in res["fits"].get("best_points", []):
        run = min((r for r in res["runs"] if r["batch_size"] == bp["batch_size"] and r["steps_to_target"]),
                  key=lambda r: r["steps_to_target"])
        ax.annotate(f"B={bp['batch_size']}", (run["examples_to_target"], run["steps_to_target"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points", color="0.3")
    best = res["fits"].get("best") or {}
    if best.get("ok") and best["b_noise"] and math.isfinite(best["b_noise"]) and best["b_noise"] > 0:
        bs = np.geomspace(min(sizes) / 4, max(sizes) * 4, 100)
        s = best["s_min"] * (1 + best["b_noise"] / bs)
        ax.plot(s * bs, s, "k-", lw=1, label=f"fit (best rule per B): B_noise={_fmt(best['b_noise'], 2)}")
        ax.axhline(best["s_min"], color="gray", ls=":", lw=0.8)
        ax.axvline(best["e_min"], color="gray", ls=":", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="examples to target", ylabel="steps to target",
           title=f"{name}: steps vs examples to loss {res['target_loss']:g} (from scratch)")
    _log_axis(ax.xaxis)
    _log_axis(ax.yaxis)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.92)
    _save(fig, out, f"{name}_rules_tradeoff.png", files)

    # B_simple over training, per rule (with the truth for least squares).
    has_truth = "b_simple_true" in res["runs"][0]["curve"]
    fig, axes = plt.subplots(1, len(rules), figsize=(width, 3.6), sharey=True, squeeze=False)
    for ax, rule in zip(axes[0], rules):
        for b in sizes:
            c = runs[(b, rule)]["curve"]
            x, y = _finite(c["examples"], c["b_simple"])
            ax.plot(x, y, color=cmap(bnorm(b)), lw=1.1)
            if has_truth:
                x, y = _finite(c["examples"], c["b_simple_true"])
                ax.plot(x, y, color=cmap(bnorm(b)), lw=0.8, ls="--")
        ax.set(xscale="log", yscale="log", xlabel="examples seen", title=f"scaling={rule}")
    axes[0][0].set_ylabel("online B_simple" + (" (dashed: truth)" if has_truth else ""))
    colorbar(fig, right)
    fig.suptitle(f"{name}: the optimizer's online B_simple while training from scratch", fontsize=11)
    fig.subplots_adjust(left=0.7 / width, right=right, bottom=0.15, top=0.82, wspace=0.08)
    _save(fig, out, f"{name}_rules_b_simple.png", files)

    if has_truth:
        fig, ax = plt.subplots(figsize=(5.8, 4.8))
        lo, hi = math.inf, 0.0
        for r in res["runs"]:
            c, start = r["curve"], 1.0 / (1.0 - r["noise_beta"])
            pts = [(t, e) for s, t, e in zip(c["steps"], c["b_simple_true_ema"], c["b_simple"])
                   if s >= start and t and e and math.isfinite(t) and math.isfinite(e) and t > 0 and e > 0]
            if pts:
                ax.scatter(*zip(*pts), s=5, color=cmap(bnorm(r["batch_size"])), alpha=0.5)
                lo, hi = min(lo, *(min(p) for p in pts)), max(hi, *(max(p) for p in pts))
        if hi > 0:
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="estimate = truth")
            ax.legend(fontsize=8)
        ax.set(xscale="log", yscale="log", xlabel="true B_simple (same moving average)",
               ylabel="online B_simple", title=f"{name}: estimator vs truth, from scratch")
        colorbar(fig, 0.86)
        fig.subplots_adjust(left=0.13, right=0.86, bottom=0.12, top=0.92)
        _save(fig, out, f"{name}_rules_estimator_vs_truth.png", files)
    return files
