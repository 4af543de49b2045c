"""Test configuration. Without a GPU, Triton kernels run on the CPU under the Triton interpreter, so the
interpreter must be switched on before triton is first imported."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vitops import _backend  # noqa: E402  (after TRITON_INTERPRET is set)

try:
    from hypothesis import HealthCheck, Phase, settings
except ImportError:  # a test dependency: only the property-based tests (tests/fuzz) need it, and skip without it
    settings = None
if settings is not None:
    # The property-based tests (tests/fuzz) size their budgets from the profile's max_examples
    # (tests/fuzz/harness.py: examples). "ci", the default, is deterministic and fits CI's 2 cores in ~4 minutes;
    # `pytest tests/fuzz --hypothesis-profile=thorough` draws 25x as many new cases and keeps the failures it
    # finds in .hypothesis/ (git-ignored) to replay first next time. Registered here, not in tests/fuzz, because
    # --hypothesis-profile is read before the conftest files below tests/ are.
    _slow_is_fine = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
    # No shrinking in "ci": under Triton's interpreter shrinking one failure can take longer than the whole budget;
    # the failing example is printed as drawn (the thorough profile shrinks).
    settings.register_profile(
        "ci", max_examples=20, derandomize=True, database=None, deadline=None, print_blob=True,
        suppress_health_check=_slow_is_fine, phases=[Phase.explicit, Phase.reuse, Phase.generate],
    )  # fmt: skip
    settings.register_profile(
        "thorough", max_examples=500, deadline=None, print_blob=True, suppress_health_check=_slow_is_fine
    )
    if settings.get_current_profile_name() == "default":  # not when --hypothesis-profile chose one (this module
        settings.load_profile("ci")  # is imported a second time, as tests.conftest, after pytest has read it)

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def device_backend_params(op: str):
    """(device, backend) pairs for every backend of `op`; pairs that can't run here are skipped with the reason,
    CUDA ones only for lack of a GPU."""
    params = []
    for device in ("cpu", "cuda"):
        for backend in _backend.BACKENDS:
            reason = _backend.availability()[op][device][backend]
            if reason is not None and reason.startswith("runs "):
                continue  # a backend for the other device type
            marks = [pytest.mark.cuda] if device == "cuda" else []
            if device == "cuda" and not HAS_CUDA:
                marks.append(pytest.mark.skip(reason="needs a CUDA GPU"))
            elif reason is not None:
                marks.append(pytest.mark.skip(reason=reason))
            params.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return params
