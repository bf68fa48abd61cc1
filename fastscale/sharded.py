"""DTensor parameters (FSDP2 ``fully_shard``, tensor parallelism, HSDP): the one rule fastscale's
ops follow on them, and the statistics summed across shards.

**The ops run on the local shards.** ``fused_sgd_`` and ``accumulate_grad_`` are elementwise over
(parameter, gradient, momentum buffer / snapshot) tuples that share one layout, so running the
kernel on each rank's local shards computes exactly the sharded result, with no communication:
what DTensor's pointwise strategy gives torch's own ``aten._fused_sgd_``. We unwrap explicitly
(:func:`on_local_shards`, registered as the ops' DTensor rule in :mod:`fastscale.ops`) instead of
registering a sharding strategy because of the ops' other output, the per-tensor squared norms:

* one output tensor has one placement, but its entries belong to tensors laid out differently
  (a tensor-parallel layer's Shard(0) weight beside a Replicate bias): no placement describes it;
* a Partial output resolved per op call would be one all-reduce per group per step (and one per
  micro-batch for ``accumulate_grad_``), where one per step for the whole optimizer suffices,
  because squared norms add: Σ over micro-batches and groups of Σ over shards = Σ over shards of
  the local sums.

So on DTensors an op returns the *local* partial sums as a plain tensor, and
:class:`ShardLayout` sums them over the shards once per step, at ``step()``, in one all-reduce
(replicated tensors counted once: only the rank at coordinate 0 of each replicated mesh dim
contributes). A future op follows the same rule: elementwise over aligned lists, local outputs,
reductions left to the caller. The pure-torch twins called directly (``fused=False``) go through
the same function.

**What the statistics mean on a mesh.** ``.grad`` of an FSDP2/HSDP parameter is its shard of the
gradient averaged over every data-parallel rank: the big batch is the global batch. Per-example
norms are local to each rank's examples (the forward sees unsharded weights, so each is a whole
example's norm) and are averaged over the data-parallel ranks in the same collective.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate
except ImportError:  # a torch built without distributed: no DTensor can reach us
    DTensor = Partial = Replicate = None

__all__ = ["ShardLayout", "is_dtensor", "local", "on_local_shards", "version"]

# Mesh-dimension names taken as data-parallel (torchtitan's and torch's examples); any other
# name (e.g. "tp", "cp") marks a model-parallel dimension. Unnamed meshes are data-parallel
# (fully_shard's default mesh has no names).
_DATA_PARALLEL_NAMES = ("dp", "dp_replicate", "dp_shard", "fsdp", "hsdp", "ddp", "replicate", "shard", "data")


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t):
    """The local shard of a DTensor (the tensor itself, not a view: FSDP2 accumulates gradients
    into it in place, so its identity and version say whether a backward ran); else ``t``."""
    return t._local_tensor if is_dtensor(t) else t


def version(t: Tensor) -> int:
    """A version that every in-place write to a gradient bumps: autograd's accumulation into a
    DTensor bumps the DTensor's counter, FSDP2's (into ``_local_tensor``) the local shard's."""
    return t._version + t._local_tensor._version if is_dtensor(t) else t._version


def _describe(t: Tensor) -> str:
    return f"a DTensor {_placements(t)} on {t.device_mesh}" if is_dtensor(t) else "a plain tensor"


def _placements(t: Tensor) -> str:
    return "(" + ", ".join(map(repr, t.placements)) + ")"


def on_local_shards(fn, args: tuple, kwargs: dict):
    """Call ``fn`` (a fastscale op or its pure-torch twin) with every DTensor replaced by its local
    shard. The tensor lists must be all DTensors on one mesh, entry ``i`` of each list laid out
    alike (a parameter, its gradient, its buffer), else a TypeError/ValueError before anything is
    written. Returns what ``fn`` returns on the local shards (squared norms: local partial sums)."""
    lists = [a for a in args if isinstance(a, (list, tuple))]
    if not any(is_dtensor(t) for ts in lists for t in ts):
        return fn(*args, **kwargs)
    first = next(t for ts in lists for t in ts if is_dtensor(t))
    for ts in lists:
        for i, t in enumerate(ts):
            if not is_dtensor(t):
                raise TypeError(f"fastscale ops take all DTensors or no DTensors in their tensor lists; entry {i} "
                                f"is a plain tensor beside {_describe(first)}")
            if t.device_mesh != first.device_mesh:
                raise ValueError(f"fastscale ops run on one device mesh per call; entry {i} is on {t.device_mesh}, "
                                 f"another on {first.device_mesh}")
    for i, aligned in enumerate(zip(*(ts for ts in lists if ts))):
        if any(t.placements != aligned[0].placements for t in aligned):
            raise ValueError(f"fastscale ops need entry {i} of every list laid out alike, got placements "
                             f"{[_placements(t) for t in aligned]}")
    unwrap = lambda a: [local(t) for t in a] if isinstance(a, (list, tuple)) else local(a)  # noqa: E731
    return fn(*map(unwrap, args), **{k: unwrap(v) for k, v in kwargs.items()})


def dtensor_rule(_subclass, op, _types, args, kwargs):
    """The DTensor ``__torch_dispatch__`` rule of fastscale's ops (see the module docstring)."""
    return on_local_shards(op, args, kwargs or {})


def data_parallel_size(layout: "ShardLayout | None", what: str) -> int:
    """How many data-parallel ranks hold their own examples, for a source of per-rank figures
    (``what``); a ValueError when there is no mesh or it has model-parallel dims."""
    if layout is None:
        raise ValueError(f"{what} per rank need DTensor (FSDP2/HSDP) parameters; for DDP replicas use "
                         "fastscale.distributed.register_noise_scale_hook")
    if layout.data_parallel_size is None:
        raise ValueError(
            f"{what} on the mesh {layout.mesh} (dims {layout.mesh.mesh_dim_names}): only data-parallel meshes "
            f"(FSDP2, HSDP; dims unnamed or named {_DATA_PARALLEL_NAMES}) are supported; tensor-parallel "
            "dims are designed for, not implemented")
    return layout.data_parallel_size


def check_grads(params: list[Tensor], grads: list[Tensor]) -> None:
    """A DTensor parameter's gradient must be a DTensor laid out as the parameter is (a Partial
    gradient, not yet reduced over its mesh, would step each shard with a part of it)."""
    for i, (p, g) in enumerate(zip(params, grads)):
        if is_dtensor(p) != is_dtensor(g):
            raise TypeError(f"parameter {i} is {_describe(p)} but its gradient is {_describe(g)}")
        if is_dtensor(p) and (g.device_mesh != p.device_mesh or g.placements != p.placements):
            raise ValueError(f"the gradient of parameter {i} is {_describe(g)}, the parameter is {_describe(p)}: "
                             "reduce it to the parameter's layout before step()")


class ShardLayout:
    """How an optimizer's DTensor parameters are split over their mesh, and the one collective per
    step that turns local statistics into whole-tensor ones. Built from the parameter list
    (:meth:`of`: None when no parameter is a DTensor); raises, before anything is built, for
    parameters that mix DTensors and plain tensors or span several meshes."""

    def __init__(self, mesh, weights: Tensor, group, data_parallel_size: int | None):
        self.mesh = mesh
        self.weights = weights  # per tensor: 1 where this rank's shard counts, 0 on replicas
        self.group = group  # covers every rank of the mesh
        self.data_parallel_size = data_parallel_size  # None: the mesh has model-parallel dims

    @staticmethod
    def of(params: list[Tensor], device: torch.device) -> "ShardLayout | None":
        flags = [is_dtensor(p) for p in params]
        if not any(flags):
            return None
        if not all(flags):
            plain, dt = flags.index(False), flags.index(True)
            raise TypeError(
                f"FusedScaledSGD: parameter {plain} is a plain tensor but parameter {dt} is a DTensor: shard every "
                "parameter of the optimizer (fully_shard the root module too) or none; a plain tensor's statistics "
                "cannot be told apart from a replica's")
        mesh = params[0].device_mesh
        for i, p in enumerate(params):
            if p.device_mesh != mesh:
                raise ValueError(
                    f"FusedScaledSGD: parameter {i} is on device mesh {p.device_mesh}, parameter 0 on {mesh}: one "
                    "optimizer steps parameters of one mesh (its statistics are summed in one collective)")
            if any(isinstance(pl, Partial) for pl in p.placements):
                raise ValueError(f"FusedScaledSGD: parameter {i} has a Partial placement {_placements(p)}")
        coordinate = mesh.get_coordinate()
        if coordinate is None:
            raise ValueError(f"FusedScaledSGD: this rank is not in the parameters' device mesh {mesh}")
        if mesh.ndim == 1:
            group = mesh.get_group()
        elif mesh.size() == dist.get_world_size():
            group = dist.group.WORLD
        else:
            raise ValueError(f"FusedScaledSGD: a {mesh.ndim}-D device mesh over a subset of the ranks is not "
                             "supported (the statistics collective spans the whole world for N-D meshes)")
        weights = torch.tensor(
            [float(all(coordinate[d] == 0 for d, pl in enumerate(p.placements) if isinstance(pl, Replicate)))
             for p in params], dtype=torch.float64, device=device)
        names = mesh.mesh_dim_names
        data_parallel = names is None or all(n in _DATA_PARALLEL_NAMES for n in names)
        return ShardLayout(mesh, weights, group, mesh.size() if data_parallel else None)

    def __deepcopy__(self, memo):
        return self  # a mesh and a process group are shared, never copied

    def global_examples(self, local_examples: int, batch_size: int | None) -> int:
        """Examples behind a step whose ``local_examples`` are this rank's: every data-parallel rank
        holds as many. Raises when the mesh has model-parallel dims or the batch does not split."""
        w = data_parallel_size(self, "per-example norms")
        if batch_size is not None and batch_size % w:
            raise ValueError(f"the batch size {batch_size} is not divisible by the {w} data-parallel ranks of the "
                             f"mesh {self.mesh}")
        if batch_size is not None and local_examples * w != batch_size:
            raise ValueError(f"{local_examples} examples on each of {w} data-parallel ranks make "
                             f"{local_examples * w}, but the optimizer's batch_size is {batch_size}")
        return local_examples * w

    def sum_over_shards(self, last_norms: Tensor, m):
        """The step's one collective: the last step's per-tensor norms and the measurement's local
        figures, summed over the shards (replicas counted once) and averaged over data-parallel
        ranks where they are per-example. Returns (last_norms, measurement) as whole-tensor figures."""
        w = self.weights
        parts = [last_norms.double() * w]
        local_pt = () if m is None else tuple(k for k in m.local_pt if getattr(m, k) is not None)
        for key in local_pt:
            parts.append(getattr(m, key).double() * w)
        small = m is not None and m.local_examples
        if small:
            scale = 1.0 / self.data_parallel_size
            parts.append(m.small_sq.double().reshape(1) * scale)
            if m.small_pt is not None and "small_pt" not in local_pt:
                parts.append(m.small_pt.double() * scale)
        vec = torch.cat(parts)
        # async_op=False: on NCCL the current stream waits for it (no host sync), and dynamo traces
        # it as a functional collective (async_op=True and Work.wait() break the graph).
        dist.all_reduce(vec, group=self.group)
        out = vec.split([p.numel() for p in parts])
        last = out[0].to(last_norms.dtype)
        if m is None:
            return last, None
        changes = {"local_pt": (), "local_examples": False}
        for key, value in zip(local_pt, out[1:]):
            changes[key] = value.float()
            changes[key.replace("_pt", "_sq")] = value.sum().reshape(1)  # the total of whole-tensor norms
        if small:
            rest = out[1 + len(local_pt):]
            changes["small_sq"] = rest[0]
            if len(rest) > 1:
                changes["small_pt"] = rest[1].float()
        return last, dataclasses.replace(m, **changes)
