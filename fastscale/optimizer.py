"""FusedScaledSGD: torch.optim.SGD with batch-size lr scaling, warmup and noise-scale statistics."""

from __future__ import annotations

import math
import numbers
from collections import defaultdict

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import ops
from . import scaling as lr_scaling
from .noise_scale import NoiseScaleConfig, NoiseScaleEstimator

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_STATE_KEY = "fastscale"  # non-parameter key of the state dict: never cast to a param's dtype


def _check_scalar(name: str, value, allow_tensor: bool = False) -> None:
    if isinstance(value, Tensor) and allow_tensor:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")


def _divide_amp_scale(t: Tensor, grad_scaler) -> Tensor:
    """t / s² for the scale s of an enabled GradScaler, read as a device tensor (get_scale() syncs)."""
    if grad_scaler is None or not grad_scaler.is_enabled():
        return t
    return t / grad_scaler._get_scale_async().to(device=t.device, dtype=t.dtype).square()


def _skipped_on_host(found_inf: Tensor | None) -> bool:
    """Whether an AMP step is skipped. Reads a CUDA flag, so only called when it must be known."""
    return found_inf is not None and bool(found_inf.item())


class FusedScaledSGD(Optimizer):
    r"""Drop-in :class:`torch.optim.SGD` whose step is one fused pass that also gathers gradient
    statistics, with the learning rate scaled for the batch size and warmed up.

    With ``batch_size=None`` (or ``scaling="none"``) and ``warmup_steps=0`` it computes what
    ``torch.optim.SGD`` computes, step for step. Otherwise each group's rate is
    ``group["lr"] · scale(batch_size / base_batch_size) · warmup(step)``
    (see :mod:`fastscale.scaling`), so lr schedulers that edit ``group["lr"]`` keep working.

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, maximize: as torch.optim.SGD.
        foreach, fused: accepted for compatibility; the step is always fused.
        differentiable: must be False (the fused step is not differentiable).
        batch_size: current batch size (None: no scaling). Change it with :meth:`set_batch_size`.
        base_batch_size: the batch size ``lr`` was tuned for (default: the first ``batch_size``).
        scaling: ``"linear"`` (default), ``"sqrt"``, ``"noise"`` or ``"none"``.
        warmup_steps: steps of linear warmup (0: none).
        warmup_start_factor: multiplier of the scaled lr at step 0 (default ``1/scale``: start
            from the unscaled lr, Goyal et al. 2017).
        noise_fallback: for ``scaling="noise"``, the B_noise used until the live estimate has
            warmed up (default: ``base_batch_size``, a cautious scale between 1 and 2).
        noise_scale: ``True`` or a :class:`NoiseScaleConfig` to estimate the gradient noise scale.
        impl: ``"auto"`` (compiled kernels where built, else pure torch), ``"native"`` (compiled
            or error), ``"torch"`` (pure torch).

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
        impl: str = "auto",
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        _check_scalar("lr", lr, allow_tensor=True)
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        _check_scalar("momentum", momentum)
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        _check_scalar("weight_decay", weight_decay)
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        _check_scalar("dampening", dampening)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if differentiable:
            raise ValueError("differentiable=True is not supported: the fused step is not differentiable")
        self._impl = ops.check_impl(impl)
        self._noise_config = NoiseScaleConfig.from_arg(noise_scale)
        if base_batch_size is None:
            base_batch_size = lr_scaling.check_batch_size("batch_size", batch_size)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=False,
            fused=fused,
            batch_size=batch_size,
            base_batch_size=base_batch_size,
            scaling=scaling,
            warmup_steps=warmup_steps,
            warmup_start_factor=warmup_start_factor,
            noise_fallback=noise_fallback,
        )
        self._ops_by_device: dict[str, object] = {}
        self._step_count: Tensor  # 0-dim device tensor: steps taken (skipped AMP steps excluded)
        self._estimator: NoiseScaleEstimator | None = None
        self._last_norms: Tensor | None = None  # per-tensor |g|² of the last step
        self._snapshots: dict[Tensor, Tensor] = {}
        self._last_big_batch = None  # examples behind the last estimate, when no batch_size is set
        self._reset_pending()
        super().__init__(params, defaults)
        # GradScaler passes grad_scale/found_inf to step() instead of unscaling and syncing.
        self._step_supports_amp_scaling = True
        self._init_device_state()  # before any step, compiled or not

    # ----------------------------------------------------------------- param groups
    def add_param_group(self, param_group: dict) -> None:
        # Validate a copy first so a bad group changes nothing.
        probe = dict(self.defaults)
        probe.update({k: v for k, v in param_group.items() if k != "params"})
        if "batch_size" in param_group and "base_batch_size" not in param_group:
            probe["base_batch_size"] = probe["base_batch_size"] or param_group["batch_size"]
        lr_scaling.check_group_options(probe)
        for key in ("lr", "momentum", "dampening", "weight_decay"):
            _check_scalar(key, probe[key], allow_tensor=key == "lr")
        if probe["nesterov"] and (probe["momentum"] <= 0 or probe["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if "batch_size" in param_group and "base_batch_size" not in param_group:
            param_group["base_batch_size"] = probe["base_batch_size"]
        super().add_param_group(param_group)
        self._reindex()

    def _reindex(self) -> None:
        """Position of every parameter across all groups: the index of per-tensor statistics."""
        self._param_index = {}
        for group in self.param_groups:
            for p in group["params"]:
                self._param_index[p] = len(self._param_index)
        self._index_cache: dict[tuple, Tensor] = {}
        self._all_present = None
        self._plans: dict[tuple, list] = {}  # bucketing of a set of parameters, see _buckets
        self._lr_cache: dict[int, tuple] = {}
        if self._estimator is not None:
            self._estimator.resize(len(self._param_index))

    @property
    def noise_scale_config(self) -> NoiseScaleConfig | None:
        """How the noise scale is estimated, or None when it is not."""
        return self._noise_config

    def set_batch_size(self, batch_size: int, group: int | None = None) -> None:
        """Change the batch size of every group (or of group index ``group``); the scale follows."""
        batch_size = lr_scaling.check_batch_size("batch_size", batch_size, allow_none=False)
        groups = self.param_groups if group is None else [self.param_groups[group]]
        for g in groups:
            g["batch_size"] = batch_size
            if g["base_batch_size"] is None:
                g["base_batch_size"] = batch_size

    # ----------------------------------------------------------------- device-side state
    def _stats_device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    def _init_device_state(self) -> None:
        """The step counter and estimator, fresh, on the device of the first parameter."""
        device = self._stats_device()
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self._step_count = torch.zeros((), dtype=dtype, device=device)
        if self._noise_config is not None:
            self._estimator = NoiseScaleEstimator(self._noise_config, len(self._param_index), device)

    def _ops_for(self, device: torch.device):
        found = self._ops_by_device.get(device.type)
        if found is None:
            found = self._ops_by_device[device.type] = ops.resolve(self._impl, device.type)
        return found

    def _index_tensor(self, positions: list[int], device: torch.device) -> Tensor:
        key = (device, tuple(positions))
        found = self._index_cache.get(key)
        if found is None:
            found = self._index_cache[key] = torch.tensor(positions, dtype=torch.long, device=device)
        return found

    def _group_scale(self, group: dict):
        scale = lr_scaling.host_scale(group)
        if scale is not None:
            return scale
        # Until the estimate warms up: B_noise = base batch size, a cautious scale in [1, 2).
        fallback = group["noise_fallback"] or group["base_batch_size"] or math.inf
        if self._estimator is None:
            raise RuntimeError('scaling="noise" needs noise_scale=True (the live B_noise estimate)')
        return lr_scaling.noise_scale_factor(group, self._estimator.b_noise(fallback))

    def _effective_lr(self, index: int, group: dict) -> Tensor:
        scale = self._group_scale(group)
        if group["warmup_steps"] or isinstance(scale, Tensor) or isinstance(group["lr"], Tensor):
            return lr_scaling.effective_lr(group, self._step_count, scale)
        # Constant while lr and batch size are: reuse the tensor instead of launching a fill.
        key = (group["lr"], scale)
        cached = self._lr_cache.get(index)
        if cached is None or cached[0] != key:
            cached = self._lr_cache[index] = (key, lr_scaling.effective_lr(group, self._step_count, scale))
        return cached[1]

    def current_lr(self) -> list[float]:
        """The effective learning rate of each group for the next step (synchronises)."""
        return [
            lr_scaling.effective_lr(g, self._step_count, self._group_scale(g)).item()
            for g in self.param_groups
        ]

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step (closure: as torch.optim.SGD)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        step_count = self._step_count
        norms, positions = [], []
        for index, group in enumerate(self.param_groups):
            lr = self._effective_lr(index, group)
            for device, params, grads, positions_ in self._buckets(group):
                on_device = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
                kwargs = dict(
                    lr=on_device(lr),
                    weight_decay=group["weight_decay"],
                    momentum=group["momentum"],
                    dampening=group["dampening"],
                    nesterov=group["nesterov"],
                    maximize=group["maximize"],
                    grad_scale=on_device(grad_scale),
                    found_inf=on_device(found_inf),
                )
                fused_sgd_ = self._ops_for(device).fused_sgd_
                if group["momentum"] == 0:
                    norms.append(fused_sgd_(params, grads, [], is_first_step=False, **kwargs))
                    positions += positions_
                    continue
                states = [self.state[p] for p in params]
                bufs = [state.get("momentum_buffer") for state in states]
                new = [i for i, b in enumerate(bufs) if b is None]
                if not new:
                    norms.append(fused_sgd_(params, grads, bufs, is_first_step=False, **kwargs))
                    positions += positions_
                    continue
                # torch's fused SGD treats a group as "first step" only when no buffer exists and
                # raises when some do; here parameters without a buffer get theirs this step.
                old = [i for i, b in enumerate(bufs) if b is not None]
                for first, part in ((False, old), (True, new)):
                    if not part:
                        continue
                    ps = [params[i] for i in part]
                    if first:
                        part_bufs = [torch.empty_like(p, memory_format=torch.preserve_format) for p in ps]
                    else:
                        part_bufs = [bufs[i] for i in part]
                    norms.append(fused_sgd_(ps, [grads[i] for i in part], part_bufs, is_first_step=first, **kwargs))
                    positions += [positions_[i] for i in part]
                    # A step skipped for an AMP overflow leaves no buffer behind (torch's fused
                    # SGD keeps uninitialised ones). Only buffer-creating steps read the flag.
                    if first and not _skipped_on_host(kwargs["found_inf"]):
                        for i, b in zip(part, part_bufs):
                            states[i]["momentum_buffer"] = b
        self._record_statistics(norms, positions, found_inf)
        if found_inf is None:
            step_count.add_(1)
        else:
            step_count.add_(1 - found_inf.to(device=step_count.device, dtype=step_count.dtype))
        return loss

    def _buckets(self, group: dict) -> list:
        """(device, params, grads, positions) for each (device, dtype) among the parameters
        with gradients: one op call each. The split is cached per set of parameters."""
        params = [p for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        dtypes = tuple(p.dtype for p in params)
        for p, g, dtype in zip(params, grads, dtypes):
            if g.is_sparse:
                raise RuntimeError("FusedScaledSGD does not support sparse gradients")
            if dtype not in _DTYPES or g.dtype != dtype:
                raise TypeError(
                    f"FusedScaledSGD supports parameters and gradients of one dtype among "
                    f"{[str(d) for d in _DTYPES]}; got parameter {dtype}, gradient {g.dtype}"
                )
        key = (tuple(map(id, params)), dtypes)
        plan = self._plans.get(key)
        if plan is None:
            split = defaultdict(list)
            for i, p in enumerate(params):
                split[(p.device, p.dtype)].append(i)
            plan = self._plans[key] = [
                (device, idx, [self._param_index[params[i]] for i in idx]) for (device, _), idx in split.items()
            ]
        if len(plan) == 1:
            return [(plan[0][0], params, grads, plan[0][2])]
        return [(device, [params[i] for i in idx], [grads[i] for i in idx], pos) for device, idx, pos in plan]

    # ----------------------------------------------------------------- statistics
    def _reset_pending(self) -> None:
        self._micro = None  # dict while micro-batch gradients are being accumulated
        self._small = None  # (mean |G_small|², B_small, B_big, loss_scale, per-tensor or None)

    def _gather(self, norms: list[Tensor], positions: list[int]):
        """Per-tensor vector (all parameters, 0 where absent) and a mask of those present."""
        device = self._step_count.device
        n = len(self._param_index)
        if len(norms) == 1 and len(positions) == n and positions == list(range(n)):
            # Common case, one op call covering every parameter in order: no scatter needed.
            if self._all_present is None or self._all_present.numel() != n:
                self._all_present = torch.ones(n, dtype=torch.bool, device=device)
            return norms[0].to(device, non_blocking=True), self._all_present
        vec = torch.zeros(n, dtype=torch.float32, device=device)
        present = torch.zeros(n, dtype=torch.bool, device=device)
        if positions:
            idx = self._index_tensor(positions, device)
            vec.index_copy_(0, idx, torch.cat([t.to(device, non_blocking=True) for t in norms]))
            present.index_fill_(0, idx, True)
        return vec, present

    def _record_statistics(self, norms: list[Tensor], positions: list[int], found_inf) -> None:
        big_pt, present = self._gather(norms, positions)
        self._last_norms = big_pt
        micro, small = self._micro, self._small
        self._reset_pending()
        est = self._estimator
        if est is None or not positions:
            return
        big = big_pt.double().sum()
        if micro is not None:
            k = micro["count"]
            if k < 2:
                return  # one micro-batch: both norms are of the same gradient
            c, b = micro["loss_scale"], micro["batch_size"]
            total_c = sum(c)
            # p.grad = Σ c_i·G_i, an unbiased gradient of variance tr(Σ)·Σc_i²/b_i / (Σc_i)².
            b_big = total_c**2 / sum(ci * ci / bi for ci, bi in zip(c, b))
            b_small = k / sum(1.0 / bi for bi in b)  # mean of |G_i|² has variance term tr(Σ)·mean(1/b_i)
            self._last_big_batch = sum(b)
            small_pt = micro["sq_pt"] / k
            est.update(
                small_pt.double().sum(), big / total_c**2, b_small, b_big, found_inf,
                small_pt, big_pt / total_c**2, present,
            )
        elif small is not None:
            sq, b_small, b_big, loss_scale, sq_pt = small
            if not b_big > b_small:
                return
            big_scaled = big_pt / loss_scale**2
            est.update(sq, big / loss_scale**2, b_small, b_big, found_inf, sq_pt, big_scaled, present)
            self._last_big_batch = b_big

    @torch.no_grad()
    def accumulate_grad(self, batch_size: int | None = None, loss_scale: float = 1.0, grad_scaler=None) -> None:
        """Record the micro-batch gradient that the last ``backward()`` added to ``.grad``.

        Call it after each micro-batch's backward. ``.grad`` keeps accumulating as usual (so
        gradient clipping and GradScaler's inf check see the whole gradient, and ``step()``
        matches plain accumulation); this takes each micro-batch's squared gradient norm in one
        fused pass, for the noise-scale estimate (B_small = micro-batch, B_big = all of them).

        Args:
            batch_size: examples in this micro-batch (default: the group ``batch_size`` divided
                by the number of micro-batches, so equal micro-batches).
            loss_scale: how this micro-batch's loss was scaled relative to the mean loss over
                its examples: 1 for a mean loss, ``1/k`` if you divided it by the number of
                micro-batches k, the micro-batch size for a sum-reduced loss.
            grad_scaler: the ``torch.amp.GradScaler`` whose ``scale(loss)`` you backpropagated,
                so its scale is divided out of the statistics (no sync).
        """
        batch_size = lr_scaling.check_batch_size("batch_size", batch_size)
        _check_scalar("loss_scale", loss_scale)
        if not loss_scale > 0:
            raise ValueError(f"loss_scale must be > 0, got {loss_scale!r}")
        if self._small is not None:
            raise RuntimeError("this step already has small-batch norms from another source; use one per step")
        first = self._micro is None
        positions, norms = [], []
        for group in self.param_groups:
            for device, params, grads, positions_ in self._buckets(group):
                if first:
                    snaps = []
                    for p in params:
                        snap = self._snapshots.get(p)
                        if snap is None or snap.shape != p.shape or snap.dtype != p.dtype:
                            snap = self._snapshots[p] = torch.empty_like(p)
                        snaps.append(snap)
                else:
                    snaps = [self._snapshots[p] for p in params]
                norms.append(self._ops_for(device).accumulate_grad_(snaps, grads, first=first))
                positions += positions_
        sq_pt, _ = self._gather(norms, positions)
        sq_pt = _divide_amp_scale(sq_pt, grad_scaler) / loss_scale**2
        if first:
            self._micro = dict(count=0, loss_scale=[], batch_size=[], sq_pt=sq_pt)
        else:
            self._micro["sq_pt"] = self._micro["sq_pt"] + sq_pt
        micro = self._micro
        micro["count"] += 1
        micro["loss_scale"].append(float(loss_scale))
        micro["batch_size"].append(batch_size)
        self._fill_micro_batch_sizes()

    def _fill_micro_batch_sizes(self) -> None:
        """Equal micro-batches of the group batch size when their sizes were not given."""
        micro = self._micro
        if all(b is not None for b in micro["batch_size"]):
            return
        total = self.param_groups[0]["batch_size"]
        if total is None:
            if self._estimator is not None:
                raise ValueError(
                    "accumulate_grad needs batch_size= (the micro-batch size) when the optimizer "
                    "has no batch_size"
                )
            total = micro["count"]
        micro["batch_size"] = [total / micro["count"]] * micro["count"]

    def observe_per_example_norms(self, sq_norms: Tensor, loss_scale: float = 1.0, grad_scaler=None) -> None:
        """Feed this step's per-example squared gradient norms (B_small = 1, B_big = batch).

        ``sq_norms[i]`` is |∇ℓ_i|², the squared norm of example i's own loss gradient (see
        :class:`fastscale.PerExampleGradNorms`). ``loss_scale``: ``.grad`` equals loss_scale ×
        the mean gradient over the batch (1 for a mean loss, the batch size for a sum).
        ``grad_scaler``: as in :meth:`accumulate_grad`. Takes effect at the next ``step()``.
        """
        if not isinstance(sq_norms, Tensor) or sq_norms.dim() != 1:
            raise TypeError("sq_norms must be a 1-D tensor of per-example squared gradient norms")
        sq = sq_norms.detach().to(self._step_count.device).double().mean()
        self.observe_small_batch_norms(sq, 1, sq_norms.numel(), loss_scale, grad_scaler)

    def observe_small_batch_norms(
        self,
        mean_sq_norm: Tensor,
        small_batch_size: float,
        big_batch_size: float,
        loss_scale: float = 1.0,
        grad_scaler=None,
        per_tensor: Tensor | None = None,
    ) -> None:
        """Feed this step's mean squared norm of gradients over ``small_batch_size`` examples.

        The generic source behind the per-example and data-parallel ones: ``mean_sq_norm`` is a
        0-dim tensor, the mean of |G_small|² over the small batches that make up this step's
        ``big_batch_size`` examples; the big-batch norm comes from the step itself, where
        ``.grad`` = loss_scale × the mean gradient. ``per_tensor``: optionally the same per
        parameter tensor, indexed like :meth:`gradient_stats`. Takes effect at the next step().
        """
        _check_scalar("loss_scale", loss_scale)
        if not loss_scale > 0:
            raise ValueError(f"loss_scale must be > 0, got {loss_scale!r}")
        _check_scalar("small_batch_size", small_batch_size)
        _check_scalar("big_batch_size", big_batch_size)
        if not 0 < small_batch_size:
            raise ValueError(f"small_batch_size must be > 0, got {small_batch_size!r}")
        if not isinstance(mean_sq_norm, Tensor) or mean_sq_norm.numel() != 1:
            raise TypeError("mean_sq_norm must be a 1-element tensor")
        if self._micro is not None or self._small is not None:
            raise RuntimeError("this step already has small-batch norms from another source; use one per step")
        device = self._step_count.device
        sq = mean_sq_norm.detach().reshape(()).to(device).double()
        if per_tensor is not None:
            per_tensor = per_tensor.detach().to(device=device, dtype=torch.float32)
        sq = _divide_amp_scale(sq, grad_scaler)
        if per_tensor is not None:
            per_tensor = _divide_amp_scale(per_tensor, grad_scaler)
        self._small = (sq, float(small_batch_size), float(big_batch_size), float(loss_scale), per_tensor)

    def noise_scale(self) -> float:
        """The current estimate of B_simple = tr(Σ)/|G|² (synchronises)."""
        return self.gradient_stats()["b_simple"]

    def gradient_stats(self) -> dict:
        """Host copy of the statistics: the noise-scale estimate (|G|², tr(Σ), B_simple, per
        tensor), the steps/examples trade-off at the current batch size, and the last step's
        squared gradient norms. Reading synchronises with the device; nothing else does."""
        out = {"steps": int(self._step_count.item())}
        if self._last_norms is not None:
            out["last_grad_sq_norm"] = float(self._last_norms.double().sum())
            out["last_grad_sq_norm_per_tensor"] = self._last_norms.cpu().tolist()
        if self._estimator is None:
            return out
        out.update(self._estimator.read())
        b, b_noise = self.param_groups[0]["batch_size"] or self._last_big_batch, out["b_simple"]
        if b is not None and b_noise > 0:
            # McCandlish et al. eq. 2.11: S = S_min(1 + B_noise/B), E = E_min(1 + B/B_noise).
            out["batch_size"] = b
            out["steps_over_min"] = 1.0 + b_noise / b
            out["examples_over_min"] = 1.0 + b / b_noise
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self._reset_pending()  # a fresh gradient starts a fresh accumulation

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        sd = super().state_dict()
        ours = {"step": self._step_count.clone()}
        if self._estimator is not None:
            ours["noise_scale"] = self._estimator.state_dict()
        sd["state"][_STATE_KEY] = ours
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        state_dict["state"] = dict(state_dict["state"])
        ours = state_dict["state"].pop(_STATE_KEY, None)
        # Our group options survive loading a plain torch.optim.SGD state dict.
        extras = [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, mine in zip(self.param_groups, extras):
            for key, value in mine.items():
                group.setdefault(key, value)
            lr_scaling.check_group_options(group)
        self._reindex()
        self._reset_pending()
        self._init_device_state()
        if ours is None:
            return
        self._step_count.copy_(ours["step"])
        if self._estimator is not None and "noise_scale" in ours:
            self._estimator.load_state_dict(ours["noise_scale"])
