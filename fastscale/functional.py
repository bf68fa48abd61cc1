"""The functional core of FusedScaledSGD: one fused op call per (device, dtype) of a group.

Shaped like ``torch.optim.sgd.sgd``: the class collects a group's tensors and its effective
lr, this computes. Complex tensors are stepped as their real views (SGD is elementwise and
linear, and |z|² = re² + im²); sparse gradients take torch's own per-tensor path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops, reference


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def fused_scaled_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    *,
    lr: Tensor,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    fused: bool | None = None,
    differentiable: bool = False,
) -> Tensor:
    r"""One SGD step of ``params`` (see :func:`fastscale.reference.fused_sgd_` for the math),
    returning each gradient's squared norm (after AMP unscaling) as an fp32 vector in the
    order of ``params``, on the first parameter's device.

    ``momentum_buffer_list`` holds each parameter's buffer or None; as in torch's ``sgd()``,
    None entries are replaced by new buffers, except on a step skipped for an AMP overflow.
    ``lr`` is a 1-element tensor. ``fused``: None calls the dispatched op (compiled kernel
    where built), False the pure-torch twin; ``differentiable`` runs the twin under autograd.
    """
    n = len(params)
    device = params[0].device if params else lr.device
    if n == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    op = reference.fused_sgd_ if fused is False or differentiable else ops.fused_sgd_
    sparse = [i for i, g in enumerate(grads) if g.is_sparse]
    buckets: dict = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.is_sparse:
            continue
        first = momentum != 0 and momentum_buffer_list[i] is None
        buckets.setdefault((p.device, p.dtype, first), []).append(i)
    norms, order = [], []
    for (dev, _, first), idx in buckets.items():
        on_dev = lambda t: None if t is None else t.to(dev, non_blocking=True)  # noqa: E731
        if momentum == 0:
            bufs = []
        elif first:
            bufs = [torch.empty_like(params[i], memory_format=torch.preserve_format) for i in idx]
        else:
            bufs = [momentum_buffer_list[i] for i in idx]
        out = op(
            [_real(params[i]) for i in idx], [_real(grads[i]) for i in idx], [_real(b) for b in bufs],
            lr=on_dev(lr).reshape(()), weight_decay=weight_decay, momentum=momentum, dampening=dampening,
            nesterov=nesterov, maximize=maximize, is_first_step=first,
            grad_scale=on_dev(grad_scale), found_inf=on_dev(found_inf),
        )
        norms.append(out)
        order += idx
        # A step skipped for an AMP overflow leaves no buffer behind (torch's fused SGD keeps
        # uninitialised ones); only a buffer-creating step reads the flag on the host.
        if first and not (found_inf is not None and bool(found_inf.item())):
            for i, b in zip(idx, bufs):
                momentum_buffer_list[i] = b
    for i in sparse:
        norms.append(_sparse_sgd(params, grads, momentum_buffer_list, i, lr, weight_decay, momentum,
                                 dampening, nesterov, maximize, grad_scale, found_inf))
        order.append(i)
    if len(norms) == 1 and order == list(range(n)):
        return norms[0].to(device)
    vec = torch.empty(n, dtype=torch.float32, device=device)
    vec[torch.tensor(order, device=device)] = torch.cat([t.to(device, torch.float32).reshape(-1) for t in norms])
    return vec


def _sparse_sgd(params, grads, bufs, i, lr, weight_decay, momentum, dampening, nesterov, maximize,
                grad_scale, found_inf) -> Tensor:
    """torch.optim.SGD's per-tensor update for a sparse gradient (torch's fused and foreach
    paths do not take them either). Reads lr and the AMP flag on the host, as torch does."""
    p, grad = params[i], grads[i]
    if grad_scale is not None:
        grad = grad / grad_scale.to(grad.device)
    norm = grad.coalesce()._values().float().square().sum().reshape(1)
    if found_inf is not None and bool(found_inf.item()):
        return norm
    if maximize:
        grad = -grad
    if weight_decay != 0:
        grad = grad.add(p, alpha=weight_decay)
    if momentum != 0:
        buf = bufs[i]
        if buf is None:
            buf = bufs[i] = grad.detach().clone()
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        grad = grad.add(buf, alpha=momentum) if nesterov else buf
    p.add_(grad, alpha=-lr.item())
    return norm
