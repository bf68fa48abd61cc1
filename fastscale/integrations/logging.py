"""The figures to log from a plain training loop, as device tensors (no host sync here).

    from fastscale.integrations.logging import figures

    for step, batch in enumerate(loader):
        lr = opt.applied_lr()                 # the rate this step applies (read before step())
        ...                                   # backward, opt.accumulate_grad(...), opt.step()
        if step % 100 == 0:                   # the only place the host waits for the device
            for name, value in figures(opt, applied_lr=lr).items():
                writer.add_scalar(name, value.item(), step)          # TensorBoard
            # wandb.log({k: v.item() for k, v in figures(opt, applied_lr=lr).items()}, step=step)

``figures(opt)`` returns a dict of 1-element device tensors: ``lr`` (``lr/group{i}`` for several
param groups) and, with ``noise_scale=True``, ``grad_sq_norm`` (|G|²), ``trace_cov`` (tr(Σ)),
``b_simple`` with ``b_simple_low``/``b_simple_high`` (the 90% interval, as
``gradient_stats()``), and ``noise_scale_ready`` (1.0 once the estimate is ready, else 0.0).
The values equal ``opt.gradient_stats()``'s; only reading them (``.item()``, a logger's
conversion) synchronises.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["figures", "unwrap_optimizer"]


def unwrap_optimizer(optimizer):
    """The :class:`fastscale.FusedScaledSGD` inside a framework's optimizer wrapper (Lightning's
    ``LightningOptimizer``, accelerate's ``AcceleratedOptimizer``), or ``optimizer`` itself."""
    from ..optimizer import FusedScaledSGD

    seen = optimizer
    for _ in range(8):  # wrappers of wrappers
        if type(seen) is FusedScaledSGD or (isinstance(seen, FusedScaledSGD) and "param_groups" in vars(seen)):
            return seen
        inner = vars(seen).get("_optimizer", vars(seen).get("optimizer")) if hasattr(seen, "__dict__") else None
        if inner is None:
            break
        seen = inner
    raise TypeError(
        f"expected a fastscale.FusedScaledSGD (or a framework's wrapper of one), got {type(optimizer).__name__}"
    )


def _device_estimate(opt) -> dict[str, Tensor]:
    """The total (first column) of the estimator's figures, on the device, as gradient_stats() reads them."""
    est = opt.statistics.estimator
    total = slice(0, 1)
    e = est._estimates(total)
    ready = est._ready(e, total)
    z = est.config.z
    b, sd = e["b_simple"], e["b_simple_stderr"]
    return {
        "grad_sq_norm": e["grad_sq_norm"],
        "trace_cov": e["trace_cov"],
        "b_simple": b,
        "b_simple_low": b - z * sd,
        "b_simple_high": b + z * sd,
        "noise_scale_ready": ready.to(b.dtype),
    }


@torch.no_grad()
def figures(optimizer, applied_lr: list[Tensor] | None = None, prefix: str = "") -> dict[str, Tensor]:
    """The applied learning rate and the noise-scale figures as 1-element device tensors.

    Args:
        optimizer: a :class:`fastscale.FusedScaledSGD` (or a Lightning/accelerate wrapper of one).
        applied_lr: ``opt.applied_lr()`` as read before the step you log (default: read now, i.e.
            the rate the *next* step applies).
        prefix: prepended to every key (e.g. ``"train/"``).
    """
    opt = unwrap_optimizer(optimizer)
    lrs = opt.applied_lr() if applied_lr is None else applied_lr
    out: dict[str, Tensor] = {}
    if len(lrs) == 1:
        out["lr"] = lrs[0].reshape(1)
    else:
        out.update({f"lr/group{i}": lr.reshape(1) for i, lr in enumerate(lrs)})
    if opt.statistics.estimator is not None:
        out.update({k: v.reshape(1) for k, v in _device_estimate(opt).items()})
    return {prefix + k: v for k, v in out.items()}
