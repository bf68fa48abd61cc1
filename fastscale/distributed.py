"""Noise-scale statistics from data-parallel replicas (DistributedDataParallel).

Before DDP's all-reduce, each replica's gradient is the mean gradient over its own local batch:
a small-batch gradient at no extra backward pass (McCandlish et al. 2018, Appendix A.1). The
communication hook here takes each bucket's per-parameter squared norms (one fused pass over the
bucket's flat buffer, before it is divided and all-reduced), adds them into one small per-step
vector, and, from the last bucket of the backward, launches ONE extra all-reduce of that vector.
At ``optimizer.step()`` a step pre-hook feeds the optimizer the mean over replicas (with
``step(closure)``, right after the closure's backward)::

    mean_sq = (1/W) Σ_r |G_r|²     with B_small = local batch, B_big = W · local batch

while the big-batch norms |G_big|² are taken from each bucket as its all-reduce completes (the
same averaged gradient DDP writes into ``.grad``), so clipping ``.grad`` before ``step()`` does
not change the statistics. Nothing on the step path reads a device value on the host.

Gradient accumulation: run the first k-1 micro-batches under ``ddp_model.no_sync()``. The hook
only runs on the last backward, where each replica's buffer holds its local gradient accumulated
over all k micro-batches, so ``local_batch_size`` is the examples per replica per optimizer step
(k × micro-batch). This source and ``optimizer.accumulate_grad`` are exclusive: under DDP the last
micro-batch's ``.grad`` is already averaged across replicas, so accumulate_grad would measure the
wrong thing; using both in one step raises a RuntimeError at ``step()``.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations as objects.
import datetime
import math
import numbers
import warnings

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

__all__ = ["ReplicaNoiseScaleState", "noise_scale_allreduce_hook", "register_noise_scale_hook"]

# First entry of every rank's configuration row: a rank whose row lacks it is not running
# register_noise_scale_hook at this point (its collectives are out of step with ours).
_CONFIG_MAGIC = 20180606.0
_NOT_FUSED, _NO_NOISE_SCALE, _BAD_BATCH, _BAD_LOSS_SCALE = 1, 2, 4, 8
_FLAG_MESSAGES = {
    _NOT_FUSED: "optimizer is not a fastscale.FusedScaledSGD",
    _NO_NOISE_SCALE: "optimizer was built without noise_scale=True",
    _BAD_BATCH: "local_batch_size is not a positive number",
    _BAD_LOSS_SCALE: "loss_scale is not a positive number",
}


class ReplicaNoiseScaleState:
    """State of :func:`noise_scale_allreduce_hook`: what it measured this step, and how to feed it.

    Attributes you may change between steps (identically on every rank):
        local_batch_size: examples each replica contributes to one optimizer step.
        loss_scale: ``.grad`` = loss_scale × the mean gradient (1 for a mean loss; k if you summed
            k micro-batch mean losses without dividing by k; the batch size for a sum loss).
        grad_scaler: the ``torch.amp.GradScaler`` whose scaled loss you backpropagate, or None.
    """

    def __init__(self, optimizer, local_batch_size, loss_scale, grad_scaler, process_group, param_index):
        self.optimizer = optimizer
        self.local_batch_size = local_batch_size
        self.loss_scale = loss_scale
        self.grad_scaler = grad_scaler
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self._param_index = param_index  # parameter -> position in the optimizer's statistics
        self._n_tensors = len(param_index)
        self._bucket_layout: dict[tuple, tuple[list[int], Tensor]] = {}
        self._accumulating: Tensor | None = None  # this backward's local per-tensor |g|², fp64
        self._reduced: Tensor | None = None  # the last backward's vector, being summed over ranks
        self._big: Tensor | None = None  # this backward's per-tensor |all-reduced g|², fp64
        self._work = None  # its all-reduce
        self._backwards = 0  # synchronised backwards since the last feed
        self._pre_hook = None

    # ----------------------------------------------------------------- inside the comm hook
    def _layout(self, bucket: dist.GradBucket, device: torch.device):
        """Which of the bucket's gradients the optimizer steps, and their statistics positions."""
        params = bucket.parameters()
        key = (device, tuple(id(p) for p in params))
        found = self._bucket_layout.get(key)
        if found is None:
            kept = [i for i, p in enumerate(params) if p in self._param_index]
            index = torch.tensor([self._param_index[params[i]] for i in kept], dtype=torch.long, device=device)
            found = self._bucket_layout[key] = (kept, index)
        return found

    def _measure(self, bucket: dist.GradBucket) -> None:
        buffer = bucket.buffer()
        # DDP launches buckets in index order, so bucket 0 starts a new backward.
        if bucket.index() == 0 or self._accumulating is None:
            dtype = torch.float32 if buffer.device.type == "mps" else torch.float64
            self._accumulating = torch.zeros(self._n_tensors, dtype=dtype, device=buffer.device)
            self._big = torch.zeros_like(self._accumulating)
        self._add_norms(bucket, self._accumulating)  # views into the flat buffer, before the all-reduce
        if bucket.is_last():
            # The one extra collective per step: a vector of one entry per parameter tensor.
            stats, self._accumulating = self._accumulating, None
            self._work = dist.all_reduce(stats, group=self.process_group, async_op=True)
            self._reduced = stats
            self._backwards += 1

    def _add_norms(self, bucket: dist.GradBucket, into: Tensor) -> None:
        """Add the squared norms of the bucket's stepped gradients into ``into`` (per tensor)."""
        kept, index = self._layout(bucket, into.device)
        if kept:
            grads = bucket.gradients()  # views into the bucket's flat buffer
            # fp16/bf16 norms accumulate in fp32: their squares overflow half precision.
            low = grads[kept[0]].dtype in (torch.float16, torch.bfloat16)
            norms = torch._foreach_norm([grads[i] for i in kept], 2, dtype=torch.float32 if low else None)
            into.index_add_(0, index, torch.stack(norms).to(into.dtype).square())

    def _measure_reduced(self, bucket: dist.GradBucket, fut: torch.futures.Future) -> Tensor:
        """Future callback: the bucket now holds the averaged gradient that becomes ``.grad``."""
        if self._big is not None:
            self._add_norms(bucket, self._big)
        return fut.value()

    # ----------------------------------------------------------------- at step()
    def feed(self, optimizer=None) -> bool:
        """Hand this step's replica statistics to the optimizer (``observe_small_batch_norms``).

        Called automatically by the step pre-hook that :func:`register_noise_scale_hook`
        installs; call it yourself only after :meth:`remove`. Returns whether anything was fed
        (nothing when no synchronised backward ran since the last step). Does not synchronise.
        """
        optimizer = self.optimizer if optimizer is None else optimizer
        stats, work, backwards, big = self._reduced, self._work, self._backwards, self._big
        self._reduced, self._work, self._backwards, self._big = None, None, 0, None
        if stats is None:
            return False
        if optimizer.statistics.index is not self._param_index:  # add_param_group made a new tracker
            raise RuntimeError(
                "fastscale.distributed: the optimizer's parameters changed after register_noise_scale_hook; "
                "register it once all param groups are added"
            )
        work.wait()  # NCCL: the current stream waits for the all-reduce; the host does not
        if backwards > 1:
            # Each synchronised backward adds the previous all-reduced gradient into the next
            # bucket, so the local norm is no longer that of a small-batch gradient.
            warnings.warn(
                "fastscale.distributed: several synchronised DDP backwards since the last step(); "
                "this step's noise-scale statistics are dropped (accumulate micro-batches under "
                "ddp_model.no_sync(); after a backward whose step you skip, call discard())",
                stacklevel=3,
            )
            return False
        # Mean over replicas of |G_r|², with G_r the true mean gradient (loss scale divided out).
        per_tensor = stats / (self.world_size * float(self.loss_scale) ** 2)
        try:
            optimizer.observe_small_batch_norms(
                per_tensor.sum(),
                small_batch_size=self.local_batch_size,
                big_batch_size=self.world_size * self.local_batch_size,
                loss_scale=self.loss_scale,
                grad_scaler=self.grad_scaler,
                per_tensor=per_tensor,
                big_per_tensor=big,
            )
        except RuntimeError as err:
            if "another source" not in str(err):
                raise
            raise RuntimeError(
                "fastscale.distributed: this step already has small-batch norms from another source "
                "(optimizer.accumulate_grad or observe_*); with the DDP hook registered, use the hook "
                "alone: accumulate micro-batches under ddp_model.no_sync() and set local_batch_size to "
                "the examples per replica per step"
            ) from err
        return True

    def discard(self) -> None:
        """Drop the statistics of backwards not followed by a step (e.g. a step you skip)."""
        if self._work is not None:
            self._work.wait()
        self._reduced, self._work, self._backwards, self._big = None, None, 0, None

    def _step_pre_hook(self, optimizer, args, kwargs):
        """Feed before the update; with ``step(closure)`` (Lightning, LBFGS-style loops) the
        closure runs the backward inside ``step()``, after this hook: then the closure is wrapped
        so the statistics are fed right after it returns, still before the update."""
        # ``args`` holds step()'s positional arguments after ``self``: (closure,) or ().
        closure = kwargs.get("closure") if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        if closure is None:
            self.feed(optimizer)
            return None  # unchanged arguments

        def closure_then_feed():
            loss = closure()
            self.feed(optimizer)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_feed}
        return (args[0], closure_then_feed, *args[2:]), kwargs

    def remove(self) -> None:
        """Stop feeding the optimizer automatically (DDP offers no way to remove a comm hook;
        the hook keeps measuring, and :meth:`feed` still works)."""
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None


def noise_scale_allreduce_hook(
    state: ReplicaNoiseScaleState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: DDP's averaging all-reduce, plus each replica's squared gradient
    norms taken from the bucket before it is reduced (see the module docstring)."""
    state._measure(bucket)
    fut = default_hooks.allreduce_hook(state.process_group, bucket)
    return fut.then(lambda f: state._measure_reduced(bucket, f))


def _config_row(optimizer, local_batch_size, loss_scale, ddp_params, param_index) -> list[float]:
    from .optimizer import FusedScaledSGD

    flags = 0
    if not isinstance(optimizer, FusedScaledSGD):
        flags |= _NOT_FUSED
    elif optimizer.noise_scale_config is None:
        flags |= _NO_NOISE_SCALE
    number = lambda x: isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)  # noqa: E731
    if not (number(local_batch_size) and local_batch_size > 0):
        flags |= _BAD_BATCH
    if not (number(loss_scale) and loss_scale > 0):
        flags |= _BAD_LOSS_SCALE
    stepped = [p for p in ddp_params if p in param_index]
    return [
        _CONFIG_MAGIC,
        float(flags),
        float(local_batch_size) if number(local_batch_size) else math.nan,
        float(loss_scale) if number(loss_scale) else math.nan,
        float(len(param_index)),
        float(len(stepped)),
        float(sum(p.numel() for p in stepped)),
    ]


_COLUMNS = ("flags", "local_batch_size", "loss_scale", "optimizer tensors", "DDP tensors stepped",
            "elements stepped")


_registrations = 0  # calls so far in this process: keys of one call never meet another's


def _await_every_rank(group, timeout: float) -> None:
    """Meet the other ranks in the process group's store before the first collective. A rank
    that never calls register_noise_scale_hook would otherwise leave the others inside a
    collective until the process group times out (30 min by default), with a message that
    does not say why; here they wait ``timeout`` seconds and name the missing ranks."""
    global _registrations
    _registrations += 1
    store = dist.distributed_c10d._get_default_store()
    prefix = f"fastscale/register_noise_scale_hook/{_registrations}/"
    ranks = dist.get_process_group_ranks(group)
    store.set(prefix + str(dist.get_rank()), "1")
    keys = [prefix + str(r) for r in ranks]
    try:
        store.wait(keys, datetime.timedelta(seconds=timeout))
    except RuntimeError:  # DistStoreError, on a timeout
        missing = [r for r, key in zip(ranks, keys) if not store.check([key])]
        raise RuntimeError(
            f"register_noise_scale_hook: rank(s) {missing} did not call register_noise_scale_hook within "
            f"{timeout:g} s; call it on every rank of the DDP model's process group, at the same point "
            "(before training), or raise timeout=") from None


def _check_config(table: list[list[float]]) -> None:
    """Raise the same ValueError on every rank when the gathered rows disagree or are invalid."""
    problems = []
    for rank, row in enumerate(table):
        if row[0] != _CONFIG_MAGIC:
            problems.append(f"rank {rank} is not calling register_noise_scale_hook here")
            continue
        flags = int(row[1])
        problems += [f"rank {rank}: {msg}" for bit, msg in _FLAG_MESSAGES.items() if flags & bit]
    if not problems:
        for col, name in enumerate(_COLUMNS[1:], start=2):
            values = [row[col] for row in table]
            if any(v != values[0] for v in values):
                problems.append(f"{name} differs across ranks: {values}")
        if table[0][5] == 0:
            problems.append("none of the DDP model's parameters is stepped by the optimizer")
    if problems:
        raise ValueError("register_noise_scale_hook: " + "; ".join(problems))


def register_noise_scale_hook(
    ddp_model: torch.nn.parallel.DistributedDataParallel,
    optimizer,
    local_batch_size: int,
    *,
    loss_scale: float = 1.0,
    grad_scaler=None,
    feed_automatically: bool = True,
    timeout: float = 300.0,
) -> ReplicaNoiseScaleState:
    """Estimate the gradient noise scale from DDP replicas, feeding ``optimizer`` every step.

    Call on every rank, after building the optimizer (a :class:`fastscale.FusedScaledSGD` with
    ``noise_scale=True``) and before training. It is a collective: it gathers each rank's
    configuration (local batch size, loss scale, parameters stepped) and raises the same
    ValueError on every rank when they disagree. Then it registers
    :func:`noise_scale_allreduce_hook` on ``ddp_model`` (DDP allows one comm hook per model) and,
    with ``feed_automatically``, an optimizer step pre-hook that calls
    :meth:`ReplicaNoiseScaleState.feed`.

    Args:
        local_batch_size: examples per replica per optimizer step (with k micro-batches
            accumulated under ``no_sync()``, k × micro-batch). Equal on every rank.
        loss_scale: ``.grad`` = loss_scale × the mean gradient over the examples (1 for a mean
            loss; see :class:`ReplicaNoiseScaleState`).
        grad_scaler: the ``torch.amp.GradScaler`` scaling the loss, so its scale is divided out.
        timeout: seconds each rank waits for every other rank to reach this call; then a
            RuntimeError names the ranks that did not (instead of a collective timing out).

    Returns the hook's :class:`ReplicaNoiseScaleState`.
    """
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"ddp_model must be a DistributedDataParallel, got {type(ddp_model).__name__}")
    if not (isinstance(timeout, numbers.Real) and not isinstance(timeout, bool) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    group = ddp_model.process_group
    _await_every_rank(group, float(timeout))
    tracker = getattr(optimizer, "statistics", None)
    param_index = tracker.index if tracker is not None else {}  # the tracker's positions
    ddp_params = [p for p in ddp_model.module.parameters() if p.requires_grad]
    row = _config_row(optimizer, local_batch_size, loss_scale, ddp_params, param_index)
    # NCCL gathers device tensors, gloo host tensors: use the model's device.
    device = ddp_params[0].device if ddp_params else torch.device("cpu")
    mine = torch.tensor(row, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)  # once, at registration: a sync is fine here
    _check_config([t.cpu().tolist() for t in gathered])

    state = ReplicaNoiseScaleState(optimizer, local_batch_size, loss_scale, grad_scaler, group, param_index)
    ddp_model.register_comm_hook(state, noise_scale_allreduce_hook)
    if feed_automatically:
        state._pre_hook = optimizer.register_step_pre_hook(state._step_pre_hook)
    return state
