"""Structural re-parameterization: inference time of the zoo's ResNet-50, RepVGG-A0 and RepVGG-B0 before and
after vitops.reparameterize (the issue's targets: ResNet-50 >= 1.15x once its BatchNorms are folded, RepVGG's
deploy form >= 1.8x its train-time form), the time of the whole-model transform, and vitops.ops.fuse_conv_bn on
each available backend against torch.nn.utils.fusion.fuse_conv_bn_weights.

Batch 64 at 224 px (quick: batch 4 at 96 px); CPU in float32, GPU in bfloat16 and channels_last (weights are
folded in float32, then cast). BatchNorm statistics and affines are random, so nothing folds to a trivial
identity. TFLOP/s counts the FLOPs of each form (vitops.ReparamReport).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

import vitops
from benchmarks.harness import add_speedups, measure_ms, measure_ms_interleaved, row
from vitops import _backend

MODELS = ("resnet50", "repvgg_a0", "repvgg_b0")


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


def _model_rows(device: str, quick: bool) -> list[dict]:
    rows = []
    batch, size = (4, 96) if quick else (64, 224)
    dtype = "bf16 channels_last" if device == "cuda" else "fp32"
    for name in MODELS:
        torch.manual_seed(0)
        model = _randomize_bn(vitops.create_model(name)).eval()
        probe = torch.randn(1, 3, size, size)
        transform_ms = measure_ms(lambda: vitops.reparameterize(model), "cpu", quick=True)
        folded, report = vitops.reparameterize(model, example_input=probe)
        x = torch.randn(batch, 3, size, size)
        if device == "cuda":
            x = x.to(device=device, dtype=torch.bfloat16, memory_format=torch.channels_last)
        case = f"{name} B={batch} {size}px {dtype}"
        forms = {"train-time form": (model, report.flops_before), "reparameterized": (folded, report.flops_after)}
        nets = {provider: _for_device(net, device) for provider, (net, _) in forms.items()}
        with torch.no_grad():
            times = measure_ms_interleaved({p: (lambda net=net: net(x)) for p, net in nets.items()}, device, quick)
        for provider, ms in times.items():
            rows.append(row(op="inference", case=case, provider=provider, mode="eval", ms=ms, device=device,
                            quick=quick, flops=forms[provider][1] * batch,
                            images_per_s=round(batch / (ms * 1e-3), 1)))  # fmt: skip
        rows.append(row(op="reparameterize", case=f"{name} (whole model, CPU, fp32)", provider="vitops",
                        mode="transform", ms=transform_ms, device="cpu", quick=quick,
                        conv_bn_pairs=report.conv_bn_pairs, blocks=sum(report.blocks.values()),
                        params=f"{report.params_before}->{report.params_after}"))  # fmt: skip
    add_speedups(rows, "train-time form")
    return rows


def _fusion_rows(device: str, quick: bool) -> list[dict]:
    rows = []
    shapes = [(256, 256, 3, 3)] if quick else [(256, 256, 3, 3), (1024, 512, 1, 1), (512, 1, 7, 7)]
    for shape in shapes:
        c = shape[0]
        w = torch.randn(shape, device=device)
        mean, var = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
        gamma, beta, bias = torch.randn(c, device=device), torch.randn(c, device=device), torch.randn(c, device=device)
        case = "x".join(map(str, shape))
        # read w, write the fused weight; the per-channel vectors are negligible
        bytes_moved = 2 * w.numel() * w.element_size()
        with torch.no_grad():
            ms = measure_ms(lambda: fuse_conv_bn_weights(w, bias, mean, var, 1e-5, gamma, beta), device, quick)
            rows.append(row(op="fuse_conv_bn", case=case, provider="torch.nn.utils.fusion", mode="fold", ms=ms,
                            device=device, quick=quick, bytes_moved=bytes_moved))  # fmt: skip
            for backend in _backend.BACKENDS:
                if _backend.availability()["fuse_conv_bn"][device][backend] is not None:
                    continue
                with vitops.use_backend(backend):
                    ms = measure_ms(
                        lambda: vitops.ops.fuse_conv_bn(w, bias, mean, var, gamma, beta, 1e-5), device, quick
                    )
                rows.append(row(op="fuse_conv_bn", case=case, provider=f"vitops-{backend}", mode="fold", ms=ms,
                                device=device, quick=quick, bytes_moved=bytes_moved))  # fmt: skip
    add_speedups(rows, "torch.nn.utils.fusion")
    return rows


def run(device: str, quick: bool) -> list[dict]:
    """Rows for `device` ("cpu" or "cuda"); `quick` uses smaller inputs and fewer repetitions."""
    return _model_rows(device, quick) + _fusion_rows(device, quick)


if __name__ == "__main__":
    from benchmarks.harness import format_table

    print(format_table(run("cuda" if torch.cuda.is_available() else "cpu", quick=True)))
