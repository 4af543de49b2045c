"""drop_path_add: the end of every ViT/ResNet block, `x + drop_path(ls(branch))`, fused vs what users run today.

Baselines: timm's eager `x + drop_path(branch)` / `x + drop_path(branch * gamma)`, and torch.compile of the same.
Minimal bytes: the forward reads residual and branch and writes the output; the backward reads the upstream
gradient (and the branch, for gamma's gradient) and writes the branch's gradient; the residual's gradient is the
upstream gradient itself. No matrix FLOPs: every row is memory-bound.
"""
from __future__ import annotations

import math

import torch

import vitops
from benchmarks.harness import BASELINE, Case, Context, Provider, Table, measure, vitops_providers
from vitops.ops import drop_path_add

try:
    from timm.layers import drop_path as timm_drop_path

    TIMM = "timm eager"
except ImportError:  # the reference is timm's code path, op for op
    from vitops.ops.reference import drop_path as timm_drop_path

    TIMM = "timm's ops, eager"

COMPILED = "compile(timm)"
DROP_PROB = 0.1
MODES = ("fwd", "bwd", "fwd+bwd")


def _case(name: str, shape: tuple[int, ...], dtype: torch.dtype, gamma_shape=None, channels_last=False) -> Case:
    tensor = math.prod(shape) * dtype.itemsize
    fwd, bwd = 3 * tensor, (3 if gamma_shape else 2) * tensor
    return Case("drop_path_add", name, MODES, dtype, flops=dict.fromkeys(MODES, 0.0),
                bytes={"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd},
                spec={"shape": shape, "gamma_shape": gamma_shape, "channels_last": channels_last})  # fmt: skip


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cuda":
        bf16 = torch.bfloat16
        full = [
            _case("ViT-B tokens B=256", (256, 197, 768), bf16),
            _case("ViT-B tokens B=256 +LayerScale", (256, 197, 768), bf16, (768,)),
            _case("ViT-S tokens B=256 +LayerScale", (256, 197, 384), bf16, (384,)),
            _case("ResNet-50 stage 1 NHWC B=256", (256, 256, 56, 56), bf16, channels_last=True),
            _case("ConvNeXt stage 1 NCHW B=128 +LayerScale", (128, 96, 56, 56), bf16, (96, 1, 1)),
        ]
        return full[1:2] if quick else full
    # float32; each tensor (19 MB and 25 MB) is well beyond a core's L2, three of them beyond the L3
    f32 = torch.float32
    full = [
        _case("ViT-S tokens B=64", (64, 197, 384), f32),
        _case("ViT-S tokens B=64 +LayerScale", (64, 197, 384), f32, (384,)),
        _case("NCHW 64x56x56 B=32", (32, 64, 56, 56), f32),
        _case("NCHW 64x56x56 B=32 +LayerScale", (32, 64, 56, 56), f32, (64, 1, 1)),
    ]
    return full[:2] if quick else full


def unfused(residual, branch, gamma):
    scaled = branch if gamma is None else branch * gamma
    return residual + timm_drop_path(scaled, DROP_PROB, True)


def _vitops_call(backend: str):
    def call(residual, branch, gamma):
        with vitops.use_backend(backend):
            return drop_path_add(residual, branch, DROP_PROB, True, gamma)

    return call


def run(ctx: Context) -> list[Table]:
    vitops_backends = vitops_providers("drop_path_add", ctx.device, "vitops.ops.drop_path_add",
                                       reference=ctx.device == "cpu")  # fmt: skip
    providers = [p for _, p in vitops_backends] + [
        Provider(TIMM, BASELINE, "x + timm.layers.drop_path(branch [* gamma]), eager"),
        Provider(COMPILED, BASELINE, "torch.compile of the same timm code (inductor, static shapes)"),
    ]
    table = Table("drop_path_add", TIMM, "fwd+bwd", providers,
                  about=f"residual + drop_path(branch [* gamma]), drop_prob={DROP_PROB}, training")  # fmt: skip
    # The backward is timed alone by replaying it with retain_graph, which donated buffers forbid.
    torch._functorch.config.donated_buffer = False
    for case in cases(ctx.device, ctx.quick):
        _time_case(ctx, table, case, vitops_backends)
    return [table.finish()]


def _time_case(ctx: Context, table: Table, case: Case, vitops_backends: list[tuple[str, Provider]]) -> None:
    spec = case.spec
    make = {"device": ctx.device, "dtype": case.dtype}
    residual, branch = torch.randn(spec["shape"], **make), torch.randn(spec["shape"], **make)
    if spec["channels_last"]:
        residual = residual.contiguous(memory_format=torch.channels_last)
        branch = branch.contiguous(memory_format=torch.channels_last)
    residual.requires_grad_()
    branch.requires_grad_()
    gamma = torch.full(spec["gamma_shape"], 0.1, **make, requires_grad=True) if spec["gamma_shape"] else None
    inputs = [t for t in (residual, branch, gamma) if t is not None]
    grad = torch.randn_like(residual)
    torch._dynamo.reset()  # each case compiles afresh for its own static shapes
    fns = {p.name: _vitops_call(backend) for backend, p in vitops_backends}
    fns[TIMM] = unfused
    fns[COMPILED] = torch.compile(unfused, dynamic=False)
    calls: dict[str, dict] = {mode: {} for mode in MODES}
    for name, fn in fns.items():
        fn(residual, branch, gamma)  # compile outside the timing
        out = fn(residual, branch, gamma)

        def forward(fn=fn):
            with torch.no_grad():
                return fn(residual, branch, gamma)

        def backward(out=out):
            torch.autograd.grad(out, inputs, grad, retain_graph=True)

        def both(fn=fn):
            torch.autograd.grad(fn(residual, branch, gamma), inputs, grad)

        calls["fwd"][name], calls["bwd"][name], calls["fwd+bwd"][name] = forward, backward, both
    for mode in MODES:
        ctx.step("drop_path", f"{case.name}, {mode}")
        table.add(ctx, case, mode, measure(calls[mode], ctx.device, ctx.quick))
