import pytest
import torch

import fastscale

# Each test runs the optimizer on both implementations where it matters: "torch" (pure-torch
# twins) and "auto" (the compiled kernel where one is built for the device, else pure torch).
IMPLS = ["torch", "auto"]


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def native_cpu() -> bool:
    return "cpu" in fastscale._extension.native_device_types()


def make_params(dtype=torch.float32, device="cpu", shapes=((7, 5), (5,), (3, 4, 2), (), (0,), (1,))):
    """Fresh random parameters of mixed shapes, including 0-dim and empty."""
    return [torch.randn(s, dtype=dtype, device=device, requires_grad=True) for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_(True) for p in params]
