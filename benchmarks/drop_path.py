"""drop_path_add: the end of every ViT/ResNet block, `x + drop_path(ls(branch))`, fused vs what users run today.

Baselines: timm's eager `x + drop_path(branch)` / `x + drop_path(ls(branch))`, and torch.compile of the same.
Minimal bytes: the forward reads residual and branch and writes the output; the backward reads the upstream
gradient (and the branch, for gamma's gradient) and writes the branch's gradient; the residual's gradient is the
upstream gradient itself.
"""
from __future__ import annotations

import torch

import vitops
from benchmarks.harness import add_speedups, measure_ms_interleaved, row
from vitops import _backend
from vitops.ops import drop_path_add

try:
    from timm.layers import drop_path as timm_drop_path

    BASELINE = "timm eager"
except ImportError:  # the reference is timm's code path, op for op
    from vitops.ops.reference import drop_path as timm_drop_path

    BASELINE = "torch eager (timm's ops)"

DROP_PROB = 0.1


def cases(device: str, quick: bool):
    """(name, shape, dtype, gamma shape or None, memory format)."""
    if device == "cuda":
        dtype = torch.bfloat16
        return [
            ("vit_b tokens B=256", (256, 197, 768), dtype, None, None),
            ("vit_b tokens B=256 +ls", (256, 197, 768), dtype, (768,), None),
            ("vit_s tokens B=256 +ls", (256, 197, 384), dtype, (384,), None),
            ("resnet50 s1 NHWC B=256", (256, 256, 56, 56), dtype, None, torch.channels_last),
            ("convnext s1 NCHW B=128 +ls", (128, 96, 56, 56), dtype, (96, 1, 1), None),
        ]
    batch = 32 if quick else 64  # big enough to spill out of the caches
    return [
        (f"vit_s tokens B={batch}", (batch, 197, 384), torch.float32, None, None),
        (f"vit_s tokens B={batch} +ls", (batch, 197, 384), torch.float32, (384,), None),
        (f"resnet stage NCHW B={batch // 2} +ls", (batch // 2, 64, 56, 56), torch.float32, (64, 1, 1), None),
    ]


def unfused(residual, branch, gamma):
    scaled = branch if gamma is None else branch * gamma
    return residual + timm_drop_path(scaled, DROP_PROB, True)


def fused(residual, branch, gamma):
    return drop_path_add(residual, branch, DROP_PROB, True, gamma)


def providers(device: str, quick: bool):
    """name -> callable(residual, branch, gamma)."""
    out = {}
    for backend in _backend.BACKENDS:
        if _backend.availability()["drop_path_add"][device][backend] is None:

            def call(r, b, g, backend=backend):
                with vitops.use_backend(backend):
                    return fused(r, b, g)

            out[f"vitops {backend}"] = call
    out[BASELINE] = unfused
    # The backward is timed alone, by replaying it with retain_graph, which donated buffers forbid.
    torch._functorch.config.donated_buffer = False
    out["torch.compile(timm)"] = torch.compile(unfused)
    return out


def run(device: str, quick: bool) -> list[dict]:
    rows = []
    for name, shape, dtype, gamma_shape, memory_format in cases(device, quick):
        residual = torch.randn(shape, device=device, dtype=dtype)
        branch = torch.randn(shape, device=device, dtype=dtype)
        if memory_format is not None:
            residual = residual.contiguous(memory_format=memory_format)
            branch = branch.contiguous(memory_format=memory_format)
        residual.requires_grad_()
        branch.requires_grad_()
        gamma = torch.full(gamma_shape, 0.1, device=device, dtype=dtype, requires_grad=True) if gamma_shape else None
        inputs = [t for t in (residual, branch, gamma) if t is not None]
        grad = torch.randn_like(residual)
        tensor_bytes = residual.numel() * residual.element_size()
        bytes_by_mode = {
            "fwd": 3 * tensor_bytes,
            "bwd": (3 if gamma is not None else 2) * tensor_bytes,
        }
        bytes_by_mode["fwd+bwd"] = bytes_by_mode["fwd"] + bytes_by_mode["bwd"]
        calls: dict[str, dict] = {mode: {} for mode in bytes_by_mode}
        for provider, fn in providers(device, quick).items():
            fn(residual, branch, gamma)  # compile / autotune outside the timing
            out = fn(residual, branch, gamma)

            def forward(fn=fn):
                with torch.no_grad():
                    return fn(residual, branch, gamma)

            def backward(out=out):
                torch.autograd.grad(out, inputs, grad, retain_graph=True)

            def both(fn=fn):
                torch.autograd.grad(fn(residual, branch, gamma), inputs, grad)

            calls["fwd"][provider], calls["bwd"][provider], calls["fwd+bwd"][provider] = forward, backward, both
        for mode, fns in calls.items():
            for provider, ms in measure_ms_interleaved(fns, device, quick).items():
                rows.append(row(op="drop_path_add", case=name, provider=provider, mode=mode, ms=ms, device=device,
                                quick=quick, bytes_moved=bytes_by_mode[mode]))  # fmt: skip
    add_speedups(rows, BASELINE)
    return rows
