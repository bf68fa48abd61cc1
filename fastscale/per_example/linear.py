"""``nn.Linear``: on [B, d] an outer product per example; on [B, T, d] the Gram or the
materialised form, whichever is cheaper (``common._weight_sq``)."""

from __future__ import annotations

from torch import Tensor, nn

from .common import _acc, _cat, _tokens, _weight_sq
from .registry import register


@register(nn.Linear)
def _linear_sq(mod: nn.Linear, uses, method: str) -> Tensor:
    weight = mod.weight.requires_grad
    bias = mod.bias is not None and mod.bias.requires_grad
    if len(uses) == 1 and uses[0].args[0].dim() == 2:
        # [B, d] input: g_i = delta_i a_i^T, so |g_i|^2 = |a_i|^2 |delta_i|^2 and the bias adds |delta_i|^2.
        d2 = _acc(uses[0].grad).square().sum(1)
        if not weight:
            return d2
        a2 = _acc(uses[0].args[0]).square().sum(1)
        return d2 * (a2 + 1) if bias else d2 * a2
    a = _cat([_tokens(_acc(u.args[0])) for u in uses], dim=1)
    d = _cat([_tokens(_acc(u.grad)) for u in uses], dim=1)
    sq = a.new_zeros(a.shape[0])
    if weight:
        sq = sq + _weight_sq(a, d, method)
    if bias:
        sq = sq + d.sum(1).square().sum(1)
    return sq
