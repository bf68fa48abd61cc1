"""``nn.LayerNorm``/``nn.RMSNorm``/``nn.GroupNorm`` affine parameters: sum over positions of
xhat * delta, xhat recomputed from the saved input."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from .common import _acc
from .registry import register

_NORMS = tuple(m for m in (nn.LayerNorm, getattr(nn, "RMSNorm", None), nn.GroupNorm) if m is not None)


@register(*_NORMS)
def _norm_sq(mod: nn.Module, uses, method: str = "auto") -> Tensor:
    weight, bias = getattr(mod, "weight", None), getattr(mod, "bias", None)
    weight = weight is not None and weight.requires_grad
    bias = bias is not None and bias.requires_grad
    b = uses[0].args[0].shape[0]
    gw = gb = 0  # per-example gradients, [B, affine size], summed over positions and calls
    for u in uses:
        x, d = _acc(u.args[0]), _acc(u.grad)
        if isinstance(mod, nn.GroupNorm):
            to_rows = lambda t: t.reshape(b, mod.num_channels, -1).sum(2)  # noqa: E731
            xhat = F.group_norm(x, mod.num_groups, None, None, mod.eps) if weight else None
        else:
            k = math.prod(mod.normalized_shape)
            to_rows = lambda t: t.reshape(b, -1, k).sum(1)  # noqa: E731
            if not weight:
                xhat = None
            elif isinstance(mod, nn.LayerNorm):
                xhat = F.layer_norm(x, mod.normalized_shape, None, None, mod.eps)
            else:
                xhat = F.rms_norm(x, mod.normalized_shape, None, mod.eps)
        if weight:
            gw = gw + to_rows(xhat * d)
        if bias:
            gb = gb + to_rows(d)
    sq = _acc(uses[0].grad).new_zeros(b)
    if weight:
        sq = sq + gw.square().sum(1)
    if bias:
        sq = sq + gb.square().sum(1)
    return sq
