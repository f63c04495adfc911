"""Build hook: the CUDA copy kernels where CUDA and nvcc exist, a pure-Python package everywhere else.

Package metadata lives in ``pyproject.toml``; this file only decides whether to add the extension
``zmqdisagg.native._C`` (``csrc/``). It needs torch importable at build time, so build it with
``pip install --no-build-isolation .`` (or ``python setup.py build_ext --inplace`` in a checkout).
Without torch, CUDA or nvcc, or with ``ZMQDISAGG_BUILD_NATIVE=0``, the build is pure Python and
``zmqdisagg.native.HAS_NATIVE`` is False at run time, so the torch fallback moves the bytes.
``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (e.g. ``9.0`` for H100/H200 only).
"""

import os
import shutil

from setuptools import setup


def native_extension() -> dict:
    if os.environ.get("ZMQDISAGG_BUILD_NATIVE", "1") == "0":
        return {}
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return {}
    nvcc = CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc")
    if not (nvcc and os.path.exists(nvcc)) and not shutil.which("nvcc"):
        return {}
    ext = CUDAExtension(
        name="zmqdisagg.native._C",
        sources=["csrc/python_api.cpp", "csrc/copy.cu"],
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},  # torch adds the C++ standard and arch flags
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**native_extension())
