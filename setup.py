"""Build script: the pure-Python package plus the compiled op library ``dsalign._C``.

``dsalign._C`` (batched Potts-chain Viterbi) is compiled when torch is importable at build time, i.e. with
``pip install --no-build-isolation .`` after torch is installed. CUDA sources are added when a CUDA toolkit is
found and torch is a CUDA build; ``DSALIGN_BUILD_CUDA=1`` forces them on (and fails loudly if impossible),
``DSALIGN_BUILD_CUDA=0`` forces them off. ``DSALIGN_BUILD_EXT=0`` skips the extension entirely. Without the
extension the package still imports; the op explains how to build it when called.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["dsalign", "dsalign.*"]) + ["dsalign.kernels"]
PACKAGE_DIR = {"dsalign.kernels": "kernels"}


def _flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.lower() in ("1", "true", "yes", "on")


def _extension_kwargs() -> dict:
    """Return ext_modules/cmdclass for dsalign._C, or {} when it cannot or should not be built."""
    if _flag("DSALIGN_BUILD_EXT") is False:
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("dsalign: torch not importable at build time; skipping dsalign._C "
              "(use `pip install --no-build-isolation .` to build it)", file=sys.stderr)
        return {}

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpu_sources:
        return {}
    want_cuda = _flag("DSALIGN_BUILD_CUDA")
    can_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and bool(cuda_sources)
    if want_cuda and not can_cuda:
        raise RuntimeError("DSALIGN_BUILD_CUDA=1 but no CUDA toolkit (CUDA_HOME/nvcc) or torch is a CPU build")
    use_cuda = can_cuda if want_cuda is None else want_cuda

    cxx_flags = ["-O3", "-std=c++20"]
    link_args: list[str] = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is header-inline OpenMP: without -fopenmp it silently runs on one thread. torch ships
        # libgomp.so.1 under the same soname, so the extension shares torch's OpenMP runtime and thread count.
        cxx_flags.append("-fopenmp")
        link_args.append("-fopenmp")
    define_macros = [("WITH_CUDA", None)] if use_cuda else []
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = cpp_extension.CUDAExtension(
            "dsalign._C",
            cpu_sources + cuda_sources,
            define_macros=define_macros,
            # No --use_fast_math: Viterbi labels on the GPU must match the CPU op exactly.
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
            extra_link_args=link_args,
        )
    else:
        ext = cpp_extension.CppExtension(
            "dsalign._C", cpu_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_args
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": build_ext}}


setup(packages=PACKAGES, package_dir=PACKAGE_DIR, **_extension_kwargs())
