"""Benchmark of structural re-parameterization: inference time of a stand-in ResNet-ish stack and a RepVGG stack
before and after vitops.reparameterize, and the time of the weight fusion itself (vitops.ops.fuse_conv_bn on
each available backend against torch.nn.utils.fusion.fuse_conv_bn_weights).

`run(device, quick)` returns one row per measurement:
    {"op", "case", "provider", "mode", "ms", "speedup"}
where `speedup` is the baseline's time over this row's (the baseline row itself has 1.0).
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

import vitops
from vitops import _backend
from vitops.layers import RepVGGBlock


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, device: str, quick: bool) -> float:
    warmup, reps = (2, 5) if quick else (5, 30)
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _resnet_ish(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        _Bottleneck(width, width // 2, 2 * width, 1), _Bottleneck(2 * width, width // 2, 2 * width, 1),
        _Bottleneck(2 * width, width, 4 * width, 2), _Bottleneck(4 * width, width, 4 * width, 1),
    )  # fmt: skip


def _repvgg(width: int) -> nn.Module:
    return nn.Sequential(
        RepVGGBlock(3, width, 3, stride=2), RepVGGBlock(width, width), RepVGGBlock(width, width),
        RepVGGBlock(width, 2 * width, stride=2), RepVGGBlock(2 * width, 2 * width), RepVGGBlock(2 * width, 2 * width),
    )  # fmt: skip


def _randomize_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    return model


def _row(op: str, case: str, provider: str, mode: str, ms: float, speedup: float) -> dict:
    return dict(op=op, case=case, provider=provider, mode=mode, ms=ms, speedup=speedup)


def _model_rows(device: str, quick: bool) -> list[dict]:
    rows = []
    batch, size, width = (2, 64, 32) if quick else (4, 128, 64)
    x = torch.randn(batch, 3, size, size, device=device)
    for name, build in (("resnet-ish", _resnet_ish), ("repvgg", _repvgg)):
        model = _randomize_bn(build(width)).to(device).eval()
        fused, _ = vitops.reparameterize(model)
        case = f"{name} w={width} b={batch} {size}x{size}"
        with torch.no_grad():
            base = _time_ms(lambda: model(x), device, quick)
            after = _time_ms(lambda: fused(x), device, quick)
        transform = _time_ms(lambda: vitops.reparameterize(model), device, True)
        rows.append(_row("reparameterize", case, "unfused", "inference", base, 1.0))
        rows.append(_row("reparameterize", case, "reparameterized", "inference", after, base / after))
        rows.append(_row("reparameterize", f"{name} w={width}", "vitops.reparameterize", "transform", transform, 1.0))
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
        with torch.no_grad():
            base = _time_ms(lambda: fuse_conv_bn_weights(w, bias, mean, var, 1e-5, gamma, beta), device, quick)
            rows.append(_row("fuse_conv_bn", case, "torch.nn.utils.fusion", "inference", base, 1.0))
            for backend in _backend.BACKENDS:
                if _backend.availability()["fuse_conv_bn"][device][backend] is not None:
                    continue
                with vitops.use_backend(backend):
                    ms = _time_ms(lambda: vitops.ops.fuse_conv_bn(w, bias, mean, var, gamma, beta, 1e-5), device, quick)
                rows.append(_row("fuse_conv_bn", case, f"vitops-{backend}", "inference", ms, base / ms))
    return rows


def run(device: str, quick: bool) -> list[dict]:
    """Rows for `device` ("cpu" or "cuda"); `quick` uses smaller shapes and fewer repetitions."""
    torch.manual_seed(0)
    return _model_rows(device, quick) + _fusion_rows(device, quick)


if __name__ == "__main__":
    for row in run("cuda" if torch.cuda.is_available() else "cpu", quick=True):
        print(row)
