"""The fused optimizer steps' CUDA kernels (csrc/cuda/lamb_kernels.cuh, adamp_kernels.cuh), compiled as plain C++
and run on the CPU with one std::thread per CUDA thread (tests/cpp/optim_emulation.cpp), on the tables the CUDA
host code builds, against the reference. Without a GPU this is what checks their multi-tensor indexing (chunks
of whole rows and pieces of one row), block reductions and finalize kernels; it says nothing about their speed or
their float16/bfloat16 paths (the emulation runs float32 params)."""
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from vitops.optim import reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "tests", "cpp", "optim_emulation.cpp")
CUDA_CHUNK = 1 << 13  # kCudaChunk in csrc/cuda/multi_tensor_kernels.cuh

# a tensor over several chunks, rows shorter than a chunk (many per chunk), rows longer than one, an empty tensor
SHAPES = [(3 * CUDA_CHUNK + 5,), (64, 3, 7, 7), (383,), (500, 20), (2, CUDA_CHUNK + 808), (0,), (7, 1)]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = str(tmp_path_factory.mktemp("optim_emulation") / "optim_emulation")
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")  # c10's Half and BFloat16
    result = subprocess.run(
        [cxx, "-std=c++20", "-O1", "-pthread", "-ffp-contract=off", f"-I{torch_include}", "-o", exe, SOURCE],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return exe


def _state(seed: int):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) * 0.1 for s in SHAPES]
    grads = [torch.randn(s, generator=g) * 0.01 for s in SHAPES]
    exp_avgs = [torch.randn(s, generator=g) * 1e-3 for s in SHAPES]
    exp_avg_sqs = [torch.rand(s, generator=g) * 1e-4 for s in SHAPES]
    return params, grads, exp_avgs, exp_avg_sqs


def _run(emulator, tmp_path, op, state, args, bias_corrections=None):
    params, grads, exp_avgs, exp_avg_sqs = state
    # LAMB's norms are per tensor (one row); AdamP's cosine similarities per size(0) row too
    rows = [p.shape[0] if op == "adamp" and p.ndim > 1 else 1 for p in params]
    header = [np.array([len(params)], np.int64), np.array([p.numel() for p in params], np.int64),
              np.array([p.ndim for p in params], np.int64), np.array(rows, np.int64)]  # fmt: skip
    if bias_corrections is not None:
        header += [np.array(bc, np.float64) for bc in bias_corrections]
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(src, "wb") as f:
        for part in header:
            f.write(part.tobytes())
        for tensors in zip(params, grads, exp_avgs, exp_avg_sqs):
            for t in tensors:
                f.write(t.numpy().astype(np.float32).tobytes())
    result = subprocess.run([emulator, op, str(src), str(dst), *map(str, args)], capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    raw = torch.from_numpy(np.fromfile(dst, dtype=np.float32))
    out = list(torch.split(raw, [p.numel() for p in params for _ in range(3)]))
    return [[out[3 * i + j].view(p.shape) for i, p in enumerate(params)] for j in range(3)]


def _assert_matches(got, want):
    for got_list, want_list in zip(got, want):
        for a, b in zip(got_list, want_list):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight_decay,decoupled,trust_clip,clip", [
    (0.01, False, False, 2.5),  # coupled decay, trust ratio, clipped grads
    (0.05, True, True, 0.0),    # decoupled decay, LAMBC's capped ratio, no clipping
    (0.0, False, False, 0.0),   # no adaptation: one stage
])  # fmt: skip
def test_lamb_cuda_kernels_in_emulation(emulator, tmp_path, weight_decay, decoupled, trust_clip, clip):
    lr, beta1, beta2, eps, step = 1e-2, 0.9, 0.999, 1e-6, 3
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    adapt = weight_decay != 0
    state = _state(0)
    args = [lr, beta1, beta2, 1 - beta1, bc1, bc2, eps, weight_decay, lr, int(decoupled), int(adapt),
            int(trust_clip), clip]  # fmt: skip
    got = _run(emulator, tmp_path, "lamb", state, args)
    params, grads, exp_avgs, exp_avg_sqs = _state(0)
    clip_coef = torch.tensor(clip) if clip > 0 else None
    reference.lamb_step(params, grads, exp_avgs, exp_avg_sqs, clip_coef, lr, beta1, beta2, 1 - beta1, bc1, bc2, eps,
                        weight_decay, lr, decoupled, adapt, trust_clip)  # fmt: skip
    _assert_matches(got, (params, exp_avgs, exp_avg_sqs))


def _adamp_state():
    """Params whose grads take each of AdamP's paths: none, channel-wise and layer-wise projection."""
    params, grads, exp_avgs, exp_avg_sqs = _state(1)
    conv, wide = params[1], params[3]
    flat = conv.flatten(1)
    g = torch.randn(flat.shape, generator=torch.Generator().manual_seed(2))
    grads[1] = (g - (g * flat).sum(1, keepdim=True) / (flat * flat).sum(1, keepdim=True) * flat).view(conv.shape)
    # rows in equal pairs, grads +row / -row: every row's cosine is 1, the whole tensor's is 0
    wide[1::2] = wide[0::2]
    grads[3] = wide * torch.where(torch.arange(wide.shape[0]) % 2 == 0, 1.0, -1.0)[:, None]
    for i, want in ((1, "channel"), (3, "layer"), (4, None)):
        _, ratio = reference.adamp_projection(params[i].clone(), grads[i], grads[i].clone(), 0.1, 0.1, 1e-8, False)
        assert (ratio != 1.0) == (want is not None), f"params[{i}] does not take the {want} path"
    return params, grads, exp_avgs, exp_avg_sqs


@pytest.mark.parametrize("nesterov", [False, True])
def test_adamp_cuda_kernels_in_emulation(emulator, tmp_path, nesterov):
    lr, beta1, beta2, eps, wd, delta, wd_ratio = 1e-2, 0.9, 0.999, 1e-8, 0.1, 0.1, 0.1
    steps = [1 + i % 3 for i in range(len(SHAPES))]  # AdamP counts steps per param
    bc1 = [1 - beta1**s for s in steps]
    bc2 = [1 - beta2**s for s in steps]
    got = _run(emulator, tmp_path, "adamp", _adamp_state(), [lr, beta1, beta2, eps, wd, delta, wd_ratio,
               int(nesterov)], (bc1, bc2))  # fmt: skip
    params, grads, exp_avgs, exp_avg_sqs = _adamp_state()
    reference.adamp_step(params, grads, exp_avgs, exp_avg_sqs, bc1, bc2, lr, beta1, beta2, eps, wd, delta, wd_ratio,
                         nesterov)  # fmt: skip
    _assert_matches(got, (params, exp_avgs, exp_avg_sqs))
