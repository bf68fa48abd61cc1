"""Pure-torch implementations of fastscale's ops: the fallback path and the test oracle.

Each function here computes exactly what its compiled twin in ``csrc/`` computes, with the
same signature as the op schema in :mod:`fastscale.ops`. They are registered as the ops'
default kernels, so every device without a compiled kernel runs them.

Reduced-precision tensors (fp16, bf16) are computed in fp32 and rounded once when stored;
squared norms are always returned in fp32 (accumulated in fp64 for fp64 tensors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compute_copies(tensors: list[Tensor]) -> list[Tensor]:
    """Fresh tensors in the compute dtype (fp32 for fp16/bf16), never aliasing the inputs."""
    return [t.float() if t.dtype in _LOW_PRECISION else t.clone() for t in tensors]


def _compute_views(tensors: list[Tensor]) -> list[Tensor]:
    """The inputs in the compute dtype; aliases the inputs where no cast is needed."""
    return [t.float() if t.dtype in _LOW_PRECISION else t for t in tensors]


def squared_norms(tensors: list[Tensor], device: torch.device) -> Tensor:
    """fp32 vector of sum(t**2) for each tensor (0 for empty tensors)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float32, device=device)
    # fp64 tensors reduce in fp64; everything else in fp32.
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    return torch.stack(norms).square().to(torch.float32)


def _store(dst: list[Tensor], new: list[Tensor], skip: Tensor | None) -> None:
    """dst <- new, or dst unchanged where the 0-dim flag ``skip`` is set (no host sync)."""
    if skip is None:
        torch._foreach_copy_(dst, new)
        return
    skip = skip.to(torch.bool)
    for d, n in zip(dst, new):
        d.copy_(torch.where(skip, d, n.to(d.dtype)))


def fused_sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: Tensor,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    is_first_step: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> Tensor:
    r"""One SGD step over a list of same-device, same-dtype tensors, returning |g|² per tensor.

    For each parameter p with gradient g and momentum buffer b (torch.optim.SGD's math)::

        g  <- g / grad_scale                       (when grad_scale is given: AMP unscale)
        n  <- sum(g²)                              (returned; before maximize and weight decay)
        g  <- -g                                   (maximize)
        g  <- g + weight_decay · p
        b  <- g                  if is_first_step  (momentum != 0; torch: first buffer is g, undampened)
        b  <- momentum · b + (1 - dampening) · g   otherwise
        g  <- g + momentum · b   if nesterov else b
        p  <- p - lr · g

    ``lr`` is a 0-dim tensor on the parameters' device. When ``found_inf`` (0-dim) is non-zero
    nothing is written: parameters and buffers keep their values; the norms are still returned.
    ``momentum_buffers`` is empty when ``momentum == 0``. Gradients are never modified.
    """
    device = params[0].device if params else lr.device
    if not params:
        return squared_norms([], device)
    g = _compute_copies(grads)
    if grad_scale is not None:
        torch._foreach_div_(g, grad_scale.to(device=device, dtype=g[0].dtype))
    norms = squared_norms(g, device)
    if maximize:
        torch._foreach_neg_(g)
    p = _compute_views(params)
    if weight_decay != 0:
        torch._foreach_add_(g, p, alpha=weight_decay)
    if momentum != 0:
        if is_first_step:
            b = [x.clone() for x in g]
        else:
            b = _compute_copies(momentum_buffers)
            torch._foreach_mul_(b, momentum)
            torch._foreach_add_(b, g, alpha=1 - dampening)
        if nesterov:
            torch._foreach_add_(g, b, alpha=momentum)
        else:
            g = b
        _store(momentum_buffers, b, found_inf)
    step = torch._foreach_mul(g, lr.to(dtype=g[0].dtype))
    _store(params, torch._foreach_sub(p, step), found_inf)
    return norms


def accumulate_grad_(snapshots: list[Tensor], grads: list[Tensor], *, first: bool) -> Tensor:
    r"""Take one micro-batch's gradient out of ``.grad`` as it accumulates, returning its |g|².

    Autograd keeps adding each micro-batch's gradient into ``grads``; ``snapshots`` hold the
    value they had at the previous call. For each pair::

        n <- sum((g - s)²)        (returned: the squared norm of this micro-batch's gradient)
        n <- sum(g²)  if first    (s is not read: no clearing pass before the first micro-batch)
        s <- g

    Grads are never written, so ``.grad`` is the plain accumulated gradient that clipping,
    GradScaler and ``step()`` expect. Differences are formed in fp32 (fp64 for fp64).
    """
    device = grads[0].device if grads else torch.device("cpu")
    if not grads:
        return squared_norms([], device)
    g = _compute_views(grads)
    micro = g if first else torch._foreach_sub(g, _compute_views(snapshots))
    norms = squared_norms(micro, device)
    torch._foreach_copy_(snapshots, grads)
    return norms


def arrival_norms_(out: Tensor, grad: Tensor, accumulated: Tensor | None, *, add: bool = False) -> None:
    r"""One micro-batch's gradient ``grad`` as autograd hands it to ``.grad``, whose value
    before it is added is ``accumulated`` (None: no ``.grad`` yet)::

        out[0] <- sum(g²)      (this micro-batch's squared norm)
        out[1] <- sum(g · t)   (the cross term: |t + g|² = |t|² + 2 g·t + |g|²; 0 without t)
        out[2] <- sum(t²)      (.grad before g: the previous micro-batches; 0 without t)
        t <- t + g             (only with ``add``: AccumulateGrad's own ``.grad += g``)

    Computed in fp32 (fp64 for fp64) while g is fresh, so no snapshot of ``.grad`` is kept;
    ``out`` is a 3-element fp32 or fp64 tensor on grad's device. With ``add`` the sum is
    rounded once into t's dtype, bit for bit what ``t += g`` stores; the norms are of t before.
    """
    if out.numel() != 3 or out.dtype not in (torch.float32, torch.float64):
        raise ValueError("fastscale: out must be a 3-element float32 or float64 tensor")
    if grad.dtype not in (torch.float32, torch.float64, *_LOW_PRECISION):
        raise ValueError(f"fastscale: grad has dtype {grad.dtype}; supported are float32, float64, float16 and bfloat16")
    if add and accumulated is None:
        raise ValueError("fastscale: arrival_norms_ with add=True needs accumulated")
    if accumulated is not None:
        for what, a, b in (("shape", accumulated.shape, grad.shape), ("dtype", accumulated.dtype, grad.dtype),
                           ("device", accumulated.device, grad.device)):
            if a != b:
                raise ValueError(f"fastscale: accumulated has {what} {a} but grad has {b}")
    g = _compute_views([grad])[0].reshape(-1)
    gg = torch.dot(g, g)
    if accumulated is None:
        zero = torch.zeros_like(gg)
        out.copy_(torch.stack([gg, zero, zero]))
        return
    t = _compute_views([accumulated])[0].reshape(-1)
    sums = torch.stack([gg, torch.dot(g, t), torch.dot(t, t)])  # of t before the add
    if add:
        accumulated.add_(grad)  # torch's own checks (overlap) before out is written
    out.copy_(sums)


def _check_float_pair(first_name: str, first: Tensor, second_name: str, second: Tensor, dims: int, shape: str) -> None:
    """The two tensors of a per-example op: ``dims``-D (``shape`` says what the dims are), float32
    or float64, of one dtype and device (the C++ kernels' checks, csrc/checks.h)."""
    for name, t in ((first_name, first), (second_name, second)):
        if t.dim() != dims:
            raise ValueError(f"fastscale: {name} must be {dims}-D {shape}, got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"fastscale: {name} has dtype {t.dtype}; supported are float32 and float64")
    if second.dtype != first.dtype:
        raise ValueError(f"fastscale: {second_name} has dtype {second.dtype} but {first_name} has {first.dtype}")
    if second.device != first.device:
        raise ValueError(f"fastscale: {second_name} is on {second.device} but {first_name} is on {first.device}")


def linear_example_sq(input: Tensor, grad_output: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""A Linear layer's weight gradient, every example's share of it squared, and every
    example's bias gradient::

        weight_grad   = sum_b grad_output[b]^T input[b]        [d_out, d_in]
        sq[b]         = |grad_output[b]^T input[b]|^2            [B]
        bias_grads[b] = sum_t grad_output[b, t]                  [B, d_out]

    for ``input`` [B, T, d_in] and ``grad_output`` [B, T, d_out] of one dtype (float32 or
    float64), computed in that dtype. Here all B gradients are formed at once (B d_in d_out
    elements); the CPU kernel forms one at a time.
    """
    _check_float_pair("input", input, "grad_output", grad_output, 3, "[batch, tokens, features]")
    if input.shape[:2] != grad_output.shape[:2]:
        raise ValueError(f"fastscale: input has shape {tuple(input.shape)} and grad_output {tuple(grad_output.shape)}; "
                         "they must agree in batch and tokens (dims 0 and 1)")
    examples = torch.bmm(grad_output.transpose(1, 2), input)
    return examples.sum(0), examples.flatten(1).square().sum(1), grad_output.sum(1)


def conv_example_sq(input: Tensor, grad_output: Tensor, kernel_size, stride, padding, dilation,
                    groups: int) -> tuple[Tensor, Tensor, Tensor]:
    r"""The same for a 2-D convolution (``F.conv2d(input, weight, bias, stride, padding,
    dilation, groups)`` with zero padding): ``weight_grad`` of the weight's shape, every
    example's squared share of it, ``sq`` [B], and every example's bias gradient
    ``bias_grads`` [B, C_out] (``grad_output`` summed over positions). A convolution is a Linear over im2col patches,
    one token per output position, per group: here all B examples' gradients are formed at once
    from ``F.unfold`` and one bmm per group; the CPU kernel forms one example's at a time.
    """
    _check_float_pair("input", input, "grad_output", grad_output, 4, "[batch, channels, height, width]")
    for name, v, least in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
                           ("dilation", dilation, 1)):
        if len(v) != 2 or min(v) < least:
            raise ValueError(f"fastscale: {name} must be two integers >= {least}, got {list(v)}")
    b, c = input.shape[:2]
    o = grad_output.shape[1]
    if groups < 1 or c % groups or o % groups:
        raise ValueError(f"fastscale: groups must be >= 1 and divide input's channels ({c}) and grad_output's ({o}), "
                         f"got {groups}")
    if grad_output.shape[0] != b:
        raise ValueError(f"fastscale: input has batch {b} but grad_output has {grad_output.shape[0]}")
    for k in range(2):
        span, padded = dilation[k] * (kernel_size[k] - 1) + 1, input.shape[2 + k] + 2 * padding[k]
        if padded >= 2**63:  # as the kernel's int64 arithmetic
            raise ValueError(f"fastscale: padding {list(padding)} is too large")
        size = 0 if padded < span else (padded - span) // stride[k] + 1
        if size < 1:
            raise ValueError(f"fastscale: this geometry gives an empty output ({('height', 'width')[k]} 0)")
        if grad_output.shape[2 + k] != size:
            raise ValueError(f"fastscale: grad_output has spatial size {list(grad_output.shape[2:])} but this "
                             f"geometry gives {('height', 'width')[k]} {size}")
    patches = F.unfold(input, kernel_size, dilation, padding, stride)  # [B, C * kh * kw, L]
    positions = grad_output.shape[2] * grad_output.shape[3]
    patches = patches.reshape(b * groups, c // groups * kernel_size[0] * kernel_size[1], positions)
    d = grad_output.reshape(b * groups, o // groups, positions)
    examples = torch.bmm(d, patches.transpose(1, 2)).reshape(b, o, c // groups, *kernel_size)
    return examples.sum(0), examples.flatten(1).square().sum(1), grad_output.sum((2, 3))


def row_dot_sums(x: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(sum_k x[r, k] d[r, k], sum_k d[r, k])`` for every row r of x and d, [R, N] each, of
    one dtype (float32 or float64), in that dtype."""
    _check_float_pair("x", x, "d", d, 2, "[rows, n]")
    if d.shape != x.shape:
        raise ValueError(f"fastscale: d has shape {tuple(d.shape)} but x has {tuple(x.shape)}")
    return torch.linalg.vecdot(x, d), d.sum(1)


def _check_norm_stats(input: Tensor, mean: Tensor, rstd: Tensor, stats_shape: tuple, weight: Tensor,
                      weight_shape: tuple) -> None:
    """A norm's forward statistics and weight beside its input: of the given shapes, of the
    input's dtype and device (csrc/checks.h's check_norm_stats)."""
    for name, t, want in (("mean", mean, stats_shape), ("rstd", rstd, stats_shape), ("weight", weight, weight_shape)):
        if tuple(t.shape) != want:
            raise ValueError(f"fastscale: {name} must have shape {list(want)}, got {list(t.shape)}")
        if t.dtype != input.dtype:
            raise ValueError(f"fastscale: {name} has dtype {t.dtype} but input has {input.dtype}")
        if t.device != input.device:
            raise ValueError(f"fastscale: {name} is on {t.device} but input is on {input.device}")


def group_norm_example_backward(grad_output: Tensor, input: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor,
                                groups: int, input_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    r"""GroupNorm's backward for ``input`` [N, C, HW] with the ``mean`` and ``rstd`` [N, groups]
    of its forward and its ``weight`` [C], that also gives every example's weight and bias
    gradient. Per (example n, channel c in group g), with sxd = Σ x dy and sd = Σ dy over HW::

        w_rows[n, c] = rstd (sxd − mean sd),    b_rows[n, c] = sd              [N, C] each
        dx = rstd w dy + c2 x + c3,   ds = Σ_{c in g} sxd w,  db = Σ_{c in g} sd w,
        c2 = (db mean − ds) rstd³ / (C/groups · HW),   c3 = −c2 mean − db rstd / (C/groups · HW)

    (torch's formula); dx is an empty tensor unless ``input_grad``. In the inputs' dtype
    (float32 or float64).
    """
    _check_float_pair("input", input, "grad_output", grad_output, 3, "[batch, channels, positions]")
    if grad_output.shape != input.shape:
        raise ValueError(f"fastscale: grad_output has shape {tuple(grad_output.shape)} but input has {tuple(input.shape)}")
    n, c, hw = input.shape
    if groups < 1 or c % groups:
        raise ValueError(f"fastscale: groups must be >= 1 and divide the {c} channels, got {groups}")
    _check_norm_stats(input, mean, rstd, (n, groups), weight, (c,))
    sxd, sd = (input * grad_output).sum(2).view(n, groups, -1), grad_output.sum(2).view(n, groups, -1)
    mean_, rstd_, gamma = mean.unsqueeze(2), rstd.unsqueeze(2), weight.view(1, groups, -1)
    w_rows = ((sxd - mean_ * sd) * rstd_).view(n, c)
    if not input_grad:
        return input.new_empty(0), w_rows, sd.reshape(n, c)
    scale = 1.0 / (c // groups * hw)
    ds, db = (sxd * gamma).sum(2, keepdim=True), (sd * gamma).sum(2, keepdim=True)
    c2 = (db * mean_ - ds) * rstd_ ** 3 * scale
    c3 = -c2 * mean_ - db * rstd_ * scale
    dx = ((rstd_ * gamma).unsqueeze(3) * grad_output.view(n, groups, -1, hw) + c2.unsqueeze(3) * input.view(n, groups, -1, hw)
          + c3.unsqueeze(3))
    return dx.view(n, c, hw), w_rows, sd.reshape(n, c)


def layer_norm_example_backward(grad_output: Tensor, input: Tensor, mean: Tensor, rstd: Tensor,
                                weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""LayerNorm's backward over the last dim of ``input`` [B, T, k], with the ``mean`` and
    ``rstd`` [B, T] of its forward and its ``weight`` [k], that also gives every example's weight
    and bias gradient. With x̂ = (x − mean)·rstd and g = weight·dy, per row::

        dx        = rstd/k · (k g − Σ g − x̂ Σ g x̂)
        w_rows[b] = Σ_t x̂ dy,    b_rows[b] = Σ_t dy        [B, k] each

    in the inputs' dtype (float32 or float64).
    """
    _check_float_pair("input", input, "grad_output", grad_output, 3, "[batch, tokens, features]")
    if grad_output.shape != input.shape:
        raise ValueError(f"fastscale: grad_output has shape {tuple(grad_output.shape)} but input has {tuple(input.shape)}")
    _check_norm_stats(input, mean, rstd, tuple(input.shape[:2]), weight, tuple(input.shape[2:]))
    xhat = (input - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    g = grad_output * weight
    k = input.shape[-1]
    dx = rstd.unsqueeze(-1) / k * (k * g - g.sum(-1, keepdim=True) - xhat * (g * xhat).sum(-1, keepdim=True))
    return dx, (xhat * grad_output).sum(1), grad_output.sum(1)
