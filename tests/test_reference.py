"""The pure-torch twins against torch.optim.SGD's single-tensor math, and opcheck on the ops."""

import itertools

import pytest
import torch

from fastscale import reference
from fastscale.ops import accumulate_grad_, fused_sgd_

HYPER = [
    (m, d, n, mx, wd)
    for m, d, n, mx, wd in itertools.product([0.0, 0.9], [0.0, 0.3], [False, True], [False, True], [0.0, 0.05])
    if not (n and (m == 0 or d != 0))  # torch rejects Nesterov without momentum or with dampening
]


def torch_single_step(p, g, buf, lr, wd, momentum, dampening, nesterov, maximize):
    """torch/optim/sgd.py's _single_tensor_sgd, written out for one tensor."""
    g = -g if maximize else g
    if wd:
        g = g + wd * p
    if momentum:
        buf = g.clone() if buf is None else buf * momentum + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    return p - lr * g, buf


@pytest.mark.parametrize("momentum,dampening,nesterov,maximize,wd", HYPER)
@pytest.mark.parametrize("first", [True, False])
def test_fused_sgd_reference_matches_torch_math(momentum, dampening, nesterov, maximize, wd, first):
    shapes = [(3, 4), (0,), (), (17,)]
    params = [torch.randn(s, dtype=torch.float64) for s in shapes]
    grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
    bufs = [torch.randn(s, dtype=torch.float64) for s in shapes] if momentum else []
    expected = [
        torch_single_step(p, g, None if first else (bufs[i] if bufs else None), 0.1, wd, momentum, dampening, nesterov, maximize)
        for i, (p, g) in enumerate(zip(params, grads))
    ]
    norms = reference.fused_sgd_(
        params, grads, bufs, lr=torch.tensor(0.1, dtype=torch.float64), weight_decay=wd, momentum=momentum,
        dampening=dampening, nesterov=nesterov, maximize=maximize, is_first_step=first,
    )
    for (p_new, b_new), p, i in zip(expected, params, range(len(params))):
        torch.testing.assert_close(p, p_new, rtol=1e-12, atol=1e-12)
        if momentum:
            torch.testing.assert_close(bufs[i], b_new, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norms, torch.stack([g.square().sum() for g in grads]).float())


def test_grad_scale_and_found_inf():
    p, g, b = torch.randn(10), torch.randn(10) * 512, torch.randn(10)
    p0, b0 = p.clone(), b.clone()
    kw = dict(lr=torch.tensor(0.5), weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False, maximize=False, is_first_step=False)
    n = reference.fused_sgd_([p], [g], [b], grad_scale=torch.tensor(512.0), found_inf=torch.tensor(1.0), **kw)
    assert torch.equal(p, p0) and torch.equal(b, b0)  # skipped
    torch.testing.assert_close(n, (g / 512).square().sum().reshape(1))
    reference.fused_sgd_([p], [g], [b], grad_scale=torch.tensor(512.0), found_inf=torch.tensor(0.0), **kw)
    torch.testing.assert_close(b, 0.9 * b0 + g / 512)
    torch.testing.assert_close(p, p0 - 0.5 * b)


def test_accumulate_reference_takes_micro_batch_norms():
    micro = [[torch.randn(5, 3), torch.randn(2)] for _ in range(3)]
    grads = [torch.zeros(5, 3), torch.zeros(2)]
    snaps = [torch.full((5, 3), 7.0), torch.full((2,), 7.0)]  # stale: must not be read when first
    for i, m in enumerate(micro):
        torch._foreach_add_(grads, m)  # what autograd does on backward
        n = reference.accumulate_grad_(snaps, grads, first=i == 0)
        torch.testing.assert_close(n, torch.stack([t.square().sum() for t in m]), rtol=1e-5, atol=1e-6)
        assert all(torch.equal(s, g) for s, g in zip(snaps, grads))


def test_arrival_reference_gives_the_micro_batch_norm_and_the_cross_term():
    # |T + g|² = |T|² + 2 g·T + |g|²: what the hooks build |.grad|² from, micro-batch by
    # micro-batch; |T|² (the third sum) is the sum of the micro-batches so far. With add=True
    # the op is also AccumulateGrad's T += g.
    micro = [torch.randn(6, 4, dtype=torch.float64) for _ in range(3)]
    total, added, big = None, None, 0.0
    for g in micro:
        out = torch.full((3,), float("nan"), dtype=torch.float64)
        reference.arrival_norms_(out, g, total)
        torch.testing.assert_close(out[0], g.square().sum())
        if total is not None:
            torch.testing.assert_close(out[2], total.square().sum())
            again = torch.full((3,), float("nan"), dtype=torch.float64)
            reference.arrival_norms_(again, g, added, add=True)
            assert torch.equal(again, out)
        big = out[0] if total is None else big + 2 * out[1] + out[0]
        total = g.clone() if total is None else total + g
        added = g.clone() if added is None else added
        assert torch.equal(added, total)
        torch.testing.assert_close(big, total.square().sum())
    half = torch.randn(9, dtype=torch.float16)  # low precision: computed in fp32
    out = torch.zeros(3)
    reference.arrival_norms_(out, half, half)
    torch.testing.assert_close(out, half.float().square().sum().repeat(3))
    for args, kwargs in [((torch.zeros(3), half, None), {"add": True}), ((torch.zeros(3), half, half[:4]), {})]:
        with pytest.raises(ValueError, match="needs accumulated|has shape"):
            reference.arrival_norms_(*args, **kwargs)
        assert torch.equal(args[0], torch.zeros(3))


def test_linear_example_sq_reference_is_each_examples_gradient():
    # A Linear layer's weight gradient is the sum of the examples' own, sum_t d_t a_t^T; the
    # twin gives that sum and each one's squared norm, against the examples formed one by one
    # and against autograd's weight gradient of the summed loss.
    a = torch.randn(5, 7, 6, dtype=torch.float64, requires_grad=False)
    weight = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    out = torch.nn.functional.linear(a, weight)
    d = torch.randn_like(out)
    out.backward(d)
    weight_grad, sq, bias_grads = reference.linear_example_sq(a, d)
    torch.testing.assert_close(weight_grad, weight.grad)
    torch.testing.assert_close(bias_grads, d.sum(1))
    torch.testing.assert_close(sq, torch.stack([(d[i].t() @ a[i]).square().sum() for i in range(5)]))
    for bad in [(a[0], d), (a.float(), d), (a, d[:, :3])]:
        with pytest.raises(ValueError):
            reference.linear_example_sq(*bad)


def test_conv_example_sq_reference_is_each_examples_gradient():
    # The twin's sum is autograd's weight gradient; its norms and bias gradients are each
    # example's own, from autograd run on that example alone.
    x = torch.randn(3, 4, 9, 8, dtype=torch.float64)
    conv = torch.nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2).double()
    d = torch.randn_like(conv(x))
    geometry = (list(conv.kernel_size), list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
    weight_grad, sq, bias_grads = reference.conv_example_sq(x, d, *geometry)
    per_example = [torch.autograd.grad(conv(x[i:i + 1]), [conv.weight, conv.bias], d[i:i + 1]) for i in range(3)]
    torch.testing.assert_close(weight_grad, sum(w for w, _ in per_example))
    torch.testing.assert_close(sq, torch.stack([w.square().sum() for w, _ in per_example]))
    torch.testing.assert_close(bias_grads, torch.stack([b for _, b in per_example]))
    dots, sums = reference.row_dot_sums(x.flatten(1), d[:, :, :, :].flatten(1)[:, :x[0].numel()])
    torch.testing.assert_close(dots, (x.flatten(1) * d.flatten(1)[:, :x[0].numel()]).sum(1))
    torch.testing.assert_close(sums, d.flatten(1)[:, :x[0].numel()].sum(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    params = [torch.randn(5, 3, dtype=dtype), torch.randn(7, dtype=dtype)]
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.randn_like(p) for p in params]
    kw = dict(lr=torch.tensor(0.1), weight_decay=0.01, momentum=0.9, dampening=0.0, nesterov=True, maximize=False, is_first_step=False)
    torch.library.opcheck(torch.ops.fastscale.fused_sgd_, (params, grads, bufs), kw)
    torch.library.opcheck(torch.ops.fastscale.accumulate_grad_, ([torch.randn_like(g) for g in grads], grads), dict(first=False))
    # the Python wrappers are the ops
    assert fused_sgd_(params, grads, bufs, **kw).shape == (2,)
    assert accumulate_grad_(bufs, grads, first=True).shape == (2,)
