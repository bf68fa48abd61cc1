"""Batch-size schedules: the batch grows during training and the learning rate follows.

The noise scale B_noise grows as training goes on (McCandlish et al. 2018, §4), so a batch
that is efficient late wastes examples early. Growing the batch with it cut optimizer steps by
~43% at no loss in quality (Merrill et al. 2025); GPT-3 and Megatron ramp the batch by hand.
A schedule here owns the *global* batch size (all data-parallel ranks together) and, after
each optimizer step (:meth:`BatchSizeSchedule.step`), decides the next one:

- :class:`AdaptiveBatchSize`: B = clamp(c·B_simple, B_min, B_max), rounded down to a multiple
  of micro-batch × world size, from the optimizer's live estimate. It reads the estimate only
  every ``check_every`` steps (the one host-device sync it adds), grows only when the lower end
  of the estimate's interval clears the current batch by the hysteresis margin, and never
  shrinks, so it cannot oscillate.
- :class:`LinearRampBatchSize`: GPT-3 style, linear in examples (or tokens) seen.
- :class:`StepBatchSize`: Megatron ``--step-batch-size-schedule`` style, piecewise constant.

The learning rate is coupled through the optimizer's own rule: every change calls
``optimizer.set_batch_size(B)`` (linear, sqrt or noise scaling, see :mod:`fastscale.scaling`),
optionally with a short re-warmup from the old rate to the new one. A torch lr scheduler
composes with it unchanged (it edits ``group["lr"]``, the rule multiplies it); handed to the
schedule it can keep its position in examples rather than steps.

Two ways to realise the batch size: the number of gradient-accumulation micro-batches per step
(:attr:`BatchSizeSchedule.accumulation_steps`), or :class:`BatchSizeSampler`, a DataLoader batch
sampler whose batch follows the schedule. Both split the global batch as world × local; every
rank takes the same decisions from the same all-reduced statistic.

Each schedule checkpoints like a torch ``LRScheduler``: :meth:`~BatchSizeSchedule.state_dict` /
:meth:`~BatchSizeSchedule.load_state_dict`; with the optimizer's and the sampler's, a run resumed
mid-ramp continues bit for bit.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["AdaptiveBatchSize", "BatchSizeSampler", "BatchSizeSchedule", "LinearRampBatchSize", "StepBatchSize"]

UNITS = ("examples", "tokens")
SCHEDULER_UNITS = ("steps", "examples")


# ----------------------------------------------------------------- argument checks
def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_real(name: str, value, *, minimum: float, strict: bool, maximum: float = math.inf) -> float:
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
    if maximum < math.inf:
        bound += f" and <= {maximum:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number {bound}, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < minimum or (strict and value == minimum) or value > maximum:
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return value


def _check_multiple(name: str, value: int, multiple: int, why: str) -> None:
    if value % multiple:
        raise ValueError(
            f"{name}={value} is not a multiple of {multiple} ({why}); allowed: {multiple}, {2 * multiple}, "
            f"{3 * multiple}, …"
        )


def _world_size(world_size, process_group) -> int:
    if world_size is not None:
        return _check_int("world_size", world_size)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(process_group)
    return 1


def _check_optimizer(optimizer) -> None:
    if not (hasattr(optimizer, "set_batch_size") and hasattr(optimizer, "param_groups")):
        raise TypeError(f"optimizer must be a fastscale.FusedScaledSGD (with set_batch_size), "
                        f"got {type(optimizer).__name__}")


def _multiple_of(kwargs: dict) -> tuple[int, str]:
    """What every batch size must be a multiple of, from a schedule's keyword arguments (read
    before the base constructor runs, so a subclass checks its bounds first)."""
    world = _world_size(kwargs.get("world_size"), kwargs.get("process_group"))
    micro = _check_int("micro_batch_size", kwargs.get("micro_batch_size", 1))
    return micro * world, f"micro_batch_size {micro} × world_size {world}"


def _rule_scale(rule: str, ratio: float) -> float:
    """The lr ratio the optimizer's rule applies for a batch ratio, as known on the host. For
    "noise" (on the device) the linear ratio: the noise rule's ratio lies between it and 1, so
    a re-warmup that starts there starts at or below the old rate."""
    if rule == "none":
        return 1.0
    if rule == "sqrt":
        return math.sqrt(ratio)
    return ratio


class BatchSizeSchedule:
    """The global batch size of each optimizer step, applied to the optimizer's lr rule.

    Call :meth:`step` once after each ``optimizer.step()``: it counts the step and the
    ``batch_size`` examples it took, then sets the next batch size (and, if it changed,
    ``optimizer.set_batch_size``). Subclasses say which batch size comes next
    (:meth:`next_batch_size`).

    Args:
        optimizer: a :class:`fastscale.FusedScaledSGD` (anything with ``set_batch_size`` and
            ``param_groups``). Its ``base_batch_size`` is the batch its lr was tuned for; the
            rule scales the lr by the ratio to it.
        micro_batch_size: examples per rank per forward/backward; batch sizes must be multiples
            of micro_batch_size × world_size (default 1: any multiple of the world size).
        world_size: data-parallel ranks (default: ``torch.distributed``'s, else 1).
        process_group: the data-parallel group (for the world size and the adaptive all-reduce).
        rewarmup_steps: after each increase, ramp the applied lr from the old rate to the new one
            over this many steps (0: jump). Applied by multiplying ``group["lr"]`` inside
            ``optimizer.step()`` only (a step pre-hook sets it, a post-hook restores it), so lr
            schedulers never see it; :attr:`lr_factor` is the factor of the next step.
        lr_scheduler: optionally a torch lr scheduler for the schedule to advance: once per step
            (``scheduler_unit="steps"``) or once per ``scheduler_batch_size`` examples
            (``"examples"``: a scheduler written for N steps at the base batch keeps its place in
            the data when the batch grows). Without one, step your scheduler yourself (in steps).
        scheduler_unit: ``"steps"`` or ``"examples"``.
        scheduler_batch_size: examples per scheduler step for ``"examples"`` (default: the
            optimizer's ``base_batch_size``).
        noise_hook_state: the :class:`fastscale.distributed.ReplicaNoiseScaleState` of a
            registered DDP noise-scale hook: its ``local_batch_size`` follows the schedule.
    """

    def __init__(self, optimizer, initial_batch_size: int, *, micro_batch_size: int = 1, world_size=None,
                 process_group=None, rewarmup_steps: int = 0, lr_scheduler=None, scheduler_unit: str = "steps",
                 scheduler_batch_size=None, noise_hook_state=None):
        # --- validate everything, then commit (a constructor that raises changed nothing)
        _check_optimizer(optimizer)
        self.micro_batch_size = _check_int("micro_batch_size", micro_batch_size)
        self.world_size = _world_size(world_size, process_group)
        self.multiple = self.micro_batch_size * self.world_size
        self._why = f"micro_batch_size {self.micro_batch_size} × world_size {self.world_size}"
        initial = _check_int("initial batch size", initial_batch_size)
        self.rewarmup_steps = _check_int("rewarmup_steps", rewarmup_steps, minimum=0)
        if scheduler_unit not in SCHEDULER_UNITS:
            raise ValueError(f"scheduler_unit must be one of {SCHEDULER_UNITS}, got {scheduler_unit!r}")
        if lr_scheduler is not None and not (hasattr(lr_scheduler, "step") and hasattr(lr_scheduler, "state_dict")):
            raise TypeError(f"lr_scheduler must be a torch lr scheduler or None, got {type(lr_scheduler).__name__}")
        if lr_scheduler is not None and getattr(lr_scheduler, "optimizer", optimizer) is not optimizer:
            raise ValueError("lr_scheduler must schedule this optimizer")
        if scheduler_batch_size is None:
            scheduler_batch_size = optimizer.param_groups[0].get("base_batch_size") or initial
        scheduler_batch_size = _check_int("scheduler_batch_size", scheduler_batch_size)
        if noise_hook_state is not None and not hasattr(noise_hook_state, "local_batch_size"):
            raise TypeError("noise_hook_state must be the ReplicaNoiseScaleState of register_noise_scale_hook, "
                            f"got {type(noise_hook_state).__name__}")
        self._check_batch("initial batch size", initial)
        # --- commit
        self.optimizer = optimizer
        self.process_group = process_group
        self.lr_scheduler = lr_scheduler
        self.scheduler_unit = scheduler_unit
        self.scheduler_batch_size = scheduler_batch_size
        self.noise_hook_state = noise_hook_state
        self.batch_size = initial
        self.steps = 0  # optimizer steps taken under this schedule
        self.examples = 0  # examples those steps took (global)
        self.scheduler_steps = 0  # lr scheduler steps taken (scheduler_unit="examples")
        self.history: list[tuple[int, int]] = [(0, initial)]  # (step, batch size from that step on)
        self._warm_from: list[float] | None = None  # per group: the lr factor a re-warmup starts at
        self._warm_start = 0  # step at which the current re-warmup started
        self._saved_lrs: list | None = None
        self._hooks = []
        if self.rewarmup_steps:
            self._hooks = [optimizer.register_step_pre_hook(self._before_step),
                           optimizer.register_step_post_hook(self._after_step)]
        self._apply()

    # ----------------------------------------------------------------- checks
    def _check_batch(self, name: str, value: int) -> None:
        _check_multiple(name, value, self.multiple, self._why)

    # ----------------------------------------------------------------- what the loop reads
    @property
    def local_batch_size(self) -> int:
        """Examples each rank takes this step: batch_size / world_size."""
        return self.batch_size // self.world_size

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches each rank accumulates this step: batch_size / (micro_batch_size × world)."""
        return self.batch_size // self.multiple

    @property
    def lr_factor(self) -> float:
        """Re-warmup factor of group 0's lr at the next step (1 outside a re-warmup)."""
        return self._factors()[0]

    def _factors(self) -> list[float]:
        n = len(self.optimizer.param_groups)
        if self._warm_from is None:
            return [1.0] * n
        t = min((self.steps - self._warm_start) / self.rewarmup_steps, 1.0)
        return [s + (1.0 - s) * t for s in self._warm_from]

    # ----------------------------------------------------------------- the loop
    def step(self) -> int:
        """Count the optimizer step just taken (``batch_size`` examples), advance the lr scheduler
        if the schedule owns one, and set the next step's batch size; returns it."""
        self.steps += 1
        self.examples += self.batch_size
        if self.lr_scheduler is not None:
            if self.scheduler_unit == "steps":
                self.lr_scheduler.step()
            else:
                due = self.examples // self.scheduler_batch_size
                while self.scheduler_steps < due:
                    self.lr_scheduler.step()
                    self.scheduler_steps += 1
        new = self.next_batch_size()
        self._check_batch("the next batch size", new)
        if new != self.batch_size:
            self._change(new)
        if self._warm_from is not None and self.steps - self._warm_start >= self.rewarmup_steps:
            self._warm_from = None
        return self.batch_size

    def next_batch_size(self) -> int:
        """The batch size of the next step (called by :meth:`step` after counting the last one)."""
        return self.batch_size

    def _change(self, new: int) -> None:
        old = self.batch_size
        if self.rewarmup_steps and new > old:
            now = self._factors()
            self._warm_from = [f * _rule_scale(g["scaling"], old / new)
                               for f, g in zip(now, self.optimizer.param_groups)]
            self._warm_start = self.steps
        self.batch_size = new
        self.history.append((self.steps, new))
        self._apply()

    def _apply(self) -> None:
        self.optimizer.set_batch_size(self.batch_size)
        if self.noise_hook_state is not None:
            self.noise_hook_state.local_batch_size = self.local_batch_size

    # ----------------------------------------------------------------- re-warmup, inside step() only
    def _before_step(self, optimizer, args, kwargs):
        if self._warm_from is None:
            return
        self._saved_lrs = [g["lr"] for g in optimizer.param_groups]
        for g, f in zip(optimizer.param_groups, self._factors()):
            g["lr"] = g["lr"] * f

    def _after_step(self, optimizer, args, kwargs):
        if self._saved_lrs is not None:
            for g, lr in zip(optimizer.param_groups, self._saved_lrs):
                g["lr"] = lr
            self._saved_lrs = None

    def remove(self) -> None:
        """Unregister the re-warmup hooks (the optimizer keeps its last batch size)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ----------------------------------------------------------------- checkpoints
    _STATE = ("batch_size", "steps", "examples", "scheduler_steps", "history", "_warm_from", "_warm_start")

    def state_dict(self) -> dict:
        """Everything the next decisions depend on (and the owned lr scheduler's state)."""
        sd = {k: getattr(self, k) for k in self._STATE}
        sd["history"] = [list(h) for h in self.history]
        sd["_warm_from"] = None if self._warm_from is None else list(self._warm_from)
        sd["multiple"] = self.multiple
        sd.update(self._extra_state())
        if self.lr_scheduler is not None:
            sd["lr_scheduler"] = self.lr_scheduler.state_dict()
        return sd

    def _extra_state(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` (checked whole first: a bad one raises, changing nothing).
        Load the optimizer's state dict too: it holds the estimate and the groups' batch size."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict from state_dict(), got {type(state_dict).__name__}")
        missing = [k for k in (*self._STATE, "multiple") if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict is missing {missing} (not from a {type(self).__name__}.state_dict())")
        if state_dict["multiple"] != self.multiple:
            raise ValueError(f"state_dict was saved with batch sizes in multiples of {state_dict['multiple']}, this "
                             f"schedule's are multiples of {self.multiple} ({self._why})")
        b = _check_int("state_dict['batch_size']", state_dict["batch_size"])
        self._check_batch("state_dict['batch_size']", b)
        if (self.lr_scheduler is None) != ("lr_scheduler" not in state_dict):
            raise ValueError("state_dict and this schedule disagree on owning an lr_scheduler")
        self._check_extra_state(state_dict)
        # --- commit
        for k in self._STATE:
            setattr(self, k, state_dict[k])
        self.history = [tuple(h) for h in state_dict["history"]]
        self._warm_from = None if state_dict["_warm_from"] is None else list(state_dict["_warm_from"])
        self._load_extra_state(state_dict)
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(state_dict["lr_scheduler"])
        self._apply()

    def _check_extra_state(self, state_dict: dict) -> None:
        pass

    def _load_extra_state(self, state_dict: dict) -> None:
        pass


# ----------------------------------------------------------------- adaptive
class AdaptiveBatchSize(BatchSizeSchedule):
    """The batch size follows the live noise-scale estimate: B = clamp(c·B_simple, B_min, B_max),
    rounded down to a multiple of micro_batch_size × world_size.

    Starts at ``min_batch_size``. Every ``check_every`` steps it reads the estimate (the one
    host-device sync it adds: a few scalars, plus under data parallelism one all-reduce of three
    numbers, so every rank decides from the same figures) and grows the batch when

    - the estimate is ``ready`` (warmed up, its interval above zero), and
    - c × the lower end of its interval (``b_simple_low``) ≥ (1 + ``hysteresis``) × B:
      the whole interval says a batch that much larger is still below c·B_simple.

    It then grows to c·B_simple, at most ``max_growth`` × B and at most ``max_batch_size``,
    rounded down to the multiple. It never shrinks: the noise scale grows during training
    (McCandlish et al. 2018), and a falling estimate is more often its noise or the lag of its
    average than a real fall, so monotone growth is the guard against oscillation.

    Args (beyond :class:`BatchSizeSchedule`'s):
        min_batch_size, max_batch_size: global bounds, multiples of micro_batch_size × world.
        factor: c, the batch as a multiple of B_simple (> 0). The study measured the critical
            batch size at 2–7× B_simple on its tasks (docs/study.md); 1 is cautious.
        check_every: steps between reads of the estimate (>= 1).
        hysteresis: relative margin (>= 0) the interval's lower end must clear.
        max_growth: largest factor (> 1) of one increase.
        statistics: callable returning a dict with ``b_simple``, ``b_simple_low``, ``ready``
            (default ``optimizer.gradient_stats``): another estimator, or synthetic figures.
    """

    def __init__(self, optimizer, min_batch_size: int, max_batch_size: int, *, factor: float = 1.0,
                 check_every: int = 50, hysteresis: float = 0.25, max_growth: float = 2.0, statistics=None,
                 **kwargs):
        _check_optimizer(optimizer)
        min_b = _check_int("min_batch_size", min_batch_size)
        max_b = _check_int("max_batch_size", max_batch_size)
        if min_b > max_b:
            raise ValueError(f"min_batch_size ({min_b}) must be <= max_batch_size ({max_b})")
        self.factor = _check_real("factor", factor, minimum=0.0, strict=True)
        self.check_every = _check_int("check_every", check_every)
        self.hysteresis = _check_real("hysteresis", hysteresis, minimum=0.0, strict=False)
        self.max_growth = _check_real("max_growth", max_growth, minimum=1.0, strict=True)
        if statistics is None:
            if getattr(optimizer, "noise_scale_config", None) is None:
                raise ValueError("AdaptiveBatchSize needs the optimizer built with noise_scale=True (the live "
                                 "B_simple estimate), or statistics= a callable returning one")
            statistics = optimizer.gradient_stats
        elif not callable(statistics):
            raise TypeError(f"statistics must be a callable returning a dict, got {type(statistics).__name__}")
        multiple, why = _multiple_of(kwargs)
        _check_multiple("min_batch_size", min_b, multiple, why)
        _check_multiple("max_batch_size", max_b, multiple, why)
        self.min_batch_size, self.max_batch_size = min_b, max_b
        self.statistics = statistics
        self.last_check: dict | None = None  # the figures of the last check (host numbers)
        super().__init__(optimizer, min_b, **kwargs)

    def next_batch_size(self) -> int:
        if self.steps % self.check_every:
            return self.batch_size
        estimate, low, ready = self._read()
        self.last_check = {"step": self.steps, "b_simple": estimate, "b_simple_low": low, "ready": ready}
        return self.decide(estimate, low, ready)

    def _read(self) -> tuple[float, float, bool]:
        """(B_simple, its interval's lower end, ready) — all-reduced over the data-parallel group."""
        stats = self.statistics()
        estimate, low = stats.get("b_simple", math.nan), stats.get("b_simple_low", math.nan)
        ready = bool(stats.get("ready", False)) and math.isfinite(estimate) and math.isfinite(low)
        import torch.distributed as dist

        if self.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return estimate, low, ready

        # One all-reduce of (ready, B_simple, low): every rank then decides from the same numbers.
        device = self.optimizer.param_groups[0]["params"][0].device
        if dist.get_backend(self.process_group) != "nccl":
            device = torch.device("cpu")
        vec = torch.tensor([float(ready), estimate if ready else 0.0, low if ready else 0.0],
                           dtype=torch.float64, device=device)
        dist.all_reduce(vec, group=self.process_group)
        n, total, lows = vec.tolist()
        ready = n == self.world_size  # every rank's estimate is ready
        return total / self.world_size, lows / self.world_size, ready

    def decide(self, estimate: float, low: float, ready: bool) -> int:
        """The next batch size from the figures of one check (a pure function of them and B)."""
        b = self.batch_size
        if not ready or not (math.isfinite(estimate) and math.isfinite(low)) or low <= 0:
            return b
        if self.factor * low < (1.0 + self.hysteresis) * b:
            return b
        target = min(self.factor * estimate, self.max_growth * b, self.max_batch_size)
        new = int(target // self.multiple) * self.multiple
        return max(min(new, self.max_batch_size), b)

    def _extra_state(self) -> dict:
        return {"last_check": None if self.last_check is None else dict(self.last_check)}

    def _load_extra_state(self, state_dict: dict) -> None:
        self.last_check = state_dict.get("last_check")


# ----------------------------------------------------------------- fixed ramps
class _FixedSchedule(BatchSizeSchedule):
    """A batch size fixed by the position in the data (examples, or tokens = examples × tokens_per_example)."""

    def __init__(self, optimizer, initial: int, unit: str, tokens_per_example, **kwargs):
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        if unit == "tokens":
            if tokens_per_example is None:
                raise ValueError('unit="tokens" needs tokens_per_example= (e.g. the sequence length)')
            tokens_per_example = _check_int("tokens_per_example", tokens_per_example)
        elif tokens_per_example is not None:
            raise ValueError('tokens_per_example is only used with unit="tokens"')
        self.unit, self.tokens_per_example = unit, tokens_per_example
        super().__init__(optimizer, initial, **kwargs)

    def position(self, examples: int | None = None) -> int:
        """Where in the data the next step starts, in the schedule's unit."""
        e = self.examples if examples is None else examples
        return e * self.tokens_per_example if self.unit == "tokens" else e

    def next_batch_size(self) -> int:
        return self.batch_size_at(self.position())


class LinearRampBatchSize(_FixedSchedule):
    """GPT-3 style: from ``start`` to ``end`` linearly over the first ``ramp`` examples (or tokens),
    rounded down to the multiple (so it rises in steps of micro_batch_size × world), then ``end``.
    """

    def __init__(self, optimizer, start: int, end: int, ramp: int, *, unit: str = "examples",
                 tokens_per_example=None, **kwargs):
        start = _check_int("start", start)
        end = _check_int("end", end)
        if end < start:
            raise ValueError(f"end ({end}) must be >= start ({start}): a ramp grows the batch")
        self.start, self.end = start, end
        self.ramp = _check_int("ramp", ramp)
        multiple, why = _multiple_of(kwargs)
        _check_multiple("start", start, multiple, why)
        _check_multiple("end", end, multiple, why)
        super().__init__(optimizer, start, unit, tokens_per_example, **kwargs)

    def batch_size_at(self, position: int) -> int:
        frac = min(position / self.ramp, 1.0)
        b = self.start + (self.end - self.start) * frac
        return max(self.start, int(b // self.multiple) * self.multiple)


class StepBatchSize(_FixedSchedule):
    """Megatron ``--step-batch-size-schedule`` style: ``milestones`` = [(position, batch size), …],
    positions in examples (or tokens) strictly increasing from 0; the batch size of a step is that
    of the last milestone at or before the position where the step starts."""

    def __init__(self, optimizer, milestones, *, unit: str = "examples", tokens_per_example=None, **kwargs):
        if not isinstance(milestones, (list, tuple)) or not milestones:
            raise TypeError(f"milestones must be a non-empty list of (position, batch_size) pairs, got {milestones!r}")
        parsed = []
        for i, m in enumerate(milestones):
            if not isinstance(m, (list, tuple)) or len(m) != 2:
                raise TypeError(f"milestones[{i}] must be a (position, batch_size) pair, got {m!r}")
            parsed.append((_check_int(f"milestones[{i}] position", m[0], minimum=0),
                           _check_int(f"milestones[{i}] batch_size", m[1])))
        if parsed[0][0] != 0:
            raise ValueError(f"milestones must start at position 0 (the first batch size), got {parsed[0][0]}")
        for i in range(1, len(parsed)):
            if parsed[i][0] <= parsed[i - 1][0]:
                raise ValueError(f"milestone positions must be strictly increasing: milestones[{i}] is at "
                                 f"{parsed[i][0]}, after {parsed[i - 1][0]}")
        multiple, why = _multiple_of(kwargs)
        for i, (_, b) in enumerate(parsed):
            _check_multiple(f"milestones[{i}] batch_size", b, multiple, why)
        self.milestones = parsed
        super().__init__(optimizer, parsed[0][1], unit, tokens_per_example, **kwargs)

    def batch_size_at(self, position: int) -> int:
        b = self.milestones[0][1]
        for at, size in self.milestones:
            if at <= position:
                b = size
        return b


# ----------------------------------------------------------------- the sampler realisation
class BatchSizeSampler(torch.utils.data.Sampler):
    """A DataLoader ``batch_sampler`` whose batch follows a schedule: each batch it yields holds
    ``schedule.local_batch_size`` indices, read when the batch is drawn.

    Every rank draws the same permutation (``seed`` + epoch, as ``DistributedSampler``) and the
    same global batch of ``schedule.batch_size`` indices from it, and keeps its own slice
    (rank r: the r-th of world_size equal parts), so the ranks' batches never overlap and their
    sizes always agree. A final global batch short of ``batch_size`` is dropped
    (``drop_last=True``) or filled by wrapping round to the epoch's first indices.

    Call ``schedule.step()`` after each optimizer step and before the next batch is drawn. With
    ``num_workers=0`` that is how a DataLoader draws; with workers it prefetches
    ``prefetch_factor × num_workers`` batches, which keep the size they were drawn at.
    ``state_dict()`` holds the epoch and the position in it (of the batches yielded), for resuming.
    """

    def __init__(self, dataset_size: int, schedule: BatchSizeSchedule, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, rank=None):
        self.dataset_size = _check_int("dataset_size", dataset_size)
        if not isinstance(schedule, BatchSizeSchedule):
            raise TypeError(f"schedule must be a fastscale BatchSizeSchedule, got {type(schedule).__name__}")
        for name, value in (("shuffle", shuffle), ("drop_last", drop_last)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        self.seed = _check_int("seed", seed, minimum=0)
        if rank is None:
            import torch.distributed as dist

            rank = dist.get_rank(schedule.process_group) if dist.is_available() and dist.is_initialized() else 0
        rank = _check_int("rank", rank, minimum=0)
        if rank >= schedule.world_size:
            raise ValueError(f"rank must be in [0, {schedule.world_size}), got {rank}")
        self.schedule, self.shuffle, self.drop_last, self.rank = schedule, shuffle, drop_last, rank
        self.epoch = 0
        self.offset = 0  # indices of this epoch's permutation already handed out (globally)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _check_int("epoch", epoch, minimum=0)
        self.offset = 0

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_size)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.dataset_size, generator=g)

    def __iter__(self):
        order = self._order()
        n = self.dataset_size
        while self.offset < n:
            b, local = self.schedule.batch_size, self.schedule.local_batch_size
            if self.offset + b > n:
                if self.drop_last:
                    break
                idx = torch.cat([order[self.offset:], order.repeat(b // n + 1)])[:b]
            else:
                idx = order[self.offset:self.offset + b]
            self.offset += b
            yield idx[self.rank * local:(self.rank + 1) * local].tolist()
        # The epoch is over: the next iteration starts the next one (as set_epoch would).
        self.epoch += 1
        self.offset = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or any(k not in state_dict for k in ("epoch", "offset", "seed")):
            raise ValueError("state_dict must be a dict from BatchSizeSampler.state_dict()")
        if state_dict["seed"] != self.seed:
            raise ValueError(f"state_dict was saved with seed {state_dict['seed']}, this sampler's is {self.seed}")
        self.epoch = _check_int("state_dict['epoch']", state_dict["epoch"], minimum=0)
        self.offset = _check_int("state_dict['offset']", state_dict["offset"], minimum=0)
