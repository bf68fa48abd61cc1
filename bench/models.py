"""Synthetic parameter sets for the benchmarks: a total size spread over a tensor count.

Sizes vary around the mean (deterministically) so tensors have odd lengths and vector tails,
as real layers do. Gradients are fresh random values, never zeros.
"""

import torch

SIZES = {  # name: (total parameters, tensors)
    "1M-100": (1_000_000, 100),
    "25M-200": (25_000_000, 200),
    "100M-200": (100_000_000, 200),
}
ROUNDS = {"1M-100": 200, "25M-200": 20, "100M-200": 7}
BYTES_PER_ELEMENT = 20  # fp32 SGD with momentum: read grad, param, buffer; write param, buffer


def tensor_sizes(total: int, count: int) -> list[int]:
    gen = torch.Generator().manual_seed(count)
    weights = torch.rand(count, generator=gen) + 0.5
    sizes = (weights / weights.sum() * total).long()
    sizes[-1] += total - sizes.sum()
    return sizes.tolist()


def make_params(name: str, device="cpu", dtype=torch.float32) -> list[torch.Tensor]:
    total, count = SIZES[name]
    params = []
    for n in tensor_sizes(total, count):
        p = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
        p.grad = torch.randn_like(p)
        params.append(p)
    return params
