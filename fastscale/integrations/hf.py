"""Hugging Face Trainer: feed fastscale's noise-scale estimator and log its figures.

    from fastscale.integrations.hf import NoiseScaleTrainer

    trainer = NoiseScaleTrainer(
        model=model, args=TrainingArguments(..., gradient_accumulation_steps=4),   # max_grad_norm=1.0
        train_dataset=train_dataset,
        optimizer_cls_and_kwargs=(fastscale.FusedScaledSGD, dict(lr=0.1, momentum=0.9, noise_scale=True)),
    )
    trainer.train()

Where the micro-batch boundary is seen: ``Trainer.training_step`` runs one micro-batch's
forward and backward; no callback event runs between the last backward and the gradient
clipping (``max_grad_norm``, on by default), so this subclass overrides ``training_step`` and
calls ``opt.accumulate_grad(batch_size=micro-batch, loss_scale=1/gradient_accumulation_steps)``
right after each backward. fastscale snapshots the accumulated gradient there, so the clipping
that follows changes the update, not the statistics. (``TrainerCallback.on_pre_optimizer_step``
comes after clipping; ``on_step_end`` after the step: neither sees the micro-batches.)

Selecting the optimizer: ``TrainingArguments(optim=...)`` takes only the names transformers
knows (an enum, no registry), so fastscale cannot be chosen there without patching; pass
``optimizer_cls_and_kwargs=(fastscale.FusedScaledSGD, {...})`` or ``optimizers=(opt, None)`` to
the Trainer.

Logging: at the Trainer's logging steps (``logging_steps``), ``Trainer.log`` gets
``{prefix}lr`` (the rate the last step applied), ``grad_sq_norm``, ``trace_cov``, ``b_simple``, ``b_simple_low``, ``b_simple_high`` (NaN
while the estimate is not ready), read from the device only then; every ``report_to``
integration (TensorBoard, W&B, ...) receives them. The Trainer's own ``learning_rate`` (read
after its scheduler stepped: the next step's rate) becomes the rate the next step applies —
batch-size scale × warmup × ``group["lr"]`` — instead of the unscaled ``group["lr"]``.

Not supported (raises): several processes (use :func:`fastscale.distributed.register_noise_scale_hook`
on ``trainer.model_wrapped`` yourself), a loss normalised by ``num_items_in_batch`` (models
that accept loss kwargs, ``compute_loss_func``): set ``trainer.model_accepts_loss_kwargs = False``.
With ``gradient_accumulation_steps=1`` there is one gradient per step: nothing is fed (a
warning says so once).
"""

from __future__ import annotations

import math
import warnings
import weakref

import torch
from transformers import Trainer

from ..optimizer import FusedScaledSGD
from .logging import figures, unwrap_optimizer

__all__ = ["NoiseScaleTrainer"]


def _micro_batch_size(inputs) -> int:
    for value in inputs.values() if isinstance(inputs, dict) else inputs:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("NoiseScaleTrainer: cannot tell the micro-batch size (no tensor input); pass noise_scale_batch_size=")


class NoiseScaleTrainer(Trainer):
    """A :class:`transformers.Trainer` that feeds a :class:`fastscale.FusedScaledSGD`'s estimator
    after every micro-batch backward and logs the figures (see the module docstring).

    Extra keyword arguments:
        noise_scale_batch_size: examples per micro-batch (default: read from the inputs).
        noise_scale_prefix: prepended to the logged names (default ``"fastscale/"``).
    """

    def __init__(self, *args, noise_scale_batch_size: int | None = None, noise_scale_prefix: str = "fastscale/",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.noise_scale_batch_size = noise_scale_batch_size
        self.noise_scale_prefix = noise_scale_prefix
        self._fastscale_opt: FusedScaledSGD | None = None
        self._fastscale_lr = None
        self._fastscale_hook = None
        self._fastscale_warned = False

    def _fastscale_optimizer(self) -> FusedScaledSGD:
        opt = unwrap_optimizer(self.optimizer)
        if opt is not self._fastscale_opt:
            if opt.noise_scale_config is None:
                raise ValueError("NoiseScaleTrainer: build the FusedScaledSGD with noise_scale=True")
            if self.args.world_size > 1:
                raise NotImplementedError(
                    "NoiseScaleTrainer runs in one process; with several, register "
                    "fastscale.distributed.register_noise_scale_hook on trainer.model_wrapped instead")
            if self._fastscale_hook is not None:
                self._fastscale_hook.remove()
            me = weakref.ref(self)

            def before_step(optimizer, args, kwargs):  # the rate this step applies (device tensors)
                trainer = me()
                if trainer is not None:
                    trainer._fastscale_lr = [lr.clone() for lr in optimizer.applied_lr()]

            self._fastscale_hook = opt.register_step_pre_hook(before_step)
            self._fastscale_opt = opt
        return opt

    def training_step(self, model, inputs, num_items_in_batch=None):
        scaled_for_ga = self.loss_is_scaled_for_ga
        if scaled_for_ga is None:
            scaled_for_ga = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) \
                or self.compute_loss_func is not None
        if scaled_for_ga:
            raise NotImplementedError(
                "NoiseScaleTrainer: the loss is normalised by num_items_in_batch (a model that accepts loss kwargs, "
                "or compute_loss_func), so each micro-batch's loss scale is unknown here; set "
                "trainer.model_accepts_loss_kwargs = False for a mean loss per micro-batch")
        opt = self._fastscale_optimizer()
        micro = self.noise_scale_batch_size or _micro_batch_size(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        k = self.current_gradient_accumulation_steps
        if k > 1:
            # The Trainer divided this micro-batch's mean loss by k before its backward.
            opt.accumulate_grad(batch_size=micro, loss_scale=1.0 / k)
        elif not self._fastscale_warned:
            self._fastscale_warned = True
            warnings.warn("NoiseScaleTrainer: gradient_accumulation_steps=1 gives one gradient per step; "
                          "the noise-scale estimator needs two batch sizes (use gradient accumulation)", stacklevel=2)
        return loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._fastscale_opt is not None and "learning_rate" in logs:
            # The Trainer logs the rate after its scheduler stepped (the next step's); so does
            # this, but the applied one: batch-size scale × warmup × group["lr"].
            logs["learning_rate"] = self._fastscale_opt.applied_lr()[0].item()
        if self._fastscale_opt is not None and self._fastscale_lr is not None and "loss" in logs:
            values = figures(self._fastscale_opt, applied_lr=self._fastscale_lr)
            ready = values.pop("noise_scale_ready").item() > 0  # logging steps only
            for name, value in values.items():
                if name.startswith("b_simple") and not ready:
                    value = torch.full_like(value, math.nan)
                logs[self.noise_scale_prefix + name] = value.item()
        super().log(logs, *args, **kwargs)
