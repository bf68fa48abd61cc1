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
            s = steps[i - 1] + t * (steps[i] - steps[i - 1])
            batch = examples[i] / steps[i] if steps[i] else 0.0
            return s, s * batch
    return None


def fit_tradeoff(batch_sizes, steps) -> dict | None:
    """Fit S = S_min(1 + B_noise/B) to (B, steps-to-target) pairs; None if fewer than 2 distinct B.

    Returns S_min, E_min, B_noise (inf when S does not fall with B, i.e. no sign of a critical
    batch size in range; negative b means more steps at larger B), and the relative RMS residual.
    """
    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    keep = np.isfinite(s) & (s > 0) & (b > 0)
    b, s = b[keep], s[keep]
    if len(np.unique(b)) < 2:
        return None
    w = 1.0 / s
    design = np.stack([w, w / b], axis=1)  # rows (1/S, 1/(B·S)) · (a, b) ≈ 1
    (a, slope), *_ = np.linalg.lstsq(design, np.ones_like(s), rcond=None)
    fitted = a + slope / b
    rel_rms = float(np.sqrt(np.mean(((s - fitted) / s) ** 2)))
    if a <= 0:
        # Steps still falling like 1/B across the whole range: perfect scaling, S_min unresolved.
        return {"s_min": float(a), "e_min": float(slope), "b_noise": math.inf, "rel_rms": rel_rms,
                "points": int(len(s)), "note": "S ∝ 1/B over the whole range: B_noise above the largest batch"}
    b_noise = slope / a
    if b_noise <= 0:
        return {"s_min": float(a), "e_min": math.nan, "b_noise": float(b_noise), "rel_rms": rel_rms,
                "points": int(len(s)), "note": "steps do not fall with the batch size: no critical batch size in range"}
    return {"s_min": float(a), "e_min": float(a * b_noise), "b_noise": float(b_noise), "rel_rms": rel_rms,
            "points": int(len(s)), "note": ""}


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
