"""The compiled extension is there when it should be. A broken build must fail the suite, not quietly skip
every compiled-backend test."""
import os
import shutil

import pytest
import torch

from vitops import _extension


@pytest.mark.skipif(os.environ.get("VITOPS_BUILD_CUDA") == "skip-ext", reason="extension deliberately not built")
def test_extension_loaded():
    assert _extension.LOAD_ERROR is None, _extension.LOAD_ERROR


def test_cuda_kernels_built_where_possible():
    cuda_home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if shutil.which("nvcc") else None)
    buildable = torch.version.cuda is not None and cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    if not buildable or os.environ.get("VITOPS_BUILD_CUDA") == "0":
        pytest.skip("no CUDA toolkit and CUDA torch here")
    assert [op for op in _extension.SCHEMAS if not _extension.has_compiled_kernel(op, "CUDA")] == []


@pytest.mark.skipif(_extension.LOAD_ERROR is not None, reason="extension not built")
def test_cpu_kernels_built_with_openmp():
    # at::parallel_for is a header template: an extension compiled without OpenMP runs every CPU kernel on one
    # thread, silently. The library then names libgomp among its dependencies.
    if not torch.backends.openmp.is_available():
        pytest.skip("this torch does not use OpenMP")
    with open(_extension._C.__file__, "rb") as library:
        assert b"libgomp" in library.read()
