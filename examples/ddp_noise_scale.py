"""Gradient noise scale from DDP replicas, on CPU with gloo.

    torchrun --nproc_per_node=2 examples/ddp_noise_scale.py

Each replica's gradient before the all-reduce is a small-batch gradient (its local batch); the
averaged one is the big-batch gradient (the global batch). fastscale's DDP communication hook
measures the first while DDP reduces the buckets and feeds the optimizer at every step().
Micro-batches are accumulated under no_sync(), so the hook sees each replica's whole local batch.
"""

import gc
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import fastscale
from fastscale.distributed import register_noise_scale_hook

MICRO_BATCH, MICRO_BATCHES, STEPS, DIM = 16, 2, 200, 32
warnings.filterwarnings("ignore", message="fastscale: no compiled kernel")  # pure-torch fallback is fine here


def train() -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    local_batch = MICRO_BATCH * MICRO_BATCHES  # examples per replica per optimizer step

    torch.manual_seed(0)  # the same model and "true" weights on every rank
    teacher = torch.randn(DIM, 1)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(DIM, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)))
    opt = fastscale.FusedScaledSGD(
        model.parameters(), lr=0.01, momentum=0.9,
        batch_size=world * local_batch, base_batch_size=32,  # lr scaled linearly for the global batch
        noise_scale=True,
    )
    register_noise_scale_hook(model, opt, local_batch_size=local_batch)  # collective: every rank

    data = torch.Generator().manual_seed(1000 + rank)  # each replica its own data
    for step in range(STEPS):
        opt.zero_grad()
        for i in range(MICRO_BATCHES):
            x = torch.randn(MICRO_BATCH, DIM, generator=data)
            y = x @ teacher + 0.5 * torch.randn(MICRO_BATCH, 1, generator=data)
            sync = i == MICRO_BATCHES - 1  # all-reduce (and measure) only on the last micro-batch
            with model.no_sync() if not sync else torch.enable_grad():
                (F.mse_loss(model(x), y) / MICRO_BATCHES).backward()
        opt.step()  # feeds the replica statistics first, then steps
        if rank == 0 and (step + 1) % 50 == 0:
            stats = opt.gradient_stats()  # reading synchronises; nothing else does
            print(f"step {step + 1}: |G|^2={stats['grad_sq_norm']:.4g} tr(Sigma)={stats['trace_cov']:.4g} "
                  f"B_simple={stats['b_simple']:.1f} (global batch {world * local_batch})")


def main() -> None:
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    train()  # returns with the DDP model, its reducer and the hook's state (all holding the group) freed
    # Tear down together. Before, ~1 run in 12 aborted after all its output (rank 1: "terminate
    # called without an active exception", torchrun's ChildFailedError): destroy_process_group()
    # ran while main's locals (the DDP model and its reducer, the hook's state) still held the gloo
    # group, so its last reference went at interpreter exit with gloo's threads live, and the rank
    # that finished first (rank 1; rank 0 prints) tore down under its peer. A barrier alone did not
    # help (2 aborts in 24 runs, as without it); freeing the holders first, then the barrier, then
    # destroy_process_group(): 0 in 24.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
