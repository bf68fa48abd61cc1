"""The hooks: :class:`PerExampleGradNorms` records each supported layer's calls and hands
them to the layer's registered rule (:mod:`.registry`) during the backward."""

from __future__ import annotations

import math
import types

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .common import _cpu_kernel, _direct_trainable
from .conv import _ConvWithExampleGrads, _apply_under_autocast, _conv_call, _conv_prefers_gram
from .functorch import _functorch_sq
from .norm import _fuses as _norm_fuses, _GroupNormWithExampleGrads, _LayerNormWithExampleGrads
from .linear import _fuses as _linear_fuses, _holds as _linear_holds, _LinearWithExampleGrads
from .registry import KEEPS, RULES, kind as _kind

__all__ = ["PerExampleGradNorms"]

_METHODS = ("auto", "gram", "materialize", "materialise")
_FALLBACKS = (None, "error", "functorch")
# Layers that couple the examples of a batch: no per-example gradient exists, so no fallback.
_BATCH_COUPLED = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)
_FUSED_CONV = (nn.Conv1d, nn.Conv2d)  # their forward can run through _ConvWithExampleGrads


# ---------------------------------------------------------------------------- the hooks


class _Use:
    """One call of a module: its inputs (detached, the tensors autograd keeps anyway), what
    the rule's ``keep`` took from its forward, and, once backward reaches it, the gradient of
    its output (and, for a fused call, every example's weight gradient or its squared norm)."""

    __slots__ = ("args", "kwargs", "kept", "grad", "example_grads", "example_sq")

    def __init__(self, args, kwargs, kept=None):
        detach = lambda t: t.detach() if isinstance(t, Tensor) else t  # noqa: E731
        self.args, self.kwargs = pytree.tree_map(detach, args), pytree.tree_map(detach, kwargs)
        self.kept = kept
        self.grad = self.example_grads = self.example_sq = None


class _FusedCall:
    """What a fused layer's autograd function (``_LinearWithExampleGrads``,
    ``_ConvWithExampleGrads``, the norms' ``_NormWithExampleGrads``) knows of the hooks: whether its call is the layer's only one
    this step (then each example's squared norm can be taken per call), whether it may hold
    every example's weight gradient at once (``holds``), and where its backward's results go."""

    __slots__ = ("hooks", "layer", "use", "holds")

    def __init__(self, hooks: "PerExampleGradNorms", layer: "_Layer", use: _Use, holds: bool):
        self.hooks, self.layer, self.use, self.holds = hooks, layer, use, holds

    def alone(self) -> bool:
        return len(self.layer.uses) == 1

    def arrive(self, grad_out: Tensor, example_grads: Tensor | None = None, example_sq: Tensor | None = None) -> None:
        self.use.grad, self.use.example_grads, self.use.example_sq = grad_out, example_grads, example_sq
        self.hooks._arrived(self.layer)


class _RestoreForward:
    """Handle that removes an instance-level ``forward`` again (if it is still ours)."""

    def __init__(self, module: nn.Module, forward):
        self.module, self.forward = module, forward

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is self.forward:
            del self.module.forward


class _Layer:
    __slots__ = ("name", "module", "kind", "uses", "pending", "result", "params")

    def __init__(self, name, module, kind):
        self.name, self.module, self.kind = name, module, kind
        self.params = _direct_trainable(module)
        self.uses: list[_Use] = []
        self.pending = 0  # uses whose output gradient has not arrived yet
        self.result: Tensor | None = None


class PerExampleGradNorms:
    """Per-example squared gradient norms |grad_theta l_i|^2 of a model's trainable parameters.

    ::

        norms = PerExampleGradNorms(model, loss_reduction="mean")
        with norms:                      # or norms.attach() ... norms.detach()
            loss = F.cross_entropy(model(x), y)   # mean over the batch
            loss.backward()
            sq = norms.squared_norms()   # [B] fp32 on the model's device
            opt.observe_per_example_norms(sq)

    Args:
        model: the module whose trainable parameters count. Parameters with
            ``requires_grad=False`` are ignored; fully frozen modules get no hooks.
        loss_reduction: ``"mean"`` if the loss is the mean of the examples' losses (norms are
            multiplied by B^2), ``"sum"`` if it is their sum. See the module docstring.
        fallback: ``"error"`` (default): a module of an unsupported type that owns trainable
            parameters raises ``ValueError`` at construction, naming it. ``"functorch"``:
            those modules' per-example gradients are materialised with
            ``torch.func.vmap(grad(...))`` over the module alone (memory B x its parameters).
        method: ``"auto"`` picks, per layer and call, the cheaper of the Gram identity and the
            materialised per-example gradient for sequence Linear and Conv layers; ``"gram"``
            or ``"materialize"`` force one (for testing and benchmarking).
        fused_conv: while attached, a Conv1d/Conv2d call whose per-example weight gradients
            are materialised runs through one autograd function that computes them once and
            returns their sum as the layer's weight gradient, so the weight gradient is not
            computed twice (default ``True``; the layer's ``forward`` is replaced on the
            instance until :meth:`detach`). On the CPU (fp32/fp64, compiled extension) a layer
            called once per forward takes them from a kernel that forms one example's gradient
            at a time (memory: one example's, not B); elsewhere all B are formed at once.
            ``False``: every layer keeps its own forward and is only hooked; the per-example
            weight gradients are then an extra computation.
        fused_linear: the same for ``nn.Linear`` calls on sequences ([B, T, d_in]) (default
            ``True``). On the CPU (fp32/fp64, compiled extension), a layer called once per
            forward gets its weight gradient and its examples' squared norms from one kernel
            that forms one example's gradient at a time (d_in·d_out memory per thread
            block, as many blocks as the call's own input and output pay for), where that pass
            costs less than the Gram form (d_in·d_out ≤ T²(d_in + d_out)). Elsewhere a call is
            fused where its B per-example weight gradients are affordable to hold
            (B·d_in·d_out at most ``per_example.linear.FUSE_MEMORY_FACTOR`` = 1 times the
            call's input and output gradient with ``method="auto"``: where the unfused rule
            materialises them anyway). Calls on [B, d] keep the outer-product rule, which
            costs nothing.
        fused_norm: on the CPU (fp32/fp64 contiguous input, compiled extension, no
            autocast), a ``nn.GroupNorm`` or ``nn.LayerNorm`` whose weight trains runs a
            backward of its own that forms its per-example weight and bias gradients in the
            passes its input gradient needs anyway (default ``True``); otherwise it is hooked
            and its rule reads the input and output gradient once more.
        attach: register the hooks now (default); otherwise call :meth:`attach` or use ``with``.

    After ``backward``, :meth:`squared_norms` returns the [B] total and :meth:`per_layer` the
    per-module [B] contributions. The next grad-enabled forward of ``model`` clears them.
    """

    def __init__(self, model: nn.Module, loss_reduction: str = "mean", *, fallback: str | None = "error",
                 method: str = "auto", fused_conv: bool = True, fused_linear: bool = True,
                 fused_norm: bool = True, attach: bool = True):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if fallback not in _FALLBACKS:
            raise ValueError(f"fallback must be 'error' or 'functorch', got {fallback!r}")
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        self.model = model
        self.loss_reduction = loss_reduction
        self.fallback = fallback or "error"
        self.method = "materialize" if method == "materialise" else method
        for name, value in (("fused_conv", fused_conv), ("fused_linear", fused_linear),
                            ("fused_norm", fused_norm)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        self.fused_conv, self.fused_linear, self.fused_norm = fused_conv, fused_linear, fused_norm
        self._layers = self._plan(model)
        self._handles: list = []
        self._suspended = False  # True while the functorch fallback re-runs a module
        self._batch: int | None = None
        self._grads_seen: set[str] = set()
        self._cache: dict[str, Tensor] | None = None
        if attach:
            self.attach()

    # -- planning
    def _plan(self, model: nn.Module) -> list[_Layer]:
        layers, unsupported, owner = [], [], {}
        for name, mod in model.named_modules():
            params = _direct_trainable(mod)
            if not params:
                continue
            label = name or "<root>"
            for pname, p in params.items():
                if id(p) in owner:
                    raise ValueError(
                        f"PerExampleGradNorms: parameter {label}.{pname} is shared with {owner[id(p)]} "
                        "(weight tying); the cross terms between the two uses are not computed")
                owner[id(p)] = f"{label}.{pname}"
            kind = _kind(mod)
            if kind is None:
                if isinstance(mod, _BATCH_COUPLED):
                    raise ValueError(
                        f"PerExampleGradNorms: layer {label!r} ({type(mod).__name__}) mixes the examples of a "
                        "batch, so per-example gradients do not exist; replace it (e.g. GroupNorm) or freeze it")
                unsupported.append(f"{label!r} ({type(mod).__module__}.{type(mod).__qualname__})")
                kind = "functorch"
            layers.append(_Layer(label, mod, kind))
        if unsupported and self.fallback == "error":
            raise ValueError(
                "PerExampleGradNorms: no per-example norm rule for layer(s) with trainable parameters: "
                + ", ".join(unsupported)
                + ". Supported: Linear, Conv1d, Conv2d, Embedding, LayerNorm, RMSNorm, GroupNorm. Freeze them, "
                "or pass fallback='functorch' to compute them with torch.func per-sample gradients.")
        return layers

    # -- attach / detach
    def attach(self) -> "PerExampleGradNorms":
        if self._handles:
            return self
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_forward))
        for layer in self._layers:
            fused = self._fused_call(layer)
            if fused is not None:
                # Bound, so that a deep copy of the model (an EMA copy) binds to the copy.
                forward = types.MethodType(self._fused_forward(layer, fused), layer.module)
                layer.module.forward = forward
                self._handles.append(_RestoreForward(layer.module, forward))
            else:
                self._handles.append(layer.module.register_forward_hook(
                    self._forward_hook(layer), with_kwargs=True))
            for pname, p in layer.params.items():
                # After accumulation, not a tensor hook: a tensor hook on a leaf keeps
                # AccumulateGrad from stealing the incoming gradient (measured: a copy of it).
                self._handles.append(p.register_post_accumulate_grad_hook(
                    self._param_hook(f"{layer.name}.{pname}")))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "PerExampleGradNorms":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def reset(self) -> None:
        """Forget the current step (done automatically by every grad-enabled model forward)."""
        for layer in self._layers:
            layer.uses, layer.pending, layer.result = [], 0, None
        self._batch, self._cache = None, None
        self._grads_seen.clear()

    # -- hooks
    def _on_model_forward(self, module, args) -> None:
        if torch.is_grad_enabled() and not self._suspended:
            self.reset()

    def _param_hook(self, name: str):
        def hook(param):
            self._grads_seen.add(name)

        return hook

    def _admit(self, layer: _Layer, module, args, output) -> bool:
        """Check one call and count it as pending; False for a call that needs no norms."""
        if self._suspended or not torch.is_grad_enabled():
            return False
        if not isinstance(output, Tensor):
            if any(isinstance(t, Tensor) and t.requires_grad for t in pytree.tree_leaves(output)):
                raise ValueError(f"PerExampleGradNorms: layer {layer.name!r} ({type(module).__name__}) returns "
                                 f"{type(output).__name__}; the hooks support modules returning one tensor")
            return False
        if not output.requires_grad:
            return False
        if not args or not isinstance(args[0], Tensor) or args[0].dim() == 0:
            raise ValueError(f"PerExampleGradNorms: layer {layer.name!r} ({type(module).__name__}) "
                             "was called without a batched tensor as its first argument")
        batch = args[0].shape[0]
        if self._batch is None:
            self._batch = batch
        elif batch != self._batch:
            raise ValueError(
                f"PerExampleGradNorms: layer {layer.name!r} sees batch size {batch} on dim 0, earlier layers "
                f"saw {self._batch}; the batch must be dim 0 of every layer's input (batch_first)")
        layer.pending += 1
        self._cache = None
        return True

    def _arrived(self, layer: _Layer) -> None:
        layer.pending -= 1
        if layer.pending == 0:  # every call of this module has its output gradient
            self._reduce(layer)

    def _watch_output(self, layer: _Layer, use: _Use, output: Tensor) -> None:
        layer.uses.append(use)

        def on_grad(grad):
            use.grad = grad.detach()
            self._arrived(layer)

        output.register_hook(on_grad)

    @staticmethod
    def _use(layer: _Layer, module, args, kwargs, output) -> _Use:
        """The record of an admitted call, with what the rule's ``keep`` takes from its forward."""
        keep = KEEPS.get(layer.kind)
        return _Use(args, kwargs, None if keep is None else keep(module, output))

    def _forward_hook(self, layer: _Layer):
        def hook(module, args, kwargs, output):
            if self._admit(layer, module, args, output):
                self._watch_output(layer, self._use(layer, module, args, kwargs, output), output)

        return hook

    def _fused_call(self, layer: _Layer):
        """For a layer whose weight gradient can be fused with its per-example gradients:
        ``call(mod, input) -> (function, args, holds) | None`` (None: this call is not fused;
        ``holds``: it may hold all B per-example weight gradients at once)."""
        if self.fused_conv and layer.kind in _FUSED_CONV:
            def conv(mod, input):
                if input.dim() != mod.weight.dim():
                    return None
                x, geometry = _conv_call(mod, input)
                stride, padding, dilation, _ = geometry
                positions = math.prod(
                    (size + 2 * pad - dil * (k - 1) - 1) // st + 1
                    for size, k, st, pad, dil in zip(x.shape[2:], mod.kernel_size, stride, padding, dilation))
                if _conv_prefers_gram(mod, self.method, positions):
                    return None
                return _ConvWithExampleGrads, (x, mod.weight, mod.bias, geometry), True
            return conv
        if self.fused_norm and layer.kind is nn.GroupNorm:
            def group_norm(mod, input):
                if not _norm_fuses(mod, input):
                    return None
                return _GroupNormWithExampleGrads, (input, mod.weight, mod.bias, mod.num_groups, mod.eps), True
            return group_norm
        if self.fused_norm and layer.kind is nn.LayerNorm:
            def layer_norm(mod, input):
                if not _norm_fuses(mod, input):
                    return None
                return _LayerNormWithExampleGrads, (input, mod.weight, mod.bias, list(mod.normalized_shape), mod.eps), True
            return layer_norm
        if self.fused_linear and layer.kind is nn.Linear:
            def linear(mod, input):
                if input.dim() < 3:
                    return None
                tokens, shape = math.prod(input.shape[1:-1]), (mod.in_features, mod.out_features)
                native = _cpu_kernel(input, mod.weight) and not torch.is_autocast_enabled(input.device.type)
                if not _linear_fuses(self.method, tokens, *shape, native):
                    return None
                return _LinearWithExampleGrads, (input, mod.weight, mod.bias), _linear_holds(self.method, tokens, *shape)
            return linear
        return None

    def _fused_forward(self, layer: _Layer, fused_call):
        """The layer's forward while attached (it replaces the forward hook): calls that
        ``fused_call`` fuses run through its autograd function, which hands the examples'
        gradients (or their squared norms) to the call's record; the rest run the module's own
        forward and are watched like any other layer."""
        own_forward = type(layer.module).forward

        def forward(mod, input):
            if mod is not layer.module:  # a deep copy of the attached model: not hooked
                return own_forward(mod, input)
            if (isinstance(input, Tensor) and mod.weight.requires_grad and torch.is_grad_enabled()
                    and not self._suspended):
                plan = fused_call(mod, input)
                if plan is not None:
                    function, args, holds = plan
                    use = _Use((input,), {})
                    output = _apply_under_autocast(function, *args, _FusedCall(self, layer, use, holds))
                    if isinstance(output, tuple):  # the norms' functions: (output, mean, rstd)
                        output = output[0]
                    self._admit(layer, mod, (input,), output)  # always admitted: the weight requires grad
                    layer.uses.append(use)
                    return output
            output = own_forward(mod, input)
            if self._admit(layer, mod, (input,), output):
                self._watch_output(layer, self._use(layer, mod, (input,), {}, output), output)
            return output

        return forward

    # -- reduction
    def _reduce(self, layer: _Layer) -> None:
        all_uses, layer.uses = layer.uses, []
        uses = [u for u in all_uses if u.grad is not None]  # a call that did not reach the loss adds 0
        try:
            if uses:
                self._reduce_uses(layer, uses)
        finally:
            # The output's hook closure keeps its _Use alive as long as the autograd graph
            # lives (all of backward): drop the tensors now, not at the end.
            for u in all_uses:
                u.args = u.kwargs = u.kept = u.grad = u.example_grads = u.example_sq = None

    def _reduce_uses(self, layer: _Layer, uses: list[_Use]) -> None:
        kind, mod = layer.kind, layer.module
        prev, self._suspended = self._suspended, True
        try:
            if kind == "functorch":
                sq = _functorch_sq(mod, uses, self._batch)
            else:
                with torch.no_grad():
                    sq = RULES[kind](mod, uses, self.method)
        finally:
            self._suspended = prev
        sq = sq.float()
        layer.result = sq if layer.result is None else layer.result + sq

    def per_layer(self) -> dict[str, Tensor]:
        """Per-module contribution: module path -> [B] fp32 squared norm of its own trainable
        parameters' per-example gradient (scaled for the loss reduction)."""
        if self._cache is not None:
            return self._cache
        if self._batch is None:
            raise RuntimeError("PerExampleGradNorms: no forward with grad enabled has been seen since the last reset")
        out = {}
        scale = float(self._batch) ** 2 if self.loss_reduction == "mean" else 1.0
        for layer in self._layers:
            if layer.uses:  # calls whose output never reached the loss: reduce what did arrive
                self._reduce(layer)
                layer.pending = 0
            elif layer.result is None and any(f"{layer.name}.{p}" in self._grads_seen for p in layer.params):
                raise RuntimeError(
                    f"PerExampleGradNorms: parameters of {layer.name!r} ({type(layer.module).__name__}) received "
                    "gradients but the module's forward never ran (used functionally, e.g. nn.MultiheadAttention's "
                    "out_proj); its per-example gradients cannot be seen")
            result = layer.result
            if result is None:
                result = torch.zeros(self._batch, dtype=torch.float32, device=self._device())
            out[layer.name] = result * scale
        if not self._grads_seen and all(layer.result is None for layer in self._layers):
            raise RuntimeError("PerExampleGradNorms: call loss.backward() before reading the norms")
        self._cache = out
        return out

    def squared_norms(self) -> Tensor:
        """[B] fp32: |grad of l_i|^2 over all trainable parameters, for each example i."""
        layers = self.per_layer()
        total = torch.zeros(self._batch, dtype=torch.float32, device=self._device())
        for v in layers.values():
            total = total + v
        return total

    def _device(self) -> torch.device:
        for layer in self._layers:
            for p in layer.params.values():
                return p.device
        return torch.device("cpu")
