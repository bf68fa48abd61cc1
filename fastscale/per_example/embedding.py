"""``nn.Embedding``: one gradient row per distinct id, repeated ids summed before squaring."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import _acc, _cat
from .registry import register


@register(nn.Embedding)
def _embedding_sq(mod: nn.Embedding, uses, method: str = "auto") -> Tensor:
    if mod.scale_grad_by_freq:
        raise NotImplementedError("PerExampleGradNorms: nn.Embedding(scale_grad_by_freq=True) scales by "
                                  "batch-wide counts; not supported")
    b = uses[0].args[0].shape[0]
    ids = _cat([u.args[0].reshape(b, -1) for u in uses], dim=1)  # [B, T]
    d = _cat([_acc(u.grad).reshape(b, -1, mod.embedding_dim) for u in uses], dim=1)  # [B, T, D]
    t = ids.shape[1]
    if mod.padding_idx is not None:
        d = d * (ids != mod.padding_idx).unsqueeze(-1)
    # Row r of g_i is the sum S of delta over example i's tokens with id r; |g_i|^2 = sum_r |S_r|^2
    # = sum over tokens of delta_t . S_{id_t}. Group equal (example, id) keys by sorting:
    # no torch.unique, so no data-dependent size and no device sync.
    keys = (ids + torch.arange(b, device=ids.device).unsqueeze(1) * mod.num_embeddings).reshape(-1)
    sorted_keys, perm = keys.sort()
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group = starts.cumsum(0) - 1
    rows = d.reshape(-1, mod.embedding_dim)[perm]
    sums = torch.zeros_like(rows).index_add_(0, group, rows)
    per_token = sums[group].mul_(rows).sum(1)  # in place on the gathered copy: no other temporary
    return d.new_zeros(b).index_add_(0, perm // t, per_token)
