"""``nn.Conv1d``/``nn.Conv2d``: the Gram form on im2col patches, or the materialised form as one
weight-gradient convolution with the batch folded into the groups (also the fused forward's
autograd function, which hands autograd their sum as the weight gradient)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .common import _acc, _cat, _cpu_kernel, _prefers_gram, _summed_examples_sq, _weight_sq
from .registry import register


def _conv_call(mod: nn.Conv1d | nn.Conv2d, x: Tensor):
    """(input, (stride, padding, dilation, groups)) for aten.convolution computing ``mod(x)``:
    symmetric zero padding stays inside the op; other padding modes and an asymmetric
    "same" pad the input first (differentiably), as ``_ConvNd`` itself does."""
    n = len(mod.kernel_size)
    padding = [0] * n
    if mod.padding_mode != "zeros":
        x = F.pad(x, tuple(mod._reversed_padding_repeated_twice), mode=mod.padding_mode)
    elif mod.padding == "same":
        total = [dil * (k - 1) for k, dil in zip(mod.kernel_size, mod.dilation)]
        if all(t % 2 == 0 for t in total):
            padding = [t // 2 for t in total]
        else:  # the odd element on the right, as torch pads
            x = F.pad(x, tuple(q for t in reversed(total) for q in (t // 2, t - t // 2)))
    elif mod.padding != "valid":
        padding = list(mod.padding)
    return x, (list(mod.stride), padding, list(mod.dilation), mod.groups)


def _conv_geometry(mod: nn.Conv1d | nn.Conv2d, x: Tensor):
    """The input exactly as the convolution sees it, 4-D and already padded, with the 2-D
    kernel, stride and dilation: a Conv1d is a Conv2d with a 1-high kernel."""
    if x.dim() != mod.weight.dim():
        raise ValueError(f"PerExampleGradNorms: {type(mod).__name__} needs a batched input, got shape "
                         f"{tuple(x.shape)}")
    x, (stride, padding, dilation, _) = _conv_call(mod, x)
    if any(padding):
        x = F.pad(x, tuple(q for p in reversed(padding) for q in (p, p)))
    kernel = mod.kernel_size
    if isinstance(mod, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    return x, kernel, stride, dilation


def _conv_patches(x: Tensor, kernel, stride, dilation) -> Tensor:
    """im2col of a padded [B, C, H, W] input: [B, C * kh * kw, L], as F.unfold orders it.
    One strided view and one copy; F.unfold is several times slower on CPU."""
    b, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s = x.stride()
    view = x.as_strided((b, c, kh, kw, ho, wo), (s[0], s[1], s[2] * dh, s[3] * dw, s[2] * sh, s[3] * sw))
    return view.reshape(b, c * kh * kw, ho * wo)


def _conv_prefers_gram(mod: nn.Conv1d | nn.Conv2d, method: str, positions: int) -> bool:
    """The Linear rule per group: one token per output position, d_in = C/g * kernel size."""
    return _prefers_gram(method, positions, mod.in_channels // mod.groups * math.prod(mod.kernel_size),
                         mod.out_channels // mod.groups)


def _conv_example_grads(x: Tensor, d: Tensor, weight_shape, geometry) -> Tensor:
    """[B, *weight_shape]: every example's own weight gradient, in one weight-gradient
    convolution with the batch folded into the groups (Rochette et al. 2019): input
    [1, B*C, ...], output gradient [1, B*O, ...], groups B*g. No im2col copy; measured on
    the bench CNN's convs on CPU: as fast as im2col + bmm on the first, up to 1.5x faster on
    the stride-2 ones."""
    stride, padding, dilation, groups = geometry
    b = x.shape[0]
    xs = x.reshape(1, b * x.shape[1], *x.shape[2:])
    ds = d.reshape(1, b * d.shape[1], *d.shape[2:])
    # Only the weight's shape is read when just the weight gradient is asked for (a real,
    # contiguous allocation all the same: backends make the weight contiguous anyway).
    w = x.new_empty(b * weight_shape[0], *weight_shape[1:])
    grads = torch.ops.aten.convolution_backward(
        ds, xs, w, None, stride, padding, dilation, False, [0] * len(stride), groups * b,
        [False, True, False])[1]
    return grads.view(b, *weight_shape)


def _native_example_sq(x: Tensor, grad_out: Tensor, weight: Tensor, geometry):
    """``(weight_grad, sq, bias_grads)`` from ``fastscale::conv_example_sq``'s CPU kernel (one
    example's gradient at a time), or None where it has none: not the CPU, not fp32/fp64. A
    Conv1d is a Conv2d with a 1-high kernel."""
    if not _cpu_kernel(x, grad_out, weight):
        return None
    stride, padding, dilation, groups = geometry
    kernel = list(weight.shape[2:])
    if x.dim() == 3:
        x, grad_out = x.unsqueeze(2), grad_out.unsqueeze(2)
        kernel, stride, padding, dilation = [1, *kernel], [1, *stride], [0, *padding], [1, *dilation]
    weight_grad, sq, bias_grads = ops.conv_example_sq(x, grad_out, kernel, stride, padding, dilation, groups)
    return weight_grad.view(weight.shape), sq, bias_grads


class _ConvWithExampleGrads(torch.autograd.Function):
    """``mod(x)`` whose backward computes the weight gradient together with the examples'
    shares of it, instead of autograd computing the weight gradient a second time. The
    output gradient goes to ``call.arrive`` (``call``: the hooks' :class:`.hooks._FusedCall`)
    with every example's squared norm (the call is its layer's only one: the CPU kernel, one
    example at a time) or otherwise every example's gradient (their sum over the calls is
    squared later). That second form is written in differentiable ops, so double backward
    works."""

    @staticmethod
    def forward(x, weight, bias, geometry, call):
        stride, padding, dilation, groups = geometry
        return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False,
                                          [0] * len(stride), groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, geometry, call = inputs
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.call = geometry, call

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        dx = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, stride, padding, dilation, False, [0] * len(stride), groups,
                [True, False, False])[0]
        native = None
        if not torch.is_grad_enabled() and ctx.call.alone():
            native = _native_example_sq(x, grad_out, weight, ctx.geometry)
        if native is not None:
            (dw, sq, bias_grads), examples = native, None
            if ctx.needs_input_grad[2]:  # the bias's share of each example's norm rides along
                db = bias_grads.sum(0)
                sq = sq + bias_grads.square().sum(1)
        else:
            examples, sq = _conv_example_grads(x, grad_out, weight.shape, ctx.geometry), None
            dw = examples.sum(0)
            if ctx.needs_input_grad[2]:
                db = grad_out.sum([0, *range(2, grad_out.dim())])
        ctx.call.arrive(grad_out.detach(), None if examples is None else examples.detach(), sq)
        return dx, dw, db, None, None


def _apply_under_autocast(function, *args):
    """``function.apply(*args)`` as autocast would run the op it wraps: autocast does not look
    inside an autograd.Function, and a forward cast there would leave the backward with
    mismatched dtypes. So cast the eligible inputs (floating, not fp64) to the autocast dtype
    outside, differentiably, and run the function with autocast off."""
    device = next(a.device.type for a in args if isinstance(a, Tensor))
    if not torch.is_autocast_enabled(device):
        return function.apply(*args)
    dtype = torch.get_autocast_dtype(device)
    cast = lambda a: a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() and a.dtype != torch.float64 else a  # noqa: E731
    args = [cast(a) for a in args]
    with torch.autocast(device, enabled=False):
        return function.apply(*args)


@register(nn.Conv1d, nn.Conv2d)
def _conv_sq(mod: nn.Conv1d | nn.Conv2d, uses, method: str) -> Tensor:
    b = uses[0].grad.shape[0]
    sq = _acc(uses[0].grad).new_zeros(b)
    if len(uses) == 1 and uses[0].example_sq is not None:  # weight and bias, from the kernel
        return sq + uses[0].example_sq
    if mod.weight.requires_grad:
        positions = sum(math.prod(u.grad.shape[2:]) for u in uses)
        fused = any(u.example_grads is not None for u in uses)
        if fused or not _conv_prefers_gram(mod, method, positions):
            # Sum each example's gradient over the calls, then square.
            def example_grads(u):
                x, geometry = _conv_call(mod, _acc(u.args[0]))
                return _conv_example_grads(x, _acc(u.grad), mod.weight.shape, geometry)

            sq = sq + _summed_examples_sq(uses, example_grads)
        else:
            # Gram form: a conv is a Linear over im2col patches, one "token" per output
            # position (and per call). Groups are independent maps: folded into the bmm batch.
            g = mod.groups
            a, d = [], []
            for u in uses:
                x, kernel, stride, dilation = _conv_geometry(mod, _acc(u.args[0]))
                a.append(_conv_patches(x, kernel, stride, dilation))
                d.append(_acc(u.grad).reshape(b, mod.out_channels, -1))
            a, d = _cat(a, dim=2), _cat(d, dim=2)
            a = a.reshape(b * g, -1, a.shape[-1]).transpose(1, 2)  # [B*g, L, C_in/g * k]
            d = d.reshape(b * g, -1, d.shape[-1]).transpose(1, 2)  # [B*g, L, C_out/g]
            sq = sq + _weight_sq(a, d, "gram").reshape(b, g).sum(1)
    if mod.bias is not None and mod.bias.requires_grad:
        sq = sq + sum(_acc(u.grad).flatten(2).sum(2) for u in uses).square().sum(1)
    return sq
