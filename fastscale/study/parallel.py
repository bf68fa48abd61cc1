"""Independent training runs, in this process or in worker processes (``--jobs``).

Every run is seeded by its own arguments, so the results do not depend on how many workers ran
them or in which order they finished. Workers are started with ``spawn`` (a fork of a process
that has used torch's thread pools can deadlock), each with one torch thread, and build each task
once.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

_TASKS: dict = {}


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_jobs(device: str) -> int:
    """One worker per available CPU, at most 8 (each holds its own torch); 1 on a GPU."""
    return 1 if device.startswith("cuda") else max(1, min(available_cpus(), 8))


def _task(key: tuple):
    from .tasks import make_task

    if key not in _TASKS:
        _TASKS[key] = make_task(*key)
    return _TASKS[key]


def call(job: tuple):
    """Run one job ``(function name in train, (task, model, device), kwargs)``."""
    from . import adaptive, train

    name, key, kwargs = job
    return getattr(adaptive if name == "adaptive_run" else train, name)(_task(key), **kwargs)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    # The parent has already said it once (see cli.py); N workers would say it N more times.
    warnings.filterwarnings("ignore", message="fastscale: no compiled kernel")


class Runner:
    """``map(jobs)``: the jobs' results in order, run by ``jobs`` workers (1: in this process)."""

    def __init__(self, jobs: int = 1, threads: int = 1, progress=None):
        self.jobs, self.threads, self.progress = jobs, threads, progress
        self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _tick(self, label: str | None) -> None:
        if self.progress is not None:
            if self.progress.total is not None and self.progress.n >= self.progress.total:
                self.progress.total = self.progress.n + 1  # lr grids extended past the estimate
            if label:
                self.progress.set_postfix_str(label, refresh=False)
            self.progress.update(1)

    def map(self, jobs: list[tuple], labels: list[str] | None = None) -> list:
        labels = labels or [None] * len(jobs)
        if self.jobs <= 1 or len(jobs) <= 1:
            out = []
            for job, label in zip(jobs, labels):
                out.append(call(job))
                self._tick(label)
            return out
        if self._pool is None:
            import multiprocessing

            self._pool = ProcessPoolExecutor(max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(self.threads,))
        futures = {self._pool.submit(call, job): i for i, job in enumerate(jobs)}
        out = [None] * len(jobs)
        try:
            for fut in as_completed(futures):
                i = futures[fut]
                out[i] = fut.result()
                self._tick(labels[i])
        except BrokenProcessPool:
            from .tasks import StudyError

            self._pool = None
            raise StudyError("a worker process died (killed, out of memory, or the study was started from a script "
                             "without `if __name__ == \"__main__\":`); --jobs 1 trains in this process") from None
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
        return out
