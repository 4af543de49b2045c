"""The CUDA attention kernels (csrc/cuda/attention_kernels.cuh), compiled as plain C++ and run on the CPU with one
std::thread per CUDA thread (tests/cpp/attention_emulation.cpp), against the reference. Without a GPU this is
what checks their indexing, masking, strided/packed addressing and synchronisation; it says nothing about their
speed or about the half/bfloat16 conversions (the emulation runs them on float32)."""
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from vitops.ops import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "tests", "cpp", "attention_emulation.cpp")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = str(tmp_path_factory.mktemp("attention_emulation") / "attention_emulation")
    result = subprocess.run(
        [cxx, "-std=c++20", "-O1", "-pthread", "-o", exe, SOURCE], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return exe


@pytest.mark.parametrize(
    "b,h,nq,nk,d,packed",
    [
        (1, 2, 50, 50, 64, True),  # ViT/32 tokens, packed qkv layout
        (2, 1, 17, 40, 40, False),  # Nq != Nk, head_dim not a power of two
        (1, 1, 256, 256, 32, True),  # the longest sequence the kernels take: 8 keys per lane
        (1, 1, 1, 1, 32, True),  # a single token
        (1, 1, 33, 7, 128, False),  # the largest head_dim: 4 dims per lane
    ],
)
def test_cuda_kernels_in_emulation(emulator, tmp_path, b, h, nq, nk, d, packed):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, nq, d, generator=g)
    k = torch.randn(b, h, nk, d, generator=g)
    v = torch.randn(b, h, nk, d, generator=g)
    grad_out = torch.randn(b, h, nq, d, generator=g)
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    np.concatenate([t.numpy().ravel() for t in (q, k, v, grad_out)]).astype(np.float32).tofile(src)
    args = [emulator, *map(str, (b, h, nq, nk, d, int(packed))), str(src), str(dst)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    raw = torch.from_numpy(np.fromfile(dst, dtype=np.float32))
    sizes = [b * h * nq * d, b * h * nq, b * h * nq * d, b * h * nk * d, b * h * nk * d]
    out, lse, dq, dk, dv = torch.split(raw, sizes)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    want = reference.attention(q64, k64, v64)
    want_lse = torch.logsumexp((q64 @ k64.transpose(-2, -1)) * d**-0.5, dim=-1)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), grad_out.double())
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.view(b, h, nq, d).double(), want.detach(), **tol)
    torch.testing.assert_close(lse.view(b, h, nq).double(), want_lse.detach(), **tol)
    for got, shape, w in zip((dq, dk, dv), ((b, h, nq, d), (b, h, nk, d), (b, h, nk, d)), want_grads):
        torch.testing.assert_close(got.view(shape).double(), w, **tol)
