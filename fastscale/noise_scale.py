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
import math
import numbers
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from . import reference


@dataclass(frozen=True)
class NoiseScaleConfig:
    """How the optimizer estimates the gradient noise scale.

    beta: decay of the moving averages of |G|² and tr(Σ), per update (0 <= beta < 1).
    per_tensor: also keep the averages per parameter tensor (per-layer noise scale).
    min_updates: updates before the estimate counts as warmed up (``scaling="noise"`` uses
        its fallback until then).
    """

    beta: float = 0.99
    per_tensor: bool = True
    min_updates: int = 20

    def __post_init__(self):
        if isinstance(self.beta, bool) or not (isinstance(self.beta, numbers.Real) and 0.0 <= self.beta < 1.0):
            raise ValueError(f"NoiseScaleConfig.beta must be a float in [0, 1), got {self.beta!r}")
        if not isinstance(self.per_tensor, bool):
            raise TypeError(f"NoiseScaleConfig.per_tensor must be a bool, got {self.per_tensor!r}")
        if isinstance(self.min_updates, bool) or not (isinstance(self.min_updates, int) and self.min_updates >= 0):
            raise ValueError(f"NoiseScaleConfig.min_updates must be an int >= 0, got {self.min_updates!r}")

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
    """

    small_sq: Tensor
    big_sq: Tensor
    b_small: float
    b_big: float
    small_pt: Tensor | None = None
    big_pt: Tensor | None = None
    present: Tensor | None = None
    examples: float | None = None


class NoiseScaleEstimator:
    """Bias-corrected moving averages of |G|² and tr(Σ), total and per tensor, on one device.

    ``n_tensors`` is the number of parameter tensors the optimizer indexes (per-tensor vectors
    are indexed by the parameter's position across all param groups).
    """

    _KEYS = ("g2", "trace", "weight", "updates", "g2_pt", "trace_pt", "weight_pt")

    def __init__(self, config: NoiseScaleConfig, n_tensors: int, device: torch.device):
        self.config = config
        self.device = device
        # Scalars in fp64: they are sums of many squared norms and live for the whole run.
        self.g2 = device_scalar(0.0, device)
        self.trace = device_scalar(0.0, device)
        self.weight = device_scalar(0.0, device)  # 1 - beta^n over accepted updates: bias correction
        self.updates = device_scalar(0.0, device)
        n = n_tensors if config.per_tensor else 0
        f32 = dict(dtype=torch.float32, device=device)
        self.g2_pt = torch.zeros(n, **f32)
        self.trace_pt = torch.zeros(n, **f32)
        self.weight_pt = torch.zeros(n, **f32)

    def resized(self, n_tensors: int) -> "NoiseScaleEstimator":
        """A copy with room for ``n_tensors`` tensors (new entries empty): for add_param_group."""
        new = NoiseScaleEstimator(self.config, n_tensors, self.device)
        new.load_state_dict(self.state_dict(), pad_to=n_tensors)
        return new

    def update(self, m: Measurement, skip: Tensor | None) -> None:
        """Fold one step's measurement into the averages, on the device, without a sync.

        A step whose ``skip`` flag is set (AMP overflow) or whose estimates are not finite
        leaves every average unchanged; per-tensor entries not ``present`` are left unchanged.
        """
        if not m.b_big > m.b_small:
            return  # one batch size: no information about the noise
        beta = self.config.beta
        g2, trace = two_batch_estimates(m.small_sq.double(), m.big_sq.double(), m.b_small, m.b_big)
        ok = torch.isfinite(g2) & torch.isfinite(trace)
        if skip is not None:
            ok = ok & ~skip.to(device=self.device, dtype=torch.bool).reshape(1)
        add = ok.double() * (1.0 - beta)  # decay and weight only on accepted updates
        keep = 1.0 - add
        self.g2.mul_(keep).add_(add * torch.where(ok, g2, 0.0))
        self.trace.mul_(keep).add_(add * torch.where(ok, trace, 0.0))
        self.weight.mul_(keep).add_(add)
        self.updates.add_(ok.double())
        if self.config.per_tensor and m.small_pt is not None and m.big_pt is not None:
            g2_pt, trace_pt = two_batch_estimates(m.small_pt, m.big_pt, m.b_small, m.b_big)
            ok_pt = ok & torch.isfinite(g2_pt) & torch.isfinite(trace_pt)
            if m.present is not None:
                ok_pt = ok_pt & m.present
            add_pt = ok_pt.float() * (1.0 - beta)
            keep_pt = 1.0 - add_pt
            self.g2_pt.mul_(keep_pt).add_(add_pt * torch.where(ok_pt, g2_pt, 0.0))
            self.trace_pt.mul_(keep_pt).add_(add_pt * torch.where(ok_pt, trace_pt, 0.0))
            self.weight_pt.mul_(keep_pt).add_(add_pt)

    def b_noise(self, fallback: float) -> Tensor:
        """1-element device tensor: the current B_simple, or ``fallback`` until warmed up (no sync)."""
        ready = (self.updates >= max(self.config.min_updates, 1)) & (self.g2 > 0) & (self.trace > 0)
        estimate = self.trace / torch.where(self.g2 > 0, self.g2, 1.0)
        return torch.where(ready, estimate, fallback)

    def read(self) -> dict:
        """Host copy of the estimates (this synchronises with the device)."""
        weight = self.weight.item()
        g2 = self.g2.item() / weight if weight > 0 else math.nan
        trace = self.trace.item() / weight if weight > 0 else math.nan
        out = {
            "grad_sq_norm": g2,
            "trace_cov": trace,
            "b_simple": trace / g2 if weight > 0 and g2 != 0 else math.nan,
            "updates": int(self.updates.item()),
        }
        if self.config.per_tensor:
            w = self.weight_pt
            safe = torch.where(w > 0, w, 1.0)
            g2_pt = torch.where(w > 0, self.g2_pt / safe, math.nan)
            tr_pt = torch.where(w > 0, self.trace_pt / safe, math.nan)
            out["grad_sq_norm_per_tensor"] = g2_pt.cpu().tolist()
            out["trace_cov_per_tensor"] = tr_pt.cpu().tolist()
            out["b_simple_per_tensor"] = (tr_pt / g2_pt).cpu().tolist()
        return out

    def state_dict(self) -> dict:
        return {key: getattr(self, key).clone() for key in self._KEYS}

    def load_state_dict(self, state: dict, pad_to: int | None = None) -> None:
        """Load saved averages; checks every entry's presence and size first, so a state saved
        under another configuration raises here, having changed nothing."""
        if not isinstance(state, dict):
            raise TypeError(f"noise-scale state must be a dict, got {type(state).__name__}")
        n = self.g2_pt.numel()
        values = {}
        for key in self._KEYS:
            if key not in state:
                raise KeyError(f"noise-scale state is missing {key!r}")
            value = state[key]
            if not isinstance(value, Tensor) or not (value.is_floating_point() or value.dtype == torch.bool):
                raise TypeError(f"noise-scale state {key!r} must be a float tensor, got {type(value).__name__}")
            if key.endswith("_pt"):
                if pad_to is not None and self.config.per_tensor:
                    value = torch.cat([value.to(self.device), value.new_zeros(n - value.numel()).to(self.device)])
                if value.shape != (n,):
                    raise ValueError(
                        f"noise-scale state {key!r} has {value.numel()} entries where this optimizer has {n} "
                        f"(per_tensor={self.config.per_tensor}, {n} parameter tensors counted): it was saved "
                        "under another NoiseScaleConfig or another set of parameters"
                    )
            elif value.numel() != 1:
                raise ValueError(f"noise-scale state {key!r} must have one element, got shape {tuple(value.shape)}")
            values[key] = value.detach().reshape(getattr(self, key).shape)
        for key, value in values.items():
            setattr(self, key, value.to(device=self.device, dtype=getattr(self, key).dtype).clone())


def _amp_divisor(grad_scaler, device) -> Tensor | None:
    """1/s² for the scale s of an enabled GradScaler, as a device tensor (get_scale() syncs)."""
    if grad_scaler is None or not grad_scaler.is_enabled():
        return None
    return grad_scaler._get_scale_async().to(device=device, dtype=torch.float64).reshape(1).square().reciprocal()


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

    def __deepcopy__(self, memo):
        # A deep copy of the model copies each .grad: point the copy at its own gradients, so
        # the copied optimizer goes on with the same accumulation.
        new = copy.copy(self)
        memo[id(self)] = new
        new.small_pt = copy.deepcopy(self.small_pt, memo)
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

    def __init__(self):
        self.count = 0
        self.loss_scales: list[float] = []
        self.batch_sizes: list[int | None] = []
        self.small_pt: Tensor | None = None  # Σ over micro-batches of |g_i|² / c_i², per tensor
        # position -> (weak reference to .grad, its ._version) at the last call. Weak, not id():
        # a freed .grad's id is often reused by the next backward's new tensor.
        self.seen: dict[int, tuple[weakref.ref, int]] = {}
        self.amp_divisor: Tensor | None = None  # of the last call: the big norm is taken then


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
        if estimator is None and config is not None:
            estimator = NoiseScaleEstimator(config, len(self.params), device)
        self.estimator = estimator
        self.snapshots: list[Tensor | None] = [None] * len(self.params)
        self.last_norms: Tensor | None = None  # per-tensor |g|² of the last step, as stepped
        self.last_examples: float | None = None
        self._pending: Measurement | None = None
        self._accumulation: _Accumulation | None = None
        self._all_present = torch.ones(len(self.params), dtype=torch.bool, device=device)

    # ----------------------------------------------------------------- structure
    def with_params(self, params: list[Tensor]) -> "StatisticsTracker":
        """A tracker for a grown parameter list, keeping this one's estimate (add_param_group;
        micro-batches pending for the next step are dropped, as by ``zero_grad()``)."""
        estimator = None if self.estimator is None else self.estimator.resized(len(params))
        new = StatisticsTracker(self.config, params, self.device, estimator)
        new.snapshots[: len(self.snapshots)] = self.snapshots
        new.last_examples = self.last_examples
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
            idx = torch.tensor(positions, dtype=torch.long, device=self.device)
            vec.index_copy_(0, idx, torch.cat([t.to(self.device, torch.float32) for t in norms]))
            present.index_fill_(0, idx, True)
        return vec, present

    # ----------------------------------------------------------------- sources
    @property
    def pending(self) -> bool:
        return self._pending is not None or self._accumulation is not None

    def reset(self) -> None:
        """Drop what was measured for the step not yet taken (``zero_grad()``)."""
        self._pending = None
        self._accumulation = None

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

    def accumulate(self, params_by_bucket, accumulate_op, *, batch_size, loss_scale, grad_scaler, default_total):
        """Record the micro-batch gradient the last backward added into ``.grad``.

        ``params_by_bucket``: lists of same-device, same-dtype parameters; ``accumulate_op``
        the op for a bucket's device. Validates everything, then writes.
        """
        if self._pending is not None:
            raise RuntimeError("this step already has small-batch norms from another source; use one per step")
        acc = self._accumulation
        params = [p for bucket in params_by_bucket for p in bucket]
        now = {self.index[p]: p.grad for p in params}
        kept: set[int] = set()  # positions whose .grad is the tensor the last call saw
        if acc is not None:
            # A parameter whose .grad is another tensor than at the last call (or None) had its
            # gradient reset: it counts afresh from this micro-batch. If every one was reset, the
            # loop reset the gradients outside the optimizer and a new accumulation starts.
            kept = {i for i, (ref, _) in acc.seen.items() if ref is not None and ref() is not None and ref() is now.get(i)}
            if acc.seen and not kept:
                acc = None
            elif now and all(i in kept and acc.seen[i][1] == g._version for i, g in now.items()):
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
        if not params:
            return
        # --- all checks passed: write
        if acc is None:
            acc, kept = _Accumulation(), set()
        acc.seen = {i: v for i, v in acc.seen.items() if i in kept}  # reset ones are measured afresh
        divisor = _amp_divisor(grad_scaler, self.device)
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
                norms.append(accumulate_op(part[0].device)(snaps, [_dense_real(p.grad) for p in part], first=first))
                positions += [self.index[p] for p in part]
        sq_pt, _ = self.per_tensor(norms, positions)
        sq_pt = sq_pt.double()
        if divisor is not None:
            sq_pt = sq_pt * divisor
        sq_pt = sq_pt / loss_scale**2
        acc.small_pt = sq_pt if acc.small_pt is None else acc.small_pt + sq_pt
        acc.count += 1
        acc.loss_scales.append(loss_scale)
        acc.batch_sizes.append(batch_size)
        acc.amp_divisor = divisor
        for p in params:
            acc.seen[self.index[p]] = (weakref.ref(p.grad), p.grad._version)
        self._accumulation = acc

    def _finish_accumulation(self, default_total) -> Measurement | None:
        """The accumulated micro-batches as one measurement; the big-batch norm is that of the
        raw accumulated gradient, read from the snapshots (never from a clipped .grad)."""
        acc = self._accumulation
        if acc is None or acc.count < 2 or self.estimator is None:
            return None  # one micro-batch: both norms are of the same gradient
        k = acc.count
        sizes = acc.batch_sizes
        if sizes[0] is None:
            sizes = [default_total / k] * k
        c = acc.loss_scales
        total_c = sum(c)
        # .grad = Σ c_i·G_i, an unbiased gradient of variance tr(Σ)·Σc_i²/b_i / (Σc_i)².
        b_big = total_c**2 / sum(ci * ci / bi for ci, bi in zip(c, sizes))
        b_small = k / sum(1.0 / bi for bi in sizes)  # mean of |G_i|²: variance term tr(Σ)·mean(1/b_i)
        seen = sorted(acc.seen)
        big_pt, present = self.per_tensor(*squared_norms_at([self.snapshots[i] for i in seen], seen))
        big_pt = big_pt.double()
        if acc.amp_divisor is not None:
            big_pt = big_pt * acc.amp_divisor
        big_pt = big_pt / total_c**2
        small_pt = acc.small_pt / k
        return Measurement(
            small_sq=small_pt.sum().reshape(1), big_sq=big_pt.sum().reshape(1), b_small=b_small, b_big=b_big,
            small_pt=small_pt.float(), big_pt=big_pt.float(), present=present, examples=float(sum(sizes)),
        )

    # ----------------------------------------------------------------- the step
    def on_step(self, last_norms: Tensor, skip: Tensor | None, default_total) -> None:
        """After the optimizer step: keep the stepped gradient's norms and fold this step's
        measurement into the estimator (skipped on an AMP overflow, on the device)."""
        self.last_norms = last_norms
        m = self._pending if self._pending is not None else self._finish_accumulation(default_total)
        self.reset()
        if m is None or self.estimator is None:
            return
        self.estimator.update(m, skip)
        if m.examples is not None:
            self.last_examples = m.examples

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict | None:
        return None if self.estimator is None else self.estimator.state_dict()


def _dense_real(t: Tensor) -> Tensor:
    """What a squared norm is summed over: complex as (re, im) pairs, sparse as its values."""
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
