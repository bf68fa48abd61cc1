"""Finding, or compiling, and loading the native extension.

Order: ``FASTSCALE_NO_NATIVE=1`` skips native code altogether; otherwise the extension built
ahead of time by ``pip install --no-build-isolation -e .`` (``fastscale/_C*.so``) is loaded;
failing that, the sources in ``csrc/`` are compiled once with ``torch.utils.cpp_extension.load``
into torch's extension cache (``FASTSCALE_NO_JIT=1`` turns that off). Loading registers the
CPU/CUDA kernels with the dispatcher. Any failure leaves the pure-torch kernels in place and
is reported by :func:`fastscale.ops.resolve` in one warning naming the cause.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from ._build_flags import cxx_flags, env_true, ldflags, nvcc_flags

NO_NATIVE_ENV = "FASTSCALE_NO_NATIVE"
NO_JIT_ENV = "FASTSCALE_NO_JIT"
OPS = ("fused_sgd_", "accumulate_grad_")
_CSRC = Path(__file__).resolve().parent.parent / "csrc"

_state: dict = {"loaded": None, "error": None, "devices": frozenset(), "how": None}


def _aot_library() -> str | None:
    spec = importlib.util.find_spec("fastscale._C")
    return spec.origin if spec is not None and spec.origin else None


def _jit_build() -> None:
    from torch.utils import cpp_extension

    if not _CSRC.is_dir():
        raise RuntimeError(f"no prebuilt extension and no sources to compile at {_CSRC}")
    sources = sorted(str(p) for p in [*_CSRC.glob("*.cpp"), *(_CSRC / "cpu").glob("*.cpp")])
    with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        sources += sorted(str(p) for p in (_CSRC / "cuda").glob("*.cu"))
    print(
        "fastscale: no prebuilt extension found; compiling it once from csrc/ "
        "(cached by torch.utils.cpp_extension)...",
        file=sys.stderr,
    )
    define = ["-DWITH_CUDA"] if with_cuda else []
    cpp_extension.load(
        name="fastscale_C",
        sources=sources,
        extra_cflags=cxx_flags() + define,
        extra_cuda_cflags=nvcc_flags() + define,
        extra_ldflags=ldflags(),
        extra_include_paths=[str(_CSRC)],
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=False,
    )


def load() -> bool:
    """Load the native kernels once; True when they are registered."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    _state["loaded"] = False
    if env_true(NO_NATIVE_ENV):
        _state["error"] = f"{NO_NATIVE_ENV} is set"
        return False
    try:
        path = _aot_library()
        if path is not None:
            torch.ops.load_library(path)
            _state["how"] = f"prebuilt {path}"
        elif env_true(NO_JIT_ENV):
            raise RuntimeError(f"the extension was not built ahead of time and {NO_JIT_ENV} is set")
        else:
            _jit_build()
            _state["how"] = "compiled on first use"
        torch.ops.fastscale.build_info()
    except Exception as exc:  # a broken build must leave a working package
        _state["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return False
    _state["loaded"] = True
    # Ask the dispatcher rather than trusting the build: a device counts only when every op
    # has a kernel registered for it.
    _state["devices"] = frozenset(
        device
        for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if all(torch._C._dispatch_has_kernel_for_dispatch_key(f"fastscale::{op}", key) for op in OPS)
    )
    return True


def native_device_types() -> frozenset:
    """Device types ("cpu", "cuda") with compiled kernels registered."""
    load()
    return _state["devices"]


def unavailable_reason(device_type: str) -> str:
    load()
    if _state["error"]:
        return _state["error"]
    return f"the extension ({_state['how']}) was built without {device_type} kernels"


def build_info() -> str:
    """What was compiled in, e.g. ``"cpu,cuda;torch 2.13.0"``, or why nothing was."""
    if load():
        return torch.ops.fastscale.build_info()
    return f"none ({_state['error']})"
