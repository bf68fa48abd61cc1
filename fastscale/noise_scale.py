"""Gradient noise scale from two batch sizes, kept on the device (McCandlish et al. 2018).

With true gradient G and per-example covariance Σ, a mean gradient over B examples has
``E|G_B|² = |G|² + tr(Σ)/B``. From the squared norms of gradients at two batch sizes
``B_small < B_big`` (Appendix A)::

    |G|²  ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

Each is unbiased; their ratio is not, so each is averaged with a bias-corrected exponential
moving average and the averages are divided: ``B_simple = tr(Σ) / |G|²``.

Statistics flow one way: a source (micro-batch accumulation, per-example norms, data-parallel
replicas) produces one :class:`Measurement` per step, complete before ``step()`` (so clipping
or unscaling ``.grad`` afterwards cannot change it); the :class:`StatisticsTracker` holds it
until the step and hands it to the :class:`NoiseScaleEstimator`. Every update is a handful of
tensor ops on the device, masked with ``torch.where`` rather than branched on, so a training
step never waits for the device; only reading a figure synchronises.
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
import statistics
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops, reference, sharded


@dataclass(frozen=True)
class NoiseScaleConfig:
    """How the optimizer estimates the gradient noise scale (see :class:`NoiseScaleEstimator`).

    windows: the window lengths, in updates, among which the estimator picks per step the
        longest one consistent with the shorter ones (default 16 … 4096).
    beta: instead of ``windows``, one fixed window of decay ``beta`` per update (0 <= beta < 1,
        window 1/(1 − beta)); ``beta=0`` uses the last step alone.
    per_tensor: also estimate per parameter tensor (per-layer noise scale).
    min_updates: updates before the estimate can count as ready (``scaling="noise"`` uses its
        fallback until the estimate is ready).
    level: coverage of the reported intervals (default 0.9).
    ici_width: half-width, in standard errors, of the intervals compared to choose the window.
    noise_window: window, in updates, of the per-step noise variance (from successive differences).
    measure_every: ``accumulate_grad()`` measures one optimizer step in this many (the first,
        then every ``measure_every``-th ``step()`` call, counted on the host: a step skipped
        for an AMP overflow counts, a step replayed from a CUDA graph does not); on the others
        it only checks its arguments and the gradient hooks return at once, so a measured
        step costs what it did and the others nearly nothing. Updates (and so ``windows``,
        ``min_updates``, ``noise_window``) then count measured steps. Other sources
        (per-example norms, replicas) measure whenever they are called.
    """

    beta: float | None = None
    per_tensor: bool = True
    min_updates: int = 20
    windows: tuple = (16, 64, 256, 1024, 4096)
    level: float = 0.9
    ici_width: float = 2.0
    noise_window: int = 64
    measure_every: int = 1

    def __post_init__(self):
        if self.beta is not None and (
            isinstance(self.beta, bool) or not (isinstance(self.beta, numbers.Real) and 0.0 <= self.beta < 1.0)
        ):
            raise ValueError(f"NoiseScaleConfig.beta must be None or a float in [0, 1), got {self.beta!r}")
        if not isinstance(self.per_tensor, bool):
            raise TypeError(f"NoiseScaleConfig.per_tensor must be a bool, got {self.per_tensor!r}")
        if isinstance(self.min_updates, bool) or not (isinstance(self.min_updates, int) and self.min_updates >= 0):
            raise ValueError(f"NoiseScaleConfig.min_updates must be an int >= 0, got {self.min_updates!r}")
        windows = self.windows
        if not (isinstance(windows, tuple) and windows and all(
                isinstance(w, numbers.Real) and not isinstance(w, bool) and w >= 1 for w in windows)
                and list(windows) == sorted(set(windows))):
            raise ValueError(f"NoiseScaleConfig.windows must be a tuple of increasing numbers >= 1, got {windows!r}")
        if isinstance(self.level, bool) or not (isinstance(self.level, numbers.Real) and 0.0 < self.level < 1.0):
            raise ValueError(f"NoiseScaleConfig.level must be a float in (0, 1), got {self.level!r}")
        if isinstance(self.ici_width, bool) or not (isinstance(self.ici_width, numbers.Real) and self.ici_width > 0):
            raise ValueError(f"NoiseScaleConfig.ici_width must be a float > 0, got {self.ici_width!r}")
        if isinstance(self.noise_window, bool) or not (
                isinstance(self.noise_window, numbers.Real) and self.noise_window >= 2):
            raise ValueError(f"NoiseScaleConfig.noise_window must be a number >= 2, got {self.noise_window!r}")
        if isinstance(self.measure_every, bool) or not (isinstance(self.measure_every, int) and self.measure_every >= 1):
            raise ValueError(f"NoiseScaleConfig.measure_every must be an int >= 1, got {self.measure_every!r}")

    def window_lengths(self) -> tuple:
        """The windows in use: ``windows``, or the one window of a fixed ``beta``."""
        return (1.0 / (1.0 - self.beta),) if self.beta is not None else tuple(float(w) for w in self.windows)

    @property
    def z(self) -> float:
        """Normal quantile of the two-sided ``level`` interval (1.645 for 90%)."""
        return statistics.NormalDist().inv_cdf(0.5 + self.level / 2)

    @staticmethod
    def from_arg(arg) -> "NoiseScaleConfig | None":
        """``noise_scale=`` argument of the optimizer: False/None, True, or a config."""
        if arg is None or arg is False:
            return None
        if arg is True:
            return NoiseScaleConfig()
        if isinstance(arg, NoiseScaleConfig):
            return arg
        raise TypeError(f"noise_scale must be a bool or a NoiseScaleConfig, got {type(arg).__name__}")


def two_batch_estimates(small_sq, big_sq, b_small: float, b_big: float):
    """Unbiased estimates (|G|², tr(Σ)) from mean squared norms at two batch sizes."""
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


def device_scalar(value: float, device, dtype=torch.float64) -> Tensor:
    """Scalar state as a 1-element tensor, never 0-dim: dynamo treats a 0-dim fp64 CPU tensor
    like a wrapped Python float, and an in-place update of one was lost when it restarted
    analysis (torch 2.13, aot_eager and inductor): warmup and statistics froze under compile."""
    return torch.full((1,), value, dtype=dtype, device=device)


@dataclass
class Measurement:
    """One step's squared gradient norms at two batch sizes, as the true mean gradients
    (loss scale and AMP scale divided out), complete before ``step()``.

    ``small_sq``: mean of |G_small|² over the small batches; ``big_sq``: |G_big|² of their
    union (both 1-element fp64 tensors). ``small_pt``/``big_pt``: the same per parameter
    tensor (fp32, indexed like the optimizer's parameters), ``present``: which tensors had a
    gradient. ``examples``: examples behind the step.

    With DTensor parameters (:mod:`fastscale.sharded`): ``local_pt`` names the per-tensor fields
    that hold this rank's shards only (their totals follow them), ``local_examples`` says that
    ``small_sq``/``small_pt`` are over this rank's examples only; both are made whole by the
    step's one collective. Without DTensors, local is whole and both are ignored.
    """

    small_sq: Tensor
    big_sq: Tensor
    b_small: float
    b_big: float
    small_pt: Tensor | None = None
    big_pt: Tensor | None = None
    present: Tensor | None = None
    examples: float | None = None
    local_pt: tuple = ()
    local_examples: bool = False


class NoiseScaleEstimator:
    """|G|², tr(Σ) and B_simple with standard errors, total and per tensor, on one device.

    Each step gives unbiased but noisy estimates (g2, tr) of quantities that drift as training
    moves the parameters. A bank of exponentially weighted local-linear fits, one per window
    length in ``config.windows``, estimates each quantity *now* (the fitted line at the current
    step, so a steady drift does not lag); the per-step noise variance comes from successive
    differences (which a slow drift barely inflates). The window used is the longest one whose
    intervals of B_simple, |G|² and tr(Σ) still overlap those of all shorter windows (the
    intersection of confidence intervals rule, Goldenshluger & Nemirovski 1997; Katkovnik 1999):
    short while the figures move, long while they are stable. Its standard error gives the
    reported interval.

    Columns: 0 is the total over all tensors, 1… the tensors by the optimizer's parameter
    position (``n_tensors`` of them when ``config.per_tensor``). Everything is a handful of
    vectorised tensor ops per step, masked rather than branched, so nothing waits for the
    device; only :meth:`read` synchronises.
    """

    _KEYS = ("fit", "noise", "prev", "updates")

    def __init__(self, config: NoiseScaleConfig, n_tensors: int, device: torch.device):
        self.config = config
        self.device = device
        windows = config.window_lengths()
        self.betas = torch.tensor([1.0 - 1.0 / w for w in windows], dtype=torch.float64, device=device)
        self.windows = torch.tensor(windows, dtype=torch.float64, device=device)
        self.n_tensors = n_tensors
        k, c = len(windows), 1 + (n_tensors if config.per_tensor else 0)
        f64 = dict(dtype=torch.float64, device=device)
        # Weighted-regression sums per window and column, on the age j of each update
        # (weights beta^j): S0 S1 S2 = Σw, Σw·j, Σw·j²; Q0 Q1 Q2 the same with w²; then for
        # g2 and tr: Σw·x and Σw·j·x. 10 × K × C.
        self.fit = torch.zeros(10, k, c, **f64)
        # EMA of squared successive differences (g2, tr, cross) and its weight: 4 × C.
        self.noise = torch.zeros(4, c, **f64)
        self.prev = torch.full((3, c), math.nan, **f64)  # last (g2, tr) and whether there is one
        self.prev[2] = 0.0
        self.updates = torch.zeros(c, **f64)

    def resized(self, n_tensors: int) -> "NoiseScaleEstimator":
        """A copy with room for ``n_tensors`` tensors (new entries empty): for add_param_group."""
        new = NoiseScaleEstimator(self.config, n_tensors, self.device)
        new.load_state_dict(self.state_dict(), pad_to=n_tensors)
        return new

    # ----------------------------------------------------------------- update
    def update(self, m: Measurement, skip: Tensor | None) -> None:
        """Fold one step's measurement in, on the device, without a sync. A step whose ``skip``
        flag is set (AMP overflow) or whose estimates are not finite changes nothing; a tensor
        not ``present`` this step keeps its figures."""
        if not m.b_big > m.b_small:
            return  # one batch size: no information about the noise
        small, big = m.small_sq.double().reshape(1), m.big_sq.double().reshape(1)
        c = self.updates.numel()
        present = torch.ones(1, dtype=torch.bool, device=self.device)
        if c > 1:
            if m.small_pt is None or m.big_pt is None:
                small_pt = big_pt = torch.full((c - 1,), math.nan, dtype=torch.float64, device=self.device)
            else:
                small_pt, big_pt = m.small_pt.double(), m.big_pt.double()
            small, big = torch.cat([small, small_pt]), torch.cat([big, big_pt])
            pt_present = m.present if m.present is not None else torch.ones(c - 1, dtype=torch.bool, device=self.device)
            present = torch.cat([present, pt_present.to(self.device)])
        g2, tr = two_batch_estimates(small, big, m.b_small, m.b_big)
        ok = present & torch.isfinite(g2) & torch.isfinite(tr)
        ok = ok & ok[:1]  # a step the total rejects is rejected for every tensor
        if skip is not None:
            ok = ok & ~skip.to(device=self.device, dtype=torch.bool).reshape(1)
        x = torch.stack([torch.where(ok, g2, 0.0), torch.where(ok, tr, 0.0)])  # 2 × C
        self._fold(x, ok)

    def _fold(self, x: Tensor, ok: Tensor) -> None:
        okf = ok.double()
        b = self.betas[:, None]
        b = torch.where(ok, b, 1.0)  # rejected: no decay, no ageing, nothing added
        b2 = b * b
        f = self.fit
        s0, s1, s2, q0, q1, q2 = f[0], f[1], f[2], f[3], f[4], f[5]
        # Ageing every past update by one step, then adding this one at age 0.
        new = torch.stack([
            b * s0 + okf,
            b * (s1 + s0 * okf),
            b * (s2 + (2 * s1 + s0) * okf),
            b2 * q0 + okf,
            b2 * (q1 + q0 * okf),
            b2 * (q2 + (2 * q1 + q0) * okf),
            b * f[6] + x[0],
            b * (f[7] + f[6] * okf),
            b * f[8] + x[1],
            b * (f[9] + f[8] * okf),
        ])
        self.fit.copy_(new)
        # Successive differences: Var(x_t − x_{t−1}) = 2·Var(x) for independent steps.
        has_prev = ok & (self.prev[2] > 0)
        d = x - torch.where(has_prev, self.prev[:2], x)
        beta_n = 1.0 - 1.0 / self.config.noise_window
        nb = torch.where(has_prev, beta_n, 1.0)
        add = torch.where(has_prev, 1.0 - beta_n, 0.0)
        sq = torch.stack([d[0] * d[0], d[1] * d[1], d[0] * d[1]]) / 2
        self.noise[:3].mul_(nb).add_(add * sq)
        self.noise[3].mul_(nb).add_(add)
        self.prev[:2].copy_(torch.where(ok, x, self.prev[:2]))
        self.prev[2].copy_(torch.where(ok, 1.0, self.prev[2]))
        self.updates.add_(okf)

    # ----------------------------------------------------------------- estimates
    def _estimates(self, columns: slice = slice(None)) -> dict:
        """Per column (of ``columns``): the chosen window's |G|², tr(Σ), B_simple and their
        standard errors."""
        f, noise = self.fit[..., columns], self.noise[:, columns]
        s0, s1, s2, q0, q1, q2 = f[0], f[1], f[2], f[3], f[4], f[5]
        safe_s0 = s0.clamp_min(1e-300)
        det = s0 * s2 - s1 * s1
        # A trend needs >= 3 updates that are not all of one age.
        sloped = det > 1e-9 * s2.clamp_min(1e-300) * safe_s0
        safe_det = torch.where(sloped, det, 1.0)
        age = s1 / safe_s0  # weighted mean age of the window's updates

        def now(sx, sjx):
            """(weighted mean, the trend carried from the mean age to now). The trend is
            log-linear: the fitted slope relative to the mean, applied multiplicatively, so a
            figure decaying exponentially (|G|² early in training) is followed without lag and
            never extrapolated below zero; clamped to one e-fold."""
            mean = sx / safe_s0
            slope = (s0 * sjx - s1 * sx) / safe_det  # d x / d age
            rate = -slope / torch.where(mean != 0, mean, 1.0)
            return mean, torch.where(sloped, mean * torch.exp((rate * age).clamp(-1.0, 1.0)), mean)

        g2_mean, g2_now = now(f[6], f[7])
        tr_mean, tr_now = now(f[8], f[9])
        # Variance factors (per unit per-step variance) of the mean and of the fitted line's
        # value at age 0, the delta-method stand-in for the trend estimate.
        v_mean = q0 / (safe_s0 * safe_s0)
        v_now = torch.where(sloped, (s2 * s2 * q0 - 2 * s1 * s2 * q1 + s1 * s1 * q2) / (safe_det * safe_det), v_mean)
        # Candidates from noisiest to steadiest: the trend at each window, then the plain mean
        # at the longest windows (steadiest of all when nothing drifts).
        steady = slice(max(len(self.windows) - 2, 0), None)
        g2 = torch.cat([g2_now, g2_mean[steady]])
        tr = torch.cat([tr_now, tr_mean[steady]])
        factor = torch.cat([v_now, v_mean[steady]])
        windows = torch.cat([self.windows, self.windows[steady]])
        weight = noise[3].clamp_min(1e-300)
        v_g2, v_tr, c_gt = (noise[:3] / weight)[:, None, :] * factor  # candidates × C each
        known = (noise[3] > 0) & (torch.cat([s0, s0[steady]]) > 0)
        b = tr / torch.where(g2 != 0, g2, math.nan)
        rel = v_tr / (tr * tr) + v_g2 / (g2 * g2) - 2 * c_gt / (tr * g2)
        sd_b = b.abs() * rel.clamp_min(0).sqrt()
        sd_g2, sd_tr = v_g2.clamp_min(0).sqrt(), v_tr.clamp_min(0).sqrt()
        # ICI: the last candidate whose interval meets every earlier candidate's, for B_simple
        # and for |G|² and tr(Σ) each. A window over which |G|² or tr(Σ) drifts beyond its noise
        # has averages that lag, and their ratio lags too unless both drift in proportion, which
        # nothing guarantees: a part of tr(Σ) that does not fall with |G|² (label noise, say) makes
        # the ratio of long means lag by a few percent, too little for any test on B_simple
        # alone to see, while the drift of |G|² itself is plain. (B_simple alone: 79-85%
        # coverage on the moving target of tests/test_estimator.py, all three: 90-92%.)
        gamma = self.config.ici_width
        meets = torch.ones_like(b, dtype=torch.bool)
        for value, sd in ((b, sd_b), (g2, sd_g2), (tr, sd_tr)):
            usable = known & torch.isfinite(value) & torch.isfinite(sd)
            half = gamma * sd + 1e-9 * value.abs()  # a figure with no noise (a constant): rounding is no drift
            lo = torch.where(usable, value - half, -math.inf)
            hi = torch.where(usable, value + half, math.inf)
            meets = meets & (torch.cummax(lo, 0).values <= torch.cummin(hi, 0).values)
        chosen = (torch.cumprod(meets.long(), 0).sum(0) - 1).clamp_min(0)  # C
        pick = lambda t: t.gather(0, chosen[None, :])[0]  # noqa: E731
        earlier = torch.arange(b.shape[0], device=b.device)[:, None] <= chosen[None, :]

        z = self.config.z

        def stderr(values, sds):
            """The chosen estimate's noise, plus its lag: a noisier candidate that differs from
            it by more than z standard errors of the difference is evidence of a drift the
            chosen one lags behind, and the whole difference joins its error. The candidates
            are nested (a longer window holds the shorter one's updates), so the difference's
            variance is the noisier one's minus the chosen one's (Hausman 1978), not the sum."""
            v, s = pick(values), pick(sds)
            gap = (values - v).abs()
            seen = gap > z * (sds * sds - s * s).clamp_min(0).sqrt()
            lag = torch.where(earlier & seen & torch.isfinite(gap), gap, 0.0).amax(0)
            return (s * s + lag * lag).sqrt()

        return {
            "grad_sq_norm": pick(g2), "trace_cov": pick(tr), "b_simple": pick(b),
            "grad_sq_norm_stderr": stderr(g2, sd_g2),
            "trace_cov_stderr": stderr(tr, sd_tr),
            "b_simple_stderr": stderr(b, sd_b), "window": windows[chosen],
            "trend": chosen < len(self.windows),
        }

    def _ready(self, est: dict, columns: slice = slice(None)) -> Tensor:
        """Per column: enough updates, both figures positive, and B_simple's interval above 0."""
        z = self.config.z
        return ((self.updates[columns] >= max(self.config.min_updates, 1)) & (est["grad_sq_norm"] > 0)
                & (est["trace_cov"] > 0) & (est["b_simple"] - z * est["b_simple_stderr"] > 0))

    def b_noise(self, fallback: float) -> Tensor:
        """1-element device tensor: the current B_simple, or ``fallback`` until it is ready (no sync)."""
        total = slice(0, 1)
        est = self._estimates(total)
        return torch.where(self._ready(est, total), est["b_simple"], fallback)

    def read(self) -> dict:
        """Host copy of the estimates, their standard errors and 90% intervals, and whether the
        figure is ready (this synchronises with the device)."""
        est = self._estimates()
        ready = self._ready(est)
        z = self.config.z
        host = {k: v.cpu().tolist() for k, v in est.items()}
        host["ready"] = ready.cpu().tolist()
        updates = self.updates.cpu().tolist()
        out = {}
        for key in ("grad_sq_norm", "trace_cov", "b_simple"):
            value, sd = host[key][0], host[f"{key}_stderr"][0]
            out[key], out[f"{key}_stderr"] = _finite_or_nan(value), _finite_or_nan(sd)
            out[f"{key}_low"], out[f"{key}_high"] = _finite_or_nan(value - z * sd), _finite_or_nan(value + z * sd)
        out["updates"] = int(updates[0])
        out["window"] = int(host["window"][0])
        out["trend"] = bool(host["trend"][0])
        out["ready"] = bool(host["ready"][0])
        out["not_ready"] = None if out["ready"] else self._why_not(out, updates[0])
        if self.config.per_tensor:
            for key in ("grad_sq_norm", "trace_cov", "b_simple"):
                vals, sds = host[key][1:], host[f"{key}_stderr"][1:]
                seen = [u > 0 for u in updates[1:]]
                out[f"{key}_per_tensor"] = [_finite_or_nan(v) if s else math.nan for v, s in zip(vals, seen)]
                out[f"{key}_stderr_per_tensor"] = [_finite_or_nan(v) if s else math.nan for v, s in zip(sds, seen)]
            out["ready_per_tensor"] = host["ready"][1:]
        return out

    def _why_not(self, out: dict, updates: float) -> str:
        if updates < max(self.config.min_updates, 1):
            return f"warming up: {int(updates)} of {max(self.config.min_updates, 1)} updates"
        if not out["grad_sq_norm"] > 0:
            return "the |G|² estimate is not positive yet (the batches are far below the noise scale)"
        if not out["trace_cov"] > 0:
            return "the tr(Σ) estimate is not positive yet"
        return "the interval of B_simple still includes zero"

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {key: getattr(self, key).clone() for key in self._KEYS}

    def load_state_dict(self, state: dict, pad_to: int | None = None) -> None:
        """Load a saved estimate; checks every entry's presence and shape first, so a state saved
        under another configuration raises here, having changed nothing. ``pad_to``: a state of
        fewer tensors, padded with empty ones (add_param_group)."""
        if not isinstance(state, dict):
            raise TypeError(f"noise-scale state must be a dict, got {type(state).__name__}")
        values = {}
        for key in self._KEYS:
            if key not in state:
                raise KeyError(f"noise-scale state is missing {key!r}")
            value = state[key]
            mine = getattr(self, key)
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise TypeError(f"noise-scale state {key!r} must be a float tensor, got {type(value).__name__}")
            value = value.detach().to(device=self.device, dtype=mine.dtype)
            if pad_to is not None and value.shape[:-1] == mine.shape[:-1] and value.shape[-1] <= mine.shape[-1]:
                fill = math.nan if key == "prev" else 0.0
                pad = torch.full((*mine.shape[:-1], mine.shape[-1] - value.shape[-1]), fill, dtype=mine.dtype,
                                 device=self.device)
                if key == "prev":
                    pad[2] = 0.0
                value = torch.cat([value, pad], dim=-1)
            if value.shape != mine.shape:
                raise ValueError(
                    f"noise-scale state {key!r} has shape {tuple(value.shape)} where this optimizer's has "
                    f"{tuple(mine.shape)} (windows {self.config.window_lengths()}, per_tensor={self.config.per_tensor}, "
                    f"{self.n_tensors} parameter tensors): it was saved under another NoiseScaleConfig or another "
                    "set of parameters"
                )
            values[key] = value
        for key, value in values.items():
            setattr(self, key, value.clone())


def _finite_or_nan(x: float) -> float:
    return x if math.isfinite(x) else math.nan


def _amp_divisor(grad_scaler, device) -> Tensor | None:
    """1/s² for the scale s of an enabled GradScaler, as a device tensor (get_scale() syncs)."""
    if grad_scaler is None or not grad_scaler.is_enabled():
        return None
    return grad_scaler._get_scale_async().to(device=device, dtype=torch.float64).reshape(1).square().reciprocal()


def _unscaled_sq(sq: Tensor, divisor: Tensor | None, loss_scale: float) -> Tensor:
    """Squared norms of a loss scaled by ``loss_scale`` (and an AMP scale, 1/s² = ``divisor``)
    as those of the unscaled loss, in fp64."""
    sq = sq.double()
    if divisor is not None:
        sq = sq * divisor
    return sq / loss_scale**2


def check_grad_scaler(grad_scaler) -> None:
    if grad_scaler is not None and not (hasattr(grad_scaler, "is_enabled") and hasattr(grad_scaler, "_get_scale_async")):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler or None, got {type(grad_scaler).__name__}")


def check_loss_scale(loss_scale) -> float:
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, numbers.Real) or not (
        math.isfinite(loss_scale) and loss_scale > 0
    ):
        raise ValueError(f"loss_scale must be a finite number > 0, got {loss_scale!r}")
    return float(loss_scale)


class _Accumulation:
    """The micro-batches of the step being accumulated (host bookkeeping + device sums)."""

    @property
    def count(self) -> int:
        return len(self.loss_scales)

    def __deepcopy__(self, memo):
        # A deep copy of the model copies each .grad: point the copy at its own gradients, so
        # the copied optimizer goes on with the same accumulation.
        new = copy.copy(self)
        memo[id(self)] = new
        new.small_pt = copy.deepcopy(self.small_pt, memo)
        new.big_pt = copy.deepcopy(self.big_pt, memo)
        new.amp_divisor = copy.deepcopy(self.amp_divisor, memo)
        new.loss_scales, new.batch_sizes = list(self.loss_scales), list(self.batch_sizes)
        new.seen = {}
        for i, (ref, _) in self.seen.items():
            grad = None if ref is None else ref()
            if grad is not None:
                twin = copy.deepcopy(grad, memo)
                new.seen[i] = (weakref.ref(twin), twin._version)
        return new

    def __getstate__(self):
        # Pickling drops .grad (torch pickles no gradients), so the gradients seen are gone:
        # the next accumulate_grad() sees every one reset and starts a new accumulation.
        state = dict(self.__dict__)
        state["seen"] = {i: (None, v) for i, (_, v) in self.seen.items()}
        return state

    def __init__(self, hooks: bool = False):
        # hooks: each micro-batch's norms come from the gradients autograd hands to .grad
        # (_MicroBatchCapture), otherwise from the snapshots (StatisticsTracker.snapshots).
        # big_pt: with hooks, |.grad|² as of the last call, from the hooks' |g|² and g·T.
        # broken: a hooked call could not be measured exactly: this step gives no measurement.
        self.hooks = hooks
        self.big_pt: Tensor | None = None
        self.broken = False
        self.loss_scales: list[float] = []
        self.batch_sizes: list[int | None] = []
        self.small_pt: Tensor | None = None  # Σ over micro-batches of |g_i|² / c_i², per tensor
        # position -> (weak reference to .grad, its ._version) at the last call. Weak, not id():
        # a freed .grad's id is often reused by the next backward's new tensor.
        self.seen: dict[int, tuple[weakref.ref, int]] = {}
        self.amp_divisor: Tensor | None = None  # of the last call: the big norm is taken then
        self.default_total: int | None = None  # the optimizer's batch size at the last call
        # With hooks, the first micro-batch's gradients are not read as they arrive: |g|² of
        # each is |.grad|² when the next micro-batch's gradient arrives (the hooks' third sum).
        # deferred: those positions, always of the last call (its amp_divisor and loss scale).
        self.deferred: tuple[int, ...] = ()
        self.lost = False  # a deferred |g|² lost to a reset of its .grad: no measurement this step


class StatisticsTracker:
    """Owns what the noise-scale statistics need between calls: the parameter index, the
    micro-batch snapshots, the pending measurement and the estimator.

    Every source hands it one :class:`Measurement` per step (:meth:`observe`), or, for
    micro-batch accumulation, hands it the gradients after each backward (:meth:`accumulate`);
    :meth:`on_step` folds the measurement into the estimator. A method that raises has changed
    nothing.
    """

    def __init__(self, config: NoiseScaleConfig | None, params: list[Tensor], device: torch.device,
                 estimator: NoiseScaleEstimator | None = None):
        self.config = config
        self.device = device
        self.params = list(params)
        self.index = {p: i for i, p in enumerate(self.params)}
        self.shards = sharded.ShardLayout.of(self.params, device)  # None unless DTensors; raises for bad mixes
        if estimator is None and config is not None:
            estimator = NoiseScaleEstimator(config, len(self.params), device)
        self.estimator = estimator
        self.snapshots: list[Tensor | None] = [None] * len(self.params)
        self.last_norms: Tensor | None = None  # per-tensor |g|² of the last step, as stepped
        self.last_examples: float | None = None
        self._pending: Measurement | None = None
        self._accumulation: _Accumulation | None = None
        self._all_present = torch.ones(len(self.params), dtype=torch.bool, device=device)
        self._indices: dict[tuple, Tensor] = {}  # positions -> their index tensor, made once
        # Micro-batch norms from autograd hooks instead of snapshots, once a whole accumulation
        # showed every gradient arriving through them (see _MicroBatchCapture).
        self._capture: _MicroBatchCapture | None = None
        # Plain tensors only (a DTensor shard's gradient is left to the snapshots): otherwise no
        # hook is ever registered, and nothing of the hooked path runs, compiled or not.
        self._hookable = bool(self.params) and all(type(p.data) is torch.Tensor for p in self.params)
        self._hooks_trusted = False
        self._hooks_failed = False  # a hooked step could not be measured: snapshots from then on
        # Leave a step's first micro-batch unread (its |g|² comes with the next one), until a loop
        # resets some .grad between micro-batches, which would lose it: then read it on arrival.
        self._defer_first = True
        self.steps_taken = 0  # step() calls, counted while measure_every > 1: which ones are measured
        self.measuring = True  # whether accumulate_grad() measures the step being accumulated

    # ----------------------------------------------------------------- structure
    def with_params(self, params: list[Tensor]) -> "StatisticsTracker":
        """A tracker for a grown parameter list, keeping this one's estimate (add_param_group;
        micro-batches pending for the next step are dropped, as by ``zero_grad()``)."""
        estimator = None if self.estimator is None else self.estimator.resized(len(params))
        new = StatisticsTracker(self.config, params, self.device, estimator)
        new.snapshots[: len(self.snapshots)] = self.snapshots
        new.last_examples = self.last_examples
        new.set_steps_taken(self.steps_taken)
        return new

    def positions(self, params: list[Tensor]) -> list[int]:
        return [self.index[p] for p in params]

    def per_tensor(self, norms: list[Tensor], positions: list[int]) -> tuple[Tensor, Tensor]:
        """Per-tensor vector over all parameters (0 where absent) and the mask of those present."""
        n = len(self.params)
        if len(norms) == 1 and positions == list(range(n)):
            return norms[0].to(self.device, torch.float32), self._all_present
        vec = torch.zeros(n, dtype=torch.float32, device=self.device)
        present = torch.zeros(n, dtype=torch.bool, device=self.device)
        if positions:
            idx = self._index_of(positions)
            vec.index_copy_(0, idx, torch.cat([t.to(self.device, torch.float32) for t in norms]))
            present.index_fill_(0, idx, True)
        return vec, present

    # ----------------------------------------------------------------- sources
    @torch.compiler.disable
    def _count_step(self) -> None:
        self.set_steps_taken(self.steps_taken + 1)  # read here, not where dynamo would guard on it

    @torch.compiler.disable
    def set_steps_taken(self, steps: int) -> None:
        """Count ``steps`` step() calls so far, and so whether accumulate_grad() measures the
        next one (measure_every). Kept out of torch.compile: a guard on the count would
        recompile a compiled training step at every step; ``measuring`` changes only every
        measure_every steps (never at 1)."""
        self.steps_taken = steps
        self.measuring = self.config is None or steps % self.config.measure_every == 0
        if self._capture is not None:  # the hooks read nothing while the step is not measured
            self._capture.active = self.measuring

    @property
    def pending(self) -> bool:
        return self._pending is not None or self._accumulation is not None

    def reset(self) -> None:
        """Drop what was measured for the step not yet taken (``zero_grad()``)."""
        self._pending = None
        self._accumulation = None
        if self._capture is not None:
            self._capture.clear()
            self._capture.defer_fresh = self._defer_first  # the next micro-batch is a first one

    def grad_sq_norms(self, params: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Per-tensor |.grad|² now (fp32 vector over all parameters) and the mask present."""
        with_grad = [p for p in params if p.grad is not None]
        return self.per_tensor(*squared_norms_at([p.grad for p in with_grad], self.positions(with_grad)))

    def observe(self, m: Measurement) -> None:
        """Take one step's complete measurement from a source (per-example norms, replicas)."""
        if self.estimator is None:
            raise RuntimeError("this optimizer has no noise-scale estimator: build it with noise_scale=True")
        if self.pending:
            raise RuntimeError("this step already has small-batch norms from another source; use one per step")
        self._pending = m

    def accumulate(self, params_by_bucket, impl, *, batch_size, loss_scale, grad_scaler, default_total):
        """Record the micro-batch gradient the last backward added into ``.grad``.

        ``params_by_bucket``: lists of same-device, same-dtype parameters; ``impl``: the ops
        (``ops.dispatched`` or ``ops.pure_torch``), for the snapshots and the hooks alike.
        ``default_total``: the batch size the micro-batches share when their sizes are not
        given. Validates everything, then writes.
        """
        if self._pending is not None:
            raise RuntimeError("this step already has small-batch norms from another source; use one per step")
        acc = self._accumulation
        params = [p for bucket in params_by_bucket for p in bucket]
        kept: set[int] = set()  # positions whose .grad is the tensor the last call saw
        if acc is not None:
            kept, unchanged = _grads_since(acc.seen, {self.index[p]: p.grad for p in params})
            if acc.seen and not kept:
                acc = None
            elif unchanged:
                raise RuntimeError(
                    "accumulate_grad() was called twice without a backward in between: no gradient changed "
                    "since the last call (call it once after each micro-batch's backward)"
                )
        given = [b is not None for b in (acc.batch_sizes if acc else [])] + [batch_size is not None]
        if any(given) and not all(given):
            raise ValueError(
                "accumulate_grad: give batch_size= for every micro-batch of a step or for none "
                "(sizes left out are taken as equal shares of the optimizer's batch_size)"
            )
        if batch_size is None and self.estimator is not None and default_total is None:
            raise ValueError(
                "accumulate_grad needs batch_size= (the micro-batch size) when the optimizer has no batch_size"
            )
        if not params or not self.measuring:
            return
        # --- all checks passed: write
        if acc is None:
            acc, kept = _Accumulation(hooks=self._hooks_trusted and not self._hooks_failed), set()
            if acc.hooks:
                self.snapshots = [None] * len(self.params)  # their memory back: hooks from now on
        acc.seen = {i: v for i, v in acc.seen.items() if i in kept}  # reset ones are measured afresh
        divisor = _amp_divisor(grad_scaler, self.device)
        late = None  # the previous call's deferred |g|², known now
        if acc.hooks:
            sq_pt, late = self._from_hooks(acc, params, kept)
        else:
            sq_pt = self._from_snapshots(params_by_bucket, impl.accumulate_grad_, kept)
            if self._hookable and not self._hooks_failed:
                self._watch_hooks(acc, params, kept)
        if self._capture is not None:
            self._capture.arrival = impl.arrival_norms_  # for the next micro-batch's gradients
            self._capture.defer_fresh = False  # later micro-batches: fresh gradients are read
        if sq_pt is None:
            sq_pt = torch.zeros(len(self.params), dtype=torch.float64, device=self.device)
        sq_pt = _unscaled_sq(sq_pt, divisor, loss_scale)
        if late is not None:  # scaled as the last call's losses, recorded below for this one
            sq_pt = sq_pt + _unscaled_sq(late, acc.amp_divisor, acc.loss_scales[-1])
        acc.small_pt = sq_pt if acc.small_pt is None else acc.small_pt + sq_pt
        acc.loss_scales.append(loss_scale)
        acc.batch_sizes.append(batch_size)
        acc.amp_divisor = divisor
        acc.default_total = default_total  # as it was while the micro-batches were taken
        _remember_grads(acc.seen, self.index, params)
        self._accumulation = acc

    def _from_snapshots(self, params_by_bucket, accumulate_op, kept: set) -> Tensor:
        """Per-tensor |micro-batch gradient|² as ``.grad`` minus its snapshot (then the
        snapshot <- ``.grad``), one fused pass per bucket: exact whatever edited ``.grad``."""
        norms, positions = [], []
        for bucket in params_by_bucket:
            if not bucket:
                continue
            for first in (True, False):
                part = [p for p in bucket if (self.index[p] in kept) != first]
                if not part:
                    continue
                snaps = []
                for p in part:
                    i = self.index[p]
                    snap = self.snapshots[i]
                    if snap is None or snap.shape != p.shape or snap.dtype != p.grad.dtype or snap.device != p.device:
                        snap = self.snapshots[i] = torch.empty_like(p.grad, memory_format=torch.contiguous_format)
                    snaps.append(_dense_real(snap))
                norms.append(accumulate_op(snaps, [_dense_real(p.grad) for p in part], first=first))
                positions += [self.index[p] for p in part]
        return self.per_tensor(norms, positions)[0]

    @torch.compiler.disable
    def _watch_hooks(self, acc: _Accumulation, params: list[Tensor], kept: set) -> None:
        """While measuring from snapshots: hook the parameters, and trust the hooks from the
        next accumulation on once a call saw every continuing gradient arrive through them."""
        if self._hooks_failed:
            return
        if self._capture is None:  # from the next micro-batch on
            self._capture = _MicroBatchCapture(self.params)
        cap = self._capture
        if kept and all(cap.verdict(self.index[p], p.grad, acc.seen.get(self.index[p])) != "unknown"
                        for p in params if self.index[p] in kept):
            self._hooks_trusted = True
            cap.compute = True
        cap.clear()

    @torch.compiler.disable
    def _from_hooks(self, acc: _Accumulation, params: list[Tensor], kept: set) -> Tensor | None:
        """Per-tensor |micro-batch gradient|² from what the hooks computed as each gradient
        arrived (no snapshot: one read of the gradient, while it is fresh), and
        ``acc.big_pt`` <- |.grad|² now, as |T + g|² = |T|² + 2 g·T + |g|². A continuing gradient
        the hooks cannot account for (edited by hand, two backwards in one micro-batch) breaks
        the step: no measurement, a warning, and snapshots from the next accumulation on.

        Returns (this micro-batch's |g|² per tensor, the previous call's deferred |g|² per
        tensor or None); (None, None) when the step is broken. A first micro-batch's gradients
        are not read as they arrive (``acc.deferred``): each one's |g|² is |.grad|² when the
        next gradient arrives, the third sum of that read."""
        if self._capture is None:
            self._capture = _MicroBatchCapture(self.params)
        cap = self._capture
        hooked, direct = [], []  # positions measured by the hooks / read from .grad now
        deferred, unchanged = [], []  # fresh and not read yet / no gradient this micro-batch
        for p in params:
            i = self.index[p]
            verdict = cap.verdict(i, p.grad, acc.seen.get(i) if i in kept else None)
            if verdict == "hooked" and i in cap.norms and (
                    i in kept and cap.norms[i] or i not in kept and cap.before.get(i) is None):
                (deferred if cap.norms[i] is None else hooked).append(i)
            elif verdict == "unchanged":
                unchanged.append(i)  # no gradient this micro-batch: 0, and |.grad|² as it was
            elif i in kept:  # nothing exact to measure it from
                cap.close()
                self._capture = None
                self._hooks_failed, self._hooks_trusted, acc.broken = True, False, True
                _warn_hooks_failed()
                return None, None
            else:
                direct.append(i)  # first seen in this accumulation: its whole .grad is the micro-batch
        if acc.big_pt is None:
            acc.big_pt = torch.zeros(len(self.params), dtype=torch.float64, device=self.device)
        if hooked:
            a, d, tt = cap.gathered(len(self.params), self.device)
        late = None
        if acc.deferred:  # the last call's first gradients: |T|² now (T = .grad before g)
            late = torch.zeros(len(self.params), dtype=torch.float64, device=self.device)
            hooked_set, unchanged_set = set(hooked), set(unchanged)
            from_hooks = [i for i in acc.deferred if i in hooked_set and i in kept]
            still = [i for i in acc.deferred if i in unchanged_set and i in kept]
            # Anything else had its .grad reset since (it is no longer in seen): its first
            # micro-batch was never read, so this step cannot be measured; from the next step on
            # first micro-batches are read as they arrive.
            if len(from_hooks) + len(still) < len(acc.deferred):
                acc.lost = True
                self._defer_first = False
            if from_hooks:  # (a subset of hooked)
                mask = self._mask_of(from_hooks)
                late = torch.where(mask, tt, late)
                acc.big_pt = torch.where(mask, tt, acc.big_pt)
            if still:  # no second gradient: .grad is still the first one
                sq = self._direct_sq(still)
                idx = self._index_of(still)
                late.index_copy_(0, idx, sq[idx])
                acc.big_pt.index_copy_(0, idx, sq[idx])
        acc.deferred = tuple(deferred)
        if hooked:
            micro = torch.where(self._mask_of(hooked), a, 0.0)
            continuing = self._mask_of([i for i in hooked if i in kept])
            fresh = self._mask_of([i for i in hooked if i not in kept])
            big = acc.big_pt
            total = torch.where(continuing, big + 2 * d + a, big)  # |T + g|², T = .grad before g
            acc.big_pt = torch.where(fresh, a, total)
        else:
            micro = torch.zeros(len(self.params), dtype=torch.float64, device=self.device)
        if direct:
            sq = self._direct_sq(direct)
            idx = self._index_of(direct)
            acc.big_pt.index_copy_(0, idx, sq[idx])
            micro.index_copy_(0, idx, sq[idx])
        cap.clear()
        return micro, late

    def _direct_sq(self, positions: list[int]) -> Tensor:
        """|.grad|² now of the given positions, as an fp64 vector over all positions."""
        norms, at = squared_norms_at([self.params[i].grad for i in positions], positions)
        return self.per_tensor(norms, at)[0].double()

    @torch.compiler.disable
    def _big_from_hooks(self, acc: _Accumulation, seen: list[int]):
        """|.grad|² per tensor as the last call saw it, for a hooked accumulation, from the
        hooks' cross terms. Always from them, never from the step's own norms: an edit of
        ``.grad`` before the step (clipping, unscaling, a ``.data`` edit that no version
        counter sees) must not reach the statistics."""
        if acc.broken or self._capture is None:
            return None, None
        present = self._mask_of(seen)
        return torch.where(present, acc.big_pt, 0.0), present

    def _mask_of(self, positions: list[int]) -> Tensor:
        key = ("mask", *positions)
        mask = self._indices.get(key)
        if mask is None:  # once per set of positions, as for indices
            mask = torch.zeros(len(self.params), dtype=torch.bool)
            mask[positions] = True
            mask = self._indices[key] = mask.to(self.device)
        return mask

    def _index_of(self, positions: list[int]) -> Tensor:
        key = tuple(positions)
        idx = self._indices.get(key)
        if idx is None:  # a host-to-device copy: once per set of positions, not every step
            idx = self._indices[key] = torch.tensor(positions, dtype=torch.long, device=self.device)
        return idx

    def _finish_accumulation(self) -> Measurement | None:
        """The accumulated micro-batches as one measurement; the big-batch norm is that of the
        raw accumulated gradient, read from the snapshots (never from a clipped .grad)."""
        acc = self._accumulation
        if acc is None or acc.count < 2 or self.estimator is None:
            return None  # one micro-batch: both norms are of the same gradient
        if acc.deferred or acc.lost:  # first gradients never read (a copied optimizer, a partial reset)
            return None
        k = acc.count
        sizes = acc.batch_sizes
        if sizes[0] is None:
            sizes = [acc.default_total / k] * k
        c = acc.loss_scales
        total_c = sum(c)
        # .grad = Σ c_i·G_i, an unbiased gradient of variance tr(Σ)·Σc_i²/b_i / (Σc_i)².
        b_big = total_c**2 / sum(ci * ci / bi for ci, bi in zip(c, sizes))
        b_small = k / sum(1.0 / bi for bi in sizes)  # mean of |G_i|²: variance term tr(Σ)·mean(1/b_i)
        seen = sorted(acc.seen)
        if acc.hooks:
            big_pt, present = self._big_from_hooks(acc, seen)
            if big_pt is None:
                return None
        else:
            big_pt, present = self.per_tensor(*squared_norms_at([self.snapshots[i] for i in seen], seen))
        big_pt = big_pt.double()
        if acc.amp_divisor is not None:
            big_pt = big_pt * acc.amp_divisor
        big_pt = big_pt / total_c**2
        small_pt = acc.small_pt / k
        return Measurement(
            small_sq=small_pt.sum().reshape(1), big_sq=big_pt.sum().reshape(1), b_small=b_small, b_big=b_big,
            small_pt=small_pt.float(), big_pt=big_pt.float(), present=present, examples=float(sum(sizes)),
            local_pt=("small_pt", "big_pt"),  # from this rank's gradients: whole once summed over shards
        )

    # ----------------------------------------------------------------- the step
    def on_step(self, last_norms: Tensor, skip: Tensor | None) -> None:
        """After the optimizer step: keep the stepped gradient's norms and fold this step's
        measurement into the estimator (skipped on an AMP overflow, on the device)."""
        self.last_norms = last_norms
        m = self._pending if self._pending is not None else self._finish_accumulation()
        self.reset()
        if self.config is not None and self.config.measure_every > 1:
            self._count_step()  # out of torch.compile (a graph break): only where there is a phase
        if self.shards is not None:  # DTensor parameters: the step's one collective
            self.last_norms, m = self.shards.sum_over_shards(last_norms, m)
        if m is None or self.estimator is None:
            return
        self.estimator.update(m, skip)
        if m.examples is not None:
            self.last_examples = m.examples


class _MicroBatchCapture:
    """Each micro-batch's gradient as autograd hands it to ``.grad``, measured on arrival.

    A tensor hook on each parameter sees the gradient g of one backward before autograd adds
    it into ``.grad`` T (AccumulateGrad); with ``compute`` on it takes |g|², g·T and |T|² then,
    while g is fresh (so |T + g|² = |T|² + 2 g·T + |g|² needs no snapshot). A post-accumulate
    hook records which tensor ``.grad`` is afterwards and its version, so a later call can tell
    whether anything else wrote ``.grad`` in between (:meth:`verdict`). Between two
    ``accumulate_grad()`` calls each parameter's gradient must arrive once, through autograd;
    anything else is "unknown" and measured otherwise.

    What it costs: a first micro-batch's gradient (no T yet, ``defer_fresh``) is not read at
    all (its |g|² is the next arrival's |T|²); a later one is added into T by the hook itself,
    in the same pass that takes the sums (:class:`_AddedHere`), so no pass over memory is added
    to autograd's own. Where that is not safe the sums are taken in one read of g and T, and
    AccumulateGrad adds as usual.
    """

    def __init__(self, params: list[Tensor], compute: bool = False, arrival=None, active: bool = True):
        # Made by an accumulate_grad() that may run under torch.inference_mode(): its buffers
        # are written by the hooks outside it, and its AccumulateGrad nodes need a graph.
        with torch.inference_mode(False):
            self._make(params, compute, arrival, active)

    def _make(self, params, compute, arrival, active) -> None:
        self.params = list(params)
        self.compute = compute  # take the norms (once the hooks are trusted)
        self.active = active  # False: the hooks do nothing (a step accumulate_grad does not measure)
        # The op or its twin (fused=False), as the optimizer asks: set by each accumulate().
        self.arrival = ops.arrival_norms_ if arrival is None else arrival
        self.defer_fresh = True  # the next micro-batch is the first of an accumulation
        self.handles = []
        self.pre_ids: dict[int, int] = {}  # position -> its tensor hook's id (is it the last one?)
        self.nodes: dict[int, object] = {}  # position -> its AccumulateGrad node (will it run?)
        # The hooks write (|g|², g·T, |T|²) straight into one (n, 3) buffer per (device, compute
        # dtype), a row per parameter, so a call reads them with a few ops whatever the count.
        self.groups: dict = {}  # (device, dtype) -> [positions, (n, 3) buffer]
        self.slots: dict[int, Tensor] = {}  # position -> its row of the buffer
        for i, p in enumerate(self.params):
            dtype = torch.float64 if p.dtype in (torch.float64, torch.complex128) else torch.float32
            group = self.groups.setdefault((p.device, dtype), [[], None])
            group[0].append(i)
        for (device, dtype), group in self.groups.items():
            group[1] = torch.zeros(len(group[0]), 3, dtype=dtype, device=device)
            for row, i in enumerate(group[0]):
                self.slots[i] = group[1][row]
        me = weakref.ref(self)
        for i, p in enumerate(self.params):
            # Plain tensors only: a tensor subclass (a DTensor shard) is left to the snapshots,
            # its gradients never arrive "through the hooks", so the hooks are never trusted.
            if p.requires_grad and p.is_leaf and type(p.data) is torch.Tensor:
                # Unserializable: a pickled model comes back without them (the optimizer's copy re-hooks).
                pre, post = functools.partial(_on_gradient, me, i), functools.partial(_after_gradient, me, i)
                self.handles.append(p.register_hook(torch.utils.hooks.unserializable_hook(pre)))
                self.pre_ids[i] = self.handles[-1].id
                self.nodes[i] = _accumulate_grad_node(p)
                self.handles.append(p.register_post_accumulate_grad_hook(torch.utils.hooks.unserializable_hook(post)))
        self.clear()

    def clear(self) -> None:
        self.fired: dict[int, int] = {}  # position -> gradients handed to .grad since the last call
        self.before: dict[int, tuple | None] = {}  # position -> (ref, version) of .grad when one arrived
        self.after: dict[int, tuple] = {}  # position -> (ref, version) of .grad once it was added
        # position -> whether g·T was taken (its row is this micro-batch's); None: not read (deferred)
        self.norms: dict[int, bool | None] = {}
        self.handed_on: dict[int, Tensor] = {}  # position -> the _AddedHere given to AccumulateGrad

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __del__(self):
        self.close()

    def __deepcopy__(self, memo):
        # The copy hooks the copied parameters (those of a deep-copied model and optimizer).
        new = _MicroBatchCapture(copy.deepcopy(self.params, memo), self.compute, self.arrival, self.active)
        new.defer_fresh = self.defer_fresh
        return new

    def __reduce__(self):
        return _MicroBatchCapture, (self.params, self.compute, self.arrival, self.active)

    def verdict(self, i: int, grad: Tensor, seen: tuple | None) -> str:
        """How ``.grad`` (``grad``) of position i got where it is since the last call, whose
        record of it was ``seen`` (None: not continuing): "hooked" (exactly one gradient arrived
        through autograd, onto the ``.grad`` seen, and nothing wrote it since), "unchanged" (the
        same tensor, not written), or "unknown"."""
        n = self.fired.get(i, 0)
        if n == 0:
            return "unchanged" if seen is not None and _same(seen, grad) else "unknown"
        if n == 1 and _same(self.after.get(i), grad):
            before = self.before.get(i)
            if seen is None or (before is not None and seen[0] is not None and before[0]() is seen[0]()
                                and before[1] == seen[1]):
                return "hooked"
        return "unknown"

    def gathered(self, n: int, device) -> tuple[Tensor, Tensor, Tensor]:
        """The |g|², g·T and |T|² buffers as fp64 vectors over all ``n`` positions on ``device``
        (stale where no gradient arrived this micro-batch: the caller masks them)."""
        if len(self.groups) == 1:
            (positions, buf), = self.groups.values()
            if len(positions) == n:
                buf = buf.to(device, torch.float64)
                return buf[:, 0], buf[:, 1], buf[:, 2]
        out = torch.zeros(n, 3, dtype=torch.float64, device=device)
        for positions, buf in self.groups.values():
            out.index_copy_(0, torch.tensor(positions, device=device), buf.to(device, torch.float64))
        return out[:, 0], out[:, 1], out[:, 2]


def _same(record: tuple | None, grad: Tensor | None) -> bool:
    """Whether ``grad`` is the tensor ``record`` = (weak ref, version) names, unwritten since."""
    if record is None or grad is None:
        return False
    ref, version = record
    return ref is not None and ref() is grad and sharded.version(grad) == version


def _outside_dynamo(fn):
    """Hooks run eagerly inside autograd; under a torch.compile'd training step dynamo would
    trace them (and recompile per parameter position). Their frames are skipped outright (no
    wrapper: they run twice per parameter and micro-batch), so they call no Python function."""
    try:
        from torch._dynamo.eval_frame import skip_code
    except ImportError:  # another torch: the (costlier) wrapper
        return torch.compiler.disable(fn)
    skip_code(fn.__code__)
    return fn


@_outside_dynamo
def _on_gradient(capture_ref, i: int, grad: Tensor):
    cap = capture_ref()
    if cap is None or not cap.active or not _adds_into_grad(cap, i):
        return None
    n = cap.fired.get(i, 0)
    cap.fired[i] = n + 1
    if n:
        return None  # a second gradient in one micro-batch: the call measures it otherwise
    param = cap.params[i]
    old = param.grad
    cap.before[i] = None if old is None else (weakref.ref(old), old._version)
    if not cap.compute or grad.is_sparse or (old is not None and old.is_sparse):
        return None
    if old is None and cap.defer_fresh:
        cap.norms[i] = None  # not read: its |g|² is |.grad|² at the next arrival
        return None
    hooks = param._backward_hooks
    if not hooks or next(reversed(hooks)) != cap.pre_ids.get(i):
        # A tensor hook registered after this one may change g: what reaches .grad is not
        # what is seen here. Left unmeasured, which the call handles as an edited gradient.
        return None
    # (|g|², g·T, |T|²) in one read of each (fastscale::arrival_norms_), complex as (re, im)
    # pairs; detached, so a create_graph backward records nothing.
    # Only where autograd.grad() is told apart (the node known, the engine asked: _adds_into_grad)
    add = old is not None and _knows_node(cap, i) and _can_add_here(grad, old)
    g = grad.detach() if grad.requires_grad else grad  # (a new tensor object costs µs)
    g = torch.view_as_real(g) if g.is_complex() else g
    t = None
    if old is not None:
        t = old.detach() if old.requires_grad else old
        t = torch.view_as_real(t) if t.is_complex() else t
    slot = cap.slots[i]
    try:
        if slot.device == g.device:
            cap.arrival(slot, g, t, add=add)
        else:  # the model moved since the hooks were made
            here = torch.empty(3, dtype=slot.dtype, device=g.device)
            cap.arrival(here, g, t, add=add)
            slot.copy_(here)
    except RuntimeError:
        # A hook must not break the user's backward (a gradient the op refuses): this
        # parameter stays unmeasured, which the call then handles as an edited gradient. The
        # op validates before writing: on an error nothing was added.
        return None
    cap.norms[i] = old is not None
    if not add:
        return None
    stand_in = cap.handed_on[i] = _AddedHere(grad)  # checked after the accumulation
    return stand_in


def _accumulate_grad_node(param: Tensor):
    """The parameter's AccumulateGrad node (held, so autograd keeps using this one), or None."""
    try:
        with torch.enable_grad():
            return param.view_as(param).grad_fn.next_functions[0][0]
    except (RuntimeError, AttributeError, IndexError):  # inference mode, an exotic parameter
        return None


def _adds_into_grad(cap, i: int) -> bool:
    """Whether the running backward will add position i's gradient into ``.grad``: not under
    ``torch.autograd.grad()``, whose gradients go back to the caller (its tensor hooks run all
    the same). Without the node (or the query, another torch): assumed, as before it existed."""
    if not _knows_node(cap, i):
        return True
    node = cap.nodes[i]
    try:
        if _will_execute(node):
            return True
        # Not in this graph: the parameter's node was replaced (its .data changed dtype or
        # device, which gives it a new AccumulateGrad), or it really is not run.
        fresh = _accumulate_grad_node(cap.params[i])
        if fresh is None or fresh is node:
            return False
        cap.nodes[i] = fresh
        return _will_execute(fresh)
    except RuntimeError:  # "...currently running autograd.grad()": asked of a leaf's node
        return False


_will_execute = getattr(torch._C, "_will_engine_execute_node", None)


def _knows_node(cap, i: int) -> bool:
    """Whether position i's hook can ask the engine if its AccumulateGrad node runs."""
    return _will_execute is not None and cap.nodes.get(i) is not None


# Below this many elements the two reads the fused add saves cost less than its Python.
_ADD_HERE_MIN_NUMEL = 1 << 15


def _can_add_here(grad: Tensor, old: Tensor) -> bool:
    """Whether the hook (the parameter's last tensor hook) may do AccumulateGrad's
    ``.grad += g`` itself, in the pass that takes the sums, handing autograd an
    :class:`_AddedHere` in place of g: only where AccumulateGrad would add in place (no grad
    mode, dense tensors of one dtype) and no compiled autograd traces the hooks."""
    if grad.numel() < _ADD_HERE_MIN_NUMEL or torch.is_grad_enabled():
        return False
    if type(grad) is not torch.Tensor or type(old) is not torch.Tensor or old.requires_grad:
        return False
    if grad.dtype != old.dtype or grad.is_complex() or grad.layout != torch.strided or old.layout != torch.strided:
        return False
    if grad.shape != old.shape or grad.device != old.device:
        return False
    return not _in_compiled_autograd()


def _in_compiled_autograd() -> bool:
    ca = getattr(getattr(torch, "_dynamo", None), "compiled_autograd", None)
    return bool(getattr(ca, "in_compiled_autograd_region", False) or getattr(ca, "compiled_autograd_enabled", False))


class _AddedHere(Tensor):
    """What the hook hands AccumulateGrad after adding the gradient g into ``.grad`` itself: a
    storage-less stand-in of g's shape, dtype and device. Being added into ``.grad``
    (AccumulateGrad's ``grad += this``) does nothing and marks it ``added``; any other operation
    (a hook on the AccumulateGrad node reading the gradient) runs on g itself. A node pre-hook
    that hands AccumulateGrad another tensor instead would have g counted twice: the hook after
    the accumulation (:func:`_after_gradient`) then raises."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, grad: Tensor):
        self = Tensor._make_wrapper_subclass(cls, grad.shape, strides=grad.stride(), dtype=grad.dtype,
                                             device=grad.device)
        self.gradient = grad
        self.added = False
        return self

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in (torch.ops.aten.add_.Tensor, torch.ops.aten.add.Tensor) and len(args) == 2
                and type(args[0]) is not cls and type(args[1]) is cls and kwargs.get("alpha", 1) == 1):
            # AccumulateGrad's .grad += g (in place), or .grad + g where it cannot be in place
            args[1].added = True
            return args[0] if func is torch.ops.aten.add_.Tensor else args[0].clone()
        unwrap = functools.partial(torch.utils._pytree.tree_map_only, cls, lambda t: t.gradient)
        return func(*unwrap(args), **unwrap(kwargs))


@_outside_dynamo
def _after_gradient(capture_ref, i: int, param: Tensor) -> None:
    cap = capture_ref()
    if cap is None or not cap.active:
        return
    stand_in = cap.handed_on.pop(i, None)
    if stand_in is not None and not stand_in.added:
        raise RuntimeError(
            "fastscale: a pre-hook on a parameter's AccumulateGrad node (those run after every tensor hook) "
            "replaced the gradient that fastscale's accumulation hook had already added into .grad, so .grad "
            "now counts it twice. Register that hook with param.register_hook() before the optimizer's first "
            "accumulate_grad() instead: tensor hooks registered before fastscale's change the gradient itself")
    if param.grad is not None:
        cap.after[i] = (weakref.ref(param.grad), param.grad._version)


_hooks_warned = False


def _warn_hooks_failed() -> None:
    global _hooks_warned
    if not _hooks_warned:
        _hooks_warned = True
        warnings.warn(
            "fastscale: accumulate_grad() found a gradient that did not arrive through autograd since the "
            "last call (edited by hand, two backward passes in one micro-batch, or changed by a tensor hook "
            "registered after the optimizer's first accumulate_grad()): this step gives no "
            "noise-scale measurement, and later ones are measured from snapshots of .grad", stacklevel=4)


# Host bookkeeping of which .grad tensors an accumulation has seen, kept out of torch.compile:
# traced, ._version reads the graph input's counter (not the real .grad's), and guarding on the
# identity of each .grad would recompile at every step.
@torch.compiler.disable
def _grads_since(seen: dict, now: dict) -> tuple[set, bool]:
    """(positions whose .grad is the tensor seen at the last call, whether no gradient changed
    since then). A .grad that is another tensor (or None) was reset: it counts afresh; if every
    one was, the loop reset the gradients outside the optimizer and a new accumulation starts."""
    kept = {i for i, (ref, _) in seen.items() if ref is not None and ref() is not None and ref() is now.get(i)}
    unchanged = bool(now) and all(i in kept and seen[i][1] == sharded.version(g) for i, g in now.items())
    return kept, unchanged


@torch.compiler.disable
def _remember_grads(seen: dict, index: dict, params: list) -> None:
    for p in params:  # .grad read here, not where dynamo traces: it would guard on each tensor's identity
        seen[index[p]] = (weakref.ref(p.grad), sharded.version(p.grad))


def _dense_real(t: Tensor) -> Tensor:
    """What a squared norm is summed over: complex as (re, im) pairs, sparse as its values, a
    DTensor as its local shard (summed over shards at the step)."""
    t = sharded.local(t)
    if t.is_sparse:
        t = t.coalesce()._values()
    return torch.view_as_real(t) if t.is_complex() else t


def squared_norms_at(tensors: list[Tensor], positions: list[int]) -> tuple[list[Tensor], list[int]]:
    """|t|² of each tensor, one reduction per (device, dtype); returns the norm vectors and the
    positions they hold, in the same order."""
    groups: dict = {}
    for t, i in zip(tensors, positions):
        t = _dense_real(t)
        ts, idx = groups.setdefault((t.device, t.dtype), ([], []))
        ts.append(t)
        idx.append(i)
    norms = [reference.squared_norms(ts, ts[0].device) for ts, _ in groups.values()]
    return norms, [i for _, idx in groups.values() for i in idx]
