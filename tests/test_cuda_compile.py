"""Every csrc/cuda/*.cu compiles (nvcc -c, sm_90 and sm_80, against torch's headers).

Needs nvcc, not a GPU: this is how CI, which has no GPU, keeps the CUDA code from rotting.
Skips where nvcc is not found. Slow: nvcc parses torch's headers once per file and arch.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "compile_cuda.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("compile_cuda", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_cuda_source_compiles():
    compile_cuda = _load_script()
    if compile_cuda.find_nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    assert sorted((ROOT / "csrc" / "cuda").glob("*.cu")), "no CUDA sources to check"
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert "FAILED" not in out


def test_compile_check_reports_a_broken_file(tmp_path):
    """The check can fail: a .cu with an error makes nvcc, and so the script, exit non-zero."""
    compile_cuda = _load_script()
    nvcc = compile_cuda.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    broken = tmp_path / "broken.cu"
    broken.write_text("__global__ void k(float* x) { x[0] = undefined_name; }\n")
    _, _, proc, _ = compile_cuda.compile_one(nvcc, broken, tmp_path, ["90"], verbose=False)
    assert proc.returncode != 0
    assert "undefined_name" in proc.stderr + proc.stdout
