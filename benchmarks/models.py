"""Model zoo: a training step and an inference forward of vitops' models against timm's of the same architecture.

Training step = zero_grad, forward and cross-entropy (bf16 autocast on the GPU), backward, optimizer step. The
vitops model runs with vitops' Lamb and with torch's fused AdamW (the model's share of the difference, the
optimizer held equal); timm's model with timm's Lamb and with torch's fused AdamW (the baseline). Inference: eval
mode, no_grad. CPU: float32 at a reduced resolution.

FLOPs: matrix/convolution FLOPs of timm's model, counted on the meta device (benchmarks.harness.model_flops).
Minimal bytes: every float32 weight read once and the images, plus for training each gradient written once and
AdamW's 28 bytes per parameter.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

import vitops
from benchmarks.harness import BASELINE, VITOPS, Case, Context, Provider, Table, measure, model_flops

# Each optimizer is compared with itself, so that a table compares models and (for Lamb) the optimizer's kernels.
PROVIDERS_LAMB = [
    Provider("vitops + Lamb", VITOPS, "vitops.create_model + vitops.optim.Lamb"),
    Provider("timm + Lamb", BASELINE, "timm.create_model + timm.optim.Lamb"),
]
PROVIDERS_ADAMW = [
    Provider("vitops + AdamW", VITOPS, "vitops.create_model + torch.optim.AdamW(fused=True)"),
    Provider("timm + AdamW", BASELINE, "timm.create_model + torch.optim.AdamW(fused=True)"),
]
PROVIDERS_EVAL = [
    Provider("vitops", VITOPS, "vitops.create_model, default backends"),
    Provider("timm", BASELINE, "timm.create_model"),
]


@functools.cache
def _flops(name: str, batch: int, size: int, train: bool) -> float:
    import timm

    kwargs = {"img_size": size} if name.startswith("deit") else {}
    return model_flops(lambda: timm.create_model(name, **kwargs), (batch, 3, size, size), train)


@functools.cache
def _param_count(name: str) -> int:
    import timm

    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(name).parameters())


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cuda":
        batch, size, dtype = (32 if quick else 64), 224, torch.bfloat16
    else:
        batch, size, dtype = (4, 64, torch.float32) if quick else (8, 112, torch.float32)
    out = []
    for name in ("deit_small_patch16_224", "resnet50"):
        images = batch * 3 * size * size * 4
        weights = 4 * _param_count(name)
        spec = {"model": name, "batch": batch, "size": size}
        label = f"{name} B={batch} {size}px"
        out.append(Case("train_step", label, ("train",), dtype, flops={"train": _flops(name, batch, size, True)},
                        bytes={"train": images + weights * (1 + 1 + 7)}, spec=spec))  # fmt: skip
        out.append(Case("inference", label, ("eval",), dtype, flops={"eval": _flops(name, batch, size, False)},
                        bytes={"eval": images + weights}, spec=spec))  # fmt: skip
    return out


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def _make_model(source: str, spec: dict, device: str) -> torch.nn.Module:
    import timm

    create = vitops.create_model if source == "vitops" else timm.create_model
    kwargs = {"img_size": spec["size"]} if spec["model"].startswith("deit") else {}
    torch.manual_seed(0)
    model = create(spec["model"], num_classes=1000, **kwargs).to(device)
    if device == "cuda" and spec["model"].startswith("resnet"):
        model = model.to(memory_format=torch.channels_last)
    return model


def _optimizer(name: str, model: torch.nn.Module):
    import timm.optim

    if name.endswith("+ Lamb"):
        cls = vitops.optim.Lamb if name.startswith("vitops") else timm.optim.Lamb
        return cls(model.parameters(), lr=1e-3, weight_decay=0.05)
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)


def run(ctx: Context) -> list[Table]:
    about = "zero_grad, forward, cross-entropy, backward, optimizer step"
    train_lamb = Table("train_step with Lamb", "timm + Lamb", "train", PROVIDERS_LAMB, about=about)
    train_adamw = Table("train_step with AdamW", "timm + AdamW", "train", PROVIDERS_ADAMW, about=about)
    infer = Table("inference", "timm", "eval", PROVIDERS_EVAL, about="model(x) in eval mode under no_grad")
    all_cases = cases(ctx.device, ctx.quick)
    for case in all_cases:
        if case.op == "train_step":
            eval_case = next(c for c in all_cases if c.op == "inference" and c.name == case.name)
            _time_model(ctx, case, eval_case, train_lamb, train_adamw, infer)
    return [train_lamb.finish(), train_adamw.finish(), infer.finish()]


def _time_model(ctx: Context, case: Case, eval_case: Case, train_lamb: Table, train_adamw: Table, infer: Table):
    s = case.spec
    x = torch.randn(s["batch"], 3, s["size"], s["size"], device=ctx.device)
    if ctx.device == "cuda" and s["model"].startswith("resnet"):
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (s["batch"],), device=ctx.device)
    models = {source: _make_model(source, s, ctx.device).train() for source in ("vitops", "timm")}
    steps = {}
    for p in PROVIDERS_LAMB + PROVIDERS_ADAMW:
        model = models[p.name.split(" + ")[0]]
        optimizer = _optimizer(p.name, model)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            with _autocast(ctx.device):
                loss = F.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()

        steps[p.name] = step  # (measure's warm-up call creates the optimizer's state)
    ctx.step("models", f"{case.name}, train step")
    timings = measure(steps, ctx.device, ctx.quick)  # all four in turns
    for table, providers in ((train_lamb, PROVIDERS_LAMB), (train_adamw, PROVIDERS_ADAMW)):
        table.add(ctx, case, "train", {p.name: timings[p.name] for p in providers})
    del steps

    def forward(model):
        with torch.no_grad(), _autocast(ctx.device):
            return model(x)

    for model in models.values():
        model.eval()
    ctx.step("models", f"{case.name}, inference")
    forwards = {p.name: (lambda m=models[p.name]: forward(m)) for p in PROVIDERS_EVAL}
    infer.add(ctx, eval_case, "eval", measure(forwards, ctx.device, ctx.quick))
