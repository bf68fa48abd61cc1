"""Nothing on the path of step() or accumulate_grad() may read a tensor on the host (so, on CUDA,
a whole step() can be captured in a CUDA graph: checked there too).

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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scaling", ["linear", "noise"])
def test_cuda_step_captured_in_a_graph_matches_eager(impl, scaling):
    """With no sync, a whole step() can be captured: per-example norms observed, warmup on
    the device step count, the batch-size (or live noise-scale) factor and the estimator's
    update, captured once in a CUDA graph and replayed on new gradients, give the parameters,
    momentum buffers, step count and estimator state of the same steps run eagerly."""
    torch.manual_seed(0)
    model, opt = make("cuda", impl, scaling=scaling)
    torch.manual_seed(0)
    twin, ref = make("cuda", impl, scaling=scaling)
    params, twin_params = list(model.parameters()), list(twin.parameters())
    gen = torch.Generator(device="cuda").manual_seed(1)

    def fresh():
        return [torch.randn(p.shape, generator=gen, device="cuda") for p in params], \
            torch.rand(16, generator=gen, device="cuda") + 0.5

    static_sq = torch.zeros(16, device="cuda")
    for p in params:
        p.grad = torch.zeros_like(p)

    def captured_step():
        opt.observe_per_example_norms(static_sq)
        opt.step()

    def eager_step(grads, sq):
        for p, g in zip(twin_params, grads):
            p.grad = g.clone()
        ref.observe_per_example_norms(sq)
        ref.step()

    def feed(grads, sq):
        torch._foreach_copy_([p.grad for p in params], grads)
        static_sq.copy_(sq)

    side = torch.cuda.Stream()  # warm-up on a side stream (torch's capture recipe): buffers exist
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            grads, sq = fresh()
            feed(grads, sq)
            captured_step()
            eager_step(grads, sq)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_step()  # recorded, not run
    for _ in range(6):  # through the end of warmup (warmup_steps=3)
        grads, sq = fresh()
        feed(grads, sq)
        graph.replay()
        eager_step(grads, sq)
    torch.cuda.synchronize()
    for p, q in zip(params, twin_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"],
                                   rtol=1e-6, atol=1e-7)
    assert torch.equal(opt._step_count, ref._step_count)
    got, want = opt.statistics.estimator.state_dict(), ref.statistics.estimator.state_dict()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-9, atol=0, equal_nan=True, msg=lambda m: f"{key}: {m}")
