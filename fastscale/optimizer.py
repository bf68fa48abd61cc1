"""FusedScaledSGD: torch.optim.SGD with batch-size lr scaling, warmup and noise-scale statistics.

Shaped like ``torch/optim/sgd.py``: this class validates and collects each group's tensors;
:func:`fastscale.functional.fused_scaled_sgd` computes; the
:class:`~fastscale.noise_scale.StatisticsTracker` owns everything the statistics keep between
calls. Every public method checks all its input before its first write, so a call that
raises leaves parameters, buffers, the step counter and the statistics as they were.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import _use_grad_for_differentiable

from . import ops, sharded
from . import scaling as lr_scaling
from .functional import check_sparse, fused_scaled_sgd
from .noise_scale import (
    Measurement,
    NoiseScaleConfig,
    NoiseScaleEstimator,
    StatisticsTracker,
    _amp_divisor,
    check_grad_scaler,
    check_loss_scale,
    device_scalar,
)

_REAL = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_COMPLEX = (torch.complex64, torch.complex128)
_STATE_KEY = "fastscale"  # non-parameter key of the state dict: never cast to a param's dtype
_SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach", "fused",
             "differentiable")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_dtypes(p: Tensor) -> None:
    if p.dtype not in _REAL + _COMPLEX or p.grad.dtype != p.dtype:
        raise TypeError(
            f"FusedScaledSGD steps parameters of dtype {[str(d) for d in _REAL + _COMPLEX]} with gradients "
            f"of the same dtype; got parameter {p.dtype}, gradient {p.grad.dtype}"
        )


def _check_sgd_options(group: dict) -> None:
    """torch.optim.SGD's checks, with torch's messages, plus type checks torch leaves out."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    elif not _is_number(lr):
        raise TypeError(f"lr must be a float or a 1-element tensor, got {type(lr).__name__}")
    if lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    for key in ("momentum", "dampening", "weight_decay"):
        value = group[key]
        if key == "weight_decay" and isinstance(value, Tensor):  # as torch: float | Tensor
            if value.numel() != 1:
                raise ValueError("Tensor weight_decay must be 1-element")
        elif not _is_number(value):
            raise TypeError(f"{key} must be a float, got {type(value).__name__}")
    if group["momentum"] < 0.0:
        raise ValueError(f"Invalid momentum value: {group['momentum']}")
    if group["weight_decay"] < 0.0:
        raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
    for key in ("nesterov", "maximize", "differentiable"):
        if not isinstance(group[key], bool):
            raise TypeError(f"{key} must be a bool, got {group[key]!r}")
    for key in ("foreach", "fused"):
        if group[key] is not None and not isinstance(group[key], bool):
            raise TypeError(f"{key} must be None or a bool, got {group[key]!r}")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    if group["fused"]:
        if group["differentiable"]:
            raise RuntimeError("`fused` does not support `differentiable`")
        if group["foreach"]:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


_ALLOWED = frozenset(_REAL + _COMPLEX)


class _Plan:
    """What one group's step checked once for the tensors it stepped (by identity): the
    statistics positions, their single device and dtype (``uniform``), and whether every
    momentum buffer is already stored in ``state`` (then only new ones are stored)."""

    __slots__ = ("key", "flags", "device", "dtypes", "uniform", "positions", "stored")

    def __init__(self, key, flags, device, dtypes, uniform, positions):
        self.key, self.flags, self.device, self.dtypes = key, flags, device, dtypes
        self.uniform, self.positions, self.stored = uniform, positions, False


class FusedScaledSGD(Optimizer):
    r"""Drop-in :class:`torch.optim.SGD` whose step is one fused pass that also gathers gradient
    statistics, with the learning rate scaled for the batch size and warmed up.

    With ``batch_size=None`` (or ``scaling="none"``) and ``warmup_steps=0`` it computes what
    ``torch.optim.SGD`` computes, step for step. Otherwise each group's rate is
    ``group["lr"] · scale(batch_size / base_batch_size) · warmup(step)``
    (see :mod:`fastscale.scaling`), so lr schedulers that edit ``group["lr"]`` keep working.
    ``group["lr"]`` stays the rate you and your schedulers set; the rate applied is
    :meth:`applied_lr` (device tensors, no sync) or :meth:`current_lr` (floats).

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, maximize: as torch.optim.SGD.
        foreach, fused: as torch.optim.SGD. ``fused=None`` (default) calls the compiled kernel
            where one is built for the device (else the pure-torch twin, with one warning);
            ``fused=True`` requires the compiled kernel; ``fused=False`` or an explicit
            ``foreach`` runs the pure-torch twin (``torch._foreach_*`` ops).
        differentiable: as torch.optim.SGD: the step runs the pure-torch twin under autograd.
        batch_size: current batch size (None: no scaling). Change it with :meth:`set_batch_size`.
        base_batch_size: the batch size ``lr`` was tuned for (default: the first ``batch_size``).
        scaling: ``"linear"`` (default), ``"sqrt"``, ``"noise"`` or ``"none"``.
        warmup_steps: steps of linear warmup (0: none).
        warmup_start_factor: multiplier of the scaled lr at step 0 (default ``1/scale``: start
            from the unscaled lr, Goyal et al. 2017).
        noise_fallback: for ``scaling="noise"``, the B_noise used until the live estimate has
            warmed up (default: ``base_batch_size``, a cautious scale between 1 and 2).
        noise_scale: ``True`` or a :class:`NoiseScaleConfig` to estimate the gradient noise scale.

    The scaling and warmup options may be overridden per param group.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        batch_size: int | None = None,
        base_batch_size: int | None = None,
        scaling: str = "linear",
        warmup_steps: int = 0,
        warmup_start_factor: float | None = None,
        noise_fallback: float | None = None,
        noise_scale: bool | NoiseScaleConfig = False,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
            batch_size=batch_size,
            base_batch_size=batch_size if base_batch_size is None else base_batch_size,
            scaling=scaling, warmup_steps=warmup_steps, warmup_start_factor=warmup_start_factor,
            noise_fallback=noise_fallback,
        )
        _check_sgd_options(defaults)
        self._noise_config = NoiseScaleConfig.from_arg(noise_scale)
        self._check_options(defaults)
        super().__init__(params, defaults)  # each group is checked by add_param_group
        # GradScaler passes grad_scale/found_inf to step() instead of unscaling and syncing.
        self._step_supports_amp_scaling = True
        params = self._all_params()
        device = params[0].device if params else torch.device("cpu")
        self._step_count = device_scalar(0.0, device, torch.float32 if device.type == "mps" else torch.float64)
        self.statistics = StatisticsTracker(self._noise_config, params, device)
        self._caches()

    def _caches(self) -> None:
        self._checked: dict[int, tuple] = {}  # group index -> options last validated
        self._lr_cache: dict[int, tuple] = {}  # group index -> (key, lr tensor) while constant
        # group index -> _Plan of the parameters it stepped last: what was checked once for them
        self._plans: dict[int, _Plan] = {}

    # ----------------------------------------------------------------- copies
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update(_noise_config=self._noise_config, _step_count=self._step_count, statistics=self.statistics,
                     _step_supports_amp_scaling=True)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._caches()

    # ----------------------------------------------------------------- param groups
    def _all_params(self) -> list[Tensor]:
        """Every parameter once, in group order: the index of per-tensor statistics."""
        seen, out = set(), []
        for group in self.param_groups:
            for p in group["params"]:
                if p not in seen:
                    seen.add(p)
                    out.append(p)
        return out

    def _check_options(self, group: dict) -> None:
        _check_sgd_options(group)
        lr_scaling.check_group_options(group)
        if group["scaling"] == "noise" and self._noise_config is None:
            raise ValueError('scaling="noise" needs noise_scale=True (the live B_noise estimate)')

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        # Validate a copy (torch's checks, then ours) and commit only when all pass. A generator
        # of parameters is read once, here, so a retry after an error finds them all.
        if not isinstance(param_group.get("params"), (Tensor, set, list, tuple, type(None))):
            param_group["params"] = list(param_group["params"])
        probe = dict(param_group)
        if "batch_size" in probe and "base_batch_size" not in probe:
            probe["base_batch_size"] = self.defaults["base_batch_size"] or probe["batch_size"]
        super().add_param_group(probe)  # appends the probe on success
        try:
            self._check_options(probe)
            lr_scaling.check_warmup_has_a_ramp(probe)
            if probe["fused"]:
                for p in probe["params"]:
                    ops.check_native(p.device.type, required=True)
            tracker = None
            if hasattr(self, "statistics"):  # not during __init__
                tracker = self.statistics.with_params(self._all_params())
        except BaseException:
            self.param_groups.pop()
            raise
        param_group.clear()
        param_group.update(probe)
        self.param_groups[-1] = param_group
        if tracker is not None:
            self.statistics = tracker
            self._caches()

    @property
    def noise_scale_config(self) -> NoiseScaleConfig | None:
        """How the noise scale is estimated, or None when it is not."""
        return self._noise_config

    def set_batch_size(self, batch_size: int, group: int | None = None) -> None:
        """Change the batch size of every group (or of group index ``group``); the scale follows."""
        batch_size = lr_scaling.check_batch_size("batch_size", batch_size, allow_none=False)
        if group is not None and (
            isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < len(self.param_groups)
        ):
            raise ValueError(f"group must be None or a group index in [0, {len(self.param_groups)}), got {group!r}")
        groups = self.param_groups if group is None else [self.param_groups[group]]
        for g in groups:
            g["batch_size"] = batch_size
            if g["base_batch_size"] is None:
                g["base_batch_size"] = batch_size

    # ----------------------------------------------------------------- learning rate
    def _group_scale(self, group: dict):
        scale = lr_scaling.host_scale(group)
        if scale is not None:
            return scale
        # Until the estimate warms up: B_noise = base batch size, a cautious scale in [1, 2).
        fallback = group["noise_fallback"] or group["base_batch_size"] or math.inf
        return lr_scaling.noise_scale_factor(group, self.statistics.estimator.b_noise(fallback))

    def _effective_lr(self, index: int, group: dict) -> Tensor:
        scale = self._group_scale(group)
        if isinstance(scale, Tensor) or isinstance(group["lr"], Tensor):
            return lr_scaling.effective_lr(group, self._step_count, scale)
        if group["warmup_steps"]:
            return lr_scaling.warmup_lr(group, self._step_count, scale)
        # Constant while lr and batch size are: reuse the tensor instead of launching a fill.
        key = (group["lr"], scale)
        cached = self._lr_cache.get(index)
        if cached is None or cached[0] != key:
            cached = self._lr_cache[index] = (key, lr_scaling.effective_lr(group, self._step_count, scale))
        return cached[1]

    def applied_lr(self) -> list[Tensor]:
        """The rate each group's next step applies, as 1-element device tensors (no sync): what
        to log as "the learning rate" (``group["lr"]`` is the unscaled rate schedulers edit)."""
        self._check_groups()
        return [lr_scaling.effective_lr(g, self._step_count, self._group_scale(g)) for g in self.param_groups]

    def current_lr(self) -> list[float]:
        """:meth:`applied_lr` as floats (synchronises)."""
        return [t.item() for t in self.applied_lr()]

    # ----------------------------------------------------------------- the step
    def _check_groups(self) -> None:
        """Group options edited by hand are validated before the next step uses them."""
        for index, group in enumerate(self.param_groups):
            key = tuple(id(group[k]) if isinstance(group[k], Tensor) else group[k] for k in
                        (*_SGD_KEYS, *lr_scaling.GROUP_KEYS))
            if self._checked.get(index) != key:
                self._check_options(group)
                self._checked[index] = key

    def _collect(self, index: int, group: dict):
        """The group's parameters with gradients (each once), their gradients and buffers.

        What depends only on which tensors these are (duplicates, compiled kernels for their
        devices, their statistics positions) is checked once per set of tensors and kept as the
        group's :class:`_Plan`; what can change between steps (dtypes, sparse gradients) is
        checked every step."""
        params = [p for p in group["params"] if p.grad is not None]
        flags = (group["fused"], group["foreach"], group["differentiable"])
        plan = self._plans.get(index)
        key = tuple(map(id, params))
        if plan is None or plan.key != key or plan.flags != flags or (params and plan.device != params[0].device):
            plan = None
            if len(set(key)) != len(params):  # listed twice (torch warns): stepped once
                params = list({id(p): p for p in params}.values())
        grads = [p.grad for p in params]
        if self.statistics.shards is not None:  # DTensor parameters: each gradient laid out as its parameter
            sharded.check_grads(params, grads)
        # (Comprehensions, not map(attrgetter): dynamo traces these when the step is compiled.)
        dtypes = {p.dtype for p in params}
        if len(dtypes) > 1 or not dtypes <= _ALLOWED or {g.dtype for g in grads} != dtypes:
            for p in params:
                _check_dtypes(p)
        sparse = any(g.is_sparse for g in grads)
        if sparse:
            if group["fused"] or group["differentiable"]:
                raise RuntimeError("sparse gradients need fused=None or False and differentiable=False")
            check_sparse(grads, group["weight_decay"])
        if plan is None:
            devices = {p.device for p in params}
            if group["fused"] is None and group["foreach"] is None and not group["differentiable"]:
                for device_type in {d.type for d in devices}:
                    ops.check_native(device_type, required=False)
            elif group["fused"]:
                for device_type in {d.type for d in devices}:
                    ops.check_native(device_type, required=True)
        bufs = [self.state[p].get("momentum_buffer") for p in params] if group["momentum"] != 0 else []
        if plan is None or plan.dtypes != dtypes:
            # A module moved or cast after buffers were made (.double(), .to(device)): as torch's
            # SGD goes on, the buffer follows its parameter (stored back only once the step is done).
            bufs = [b if b is None or b.is_sparse or (b.dtype == p.dtype and b.device == p.device)
                    else b.to(device=p.device, dtype=p.dtype) for p, b in zip(params, bufs)]
        if plan is None or plan.dtypes != dtypes:
            # One device and dtype, checked when the tensors (or their dtype) change: the fused
            # function then takes them as one bucket without grouping them again.
            self._plans[index] = plan = _Plan(
                tuple(map(id, params)), flags, params[0].device if params else None, dtypes,
                len(devices if plan is None else {p.device for p in params}) == 1 and len(dtypes) == 1,
                self.statistics.positions(params))
        return params, grads, bufs, plan.uniform and not sparse

    def _check_params(self) -> None:
        """Parameters appended to a group's list by hand (as when unfreezing layers) join the
        statistics; any other change of the parameter lists is refused before anything is written."""
        known = self.statistics.params
        listed = [p for group in self.param_groups for p in group["params"]]
        if len(listed) == len(known) and all(a is b for a, b in zip(listed, known)):
            return  # as they were (each once): the common case, without hashing every tensor
        params = self._all_params()
        if len(params) == len(known) and all(a is b for a, b in zip(params, known)):
            return
        if len(params) < len(known) or any(a is not b for a, b in zip(params, known)):
            raise ValueError(
                "the optimizer's parameters were removed from or reordered within param_groups by hand; "
                "build a new optimizer (or load a state dict into one) for another set of parameters"
            )
        self.statistics = self.statistics.with_params(params)
        self._caches()

    @_use_grad_for_differentiable
    def step(self, closure=None):
        """Perform a single optimization step (closure: as torch.optim.SGD)."""
        self._check_groups()
        self._check_params()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # every check before a write
        collected = [self._collect(index, group) for index, group in enumerate(self.param_groups)]
        norms, positions = [], []
        for index, (group, (params, grads, bufs, uniform)) in enumerate(zip(self.param_groups, collected)):
            if not params:
                continue
            pure_torch = group["fused"] is False or (group["foreach"] is not None and not group["fused"])
            # Buffers to store back after the step: those it creates, or all after a move or cast.
            new_bufs = [i for i, b in enumerate(bufs) if b is None] if self._plans[index].stored else None
            norms.append(fused_scaled_sgd(
                params, grads, bufs,
                lr=self._effective_lr(index, group),
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
                grad_scale=grad_scale,
                found_inf=found_inf,
                fused=False if pure_torch else group["fused"],
                differentiable=group["differentiable"],
                uniform=uniform,
            ).detach())
            plan = self._plans[index]
            positions += plan.positions
            if group["momentum"] != 0:
                for i in range(len(params)) if new_bufs is None else new_bufs:
                    if bufs[i] is not None:
                        self.state[params[i]]["momentum_buffer"] = bufs[i]
                plan.stored = all(b is not None for b in bufs)
        last, _ = self.statistics.per_tensor(norms, positions)
        self.statistics.on_step(last, found_inf)
        if found_inf is None:
            self._step_count.add_(1)
        else:
            self._step_count.add_(1 - found_inf.to(device=self._step_count.device, dtype=self._step_count.dtype))
        return loss

    # ----------------------------------------------------------------- statistics sources
    def _buckets_for_accumulation(self) -> list[list[Tensor]]:
        buckets: dict = {}
        for p in self.statistics.params:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise TypeError("accumulate_grad does not support sparse gradients")
            _check_dtypes(p)
            key = (p.device, p.dtype)
            buckets.setdefault(key, []).append(p)
        return list(buckets.values())

    def _accumulate_ops(self):
        """The micro-batch ops (snapshots, hooks): dispatched, or the twins as fused=False asks."""
        d = self.defaults
        return ops.dispatched if d["fused"] is not False and d["foreach"] is None else ops.pure_torch

    @torch.no_grad()
    def accumulate_grad(self, batch_size: int | None = None, loss_scale: float = 1.0, grad_scaler=None) -> None:
        """Record the micro-batch gradient that the last ``backward()`` added to ``.grad``.

        Call it after each micro-batch's backward. ``.grad`` keeps accumulating as usual (so
        gradient clipping and GradScaler's inf check see the whole gradient, and ``step()``
        matches plain accumulation); this takes each micro-batch's squared gradient norm, for
        the noise-scale estimate (B_small = micro-batch, B_big = all of them): from a snapshot
        of ``.grad`` in one fused pass, or, once a step has shown every gradient arriving
        through autograd, from hooks that read each gradient as autograd adds it to ``.grad``.
        The big-batch norm is that of the accumulated gradient as the last call saw it, so
        clipping or unscaling ``.grad`` before ``step()`` does not change the statistics.

        Args:
            batch_size: examples in this micro-batch (default: the group ``batch_size`` divided
                by the number of micro-batches, so equal micro-batches). Give it for every
                micro-batch of a step or for none.
            loss_scale: how this micro-batch's loss was scaled relative to the mean loss over
                its examples: 1 for a mean loss, ``1/k`` if you divided it by the number of
                micro-batches k, the micro-batch size for a sum-reduced loss.
            grad_scaler: the ``torch.amp.GradScaler`` whose ``scale(loss)`` you backpropagated,
                so its scale is divided out of the statistics (no sync).

        A parameter whose gradient first appears in a later micro-batch counts from there;
        gradients reset outside the optimizer (``model.zero_grad()``, ``p.grad = None``) start
        a new accumulation; a second call with no backward in between raises.
        """
        batch_size = lr_scaling.check_batch_size("batch_size", batch_size)
        loss_scale = check_loss_scale(loss_scale)
        check_grad_scaler(grad_scaler)
        self._check_params()
        buckets = self._buckets_for_accumulation()
        if not buckets and self.statistics.shards is not None:
            warnings.warn("fastscale: accumulate_grad() found no gradient; under FSDP2's set_requires_gradient_sync"
                          "(False) the sharded gradients appear only after the last micro-batch, so nothing is "
                          "measured: synchronise every micro-batch, or use per-example norms", stacklevel=2)
        if self.statistics.estimator is None:
            return  # nothing would use the measurement: no pass, no snapshots
        self.statistics.accumulate(
            buckets, self._accumulate_ops(), batch_size=batch_size, loss_scale=loss_scale,
            grad_scaler=grad_scaler, default_total=self.param_groups[0]["batch_size"],
        )

    @torch.no_grad()
    def observe_per_example_norms(self, sq_norms: Tensor, loss_scale: float = 1.0, grad_scaler=None) -> None:
        """Feed this step's per-example squared gradient norms (B_small = 1, B_big = batch).

        ``sq_norms[i]`` is |∇ℓ_i|², the squared norm of example i's own loss gradient (see
        :class:`fastscale.PerExampleGradNorms`). ``loss_scale``: ``.grad`` equals loss_scale ×
        the mean gradient over the batch (1 for a mean loss, the batch size for a sum).
        ``grad_scaler``: as in :meth:`accumulate_grad`. Call it after the backward and before
        anything edits ``.grad`` (clipping): the big-batch norm is read from ``.grad`` now.
        """
        if not isinstance(sq_norms, Tensor) or sq_norms.dim() != 1 or not sq_norms.is_floating_point():
            raise TypeError("sq_norms must be a 1-D float tensor of per-example squared gradient norms")
        if sq_norms.numel() < 2:
            raise ValueError(f"sq_norms must hold at least 2 examples, got {sq_norms.numel()}")
        sq = sq_norms.detach().to(self.statistics.device).double().mean().reshape(1)
        examples, shards = sq_norms.numel(), self.statistics.shards
        if shards is not None:  # FSDP2/HSDP: this rank's examples, the gradient's are global
            examples = shards.global_examples(examples, self.param_groups[0]["batch_size"])
        self.observe_small_batch_norms(sq, 1, examples, loss_scale, grad_scaler, per_rank=shards is not None)

    @torch.no_grad()
    def observe_small_batch_norms(
        self,
        mean_sq_norm: Tensor,
        small_batch_size: float,
        big_batch_size: float,
        loss_scale: float = 1.0,
        grad_scaler=None,
        per_tensor: Tensor | None = None,
        *,
        big_per_tensor: Tensor | None = None,
        per_rank: bool = False,
    ) -> None:
        """Feed this step's mean squared norm of gradients over ``small_batch_size`` examples.

        The generic source behind the per-example and data-parallel ones: ``mean_sq_norm`` is a
        1-element tensor, the mean of |G_small|² (true mean gradients: loss scale divided out)
        over the small batches that make up this step's ``big_batch_size`` examples.
        ``per_tensor``: optionally the same per parameter tensor, indexed like
        :meth:`gradient_stats`. The big-batch norm is read from ``.grad`` now (call this
        before clipping), where ``.grad`` = loss_scale × the mean gradient; a source that
        measured it earlier passes it per tensor as ``big_per_tensor`` (in ``.grad``'s scale).
        ``per_rank``: with DTensor parameters (FSDP2, HSDP), ``mean_sq_norm``/``per_tensor`` are
        over this rank's examples only and are averaged over the data-parallel ranks at ``step()``
        (the batch sizes are global); without it they are taken as whole-mesh figures.
        """
        loss_scale = check_loss_scale(loss_scale)
        check_grad_scaler(grad_scaler)
        for name, value in (("small_batch_size", small_batch_size), ("big_batch_size", big_batch_size)):
            if not _is_number(value) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not big_batch_size > small_batch_size:
            raise ValueError(f"big_batch_size ({big_batch_size}) must exceed small_batch_size ({small_batch_size})")
        if not isinstance(mean_sq_norm, Tensor) or mean_sq_norm.numel() != 1:
            raise TypeError("mean_sq_norm must be a 1-element tensor")
        n = len(self.statistics.params)
        for name, value in (("per_tensor", per_tensor), ("big_per_tensor", big_per_tensor)):
            if value is not None and (not isinstance(value, Tensor) or value.shape != (n,)):
                raise ValueError(f"{name} must be a tensor of shape ({n},), one entry per parameter tensor, "
                                 f"got {getattr(value, 'shape', type(value).__name__)}")
        if self.statistics.estimator is None:
            raise RuntimeError("this optimizer has no noise-scale estimator: build it with noise_scale=True")
        if self.statistics.pending:
            raise RuntimeError("this step already has small-batch norms from another source; use one per step")
        if not isinstance(per_rank, bool):
            raise TypeError(f"per_rank must be a bool, got {per_rank!r}")
        if per_rank:
            sharded.data_parallel_size(self.statistics.shards, "small-batch norms")
        device = self.statistics.device
        if big_per_tensor is None:
            big_pt, present = self.statistics.grad_sq_norms(self.statistics.params)
        else:
            big_pt, present = big_per_tensor.detach().to(device, torch.float32), None
        big_pt = big_pt.double() / loss_scale**2
        sq = mean_sq_norm.detach().reshape(1).to(device).double()
        small_pt = None if per_tensor is None else per_tensor.detach().to(device).double()
        divisor = _amp_divisor(grad_scaler, device)
        if divisor is not None:
            sq, big_pt = sq * divisor, big_pt * divisor
            small_pt = None if small_pt is None else small_pt * divisor
        self.statistics.observe(Measurement(
            small_sq=sq, big_sq=big_pt.sum().reshape(1), b_small=float(small_batch_size),
            b_big=float(big_batch_size), small_pt=None if small_pt is None else small_pt.float(),
            big_pt=big_pt.float(), present=present, examples=float(big_batch_size),
            local_pt=("big_pt",) if big_per_tensor is None else (), local_examples=per_rank,
        ))

    # ----------------------------------------------------------------- readout
    def noise_scale(self) -> float:
        """The current estimate of B_simple = tr(Σ)/|G|² (synchronises), or NaN with a warning
        while it is not ready (warming up, |G|² not yet positive, or an interval that still
        includes zero): ``gradient_stats()`` has the figure, its interval and the reason."""
        if self.statistics.estimator is None:
            raise RuntimeError("noise_scale() needs the optimizer built with noise_scale=True")
        stats = self.gradient_stats()
        if not stats["ready"]:
            warnings.warn("fastscale: the noise-scale estimate is not ready yet, noise_scale() returns NaN; "
                          "gradient_stats()['not_ready'] says why", stacklevel=2)
            return math.nan
        return stats["b_simple"]

    def gradient_stats(self) -> dict:
        """Host copy of the statistics: the noise-scale estimate (|G|², tr(Σ), B_simple, per
        tensor), the steps/examples trade-off at the current batch size, and the last step's
        squared gradient norms. Reading synchronises with the device; nothing else does."""
        stats = self.statistics
        out = {"steps": int(self._step_count.item())}
        if stats.last_norms is not None:
            out["last_grad_sq_norm"] = float(stats.last_norms.double().sum())
            out["last_grad_sq_norm_per_tensor"] = stats.last_norms.cpu().tolist()
        if stats.estimator is None:
            return out
        out.update(stats.estimator.read())
        b, b_noise = self.param_groups[0]["batch_size"] or stats.last_examples, out["b_simple"]
        if b is not None and b_noise > 0:
            # McCandlish et al. eq. 2.11: S = S_min(1 + B_noise/B), E = E_min(1 + B/B_noise).
            out["batch_size"] = b
            out["steps_over_min"] = 1.0 + b_noise / b
            out["examples_over_min"] = 1.0 + b / b_noise
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.statistics.reset()  # a fresh gradient starts a fresh accumulation

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        sd = super().state_dict()
        # measure_steps: the step() calls counted for measure_every (a CPU tensor, as torch keeps "step")
        ours = {"step": self._step_count.clone(), "measure_steps": torch.tensor(self.statistics.steps_taken)}
        if self.statistics.estimator is not None:
            ours["noise_scale"] = self.statistics.estimator.state_dict()
        sd["state"][_STATE_KEY] = ours
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this optimizer or of ``torch.optim.SGD``. Everything is checked
        before anything is loaded."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (from state_dict())")
        state_dict = dict(state_dict)
        state_dict["state"] = dict(state_dict["state"])
        ours = state_dict["state"].pop(_STATE_KEY, None)
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        # Our options survive loading a plain torch.optim.SGD state dict: the merged groups are
        # what will be installed, so they are what is checked.
        for saved, mine in zip(saved_groups, self.param_groups):
            merged = {**{k: v for k, v in mine.items() if k not in ("params", "param_names")}, **saved}
            self._check_options(merged)
        step, estimator, measure_steps = self._check_fastscale_state(ours)
        id_map = {}
        for saved, mine in zip(saved_groups, self.param_groups):
            if len(saved.get("params", ())) != len(mine["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                                 "optimizer's group")
            id_map.update(zip(saved["params"], mine["params"]))
        for index, saved in state_dict["state"].items():
            buf = saved.get("momentum_buffer") if isinstance(saved, dict) else None
            p = id_map.get(index)
            if isinstance(buf, Tensor) and p is not None and buf.shape != p.shape:
                raise ValueError(f"momentum_buffer of parameter {index} has shape {tuple(buf.shape)}, "
                                 f"the parameter {tuple(p.shape)}")
        extras = [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in self.param_groups]
        super().load_state_dict(state_dict)
        # --- committed: torch installed state and groups; install ours
        for group, mine in zip(self.param_groups, extras):
            for key, value in mine.items():
                group.setdefault(key, value)
        self.statistics.reset()
        if step is not None:
            self._step_count.copy_(step)
        if estimator is not None:
            self.statistics.estimator = estimator
        if measure_steps is not None:
            self.statistics.set_steps_taken(measure_steps)
        self._caches()

    def _check_fastscale_state(self, ours):
        """The step counter, estimator and measure_every phase a saved ``"fastscale"`` entry
        would install, built aside (None where absent): a corrupt entry raises before anything
        is loaded."""
        if ours is None:
            return None, None, None
        if not isinstance(ours, dict):
            raise TypeError(f"state['{_STATE_KEY}'] must be a dict, got {type(ours).__name__}")
        step = ours.get("step")
        if not isinstance(step, Tensor) or step.numel() != 1 or not bool(torch.isfinite(step).all()) or step.item() < 0:
            raise ValueError(f"state['{_STATE_KEY}']['step'] must be a 1-element tensor >= 0, got {step!r}")
        estimator = None
        if self.statistics.estimator is not None and "noise_scale" in ours:
            estimator = NoiseScaleEstimator(self._noise_config, len(self.statistics.params), self.statistics.device)
            estimator.load_state_dict(ours["noise_scale"])
        measure_steps = ours.get("measure_steps")
        if measure_steps is not None:
            if not (isinstance(measure_steps, Tensor) and measure_steps.numel() == 1
                    and not measure_steps.is_floating_point() and not measure_steps.is_complex()
                    and measure_steps.dtype != torch.bool and int(measure_steps) >= 0):
                raise ValueError(f"state['{_STATE_KEY}']['measure_steps'] must be a 1-element integer tensor >= 0, "
                                 f"got {measure_steps!r}")
            measure_steps = int(measure_steps)
        return step.detach().reshape(1), estimator, measure_steps
