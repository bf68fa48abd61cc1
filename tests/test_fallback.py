"""Implementation choice: compiled kernels where built, the pure-torch path everywhere else."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastscale
from fastscale import FusedScaledSGD
from conftest import native_cpu, step_both


def run_python(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True, text=True, timeout=300
    )


def test_no_native_env_gives_one_warning_and_works():
    out = run_python(
        """
        import warnings, torch, fastscale
        print(fastscale.build_info())
        p = torch.randn(4, requires_grad=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                opt = fastscale.FusedScaledSGD([p], lr=0.1, momentum=0.9)
                p.grad = torch.ones(4)
                opt.step()
        msgs = [str(w.message) for w in caught if "fastscale" in str(w.message)]
        print(len(msgs)); print(msgs[0])
        try:
            fastscale.FusedScaledSGD([p], lr=0.1, fused=True).step()
        except RuntimeError as e:
            print("native:", e)
        """,
        FASTSCALE_NO_NATIVE="1",
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("none (FASTSCALE_NO_NATIVE is set")
    assert lines[1] == "1"  # one warning, however many optimizers and steps
    assert "no compiled kernel for cpu" in lines[2] and "pure-torch" in lines[2]
    assert lines[3].startswith("native: fused=True but fastscale has no compiled kernel for cpu")


@pytest.mark.skipif(not native_cpu(), reason="native CPU extension not built")
def test_native_cpu_is_used_and_agrees():
    info = fastscale.build_info()
    assert info.startswith("cpu")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastscale::fused_sgd_", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastscale::accumulate_grad_", "CPU")
    ps = [torch.randn(33, requires_grad=True), torch.randn(4, 5, requires_grad=True)]
    qs = [p.detach().clone().requires_grad_(True) for p in ps]
    a = FusedScaledSGD(ps, lr=0.1, momentum=0.9, fused=True)
    b = FusedScaledSGD(qs, lr=0.1, momentum=0.9, fused=False)
    step_both(b, qs, a, ps, 3)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q)


def test_fused_true_without_kernel_for_device_raises():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="no compiled kernel for meta"):
        p = torch.empty(3, device="meta", requires_grad=True)
        p.grad = torch.empty(3, device="meta")
        FusedScaledSGD([p], lr=0.1, fused=True)


@pytest.mark.skipif(not native_cpu(), reason="native CPU extension not built")
def test_import_registers_the_compiled_kernels():
    """The extension is loaded by `import fastscale`: a public op called first thing runs the
    compiled kernel, never the pure-torch twin silently."""
    out = run_python(
        """
        import torch, fastscale
        print(all(torch._C._dispatch_has_kernel_for_dispatch_key(f"fastscale::{op}", "CPU")
                  for op in ("fused_sgd_", "accumulate_grad_")))
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True"]
