"""GPU benchmark: fastscale's fused step against torch's fused SGD + _foreach_norm + scheduler.

NOT YET RUN. Written on a machine without a GPU; no numbers exist yet. Run it on a GPU with

    python bench/bench_cuda.py [--configs 1M/100,25M/200,100M/200,1B/400] [--out bench/results/x.md]

Per configuration (total parameters / number of tensors, fp32, momentum 0.9, weight decay):
  torch      torch.optim.SGD(fused=True).step() + torch._foreach_norm(grads) + LinearLR.step()
  fastscale  torch.ops.fastscale.fused_sgd_ (norms come back from the same pass, lr a 0-dim
             device tensor updated on the device: the warmup factor the optimizer would apply)
  copy       dst.copy_(src) of 1 GiB: the measured device-to-device bandwidth (read + write)
Effective bandwidth of a step = 20 bytes per element (read g, p, b; write p, b) / median time.
Timing: CUDA events around each step on the current stream, warm-up steps first, the median of
the timed steps; inputs rotate over enough copies to exceed L2 so nothing is served warm from it.
Without CUDA it prints a line and exits 0; under pytest the smoke test skips.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

DEFAULT_CONFIGS = "1M/100,25M/200,100M/200,1B/400"
BYTES_PER_ELEMENT_STEP = 20  # fp32: read g, p, b; write p, b


def parse_configs(text: str) -> list[tuple[int, int]]:
    units = {"K": 10**3, "M": 10**6, "B": 10**9}
    out = []
    for item in text.split(","):
        total, count = item.strip().split("/")
        scale = units.get(total[-1].upper(), 1)
        out.append((int(float(total.rstrip("KMBkmb")) * scale), int(count)))
    return out


def tensor_sizes(total: int, count: int) -> list[int]:
    """Sizes summing to `total`, varied like a network's layers (and deterministic)."""
    weights = [1.0 + 0.5 * math.sin(i) for i in range(count)]
    scale = total / sum(weights)
    sizes = [max(1, int(w * scale)) for w in weights]
    sizes[-1] += total - sum(sizes)
    return sizes


def make_set(sizes, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.randn(n, generator=gen, device=device) for n in sizes]
    grads = [torch.randn(n, generator=gen, device=device) * 1e-3 for n in sizes]
    bufs = [torch.randn(n, generator=gen, device=device) * 1e-3 for n in sizes]
    return params, grads, bufs


def time_steps(step, rotations: int, warmup: int, iters: int) -> float:
    """Median milliseconds of step(i % rotations), each timed with its own pair of CUDA events."""
    for i in range(warmup):
        step(i % rotations)
    torch.cuda.synchronize()
    pairs = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(i % rotations)
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs)


def copy_bandwidth_gbs(warmup: int, iters: int, nbytes: int = 2**30) -> float:
    """Device-to-device copy: bytes read + bytes written per second, far larger than L2."""
    src = torch.empty(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = time_steps(lambda i: dst.copy_(src), 1, warmup, iters)
    return 2 * nbytes / ms / 1e6


def run_config(total: int, count: int, warmup: int, iters: int, copy_gbs: float) -> dict:
    device = torch.device("cuda")
    sizes = tensor_sizes(total, count)
    set_bytes = 3 * 4 * total
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    free, _ = torch.cuda.mem_get_info()
    rotations = max(1, min(8, math.ceil(4 * l2 / set_bytes), int(0.4 * free // set_bytes)))
    sets = [make_set(sizes, device, seed) for seed in range(rotations)]

    # torch: fused SGD (float lr, as most users run it) + norms + a warmup scheduler.
    torch_opts = []
    for params, grads, _ in sets:
        for p, g in zip(params, grads):
            p.grad = g
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=10**9)
        torch_opts.append((opt, sched, grads))

    def torch_step(i):
        opt, sched, grads = torch_opts[i]
        opt.step()
        torch._foreach_norm(grads)
        sched.step()

    # fastscale: the op itself; lr is a device tensor, the warmup factor applied on the device.
    import fastscale  # noqa: F401  (registers the ops and loads the kernels)

    base_lr = torch.tensor(0.1, device=device)
    step_count = torch.zeros((), device=device)
    lr = torch.empty((), device=device)
    buffers_ready = [False] * rotations

    def fastscale_step(i):
        params, grads, bufs = sets[i]
        step_count.add_(1)
        torch.mul(base_lr, torch.clamp(step_count * 1e-9 + 0.1, max=1.0), out=lr)
        torch.ops.fastscale.fused_sgd_(
            params, grads, bufs, lr=lr, weight_decay=1e-4, momentum=0.9, dampening=0.0,
            nesterov=False, maximize=False, is_first_step=not buffers_ready[i],
        )
        buffers_ready[i] = True

    torch_ms = time_steps(torch_step, rotations, warmup, iters)
    fastscale_ms = time_steps(fastscale_step, rotations, warmup, iters)
    step_bytes = BYTES_PER_ELEMENT_STEP * total
    del sets, torch_opts
    torch.cuda.empty_cache()
    return dict(
        total=total, count=count, rotations=rotations,
        torch_ms=torch_ms, fastscale_ms=fastscale_ms,
        ratio=fastscale_ms / torch_ms,
        fastscale_gbs=step_bytes / fastscale_ms / 1e6,
        torch_gbs=step_bytes / torch_ms / 1e6,
        copy_gbs=copy_gbs,
    )


def table(rows: list[dict]) -> str:
    props = torch.cuda.get_device_properties(0)
    lines = [
        f"device: {props.name}; torch {torch.__version__}; CUDA {torch.version.cuda}",
        "",
        "| params / tensors | torch ms | fastscale ms | fastscale/torch | fastscale GB/s | torch GB/s | copy GB/s | fastscale % of copy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['total']:,} / {r['count']} | {r['torch_ms']:.3f} | {r['fastscale_ms']:.3f} | "
            f"{r['ratio']:.2f} | {r['fastscale_gbs']:.0f} | {r['torch_gbs']:.0f} | {r['copy_gbs']:.0f} | "
            f"{100 * r['fastscale_gbs'] / r['copy_gbs']:.0f}% |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="fastscale CUDA step benchmark (not yet run)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", help="also write the table to this file (e.g. bench/results/h100.md)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device; nothing to benchmark")
        return 0
    copy_gbs = copy_bandwidth_gbs(args.warmup, args.iters)
    rows = [run_config(total, count, args.warmup, args.iters, copy_gbs)
            for total, count in parse_configs(args.configs)]
    text = table(rows)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


def bench_cuda_smoke():
    """Under pytest (bench_* functions are collected): the smallest configuration, a few steps."""
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    row = run_config(1_000_000, 100, warmup=2, iters=5, copy_gbs=copy_bandwidth_gbs(1, 3, 2**26))
    assert row["fastscale_ms"] > 0 and row["torch_ms"] > 0


if __name__ == "__main__":
    sys.exit(main())
