"""Build of the ``ksl_ops._C`` extension.

The CPU kernels are always built. The CUDA kernels are built when the installed torch has CUDA and a
CUDA toolkit is found, unless told otherwise:

    KSL_OPS_CUDA=auto   (default) CUDA when torch.version.cuda and nvcc are both present
    KSL_OPS_CUDA=1      require CUDA; fail if it cannot be built
    KSL_OPS_CUDA=0      CPU only
    TORCH_CUDA_ARCH_LIST  honoured; default "8.0;9.0"
    KSL_OPS_DEBUG=1     -O0 -g, no fast-math anywhere
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    mode = os.environ.get("KSL_OPS_CUDA", "auto").strip().lower()
    have = torch.version.cuda is not None and CUDA_HOME is not None
    if mode in ("0", "off", "false", "no"):
        return False
    if mode in ("1", "on", "true", "yes"):
        if not have:
            raise RuntimeError(
                "KSL_OPS_CUDA=1 but CUDA cannot be built here: torch.version.cuda="
                f"{torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}"
            )
        return True
    if not have:
        reason = "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit (nvcc) found"
        print(f"ksl_ops: building the CPU kernels only ({reason}); set KSL_OPS_CUDA=1 to require CUDA.")
    return have


def _extension():
    debug = os.environ.get("KSL_OPS_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    rel = lambda paths: sorted(os.path.relpath(p, HERE) for p in paths)  # noqa: E731
    sources = rel(glob.glob(os.path.join(HERE, "csrc", "*.cpp")) + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    # -g0: Python's own CFLAGS carry -g, and debug info for the kernels' template copies costs about a
    # fifth of the C++ build time and most of the library's size; KSL_OPS_DEBUG=1 keeps it.
    cxx = opt + ([] if debug else ["-g0"]) + ["-fopenmp", "-fdiagnostics-color=always"]
    include_dirs = [os.path.join(HERE, "csrc")]
    kwargs = dict(
        name="ksl_ops._C",
        include_dirs=include_dirs,
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
        nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx + ["-DKSL_WITH_CUDA"], "nvcc": nvcc + ["-DKSL_WITH_CUDA"]}, **kwargs)
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    packages=[
        "ksl_ops",
        "ksl_ops.models",
        "ksl_ops.data",
        "ksl_ops.engine",
        "ksl_ops.reference",
    ],
    # reference/ sits at the top of the repository (it is the readable spec) and installs as
    # ksl_ops.reference, which is what backend="reference" runs.
    package_dir={"ksl_ops.reference": "reference"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
