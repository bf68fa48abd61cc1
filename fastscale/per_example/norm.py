"""``nn.LayerNorm``/``nn.RMSNorm``/``nn.GroupNorm`` affine parameters: sum over positions of
xhat * delta. LayerNorm and RMSNorm recompute xhat from the saved input; GroupNorm, whose
statistics are per (example, group), takes them from its forward and never forms xhat."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import _acc
from .registry import register

_NORMS = tuple(m for m in (nn.LayerNorm, getattr(nn, "RMSNorm", None), nn.GroupNorm) if m is not None)


def _group_stats(mod: nn.Module, output: Tensor):
    """GroupNorm's (mean, rstd), [B, groups], as its forward computed them (autograd saved
    them for its backward), or None where the output did not come from native_group_norm in
    fp32/fp64 (reduced-precision statistics are recomputed instead)."""
    if not isinstance(mod, nn.GroupNorm):
        return None
    node = output.grad_fn
    if type(node).__name__ != "NativeGroupNormBackward0":
        return None
    mean, rstd = node._saved_result1, node._saved_result2
    if mean.dtype not in (torch.float32, torch.float64) or mean.shape != (output.shape[0], mod.num_groups):
        return None
    return mean.detach(), rstd.detach()


def _group_norm_grads(mod: nn.GroupNorm, x: Tensor, d: Tensor, stats, weight: bool):
    """[B, C] each: every example's weight gradient sum_k xhat d over positions k (None unless
    ``weight``) and bias gradient sum_k d. With the forward's (mean, rstd) per (example,
    group) the weight's is rstd (sum x d - mean sum d): one read of x and d, no xhat (fp32
    cancellation only where a group's |mean| >> its std)."""
    b, c = x.shape[:2]
    dr = d.reshape(b, c, -1)
    sd = dr.sum(2)
    if not weight:
        return None, sd
    if stats is None:
        xhat = F.group_norm(x, mod.num_groups, None, None, mod.eps)
        return (xhat * d).reshape(b, c, -1).sum(2), sd
    mean, rstd = (s.to(x.dtype).reshape(b, mod.num_groups, 1) for s in stats)
    sxd = torch.linalg.vecdot(x.reshape(b, c, -1), dr).reshape(b, mod.num_groups, -1)
    return ((sxd - mean * sd.reshape(b, mod.num_groups, -1)) * rstd).reshape(b, c), sd


@register(*_NORMS, keep=_group_stats)
def _norm_sq(mod: nn.Module, uses, method: str = "auto") -> Tensor:
    weight, bias = getattr(mod, "weight", None), getattr(mod, "bias", None)
    weight = weight is not None and weight.requires_grad
    bias = bias is not None and bias.requires_grad
    b = uses[0].args[0].shape[0]
    gw = gb = 0  # per-example gradients, [B, affine size], summed over positions and calls
    for u in uses:
        x, d = _acc(u.args[0]), _acc(u.grad)
        if isinstance(mod, nn.GroupNorm):
            w_rows, b_rows = _group_norm_grads(mod, x, d, u.kept, weight)
            gw, gb = (gw + w_rows if weight else 0), (gb + b_rows if bias else 0)
            continue
        k = math.prod(mod.normalized_shape)
        to_rows = lambda t: t.reshape(b, -1, k).sum(1)  # noqa: E731
        if weight:
            if isinstance(mod, nn.LayerNorm):
                xhat = F.layer_norm(x, mod.normalized_shape, None, None, mod.eps)
            else:
                xhat = F.rms_norm(x, mod.normalized_shape, None, mod.eps)
            gw = gw + to_rows(xhat * d)
        if bias:
            gb = gb + to_rows(d)
    sq = _acc(uses[0].grad).new_zeros(b)
    if weight:
        sq = sq + gw.square().sum(1)
    if bias:
        sq = sq + gb.square().sum(1)
    return sq
