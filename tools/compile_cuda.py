"""Compile-only check of fastscale's CUDA sources: ``nvcc -c`` on every ``csrc/cuda/*.cu``.

Runs where nvcc exists but no GPU (and even where torch is a CPU build), so CUDA code cannot rot
unseen: same flags as setup.py's CUDAExtension build (torch's own nvcc flags, -std=c++20,
fastscale/_build_flags.py's nvcc_flags, -DWITH_CUDA), against torch's headers, one object per
file into a temporary directory that is then removed. Nothing is linked and nothing runs.

    python tools/compile_cuda.py                 # sm_90 and sm_80
    python tools/compile_cuda.py --arch 90 -v    # one arch, print commands and ptxas usage

Exit status 0 when every file compiles for every arch, 1 otherwise, 2 when nvcc is missing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = ("90", "80")


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH, then PATH, then /usr/local/cuda (torch's search order)."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def _build_flags():
    # Loaded from its file, like setup.py does, so that importing fastscale (and loading or
    # JIT-compiling its extension) is never part of the check.
    spec = importlib.util.spec_from_file_location("_build_flags", ROOT / "fastscale" / "_build_flags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nvcc_command(nvcc: str, source: Path, output: Path, archs: list[str], verbose: bool) -> list[str]:
    from torch.utils import cpp_extension

    includes = [*cpp_extension.include_paths(), str(CSRC)]
    cmd = [nvcc, "-c", str(source), "-o", str(output)]
    # What torch's BuildExtension adds to every .cu (cpp_extension.COMMON_NVCC_FLAGS, -fPIC,
    # -std=c++20, the extension-name defines), then fastscale's own flags.
    cmd += list(cpp_extension.COMMON_NVCC_FLAGS)
    cmd += ["-Xcompiler", "-fPIC", "-std=c++20"]
    cmd += ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-DWITH_CUDA"]
    cmd += _build_flags().nvcc_flags()
    # A CPU build of torch ships c10/cuda headers without the generated
    # c10/cuda/impl/cuda_cmake_macros.h (it only sets Windows DLL export macros);
    # c10/cuda/CUDAMacros.h skips it under this define.
    torch_include = Path(cpp_extension.include_paths()[0])
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    for arch in archs:
        cmd.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    # The per-arch device passes of one file run in parallel.
    cmd += ["--threads", str(len(archs))]
    if verbose:
        cmd += ["-Xptxas", "-v"]
    cmd += [f"-I{path}" for path in includes]
    return cmd


def compile_one(nvcc: str, source: Path, out_dir: Path, archs: list[str], verbose: bool):
    output = out_dir / (source.stem + ".o")
    cmd = nvcc_command(nvcc, source, output, archs, verbose)
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return source, cmd, proc, time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="compute capability digits, e.g. 90 (repeatable)")
    parser.add_argument("--nvcc", help="path to nvcc (default: searched like torch does)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="files compiled at once (each nvcc takes ~2 GB)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print commands and ptxas usage")
    args = parser.parse_args(argv)

    nvcc = args.nvcc or find_nvcc()
    if nvcc is None:
        print("compile_cuda: nvcc not found (set CUDA_HOME or put nvcc on PATH)", file=sys.stderr)
        return 2
    archs = args.arch or list(DEFAULT_ARCHS)
    sources = sorted((CSRC / "cuda").glob("*.cu"))
    if not sources:
        print("compile_cuda: no csrc/cuda/*.cu files", file=sys.stderr)
        return 1

    failures = 0
    with tempfile.TemporaryDirectory(prefix="fastscale-nvcc-") as tmp:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = pool.map(lambda s: compile_one(nvcc, s, Path(tmp), archs, args.verbose), sources)
            for source, cmd, proc, seconds in results:
                name = source.relative_to(ROOT)
                status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                print(f"{name}: sm_{',sm_'.join(archs)}: {status} in {seconds:.1f} s")
                if args.verbose:
                    print("  " + " ".join(cmd))
                if proc.returncode != 0 or args.verbose:
                    sys.stdout.write(proc.stdout)
                    sys.stdout.write(proc.stderr)
                failures += proc.returncode != 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
