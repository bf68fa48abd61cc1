"""Nothing on the path of step() or accumulate_grad() may read a tensor on the host.

On CUDA this is checked with torch.cuda.set_sync_debug_mode("error"). On the CPU, where no read
is a sync, every host-read method of Tensor is made to raise while the training step runs:
the same code path would synchronise on a device.
"""

import contextlib

import pytest
import torch

from fastscale import FusedScaledSGD

HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def host_reads_forbidden(monkeypatch):
    def boom(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name}() read a tensor on the host during the step")
        return method

    with monkeypatch.context() as m:
        for name in HOST_READS:
            m.setattr(torch.Tensor, name, boom(name))
        yield


def train_steps(opt, model, steps, forbid, scaler=None):
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(2):
            x = torch.randn(8, 6, device=model[0].weight.device)
            loss = model(x).square().mean() / 2
            (scaler.scale(loss) if scaler else loss).backward()
            with forbid():
                opt.accumulate_grad(loss_scale=0.5, grad_scaler=scaler)
        with forbid():
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
        if scaler is not None:
            scaler.update()  # GradScaler's own bookkeeping: not ours to police


def make(device, impl, **kw):
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).to(device)
    opt = FusedScaledSGD(
        model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, batch_size=16,
        base_batch_size=8, warmup_steps=3, noise_scale=True, **impl, **kw,
    )
    return model, opt


@pytest.mark.parametrize("scaling", ["linear", "noise"])
def test_cpu_step_reads_nothing_on_host(monkeypatch, impl, scaling):
    model, opt = make("cpu", impl, scaling=scaling)
    train_steps(opt, model, 1, contextlib.nullcontext)  # first step creates momentum buffers
    train_steps(opt, model, 4, lambda: host_reads_forbidden(monkeypatch))
    assert opt.gradient_stats()["steps"] == 5


def test_the_guard_catches_a_read(monkeypatch):
    """The check above can fail: a read inside the guarded region raises."""
    t = torch.ones(())
    with pytest.raises(AssertionError, match="read a tensor on the host"):
        with host_reads_forbidden(monkeypatch):
            t.item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scaling", ["linear", "noise"])
def test_cuda_step_never_syncs(impl, scaling):
    model, opt = make("cuda", impl, scaling=scaling)
    scaler = torch.amp.GradScaler("cuda")
    train_steps(opt, model, 1, contextlib.nullcontext, scaler)  # buffers created
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()

    @contextlib.contextmanager
    def forbid():
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    train_steps(opt, model, 4, forbid, scaler)
    train_steps(opt, model, 2, forbid)
