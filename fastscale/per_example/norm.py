"""``nn.LayerNorm``/``nn.RMSNorm``/``nn.GroupNorm`` affine parameters: sum over positions of
xhat * delta. LayerNorm and RMSNorm recompute xhat from the saved input; GroupNorm, whose
statistics are per (example, group), takes them from its forward and never forms xhat. On the
CPU a GroupNorm or LayerNorm whose weight trains runs its own backward instead, which forms
these sums in the passes the input gradient needs anyway."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops, reference
from .common import _acc, _cpu_kernel
from .registry import register

_ROW_NORMS = tuple(m for m in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if m is not None)


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are in force (non-reentrant activation checkpointing,
    ``save_on_cpu``): reading a saved tensor would unpack it now, recomputing the checkpointed
    block or copying it back, and keep the result alive."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None  # cannot tell: do not read


def _group_stats(mod: nn.GroupNorm, output: Tensor):
    """GroupNorm's (mean, rstd), [B, groups], as its forward computed them (autograd saved
    them for its backward), for the weight's rule; None where the weight is frozen, where
    reading them would cost (saved-tensor hooks), and where the output did not come from
    native_group_norm with fp32/fp64 statistics: the rule then recomputes xhat."""
    if mod.weight is None or not mod.weight.requires_grad or _saved_tensor_hooks_active():
        return None
    node = output.grad_fn
    if type(node).__name__ != "NativeGroupNormBackward0":
        return None
    try:
        mean, rstd = node._saved_result1, node._saved_result2
    except (AttributeError, RuntimeError):  # another torch's names, or already freed
        return None
    if mean.dtype not in (torch.float32, torch.float64) or mean.shape != (output.shape[0], mod.num_groups):
        return None
    return mean.detach(), rstd.detach()


def _fuses(mod: nn.Module, x: Tensor) -> bool:
    """Whether a GroupNorm or LayerNorm call runs through its fused function
    (:class:`_GroupNormWithExampleGrads`, :class:`_LayerNormWithExampleGrads`): its weight
    trains, and the CPU kernels take x as it is (contiguous fp32/fp64 like the weight, not empty,
    no autocast), with the batch outside the normalised dims."""
    normalised = 1 if isinstance(mod, nn.GroupNorm) else len(mod.normalized_shape)
    return (mod.weight is not None and mod.weight.requires_grad and x.dim() > normalised and x.numel() > 0
            and x.is_contiguous() and _cpu_kernel(x, mod.weight) and not torch.is_autocast_enabled("cpu"))


def _differentiable_grads(norm, x: Tensor, weight: Tensor, grad_out: Tensor, need_x: bool, batch_dims):
    """(dx, dweight) of ``norm(x, weight)`` (the norm without its bias) against ``grad_out``, as
    differentiable functions of x, weight and grad_out, for a backward that builds a graph.
    dx: autograd of the recomputed norm with respect to x alone (asked for x and weight
    together, autograd would also follow x's own history back to earlier uses of the same
    weight). dweight: the sum of xhat * grad_out, written out."""
    with torch.enable_grad():
        dx = torch.autograd.grad(norm(x, weight), x, grad_out, create_graph=True)[0] if need_x else None
        xhat = norm(x, None)
        dw = (xhat * grad_out).sum(batch_dims).view_as(weight)
    return dx, dw


class _NormWithExampleGrads(torch.autograd.Function):
    """What the fused norms share: their forward is torch's native kernel, (out, mean, rstd);
    the backward gets x, weight, mean and rstd, and ``ctx.spec``, ``ctx.eps``, ``ctx.call`` from
    the inputs (x, weight, bias, spec, eps, call), spec being the groups of a GroupNorm and the
    normalised shape of a LayerNorm."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, ctx.spec, ctx.eps, ctx.call = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, mean, rstd)


class _GroupNormWithExampleGrads(_NormWithExampleGrads):
    """``F.group_norm(x, groups, weight, bias, eps)`` whose backward makes torch's two passes
    itself (fastscale::group_norm_example_backward), so the per-example gradients of weight and
    bias, which come from the first pass's sums, cost no pass of their own. They go to
    ``call.arrive`` as the call's example gradients ([B, C] each; ``call``: the hooks'
    :class:`.hooks._FusedCall`). A backward that builds a graph (double backward) works from
    differentiable ops instead (:func:`_differentiable_grads`)."""

    @staticmethod
    def forward(x, weight, bias, groups, eps, call):
        n, c = x.shape[:2]
        return torch.ops.aten.native_group_norm(x, weight, bias, n, c, math.prod(x.shape[2:]), groups, eps)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        n, c, g = x.shape[0], x.shape[1], ctx.spec
        hw = math.prod(x.shape[2:])
        if torch.is_grad_enabled():  # double backward: differentiable ops
            dx, dw = _differentiable_grads(lambda t, w: F.group_norm(t, g, w, None, ctx.eps), x, weight, grad_out,
                                           ctx.needs_input_grad[0], (0, *range(2, x.dim())))
            db = grad_out.sum([0, *range(2, grad_out.dim())])
            with torch.no_grad():  # the examples' rows from the op's twin
                _, w_rows, sd = reference.group_norm_example_backward(
                    grad_out.reshape(n, c, hw), x.view(n, c, hw), mean.view(n, g), rstd.view(n, g), weight, g, False)
        else:
            dx, w_rows, sd = ops.group_norm_example_backward(grad_out.reshape(n, c, hw), x.view(n, c, hw), mean.view(n, g),
                                                             rstd.view(n, g), weight, g, ctx.needs_input_grad[0])
            dx = dx.view_as(x) if ctx.needs_input_grad[0] else None
            dw, db = w_rows.sum(0), sd.sum(0)
        ctx.call.arrive(grad_out.detach(), (w_rows.detach(), sd.detach()))
        return (dx if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None,
                db if ctx.needs_input_grad[2] else None, None, None, None)


class _LayerNormWithExampleGrads(_NormWithExampleGrads):
    """``F.layer_norm(x, shape, weight, bias, eps)`` whose backward is one kernel
    (fastscale::layer_norm_example_backward) that also sums each example's rows of x̂·dy and dy
    apart: every example's weight and bias gradient, handed to ``call.arrive`` as the call's
    example gradients ([B, k] each). Double backward works from differentiable ops
    (:func:`_differentiable_grads`)."""

    @staticmethod
    def forward(x, weight, bias, normalized_shape, eps, call):
        return torch.ops.aten.native_layer_norm(x, normalized_shape, weight, bias, eps)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        b, k = x.shape[0], weight.numel()
        if torch.is_grad_enabled():  # double backward: differentiable ops
            dx, dw = _differentiable_grads(lambda t, w: F.layer_norm(t, ctx.spec, w, None, ctx.eps), x, weight,
                                           grad_out, ctx.needs_input_grad[0], tuple(range(x.dim() - weight.dim())))
            db = grad_out.reshape(-1, k).sum(0).view_as(weight)
            with torch.no_grad():  # the examples' rows from the op's twin
                _, w_rows, b_rows = reference.layer_norm_example_backward(
                    grad_out.reshape(b, -1, k), x.view(b, -1, k), mean.view(b, -1), rstd.view(b, -1), weight.view(k))
        else:
            dx, w_rows, b_rows = ops.layer_norm_example_backward(
                grad_out.reshape(b, -1, k), x.view(b, -1, k), mean.view(b, -1), rstd.view(b, -1), weight.view(k))
            dx, dw, db = dx.view_as(x), w_rows.sum(0).view_as(weight), b_rows.sum(0).view_as(weight)
        ctx.call.arrive(grad_out.detach(), (w_rows.detach(), b_rows.detach()))
        return (dx if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None,
                db if ctx.needs_input_grad[2] else None, None, None, None)


def _group_norm_grads(mod: nn.GroupNorm, x: Tensor, d: Tensor, stats, weight: bool):
    """[B, C] each: every example's weight gradient sum_k xhat d over positions k (None unless
    ``weight``) and bias gradient sum_k d. With the forward's (mean, rstd) per (example,
    group) the weight's is rstd (sum x d - mean sum d): reductions over x and d, no xhat
    formed. In fp32 the difference cancels where a group's |mean| >> its std (relative error
    of the squared norm ~1e-5 at mean = 100 std, ~6e-5 at 1000 std, against ~2e-6 and ~1.5e-5
    recomputing xhat)."""
    b, c = x.shape[:2]
    dr = d.reshape(b, c, -1)
    if weight and stats is not None and _cpu_kernel(x, d):
        # Both sums in one read of x and d (the CPU kernel; torch needs a product and 3 passes).
        sxd, sd = (t.reshape(b, c) for t in ops.row_dot_sums(x.reshape(b * c, -1), d.reshape(b * c, -1)))
    else:
        sxd, sd = None, dr.sum(2)
    if not weight:
        return None, sd
    if stats is None:
        xhat = F.group_norm(x, mod.num_groups, None, None, mod.eps)
        return xhat.mul_(d).reshape(b, c, -1).sum(2), sd
    mean, rstd = (s.to(x.dtype).reshape(b, mod.num_groups, 1) for s in stats)
    if sxd is None:
        sxd = torch.linalg.vecdot(x.reshape(b, c, -1), dr)
    sxd = sxd.reshape(b, mod.num_groups, -1)
    return ((sxd - mean * sd.reshape(b, mod.num_groups, -1)) * rstd).reshape(b, c), sd


def _norm_sq(mod: nn.Module, uses, method: str = "auto") -> Tensor:
    weight, bias = getattr(mod, "weight", None), getattr(mod, "bias", None)
    weight = weight is not None and weight.requires_grad
    bias = bias is not None and bias.requires_grad
    b = uses[0].args[0].shape[0]
    gw = gb = 0  # per-example gradients, [B, affine size], summed over positions and calls
    for u in uses:
        x, d = _acc(u.args[0]), _acc(u.grad)
        if u.example_grads is not None or isinstance(mod, nn.GroupNorm):
            # a fused call's backward formed them (GroupNorm, LayerNorm); else GroupNorm's rule
            w_rows, b_rows = u.example_grads or _group_norm_grads(mod, x, d, u.kept, weight)
            gw, gb = (gw + w_rows if weight else 0), (gb + b_rows if bias else 0)
            continue
        k = math.prod(mod.normalized_shape)
        to_rows = lambda t: t.reshape(b, -1, k).sum(1)  # noqa: E731
        if weight:
            if isinstance(mod, nn.LayerNorm):
                xhat = F.layer_norm(x, mod.normalized_shape, None, None, mod.eps)
            else:
                xhat = F.rms_norm(x, mod.normalized_shape, None, mod.eps)
            # In place on our own xhat: a fresh [B, T, k] temporary costs page faults (measured
            # 1.06 -> 0.48 ms for the rule on a [32, 64, 128] call, one CPU thread).
            gw = gw + to_rows(xhat.mul_(d))
        if bias:
            gb = gb + to_rows(d)
    sq = _acc(uses[0].grad).new_zeros(b)
    if weight:
        sq = sq + gw.square().sum(1)
    if bias:
        sq = sq + gb.square().sum(1)
    return sq


register(*_ROW_NORMS)(_norm_sq)
register(nn.GroupNorm, keep=_group_stats)(_norm_sq)
