"""Build of the ``ksl_ops._C`` extension against the torch that is already installed.

    pip install torch ninja
    pip install --no-build-isolation .        # or -e ".[test]" for development

The CPU kernels are always built. The CUDA kernels are built when the installed torch is a CUDA build
and a CUDA toolkit with the same major version is found:

    KSL_OPS_CUDA=auto   (default) CUDA when it can be built; otherwise the CPU kernels only, and the
                        build log and `ksl env` say why in one line
    KSL_OPS_CUDA=1      require CUDA: fail with that line instead
    KSL_OPS_CUDA=0      CPU only
    CUDA_HOME / CUDA_PATH  the toolkit folder (the one holding bin/nvcc); found otherwise, see below
    TORCH_CUDA_ARCH_LIST   honoured; default "8.0;9.0"
    KSL_OPS_DEBUG=1     -O0 -g, no fast-math anywhere

The toolkit is looked for in this order, and the first folder that has both ``bin/nvcc`` and
``libcudart`` in the library folder torch links against (``lib64``, else ``lib``) is used:
CUDA_HOME or CUDA_PATH (when set, only that folder), the toolkit that the ``nvcc`` on PATH runs (which
may be a wrapper script outside the toolkit: nvcc itself reports its install folder), then
/usr/local/cuda, /usr/local/cuda-<version> (newest first) and /opt/cuda.

The build writes ``ksl_ops/_build_info.py``: the torch it compiled against, whether CUDA is in and why
not. ``import ksl_ops`` refuses a compiled library built for another torch (a C++ ABI mismatch would
otherwise fail with an obscure symbol error, or not at all until it crashes).
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
INSTALL_HINT = ("install torch first (e.g. `pip install torch ninja`), then build against it with "
                "`pip install --no-build-isolation .`")

try:
    import torch
except ImportError:
    # pip's default build isolation builds in a fresh environment without the user's torch; building
    # against another torch than the one that will import the library would give a broken install.
    sys.exit(f"ksl-ops: torch is not importable in the build environment. ksl-ops compiles against the "
             f"torch you already have: {INSTALL_HINT}.")


class CudaUnavailable(Exception):
    """Why the CUDA kernels cannot be built here, in one line with what to set."""


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def _nvcc_toolkit(nvcc):
    """The install folder of the toolkit that `nvcc` (possibly a wrapper script) runs."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        open(src, "w").close()
        try:
            out = _run([nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")])
        except (OSError, subprocess.SubprocessError):
            return None
    # nvcc --dryrun prints its variables, e.g. "#$ TOP=/usr/local/cuda-13.0/bin/..".
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    if m:
        return os.path.normpath(m.group(1).strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _cudart_folder(home):
    # torch.utils.cpp_extension links CUDA extensions with -L<home>/lib64, or <home>/lib without lib64.
    lib = os.path.join(home, "lib64")
    if not os.path.isdir(lib):
        lib = os.path.join(home, "lib")
    return lib


def _toolkit_problem(home):
    """None when `home` is a usable toolkit, else what is missing."""
    if not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return f"{home} has no bin/nvcc"
    lib = _cudart_folder(home)
    if not glob.glob(os.path.join(lib, "libcudart.so*")):
        return f"{home} has no libcudart.so in {lib}"
    return None


def _candidates():
    """(where it came from, folder) in the order of the module docstring."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return [(f"${var}", os.environ[var])]
    found = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = _nvcc_toolkit(nvcc)
        if home:
            found.append((f"the toolkit of {nvcc}", home))
    def version_key(path):
        return [int(p) for p in re.findall(r"\d+", os.path.basename(path))]
    versioned = sorted(glob.glob("/usr/local/cuda-*"), key=version_key, reverse=True)
    for home in ["/usr/local/cuda", *versioned, "/opt/cuda"]:
        if os.path.isdir(home):
            found.append(("a standard location", home))
    return found


def _toolkit_version(home):
    try:
        out = _run([os.path.join(home, "bin", "nvcc"), "--version"]).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def find_cuda_toolkit():
    """(folder, version) of a toolkit that can build against the installed torch, or CudaUnavailable."""
    if torch.version.cuda is None:
        raise CudaUnavailable(f"torch {torch.__version__} is a CPU build; install a CUDA build of torch "
                              "to build the CUDA kernels")
    tried = []
    for origin, home in _candidates():
        home = os.path.normpath(home)
        problem = _toolkit_problem(home)
        if problem is None:
            version = _toolkit_version(home)
            if version is None or version.split(".")[0] != torch.version.cuda.split(".")[0]:
                problem = (f"{home} is CUDA {version}, torch {torch.__version__} needs CUDA "
                           f"{torch.version.cuda.split('.')[0]}.x")
            else:
                return home, version
        tried.append(f"{origin}: {problem}")
    where = "; ".join(tried) if tried else "no nvcc on PATH and none in /usr/local/cuda*, /opt/cuda"
    raise CudaUnavailable(f"no usable CUDA toolkit ({where}); set CUDA_HOME to the toolkit folder that holds "
                          "bin/nvcc and lib64/libcudart.so, or KSL_OPS_CUDA=0 for the CPU kernels only")


def _cuda_mode():
    mode = os.environ.get("KSL_OPS_CUDA", "auto").strip().lower()
    for name, values in (("0", ("0", "off", "false", "no")), ("1", ("1", "on", "true", "yes")), ("auto", ("auto", ""))):
        if mode in values:
            return name
    sys.exit(f"ksl-ops: KSL_OPS_CUDA must be 0, 1 or auto, got {mode!r}")


def _configure_cuda():
    """(toolkit folder, version) to build the CUDA kernels with, or (None, reason)."""
    mode = _cuda_mode()
    if mode == "0":
        return None, "KSL_OPS_CUDA=0"
    try:
        home, version = find_cuda_toolkit()
    except CudaUnavailable as exc:
        if mode == "1":
            sys.exit(f"ksl-ops: KSL_OPS_CUDA=1 but the CUDA kernels cannot be built: {exc}")
        print(f"ksl-ops: building the CPU kernels only: {exc}", flush=True)
        return None, str(exc)
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported, which is below.
    os.environ["CUDA_HOME"] = home
    return (home, version), None


def _write_build_info(cuda, skipped):
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") if cuda else None
    info = {
        "TORCH_VERSION": torch.__version__,
        "TORCH_CUDA": torch.version.cuda,
        "WITH_CUDA": cuda is not None,
        "CUDA_TOOLKIT": cuda[0] if cuda else None,
        "CUDA_TOOLKIT_VERSION": cuda[1] if cuda else None,
        "CUDA_ARCH_LIST": arch,
        "CUDA_SKIPPED": skipped,
        "DEBUG": os.environ.get("KSL_OPS_DEBUG", "0") == "1",
    }
    lines = ['"""Written by setup.py at build time: what ksl_ops._C was compiled against (not in git)."""']
    lines += [f"{key} = {value!r}" for key, value in info.items()]
    with open(os.path.join(HERE, "ksl_ops", "_build_info.py"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _extension(cuda):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = os.environ.get("KSL_OPS_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    rel = lambda paths: sorted(os.path.relpath(p, HERE) for p in paths)  # noqa: E731
    sources = rel(glob.glob(os.path.join(HERE, "csrc", "*.cpp"))
                  + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    # -g0: Python's own CFLAGS carry -g, and debug info for the kernels' template copies costs about a
    # fifth of the C++ build time and most of the library's size; KSL_OPS_DEBUG=1 keeps it.
    cxx = opt + ([] if debug else ["-g0"]) + ["-fopenmp", "-fdiagnostics-color=always"]
    kwargs = dict(
        name="ksl_ops._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
        # The module's only Python C API call is PyModule_Create, and with py_limited_api torch compiles
        # with Py_LIMITED_API=3.10 and does not link libtorch_python: the library is abi3, one build for
        # every CPython >= 3.10. The torch it links is an exact dependency of its own, which
        # _build_info.py records and `import ksl_ops` checks.
        py_limited_api=True,
    )
    if cuda is not None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
        nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo", "-DKSL_WITH_CUDA"]
        return CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx + ["-DKSL_WITH_CUDA"], "nvcc": nvcc},
                             **kwargs)
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)


def main():
    from setuptools import find_packages, setup

    cuda, skipped = _configure_cuda()
    ext = _extension(cuda)
    _write_build_info(cuda, skipped)
    from torch.utils.cpp_extension import BuildExtension

    setup(
        packages=[*find_packages(include=["ksl_ops", "ksl_ops.*"]), "ksl_ops.reference"],
        # reference/ sits at the top of the repository (it is the readable spec) and installs as
        # ksl_ops.reference, which is what backend="reference" runs.
        package_dir={"ksl_ops.reference": "reference"},
        ext_modules=[ext],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )


if __name__ == "__main__":
    main()
