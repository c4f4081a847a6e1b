"""Shared test configuration: devices to parametrise over, hypothesis profiles, CUDA-only tests.

Every op test takes the `device` fixture, so the same tests run on CUDA where a GPU exists and the
CUDA parameter is skipped elsewhere. Tests that only make sense on a GPU are marked
`@pytest.mark.cuda` and skipped where there is no GPU or no CUDA build of the kernels.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", deadline=None, max_examples=30, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", deadline=None, max_examples=500,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA_KERNELS = False
try:
    import ksl_ops

    HAS_CUDA_KERNELS = ksl_ops.backend() == "cpu+cuda"
except Exception:  # pragma: no cover - reported by the import tests instead
    pass

CAN_RUN_CUDA = torch.cuda.is_available() and HAS_CUDA_KERNELS
NO_CUDA_REASON = "needs a GPU and the CUDA kernels"

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CAN_RUN_CUDA, reason=NO_CUDA_REASON))]


def pytest_configure(config):
    # Registered here as well as in pyproject.toml, so the suite also runs from a copy of tests/
    # against an installed wheel (CI does), where pyproject.toml is not read.
    config.addinivalue_line("markers", "slow: long-running tests (still run in CI)")
    config.addinivalue_line("markers", "cuda: needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    if CAN_RUN_CUDA:
        return
    skip = pytest.mark.skip(reason=NO_CUDA_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    """The tiny synthetic set (_helpers.SYNTH), rendered once per test module."""
    from _helpers import render_tiny_synth

    return render_tiny_synth(tmp_path_factory)


@pytest.fixture
def capture_cuda_graph():
    """Returns capture(step): runs `step()` twice on a side stream (the warm-up CUDA graphs need),
    then captures one call of it into a CUDA graph. Gives (graph, what the captured call returned)."""

    def capture(step):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        return graph, out

    return capture


def pytest_report_header(config):
    try:
        import ksl_ops

        return f"ksl_ops {ksl_ops.__version__}, backend {ksl_ops.backend()}, torch {torch.__version__}"
    except Exception as exc:  # pragma: no cover
        return f"ksl_ops not importable: {exc}"
