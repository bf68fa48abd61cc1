"""Gradient noise scale from two batch sizes, kept on the device (McCandlish et al. 2018).

With true gradient G and per-example covariance Σ, a mean gradient over B examples has
``E|G_B|² = |G|² + tr(Σ)/B``. From the squared norms of gradients at two batch sizes
``B_small < B_big`` (Appendix A)::

    |G|²  ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

Each is unbiased; their ratio is not, so each is averaged with a bias-corrected exponential
moving average and the averages are divided: ``B_simple = tr(Σ) / |G|²``. Every update is a
handful of tensor ops on the device, masked with ``torch.where`` rather than branched on, so a
training step never waits for the device; only :meth:`NoiseScaleEstimator.read` synchronises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


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
        if not (isinstance(self.beta, (int, float)) and 0.0 <= self.beta < 1.0):
            raise ValueError(f"NoiseScaleConfig.beta must be a float in [0, 1), got {self.beta!r}")
        if not isinstance(self.per_tensor, bool):
            raise TypeError(f"NoiseScaleConfig.per_tensor must be a bool, got {self.per_tensor!r}")
        if not (isinstance(self.min_updates, int) and self.min_updates >= 0):
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


class NoiseScaleEstimator:
    """Bias-corrected moving averages of |G|² and tr(Σ), total and per tensor, on one device.

    ``n_tensors`` is the number of parameter tensors the optimizer indexes (per-tensor vectors
    are indexed by the parameter's position across all param groups).
    """

    _KEYS = ("g2", "trace", "weight", "updates", "g2_pt", "trace_pt", "weight_pt")

    def __init__(self, config: NoiseScaleConfig, n_tensors: int, device: torch.device):
        self.config = config
        self.device = device
        f32 = dict(dtype=torch.float32, device=device)
        # Scalars in fp64: they are sums of many squared norms and live for the whole run.
        f64 = dict(dtype=torch.float64, device=device)
        self.g2 = torch.zeros((), **f64)
        self.trace = torch.zeros((), **f64)
        self.weight = torch.zeros((), **f64)  # 1 - beta^n over accepted updates: bias correction
        self.updates = torch.zeros((), **f64)
        n = n_tensors if config.per_tensor else 0
        self.g2_pt = torch.zeros(n, **f32)
        self.trace_pt = torch.zeros(n, **f32)
        self.weight_pt = torch.zeros(n, **f32)

    def resize(self, n_tensors: int) -> None:
        """Grow the per-tensor vectors after add_param_group (new entries start empty)."""
        if not self.config.per_tensor or n_tensors <= self.g2_pt.numel():
            return
        pad = n_tensors - self.g2_pt.numel()
        for key in ("g2_pt", "trace_pt", "weight_pt"):
            old = getattr(self, key)
            setattr(self, key, torch.cat([old, old.new_zeros(pad)]))

    def update(
        self,
        small_sq: Tensor,
        big_sq: Tensor,
        b_small: float,
        b_big: float,
        skip: Tensor | None,
        small_pt: Tensor | None = None,
        big_pt: Tensor | None = None,
        present_pt: Tensor | None = None,
    ) -> None:
        """Fold one step's measurement into the averages, on the device, without a sync.

        ``small_sq``/``big_sq`` are 0-dim mean squared gradient norms at ``b_small``/``b_big``
        examples. A step whose ``skip`` flag is set (AMP overflow) or whose estimates are not
        finite leaves every average unchanged. The ``*_pt`` vectors are per tensor; entries
        not ``present_pt`` (no gradient this step) are left unchanged.
        """
        beta = self.config.beta
        g2, trace = two_batch_estimates(small_sq.double(), big_sq.double(), b_small, b_big)
        ok = torch.isfinite(g2) & torch.isfinite(trace)
        if skip is not None:
            ok = ok & ~skip.to(device=self.device, dtype=torch.bool)
        add = ok.double() * (1.0 - beta)  # decay and weight only on accepted updates
        keep = 1.0 - add
        self.g2.mul_(keep).add_(add * torch.where(ok, g2, 0.0))
        self.trace.mul_(keep).add_(add * torch.where(ok, trace, 0.0))
        self.weight.mul_(keep).add_(add)
        self.updates.add_(ok.double())
        if self.config.per_tensor and small_pt is not None and big_pt is not None:
            g2_pt, trace_pt = two_batch_estimates(small_pt, big_pt, b_small, b_big)
            ok_pt = ok & torch.isfinite(g2_pt) & torch.isfinite(trace_pt)
            if present_pt is not None:
                ok_pt = ok_pt & present_pt
            add_pt = ok_pt.float() * (1.0 - beta)
            keep_pt = 1.0 - add_pt
            self.g2_pt.mul_(keep_pt).add_(add_pt * torch.where(ok_pt, g2_pt, 0.0))
            self.trace_pt.mul_(keep_pt).add_(add_pt * torch.where(ok_pt, trace_pt, 0.0))
            self.weight_pt.mul_(keep_pt).add_(add_pt)

    def b_noise(self, fallback: float) -> Tensor:
        """0-dim device tensor: the current B_simple, or ``fallback`` until warmed up (no sync)."""
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

    def load_state_dict(self, state: dict) -> None:
        for key in self._KEYS:
            if key not in state:
                raise KeyError(f"noise-scale state is missing {key!r}")
            value = state[key].to(device=self.device, dtype=getattr(self, key).dtype)
            setattr(self, key, value.clone())
