"""The CUDA kernels of fastscale's ops (csrc/cuda/) against the pure-torch twins, on a GPU.

Op level only (the optimizer's CUDA tests live elsewhere): equivalence over dtypes, shapes and
hyper-parameters; reproducible norms; no host sync; CUDA-graph capture and replay; opcheck;
compute-sanitizer. Every test here skips without a CUDA device. With one, a build that lacks
the CUDA kernels fails (not skips), unless FASTSCALE_NO_NATIVE is set on purpose.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastscale import _extension, reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 65536  # csrc/cuda/multi_tensor_apply.cuh kChunkElems
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Stored values may differ by one rounding from the reference (FMA contraction, one rounding at
# the store instead of two); norms by summation order.
PARAM_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
}
NORM_TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-6),
    torch.float64: dict(rtol=1e-6, atol=1e-9),  # accumulated in fp64, returned in fp32
    torch.float16: dict(rtol=1e-4, atol=1e-6),
    torch.bfloat16: dict(rtol=1e-4, atol=1e-6),
}

SHAPE_SETS = {
    "mixed": [(), (1,), (7,), (3, 5), (0,), (4097,), (128, 33), (2, 3, 0), (9, 1, 3)],
    "chunk_edges": [(CHUNK - 1,), (CHUNK,), (CHUNK + 1,), (3 * CHUNK + 5,), (2, CHUNK + 3)],
    # More tensors than one launch holds (88 with momentum, 120 without).
    "many_tiny": [(1 + (7 * i) % 53,) for i in range(300)],
}

# (momentum, dampening, nesterov, maximize, weight_decay)
HYPER = [
    (0.0, 0.0, False, False, 0.0),
    (0.0, 0.0, False, True, 0.05),
    (0.9, 0.0, False, False, 0.0),
    (0.9, 0.0, True, False, 1e-2),
    (0.9, 0.25, False, True, 1e-3),
]


@pytest.fixture(scope="module", autouse=True)
def cuda_kernels_registered():
    if os.environ.get(_extension.NO_NATIVE_ENV):
        pytest.skip(f"{_extension.NO_NATIVE_ENV} is set: no native kernels to test")
    devices = _extension.native_device_types()
    assert "cuda" in devices, f"a GPU is present but fastscale has no CUDA kernels: {_extension.build_info()}"
    for op in ("fastscale::fused_sgd_", "fastscale::accumulate_grad_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op} has no CUDA kernel"


def randn(shape, dtype, seed, offset=0):
    """Fresh random values (never zeros); offset > 0 gives a contiguous view starting `offset`
    elements into its storage, so that it is not 16-byte aligned."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    numel = 1
    for s in shape:
        numel *= s
    flat = torch.randn(numel + offset, generator=gen, device="cuda", dtype=torch.float32).to(dtype)
    return flat[offset:].view(shape)


def make_lists(shapes, dtype, seed, momentum, offsets=(0, 0, 0)):
    params = [randn(s, dtype, seed + 3 * i, offsets[0]) for i, s in enumerate(shapes)]
    grads = [randn(s, dtype, seed + 3 * i + 1, offsets[1]) for i, s in enumerate(shapes)]
    bufs = [randn(s, dtype, seed + 3 * i + 2, offsets[2]) for i, s in enumerate(shapes)] if momentum else []
    return params, grads, bufs


def clones(tensors):
    return [t.clone() for t in tensors]


def sgd_kwargs(momentum, dampening, nesterov, maximize, wd, first, lr=None, **extra):
    lr = torch.tensor(0.05, device="cuda") if lr is None else lr
    return dict(lr=lr, weight_decay=wd, momentum=momentum, dampening=dampening, nesterov=nesterov,
                maximize=maximize, is_first_step=first, **extra)


def on_device(kw):
    """The reference's scalars: 0-dim tensors on the GPU (the kernel also takes CPU and
    one-element tensors; the reference gets the same values in its own form)."""
    return {k: v.to("cuda").reshape(()) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def check_fused_sgd(params, grads, bufs, **kw):
    """Runs the CUDA op and the reference on copies and compares every output."""
    dtype = params[0].dtype if params else torch.float32
    ref_p, ref_g, ref_b = clones(params), clones(grads), clones(bufs)
    grads_before = clones(grads)
    norms = torch.ops.fastscale.fused_sgd_(params, grads, bufs, **kw)
    ref_norms = reference.fused_sgd_(ref_p, ref_g, ref_b, **on_device(kw))
    assert norms.dtype == torch.float32 and norms.device.type == "cuda"
    torch.testing.assert_close(norms, ref_norms, **NORM_TOL[dtype])
    for got, want in zip(params + bufs, ref_p + ref_b):
        torch.testing.assert_close(got, want, **PARAM_TOL[dtype])
    for g, g0 in zip(grads, grads_before):
        assert torch.equal(g, g0), "grads must never be written"
    return norms


# ------------------------------------------------------------------------------------------------
# Equivalence with the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", list(SHAPE_SETS), ids=str)
@pytest.mark.parametrize("hyper", HYPER, ids=str)
@pytest.mark.parametrize("first", [False, True])
def test_fused_sgd_matches_reference(dtype, shapes, hyper, first):
    momentum, dampening, nesterov, maximize, wd = hyper
    params, grads, bufs = make_lists(SHAPE_SETS[shapes], dtype, seed=11, momentum=momentum)
    norms = check_fused_sgd(params, grads, bufs, **sgd_kwargs(momentum, dampening, nesterov, maximize, wd, first))
    assert norms.shape == (len(params),)
    assert bool((norms > 0).any())  # random gradients: the check compares real numbers


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offsets", [(1, 1, 1), (0, 1, 0), (1, 0, 2)], ids=str)
def test_fused_sgd_unaligned_tensors(dtype, offsets):
    """Views that start off a 16-byte boundary take the scalar path; results are the same."""
    shapes = [(CHUNK + 37,), (1000,), (5,)]
    params, grads, bufs = make_lists(shapes, dtype, seed=5, momentum=0.9, offsets=offsets)
    check_fused_sgd(params, grads, bufs, **sgd_kwargs(0.9, 0.0, True, False, 1e-2, False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_sgd_layouts(dtype):
    """Dense non-contiguous tensors laid out alike run in place; mismatched or non-dense layouts
    run on copies that are written back."""
    gen = dict(device="cuda", dtype=dtype)
    p1 = torch.randn(6, 5, 4, 3, **gen).to(memory_format=torch.channels_last)
    g1 = torch.randn(6, 5, 4, 3, **gen).to(memory_format=torch.channels_last)  # alike
    b1 = torch.randn(6, 5, 4, 3, **gen).to(memory_format=torch.channels_last)
    p2 = torch.randn(6, 5, 4, 3, **gen).to(memory_format=torch.channels_last)
    g2 = torch.randn(6, 5, 4, 3, **gen)  # differs from its parameter
    b2 = torch.randn(6, 5, 4, 3, **gen)
    p3 = torch.randn(40, 2, **gen)[:, 0]  # not dense
    g3 = torch.randn(40, **gen)
    b3 = torch.randn(80, **gen)[::2]
    p4 = torch.randn(33, 17, **gen).t()  # transposed, all alike
    g4 = torch.randn(33, 17, **gen).t()
    b4 = torch.randn(33, 17, **gen).t()
    check_fused_sgd([p1, p2, p3, p4], [g1, g2, g3, g4], [b1, b2, b3, b4],
                    **sgd_kwargs(0.9, 0.1, False, False, 1e-2, False))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", ["cuda", "cpu"])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("flag_dtype", [torch.float32, torch.bool], ids=str)
def test_fused_sgd_grad_scale_and_found_inf(dtype, where, skip, flag_dtype):
    params, grads, bufs = make_lists(SHAPE_SETS["mixed"] + [(CHUNK + 1,)], dtype, seed=7, momentum=0.9)
    grads = [g * 64 for g in grads]
    p0, b0 = clones(params), clones(bufs)
    kw = sgd_kwargs(0.9, 0.0, False, False, 1e-3, False,
                    grad_scale=torch.tensor(64.0, device=where),
                    found_inf=torch.tensor(float(skip), device=where).to(flag_dtype))
    check_fused_sgd(params, grads, bufs, **kw)
    changed = any(not torch.equal(a, b) for a, b in zip(params + bufs, p0 + b0))
    assert changed != skip


@pytest.mark.parametrize("lr", [
    pytest.param(lambda: torch.tensor(0.1, device="cuda", dtype=torch.float64), id="cuda-f64"),
    pytest.param(lambda: torch.tensor(0.1, device="cuda", dtype=torch.bfloat16), id="cuda-bf16"),
    pytest.param(lambda: torch.tensor(0.1), id="cpu-f32"),
    pytest.param(lambda: torch.tensor([0.1], device="cuda"), id="cuda-1elem"),
])
def test_fused_sgd_lr_tensor_kinds(lr):
    params, grads, bufs = make_lists(SHAPE_SETS["mixed"], torch.float32, seed=3, momentum=0.9)
    check_fused_sgd(params, grads, bufs, **sgd_kwargs(0.9, 0.0, False, False, 0.0, False, lr=lr()))


def test_fused_sgd_empty_list():
    lr = torch.tensor(0.1, device="cuda")
    norms = torch.ops.fastscale.fused_sgd_([], [], [], **sgd_kwargs(0.0, 0.0, False, False, 0.0, True, lr=lr))
    assert norms.shape == (0,) and norms.device.type == "cuda"


def test_fused_sgd_rejects_bad_inputs():
    # Each bad input must be refused by its own check in csrc/checks.h, whole message matched.
    p = [torch.randn(4, device="cuda")]
    kw = sgd_kwargs(0.9, 0.0, False, False, 0.0, False)

    def refused(message):
        return pytest.raises(RuntimeError, match=re.escape(f"fastscale: {message}"))

    with refused("grads[0] has dtype Double but params[0] has Float; all tensors of one call must share a dtype"):
        torch.ops.fastscale.fused_sgd_(p, [torch.randn(4, device="cuda", dtype=torch.float64)], [torch.randn(4, device="cuda")], **kw)
    with refused("momentum_buffers has 0 tensors but params has 1; they must be the same length"):
        torch.ops.fastscale.fused_sgd_(p, [torch.randn(4, device="cuda")], [], **kw)
    with refused("grads[0] has shape [5] but its counterpart has shape [4]"):
        torch.ops.fastscale.fused_sgd_(p, [torch.randn(5, device="cuda")], [torch.randn(4, device="cuda")], **kw)
    with refused(f"grads[0] is on cpu but params[0] is on {p[0].device}; all tensors of one call must share a device"):
        torch.ops.fastscale.fused_sgd_(p, [torch.randn(4)], [torch.randn(4, device="cuda")], **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", list(SHAPE_SETS), ids=str)
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("offset", [0, 1])
def test_accumulate_grad_matches_reference(dtype, shapes, first, offset):
    grads = [randn(s, dtype, 100 + i, offset) for i, s in enumerate(SHAPE_SETS[shapes])]
    snaps = [randn(s, dtype, 500 + i) for i, s in enumerate(SHAPE_SETS[shapes])]
    ref_snaps = clones(snaps)
    grads_before = clones(grads)
    norms = torch.ops.fastscale.accumulate_grad_(snaps, grads, first=first)
    ref_norms = reference.accumulate_grad_(ref_snaps, clones(grads), first=first)
    torch.testing.assert_close(norms, ref_norms, **NORM_TOL[dtype])
    assert bool((norms > 0).any())
    for s, g, g0 in zip(snaps, grads, grads_before):
        assert torch.equal(s, g0), "snapshot must be the gradient, bit for bit"
        assert torch.equal(g, g0), "grads must never be written"


def test_accumulate_grad_layouts():
    g1 = torch.randn(4, 6, 5, 3, device="cuda").to(memory_format=torch.channels_last)
    s1 = torch.randn(4, 6, 5, 3, device="cuda")  # differs: runs on a copy, written back
    g2 = torch.randn(30, 2, device="cuda")[:, 1]
    s2 = torch.randn(30, device="cuda")
    ref_snaps = clones([s1, s2])
    norms = torch.ops.fastscale.accumulate_grad_([s1, s2], [g1, g2], first=False)
    ref_norms = reference.accumulate_grad_(ref_snaps, [g1, g2], first=False)
    torch.testing.assert_close(norms, ref_norms)
    assert torch.equal(s1, g1) and torch.equal(s2, g2)


# ------------------------------------------------------------------------------------------------
# Determinism, no sync, CUDA graphs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_norms_are_bitwise_reproducible(dtype):
    """Two-stage reduction in a fixed order: the same inputs give the same bits, run after run,
    and a tensor's norm does not depend on which other tensors share the call (launch split)."""
    big = randn((5 * CHUNK + 123,), dtype, seed=1)
    others = [randn((1 + i % 17, 33), dtype, seed=10 + i) for i in range(250)]
    kw = sgd_kwargs(0.0, 0.0, False, False, 0.0, True, found_inf=torch.tensor(1.0, device="cuda"))
    grads = [*others, big]  # big lands in the third launch (120 tensors per launch)
    params = clones(grads)  # found_inf is set: never written
    runs = [torch.ops.fastscale.fused_sgd_(params, grads, [], **kw) for _ in range(5)]
    for r in runs[1:]:
        assert torch.equal(r, runs[0])
    alone = torch.ops.fastscale.fused_sgd_([params[-1]], [big], [], **kw)
    assert torch.equal(alone[0], runs[0][-1])
    snaps = [torch.empty_like(t) for t in grads]
    acc_runs = [torch.ops.fastscale.accumulate_grad_(snaps, grads, first=True) for _ in range(3)]
    for r in acc_runs[1:]:
        assert torch.equal(r, acc_runs[0])
    torch.testing.assert_close(acc_runs[0], runs[0])  # same gradients, same norms


@contextlib.contextmanager
def syncs_forbidden():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def test_ops_never_sync():
    params, grads, bufs = make_lists(SHAPE_SETS["mixed"] + SHAPE_SETS["many_tiny"], torch.float16, seed=2, momentum=0.9)
    snaps = [torch.empty_like(g) for g in grads]
    kw = sgd_kwargs(0.9, 0.0, True, False, 1e-4, False,
                    grad_scale=torch.tensor(8.0, device="cuda"), found_inf=torch.tensor(0.0, device="cuda"))
    torch.cuda.synchronize()
    with syncs_forbidden():
        for first in (True, False):
            torch.ops.fastscale.accumulate_grad_(snaps, grads, first=first)
        torch.ops.fastscale.fused_sgd_(params, grads, bufs, **kw)
    torch.cuda.synchronize()


def test_sync_guard_can_fail():
    t = torch.ones((), device="cuda")
    with pytest.raises(RuntimeError):
        with syncs_forbidden():
            t.item()


def test_fused_sgd_cuda_graph_replay_matches_eager():
    """Capture one step (lr, grad_scale, found_inf read on the device), replay with new values."""
    shapes = SHAPE_SETS["mixed"] + SHAPE_SETS["chunk_edges"][:2] + SHAPE_SETS["many_tiny"][:100]
    params, grads, bufs = make_lists(shapes, torch.float32, seed=9, momentum=0.9)
    lr = torch.tensor(0.1, device="cuda")
    scale = torch.tensor(2.0, device="cuda")
    found_inf = torch.tensor(0.0, device="cuda")
    kw = dict(lr=lr, weight_decay=1e-3, momentum=0.9, dampening=0.0, nesterov=True, maximize=False,
              is_first_step=False, grad_scale=scale, found_inf=found_inf)
    eager_p, eager_b = clones(params), clones(bufs)

    # Warm up on a side stream (torch's recommended capture recipe), then undo it.
    start_p, start_b = clones(params), clones(bufs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.fastscale.fused_sgd_(params, grads, bufs, **kw)
    torch.cuda.current_stream().wait_stream(side)
    torch._foreach_copy_(params, start_p)
    torch._foreach_copy_(bufs, start_b)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_norms = torch.ops.fastscale.fused_sgd_(params, grads, bufs, **kw)
    # Capture records the work without running it.
    torch._foreach_copy_(params, start_p)
    torch._foreach_copy_(bufs, start_b)

    gen = torch.Generator(device="cuda").manual_seed(0)
    for step, (lr_v, skip) in enumerate([(0.1, 0.0), (0.05, 0.0), (0.2, 1.0), (0.01, 0.0)]):
        new_grads = [torch.randn(g.shape, generator=gen, device="cuda") for g in grads]
        torch._foreach_copy_(grads, new_grads)
        lr.fill_(lr_v)
        found_inf.fill_(skip)
        graph.replay()
        eager_norms = torch.ops.fastscale.fused_sgd_(eager_p, new_grads, eager_b, **kw)
        torch.testing.assert_close(static_norms, eager_norms, rtol=0, atol=0)
        for got, want in zip(params + bufs, eager_p + eager_b):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"step {step}: {m}")


def test_accumulate_grad_cuda_graph_replay_matches_eager():
    shapes = SHAPE_SETS["mixed"] + SHAPE_SETS["many_tiny"][:150]
    grads = [randn(s, torch.bfloat16, 40 + i) for i, s in enumerate(shapes)]
    snaps = [torch.zeros_like(g) for g in grads]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.fastscale.accumulate_grad_(snaps, grads, first=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_norms = torch.ops.fastscale.accumulate_grad_(snaps, grads, first=False)
    eager_snaps = clones(snaps)
    for _ in range(3):
        torch._foreach_add_(grads, [torch.randn_like(g) for g in grads])
        graph.replay()
        eager_norms = torch.ops.fastscale.accumulate_grad_(eager_snaps, grads, first=False)
        assert torch.equal(static_norms, eager_norms)
        for s, e in zip(snaps, eager_snaps):
            assert torch.equal(s, e)


# ------------------------------------------------------------------------------------------------
# opcheck and compute-sanitizer


def test_opcheck_cuda():
    params, grads, bufs = make_lists([(3, 4), (17,), ()], torch.float32, seed=4, momentum=0.9)
    kw = sgd_kwargs(0.9, 0.0, False, False, 1e-2, False,
                    grad_scale=torch.tensor(2.0, device="cuda"), found_inf=torch.tensor(0.0, device="cuda"))
    torch.library.opcheck(torch.ops.fastscale.fused_sgd_.default, (params, grads, bufs), kw)
    snaps = [torch.randn_like(g) for g in grads]
    torch.library.opcheck(torch.ops.fastscale.accumulate_grad_.default, (snaps, grads), dict(first=False))


SANITIZER_SCRIPT = textwrap.dedent("""
    import torch
    import fastscale  # noqa: F401  (registers the ops and loads the kernels)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastscale::fused_sgd_", "CUDA")
    for dtype in (torch.float32, torch.float16, torch.float64):
        shapes = [(), (7,), (0,), (65536 + 3,), (130, 3)] + [(1 + i % 9,) for i in range(100)]
        p = [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]
        g = [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]
        b = [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]
        # Views starting one element in: not 16-byte aligned, the scalar path.
        for lst in (p, g, b):
            lst.append(torch.randn(1001, device="cuda", dtype=dtype)[1:])
        kw = dict(lr=torch.tensor(0.1, device="cuda"), weight_decay=1e-2, momentum=0.9, dampening=0.0,
                  nesterov=True, maximize=False, grad_scale=torch.tensor(2.0, device="cuda"),
                  found_inf=torch.tensor(0.0, device="cuda"))
        for first in (True, False):
            torch.ops.fastscale.fused_sgd_(p, g, b, is_first_step=first, **kw)
            torch.ops.fastscale.fused_sgd_(p, g, [], is_first_step=first, **dict(kw, momentum=0.0))
        s = [torch.empty_like(t) for t in g]
        torch.ops.fastscale.accumulate_grad_(s, g, first=True)
        torch.ops.fastscale.accumulate_grad_(s, g, first=False)
    torch.cuda.synchronize()
    print("sanitizer script done")
""")


def _compute_sanitizer():
    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [shutil.which("compute-sanitizer")]
    if CUDA_HOME:
        candidates.append(str(Path(CUDA_HOME) / "bin" / "compute-sanitizer"))
    return next((c for c in candidates if c and Path(c).is_file()), None)


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "initcheck", "synccheck"])
def test_compute_sanitizer_clean(tool, tmp_path):
    sanitizer = _compute_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    script = tmp_path / "run_ops.py"
    script.write_text(SANITIZER_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               # Without the caching allocator, memcheck sees every buffer's true bounds.
               PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    # Only fastscale's kernels (mangled names contain the namespace) are checked, not torch's.
    cmd = [sanitizer, "--tool", tool, "--error-exitcode", "3", "--kernel-name", "kns=fastscale",
           sys.executable, str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "sanitizer script done" in out, out[-6000:]
    assert "ERROR SUMMARY: 0 errors" in out, out[-6000:]

