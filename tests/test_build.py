"""The build's CUDA toolkit discovery and its messages (setup.py), the build record, and the load check.

setup.py is imported as a module (its setup() call runs only as a script). Toolkits are fake folders
with an `nvcc` script that answers `--version` and `--dryrun` the way nvcc does; the real nvcc is
exercised by CI, which builds and links the CUDA extension against a CUDA torch.
"""
import importlib.util
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ksl_ops

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "setup.py"
needs_source = pytest.mark.skipif(not SETUP.is_file(),
                                  reason="setup.py is not here (tests run from an installed wheel)")


@pytest.fixture
def build(monkeypatch):
    spec = importlib.util.spec_from_file_location("ksl_setup", SETUP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for var in ("CUDA_HOME", "CUDA_PATH", "KSL_OPS_CUDA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(module.torch.version, "cuda", "13.0")
    monkeypatch.setattr(module.glob, "glob", _only_tmp_globs(module.glob.glob))
    monkeypatch.setattr(module.os.path, "isdir", _only_tmp_dirs(os.path.isdir))
    return module


def _only_tmp_globs(glob):
    # The machine's own /usr/local/cuda* must not leak into a test of the search order.
    machine = ("/usr/local/cuda", "/opt/cuda")
    return lambda pattern, *a, **k: [] if pattern.startswith(machine) else glob(pattern, *a, **k)


def _only_tmp_dirs(isdir):
    return lambda p: False if str(p).startswith(("/usr/local/cuda", "/opt/cuda")) else isdir(p)


def _executable(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _toolkit(root: Path, version="13.0", cudart=True, lib="lib64") -> Path:
    """A folder laid out like a CUDA toolkit: bin/nvcc (answers --version, --dryrun), lib64/libcudart.so."""
    _executable(root / "bin" / "nvcc", textwrap.dedent(f"""\
        #!/bin/sh
        case "$*" in
          *--dryrun*) echo "#\\$ _HERE_={root}/bin"; echo "#\\$ TOP={root}/bin/.." ;;
          *) echo "Cuda compilation tools, release {version}, V{version}.1" ;;
        esac
        """))
    (root / lib).mkdir(parents=True, exist_ok=True)
    if cudart:
        (root / lib / "libcudart.so").write_bytes(b"")
    return root


def _path_with(monkeypatch, folder: Path):
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}/usr/bin{os.pathsep}/bin")


@needs_source
def test_cuda_home_is_used_when_set(build, tmp_path, monkeypatch):
    home = _toolkit(tmp_path / "cuda-13.0")
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert build.find_cuda_toolkit() == (str(home), "13.0")


@needs_source
def test_cuda_home_without_cudart_names_the_folder_and_what_to_set(build, tmp_path, monkeypatch):
    home = _toolkit(tmp_path / "cuda", cudart=False)
    monkeypatch.setenv("CUDA_HOME", str(home))
    with pytest.raises(build.CudaUnavailable) as e:
        build.find_cuda_toolkit()
    msg = str(e.value)
    assert f"$CUDA_HOME: {home} has no libcudart.so in {home}/lib64" in msg
    assert "set CUDA_HOME to the toolkit folder" in msg and "\n" not in msg


@needs_source
def test_nvcc_wrapper_outside_the_toolkit_finds_the_toolkit_it_runs(build, tmp_path, monkeypatch):
    # The machine's layout: /usr/local/bin/nvcc is `exec /usr/local/cuda-13.0/bin/nvcc "$@"`, so the
    # parent of the folder holding nvcc (torch's guess) has no libcudart.
    home = _toolkit(tmp_path / "cuda-13.0")
    _executable(tmp_path / "wrappers" / "nvcc", f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    _path_with(monkeypatch, tmp_path / "wrappers")
    assert build.find_cuda_toolkit() == (str(home), "13.0")


@needs_source
def test_toolkit_with_lib_instead_of_lib64(build, tmp_path, monkeypatch):
    home = _toolkit(tmp_path / "cuda", lib="lib")
    monkeypatch.setenv("CUDA_PATH", str(home))
    assert build.find_cuda_toolkit() == (str(home), "13.0")


@needs_source
def test_toolkit_of_another_major_version_is_refused(build, tmp_path, monkeypatch):
    home = _toolkit(tmp_path / "cuda-12.8", version="12.8")
    monkeypatch.setenv("CUDA_HOME", str(home))
    with pytest.raises(build.CudaUnavailable, match=r"is CUDA 12\.8, torch .* needs CUDA 13\.x"):
        build.find_cuda_toolkit()


@needs_source
def test_no_toolkit_anywhere(build, tmp_path, monkeypatch):
    _path_with(monkeypatch, tmp_path / "empty")
    with pytest.raises(build.CudaUnavailable, match="no nvcc on PATH and none in /usr/local/cuda"):
        build.find_cuda_toolkit()


@needs_source
def test_cpu_torch_says_so(build, monkeypatch):
    monkeypatch.setattr(build.torch.version, "cuda", None)
    with pytest.raises(build.CudaUnavailable, match="is a CPU build; install a CUDA build of torch"):
        build.find_cuda_toolkit()


@needs_source
def test_auto_falls_back_with_one_line_and_required_fails_with_it(build, tmp_path, monkeypatch, capsys):
    _path_with(monkeypatch, tmp_path / "empty")
    assert build._configure_cuda()[0] is None
    out = capsys.readouterr().out.strip()
    assert out.startswith("ksl-ops: building the CPU kernels only: no usable CUDA toolkit") and "\n" not in out
    monkeypatch.setenv("KSL_OPS_CUDA", "1")
    with pytest.raises(SystemExit, match="KSL_OPS_CUDA=1 but the CUDA kernels cannot be built: no usable"):
        build._configure_cuda()
    monkeypatch.setenv("KSL_OPS_CUDA", "maybe")
    with pytest.raises(SystemExit, match="KSL_OPS_CUDA must be 0, 1 or auto, got 'maybe'"):
        build._configure_cuda()


@needs_source
def test_found_toolkit_becomes_cuda_home_for_torch(build, tmp_path, monkeypatch):
    home = _toolkit(tmp_path / "cuda-13.0")
    _executable(tmp_path / "wrappers" / "nvcc", f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    _path_with(monkeypatch, tmp_path / "wrappers")
    monkeypatch.setenv("CUDA_HOME", "")  # unset for the search, and restored after the test
    assert build._configure_cuda() == ((str(home), "13.0"), None)
    assert os.environ["CUDA_HOME"] == str(home)


@needs_source
def test_isolated_build_without_torch_stops_with_one_line():
    # What pip's default build isolation runs: setup.py where torch cannot be imported.
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', 'egg_info']; "
            f"exec(compile(open({str(SETUP)!r}).read(), 'setup.py', 'exec'), "
            f"{{'__name__': '__main__', '__file__': {str(SETUP)!r}}})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "torch is not importable in the build environment" in lines[0]
    assert "pip install --no-build-isolation" in lines[0]


def test_build_record_matches_the_running_torch():
    from ksl_ops import _build_info

    assert _build_info.TORCH_VERSION == torch.__version__
    assert _build_info.WITH_CUDA == ksl_ops._ext.has_cuda_kernels()
    if not _build_info.WITH_CUDA:
        assert _build_info.CUDA_SKIPPED  # the reason is recorded


def test_library_built_for_another_torch_is_refused_with_how_to_rebuild(tmp_path):
    # A copy of the installed package whose build record names another torch: its ops must fail with
    # an error that says so, without loading the library.
    import shutil

    pkg = Path(ksl_ops.__file__).parent
    shutil.copytree(pkg, tmp_path / "ksl_ops", ignore=shutil.ignore_patterns("__pycache__"))
    info = tmp_path / "ksl_ops" / "_build_info.py"
    info.write_text(info.read_text().replace(f"TORCH_VERSION = {torch.__version__!r}", "TORCH_VERSION = '1.0.0'"))
    code = textwrap.dedent("""\
        import torch, ksl_ops
        assert ksl_ops.backend() == "none", ksl_ops.backend()
        try:
            ksl_ops.embedding_consensus(torch.randn(2, 3, 4))
        except RuntimeError as exc:
            print(exc)
        """)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"compiled against torch 1.0.0, but torch {torch.__version__} is installed" in r.stdout
    assert "pip install --no-build-isolation" in r.stdout


def test_env_report_names_versions_and_build():
    from ksl_ops import env

    report = env.as_dict()
    assert report["torch"]["torch"].startswith(torch.__version__)
    assert report["ksl-ops build"]["backend"] == ksl_ops.backend()
    assert report["ksl-ops build"]["built against torch"] == torch.__version__
    assert "cpu features" in report["system"] and "torch threads" in report["system"]
    text = env.format_report()
    assert "ksl-ops build:" in text and "CUDA kernels" in text
    from ksl_ops.cli import main

    assert main(["env", "--json"]) == 0
