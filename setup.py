"""Builds fastscale and, when torch is importable at build time, its native extension.

Environment switches:
  FASTSCALE_NO_NATIVE=1   build nothing native (the package runs on its pure-torch path)
  FORCE_CUDA=1            build the CUDA kernels even if torch/CUDA_HOME detection says no
  FORCE_ONLY_CPU=1        never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST    the GPU architectures to compile for (torch's own variable)
"""

import glob
import importlib.util
import os

from setuptools import setup

_spec = importlib.util.spec_from_file_location("_build_flags", "fastscale/_build_flags.py")
flags = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flags)


def native_extensions():
    if flags.env_true("FASTSCALE_NO_NATIVE"):
        print("fastscale: FASTSCALE_NO_NATIVE is set; building no native code")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print(
            "fastscale: torch is not importable at build time (isolated build?); "
            "the native extension will be compiled on first use instead"
        )
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    with_cuda = not flags.env_true("FORCE_ONLY_CPU") and (
        flags.env_true("FORCE_CUDA")
        or (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None)
    )
    kwargs = dict(
        name="fastscale._C",
        include_dirs=[os.path.abspath("csrc")],
        extra_link_args=flags.ldflags(),
    )
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            sources=sources + sorted(glob.glob("csrc/cuda/*.cu")),
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": flags.cxx_flags(), "nvcc": flags.nvcc_flags()},
            **kwargs,
        )
    else:
        ext = cpp_extension.CppExtension(
            sources=sources, extra_compile_args={"cxx": flags.cxx_flags()}, **kwargs
        )
    print(f"fastscale: building the native extension ({'CPU + CUDA' if with_cuda else 'CPU'})")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
