"""Learning-rate scaling with the batch size, and gradual warmup.

Effective learning rate of a param group at step t (t = steps taken so far)::

    lr_eff = group["lr"] · scale(B / B0) · warmup(t)

    scale: "none"   1
           "linear" k = B / B0                       (Goyal et al. 2017)
           "sqrt"   √k                               (Krizhevsky 2014; Hoffer et al. 2017)
           "noise"  (1 + B_noise/B0) / (1 + B_noise/B)   (McCandlish et al. 2018: ε_opt(B) =
                    ε_max / (1 + B_noise/B), normalised to 1 at B0; B_noise is the live estimate)
    warmup(t) = s + (1 - s) · min(t / warmup_steps, 1)

where s is the warmup start factor: by default 1/scale, so the rate rises linearly per step from
the unscaled group lr to the scaled one (Goyal et al. §2.2); ``warmup_steps=0`` means no warmup.
The result is a 1-element device tensor computed from device tensors (the step counter, B_noise)
and host numbers passed as kernel arguments, so it never synchronises and never recompiles.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

SCALINGS = ("none", "linear", "sqrt", "noise")
GROUP_KEYS = ("batch_size", "base_batch_size", "scaling", "warmup_steps", "warmup_start_factor", "noise_fallback")


def check_batch_size(name: str, value, allow_none: bool = True):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def check_group_options(group: dict) -> None:
    """Validate the scaling/warmup options of one param group (clear errors, nothing changed)."""
    check_batch_size("batch_size", group["batch_size"])
    check_batch_size("base_batch_size", group["base_batch_size"])
    if group["scaling"] not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {group['scaling']!r}")
    steps = group["warmup_steps"]
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {steps!r}")
    start = group["warmup_start_factor"]
    if start is not None and (
        isinstance(start, bool) or not isinstance(start, numbers.Real) or not 0.0 <= start <= 1.0
    ):
        raise ValueError(f"warmup_start_factor must be None or a float in [0, 1], got {start!r}")
    fallback = group["noise_fallback"]
    if fallback is not None and (isinstance(fallback, bool) or not isinstance(fallback, numbers.Real) or not fallback > 0):
        raise ValueError(f"noise_fallback must be None (the base batch size) or a float > 0, got {fallback!r}")


def check_warmup_has_a_ramp(group: dict) -> None:
    """Refuse a warmup that would be flat: by default it starts from the unscaled rate, which
    is the target when there is no batch-size ratio (checked when a group is added)."""
    if group["warmup_steps"] and group["warmup_start_factor"] is None and host_scale(group) == 1.0:
        raise ValueError(
            f"warmup_steps={group['warmup_steps']} would do nothing: the default warmup ramps from the unscaled "
            "lr to the lr scaled for batch_size/base_batch_size, and here that scale is 1. Give "
            "warmup_start_factor= (e.g. 0.0 to ramp from 0), a batch_size other than base_batch_size, or "
            "use one torch warmup scheduler (LinearLR) instead; do not combine both, their factors multiply"
        )


def batch_ratio(group: dict) -> float:
    """k = B / B0 (1 when either is unknown)."""
    b, b0 = group["batch_size"], group["base_batch_size"]
    return 1.0 if b is None or b0 is None else b / b0


def host_scale(group: dict) -> float | None:
    """The scale factor when it is known on the host (None for "noise": it lives on the device)."""
    k = batch_ratio(group)
    rule = group["scaling"]
    if rule == "none":
        return 1.0
    if rule == "linear":
        return k
    if rule == "sqrt":
        return math.sqrt(k)
    return None


def noise_scale_factor(group: dict, b_noise: Tensor) -> Tensor:
    """(1 + B_noise/B0) / (1 + B_noise/B) as a 1-element tensor; linear scaling while B_noise is inf."""
    b, b0 = group["batch_size"], group["base_batch_size"]
    if b is None or b0 is None:
        return torch.ones_like(b_noise)
    factor = (1.0 + b_noise / b0) / (1.0 + b_noise / b)
    return torch.where(torch.isinf(b_noise), b / b0, factor)


def effective_lr(group: dict, step: Tensor, scale: float | Tensor) -> Tensor:
    """Tensor shaped like ``step`` (1 element) on its device: group lr × scale × warmup(step)."""
    scale = scale if isinstance(scale, Tensor) else torch.full_like(step, scale)
    steps, start = group["warmup_steps"], group["warmup_start_factor"]
    if steps > 0:
        start = 1.0 / scale if start is None else torch.full_like(step, start)
        ramp = torch.clamp(step / steps, max=1.0)
        # lerp returns its end exactly at weight 1, so the warmed-up rate is exactly lr × scale.
        factor = torch.lerp(start, torch.ones_like(step), ramp) * scale
    else:
        factor = scale
    lr = group["lr"]
    return factor * (lr.to(device=step.device, dtype=step.dtype) if isinstance(lr, Tensor) else lr)


def warmup_lr(group: dict, step: Tensor, scale: float) -> Tensor:
    """:func:`effective_lr` for a float lr and a host scale, in two device ops:
    ``lr·scale·(s + (1 - s)·min(t/T, 1)) = a + c·min(t, T)`` with a = lr·scale·s, c = lr·scale·(1 - s)/T."""
    steps, start = group["warmup_steps"], group["warmup_start_factor"]
    start = 1.0 / scale if start is None else start
    target = group["lr"] * scale
    return torch.clamp(step, max=steps).mul_(target * (1.0 - start) / steps).add_(target * start)
