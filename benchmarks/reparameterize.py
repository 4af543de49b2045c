"""Structural re-parameterization: inference of the zoo's ResNet-50, RepVGG-A0 and RepVGG-B0 before and after
vitops.reparameterize (the targets: ResNet-50 >= 1.15x once its BatchNorms are folded, RepVGG's deploy form
>= 1.8x its train-time form), and vitops.ops.fuse_conv_bn against torch.nn.utils.fusion.fuse_conv_bn_weights.

CPU: float32, batch 16 at 224 px (quick: batch 4); GPU: bfloat16 channels_last, batch 64 (weights folded in
float32, then cast). BatchNorm statistics and affines are random, so nothing folds to a trivial identity.
FLOPs: matrix/convolution FLOPs of the re-parameterized form (the least a forward needs), counted on the meta
device. Minimal bytes: the images and the re-parameterized weights, read once; fuse_conv_bn reads the weight and
writes the fused one.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

import vitops
from benchmarks.harness import BASELINE, VITOPS, Case, Context, Provider, Table, measure, model_flops, vitops_providers

MODELS = ("resnet50", "repvgg_a0", "repvgg_b0")
TRAIN_FORM = "train-time form"
FOLDED = "reparameterized"
TORCH_FUSION = "torch fuse_conv_bn_weights"


def _deploy_form(name: str) -> nn.Module:
    """The re-parameterized architecture, built directly (for counting on the meta device): RepVGG's
    inference_mode; ResNet-50's folded convs have the convs' own FLOPs (a BatchNorm has no matrix FLOPs)."""
    return vitops.create_model(name, inference_mode=True) if name.startswith("repvgg") else vitops.create_model(name)


@functools.cache
def _flops_and_params(name: str, batch: int, size: int) -> tuple[float, int]:
    with torch.device("meta"):
        params = sum(p.numel() for p in _deploy_form(name).parameters())
    return model_flops(lambda: _deploy_form(name), (batch, 3, size, size), train=False), params


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cuda":
        batch, dtype = (32 if quick else 64), torch.bfloat16
    else:
        batch, dtype = (4 if quick else 16), torch.float32
    size = 224
    out = []
    for name in MODELS[:2] if quick else MODELS:
        flops, params = _flops_and_params(name, batch, size)
        weights_and_images = (params + batch * 3 * size * size) * dtype.itemsize
        out.append(Case("reparameterized inference", f"{name} B={batch} {size}px", ("eval",), dtype,
                        flops={"eval": flops}, bytes={"eval": weights_and_images},
                        spec={"model": name, "batch": batch, "size": size}))  # fmt: skip
    shapes = [(256, 256, 3, 3)] if quick else [(256, 256, 3, 3), (1024, 512, 1, 1), (512, 1, 7, 7)]
    for shape in shapes:
        out.append(Case("fuse_conv_bn", "x".join(map(str, shape)), ("fold",), torch.float32, flops={"fold": 0.0},
                        bytes={"fold": 2 * math.prod(shape) * 4}, spec={"shape": shape}))  # fmt: skip
    return out


def _randomize_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    return model


def _for_device(model: nn.Module, device: str) -> nn.Module:
    if device == "cuda":
        return model.to(device=device, dtype=torch.bfloat16, memory_format=torch.channels_last)
    return model


def _model_table(ctx: Context) -> Table:
    table = Table("reparameterized inference", TRAIN_FORM, "eval", [
        Provider(FOLDED, VITOPS, "vitops.reparameterize(model): RepVGG blocks become one 3x3 conv, BatchNorms folded"),
        Provider(TRAIN_FORM, BASELINE, "the same model as trained: multi-branch blocks, separate BatchNorms"),
    ], about="model(x) in eval mode under no_grad; BatchNorm statistics random")  # fmt: skip
    for case in cases(ctx.device, ctx.quick):
        if case.op == table.op:
            _time_model(ctx, table, case)
    return table.finish()


def _time_model(ctx: Context, table: Table, case: Case) -> None:
    s = case.spec
    torch.manual_seed(0)
    model = _randomize_bn(vitops.create_model(s["model"])).eval()
    transform = measure({"t": lambda: vitops.reparameterize(model)}, "cpu", quick=True)["t"]
    folded, report = vitops.reparameterize(model)
    table.notes.append(f"vitops.reparameterize({s['model']}) takes {transform.median:.0f} ms on the CPU "
                       f"({report.conv_bn_pairs} conv-BN pairs, {sum(report.blocks.values())} blocks)")  # fmt: skip
    x = torch.randn(s["batch"], 3, s["size"], s["size"])
    if ctx.device == "cuda":
        x = x.to(device=ctx.device, dtype=torch.bfloat16, memory_format=torch.channels_last)
    nets = {TRAIN_FORM: _for_device(model, ctx.device), FOLDED: _for_device(folded, ctx.device)}
    ctx.step("reparameterize", case.name)
    with torch.no_grad():
        table.add(ctx, case, "eval", measure({p: (lambda net=net: net(x)) for p, net in nets.items()},
                                             ctx.device, ctx.quick))  # fmt: skip


def _fusion_table(ctx: Context) -> Table:
    vitops_backends = vitops_providers("fuse_conv_bn", ctx.device, "vitops.ops.fuse_conv_bn", reference=True)
    table = Table("fuse_conv_bn", TORCH_FUSION, "fold", [p for _, p in vitops_backends] + [
        Provider(TORCH_FUSION, BASELINE, "torch.nn.utils.fusion.fuse_conv_bn_weights"),
    ], about="fold a BatchNorm into the conv weight and bias before it")  # fmt: skip
    for case in cases(ctx.device, ctx.quick):
        if case.op == table.op:
            _time_fusion(ctx, table, case, vitops_backends)
    return table.finish()


def _time_fusion(ctx: Context, table: Table, case: Case, vitops_backends: list[tuple[str, Provider]]) -> None:
    c = case.spec["shape"][0]
    w = torch.randn(case.spec["shape"], device=ctx.device)
    mean, var = torch.randn(c, device=ctx.device), torch.rand(c, device=ctx.device) + 0.5
    gamma, beta, bias = (torch.randn(c, device=ctx.device) for _ in range(3))

    def fused(backend):
        with vitops.use_backend(backend):
            return vitops.ops.fuse_conv_bn(w, bias, mean, var, gamma, beta, 1e-5)

    fns = {p.name: (lambda b=backend: fused(b)) for backend, p in vitops_backends}
    fns[TORCH_FUSION] = lambda: fuse_conv_bn_weights(w, bias, mean, var, 1e-5, gamma, beta)
    ctx.step("reparameterize", f"fuse_conv_bn {case.name}")
    with torch.no_grad():
        table.add(ctx, case, "fold", measure(fns, ctx.device, ctx.quick))


def run(ctx: Context) -> list[Table]:
    return [_model_table(ctx), _fusion_table(ctx)]
