"""Model zoo: training-step and inference throughput (images/s) of vitops models against timm's.

Training step = zero_grad, forward and cross-entropy under AMP bf16 (on the GPU), backward, optimizer step.
Providers: vitops model + vitops Lamb (where vitops.optim is built), timm model + timm Lamb, timm model + torch
fused AdamW, and vitops model + torch fused AdamW (the model's share of the difference, optimizer held equal).
Inference: eval mode, no_grad, bf16 autocast on the GPU. On the CPU everything is fp32, and quick=True uses a
tiny batch and resolution.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import vitops
from benchmarks.harness import add_speedups, measure_ms_interleaved, row

try:
    import timm
    import timm.optim
except ImportError:  # the vitops rows still run
    timm = None

try:
    from vitops.optim import Lamb as VitopsLamb
except ImportError:  # another branch builds it; its provider is skipped until then
    VitopsLamb = None

BASELINE = "timm + torch fused AdamW"


def cases(device: str, quick: bool):
    """(model name, batch, image size, model kwargs)."""
    if device == "cuda":
        batch = 32 if quick else 64
        return [("deit_small_patch16_224", batch, 224, {}), ("resnet50", batch, 224, {})]
    if quick:
        return [("deit_small_patch16_224", 4, 64, dict(img_size=64)), ("resnet50", 4, 64, {})]
    return [("deit_small_patch16_224", 8, 112, dict(img_size=112)), ("resnet50", 8, 112, {})]


def _autocast(device: str):
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _adamw(model, device: str):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=device == "cuda")


def _providers(device: str):
    """name -> (model factory name, optimizer factory)."""
    out = {}
    if VitopsLamb is not None:
        out["vitops + vitops Lamb"] = ("vitops", lambda m: VitopsLamb(m.parameters(), lr=1e-3, weight_decay=0.05))
    out["vitops + torch fused AdamW"] = ("vitops", lambda m: _adamw(m, device))
    if timm is not None:
        out["timm + timm Lamb"] = ("timm", lambda m: timm.optim.Lamb(m.parameters(), lr=1e-3, weight_decay=0.05))
        out[BASELINE] = ("timm", lambda m: _adamw(m, device))
    return out


def _make_model(source: str, name: str, kwargs: dict, device: str):
    create = vitops.create_model if source == "vitops" else timm.create_model
    model = create(name, num_classes=1000, **kwargs).to(device)
    if device == "cuda" and name.startswith("resnet"):
        model = model.to(memory_format=torch.channels_last)
    return model


def run(device: str, quick: bool) -> list[dict]:
    rows = []
    amp = "bf16" if device == "cuda" else "fp32"
    for name, batch, size, kwargs in cases(device, quick):
        case = f"{name} B={batch}" + (f" {size}px" if size != 224 else "")
        x = torch.randn(batch, 3, size, size, device=device)
        if device == "cuda" and name.startswith("resnet"):
            x = x.contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 1000, (batch,), device=device)
        models, steps = {}, {}
        for provider, (source, make_opt) in _providers(device).items():
            torch.manual_seed(0)
            model = _make_model(source, name, kwargs, device).train()
            models.setdefault(source, model)
            optimizer = make_opt(model)

            def step(model=model, optimizer=optimizer):
                optimizer.zero_grad(set_to_none=True)
                with _autocast(device):
                    loss = F.cross_entropy(model(x), target)
                loss.backward()
                optimizer.step()

            for _ in range(3):  # allocate optimizer state, warm the allocator, outside the timing
                step()
            steps[provider] = step
        for provider, ms in measure_ms_interleaved(steps, device, quick).items():
            rows.append(row(op="train_step", case=case, provider=provider, mode="train", ms=ms, device=device,
                            quick=quick, images_per_s=round(batch / (ms * 1e-3), 1), amp=amp))  # fmt: skip
        del steps

        def infer(model):
            with torch.no_grad(), _autocast(device):
                return model(x)

        for model in models.values():
            model.eval()
        infers = {source: (lambda model=model: infer(model)) for source, model in models.items()}
        for source, ms in measure_ms_interleaved(infers, device, quick).items():
            rows.append(row(op="inference", case=case, provider=source, mode="eval", ms=ms, device=device,
                            quick=quick, images_per_s=round(batch / (ms * 1e-3), 1), amp=amp))  # fmt: skip
    add_speedups(rows, BASELINE)
    add_speedups(rows, "timm")
    return rows
