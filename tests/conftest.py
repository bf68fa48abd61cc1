import pytest
import torch

import fastscale

# Each test runs the optimizer on both implementations where it matters, chosen with torch's
# flags: fused=False (the pure-torch twins) and the default fused=None (the compiled kernel
# where one is built for the device, else the twin). ``impl`` is the keyword arguments.
IMPLS = {"torch": dict(fused=False), "auto": dict()}


@pytest.fixture(params=list(IMPLS))
def impl(request):
    return IMPLS[request.param]


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


def step_both(ref_opt, params, opt, ours, steps):
    """``steps`` steps of two optimizers over twin parameters, on the same fresh random grads."""
    for _ in range(steps):
        for a, b in zip(params, ours):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        ref_opt.step()
        opt.step()
