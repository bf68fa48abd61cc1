"""Compiler flags shared by setup.py (ahead-of-time build) and the first-use compile.

Kept free of imports from the package so setup.py can load this file on its own.
"""

import os


def cxx_flags() -> list[str]:
    # -fopenmp: at::parallel_for is header code that only runs threads when compiled with OpenMP.
    # No -m ISA flags: the AVX2 loops get their ISA from a pragma in csrc/cpu/kernels_avx2.cpp
    # and are chosen at run time, so one flag list serves setup.py and the first-use compile.
    return ["-O3", "-fopenmp"]


def nvcc_flags() -> list[str]:
    return ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]


def ldflags() -> list[str]:
    return ["-fopenmp"]


def env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
