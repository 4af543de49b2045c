"""vitops' optimizers under torch.distributed, against timm's optimizers in one process on the same model and data:
DDP, FSDP2 (fully_shard per layer, then the root), FSDP2 + Lookahead, create_optimizer's param groups, skip_nonfinite,
ZeroRedundancyOptimizer, torch.distributed.checkpoint round trips and a sharded checkpoint loaded into one process,
and the EMA of an FSDP2 model.

Ranks are processes started by torch.multiprocessing, on 2 and 3 ranks so that FSDP2's shards are uneven: the tiny
model's params have 5, 7 and 1 rows, so with 3 ranks one rank holds 1 row of a param and two hold none. They
communicate over gloo on the CPU, or over NCCL with a GPU each where there are enough GPUs. One start per world size
runs every scenario in turn (starting ranks is what costs time here); each scenario is then a test of its own.
Every rank feeds the same batch, so the averaged grads are the single process's.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import socket
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

timm_optim = pytest.importorskip("timm.optim")

STEPS = 4
WORLD_SIZES = (2, 3)
TIMEOUT_S = 240  # for all scenarios of one world size; a stuck collective times out after 60 s


# --- the model, data and references -------------------------------------------------------------------------


def tiny_model(seed: int = 0) -> nn.Module:
    """Param rows (dim 0): conv 5, fc1 7, fc2 1 (with their biases)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.GELU(), nn.Flatten(), nn.Linear(80, 7), nn.GELU(), nn.Linear(7, 1))


def batch(step: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(4, 3, 6, 6, generator=gen).to(device), torch.randn(4, 1, generator=gen).to(device)


def backward(model: nn.Module, step: int, device) -> None:
    x, y = batch(step, device)
    nn.functional.mse_loss(model(x), y).backward()


def orthogonal_to(r: torch.Tensor, w: torch.Tensor, per_row: bool) -> torch.Tensor:
    """r less its component along w, in each dim-0 row of w (AdamP's channel-wise projection then applies) or over
    the whole tensor (its layer-wise one, as rows keep their own components)."""
    rows = w.shape[0] if per_row else 1
    r2, w2 = r.reshape(rows, -1), w.reshape(rows, -1)
    return (r2 - w2 * ((r2 * w2).sum(1, keepdim=True) / (w2 * w2).sum(1, keepdim=True))).reshape(r.shape)


def adamp_grads(full_params: dict, step: int) -> dict:
    """Grads that make AdamP project the conv per channel and fc1 as a whole (and not fc2), from the params."""
    gen = torch.Generator().manual_seed(2000 + step)
    grads = {}
    for name, w in full_params.items():
        r = torch.randn(w.shape, generator=gen).to(w.device) * 0.1
        if name == "0.weight":
            r = orthogonal_to(r, w, per_row=True)
        elif name == "3.weight":
            r = orthogonal_to(r, w, per_row=False)
        grads[name] = r
    return grads


def adamp_branch(p: torch.Tensor, g: torch.Tensor, delta=0.1, eps=1e-8) -> str:
    """The projection timm's AdamP takes for p with grad g."""
    for view in (lambda x: x.reshape(x.shape[0], -1), lambda x: x.reshape(1, -1)):
        cos = nn.functional.cosine_similarity(view(g), view(p), dim=1, eps=eps).abs()
        if cos.max() < delta / math.sqrt(view(p).shape[1]):
            return "channel" if view(p).shape[0] == p.shape[0] and p.shape[0] > 1 else "layer"
    return "none"


def reference_run(make_opt, device, steps=STEPS, grads_fn=None, seed=0) -> nn.Module:
    """The single-process run the distributed ones must equal."""
    model = tiny_model(seed).to(device)
    opt = make_opt(model)
    for step in range(steps):
        opt.zero_grad()
        if grads_fn is None:
            backward(model, step, device)
        else:
            grads = grads_fn(dict(model.named_parameters()), step)
            for name, p in model.named_parameters():
                p.grad = grads[name].detach().clone()
        opt.step()
    return model


def full_params(model: nn.Module) -> dict:
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
            for name, p in model.named_parameters()}  # fmt: skip


def assert_same(got: dict, want: nn.Module | dict, what: str = "params") -> None:
    """rtol 1e-5 per element (atol 1e-6), and a relative difference of each param's norm below 1e-5."""
    want = dict(want.named_parameters()) if isinstance(want, nn.Module) else want
    for name, value in want.items():
        a, b = got[name].float().cpu(), value.detach().float().cpu()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} {name}: {m}")
        relative = (a - b).norm() / b.norm().clamp_min(1e-30)
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-12, f"{what} {name}: relative difference {relative}"


# --- how each engine wraps the model --------------------------------------------------------------------------


def fsdp2(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def train(model, opt, device, steps=STEPS, first_step=0, grads_fn=None) -> None:
    from torch.distributed.tensor import distribute_tensor

    for step in range(first_step, first_step + steps):
        opt.zero_grad()
        if grads_fn is None:
            backward(model, step, device)
        else:
            grads = grads_fn(full_params(model), step)
            for name, p in model.named_parameters():
                p.grad = distribute_tensor(grads[name], p.device_mesh, p.placements)
        opt.step()


LAMB_CONFIGS = {  # global clipping active in all (max_grad_norm far below the grads' norm)
    "coupled": dict(lr=1e-2, weight_decay=0.05, max_grad_norm=0.05),
    "decoupled": dict(lr=1e-2, weight_decay=0.1, decoupled_decay=True, corrected_weight_decay=True, max_grad_norm=0.05),
    "trust_clip": dict(lr=1e-2, weight_decay=0.05, trust_clip=True, max_grad_norm=0.05),
    "always_adapt": dict(lr=1e-2, weight_decay=0.0, always_adapt=True, max_grad_norm=0.05),
}
ADAMP = dict(lr=1e-2, weight_decay=0.05, nesterov=True, wd_ratio=0.1)


# --- scenarios: each runs on every rank; collectives first, comparisons last ------------------------------------


def scenario_ddp(ctx):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from vitops.optim import AdamP, Lamb

    for cls, kwargs, ref_cls in ((Lamb, LAMB_CONFIGS["coupled"], timm_optim.Lamb), (AdamP, ADAMP, timm_optim.AdamP)):
        model = tiny_model().to(ctx.device)
        ddp = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        train(ddp, cls(ddp.parameters(), **kwargs), ctx.device)
        want = reference_run(lambda m, c=ref_cls, k=kwargs: c(m.parameters(), **k), ctx.device)
        assert_same(full_params(model), want)


def _lamb_fsdp2(config):
    def scenario(ctx):
        from vitops.optim import Lamb

        kwargs = LAMB_CONFIGS[config]
        model = fsdp2(tiny_model().to(ctx.device), ctx.mesh)
        train(model, Lamb(model.parameters(), **kwargs), ctx.device)
        ref_model = tiny_model().to(ctx.device)
        backward(ref_model, 0, ctx.device)
        clip = timm_optim.Lamb(ref_model.parameters(), **kwargs)._get_clip_grad_norm()
        assert clip is not None and clip > 1, "the test should clip the grads"
        assert_same(full_params(model), reference_run(lambda m: timm_optim.Lamb(m.parameters(), **kwargs), ctx.device))

    return scenario


def scenario_fsdp2_adamp_projections(ctx):
    """Grads built so that the conv is projected per channel and fc1 as a whole, checked on the reference run."""
    from vitops.optim import AdamP

    model = fsdp2(tiny_model().to(ctx.device), ctx.mesh)
    train(model, AdamP(model.parameters(), **ADAMP), ctx.device, grads_fn=adamp_grads)
    taken = {}

    def record(full, step):
        grads = adamp_grads(full, step)
        for name in ("0.weight", "3.weight", "5.weight"):
            taken.setdefault(name, set()).add(adamp_branch(full[name].detach(), grads[name]))
        return grads

    want = reference_run(lambda m: timm_optim.AdamP(m.parameters(), **ADAMP), ctx.device, grads_fn=record)
    assert taken == {"0.weight": {"channel"}, "3.weight": {"layer"}, "5.weight": {"none"}}, taken
    assert_same(full_params(model), want)


def scenario_fsdp2_adamp_backward(ctx):
    from vitops.optim import AdamP

    model = fsdp2(tiny_model().to(ctx.device), ctx.mesh)
    train(model, AdamP(model.parameters(), **ADAMP), ctx.device)
    assert_same(full_params(model), reference_run(lambda m: timm_optim.AdamP(m.parameters(), **ADAMP), ctx.device))


def scenario_fsdp2_lookahead(ctx):
    from vitops.optim import Lamb, Lookahead

    kwargs = LAMB_CONFIGS["coupled"]
    model = fsdp2(tiny_model().to(ctx.device), ctx.mesh)
    train(model, Lookahead(Lamb(model.parameters(), **kwargs), alpha=0.6, k=3), ctx.device)
    want = reference_run(
        lambda m: timm_optim.Lookahead(timm_optim.Lamb(m.parameters(), **kwargs), alpha=0.6, k=3), ctx.device
    )
    assert_same(full_params(model), want)


def scenario_fsdp2_create_optimizer(ctx):
    """timm's param groups (no weight decay for biases): a group without layer adaptation next to one with."""
    from vitops.optim import create_optimizer

    model = fsdp2(tiny_model().to(ctx.device), ctx.mesh)
    train(model, create_optimizer(model, "lamb", lr=1e-2, weight_decay=0.05, max_grad_norm=0.05), ctx.device)
    want = reference_run(
        lambda m: timm_optim.create_optimizer_v2(m, "lamb", lr=1e-2, weight_decay=0.05, max_grad_norm=0.05),
        ctx.device,
    )
    assert_same(full_params(model), want)


def scenario_fsdp2_skip_nonfinite(ctx):
    """A NaN in fc2's one row, which one rank holds: every rank skips that step (skip_nonfinite's check is summed
    over the ranks with the grads' norms) and the run is one process's."""
    from vitops.optim import AdamP, Lamb

    def grads_fn(full, step):
        grads = adamp_grads(full, step)
        if step == 1:
            grads["5.weight"][0, 3] = math.nan
        return grads

    for cls, kwargs in ((Lamb, LAMB_CONFIGS["coupled"]), (AdamP, ADAMP)):
        model = fsdp2(tiny_model().to(ctx.device), ctx.mesh)
        opt = cls(model.parameters(), skip_nonfinite=True, **kwargs)
        train(model, opt, ctx.device, grads_fn=grads_fn)
        assert float(opt.param_groups[0]["skipped_steps"]) == 1.0
        want = reference_run(lambda m, c=cls, k=kwargs: c(m.parameters(), skip_nonfinite=True, **k), ctx.device,
                             grads_fn=grads_fn)  # fmt: skip
        assert all(torch.isfinite(p).all() for p in want.parameters())
        assert_same(full_params(model), want)


def scenario_zero(ctx):
    """ZeroRedundancyOptimizer hands each rank whole params: LAMB's global grad norm is summed over its ranks."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from vitops.optim import AdamP, Lamb

    for cls, kwargs, ref_cls in ((Lamb, LAMB_CONFIGS["coupled"], timm_optim.Lamb), (AdamP, ADAMP, timm_optim.AdamP)):
        model = tiny_model().to(ctx.device)
        ddp = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=cls, **kwargs)
        if cls is Lamb:
            assert opt.optim.partition_group is opt.process_group
        train(ddp, opt, ctx.device)
        want = reference_run(lambda m, c=ref_cls, k=kwargs: c(m.parameters(), **k), ctx.device)
        assert_same(full_params(model), want)


def scenario_fsdp2_checkpoint(ctx):
    """torch.distributed.checkpoint: model and optimizer state saved sharded and loaded into a fresh FSDP2 model
    steps on as the original; the same checkpoint, made a single-file state dict, loads into one process's vitops
    and timm optimizers, whose next step is the same again."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from vitops.optim import AdamP, Lamb

    for name, cls, kwargs, ref_cls in (("lamb", Lamb, LAMB_CONFIGS["decoupled"], timm_optim.Lamb),
                                       ("adamp", AdamP, ADAMP, timm_optim.AdamP)):  # fmt: skip
        path = os.path.join(ctx.tmp, f"checkpoint_{name}")
        model = fsdp2(tiny_model().to(ctx.device), ctx.mesh)
        opt = cls(model.parameters(), **kwargs)
        train(model, opt, ctx.device, steps=2)
        model_state, optim_state = get_state_dict(model, opt)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
        train(model, opt, ctx.device, steps=1, first_step=2)

        loaded = fsdp2(tiny_model(seed=1).to(ctx.device), ctx.mesh)
        loaded_opt = cls(loaded.parameters(), **kwargs)
        model_state, optim_state = get_state_dict(loaded, loaded_opt)
        dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=path)
        set_state_dict(loaded, loaded_opt, model_state_dict=model_state, optim_state_dict=optim_state)
        train(loaded, loaded_opt, ctx.device, steps=1, first_step=2)
        after = full_params(model)
        assert_same(full_params(loaded), after, "after a step from the loaded checkpoint")

        try:
            if ctx.rank == 0:
                from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

                dcp_to_torch_save(path, path + ".pt")
                for single_cls in (cls, ref_cls):
                    state = torch.load(path + ".pt", weights_only=False)  # optimizers load state without copying
                    single = tiny_model(seed=1).to(ctx.device)
                    single.load_state_dict(state["model"])
                    single_opt = single_cls(single.parameters(), **kwargs)
                    single_opt.load_state_dict(_by_index(state["optim"], single))
                    opt_step(single, single_opt, 2, ctx.device)
                    what = f"{single_cls.__module__} loaded in one process"
                    assert_same(dict(single.named_parameters()), after, what)
        finally:
            dist.barrier()


def _by_index(optim_state: dict, model: nn.Module) -> dict:
    """A distributed checkpoint's optimizer state (keyed by param name) keyed as torch.optim.Optimizer keys it."""
    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    groups = [dict(group, params=[index[name] for name in group["params"]]) for group in optim_state["param_groups"]]
    return {"state": {index[name]: value for name, value in optim_state["state"].items()}, "param_groups": groups}


def opt_step(model, opt, step, device):
    opt.zero_grad()
    backward(model, step, device)
    opt.step()


def scenario_fsdp2_ema(ctx):
    """ModelEma of an FSDP2 model: the EMA copy is made before sharding and sharded as the model."""
    from vitops.optim import Lamb
    from vitops.utils import ModelEma

    kwargs = LAMB_CONFIGS["coupled"]
    model = tiny_model().to(ctx.device)
    ema = ModelEma(model, decay=0.8)
    fsdp2(model, ctx.mesh)
    fsdp2(ema.module, ctx.mesh)
    opt = Lamb(model.parameters(), **kwargs)
    for step in range(STEPS):
        opt_step(model, opt, step, ctx.device)
        ema.update(model, step=step)
    x, _ = batch(0, ctx.device)
    out = ema.module(x)

    ref_model = tiny_model().to(ctx.device)
    ref_ema = ModelEma(ref_model, decay=0.8)
    ref_opt = timm_optim.Lamb(ref_model.parameters(), **kwargs)
    for step in range(STEPS):
        opt_step(ref_model, ref_opt, step, ctx.device)
        ref_ema.update(ref_model, step=step)
    assert_same(full_params(ema.module), ref_ema.module, "EMA")
    torch.testing.assert_close(out, ref_ema.module(x), rtol=1e-5, atol=1e-6)


SCENARIOS = {
    "ddp": scenario_ddp,
    **{f"fsdp2_lamb_{config}": _lamb_fsdp2(config) for config in LAMB_CONFIGS},
    "fsdp2_adamp_projections": scenario_fsdp2_adamp_projections,
    "fsdp2_adamp_backward": scenario_fsdp2_adamp_backward,
    "fsdp2_lookahead": scenario_fsdp2_lookahead,
    "fsdp2_create_optimizer": scenario_fsdp2_create_optimizer,
    "fsdp2_skip_nonfinite": scenario_fsdp2_skip_nonfinite,
    "zero": scenario_zero,
    "fsdp2_checkpoint": scenario_fsdp2_checkpoint,
    "fsdp2_ema": scenario_fsdp2_ema,
}


# --- running them -----------------------------------------------------------------------------------------------


class Context:
    def __init__(self, rank, world, device, mesh, tmp):
        self.rank, self.world, self.device, self.mesh, self.tmp = rank, world, device, mesh, tmp


def device_for(rank: int, world: int) -> torch.device:
    """A GPU per rank with NCCL where there are enough of them, else the CPU with gloo."""
    return torch.device("cuda", rank) if torch.cuda.device_count() >= world else torch.device("cpu")


def worker(rank: int, world: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    device = device_for(rank, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))  # fmt: skip
    from torch.distributed.device_mesh import init_device_mesh

    ctx = Context(rank, world, device, init_device_mesh(device.type, (world,)), tmp)
    results = {}
    for name, scenario in SCENARIOS.items():
        try:
            scenario(ctx)
            results[name] = None
        except Exception:  # recorded, and the next scenario runs: each is a test of its own
            results[name] = traceback.format_exc()
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    try:
        dist.destroy_process_group()
    finally:
        # gloo's threads can abort the interpreter's own teardown; the results are written
        os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results():
    """world size -> rank -> scenario -> None (passed) or the traceback; each world size run once, when needed."""
    cache = {}

    def run(world: int) -> dict:
        if world not in cache:
            tmp = tempfile.mkdtemp(prefix="vitops_distributed_")
            context = mp.spawn(worker, args=(world, _free_port(), tmp), nprocs=world, join=False)
            deadline = time.monotonic() + TIMEOUT_S
            for process in context.processes:
                process.join(max(0.0, deadline - time.monotonic()))
            for process in context.processes:
                process.kill()
            cache[world] = {}
            for rank in range(world):
                path = os.path.join(tmp, f"rank{rank}.json")
                missing = {name: f"rank {rank} wrote no results (crashed or timed out)" for name in SCENARIOS}
                if os.path.exists(path):
                    with open(path) as f:
                        missing = json.load(f)
                cache[world][rank] = missing
        return cache[world]

    return run


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_distributed(results, world, scenario):
    failures = {rank: ranks[scenario] for rank, ranks in results(world).items() if ranks[scenario]}
    assert not failures, "\n".join(f"rank {rank}:\n{error}" for rank, error in failures.items())
