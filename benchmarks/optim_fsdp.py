"""One optimizer step on params sharded by FSDP2, collectives included: vitops' Lamb and AdamP against timm's and
torch's AdamW (fused and foreach), all on the same sharding, in one run.

The params are ViT-S/16's (22.05M; benchmarks/optim.py's shapes), fully_shard per transformer block and then the
root, as a training script would, over 2 ranks (processes) that split the machine's cores; their grads are set
directly (no forward or backward is timed). Each provider's step runs on both ranks at once, after a barrier, the
providers taking turns each round; a step's time is the slower rank's, and the table gives the median over rounds.
timm's Lamb runs under FSDP2 through DTensor's generic ops (an all_reduce per norm); timm's AdamP does not run there
at all (DTensor has no sharding rule for what its projection does), which the table notes.

    python -m benchmarks.optim_fsdp [--ranks 2] [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from benchmarks.harness import BASELINE, VITOPS, YARDSTICK, Case, Context, Provider, Table, Timing
from benchmarks.optim import vit_shapes

RANKS = 2
ROUNDS = {False: 12, True: 5}
PARAMS = "ViT-S/16 params"
# Least bytes a step moves per float32 param (benchmarks/optim.py): LAMB 44, AdamP 44 with Nesterov, AdamW 28.
BYTES_PER_PARAM = {"Lamb": 44, "AdamP": 44, "AdamW": 28}
LAMB = {"weight_decay": 0.05}
ADAMP = {"weight_decay": 0.05, "wd_ratio": 0.01, "nesterov": True}
ADAMW = {"weight_decay": 0.05}

PROVIDERS = {  # name: (what it steps, role, description)
    "vitops Lamb": ("Lamb", VITOPS, "vitops.optim.Lamb on the local shards, its norms summed over ranks"),
    "vitops AdamP": ("AdamP", VITOPS, "vitops.optim.AdamP on the local shards, its cosines summed over ranks"),
    "timm Lamb": ("Lamb", BASELINE, "timm.optim.Lamb (foreach), DTensor's generic ops"),
    "timm AdamP": ("AdamP", BASELINE, "timm.optim.AdamP, DTensor's generic ops"),
    "torch AdamW fused": ("AdamW", YARDSTICK, "torch.optim.AdamW(fused=True): no trust ratio or projection"),
    "torch AdamW foreach": ("AdamW", YARDSTICK, "torch.optim.AdamW(foreach=True)"),
}


def _optimizer(name: str, params):
    import timm.optim

    import vitops.optim

    return {
        "vitops Lamb": lambda: vitops.optim.Lamb(params, **LAMB),
        "vitops AdamP": lambda: vitops.optim.AdamP(params, **ADAMP),
        "timm Lamb": lambda: timm.optim.Lamb(params, **LAMB),
        "timm AdamP": lambda: timm.optim.AdamP(params, **ADAMP),
        "torch AdamW fused": lambda: torch.optim.AdamW(params, fused=True, **ADAMW),
        "torch AdamW foreach": lambda: torch.optim.AdamW(params, foreach=True, **ADAMW),
    }[name]()


class _Params(nn.Module):
    """Params of the given shapes (a transformer block's, the stem's and head's), or such modules as children: what
    fully_shard wraps. No forward is timed."""

    def __init__(self, shapes=(), gen=None, children=()):
        super().__init__()
        self.params = nn.ParameterList(nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes)
        self.blocks = nn.ModuleList(children)

    def forward(self):
        raise NotImplementedError("params only")


def _sharded_vit_s(mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    shapes = vit_shapes(384, 12)
    per_block = 12
    stem, blocks, head = shapes[:4], shapes[4:-4], shapes[-4:]
    gen = torch.Generator().manual_seed(0)
    children = [_Params(stem, gen)] + [_Params(blocks[i : i + per_block], gen)
                                       for i in range(0, len(blocks), per_block)] + [_Params(head, gen)]  # fmt: skip
    model = _Params(children=children)
    for block in children:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _set_grads(model: nn.Module, seed: int) -> None:
    """Random grads on each rank's shards (no collective): what a backward pass would leave."""
    from torch.distributed.tensor import DTensor

    gen = torch.Generator().manual_seed(seed + dist.get_rank())
    for p in model.parameters():
        local = torch.randn(p.to_local().shape, generator=gen) * 1e-3
        p.grad = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())


def _worker(rank: int, ranks: int, port: int, rounds: int, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or ranks) // ranks))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (ranks,))
    steps, failed = {}, {}
    for name in PROVIDERS:
        model = _sharded_vit_s(mesh)
        _set_grads(model, seed=1)
        try:
            optimizer = _optimizer(name, model.parameters())
            optimizer.step()  # warm-up: state, plans
            steps[name] = (model, optimizer)
        except Exception as error:  # timm's AdamP under FSDP2: reported, not timed
            failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        dist.barrier()
    times = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            optimizer = steps[name][1]
            dist.barrier()
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    # A step's time is the slower rank's.
    flat = torch.tensor([t for name in names for t in times[name]], dtype=torch.float64)
    dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    if rank == 0:
        slowest = flat.view(len(names), rounds).mul(1e3).tolist()
        numel = sum(p.numel() for p in steps[names[0]][0].parameters())
        with open(out, "w") as f:
            json.dump({"ms": dict(zip(names, slowest)), "failed": failed, "numel": numel}, f)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_steps(ranks: int = RANKS, quick: bool = False) -> dict:
    """{"ms": provider -> per-round step ms (the slower rank's), "failed": provider -> why, "numel": params}."""
    out = os.path.join(tempfile.mkdtemp(prefix="vitops_optim_fsdp_"), "times.json")
    mp.spawn(_worker, args=(ranks, _free_port(), ROUNDS[quick], out), nprocs=ranks)
    with open(out) as f:
        return json.load(f)


def cases(device: str, quick: bool) -> list[Case]:
    numel = sum(math.prod(s) for s in vit_shapes(384, 12))
    return [Case(f"{what} step under FSDP2", f"{PARAMS} ({numel / 1e6:.1f}M), {RANKS} ranks", ("step",),
                 torch.float32, flops={"step": 0.0}, bytes={"step": per_param * numel})
            for what, per_param in BYTES_PER_PARAM.items()]  # fmt: skip


def run(ctx: Context) -> list[Table]:
    """One table: every provider's step time on the CPU ranks (gloo), with its ratio to fused AdamW's."""
    if ctx.device != "cpu":
        return []  # measured on the CPU ranks only: the GPU suite has its own multi-GPU runs to do
    ctx.step("optim_fsdp", f"{RANKS} ranks, {PARAMS}")
    result = measure_steps(RANKS, ctx.quick)
    providers = [Provider(name, role, description) for name, (_, role, description) in PROVIDERS.items()]
    table = Table("optimizer step under FSDP2", "timm Lamb", "step", providers,
                  about=f"{RANKS} gloo ranks on this CPU, collectives included")  # fmt: skip
    by_what = {c.op.split()[0]: c for c in cases(ctx.device, ctx.quick)}
    for name, ms in result["ms"].items():
        table.add(ctx, by_what[PROVIDERS[name][0]], "step", {name: Timing.of(ms)})
    for name, why in result["failed"].items():
        table.skip(name, why)
    fused = statistics.median(result["ms"]["torch AdamW fused"])
    table.notes += [f"{name}: {statistics.median(ms) / fused:.2f}x torch AdamW fused's time"
                    for name, ms in result["ms"].items()]  # fmt: skip
    return [table.finish()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=RANKS)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    result = measure_steps(args.ranks, args.quick)
    fused = statistics.median(result["ms"]["torch AdamW fused"])
    timm_lamb = statistics.median(result["ms"]["timm Lamb"]) if "timm Lamb" in result["ms"] else math.nan
    print(f"{args.ranks} ranks, {result['numel'] / 1e6:.2f}M params, load average {os.getloadavg()}")
    print(f"{'provider':<22}{'median ms':>10}{'min ms':>9}{'x fused AdamW':>15}{'timm Lamb / it':>16}")
    for name, ms in result["ms"].items():
        median = statistics.median(ms)
        print(f"{name:<22}{median:>10.1f}{min(ms):>9.1f}{median / fused:>15.2f}{timm_lamb / median:>16.2f}")
    for name, why in result["failed"].items():
        print(f"{name}: did not run: {why}")


if __name__ == "__main__":
    main()
