"""From measured runs to the steps/examples trade-off (McCandlish et al. 2018, §2.2 and eq. 2.11).

    S = S_min (1 + B_noise / B),   E = E_min (1 + B / B_noise),   E_min = S_min · B_noise

so (S/S_min − 1)(E/E_min − 1) = 1. S is linear in 1/B: S = a + b/B with S_min = a and
B_noise = b/a; one weighted least-squares solve gives both (the E fit follows, E = S·B). Steps
to target span orders of magnitude across batch sizes, so residuals are taken relative to S
(weights 1/S): a 10-step error at S = 20 matters as much as a 500-step error at S = 1000.
"""

from __future__ import annotations

import math

import numpy as np


def crossing(curve: dict, target: float) -> tuple[float, float] | None:
    """(steps, examples) where the held-out loss first falls to ``target``, interpolated linearly
    between the two evaluations around the crossing; None if it never does."""
    steps, examples, loss = curve["steps"], curve["examples"], curve["loss"]
    for i, value in enumerate(loss):
        if not math.isfinite(value):
            return None
        if value <= target:
            if i == 0:
                return 0.0, 0.0
            hi, lo = loss[i - 1], value
            t = (hi - target) / (hi - lo) if hi != lo else 1.0
            # Both interpolated: a run whose batch size changes (the adaptive arm) has examples ≠ B·steps.
            return (steps[i - 1] + t * (steps[i] - steps[i - 1]),
                    examples[i - 1] + t * (examples[i] - examples[i - 1]))
    return None


MIN_FIT_POINTS = 3  # two parameters: with two points the curve passes through both (residual ~1e-16)


def fit_tradeoff(batch_sizes, steps, min_points: int = MIN_FIT_POINTS) -> dict:
    """Fit S = S_min(1 + B_noise/B) to (B, steps-to-target) pairs (None or non-finite steps: not
    reached, left out).

    Always returns a dict: ``ok`` False with a ``note`` saying why when fewer than ``min_points``
    distinct batch sizes reached the target (a two-parameter curve through two points fits them
    exactly and says nothing). Otherwise S_min, E_min, B_noise (inf when S still falls like 1/B
    over the whole range, i.e. no sign of a critical batch size; negative when larger batches need
    more steps) and the relative RMS residual.
    """
    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray([math.nan if v is None else v for v in steps], dtype=float)
    keep = np.isfinite(s) & (s > 0) & (b > 0)
    b, s = b[keep], s[keep]
    distinct = len(np.unique(b))
    empty = {"ok": False, "s_min": None, "e_min": None, "b_noise": None, "rel_rms": None, "points": int(len(s))}
    if distinct < min_points:
        return {**empty, "note": f"too few points to fit: {distinct} batch size{'s' * (distinct != 1)} reached "
                                 f"the target, the two-parameter fit needs at least {min_points}"}
    w = 1.0 / s
    design = np.stack([w, w / b], axis=1)  # rows (1/S, 1/(B·S)) · (a, b) ≈ 1
    (a, slope), *_ = np.linalg.lstsq(design, np.ones_like(s), rcond=None)
    fitted = a + slope / b
    rel_rms = float(np.sqrt(np.mean(((s - fitted) / s) ** 2)))
    out = {"ok": True, "s_min": float(a), "rel_rms": rel_rms, "points": int(len(s))}
    if a <= 0:
        # Steps still falling like 1/B across the whole range: perfect scaling, S_min unresolved.
        return {**out, "e_min": float(slope), "b_noise": math.inf,
                "note": "S ∝ 1/B over the whole range: B_noise above the largest batch"}
    b_noise = slope / a
    if b_noise <= 0:
        return {**out, "e_min": math.nan, "b_noise": float(b_noise),
                "note": "steps do not fall with the batch size: no critical batch size in range"}
    return {**out, "e_min": float(a * b_noise), "b_noise": float(b_noise), "note": ""}


def tradeoff_curve(fit: dict, batch_sizes) -> tuple[list[float], list[float]]:
    """(steps, examples) of the fitted curve at ``batch_sizes``."""
    s = [fit["s_min"] * (1.0 + fit["b_noise"] / b) for b in batch_sizes]
    return s, [si * b for si, b in zip(s, batch_sizes)]


def curve_mismatch(curve: dict, reference: dict, points: int = 64) -> dict:
    """Mean |loss_B(e) − loss_ref(e)| over a shared grid of examples seen e.

    Both curves are linearly interpolated in e onto ``points`` evenly spaced values in
    (0, e_max], e_max the smaller of the two runs' last evaluation (and before any non-finite
    loss). Goyal et al. 2017 ask exactly this of a scaling rule: that the large-batch learning
    curve against examples seen lies on the small-batch one. Also returns the max and e_max.
    """
    def finite_prefix(c):
        e, l = [], []
        for x, y in zip(c["examples"], c["loss"]):
            if not math.isfinite(y):
                break
            e.append(x)
            l.append(y)
        return np.asarray(e, float), np.asarray(l, float)

    e1, l1 = finite_prefix(curve)
    e0, l0 = finite_prefix(reference)
    if len(e1) < 2 or len(e0) < 2:
        return {"mean_abs": math.nan, "max_abs": math.nan, "examples": 0}
    e_max = min(e1[-1], e0[-1])
    grid = np.linspace(e_max / points, e_max, points)
    diff = np.abs(np.interp(grid, e1, l1) - np.interp(grid, e0, l0))
    return {"mean_abs": float(diff.mean()), "max_abs": float(diff.max()), "examples": int(e_max)}


# ----------------------------------------------------------------- the critical batch size, measured
def critical_batch(batch_sizes, steps, factor: float = 2.0) -> dict:
    """The criterion: the largest batch size that still reaches the target in proportionally
    fewer steps, within ``factor``.

    With S(B) the steps to target at batch size B and B_ref the smallest batch size, perfect linear
    scaling is S(B) = S(B_ref)·B_ref/B, i.e. the same number of examples. The examples ratio
    r(B) = B·S(B) / (B_ref·S(B_ref)) is 1 there; a batch size passes while r(B) <= ``factor``.
    Going up the ladder, the first batch size that fails (or never reaches the target) ends the
    search; B_crit is where log r crosses log ``factor``, interpolated linearly in log B between
    the last passing and the first failing batch size (the last passing one when the failing one
    never reached the target: then B_crit is only known to lie between the two).

    Under McCandlish et al.'s model E(B) = E_min(1 + B/B_noise), r(B) = (B_noise + B)/(B_noise + B_ref),
    so with ``factor`` = 2 the crossing is at B_noise + 2·B_ref: the batch size at which training
    needs twice the minimum examples (and twice the minimum steps) -- their definition of B_crit.

    Returns value (inf when every batch size passes: B_crit is above the ladder), largest_passing,
    first_failing (None when none fails), ratios and a status: "interpolated", "unreached"
    (the first failing batch size never reached the target) or "above" (all passed).
    """
    b = [float(x) for x in batch_sizes]
    s = [math.inf if v is None or not math.isfinite(v) else float(v) for v in steps]
    if not b or not math.isfinite(s[0]) or s[0] <= 0:
        return {"value": None, "largest_passing": None, "first_failing": None, "ratios": [],
                "status": "no reference", "factor": factor}
    ref = b[0] * s[0]
    ratios = [bi * si / ref for bi, si in zip(b, s)]
    for i in range(1, len(b)):
        if not ratios[i] <= factor:  # inf and nan fail too
            p = i - 1
            if math.isfinite(ratios[i]):
                lo, hi = math.log(max(ratios[p], 1e-12)), math.log(ratios[i])
                t = (math.log(factor) - lo) / (hi - lo) if hi > lo else 0.0
                value = math.exp(math.log(b[p]) + min(max(t, 0.0), 1.0) * (math.log(b[i]) - math.log(b[p])))
                status = "interpolated"
            else:
                value, status = b[p], "unreached"
            return {"value": value, "largest_passing": b[p], "first_failing": b[i], "ratios": ratios,
                    "status": status, "factor": factor}
    return {"value": math.inf, "largest_passing": b[-1], "first_failing": None, "ratios": ratios,
            "status": "above", "factor": factor}


def interval(values, level: float = 0.9) -> tuple[float, float] | None:
    """Percentile interval of bootstrap replicates, by order statistics (so an infinite replicate,
    e.g. 'B_crit above the ladder', is an infinite bound rather than a NaN); None if empty."""
    v = sorted(float(x) for x in values if x is not None and not math.isnan(x))
    if not v:
        return None
    n, tail = len(v), (1.0 - level) / 2.0
    lo = v[min(n - 1, max(0, int(math.floor(tail * n))))]
    hi = v[min(n - 1, max(0, int(math.ceil((1.0 - tail) * n)) - 1))]
    return lo, hi


def _fit_quantities(batch_sizes, steps) -> tuple[float, float]:
    f = fit_tradeoff(batch_sizes, steps)
    if not f["ok"]:
        return math.nan, math.nan
    return f["b_noise"], f["s_min"]


def bootstrap_branch(batch_sizes, steps, factor: float = 2.0, n: int = 1000, level: float = 0.9,
                     seed: int = 0) -> dict:
    """Bootstrap intervals for one branch point's measurement.

    ``steps[i][j][k]``: steps to target at batch size i, learning rate j and repeated seed k (inf or
    None: not reached). Each replicate resamples the seeds with replacement, independently per
    batch size and jointly across its learning rates (a seed is the same batches at every lr),
    averages the steps over the resampled seeds, keeps the best lr per batch size (the tuning is
    redone in every replicate), and recomputes B_crit (criterion) and the fit. The target is held
    fixed (branches stop when they reach it). Returns the intervals and the replicates' count of
    failed fits.
    """
    n_lr = max(len(per_b) for per_b in steps)  # batch sizes may have tried different numbers of lrs
    arr = np.full((len(steps), n_lr, max(len(row) for per_b in steps for row in per_b)), math.inf)  # [B, lr, seed]
    for i, per_b in enumerate(steps):
        for j, row in enumerate(per_b):
            arr[i, j, :] = [math.inf if x is None else float(x) for x in row]
    n_b, _, n_s = arr.shape
    rng = np.random.default_rng(seed)
    crit, b_noise, s_min = [], [], []
    for _ in range(n):
        idx = rng.integers(0, n_s, size=(n_b, n_s))
        picked = np.take_along_axis(arr, idx[:, None, :].repeat(arr.shape[1], axis=1), axis=2)
        best = picked.mean(axis=2).min(axis=1)  # inf when no lr reached with every resampled seed
        c = critical_batch(batch_sizes, list(best), factor)["value"]
        crit.append(math.nan if c is None else c)
        bn, sm = _fit_quantities(batch_sizes, list(best))
        b_noise.append(bn)
        s_min.append(sm)
    failed = sum(math.isnan(x) for x in b_noise)
    return {
        "replicates": n,
        "level": level,
        "b_crit": interval(crit, level),
        "fit_b_noise": interval(b_noise, level) if failed < n / 2 else None,
        "fit_s_min": interval(s_min, level) if failed < n / 2 else None,
        "fit_failed": failed,
    }


def bootstrap_points(batch_sizes, steps, n: int = 1000, level: float = 0.9, seed: int = 0) -> dict:
    """Bootstrap intervals for a fit to single (B, steps-to-target) points (one run each): resample
    the points with replacement and refit. Replicates with too few distinct batch sizes are
    counted as failed; with more than half failed there is no interval."""
    pts = [(float(b), float(s)) for b, s in zip(batch_sizes, steps) if s is not None and math.isfinite(s) and s > 0]
    rng = np.random.default_rng(seed)
    b_noise, s_min = [], []
    for _ in range(n if pts else 0):
        idx = rng.integers(0, len(pts), size=len(pts))
        bn, sm = _fit_quantities([pts[i][0] for i in idx], [pts[i][1] for i in idx])
        b_noise.append(bn)
        s_min.append(sm)
    failed = sum(math.isnan(x) for x in b_noise) + (n if not pts else 0)
    ok = failed < n / 2
    return {"replicates": n, "level": level, "fit_b_noise": interval(b_noise, level) if ok else None,
            "fit_s_min": interval(s_min, level) if ok else None, "fit_failed": failed}
