"""One optimizer step of vitops' fused LAMB and AdamP against timm's, on the parameter sets of ViT-S/16, ViT-B/16
and ResNet-50 (float32 parameters and gradients only: a step does not depend on the model), with torch's fused
AdamW as a yardstick (a simpler update: what a fused LAMB can hope to approach).

Minimal bytes per float32 parameter (no FLOPs worth counting): LAMB 44 (the gradient-norm pass reads g: 4; the
moments pass reads p, g, m, v and writes m, v: 24; the apply pass reads p, m, v and writes p: 16); AdamP 40
(24 + 16: its projection needs whole-tensor sums before the update); AdamW 28.
"""
from __future__ import annotations

import torch

import vitops
from benchmarks.harness import BASELINE, YARDSTICK, Case, Context, Provider, Table, measure, vitops_providers

MIN_BYTES_PER_PARAM = {"lamb_step": 44, "adamp_step": 40}
LAMB = {"weight_decay": 0.05}
ADAMP = {"weight_decay": 0.05, "wd_ratio": 0.01, "nesterov": True}
ADAMW = "torch fused AdamW"


def vit_shapes(dim: int, depth: int, patch: int = 16, tokens: int = 197, classes: int = 1000) -> list[tuple]:
    shapes = [(dim, 3, patch, patch), (dim,), (1, 1, dim), (1, tokens, dim)]
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,), (dim,), (dim,),
                   (4 * dim, dim), (4 * dim,), (dim, 4 * dim), (dim,)]  # fmt: skip
    return shapes + [(dim,), (dim,), (classes, dim), (classes,)]


def resnet50_shapes() -> list[tuple]:
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        out = width * 4
        for b in range(blocks):
            shapes += [(width, in_ch, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (out, width, 1, 1), (out,), (out,)]  # fmt: skip
            if b == 0:
                shapes += [(out, in_ch, 1, 1), (out,), (out,)]
            in_ch = out
    return shapes + [(1000, 2048), (1000,)]


PARAM_SETS = {
    "ViT-S/16 params": vit_shapes(384, 12),
    "ViT-B/16 params": vit_shapes(768, 12),
    "ResNet-50 params": resnet50_shapes(),
}


def cases(device: str, quick: bool) -> list[Case]:
    names = ["ViT-S/16 params"] if quick else list(PARAM_SETS)
    out = []
    for op, bytes_per_param in MIN_BYTES_PER_PARAM.items():
        for name in names:
            shapes = PARAM_SETS[name]
            numel = sum(torch.Size(s).numel() for s in shapes)
            out.append(Case(op, f"{name} ({numel / 1e6:.1f}M)", ("step",), torch.float32, flops={"step": 0.0},
                            bytes={"step": bytes_per_param * numel}, spec={"shapes": shapes}))  # fmt: skip
    return out


def _params(shapes, device):
    gen = torch.Generator().manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device))
        p.grad = (torch.randn(s, generator=gen) * 1e-3).to(device)
        params.append(p)
    return params


class _Forced:
    """An optimizer whose step runs on one vitops backend."""

    def __init__(self, optimizer, backend: str):
        self.optimizer, self.backend = optimizer, backend

    def step(self):
        with vitops.use_backend(self.backend):
            return self.optimizer.step()


def _factories(op: str, device: str) -> tuple[str, list[Provider], dict]:
    """(baseline, providers, provider name -> params -> optimizer) for one op."""
    import timm.optim

    cls, kwargs, timm_cls = {"lamb_step": (vitops.optim.Lamb, LAMB, "Lamb"),
                             "adamp_step": (vitops.optim.AdamP, ADAMP, "AdamP")}[op]  # fmt: skip
    stages = {"lamb_step": "lamb_moments", "adamp_step": "adamp_moments"}  # the ops whose backends the step uses
    vitops_backends = vitops_providers(stages[op], device, f"vitops.optim.{timm_cls}.step")
    providers = [p for _, p in vitops_backends]
    make = {p.name: (lambda ps, b=backend: _Forced(cls(ps, **kwargs), b)) for backend, p in vitops_backends}
    baseline = f"timm {timm_cls}"
    if op == "lamb_step":
        providers.append(Provider(baseline, BASELINE, "timm.optim.Lamb as constructed by default (foreach: "
                                  "torch._foreach_* multi-tensor ops)"))  # fmt: skip
        make[baseline] = lambda ps: timm.optim.Lamb(ps, **kwargs)
        providers.append(Provider("timm Lamb per-tensor", BASELINE, "timm.optim.Lamb(foreach=False)"))
        make["timm Lamb per-tensor"] = lambda ps: timm.optim.Lamb(ps, **kwargs, foreach=False)
    else:  # timm's AdamP has no foreach form
        providers.append(Provider(baseline, BASELINE, "timm.optim.AdamP, one tensor at a time"))
        make[baseline] = lambda ps: timm.optim.AdamP(ps, **kwargs)
    providers.append(Provider(ADAMW, YARDSTICK, "torch.optim.AdamW(fused=True): a simpler update (no trust ratio or "
                              "projection), the fastest step torch has"))  # fmt: skip
    make[ADAMW] = lambda ps: torch.optim.AdamW(ps, weight_decay=0.05, fused=True)
    return baseline, providers, make


def run(ctx: Context) -> list[Table]:
    tables = []
    for op in MIN_BYTES_PER_PARAM:
        baseline, providers, make = _factories(op, ctx.device)
        table = Table(op, baseline, "step", providers, about="one optimizer step, float32 params")
        for case in (c for c in cases(ctx.device, ctx.quick) if c.op == op):
            ctx.step("optim", f"{op}, {case.name}")
            params = _params(case.spec["shapes"], ctx.device)
            # All step the same params in turns (the values drift a little; the time per step does not).
            optimizers = {name: factory(params) for name, factory in make.items()}
            table.add(ctx, case, "step", measure({n: o.step for n, o in optimizers.items()}, ctx.device, ctx.quick))
            del optimizers, params
        tables.append(table.finish())
    return tables
