"""Test configuration. Without a GPU, Triton kernels run on the CPU under the Triton interpreter, so the
interpreter must be switched on before triton is first imported."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vitops import _backend  # noqa: E402  (after TRITON_INTERPRET is set)

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
