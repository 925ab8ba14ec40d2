"""Build hook for the optional native kernel; all metadata lives in pyproject.toml.

``modlm.kernels._fewrow`` (modlm/kernels/csrc/fewrow.c) speeds up few-row fp32 matrix products when decoding
on x86-64 CPUs. It is optional: if it fails to build (no C compiler, another architecture),
the install still succeeds and modlm uses torch's kernels.
"""

import platform

from setuptools import Extension, setup

_gcc_like = platform.system() in ("Linux", "FreeBSD")
ext = Extension(
    "modlm.kernels._fewrow",
    sources=["modlm/kernels/csrc/fewrow.c"],
    extra_compile_args=["-O3", "-fopenmp"] if _gcc_like else ["-O3"],
    extra_link_args=["-fopenmp"] if _gcc_like else [],
    optional=True,
)

setup(ext_modules=[ext])
