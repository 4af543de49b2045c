"""Per-step time of vitops' fused LAMB and AdamP against timm's and torch's AdamW (foreach and fused), on the
param sets of ViT-S/16, ViT-B/16 and ResNet-50 (params only: a step does not depend on the model).

GB/s counts the minimal bytes a step must move per float32 param, not what each implementation moves:
LAMB 44 (grad-norm pass 4; moments pass reads p, g, m, v and writes m, v: 24; apply pass reads p, m, v and writes
p: 16), AdamP 40 (24 + 16: the projection needs the whole tensor's sums before the update), AdamW 28.
pct_sol relates that to the copy bandwidth measured in the same run (benchmarks.harness).

    python -m benchmarks --only optim [--quick]      (or: python -m benchmarks.optim [--device cpu|cuda] [--quick])
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.harness import add_speedups, format_table, measure_ms_interleaved, row

MIN_BYTES_PER_PARAM = {"lamb_step": 44, "adamp_step": 40, "adamw_step": 28}


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


CASES = {
    "vit_small params": lambda: vit_shapes(384, 12),
    "vit_base params": lambda: vit_shapes(768, 12),
    "resnet50 params": resnet50_shapes,
}


def _params(shapes, device):
    gen = torch.Generator().manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device))
        p.grad = (torch.randn(s, generator=gen) * 1e-3).to(device)
        params.append(p)
    return params


class _Forced:
    """Runs an optimizer's step on one backend (the compiled CUDA kernels are not the default on GPUs yet)."""

    def __init__(self, optimizer, backend: str):
        self.optimizer, self.backend = optimizer, backend

    def step(self):
        import vitops

        with vitops.use_backend(self.backend):
            return self.optimizer.step()


def _providers(device: str):
    """(op, provider, optimizer factory) for every implementation available here."""
    import vitops  # noqa: F401
    from vitops import _backend
    from vitops.optim import AdamP, Lamb

    out = []
    for op, cls, kwargs in (("lamb_step", Lamb, dict(weight_decay=0.05)),
                            ("adamp_step", AdamP, dict(weight_decay=0.05, wd_ratio=0.01, nesterov=True))):  # fmt: skip
        backend = _backend.default_backend(op, device)
        out.append((op, f"vitops {backend}", lambda p, cls=cls, kw=kwargs: cls(p, **kw)))
        if device == "cuda" and backend != "cuda" and _backend.availability()[op]["cuda"]["cuda"] is None:
            out.append((op, "vitops cuda (forced)", lambda p, cls=cls, kw=kwargs: _Forced(cls(p, **kw), "cuda")))
    try:
        import timm.optim as timm_optim

        out.append(("lamb_step", "timm Lamb", lambda p: timm_optim.Lamb(p, weight_decay=0.05, foreach=False)))
        out.append(("lamb_step", "timm Lamb foreach", lambda p: timm_optim.Lamb(p, weight_decay=0.05, foreach=True)))
        out.append(("adamp_step", "timm AdamP",
                    lambda p: timm_optim.AdamP(p, weight_decay=0.05, wd_ratio=0.01, nesterov=True)))  # fmt: skip
    except ImportError:
        pass
    out.append(("adamw_step", "torch AdamW foreach", lambda p: torch.optim.AdamW(p, weight_decay=0.05, foreach=True)))
    out.append(("adamw_step", "torch AdamW fused", lambda p: torch.optim.AdamW(p, weight_decay=0.05, fused=True)))
    return out


def run(device: str, quick: bool) -> list[dict]:
    """One row per (param set, implementation): median step time, GB/s of the minimal bytes, % of copy
    bandwidth, and the speedup over torch's fused AdamW."""
    if device == "cuda" and not torch.cuda.is_available():
        return []
    cases = ["vit_small params"] if quick else list(CASES)
    rows = []
    for case in cases:
        params = _params(CASES[case](), device)
        numel = sum(p.numel() for p in params)
        providers = _providers(device)
        # All step the same params in turns (the values drift a little; the time per step does not).
        optimizers = {f"{op} {provider}": factory(params) for op, provider, factory in providers}
        times = measure_ms_interleaved({name: opt.step for name, opt in optimizers.items()}, device, quick)
        case_rows = [
            row(op=op, case=case, provider=provider, mode="step", ms=times[f"{op} {provider}"], device=device,
                quick=quick, bytes_moved=MIN_BYTES_PER_PARAM[op] * numel, params=numel)
            for op, provider, _ in providers
        ]
        del optimizers
        # every optimizer against the fastest baseline step, AdamW fused
        fused = next(r["ms"] for r in case_rows if r["provider"] == "torch AdamW fused")
        for r in case_rows:
            r["x_adamw_fused_time"] = round(r["ms"] / fused, 2)
        rows += case_rows
    add_speedups(rows, "timm Lamb")
    add_speedups(rows, "timm Lamb foreach")
    add_speedups(rows, "timm AdamP")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(f"device {args.device}, {torch.get_num_threads()} CPU threads")
    print(format_table(run(args.device, args.quick)))


if __name__ == "__main__":
    main()
