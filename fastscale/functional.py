"""The functional core of FusedScaledSGD: one fused op call per (device, dtype) of a group.

Shaped like ``torch.optim.sgd.sgd``: the class collects a group's tensors and its effective
lr, this computes. Complex tensors are stepped as their real views (SGD is elementwise and
linear, and |z|² = re² + im²); sparse gradients take torch's own per-tensor path, and so does
``differentiable=True`` (torch's ``_single_tensor_sgd`` under autograd: the pure-torch twin's
``_foreach_*`` ops have no derivative or save tensors the step then overwrites).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops, reference


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def check_sparse(grads: list[Tensor], weight_decay) -> None:
    """torch.optim.SGD raises this at the parameter (grad.add(param) with a sparse grad); here
    it is raised before anything is written."""
    if (isinstance(weight_decay, Tensor) or weight_decay != 0) and any(g.is_sparse for g in grads):
        raise RuntimeError("add(sparse, dense) is not supported. Use add(dense, sparse) instead.")


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
    uniform: bool = False,
) -> Tensor:
    r"""One SGD step of ``params`` (see :func:`fastscale.reference.fused_sgd_` for the math),
    returning each gradient's squared norm (after AMP unscaling) as an fp32 vector in the
    order of ``params``, on the first parameter's device.

    ``momentum_buffer_list`` holds each parameter's buffer or None; as in torch's ``sgd()``,
    None entries are replaced by new buffers, except on a step skipped for an AMP overflow.
    ``lr`` is a 1-element tensor. ``fused``: None calls the dispatched op (compiled kernel
    where built), False the pure-torch twin; ``differentiable`` runs torch's per-tensor step
    under autograd (:func:`_differentiable_sgd`). A sparse gradient with ``weight_decay``
    raises torch's error before anything is written. ``uniform``: the caller has checked that
    every tensor is on one device with one dtype and every gradient is dense (then they are
    not grouped again).
    """
    n = len(params)
    device = params[0].device if params else lr.device
    if n == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    if not uniform:
        check_sparse(grads, weight_decay)
    sparse = [] if uniform else [i for i, g in enumerate(grads) if g.is_sparse]
    if differentiable:
        return _differentiable_sgd(params, grads, momentum_buffer_list, lr=lr, weight_decay=weight_decay,
                                   momentum=momentum, dampening=dampening, nesterov=nesterov, maximize=maximize,
                                   grad_scale=grad_scale, found_inf=found_inf)
    op = ops.pure_torch.fused_sgd_ if fused is False else ops.fused_sgd_
    if isinstance(weight_decay, Tensor):
        weight_decay = weight_decay.item()  # the op takes a float: a tensor one is read on the host
    buckets: dict = {}
    if uniform and (momentum == 0 or not any(b is None for b in momentum_buffer_list)):
        buckets[(params[0].device, params[0].dtype, False)] = list(range(n))
    else:
        for i, (p, g) in enumerate(zip(params, grads)):
            if g.is_sparse:
                continue
            first = momentum != 0 and momentum_buffer_list[i] is None
            buckets.setdefault((p.device, p.dtype, first), []).append(i)
    norms, order = [], []
    skipped = None  # whether an AMP overflow skips this step: read on the host once, if needed
    for (dev, dtype, first), idx in buckets.items():
        on_dev = lambda t: None if t is None else t.to(dev, non_blocking=True)  # noqa: E731
        if momentum == 0:
            bufs = []
        elif first:
            bufs = [torch.empty_like(params[i], memory_format=torch.preserve_format) for i in idx]
        else:
            bufs = [momentum_buffer_list[i] for i in idx]
        ps, gs, bs = [params[i] for i in idx], [grads[i] for i in idx], bufs
        if dtype.is_complex:
            ps, gs, bs = ([torch.view_as_real(t) for t in ts] for ts in (ps, gs, bs))
        out = op(
            ps, gs, bs,
            lr=on_dev(lr).reshape(()), weight_decay=weight_decay, momentum=momentum, dampening=dampening,
            nesterov=nesterov, maximize=maximize, is_first_step=first,
            grad_scale=on_dev(grad_scale), found_inf=on_dev(found_inf),
        )
        norms.append(out)
        order += idx
        # A step skipped for an AMP overflow leaves no buffer behind (torch's fused SGD keeps
        # uninitialised ones); only a buffer-creating step reads the flag on the host.
        if first and skipped is None:
            skipped = found_inf is not None and bool(found_inf.item())
        if first and not skipped:
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
    grad = grads[i]
    if grad_scale is not None:
        grad = grad / grad_scale.to(grad.device)
    norm = _sq_norm(grad.coalesce()._values())  # |z|² for complex: not .float() (drops the imaginary part)
    if not (found_inf is not None and bool(found_inf.item())):
        _single_tensor_sgd(params[i], grad, bufs, i, lr=lr.item(), weight_decay=weight_decay, momentum=momentum,
                           dampening=dampening, nesterov=nesterov, maximize=maximize)
    return norm


def _single_tensor_sgd(param, grad, bufs, i, *, lr, weight_decay, momentum, dampening, nesterov, maximize):
    """torch.optim.SGD's ``_single_tensor_sgd`` for one tensor, op for op (so autograd and
    sparse gradients go through it as through torch's). ``bufs[i]`` is created if None, as the
    detached gradient, as in torch."""
    if maximize:
        grad = -grad
    if isinstance(weight_decay, Tensor):
        grad = grad.addcmul(param.clone(), weight_decay.to(param.device))
    elif weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    if momentum != 0:
        buf = bufs[i]
        if buf is None:
            buf = bufs[i] = grad.detach().clone()
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        grad = grad.add(buf, alpha=momentum) if nesterov else buf
    if isinstance(lr, Tensor):
        param.addcmul_(grad, lr.to(device=param.device), value=-1)
    else:
        param.add_(grad, alpha=-lr)


def _sq_norm(t: Tensor) -> Tensor:
    """1-element fp32 |t|², reduced as the twin reduces (fp64 for fp64), complex as (re, im)."""
    t = _real(t.detach())
    return reference.squared_norms([t], t.device)


def _differentiable_sgd(params, grads, bufs, *, lr, weight_decay, momentum, dampening, nesterov, maximize,
                        grad_scale, found_inf) -> Tensor:
    """torch.optim.SGD's ``_single_tensor_sgd`` under autograd (``differentiable=True``): the
    gradient flows to parameters, gradients, momentum buffers, a tensor ``lr`` and a tensor
    ``weight_decay`` as it does through torch's. An AMP step (``grad_scale``/``found_inf``,
    which torch's unfused path never receives) reads the overflow flag on the host, as torch's
    own ``lr`` handling does here."""
    device = params[0].device
    if grad_scale is not None:
        grads = [g / grad_scale.to(g.device) for g in grads]
    norms = torch.cat([_sq_norm(g).to(device) for g in grads])
    if found_inf is not None and bool(found_inf.item()):
        return norms
    lr = lr.reshape(())
    lr = lr if lr.requires_grad else lr.item()
    for i, param in enumerate(params):
        _single_tensor_sgd(param, grads[i], bufs, i, lr=lr, weight_decay=weight_decay, momentum=momentum,
                           dampening=dampening, nesterov=nesterov, maximize=maximize)
    return norms
