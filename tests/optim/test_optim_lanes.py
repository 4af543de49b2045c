"""The CPU optimizer kernels' AVX2 build against their scalar build, bit for bit (tests/cpp/optim_lanes_test.cpp):
both run csrc/lamb.h's and csrc/adamp.h's arithmetic, the AVX2 one eight lanes at a time with its own loads,
stores, float16/bfloat16 conversions and lane-ordered sums."""
import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = [os.path.join(ROOT, *path) for path in (
    ("tests", "cpp", "optim_lanes_test.cpp"), ("csrc", "cpu", "optim_avx2.cpp"), ("csrc", "cpu", "optim_scalar.cpp"))]


def test_avx2_kernels_match_the_scalar_kernels_bit_for_bit(tmp_path):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = str(tmp_path / "optim_lanes_test")
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")  # c10's Half and BFloat16
    build = subprocess.run([cxx, "-std=c++20", "-O2", "-ffp-contract=off", f"-I{torch_include}", "-o", exe, *SOURCES],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    if run.returncode == 77:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stdout[-4000:]
    assert "bit for bit" in run.stdout
