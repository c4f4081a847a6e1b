"""What this installation is made of, for bug reports: ``python -m ksl_ops.env`` or ``ksl env``.

Versions of Python, torch, CUDA and the compiler; what the compiled library was built against and
whether its CUDA kernels are in (and why not); the CPU's vector features and the thread settings;
GPUs; the versions of the packages ksl-ops works with.
"""
from __future__ import annotations

import importlib
import os
import platform
import shutil
import subprocess
import sys
from types import ModuleType
from typing import Dict, List, Optional, Sequence, Tuple

import torch

# The report: sections of (key, value) rows, each section with its title.
Sections = List[Tuple[str, List[Tuple[str, str]]]]

__all__ = ["collect", "format_report", "main"]

_OPTIONAL = ("numpy", "PIL", "torchvision", "torchreid", "sklearn", "matplotlib", "tqdm")


def _cpuinfo() -> Dict[str, str]:
    """The first processor's entries of /proc/cpuinfo (empty where there is none)."""
    info: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the first processor's block
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def _cpu_flags(info: Dict[str, str]) -> str:
    if "flags" not in info:
        return "unknown"
    have = set(info["flags"].split())
    return " ".join(x for x in ("avx2", "fma", "avx512f", "avx512bw") if x in have) or "none of avx2/fma/avx512"


def _command_version(cmd: List[str]) -> str:
    exe = shutil.which(cmd[0])
    if exe is None:
        return "not found"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{exe}: {exc}"
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    return f"{lines[-1].strip() if cmd[0] == 'nvcc' else lines[0].strip()} ({exe})" if lines else exe


def _package_version(name: str) -> str:
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any import failure is worth reporting as such
        return "not installed" if isinstance(exc, ModuleNotFoundError) else f"import fails: {exc}"
    return str(getattr(module, "__version__", "installed"))


def collect() -> Sections:
    """The report as sections of (key, value) rows."""
    import ksl_ops
    from ksl_ops import _ext

    info: Optional[ModuleType]
    try:
        info = importlib.import_module("ksl_ops._build_info")
    except ImportError:
        info = None

    build: List[Tuple[str, str]] = [("ksl_ops", f"{ksl_ops.__version__} ({os.path.dirname(ksl_ops.__file__)})"),
                                    ("backend", ksl_ops.backend())]
    if _ext.load_error() is not None:
        build.append(("load error", str(_ext.load_error())))
    if info is None:
        build.append(("built against", "no build record (ksl_ops/_build_info.py): not built from this tree"))
    else:
        build.append(("built against torch", info.TORCH_VERSION))
        if info.WITH_CUDA:
            build.append(("CUDA kernels", f"in: toolkit {info.CUDA_TOOLKIT} (CUDA {info.CUDA_TOOLKIT_VERSION}), "
                                          f"arch {info.CUDA_ARCH_LIST}"))
        else:
            build.append(("CUDA kernels", f"not built: {info.CUDA_SKIPPED}"))
        build.append(("debug build", str(info.DEBUG)))

    gpus: List[Tuple[str, str]] = [("torch.cuda.is_available()", str(torch.cuda.is_available()))]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            gpus.append((f"cuda:{i}", f"{torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})"))

    cpu = _cpuinfo()
    sections = [
        ("system", [("python", f"{sys.version.split()[0]} ({sys.executable})"),
                    ("platform", platform.platform()),
                    ("cpu", cpu.get("model name") or platform.processor() or "unknown"),
                    ("cpu features", _cpu_flags(cpu)),
                    ("torch cpu capability", torch.backends.cpu.get_cpu_capability()),
                    ("cores", str(os.cpu_count())),
                    ("torch threads",
                     f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op"),
                    ("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "unset"))]),
        ("torch", [("torch", f"{torch.__version__} ({os.path.dirname(torch.__file__)})"),
                   ("torch CUDA", str(torch.version.cuda)),
                   ("C++11 ABI", str(torch.compiled_with_cxx11_abi())),
                   ("debug", str(torch.version.debug))]),
        ("ksl-ops build", build),
        ("GPUs", gpus),
        ("compilers", [("c++", _command_version(["c++", "--version"])),
                       ("nvcc", _command_version(["nvcc", "--version"])),
                       ("CUDA_HOME", os.environ.get("CUDA_HOME", "unset"))]),
        ("packages", [(name, _package_version(name)) for name in _OPTIONAL]),
    ]
    return sections


def format_report(sections: Optional[Sections] = None) -> str:
    sections = collect() if sections is None else sections
    lines: List[str] = []
    for title, rows in sections:
        lines.append(f"{title}:")
        width = max(len(k) for k, _ in rows)
        lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def as_dict(sections: Optional[Sections] = None) -> Dict[str, Dict[str, str]]:
    sections = collect() if sections is None else sections
    return {title: dict(rows) for title, rows in sections}


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="ksl env", description="Report versions and build settings for a bug report.")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    print(json.dumps(as_dict(), indent=1) if args.json else format_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
