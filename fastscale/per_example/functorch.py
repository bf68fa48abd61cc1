"""Fallback for layers without a rule (``fallback="functorch"``): materialised per-example
gradients by vmap over examples of a vector-Jacobian product."""

from __future__ import annotations

from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .common import _acc, _direct_trainable


def _functorch_sq(mod: nn.Module, uses, batch: int) -> Tensor:
    """Fallback: materialised per-example gradients of ``mod``'s own trainable parameters,
    vmap over examples of grad(<delta_i, mod(x_i)>) -- a vector-Jacobian product with the saved
    output gradient, so the rest of the network is never re-run. Requires a forward that
    treats examples independently and deterministically (no dropout inside ``mod``)."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in _direct_trainable(mod).items()}
    total: dict[str, Tensor] | None = None
    for u in uses:
        inputs = (u.args, u.kwargs)
        leaves, spec = pytree.tree_flatten(inputs)
        dims = [0 if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch else None for v in leaves]
        in_dims = pytree.tree_unflatten(dims, spec)

        def one_example(p, example_inputs, grad_out):
            ex_leaves, ex_spec = pytree.tree_flatten(example_inputs)
            ex_leaves = [v.unsqueeze(0) if dim == 0 else v for v, dim in zip(ex_leaves, dims)]
            args, kwargs = pytree.tree_unflatten(ex_leaves, ex_spec)
            out = functional_call(mod, p, args, kwargs)
            return (out * grad_out.unsqueeze(0)).sum()

        try:
            per_example = vmap(grad(one_example), in_dims=(None, in_dims, 0))(params, inputs, u.grad)
        except Exception as exc:
            raise RuntimeError(
                f"PerExampleGradNorms: functorch fallback failed for {type(mod).__name__}: {exc}") from exc
        if total is None:
            total = per_example
        else:
            total = {n: total[n] + per_example[n] for n in total}
    return sum(_acc(g).flatten(1).square().sum(1) for g in total.values())
