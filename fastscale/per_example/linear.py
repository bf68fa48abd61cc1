"""``nn.Linear``: on [B, d] an outer product per example; on [B, T, d] the Gram or the
materialised form (``common._weight_sq``), or, while the hooks are attached, fused into the
layer's own backward (:class:`_LinearWithExampleGrads`) where that is cheaper (:func:`_fuses`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .common import _acc, _cat, _cpu_kernel, _summed_examples_sq, _tokens, _weight_sq
from .registry import register

# Without the CPU kernel the fused form holds every example's weight gradient, B·d_in·d_out,
# for one layer at a time. Allowed up to this many times what the call holds anyway (its input
# and output gradient, B·T·(d_in + d_out)). At 1 a call fuses exactly where the unfused rule
# would materialise the same numbers anyway (so fusion never adds memory, and saves that form's
# extra product); the rest keep the Gram form. Measured on the bench transformer (CPU, one
# thread), factor 4 (every Linear fused) bought 1-2% of backward time for 4.5x the peak memory
# (15.6 -> 70.7 MiB).
FUSE_MEMORY_FACTOR = 1


def _holds(method: str, tokens: int, d_in: int, d_out: int) -> bool:
    """Whether a call may hold all B of its per-example weight gradients at once."""
    return method == "materialize" or d_in * d_out <= FUSE_MEMORY_FACTOR * tokens * (d_in + d_out)


def _fuses(method: str, tokens: int, d_in: int, d_out: int, native: bool) -> bool:
    """Whether a call with ``tokens`` positions per example runs through the fused form. With
    the CPU kernel (``fastscale::linear_example_sq``: one example's gradient at a time, memory
    d_in·d_out per thread block) its extra cost is one pass over each example's gradient, against
    the Gram form's T²(d_in + d_out) multiply-adds; without it, memory decides (:func:`_holds`)."""
    if method == "gram" or tokens < 2:  # one token: the outer-product rule costs nothing
        return False
    if native and method == "auto" and d_in * d_out <= tokens * tokens * (d_in + d_out):
        return True
    return _holds(method, tokens, d_in, d_out)


def _example_grads(a: Tensor, d: Tensor) -> Tensor:
    """[B, d_out, d_in]: every example's weight gradient sum_t d_t a_t^T, for [B, ..., d] inputs."""
    return torch.bmm(_tokens(d).transpose(1, 2), _tokens(a))


class _LinearWithExampleGrads(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose backward computes the weight gradient together with
    the examples' shares of it, so autograd does not compute it a second time. ``call`` is the
    hooks' record of this call (:class:`.hooks._FusedCall`), which gets the output gradient and
    either every example's squared norm, weight and bias (the call is its layer's only one: the
    CPU kernel, one example at a time), or every example's gradient (their sum over the calls is squared
    later; only where ``call.holds`` them), or neither (the rule then works from the output
    gradient, as for an unfused call). The held and the plain forms are written in
    differentiable ops, so double backward works."""

    @staticmethod
    def forward(x, weight, bias, call):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, call = inputs
        ctx.save_for_backward(x, weight)
        ctx.call = call

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        call = ctx.call
        dx = db = examples = sq = None
        if ctx.needs_input_grad[0]:
            dx = grad_out.matmul(weight)
        a, d = _tokens(x), _tokens(grad_out)
        if not torch.is_grad_enabled() and _cpu_kernel(x, weight, grad_out) and call.alone():
            dw, sq, bias_grads = ops.linear_example_sq(a, d)
            if ctx.needs_input_grad[2]:  # the bias's share of each example's norm rides along
                db = bias_grads.sum(0)
                sq = sq + bias_grads.square().sum(1)
        else:
            if call.holds:
                examples = _example_grads(x, grad_out)
                dw = examples.sum(0)
            else:  # autograd's own weight gradient
                dw = d.flatten(0, 1).t().mm(a.flatten(0, 1))
            if ctx.needs_input_grad[2]:
                db = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        call.arrive(grad_out.detach(), None if examples is None else examples.detach(), sq)
        return dx, dw, db, None


@register(nn.Linear)
def _linear_sq(mod: nn.Linear, uses, method: str) -> Tensor:
    if len(uses) == 1 and uses[0].example_sq is not None:  # weight and bias, from the kernel
        return uses[0].example_sq
    weight = mod.weight.requires_grad
    bias = mod.bias is not None and mod.bias.requires_grad
    if len(uses) == 1 and uses[0].args[0].dim() == 2:
        # [B, d] input: g_i = delta_i a_i^T, so |g_i|^2 = |a_i|^2 |delta_i|^2 and the bias adds |delta_i|^2.
        d2 = _acc(uses[0].grad).square().sum(1)
        if not weight:
            return d2
        a2 = _acc(uses[0].args[0]).square().sum(1)
        return d2 * (a2 + 1) if bias else d2 * a2
    d = _cat([_tokens(_acc(u.grad)) for u in uses], dim=1)
    sq = d.new_zeros(d.shape[0])
    if weight and any(u.example_grads is not None for u in uses):
        sq = sq + _summed_examples_sq(uses, lambda u: _example_grads(_acc(u.args[0]), _acc(u.grad)))
    elif weight:
        a = _cat([_tokens(_acc(u.args[0])) for u in uses], dim=1)
        sq = sq + _weight_sq(a, d, method)
    if bias:
        sq = sq + d.sum(1).square().sum(1)
    return sq
