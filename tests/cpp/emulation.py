"""Builds a CUDA-emulation driver (tests/cpp/<name>.cpp, which includes cuda_emulation.h and ops' ATen-free
csrc/cuda/<op>.cuh) as a shared library that tests call through ctypes on tensors they allocate. Built once per
test session."""
from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


@functools.cache
def build(name: str) -> ctypes.CDLL:
    """Compiles tests/cpp/<name>.cpp (a few seconds) and loads it; skips the calling test without a compiler."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    library = os.path.join(tempfile.mkdtemp(prefix=f"vitops_{name}_"), f"{name}.so")
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")  # c10's macros, Half and BFloat16
    command = [cxx, "-std=c++20", "-O1", "-pthread", "-fPIC", "-shared", "-ffp-contract=off", f"-I{torch_include}",
               "-o", library, os.path.join(HERE, f"{name}.cpp")]  # fmt: skip
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return ctypes.CDLL(library)
