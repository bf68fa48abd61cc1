"""fastscale's op layer: schemas, fake kernels and default (pure-torch) kernels.

The schemas are declared once, here. The pure-torch twins in :mod:`fastscale.reference`
are registered as ``CompositeExplicitAutograd`` kernels, so every device works; the C++
extension registers only its ``CPU`` and ``CUDA`` kernels (``TORCH_LIBRARY_IMPL``), which
the dispatcher prefers: the dispatcher is the one place that decides which implementation
runs. The extension is loaded when fastscale is imported (:mod:`fastscale._extension`), so these
ops never run the twin silently after a successful build.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch
from torch import Tensor

from . import _extension, reference, sharded

_lib = torch.library.Library("fastscale", "DEF")

# Mutated lists are Tensor(a!)[]; scalars that change every step (lr, grad_scale, found_inf)
# are tensors so that neither the host nor torch.compile specialises on their values.
_lib.define(
    "fused_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, *, "
    "Tensor lr, float weight_decay, float momentum, float dampening, bool nesterov, "
    "bool maximize, bool is_first_step, Tensor? grad_scale=None, Tensor? found_inf=None) -> Tensor"
)
_lib.define(
    "accumulate_grad_(Tensor(a!)[] snapshots, Tensor[] grads, *, bool first) -> Tensor"
)

_lib.define("arrival_norms_(Tensor(a!) out, Tensor grad, Tensor(b!)? accumulated, *, bool add=False) -> ()")
_lib.define("linear_example_sq(Tensor input, Tensor grad_output) -> (Tensor, Tensor, Tensor)")
_lib.define("conv_example_sq(Tensor input, Tensor grad_output, int[2] kernel_size, int[2] stride, int[2] padding, "
            "int[2] dilation, int groups) -> (Tensor, Tensor, Tensor)")

_lib.impl("fused_sgd_", reference.fused_sgd_, "CompositeExplicitAutograd")
_lib.impl("accumulate_grad_", reference.accumulate_grad_, "CompositeExplicitAutograd")
_lib.impl("arrival_norms_", reference.arrival_norms_, "CompositeExplicitAutograd")
_lib.define("row_dot_sums(Tensor x, Tensor d) -> (Tensor, Tensor)")
_lib.define("group_norm_example_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor rstd, Tensor weight, "
            "int groups, bool input_grad) -> (Tensor, Tensor, Tensor)")
_lib.define("layer_norm_example_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor rstd, Tensor weight) "
            "-> (Tensor, Tensor, Tensor)")
_lib.impl("linear_example_sq", reference.linear_example_sq, "CompositeExplicitAutograd")
_lib.impl("row_dot_sums", reference.row_dot_sums, "CompositeExplicitAutograd")
_lib.impl("group_norm_example_backward", reference.group_norm_example_backward, "CompositeExplicitAutograd")
_lib.impl("layer_norm_example_backward", reference.layer_norm_example_backward, "CompositeExplicitAutograd")
_lib.impl("conv_example_sq", reference.conv_example_sq, "CompositeExplicitAutograd")


@torch.library.register_fake("fastscale::fused_sgd_")
def _fused_sgd_fake(params, grads, momentum_buffers, *, lr, **_):
    device = params[0].device if params else lr.device
    return torch.empty(len(params), dtype=torch.float32, device=device)


@torch.library.register_fake("fastscale::accumulate_grad_")
def _accumulate_grad_fake(snapshots, grads, **_):
    device = grads[0].device if grads else torch.device("cpu")
    return torch.empty(len(grads), dtype=torch.float32, device=device)


@torch.library.register_fake("fastscale::arrival_norms_")
def _arrival_norms_fake(out, grad, accumulated, *, add=False):
    return None


@torch.library.register_fake("fastscale::linear_example_sq")
def _linear_example_sq_fake(input, grad_output):
    return (input.new_empty(grad_output.shape[-1], input.shape[-1]), input.new_empty(input.shape[0]),
            input.new_empty(input.shape[0], grad_output.shape[-1]))


@torch.library.register_fake("fastscale::conv_example_sq")
def _conv_example_sq_fake(input, grad_output, kernel_size, stride, padding, dilation, groups):
    weight = input.new_empty(grad_output.shape[1], input.shape[1] // groups, *kernel_size)
    return weight, input.new_empty(input.shape[0]), input.new_empty(input.shape[0], grad_output.shape[1])


@torch.library.register_fake("fastscale::row_dot_sums")
def _row_dot_sums_fake(x, d):
    return x.new_empty(x.shape[0]), x.new_empty(x.shape[0])


@torch.library.register_fake("fastscale::group_norm_example_backward")
def _group_norm_example_backward_fake(grad_output, input, mean, rstd, weight, groups, input_grad):
    rows = input.new_empty(input.shape[:2])
    return input.new_empty(input.shape if input_grad else (0,)), rows, rows.clone()


@torch.library.register_fake("fastscale::layer_norm_example_backward")
def _layer_norm_example_backward_fake(grad_output, input, mean, rstd, weight):
    rows = input.new_empty(input.shape[0], input.shape[2])
    return input.new_empty(input.shape), rows, rows.clone()


def fused_sgd_(params, grads, momentum_buffers, **kwargs) -> Tensor:
    """``torch.ops.fastscale.fused_sgd_``; see :func:`fastscale.reference.fused_sgd_`."""
    return torch.ops.fastscale.fused_sgd_(params, grads, momentum_buffers, **kwargs)


def accumulate_grad_(snapshots, grads, **kwargs) -> Tensor:
    """``torch.ops.fastscale.accumulate_grad_``; see :func:`fastscale.reference.accumulate_grad_`."""
    return torch.ops.fastscale.accumulate_grad_(snapshots, grads, **kwargs)


def arrival_norms_(out, grad, accumulated, *, add=False) -> None:
    """``torch.ops.fastscale.arrival_norms_``; see :func:`fastscale.reference.arrival_norms_`."""
    torch.ops.fastscale.arrival_norms_(out, grad, accumulated, add=add)


def linear_example_sq(input, grad_output) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.ops.fastscale.linear_example_sq``; see :func:`fastscale.reference.linear_example_sq`."""
    return torch.ops.fastscale.linear_example_sq(input, grad_output)


def conv_example_sq(input, grad_output, kernel_size, stride, padding, dilation, groups) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.ops.fastscale.conv_example_sq``; see :func:`fastscale.reference.conv_example_sq`."""
    return torch.ops.fastscale.conv_example_sq(input, grad_output, kernel_size, stride, padding, dilation, groups)


def row_dot_sums(x, d) -> tuple[Tensor, Tensor]:
    """``torch.ops.fastscale.row_dot_sums``; see :func:`fastscale.reference.row_dot_sums`."""
    return torch.ops.fastscale.row_dot_sums(x, d)


def group_norm_example_backward(grad_output, input, mean, rstd, weight, groups, input_grad) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.ops.fastscale.group_norm_example_backward``; see
    :func:`fastscale.reference.group_norm_example_backward`."""
    return torch.ops.fastscale.group_norm_example_backward(grad_output, input, mean, rstd, weight, groups, input_grad)


def layer_norm_example_backward(grad_output, input, mean, rstd, weight) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.ops.fastscale.layer_norm_example_backward``; see :func:`fastscale.reference.layer_norm_example_backward`."""
    return torch.ops.fastscale.layer_norm_example_backward(grad_output, input, mean, rstd, weight)


# DTensors (FSDP2, tensor parallelism): every op runs on the local shards and returns local
# partial norms, which fastscale.sharded sums over the shards once per step. Why an explicit
# unwrap rather than a sharding strategy is argued in fastscale/sharded.py's docstring; a new
# op registers the same rule here.
if sharded.DTensor is not None:
    for _name in ("fused_sgd_", "accumulate_grad_"):
        torch.library.register_torch_dispatch(f"fastscale::{_name}", sharded.DTensor, sharded.dtensor_rule)


def _twin(fn):
    """A pure-torch twin called directly follows the ops' DTensor rule too."""
    return lambda *args, **kwargs: sharded.on_local_shards(fn, args, kwargs)


# The ops through the dispatcher (the compiled kernel where one is built), and the pure-torch
# twins called directly, bypassing it: fused=False / foreach=.
dispatched = SimpleNamespace(fused_sgd_=fused_sgd_, accumulate_grad_=accumulate_grad_, arrival_norms_=arrival_norms_)
pure_torch = SimpleNamespace(fused_sgd_=_twin(reference.fused_sgd_), accumulate_grad_=_twin(reference.accumulate_grad_),
                             arrival_norms_=reference.arrival_norms_)  # plain tensors only: no shard rule
_warned: set[str] = set()


def check_native(device_type: str, required: bool) -> None:
    """Whether the dispatched ops run a compiled kernel for ``device_type``. When not:
    ``required`` (``fused=True``) raises; otherwise one warning per device type says the
    pure-torch twin (the ops' default kernel) runs instead."""
    if device_type in _extension.native_device_types():
        return
    why = _extension.unavailable_reason(device_type)
    if required:
        raise RuntimeError(f"fused=True but fastscale has no compiled kernel for {device_type}: {why}")
    if device_type not in _warned:
        _warned.add(device_type)
        warnings.warn(f"fastscale: no compiled kernel for {device_type} ({why}); using the pure-torch path",
                      stacklevel=4)
