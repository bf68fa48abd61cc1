"""The compiled CPU kernels (csrc/cpu/) against the pure-torch oracle (fastscale/reference.py).

``torch.ops.fastscale.*`` dispatches to the C++ CPU kernel once the extension is loaded; the
oracle is called directly. Every test of the compiled op skips when the extension is not
loaded (otherwise both sides would be the oracle); CI builds it (.ci/run) and sets
FASTSCALE_REQUIRE_NATIVE=1, which turns "not loaded" into a failure.

Tolerances (compared in fp64), and why:
- parameters / buffers: fp64 1e-12; fp32 rtol 2e-6 (the kernel may fuse a multiply-add the
  oracle rounds twice: an ulp or two); fp16 / bf16: one ulp of the storage type (rtol = eps,
  atol = 1e-5): both compute in fp32 and round once, so they differ only where an fp32 ulp
  flips the final rounding.
- norms (returned in fp32): 2e-5 relative for fp32/fp16/bf16 (fp32 sums in a different order
  than torch._foreach_norm, which also returns the norm, not its square); 1e-6 for fp64
  (both sum in fp64 and round once to fp32).
- snapshots written by accumulate_grad_: bit-exact (a copy).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastscale
from fastscale import reference

NATIVE = fastscale._extension.load() and "cpu" in fastscale._extension.native_device_types()
pytestmark = pytest.mark.skipif(
    not NATIVE, reason=f"fastscale CPU kernels not loaded: {fastscale.build_info()}"
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
CHUNK = 1 << 14  # csrc/cpu/kernels.h kChunk
TENSOR_TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=2e-6, atol=1e-6),
    torch.float16: dict(rtol=torch.finfo(torch.float16).eps, atol=1e-5),
    torch.bfloat16: dict(rtol=torch.finfo(torch.bfloat16).eps, atol=1e-5),
}
NORM_TOL = {
    torch.float64: dict(rtol=1e-6, atol=0),
    torch.float32: dict(rtol=2e-5, atol=0),
    torch.float16: dict(rtol=2e-5, atol=0),
    torch.bfloat16: dict(rtol=2e-5, atol=0),
}
SMALL_SHAPES = [(), (0,), (1,), (7,), (3, 5), (4097,), (CHUNK + 1,)]


def rand(shapes, dtype):
    # Fresh random values, never zeros (a kernel that writes nothing must fail the tests).
    return [torch.randn(s, dtype=dtype) for s in shapes]


def clones(tensors):
    return [t.clone() for t in tensors]


def assert_tensors(actual, expected, dtype, what):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.double(), e.double(), **TENSOR_TOL[dtype], msg=lambda m: f"{what}[{i}]: {m}")


def assert_norms(actual, expected, dtype):
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **NORM_TOL[dtype])


def run_sgd(shapes, dtype, *, momentum=0.9, dampening=0.0, nesterov=False, maximize=False,
            weight_decay=0.0, is_first_step=False, grad_scale=None, found_inf=None, lr=0.05):
    """One step of the compiled op and of the oracle on identical fresh inputs; checks all."""
    params, grads = rand(shapes, dtype), rand(shapes, dtype)
    bufs = rand(shapes, dtype) if momentum != 0 else []
    kwargs = dict(lr=torch.tensor(lr), weight_decay=weight_decay, momentum=momentum,
                  dampening=dampening, nesterov=nesterov, maximize=maximize,
                  is_first_step=is_first_step,
                  grad_scale=None if grad_scale is None else torch.tensor(grad_scale),
                  found_inf=None if found_inf is None else torch.tensor(found_inf))
    ref_params, ref_bufs, grads_before = clones(params), clones(bufs), clones(grads)
    params_before, bufs_before = clones(params), clones(bufs)
    norms = torch.ops.fastscale.fused_sgd_(params, grads, bufs, **kwargs)
    ref_norms = reference.fused_sgd_(ref_params, grads, ref_bufs, **kwargs)
    assert_norms(norms, ref_norms, dtype)
    assert_tensors(params, ref_params, dtype, "params")
    assert_tensors(bufs, ref_bufs, dtype, "momentum_buffers")
    for g, g0 in zip(grads, grads_before):
        assert torch.equal(g, g0), "grads must never be written"
    if found_inf:
        assert all(torch.equal(a, b) for a, b in zip(params + bufs, params_before + bufs_before))
    elif dtype in (torch.float32, torch.float64) and any(p.numel() for p in params):
        assert not all(torch.equal(a, b) for a, b in zip(params, params_before)), "nothing written"
    return norms


def sgd_configs():
    """Every hyper-parameter combination that means something different."""
    momentum_cfgs = [(0.0, 0.0, False, False)] + list(itertools.product([0.9], [0.0, 0.3], [False, True], [False, True]))
    for (mom, damp, nest, first), maximize, wd, gs, fi in itertools.product(
        momentum_cfgs, [False, True], [0.0, 0.01], [None, 4.0], [None, 0.0, 1.0]
    ):
        yield dict(momentum=mom, dampening=damp, nesterov=nest, is_first_step=first,
                   maximize=maximize, weight_decay=wd, grad_scale=gs, found_inf=fi)


def config_id(cfg):
    return "-".join(f"{k}={v}" for k, v in cfg.items())


@pytest.mark.parametrize("cfg", list(sgd_configs()), ids=config_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_sgd_every_config(dtype, cfg):
    run_sgd(SMALL_SHAPES, dtype, **cfg)


SHAPE_SETS = {
    "one": [(1,)],
    "seven": [(7,)],
    "4097": [(4097,)],
    "65537": [(65537,)],
    "chunk_edges": [(CHUNK - 1,), (CHUNK,), (CHUNK + 1,), (2 * CHUNK + 3,)],
    "zero_dim": [(), ()],
    "empty": [(0,), (3, 0)],
    "tiny_x150": [(int(n),) for n in torch.randint(0, 20, (150,), generator=torch.Generator().manual_seed(0))],
    "big_and_tiny": [(70_001,), (3,), (), (40_000,), (0,), (1,)] * 3,  # parallel path
}


@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_sgd_shapes(dtype, shapes):
    run_sgd(shapes, dtype, momentum=0.9, dampening=0.1, weight_decay=0.01, grad_scale=2.0)
    run_sgd(shapes, dtype, momentum=0.0, maximize=True)


def test_fused_sgd_empty_list():
    norms = torch.ops.fastscale.fused_sgd_([], [], [], lr=torch.tensor(0.1), weight_decay=0.0, momentum=0.9,
                                           dampening=0.0, nesterov=False, maximize=False, is_first_step=False)
    assert norms.shape == (0,) and norms.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_sgd_many_steps(dtype):
    """First step creates the buffers, later steps read them: compared at every step."""
    shapes = [(5, 3), (4097,), ()]
    params = rand(shapes, dtype)
    bufs = [torch.empty_like(p) for p in params]
    ref_params, ref_bufs = clones(params), clones(bufs)
    for step in range(4):
        grads = rand(shapes, dtype)
        kw = dict(lr=torch.tensor(0.1 / (step + 1)), weight_decay=1e-3, momentum=0.9, dampening=0.0,
                  nesterov=True, maximize=False, is_first_step=step == 0)
        assert_norms(torch.ops.fastscale.fused_sgd_(params, grads, bufs, **kw),
                     reference.fused_sgd_(ref_params, grads, ref_bufs, **kw), dtype)
        assert_tensors(params, ref_params, dtype, f"params step {step}")
        assert_tensors(bufs, ref_bufs, dtype, f"bufs step {step}")


@pytest.mark.parametrize("value", [True, False, float("nan"), 0.5], ids=str)
def test_found_inf_values(value):
    """Any non-zero (NaN included) skips the update, bool or float, as the oracle does."""
    dtype = torch.bool if isinstance(value, bool) else torch.float32
    params, grads, bufs = rand([(9,)], torch.float32), rand([(9,)], torch.float32), rand([(9,)], torch.float32)
    before = clones(params + bufs)
    ref_params, ref_bufs = clones(params), clones(bufs)
    kw = dict(lr=torch.tensor(0.1), weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False,
              maximize=False, is_first_step=False, found_inf=torch.tensor(value, dtype=dtype))
    torch.ops.fastscale.fused_sgd_(params, grads, bufs, **kw)
    reference.fused_sgd_(ref_params, grads, ref_bufs, **kw)
    assert_tensors(params + bufs, ref_params + ref_bufs, torch.float32, "state")
    assert all(torch.equal(a, b) for a, b in zip(params + bufs, before)) == (value is not False)


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_lr_dtypes_and_one_element(lr_dtype):
    for lr in (torch.tensor(0.3, dtype=lr_dtype), torch.tensor([0.3], dtype=lr_dtype)):
        params, grads = rand([(33,)], torch.float32), rand([(33,)], torch.float32)
        ref = clones(params)
        kw = dict(lr=lr, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False,
                  is_first_step=False)
        torch.ops.fastscale.fused_sgd_(params, grads, [], **kw)
        # The oracle takes 0-dim lr only; the kernel also accepts a 1-element lr.
        reference.fused_sgd_(ref, grads, [], **dict(kw, lr=lr.reshape(())))
        assert_tensors(params, ref, torch.float32, "params")


# ---- layouts: dense non-contiguous tensors run in place; others through a written-back copy.

def layouts(dtype):
    return {
        "transposed": lambda: torch.randn(10, 6, dtype=dtype).t(),
        "strided_slice": lambda: torch.randn(6, 20, dtype=dtype)[:, ::2],
        "channels_last": lambda: torch.randn(2, 3, 4, 5, dtype=dtype).contiguous(memory_format=torch.channels_last),
        "contiguous": lambda: torch.randn(6, 10, dtype=dtype),
    }


@pytest.mark.parametrize("param_layout", ["transposed", "strided_slice", "channels_last", "contiguous"])
@pytest.mark.parametrize("grad_layout", ["transposed", "strided_slice", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_sgd_layouts(dtype, param_layout, grad_layout):
    make = layouts(dtype)
    p = make[param_layout]()
    g = make[grad_layout]() if p.dim() == 2 else torch.randn_like(p)
    b = make[param_layout]()
    p_storage, b_storage = p.data_ptr(), b.data_ptr()
    ref_p, ref_b = p.clone(), b.clone()
    kw = dict(lr=torch.tensor(0.1), weight_decay=0.1, momentum=0.9, dampening=0.0, nesterov=False,
              maximize=False, is_first_step=False)
    norms = torch.ops.fastscale.fused_sgd_([p], [g], [b], **kw)
    ref_norms = reference.fused_sgd_([ref_p], [g], [ref_b], **kw)
    assert_norms(norms, ref_norms, dtype)
    assert_tensors([p, b], [ref_p, ref_b], dtype, "state")
    assert p.data_ptr() == p_storage and b.data_ptr() == b_storage  # updated where they live


@pytest.mark.parametrize("grad_layout", ["transposed", "strided_slice", "contiguous"])
def test_accumulate_layouts(grad_layout):
    make = layouts(torch.float32)
    g = make[grad_layout]()
    s = make["strided_slice"]()
    ref_s = s.clone()
    assert_norms(torch.ops.fastscale.accumulate_grad_([s], [g], first=False),
                 reference.accumulate_grad_([ref_s], [g], first=False), torch.float32)
    assert torch.equal(s, g) and torch.equal(ref_s, g)


def test_expanded_grad_is_read_fine():
    p, b = torch.randn(4, 5), torch.randn(4, 5)
    g = torch.randn(5).expand(4, 5)
    ref_p, ref_b = p.clone(), b.clone()
    kw = dict(lr=torch.tensor(0.1), weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False,
              maximize=False, is_first_step=False)
    assert_norms(torch.ops.fastscale.fused_sgd_([p], [g], [b], **kw),
                 reference.fused_sgd_([ref_p], [g], [ref_b], **kw), torch.float32)
    assert_tensors([p, b], [ref_p, ref_b], torch.float32, "state")


# ---- errors: clear messages naming the argument.

def sgd_kwargs(**over):
    kw = dict(lr=torch.tensor(0.1), weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False,
              maximize=False, is_first_step=False)
    kw.update(over)
    return kw


ERROR_CASES = {
    "grads_length": (lambda: ([torch.randn(3)], [], [torch.randn(3)], sgd_kwargs()), r"grads has 0 tensors but params has 1"),
    "buffers_length": (lambda: ([torch.randn(3)], [torch.randn(3)], [], sgd_kwargs()), r"momentum_buffers has 0 tensors but params has 1"),
    "grad_dtype": (lambda: ([torch.randn(3)], [torch.randn(3, dtype=torch.float64)], [torch.randn(3)], sgd_kwargs()), r"grads\[0\] has dtype Double but params\[0\] has Float"),
    "int_params": (lambda: ([torch.ones(3, dtype=torch.int32)], [torch.ones(3, dtype=torch.int32)], [], sgd_kwargs(momentum=0.0)), r"params\[0\] has dtype Int; supported are"),
    "shape": (lambda: ([torch.randn(3)], [torch.randn(4)], [torch.randn(3)], sgd_kwargs()), r"grads\[0\] has shape \[4\] but its counterpart has shape \[3\]"),
    "lr_shape": (lambda: ([torch.randn(3)], [torch.randn(3)], [torch.randn(3)], sgd_kwargs(lr=torch.tensor([0.1, 0.2]))), r"lr must be a 0-dim tensor"),
    "grad_scale_shape": (lambda: ([torch.randn(3)], [torch.randn(3)], [torch.randn(3)], sgd_kwargs(grad_scale=torch.tensor([2.0]))), r"grad_scale must be a 0-dim tensor"),
    "found_inf_shape": (lambda: ([torch.randn(3)], [torch.randn(3)], [torch.randn(3)], sgd_kwargs(found_inf=torch.zeros(1))), r"found_inf must be a 0-dim tensor"),
    "expanded_param": (lambda: ([torch.randn(1).expand(3)], [torch.randn(3)], [torch.randn(3)], sgd_kwargs()), r"params\[0\] has overlapping memory"),
}


# A sparse tensor never reaches the CPU kernel: the dispatcher sends it to SparseCPU, where the
# pure-torch default kernel runs (and torch raises); csrc/checks.h still rejects it by name.
@pytest.mark.parametrize("case", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_fused_sgd_errors(case):
    make, message = case
    params, grads, bufs, kw = make()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastscale.fused_sgd_(params, grads, bufs, **kw)


def test_accumulate_errors():
    with pytest.raises(RuntimeError, match=r"snapshots has 1 tensors but grads has 2"):
        torch.ops.fastscale.accumulate_grad_([torch.randn(2)], [torch.randn(2), torch.randn(2)], first=True)
    with pytest.raises(RuntimeError, match=r"snapshots\[0\] has dtype Half but grads\[0\] has Float"):
        torch.ops.fastscale.accumulate_grad_([torch.randn(2).half()], [torch.randn(2)], first=True)
    with pytest.raises(RuntimeError, match=r"snapshots\[0\] has overlapping memory"):
        torch.ops.fastscale.accumulate_grad_([torch.randn(1).expand(2)], [torch.randn(2)], first=True)


# ---- accumulate_grad_

@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accumulate_grad(dtype, first, shapes):
    grads = rand(shapes, dtype)
    snaps = rand(shapes, dtype)
    ref_snaps, grads_before = clones(snaps), clones(grads)
    norms = torch.ops.fastscale.accumulate_grad_(snaps, grads, first=first)
    ref_norms = reference.accumulate_grad_(ref_snaps, grads, first=first)
    assert_norms(norms, ref_norms, dtype)
    for s, g, g0 in zip(snaps, grads, grads_before):
        assert torch.equal(s, g), "snapshot must be an exact copy of the grad"
        assert torch.equal(g, g0), "grads must never be written"


def test_accumulate_empty_list():
    norms = torch.ops.fastscale.accumulate_grad_([], [], first=False)
    assert norms.shape == (0,) and norms.dtype == torch.float32


# ---- arrival_norms_: (|g|², g·t, |t|²) of a gradient arriving at .grad, one read of each;
# with add=True also t += g in the same pass, bit for bit what torch's `t += g` stores.

ARRIVAL_SHAPES = SMALL_SHAPES + [(3 * CHUNK + 5,), (300, 700)]


@pytest.mark.parametrize("shape", ARRIVAL_SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["add", "cross", "first"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_arrival_norms(dtype, mode, shape):
    g, t = rand([shape, shape], dtype)
    g0, t0 = g.clone(), t.clone()
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.full((3,), float("nan"), dtype=out_dtype)
    ref = torch.full((3,), float("nan"), dtype=out_dtype)
    acc, ref_acc = (t.clone(), t.clone()) if mode != "first" else (None, None)
    torch.ops.fastscale.arrival_norms_(out, g, acc, add=mode == "add")
    reference.arrival_norms_(ref, g, ref_acc, add=mode == "add")
    # g·t has no scale of its own (it can be near 0): its rounding is relative to |g||t|.
    scale = (g.double().square().sum() * t.double().square().sum()).sqrt().item()
    torch.testing.assert_close(out[0], ref[0], **NORM_TOL[dtype])
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=NORM_TOL[dtype]["rtol"] * scale + 1e-30)
    assert torch.equal(g, g0), "the gradient is only read"
    if mode == "first":
        assert out[1].item() == 0.0 and out[2].item() == 0.0
        return
    torch.testing.assert_close(out[2], ref[2], **NORM_TOL[dtype])
    torch.testing.assert_close(out[2].double(), t0.double().square().sum().to(out.dtype).double(), **NORM_TOL[dtype])
    if mode == "add":  # the sum is the one torch's AccumulateGrad stores, to the bit
        expected = t0.clone()
        expected += g
        assert torch.equal(acc, expected) and torch.equal(ref_acc, expected)
    else:
        assert torch.equal(acc, t0), "without add, .grad is only read"


@pytest.mark.parametrize("add", [False, True], ids=["read", "add"])
@pytest.mark.parametrize("t_layout", ["strided_slice", "same"])
@pytest.mark.parametrize("layout", ["transposed", "strided_slice", "contiguous"])
def test_arrival_norms_layouts(layout, t_layout, add):
    """.grad strided otherwise than g (written back through a copy), or alike (in place)."""
    make = layouts(torch.float32)
    g, t = make[layout](), make[layout if t_layout == "same" else t_layout]()
    t_ref, t0, strides = t.clone(), t.clone(), t.stride()
    out, ref = torch.zeros(3), torch.zeros(3)
    torch.ops.fastscale.arrival_norms_(out, g, t, add=add)
    reference.arrival_norms_(ref, g, t_ref, add=add)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5 * g.norm().item() * t0.norm().item())
    expected = t0 + g if add else t0
    assert torch.equal(t, expected) and t.stride() == strides, "written through its own strides"


def test_arrival_norms_writes_a_row_of_a_larger_buffer():
    buf = torch.randn(4, 3, dtype=torch.float64)
    before = buf.clone()
    g, t = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    torch.ops.fastscale.arrival_norms_(buf[2], g, t)
    torch.testing.assert_close(buf[2], torch.stack([g.dot(g), g.dot(t), t.dot(t)]))
    assert torch.equal(buf[[0, 1, 3]], before[[0, 1, 3]])


def test_arrival_norms_errors():
    g = torch.randn(3)
    cases = [
        ((torch.zeros(2), g, None), {}, r"out must be a contiguous dense tensor of 3 elements"),
        ((torch.zeros(3, dtype=torch.float16), g, None), {}, r"out has dtype Half; it must be float32 or float64"),
        ((torch.zeros(3), g, torch.randn(3, dtype=torch.float64)), {}, r"accumulated\[0\] has dtype Double but grad has Float"),
        ((torch.zeros(3), g, torch.randn(4)), {"add": True}, r"accumulated\[0\] has shape \[4\] but its counterpart has shape \[3\]"),
        ((torch.zeros(3), torch.ones(3, dtype=torch.int32), None), {}, r"grad\[0\] has dtype Int; supported are"),
        ((torch.zeros(3), g, None), {"add": True}, r"add=True needs accumulated"),
        ((torch.zeros(3), g, torch.zeros(1).expand(3)), {"add": True}, r"accumulated\[0\] has overlapping memory"),
    ]
    buf = torch.randn(11)
    cases.append(((torch.zeros(3), buf[:10], buf[1:]), {"add": True}, r"accumulated and grad partly overlap"))
    buf = torch.randn(13)
    cases.append(((buf[3:6], torch.randn(10), buf[3:]), {"add": True}, r"out overlaps accumulated"))
    for args, kwargs, message in cases:
        before = [a.clone() if a is not None else None for a in args]
        with pytest.raises(RuntimeError, match=message):
            torch.ops.fastscale.arrival_norms_(*args, **kwargs)
        for a, b in zip(args, before):
            assert a is None or torch.equal(a, b), "a failed call writes nothing"
        if "overlap" in message and "overlapping" not in message:
            continue  # the twin leaves those to torch's own add_ below
        with pytest.raises((ValueError, RuntimeError)):  # the pure-torch twin, where the op has no kernel
            reference.arrival_norms_(*args, **kwargs)
        for a, b in zip(args, before):
            assert a is None or torch.equal(a, b), "a failed call of the twin writes nothing"


def test_arrival_norms_twin_refuses_as_the_op_does_before_writing():
    g = torch.randn(3)
    cases = [((torch.zeros(3), g, torch.randn(3, dtype=torch.float64)), r"accumulated has dtype torch.float64 but grad"),
             ((torch.zeros(3), g, torch.randn(4)), r"accumulated has shape"),
             ((torch.zeros(2), g, None), r"out must be a 3-element"),
             ((torch.zeros(3), g, None), r"add=True needs accumulated")]
    for args, message in cases:
        before = [a.clone() if a is not None else None for a in args]
        with pytest.raises(ValueError, match=message):
            reference.arrival_norms_(*args, add=True)
        assert all(a is None or torch.equal(a, b) for a, b in zip(args, before))


@pytest.mark.parametrize("mode", ["add", "cross", "first"])
def test_opcheck_arrival_norms(mode):
    g, t = rand([(70, 300), (70, 300)], torch.float32)
    torch.library.opcheck(torch.ops.fastscale.arrival_norms_.default, (torch.zeros(3), g, None if mode == "first" else t),
                          {"add": mode == "add"})


# ---- linear_example_sq: a Linear layer's weight gradient and each example's squared share of
# it, one example at a time (the twin forms all B at once).

# (B, T, d_in, d_out): one of everything, odd sizes, an example's gradient over several chunks
# (d_in * d_out > kChunk), the bench transformer's head, an empty batch, no tokens.
EXAMPLE_SHAPES = [(1, 1, 1, 1), (3, 5, 7, 11), (4, 3, 200, 300), (8, 64, 128, 1000), (0, 4, 3, 2), (3, 0, 4, 5)]


def example_inputs(shape, dtype, layout="contiguous"):
    b, t, d_in, d_out = shape
    if layout == "contiguous":
        return torch.randn(b, t, d_in, dtype=dtype), torch.randn(b, t, d_out, dtype=dtype)
    if layout == "transposed":  # tokens-major storage, as after a transpose(0, 1)
        return (torch.randn(t, b, d_in, dtype=dtype).transpose(0, 1),
                torch.randn(t, b, d_out, dtype=dtype).transpose(0, 1))
    # every other feature of a wider tensor
    return torch.randn(b, t, 2 * d_in, dtype=dtype)[..., ::2], torch.randn(b, t, 2 * d_out, dtype=dtype)[..., ::2]


@pytest.mark.parametrize("shape", EXAMPLE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_linear_example_sq(dtype, shape):
    a, d = example_inputs(shape, dtype)
    a0, d0 = a.clone(), d.clone()
    weight_grad, sq, bias_grads = torch.ops.fastscale.linear_example_sq(a, d)
    want_grad, want_sq, want_bias = reference.linear_example_sq(a, d)
    assert weight_grad.dtype == sq.dtype == bias_grads.dtype == dtype and weight_grad.shape == (shape[3], shape[2])
    assert sq.shape == (shape[0],) and bias_grads.shape == (shape[0], shape[3])
    torch.testing.assert_close(bias_grads, want_bias, rtol=0,
                               atol=(1e-12 if dtype == torch.float64 else 2e-6) * max(shape[1], 1) * 5)
    assert torch.equal(a, a0) and torch.equal(d, d0), "the inputs are only read"
    # The weight gradient sums B matmuls in another order than one bmm + sum: relative to its
    # largest entry. The norms: the kernel's double sum of an fp32 gradient against torch's.
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    scale = want_grad.abs().max().item() if want_grad.numel() else 0.0
    torch.testing.assert_close(weight_grad, want_grad, rtol=0, atol=tol * scale * max(shape[0], 1))
    torch.testing.assert_close(sq, want_sq, rtol=1e-10 if dtype == torch.float64 else 2e-5, atol=0)
    # and the twin itself against each example's gradient, formed one by one in fp64
    for i in range(shape[0]):
        g = d[i].double().t() @ a[i].double()
        torch.testing.assert_close(want_sq[i].double(), g.square().sum(), rtol=1e-5, atol=1e-12)
    if shape[1] == 0 or shape[0] == 0:
        assert not weight_grad.any() and not sq.any() and not bias_grads.any()


@pytest.mark.parametrize("layout", ["transposed", "strided_features"])
def test_linear_example_sq_layouts(layout):
    a, d = example_inputs((5, 6, 30, 20), torch.float64, layout)
    got = torch.ops.fastscale.linear_example_sq(a, d)
    want = reference.linear_example_sq(a.contiguous(), d.contiguous())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_linear_example_sq_errors():
    a, d = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    cases = [
        ((a[0], d), r"input must be 3-D \[batch, tokens, features\], got shape [\[(]3, 4[\])]"),
        ((a, d[0]), r"grad_output must be 3-D"),
        ((a.half(), d.half()), r"input has dtype (Half|torch.float16); supported are float32 and float64"),
        ((a, d.int()), r"grad_output has dtype (Int|torch.int32); supported are"),
        ((a, d.double()), r"grad_output has dtype (Double|torch.float64) but input has (Float|torch.float32)"),
        ((a, torch.randn(2, 4, 5)), r"they must agree in batch and tokens"),
        ((a, torch.randn(3, 3, 5)), r"they must agree in batch and tokens"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.fastscale.linear_example_sq(*args)
        with pytest.raises(ValueError, match=message):  # the pure-torch twin, where the op has no kernel
            reference.linear_example_sq(*args)


def test_opcheck_linear_example_sq():
    a, d = example_inputs((3, 5, 7, 11), torch.float32)
    torch.library.opcheck(torch.ops.fastscale.linear_example_sq.default, (a, d))


# ---- conv_example_sq: the same for a 2-D convolution, plus each example's bias gradient.

# (B, C, H, W, O, kernel, stride, padding, dilation, groups): 1x1, the bench CNN's stride-2 3x3,
# a stride of 3 (the generic im2col loop), dilation, asymmetric kernel and padding wider than
# the kernel reaches (whole rows of zeros), groups, a 1-high input (Conv1d), an output of one
# position, an empty batch.
CONV_CASES = [
    (3, 2, 5, 4, 3, (1, 1), (1, 1), (0, 0), (1, 1), 1),
    (4, 32, 16, 16, 64, (3, 3), (2, 2), (1, 1), (1, 1), 1),
    (3, 4, 11, 10, 6, (3, 2), (3, 3), (2, 1), (2, 1), 2),
    (2, 6, 7, 9, 6, (2, 4), (1, 2), (3, 0), (1, 2), 3),
    (5, 4, 1, 23, 6, (1, 3), (1, 2), (0, 1), (1, 2), 2),
    (2, 3, 3, 3, 5, (3, 3), (1, 1), (0, 0), (1, 1), 1),
    (0, 3, 8, 8, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1),
]


def conv_inputs(case, dtype):
    b, c, h, w, o, k, s, p, dil, g = case
    x = torch.randn(b, c, h, w, dtype=dtype)
    weight = torch.randn(o, c // g, *k, dtype=dtype)
    d = torch.randn_like(torch.nn.functional.conv2d(x, weight, None, s, p, dil, g))
    return x, d, weight, (list(k), list(s), list(p), list(dil), g)


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_conv_example_sq(dtype, case):
    x, d, weight, geometry = conv_inputs(case, dtype)
    x0, d0 = x.clone(), d.clone()
    weight_grad, sq, bias_grads = torch.ops.fastscale.conv_example_sq(x, d, *geometry)
    want_grad, want_sq, want_bias = reference.conv_example_sq(x, d, *geometry)
    assert torch.equal(x, x0) and torch.equal(d, d0), "the inputs are only read"
    assert weight_grad.shape == weight.shape and sq.shape == (x.shape[0],) and bias_grads.shape == d.shape[:2]
    assert weight_grad.dtype == sq.dtype == bias_grads.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    scale = want_grad.abs().max().item() if want_grad.numel() else 0.0
    torch.testing.assert_close(weight_grad, want_grad, rtol=0, atol=tol * scale * max(x.shape[0], 1))
    torch.testing.assert_close(sq, want_sq, rtol=1e-10 if dtype == torch.float64 else 2e-5, atol=0)
    torch.testing.assert_close(bias_grads, want_bias, rtol=1e-10 if dtype == torch.float64 else 1e-5,
                               atol=1e-5 * d.abs().sum((2, 3)).max().item() if d.numel() else 0.0)
    if x.shape[0]:  # the weight gradient is autograd's, independently of both
        auto = torch.ops.aten.convolution_backward(d, x, weight, None, *geometry[1:4], False, [0, 0], geometry[4],
                                                   [False, True, False])[1]
        torch.testing.assert_close(weight_grad, auto, rtol=0, atol=tol * 10 * scale * x.shape[0])
    else:
        assert not weight_grad.any()


def test_conv_example_sq_non_contiguous():
    x, d, _, geometry = conv_inputs((3, 4, 9, 8, 6, (3, 3), (2, 2), (1, 1), (1, 1), 2), torch.float64)
    x_cl, d_cl = x.contiguous(memory_format=torch.channels_last), d[:, :, :, :].transpose(2, 3).contiguous().transpose(2, 3)
    got = torch.ops.fastscale.conv_example_sq(x_cl, d_cl, *geometry)
    want = reference.conv_example_sq(x, d, *geometry)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_conv_example_sq_errors():
    x, d, _, geometry = conv_inputs((2, 4, 6, 6, 4, (3, 3), (1, 1), (1, 1), (1, 1), 2), torch.float32)
    k, s, p, dil, g = geometry
    cases = [
        ((x[0], d, k, s, p, dil, g), r"input must be 4-D"),
        ((x.double(), d, k, s, p, dil, g), r"grad_output has dtype (Float|torch.float32) but input has"),
        ((x.half(), d.half(), k, s, p, dil, g), r"input has dtype (Half|torch.float16); supported are float32 and float64"),
        ((x, d, [3], s, p, dil, g), r"kernel_size must be two integers >= 1"),
        ((x, d, k, [0, 1], p, dil, g), r"stride must be two integers >= 1"),
        ((x, d, k, s, [-1, 1], dil, g), r"padding must be two integers >= 0"),
        ((x, d, k, s, p, dil, 3), r"groups must be >= 1 and divide"),
        ((x, d, k, s, p, dil, 0), r"groups must be >= 1 and divide"),
        ((x, d[:1], k, s, p, dil, g), r"input has batch 2 but grad_output has 1"),
        ((x, d[..., :5], k, s, p, dil, g), r"but this geometry gives width 6"),
        # a dilation whose span overflows int64 covers more than the input: no output at all
        ((x, d, k, s, p, [2**63 - 3, 1], g), r"this geometry gives an empty output \(height 0\)"),
        ((x, d, [7, 3], s, [0, 1], dil, g), r"this geometry gives an empty output \(height 0\)"),
        ((x, d, k, s, [2**62, 1], dil, g), r"padding \[4611686018427387904, 1\] is too large"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.fastscale.conv_example_sq(*args)
        with pytest.raises(ValueError, match=message):
            reference.conv_example_sq(*args)


def test_opcheck_conv_example_sq():
    x, d, _, geometry = conv_inputs((3, 4, 7, 6, 6, (3, 2), (2, 1), (1, 1), (1, 1), 2), torch.float32)
    torch.library.opcheck(torch.ops.fastscale.conv_example_sq.default, (x, d, *geometry))


def test_example_norms_independent_of_thread_count():
    # Each example is computed whole by one thread: its norm (and bias gradient) is the same for
    # any number of threads. The weight gradient sums the threads' blocks: rounding only.
    # the second Linear's weight (40 x 500) outweighs its input and output gradient: one block
    a, d = example_inputs((7, 9, 30, 20), torch.float32)
    a2, d2 = example_inputs((5, 2, 500, 40), torch.float32)
    x, dc, _, geometry = conv_inputs((7, 4, 9, 8, 6, (3, 3), (2, 2), (1, 1), (1, 1), 2), torch.float32)
    outs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append((torch.ops.fastscale.linear_example_sq(a, d), torch.ops.fastscale.conv_example_sq(x, dc, *geometry),
                         torch.ops.fastscale.linear_example_sq(a2, d2)))
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(outs[0][2], reference.linear_example_sq(a2, d2), rtol=1e-5, atol=1e-4)
    for linear, conv, wide in outs[1:]:
        for got, want in ((linear, outs[0][0]), (conv, outs[0][1]), (wide, outs[0][2])):
            assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5 * want[0].abs().max().item())


# ---- layer_norm_example_backward: LayerNorm's backward with every example's weight and bias
# gradient, one read of x and dy.

@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (32, 64, 128), (4, 1, 300), (0, 3, 4), (3, 0, 4)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_layer_norm_example_backward(dtype, shape):
    x = torch.randn(shape, dtype=dtype) * 3 + 1
    weight, bias = torch.randn(shape[2:], dtype=dtype), torch.randn(shape[2:], dtype=dtype)
    _, mean, rstd = torch.ops.aten.native_layer_norm(x, shape[2:], weight, bias, 1e-5)
    mean, rstd = mean.reshape(shape[:2]), rstd.reshape(shape[:2])
    dy = torch.randn(shape, dtype=dtype)
    got = torch.ops.fastscale.layer_norm_example_backward(dy, x, mean, rstd, weight)
    want = reference.layer_norm_example_backward(dy, x, mean, rstd, weight)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, **tol)
    if x.numel():  # and torch's own backward: the same input gradient, the rows summed
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(dy, x, shape[2:], mean.unsqueeze(-1),
                                                               rstd.unsqueeze(-1), weight, bias, [True, True, True])
        for g, w in ((got[0], dx), (got[1].sum(0), dw), (got[2].sum(0), db)):
            torch.testing.assert_close(g, w, **tol)


def test_layer_norm_example_backward_errors_and_opcheck():
    x, dy = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mean, rstd, w = torch.randn(2, 3), torch.rand(2, 3) + 0.5, torch.randn(4)
    cases = [((dy, x[0], mean, rstd, w), r"input must be 3-D"),
             ((dy[:, :2], x, mean, rstd, w), r"grad_output has shape"),
             ((dy, x, mean[:, :2], rstd, w), r"mean must have shape \[2, 3\]"),
             ((dy, x, mean, rstd.double(), w), r"rstd has dtype (Double|torch.float64) but input has"),
             ((dy, x, mean, rstd, w[:3]), r"weight must have shape \[4\]"),
             ((dy.half(), x.half(), mean, rstd, w), r"has dtype (Half|torch.float16); supported are")]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.fastscale.layer_norm_example_backward(*args)
        with pytest.raises(ValueError, match=message):
            reference.layer_norm_example_backward(*args)
    torch.library.opcheck(torch.ops.fastscale.layer_norm_example_backward.default, (dy, x, mean, rstd, w))


# ---- group_norm_example_backward: GroupNorm's backward with every example's weight and bias
# gradient from its first pass.

@pytest.mark.parametrize("shape,groups", [((1, 1, 1), 1), ((3, 6, 7), 3), ((64, 32, 1024), 8), ((2, 4, 300), 4),
                                          ((5, 8, 1), 2)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_group_norm_example_backward(dtype, shape, groups):
    n, c, hw = shape
    x = torch.randn(shape, dtype=dtype) * 3 + 1
    weight, bias = torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    _, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, n, c, hw, groups, 1e-5)
    dy = torch.randn(shape, dtype=dtype)
    got = torch.ops.fastscale.group_norm_example_backward(dy, x, mean, rstd, weight, groups, True)
    want = reference.group_norm_example_backward(dy, x, mean, rstd, weight, groups, True)
    # fp32: sums of hw products in another order than torch's, with cancellation (x has mean 1),
    # times rstd (1/sqrt(eps) for a group of one element): relative to the largest entry and rstd
    amp = max(1.0, rstd.max().item())
    tol = lambda w: (dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64  # noqa: E731
                     else dict(rtol=1e-4, atol=2e-6 * amp * max(w.abs().max().item(), 1.0)))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, **tol(w))
    # and torch's own backward: the same input gradient, the rows summed
    dx, dw, db = torch.ops.aten.native_group_norm_backward(dy, x, mean, rstd, weight, n, c, hw, groups, [True] * 3)
    for g, w in ((got[0], dx), (got[1].sum(0), dw), (got[2].sum(0), db)):
        torch.testing.assert_close(g, w, **tol(w))
    no_dx = torch.ops.fastscale.group_norm_example_backward(dy, x, mean, rstd, weight, groups, False)
    assert no_dx[0].numel() == 0 and torch.equal(no_dx[1], got[1]) and torch.equal(no_dx[2], got[2])


def test_group_norm_example_backward_errors_and_opcheck():
    x, dy = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    mean, rstd, w = torch.randn(2, 2), torch.rand(2, 2) + 0.5, torch.randn(4)
    cases = [((dy, x[0], mean, rstd, w, 2, True), r"input must be 3-D"),
             ((dy[:, :2], x, mean, rstd, w, 2, True), r"grad_output has shape"),
             ((dy, x, mean, rstd, w, 3, True), r"groups must be >= 1 and divide the 4 channels, got 3"),
             ((dy, x, mean[:, :1], rstd, w, 2, True), r"mean must have shape \[2, 2\]"),
             ((dy, x, mean, rstd.double(), w, 2, True), r"rstd has dtype (Double|torch.float64) but input has"),
             ((dy, x, mean, rstd, w[:3], 2, True), r"weight must have shape \[4\]")]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.fastscale.group_norm_example_backward(*args)
        with pytest.raises(ValueError, match=message):
            reference.group_norm_example_backward(*args)
    torch.library.opcheck(torch.ops.fastscale.group_norm_example_backward.default, (dy, x, mean, rstd, w, 2, True))


# ---- row_dot_sums: (sum x d, sum d) per row in one read of each (GroupNorm's hooked rule).

@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (2048, 1024), (5, 70_001), (0, 4), (3, 0)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_row_dot_sums(dtype, shape):
    x, d = rand([shape, shape], dtype)
    dots, sums = torch.ops.fastscale.row_dot_sums(x, d)
    want_dots, want_sums = reference.row_dot_sums(x, d)
    assert dots.dtype == sums.dtype == dtype and dots.shape == sums.shape == shape[:1]
    # each sum's rounding is relative to the sum of its terms' sizes, not to the sum itself
    eps = 1e-13 if dtype == torch.float64 else 2e-6
    size = lambda t: t.abs().sum(1).max().item() if t.shape[0] else 0.0  # noqa: E731
    torch.testing.assert_close(dots, want_dots, rtol=0, atol=eps * size(x * d) + 1e-30)
    torch.testing.assert_close(sums, want_sums, rtol=0, atol=eps * size(d) + 1e-30)
    x_t = x.t().contiguous().t()  # column-major: summed from a contiguous copy
    torch.testing.assert_close(torch.ops.fastscale.row_dot_sums(x_t, d)[0], dots)


def test_row_dot_sums_errors_and_opcheck():
    x = torch.randn(3, 4)
    for args, message in [((x[0], x), r"x must be 2-D"), ((x, x.double()), r"d has dtype (Double|torch.float64) but x"),
                          ((x, x[:, :3]), r"d has shape"), ((x.int(), x.int()), r"x has dtype (Int|torch.int32); supported")]:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.fastscale.row_dot_sums(*args)
        with pytest.raises(ValueError, match=message):
            reference.row_dot_sums(*args)
    torch.library.opcheck(torch.ops.fastscale.row_dot_sums.default, (x, torch.randn(3, 4)))


# ---- determinism: the reduction must not depend on the number of threads.

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_norms_independent_of_thread_count(dtype):
    shapes = [(300_001,), (5,), (70_000,), ()]
    grads, params, bufs = rand(shapes, dtype), rand(shapes, dtype), rand(shapes, dtype)
    kw = sgd_kwargs(weight_decay=0.01)
    outs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            p, b = clones(params), clones(bufs)
            n = torch.ops.fastscale.fused_sgd_(p, grads, b, **kw)
            a = torch.ops.fastscale.accumulate_grad_(clones(bufs), grads, first=False)
            arrival = torch.zeros(3, dtype=torch.float64)
            torch.ops.fastscale.arrival_norms_(arrival, grads[0], clones(bufs)[0], add=True)
            outs.append((n, torch.cat([a.double(), arrival]), p, b))
    finally:
        torch.set_num_threads(old)
    for n, a, p, b in outs[1:]:
        assert torch.equal(n, outs[0][0]) and torch.equal(a, outs[0][1])
        assert all(torch.equal(x, y) for x, y in zip(p + b, outs[0][2] + outs[0][3]))


# ---- property-based: random lists of sizes and random hyper-parameters.

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 3 * CHUNK), min_size=1, max_size=6),
    dtype=st.sampled_from(DTYPES),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    dampening=st.floats(0.0, 0.9),
    nesterov=st.booleans(),
    maximize=st.booleans(),
    weight_decay=st.floats(0.0, 0.1),
    is_first_step=st.booleans(),
    grad_scale=st.one_of(st.none(), st.floats(0.25, 1024.0)),
    lr=st.floats(1e-4, 1.0),
)
def test_fused_sgd_property(sizes, dtype, momentum, dampening, nesterov, maximize, weight_decay,
                            is_first_step, grad_scale, lr):
    torch.manual_seed(len(sizes) * 7919 + sum(sizes))
    run_sgd([(n,) for n in sizes], dtype, momentum=momentum, dampening=dampening, nesterov=nesterov,
            maximize=maximize, weight_decay=weight_decay, is_first_step=is_first_step,
            grad_scale=grad_scale, lr=lr)


# ---- the op contract: opcheck, torch.compile.

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_opcheck_fused_sgd(dtype):
    shapes = [(5, 3), (), (0,), (4097,)]
    args = (rand(shapes, dtype), rand(shapes, dtype), rand(shapes, dtype))
    kwargs = sgd_kwargs(weight_decay=0.01, grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0))
    torch.library.opcheck(torch.ops.fastscale.fused_sgd_.default, args, kwargs)
    torch.library.opcheck(torch.ops.fastscale.fused_sgd_.default, (args[0], args[1], []),
                          sgd_kwargs(momentum=0.0))


@pytest.mark.parametrize("first", [False, True])
def test_opcheck_accumulate_grad(first):
    shapes = [(5, 3), (), (0,), (4097,)]
    torch.library.opcheck(torch.ops.fastscale.accumulate_grad_.default,
                          (rand(shapes, torch.float32), rand(shapes, torch.float32)), dict(first=first))


def test_compile_does_not_recompile_when_lr_changes():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step(params, grads, bufs, lr):
        return torch.ops.fastscale.fused_sgd_(params, grads, bufs, **sgd_kwargs(lr=lr))

    shapes = [(8,), (3, 3)]
    params, bufs = rand(shapes, torch.float32), rand(shapes, torch.float32)
    ref_params, ref_bufs = clones(params), clones(bufs)
    for lr in (0.1, 0.05, 0.01, 0.2):
        grads = rand(shapes, torch.float32)
        lr_t = torch.tensor(lr)
        assert_norms(step(params, grads, bufs, lr_t),
                     reference.fused_sgd_(ref_params, grads, ref_bufs, **sgd_kwargs(lr=lr_t)), torch.float32)
        assert_tensors(params + bufs, ref_params + ref_bufs, torch.float32, "state")
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} compiles for 4 lr values"


def test_compile_aot_eager_applies_mutations():
    """Through functionalization and the fake kernel, the in-place writes still land."""
    torch._dynamo.reset()

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(params, grads, bufs, snaps, lr):
        n = torch.ops.fastscale.fused_sgd_(params, grads, bufs, **sgd_kwargs(lr=lr))
        return n, torch.ops.fastscale.accumulate_grad_(snaps, grads, first=True)

    shapes = [(8,), (3, 3)]
    params, grads, bufs, snaps = (rand(shapes, torch.float32) for _ in range(4))
    ref_params, ref_bufs = clones(params), clones(bufs)
    n, a = step(params, grads, bufs, snaps, torch.tensor(0.1))
    assert_norms(n, reference.fused_sgd_(ref_params, grads, ref_bufs, **sgd_kwargs(lr=torch.tensor(0.1))), torch.float32)
    assert_tensors(params + bufs, ref_params + ref_bufs, torch.float32, "state")
    assert all(torch.equal(s, g) for s, g in zip(snaps, grads))


# ---- the baseline (non-AVX2) loops, forced in a fresh process (the choice is made once).

_BASELINE_SCRIPT = r"""
import torch, fastscale
from fastscale import reference
assert fastscale._extension.load()
torch.manual_seed(0)
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    shapes = [(), (0,), (7,), (16385,), (40000,)]
    p = [torch.randn(s, dtype=dtype) for s in shapes]; g = [torch.randn_like(x) for x in p]
    b = [torch.randn_like(x) for x in p]; rp = [x.clone() for x in p]; rb = [x.clone() for x in b]
    kw = dict(lr=torch.tensor(0.1), weight_decay=0.01, momentum=0.9, dampening=0.1, nesterov=True,
              maximize=True, is_first_step=False, grad_scale=torch.tensor(2.0))
    n = torch.ops.fastscale.fused_sgd_(p, g, b, **kw); rn = reference.fused_sgd_(rp, g, rb, **kw)
    torch.testing.assert_close(n, rn, rtol=2e-5, atol=0)
    eps = torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 2e-6
    for x, y in zip(p + b, rp + rb):
        torch.testing.assert_close(x.double(), y.double(), rtol=eps, atol=1e-5)
    s = [torch.randn_like(x) for x in g]; rs = [x.clone() for x in s]
    torch.testing.assert_close(torch.ops.fastscale.accumulate_grad_(s, g, first=False),
                               reference.accumulate_grad_(rs, g, first=False), rtol=2e-5, atol=0)
    assert all(torch.equal(x, y) for x, y in zip(s, g))
print("ok")
"""


def test_baseline_isa_loops():
    env = dict(os.environ, FASTSCALE_CPU_ISA="default")
    out = subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_build_info_reports_cpu():
    assert fastscale.build_info().split(";")[0].split(",")[0] == "cpu"
