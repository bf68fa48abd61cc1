"""Lightning: feed fastscale's noise-scale estimator and log its figures from a ``Callback``.

    from fastscale.integrations.lightning import NoiseScaleCallback

    class Model(L.LightningModule):
        def configure_optimizers(self):
            return fastscale.FusedScaledSGD(self.parameters(), lr=0.1, noise_scale=True)

    trainer = L.Trainer(accumulate_grad_batches=4, callbacks=[NoiseScaleCallback()])

Where the small-batch gradients come from (``source="auto"``):

- ``"ddp"`` under a ``DistributedDataParallel`` strategy (more than one process):
  :func:`fastscale.distributed.register_noise_scale_hook` on ``trainer.strategy.model``, at the
  first training batch. B_small = one process's examples per step (micro-batch ×
  ``accumulate_grad_batches``: Lightning runs the accumulating backwards under ``no_sync()``),
  B_big = all processes'. Lightning's closures run the last backward inside ``optimizer.step``;
  the hook feeds the optimizer after that backward.
- ``"accumulate"`` with ``accumulate_grad_batches`` > 1 in one process:
  ``opt.accumulate_grad(batch_size=micro-batch, loss_scale=1/accumulate_grad_batches)`` after
  every backward (``on_after_backward``; Lightning divides each loss by the accumulation count).
- ``"per_example"`` otherwise: :class:`fastscale.PerExampleGradNorms` on the LightningModule
  and ``opt.observe_per_example_norms`` after the backward.

The micro-batch size is read from the batch (``lightning``'s ``extract_batch_size``: the first
dimension of the first tensor) unless ``batch_size=`` gives it.

Logging: at Lightning's logging interval only (``log_every_n_steps``), after a step, through
``pl_module.log``: ``{prefix}lr`` (the rate that step applied: ``opt.applied_lr()`` read before
it, not ``group["lr"]``), ``grad_sq_norm``, ``trace_cov``, ``b_simple``, ``b_simple_low``, ``b_simple_high`` (its 90%
interval; NaN while the estimate is not ready). The values are device tensors handed to
``pl_module.log``: the host reads them only when Lightning writes its logs, and other steps
read nothing.

Lightning's own ``LearningRateMonitor`` reads ``group["lr"]``, the unscaled rate schedulers
edit (see the README). :class:`LearningRateMonitor` here is a drop-in for it that logs, under
the same names and at the same interval, the rate each FusedScaledSGD group's next step
applies (``opt.applied_lr()``; the host reads it only at the monitor's logging interval, as the
stock monitor reads its floats); other optimizers' rates are logged as the stock one does.

The callback also makes Lightning's optimizer wrapper forward fastscale's own methods
(``self.optimizers().accumulate_grad()``, ``.gradient_stats()``, ...) to the FusedScaledSGD,
so manual optimization can call them on what ``self.optimizers()`` returns.
"""

from __future__ import annotations

import math
import weakref

import torch

try:
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.callbacks import LearningRateMonitor as _StockLearningRateMonitor
    from lightning.pytorch.utilities.data import extract_batch_size
except ImportError:  # the standalone package
    from pytorch_lightning.callbacks import Callback
    from pytorch_lightning.callbacks import LearningRateMonitor as _StockLearningRateMonitor
    from pytorch_lightning.utilities.data import extract_batch_size

from ..optimizer import FusedScaledSGD
from .logging import figures, unwrap_optimizer

__all__ = ["NoiseScaleCallback", "LearningRateMonitor", "FORWARDED_METHODS"]

# fastscale's methods that Lightning's wrapper should run on the optimizer it wraps.
FORWARDED_METHODS = (
    "accumulate_grad", "observe_per_example_norms", "observe_small_batch_norms", "noise_scale",
    "gradient_stats", "applied_lr", "current_lr", "set_batch_size", "zero_grad", "add_param_group",
)
_SOURCES = ("auto", "ddp", "accumulate", "per_example", "none")


def _forward_fastscale_methods(wrapper, optimizer: FusedScaledSGD) -> None:
    """Make ``wrapper.accumulate_grad(...)`` etc. run on ``optimizer`` itself (instance
    attributes shadow the methods the wrapper's class inherits from FusedScaledSGD). Lightning's
    wrapper subclasses the optimizer's class and forwards attribute reads, so these methods run
    with ``self`` = the wrapper: reads reach the optimizer, but an assignment (``add_param_group``
    replaces ``self.statistics``) would land on the wrapper and leave the optimizer stale."""
    for name in FORWARDED_METHODS:
        vars(wrapper)[name] = getattr(optimizer, name)


class NoiseScaleCallback(Callback):
    """Feed a :class:`fastscale.FusedScaledSGD` (noise_scale=True) and log its figures.

    Args:
        source: ``"auto"`` (see the module docstring), ``"ddp"``, ``"accumulate"``,
            ``"per_example"``, or ``"none"`` (only log; you feed the optimizer yourself, e.g. in
            manual optimization).
        batch_size: examples per micro-batch per process (default: read from each batch).
        log: log the figures at Lightning's logging interval.
        prefix: prepended to the logged names.
        optimizer_index: which of ``configure_optimizers``' optimizers (default 0).
    """

    def __init__(self, source: str = "auto", batch_size: int | None = None, log: bool = True,
                 prefix: str = "fastscale/", optimizer_index: int = 0):
        if source not in _SOURCES:
            raise ValueError(f"source must be one of {_SOURCES}, got {source!r}")
        if batch_size is not None and not (isinstance(batch_size, int) and batch_size > 0):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        self.source = source
        self.batch_size = batch_size
        self.log = log
        self.prefix = prefix
        self.optimizer_index = optimizer_index
        self.optimizer: FusedScaledSGD | None = None
        self.ddp_state = None
        self._micro = None
        self._per_example = None
        self._lr = None  # applied_lr() read before the last step (device tensors)
        self._stepped = False
        self._hooks = []

    # ------------------------------------------------------------------ setup
    def _resolve_source(self, trainer) -> str:
        if self.source != "auto":
            return self.source
        if trainer.world_size > 1 and isinstance(trainer.strategy.model, torch.nn.parallel.DistributedDataParallel):
            return "ddp"
        return "accumulate" if trainer.accumulate_grad_batches > 1 else "per_example"

    def on_fit_start(self, trainer, pl_module) -> None:
        optimizers = trainer.optimizers
        if not (0 <= self.optimizer_index < len(optimizers)):
            raise ValueError(f"NoiseScaleCallback: optimizer_index {self.optimizer_index} but "
                             f"configure_optimizers returned {len(optimizers)} optimizer(s)")
        opt = unwrap_optimizer(optimizers[self.optimizer_index])
        if opt.noise_scale_config is None and self.source != "none":
            raise ValueError("NoiseScaleCallback: build the FusedScaledSGD with noise_scale=True")
        self.optimizer = opt
        for wrapper in getattr(trainer.strategy, "_lightning_optimizers", []):
            if getattr(wrapper, "optimizer", None) is opt:
                _forward_fastscale_methods(wrapper, opt)
        self._resolved = self._resolve_source(trainer)
        if self._resolved == "ddp" and not isinstance(trainer.strategy.model, torch.nn.parallel.DistributedDataParallel):
            raise ValueError("NoiseScaleCallback(source='ddp') needs a DDP strategy (strategy='ddp')")
        if self._resolved == "per_example":
            from ..per_example import PerExampleGradNorms

            self._per_example = PerExampleGradNorms(pl_module, loss_reduction="mean")
        me = weakref.ref(self)

        def before_step(optimizer, args, kwargs):  # the rate this step applies, on the device
            self_ = me()
            if self_ is not None:
                self_._lr = [lr.clone() for lr in optimizer.applied_lr()]
                self_._stepped = True

        self._hooks.append(opt.register_step_pre_hook(before_step))

    def on_fit_end(self, trainer, pl_module) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        if self._per_example is not None:
            self._per_example.detach()
            self._per_example = None

    # ------------------------------------------------------------------ feeding
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._micro = self.batch_size if self.batch_size is not None else int(extract_batch_size(batch))
        if self._per_example is not None:
            # training_step need not call the LightningModule's forward, whose pre-hook clears them
            self._per_example.reset()
        if self._resolved == "ddp" and self.ddp_state is None:  # a collective: every rank's first batch
            from ..distributed import register_noise_scale_hook

            self.ddp_state = register_noise_scale_hook(
                trainer.strategy.model, self.optimizer,
                local_batch_size=self._micro * trainer.accumulate_grad_batches,
            )

    def on_after_backward(self, trainer, pl_module) -> None:
        if not pl_module.automatic_optimization:
            return  # manual optimization: feed it yourself (self.optimizers().accumulate_grad())
        if self._resolved == "accumulate":
            self.optimizer.accumulate_grad(batch_size=self._micro, loss_scale=1.0 / trainer.accumulate_grad_batches)
        elif self._resolved == "per_example":
            self.optimizer.observe_per_example_norms(self._per_example.squared_norms())

    # ------------------------------------------------------------------ logging
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stepped, self._stepped = self._stepped, False
        if not (self.log and self._lr is not None and trainer._logger_connector.should_update_logs):
            return
        # Automatic optimization: Lightning's interval counts optimizer steps, and the batches
        # that accumulate into the next step share its count: log at the step's batch. Manual:
        # it counts batches, and a metric not logged again is re-written stale: log the current
        # figures (after the last step) at every logging batch.
        if pl_module.automatic_optimization and not stepped:
            return
        values = figures(self.optimizer, applied_lr=self._lr)
        ready = values.pop("noise_scale_ready", None)
        if ready is not None:  # NaN until ready: a key left out would show its last logged value
            for key in ("b_simple", "b_simple_low", "b_simple_high"):
                values[key] = torch.where(ready > 0, values[key], math.nan)
        for name, value in values.items():
            pl_module.log(self.prefix + name, value.reshape(()), on_step=True, on_epoch=False, batch_size=1)


class LearningRateMonitor(_StockLearningRateMonitor):
    """Lightning's ``LearningRateMonitor`` (same arguments, names and interval) showing, for a
    :class:`fastscale.FusedScaledSGD`, the rate each group's next step applies — batch-size
    scale × warmup × ``group["lr"]`` — instead of the unscaled ``group["lr"]``.

    It extends the stock monitor's per-optimizer hook (``_get_optimizer_stats``): a private
    method of Lightning, so ``tests/test_integrations.py`` holds it to every installed version.
    """

    def _get_optimizer_stats(self, optimizer, names):
        stats = super()._get_optimizer_stats(optimizer, names)
        try:
            opt = unwrap_optimizer(optimizer)
        except TypeError:  # not ours: the stock figures
            return stats
        for lr, name in zip(opt.applied_lr(), names):  # zip: as the stock monitor pairs groups and names
            value = lr.item()  # the monitor's logging interval only
            stats[name] = value
            self.lrs[name][-1] = value
        return stats
