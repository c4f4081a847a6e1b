"""Shared test configuration: devices to parametrise over and hypothesis profiles.

Every op test takes the `device` fixture, so the same tests run on CUDA where a GPU exists and the
CUDA parameter is skipped elsewhere.
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

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_CUDA_KERNELS), reason="needs a GPU and the CUDA kernels"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def pytest_report_header(config):
    try:
        import ksl_ops

        return f"ksl_ops {ksl_ops.__version__}, backend {ksl_ops.backend()}, torch {torch.__version__}"
    except Exception as exc:  # pragma: no cover
        return f"ksl_ops not importable: {exc}"
