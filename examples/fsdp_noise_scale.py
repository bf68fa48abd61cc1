"""Gradient noise scale under FSDP2 (fully_shard), on CPU with gloo.

    torchrun --nproc_per_node=2 examples/fsdp_noise_scale.py

Every parameter is a DTensor sharded over the ranks; FusedScaledSGD steps each rank's shards with
the fused kernel and sums the shards' squared gradient norms in one small all-reduce per step.
Two small-batch sources, switched with ``--source``:

* ``per_example`` (default): per-example gradient norms from each rank's activations (B_small =
  1); the big batch is the global one (FSDP2 averages the gradients over the ranks). The first
  micro-batches run under ``set_requires_gradient_sync(False)``: no reduce-scatter until the last.
* ``accumulate``: gradients synchronised after every micro-batch (FSDP2's default) and
  ``accumulate_grad()`` after each backward: B_small = the global micro-batch (ranks ×
  micro-batch), B_big = the global batch. Under ``set_requires_gradient_sync(False)`` the sharded
  gradients do not exist until the last micro-batch, so this source needs the sync.
"""

import argparse
import gc
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard

import fastscale

MICRO_BATCH, MICRO_BATCHES, STEPS, DIM = 16, 2, 200, 32
warnings.filterwarnings("ignore", message="fastscale: no compiled kernel")  # pure-torch fallback is fine here


def train(source: str, steps: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    local_batch = MICRO_BATCH * MICRO_BATCHES  # examples per rank per optimizer step

    torch.manual_seed(0)  # the same model and "true" weights on every rank
    teacher = torch.randn(DIM, 1)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)  # every parameter is now a DTensor, Shard(0) over the ranks
    opt = fastscale.FusedScaledSGD(
        model.parameters(), lr=0.01, momentum=0.9,
        batch_size=world * local_batch, base_batch_size=32,  # lr scaled linearly for the global batch
        noise_scale=True,
    )
    norms = fastscale.PerExampleGradNorms(model) if source == "per_example" else None

    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    for step in range(steps):
        opt.zero_grad()
        per_example = []
        for i in range(MICRO_BATCHES):
            x = torch.randn(MICRO_BATCH, DIM, generator=data)
            y = x @ teacher + 0.5 * torch.randn(MICRO_BATCH, 1, generator=data)
            if source == "per_example":  # reduce-scatter only after the last micro-batch
                model.set_requires_gradient_sync(i == MICRO_BATCHES - 1)
            (F.mse_loss(model(x), y) / MICRO_BATCHES).backward()
            if source == "per_example":
                per_example.append(norms.squared_norms() * MICRO_BATCHES**2)  # the 1/k of the loss divided out
            else:
                opt.accumulate_grad(loss_scale=1 / MICRO_BATCHES)
        if source == "per_example":
            opt.observe_per_example_norms(torch.cat(per_example))  # this rank's examples
        opt.step()  # the kernel on the local shards, then the one all-reduce of the statistics
        if (step + 1) % 50 == 0:
            stats = opt.gradient_stats()  # reading synchronises; nothing else does
            if rank == 0:
                print(f"step {step + 1}: |G|^2={stats['grad_sq_norm']:.4g} tr(Sigma)={stats['trace_cov']:.4g} "
                      f"B_simple={stats['b_simple']:.1f} (global batch {world * local_batch}, {source})")
    if norms is not None:
        norms.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", choices=("per_example", "accumulate"), default="per_example")
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    train(args.source, args.steps)
    gc.collect()  # free what holds the group before tearing it down (see ddp_noise_scale.py)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
