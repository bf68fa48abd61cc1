"""Shared by the per-layer rules: dtype, token layout, and the two forms of |sum_t d_t a_t^T|^2."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _extension


def _direct_trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}


def _cpu_kernel(*tensors: Tensor) -> bool:
    """Whether the compiled CPU kernels take these tensors: all on the CPU, of one dtype,
    float32 or float64 (the per-example ops in csrc/cpu/ are built for those only)."""
    dtype = tensors[0].dtype
    return (dtype in (torch.float32, torch.float64) and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)
            and "cpu" in _extension.native_device_types())


def _acc(t: Tensor) -> Tensor:
    # Half-precision Gram products overflow/lose digits; reduce in fp32 (fp64 stays fp64).
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _prefers_gram(method: str, tokens: int, d_in: int, d_out: int) -> bool:
    """Gram form or materialised gradient: forced by ``method``, or with "auto" the cheaper,
    B T^2 (d_in + d_out) against B T d_in d_out."""
    return method == "gram" or (method == "auto" and tokens * (d_in + d_out) < d_in * d_out)


def _gram_sq(a: Tensor, d: Tensor) -> Tensor:
    """The Gram form of ``_weight_sq``: sum_{t,s} (a_t.a_s)(d_t.d_s), g_n never formed."""
    gram_a = torch.bmm(a, a.transpose(1, 2))
    gram_d = torch.bmm(d, d.transpose(1, 2))
    return gram_a.mul_(gram_d).sum((1, 2))  # in place: a fresh temporary costs page faults on CPU


def _materialised_sq(a: Tensor, d: Tensor) -> Tensor:
    """The materialised form of ``_weight_sq``: every g_n formed, then squared."""
    g = torch.bmm(d.transpose(1, 2), a)  # [N, d_out, d_in], one example's gradient per row
    return g.square_().sum((1, 2))


def _summed_examples_sq(uses, example_grads) -> Tensor:
    """[B]: the squared norm of each example's weight gradient summed over the calls, the
    materialised way: a fused call brought its own (``use.example_grads``), the others get
    ``example_grads(use)``."""
    total = None
    for u in uses:
        g = _acc(u.example_grads if u.example_grads is not None else example_grads(u))
        total = g if total is None else total + g
    # One pass, no squared temporary (measured 1.5x faster than square().sum()).
    return torch.linalg.vector_norm(total.flatten(1), dim=1).square()


def _weight_sq(a: Tensor, d: Tensor, method: str) -> Tensor:
    """Squared norm of g_n = sum_t d[n, t] a[n, t]^T for a [N, T, d_in], d [N, T, d_out]."""
    n, t, d_in = a.shape
    d_out = d.shape[-1]
    if t == 1:  # outer product: |a|^2 |d|^2
        return a.square().sum((1, 2)) * d.square().sum((1, 2))
    if _prefers_gram(method, t, d_in, d_out):
        return _gram_sq(a, d)
    return _materialised_sq(a, d)


def _cat(tensors: list[Tensor], dim: int) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _tokens(t: Tensor) -> Tensor:
    """[B, ..., d] -> [B, T, d] with every middle dim in T (a view when possible)."""
    return t.unsqueeze(1) if t.dim() == 2 else t.flatten(1, -2)
