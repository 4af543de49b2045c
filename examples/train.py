"""Train a vitops zoo model on one process or many, unsharded, with DDP or with FSDP2.

    python examples/train.py --model deit_tiny_patch16_224 --epochs 2               # one process, synthetic data
    torchrun --nproc_per_node 8 examples/train.py --model deit_small_patch16_224 --sharding fsdp2 --opt lamb \\
        --data-dir /data/imagenet --amp --ema-decay 0.99996 --clip-grad 1.0 --output runs/deit_s
    torchrun --nproc_per_node 8 examples/train.py --model deit_tiny_distilled_patch16_224 --teacher resnet18 \\
        --teacher-checkpoint resnet18.pth --distillation hard --data-dir /data/imagenet --output runs/deit_t_dist

Without --data-dir it trains on a synthetic data set (class-dependent patterns plus noise, the same for every seed)
that needs no download and is learnable, so the loss falls within a few dozen steps. NCCL is used on GPUs, gloo
on the CPU. Checkpoints are torch.distributed.checkpoint directories under FSDP2 and torch.save files otherwise;
either kind resumes under any sharding (--resume PATH, or the output directory for its newest checkpoint).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import glob
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import vitops
from vitops.layers import RepVGGBlock
from vitops.loss import DistillationLoss, LabelSmoothingCrossEntropy
from vitops.models.resnet import BasicBlock, Bottleneck
from vitops.models.vision_transformer import Block
from vitops.utils import ModelEma

# The repeated blocks of the zoo's models: under FSDP2 each is one unit (its params gathered together, then freed).
FSDP_UNITS = (Block, BasicBlock, Bottleneck, RepVGGBlock)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="deit_tiny_patch16_224", help="any name of vitops.list_models()")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more model arguments, e.g. depth=4 embed_dim=96")  # fmt: skip
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=10, help="of the synthetic data (an image folder has its own)")
    p.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    p.add_argument("--data-dir", default=None, help="an ImageFolder root (with train/ and val/, or only classes)")
    p.add_argument("--synthetic-size", type=int, default=2048, help="synthetic training images (held-out: 1/4)")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--workers", type=int, default=None, help="data-loading processes (default 4 for --data-dir)")
    p.add_argument("--opt", default="adamw", help="lamb, adamp, adamw or any vitops.optim.create_optimizer name")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip-grad", type=float, default=None, help="max global grad norm")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--sharding", choices=("none", "ddp", "fsdp2"), default=None,
                   help="default: ddp when launched with more than one process")  # fmt: skip
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (where the device supports it)")
    p.add_argument("--ema-decay", type=float, default=None, help="keep an EMA of the weights with this decay")
    p.add_argument("--teacher", default=None, help="a zoo model to distill from (e.g. resnet18)")
    p.add_argument("--teacher-checkpoint", default=None, help="the teacher's weights")
    p.add_argument("--distillation", choices=("none", "soft", "hard"), default=None,
                   help="default: hard with a teacher, else none")  # fmt: skip
    p.add_argument("--distillation-alpha", type=float, default=0.5)
    p.add_argument("--distillation-tau", type=float, default=1.0)
    p.add_argument("--output", default=None, help="directory for checkpoints and log.jsonl")
    p.add_argument("--resume", default=None, help="a checkpoint, or an output directory (its newest checkpoint)")
    p.add_argument("--checkpoint-interval", type=int, default=0, help="steps; 0: at the end of each epoch only")
    p.add_argument("--keep-checkpoints", type=int, default=1, help="how many of the newest checkpoints to keep")
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="end (with a checkpoint) after this many steps; the schedule still spans --epochs")  # fmt: skip
    p.add_argument("--log-interval", type=int, default=10, help="steps between progress updates")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.keep_checkpoints < 1:
        p.error("--keep-checkpoints must be at least 1")
    args.model_kwargs = dict(_parse_kwarg(item) for item in args.model_kwargs)
    if args.distillation is None:
        args.distillation = "hard" if args.teacher else "none"
    if args.distillation != "none" and not args.teacher:
        p.error(f"--distillation {args.distillation} needs --teacher")
    return args


def _parse_kwarg(item: str) -> tuple[str, object]:
    key, _, value = item.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


# --- processes and devices --------------------------------------------------------------------------------------


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast's

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(sharding: str | None, amp: bool) -> tuple[Runtime, str]:
    """The process group (NCCL on GPUs, gloo on the CPU) when launched by torchrun, this process's device, and
    bfloat16 autocast with --amp where the device has it (float16, which needs loss scaling, is left out)."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world_size = int(os.environ["WORLD_SIZE"]) if launched else 1
    sharding = sharding or ("ddp" if world_size > 1 else "none")
    if sharding != "none" and not launched:
        raise SystemExit(f"--sharding {sharding}: launch with torchrun (torchrun --nproc_per_node N {sys.argv[0]} ...)")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if launched:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    amp_dtype = torch.bfloat16 if amp and (device.type == "cpu" or torch.cuda.is_bf16_supported()) else None
    return Runtime(dist.get_rank() if launched else 0, world_size, device, amp_dtype), sharding


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor)  # gloo has no AVG: sum, then divide where a mean is meant
    return tensor


def autocast(runtime: Runtime):
    if runtime.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(runtime.device.type, dtype=runtime.amp_dtype)


# --- data ----------------------------------------------------------------------------------------------------------


class SyntheticImages(Dataset):
    """Learnable images that need no download: class c's image is a fixed random 4x4 pattern (drawn from `seed`),
    upsampled to img_size, plus per-pixel Gaussian noise. Sample `first + i` seeds its own label and noise, so every
    process and worker reads the same image for the same index, and two datasets with disjoint index ranges (the
    training and held-out splits) share the classes but no sample."""

    def __init__(self, size: int, num_classes: int, img_size: int, seed: int, first: int = 0, noise: float = 1.0):
        patterns = torch.randn(num_classes, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
        self.patterns = F.interpolate(patterns, size=(img_size, img_size), mode="bilinear", align_corners=False)
        self.size, self.num_classes, self.seed, self.first, self.noise = size, num_classes, seed, first, noise

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        generator = torch.Generator().manual_seed((self.seed + 1) * 1_000_003 + self.first + index)
        label = int(torch.randint(self.num_classes, (), generator=generator))
        noise = torch.randn(self.patterns.shape[1:], generator=generator)
        return self.patterns[label] + self.noise * noise, label


def build_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset | None, int]:
    """(training set, held-out set or None, number of classes)."""
    if args.data_dir is None:
        n, classes, size = args.synthetic_size, args.num_classes, args.img_size
        return (SyntheticImages(n, classes, size, args.seed),
                SyntheticImages(n // 4, classes, size, args.seed, first=n), classes)  # fmt: skip
    try:
        from torchvision import datasets, transforms
    except ImportError:
        raise SystemExit("--data-dir reads images with torchvision's ImageFolder: pip install torchvision") from None
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(args.img_size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])  # fmt: skip
    eval_tf = transforms.Compose([transforms.Resize(int(args.img_size / 0.875)), transforms.CenterCrop(args.img_size),
                                  transforms.ToTensor(), normalize])  # fmt: skip
    train_dir, val_dir = os.path.join(args.data_dir, "train"), os.path.join(args.data_dir, "val")
    split = os.path.isdir(train_dir)  # timm's layout; else the root holds the class folders
    train = datasets.ImageFolder(train_dir if split else args.data_dir, train_tf)
    held_out = datasets.ImageFolder(val_dir, eval_tf) if split and os.path.isdir(val_dir) else None
    return train, held_out, len(train.classes)


def epoch_loader(dataset: Dataset, args, runtime: Runtime, epoch: int, skip_batches: int = 0) -> DataLoader:
    """This process's batches of one epoch (reshuffled per epoch, the same on every run), the first skip_batches
    left out (a run resumed mid-epoch). The loader's own generator keeps the global RNG (drop path) untouched."""
    sampler = DistributedSampler(dataset, runtime.world_size, runtime.rank, shuffle=True, seed=args.seed,
                                 drop_last=True)  # fmt: skip
    sampler.set_epoch(epoch)
    indices = list(sampler)[skip_batches * args.batch_size:]
    return _loader(dataset, indices, args, runtime, drop_last=True, seed=args.seed + epoch)


def _loader(dataset, indices, args, runtime: Runtime, drop_last: bool, seed: int) -> DataLoader:
    workers = args.workers if args.workers is not None else (4 if args.data_dir else 0)
    return DataLoader(dataset, args.batch_size, sampler=indices, num_workers=workers, drop_last=drop_last,
                      pin_memory=runtime.device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed))  # fmt: skip


# --- model, sharding, optimizer, schedule --------------------------------------------------------------------------


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    kwargs = dict(num_classes=num_classes, drop_path_rate=args.drop_path, **args.model_kwargs)
    if vitops.models.get_pretrained_cfg(args.model).get("fixed_input_size"):  # ViTs: position embeddings
        kwargs.setdefault("img_size", args.img_size)
    model = vitops.create_model(args.model, **kwargs)
    if args.distillation != "none":
        if not hasattr(model, "set_distilled_training"):
            raise SystemExit(f"--distillation {args.distillation}: {args.model} has no distillation head; "
                             "use a *_distilled_* DeiT")  # fmt: skip
        model.set_distilled_training(True)
    return model


def build_teacher(args: argparse.Namespace, num_classes: int, runtime: Runtime) -> nn.Module | None:
    if args.distillation == "none":
        return None
    if args.teacher_checkpoint is None and runtime.is_main:
        print(f"warning: --teacher {args.teacher} has random weights (no --teacher-checkpoint)", file=sys.stderr)
    teacher = vitops.create_model(args.teacher, num_classes=num_classes, checkpoint_path=args.teacher_checkpoint)
    return teacher.to(runtime.device).eval().requires_grad_(False)


def shard(model: nn.Module, sharding: str, runtime: Runtime) -> nn.Module:
    """DDP wraps the model; FSDP2 shards it in place, each block (FSDP_UNITS) then the rest at the root."""
    if sharding == "ddp":
        return DistributedDataParallel(model, device_ids=[runtime.device] if runtime.device.type == "cuda" else None)
    if sharding == "fsdp2":
        mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
        for module in [m for m in model.modules() if isinstance(m, FSDP_UNITS)]:
            fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """The learning rate's factor at `step` (0-based): linear warmup to 1 over warmup_steps (the first step at
    1/warmup_steps), then a cosine down to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --- checkpoints -------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: ModelEma | None
    sharded: bool  # FSDP2: sharded (DCP) checkpoints
    step: int = 0

    def state_dict(self, runtime: Runtime) -> dict:
        """timm's checkpoint keys. Sharded: DTensor shards for DCP; else full tensors for torch.save (on every
        process, which also makes the layout a DCP checkpoint is loaded into). Every process's RNG state is kept, so
        a resumed run draws the same drop-path masks."""
        options = StateDictOptions(full_state_dict=not self.sharded)
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=options)
        rng = {"cpu": torch.get_rng_state()}
        if runtime.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(runtime.device)
        rngs = [rng]
        if dist.is_initialized():
            rngs = [None] * runtime.world_size
            dist.all_gather_object(rngs, rng)
        state = {"state_dict": model_state, "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                 "step": self.step, "rng": rngs}  # fmt: skip
        if self.ema is not None:
            state["state_dict_ema"] = get_model_state_dict(self.ema.module, options=options)
        return state

    def load_state_dict(self, state: dict, runtime: Runtime, full: bool) -> None:
        options = StateDictOptions(full_state_dict=full, strict=True)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["state_dict"],
                       optim_state_dict=state["optimizer"], options=options)  # fmt: skip
        if self.ema is not None:
            set_model_state_dict(self.ema.module, state["state_dict_ema"], options=options)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        if len(state["rng"]) != runtime.world_size:
            if runtime.is_main:
                print(f"warning: the checkpoint was written by {len(state['rng'])} processes, not "
                      f"{runtime.world_size}: the random state (drop path) starts afresh", file=sys.stderr)  # fmt: skip
            return
        rng = state["rng"][runtime.rank]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and runtime.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], runtime.device)


def checkpoints(output: str) -> list[str]:
    """The checkpoints in an output directory, oldest first."""
    return sorted(path for path in glob.glob(os.path.join(output, "checkpoint-*")) if not path.endswith(".tmp"))


def save_checkpoint(train_state: TrainState, output: str, keep: int, runtime: Runtime) -> str:
    """Writes checkpoint-<step> (a DCP directory when sharded, else a .pt file written by rank 0), then removes
    all but the `keep` newest."""
    path = os.path.join(output, f"checkpoint-{train_state.step:08d}")
    state = train_state.state_dict(runtime)
    if train_state.sharded:
        dcp.save(state, checkpoint_id=path)
    else:
        path += ".pt"
        if runtime.is_main:
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)
    if dist.is_initialized():
        dist.barrier()
    if runtime.is_main:
        for old in checkpoints(output)[:-keep]:
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    return path


def load_checkpoint(train_state: TrainState, path: str, runtime: Runtime) -> str:
    """Loads a checkpoint of either kind into the model as sharded now: a DCP directory reshards into it, a .pt
    file's full tensors are sharded on load."""
    if not os.path.basename(path.rstrip("/")).startswith("checkpoint-"):
        found = checkpoints(path)
        if not found:
            raise SystemExit(f"--resume {path}: no checkpoint-* in it")
        path = found[-1]
    if os.path.isdir(path):
        state = train_state.state_dict(runtime)  # the layout (and sharding) to load into
        dcp.load(state, checkpoint_id=path)
        train_state.load_state_dict(state, runtime, full=not train_state.sharded)
    else:
        train_state.load_state_dict(torch.load(path, map_location="cpu", weights_only=False), runtime, full=True)
    return path


# --- training ------------------------------------------------------------------------------------------------------


class Progress:
    """Rank 0's progress line per epoch (carriage return on a terminal, one line per update otherwise), log.jsonl
    in the output directory (every step's loss), and the run's summary. Losses stay on the device between updates;
    each update averages them over the processes (one all-reduce) and reads them."""

    def __init__(self, args, runtime: Runtime, steps_per_epoch: int):
        self.args, self.runtime, self.steps_per_epoch = args, runtime, steps_per_epoch
        self.log_path = os.path.join(args.output, "log.jsonl") if args.output else None
        self.tty = sys.stdout.isatty()
        self.line_open = False  # a progress line without its newline yet
        self.images, self.train_seconds, self.last_loss = 0, 0.0, float("nan")
        self.start_window()

    def start_window(self) -> None:
        self.losses, self.window_start = [], time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.losses.append(loss.detach().float())

    def update(self, epoch: int, step: int, lr: float) -> None:
        losses = all_reduce_sum(torch.stack(self.losses)) / self.runtime.world_size
        self.last_loss = losses.mean().item()  # the host waits for the device here, so the timing below is right
        seconds = time.perf_counter() - self.window_start
        images = len(self.losses) * self.args.batch_size * self.runtime.world_size
        self.images, self.train_seconds = self.images + images, self.train_seconds + seconds
        if self.runtime.is_main:
            in_epoch = (step - 1) % self.steps_per_epoch + 1
            line = (f"epoch {epoch + 1}/{self.args.epochs} [{in_epoch:>5}/{self.steps_per_epoch}] "
                    f"loss {self.last_loss:.4f}  lr {lr:.2e}  {images / seconds:8.1f} img/s  "
                    f"{1e3 * seconds / len(self.losses):7.1f} ms/step")  # fmt: skip
            self.line_open = self.tty and in_epoch != self.steps_per_epoch
            print(("\r" if self.tty else "") + line, end="" if self.line_open else "\n", flush=True)
            if self.log_path:
                first = step - len(self.losses) + 1
                lines = [json.dumps({"step": first + i, "loss": loss}) + "\n" for i, loss in enumerate(losses.tolist())]
                with open(self.log_path, "a") as log:
                    log.writelines(lines)
        self.start_window()

    def note(self, text: str) -> None:
        if self.runtime.is_main:
            print(("\n" if self.line_open else "") + text, flush=True)
            self.line_open = False

    def summary(self, step: int, accuracy: dict[str, float]) -> str:
        text = f"done: {step / self.steps_per_epoch:.2f} epochs, {step} steps, final loss {self.last_loss:.4f}"
        if "last" in accuracy:
            text += f", held-out top-1 best {accuracy['best']:.2f} last {accuracy['last']:.2f}"
        if "ema" in accuracy:
            text += f" (EMA {accuracy['ema']:.2f})"
        speed = self.images / self.train_seconds if self.train_seconds else float("nan")
        return text + f", {self.train_seconds:.1f} s training, {speed:.1f} img/s"


@torch.no_grad()
def top1(model: nn.Module, dataset: Dataset, args, runtime: Runtime) -> float:
    """Top-1 accuracy (%) over the held-out set. Every process runs as many batches (DistributedSampler pads with
    repeated samples, a few counted twice), as an FSDP2 forward is collective."""
    was_training = model.training
    model.eval()
    sampler = DistributedSampler(dataset, runtime.world_size, runtime.rank, shuffle=False)
    counts = torch.zeros(2, device=runtime.device)
    for images, labels in _loader(dataset, list(sampler), args, runtime, drop_last=False, seed=args.seed):
        images, labels = images.to(runtime.device, non_blocking=True), labels.to(runtime.device, non_blocking=True)
        with autocast(runtime):
            logits = model(images)
        counts += torch.stack([(logits.argmax(-1) == labels).sum(), torch.tensor(labels.numel(), device=counts.device)])
    model.train(was_training)
    correct, total = all_reduce_sum(counts).tolist()
    return 100.0 * correct / total


def train_steps(state: TrainState, criterion: nn.Module, loader: DataLoader, stop_step: int, progress: Progress,
                epoch: int, args, runtime: Runtime) -> int | None:
    """One epoch's steps (fewer when it reaches stop_step), with a checkpoint every --checkpoint-interval steps;
    returns the step of the last checkpoint written, if any."""
    saved = None
    for images, labels in loader:
        images, labels = images.to(runtime.device, non_blocking=True), labels.to(runtime.device, non_blocking=True)
        with autocast(runtime):
            loss = criterion(images, state.model(images), labels)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad is not None:
            nn.utils.clip_grad_norm_(state.model.parameters(), args.clip_grad)  # DTensor grads: the global norm
        state.optimizer.step()
        state.scheduler.step()
        state.step += 1
        if state.ema is not None:
            state.ema.update(unwrap(state.model), step=state.step)
        progress.add(loss)
        if state.step % args.log_interval == 0 or state.step % progress.steps_per_epoch == 0 or state.step == stop_step:
            progress.update(epoch, state.step, state.scheduler.get_last_lr()[0])
        if args.output and args.checkpoint_interval and state.step % args.checkpoint_interval == 0:
            save_checkpoint(state, args.output, args.keep_checkpoints, runtime)
            saved = state.step
        if state.step == stop_step:
            break
    return saved


def train(args: argparse.Namespace, runtime: Runtime, sharding: str) -> None:
    torch.manual_seed(args.seed)  # the same initial weights on every process (FSDP2 shards each process's copy)
    train_set, held_out, num_classes = build_datasets(args)
    steps_per_epoch = len(train_set) // runtime.world_size // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train_set)} training images make no batch of {args.batch_size} per process")
    total_steps = args.epochs * steps_per_epoch
    model = build_model(args, num_classes).to(runtime.device)
    teacher = build_teacher(args, num_classes, runtime)
    # The EMA is sharded as the model is: EMA is elementwise, so each process keeps (and averages) its own shard,
    # exactly, with no communication; evaluating it gathers its params as the model's forward does.
    ema = ModelEma(model, decay=args.ema_decay) if args.ema_decay is not None else None
    model = shard(model, sharding, runtime)
    if ema is not None and sharding == "fsdp2":
        shard(ema.module, sharding, runtime)
    optimizer = vitops.optim.create_optimizer(unwrap(model), args.opt, lr=args.lr, weight_decay=args.weight_decay)
    schedule = partial(cosine_with_warmup, warmup_steps=round(args.warmup_epochs * steps_per_epoch),
                       total_steps=total_steps, min_ratio=args.min_lr / args.lr)  # fmt: skip
    state = TrainState(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), ema,
                       sharded=sharding == "fsdp2")  # fmt: skip
    torch.manual_seed(args.seed + runtime.rank)  # other drop-path masks on every process
    if args.output and runtime.is_main:
        os.makedirs(args.output, exist_ok=True)
    if args.resume:
        path = load_checkpoint(state, args.resume, runtime)
        if runtime.is_main:
            print(f"resumed from {path} at step {state.step}", flush=True)
    base_loss = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing else nn.CrossEntropyLoss()
    criterion = DistillationLoss(base_loss, teacher, args.distillation, args.distillation_alpha, args.distillation_tau)
    stop_step = min(total_steps, args.stop_at_step or total_steps)
    if runtime.is_main:
        params = sum(p.numel() for p in unwrap(model).parameters())
        print(f"{args.model} ({params / 1e6:.2f}M params), {sharding} x{runtime.world_size} "
              f"({dist.get_backend() if dist.is_initialized() else 'single process'}, {runtime.device.type}), "
              f"{'bfloat16 autocast' if runtime.amp_dtype else 'float32'}, opt {args.opt}, "
              f"global batch {args.batch_size * runtime.world_size}, "
              f"{steps_per_epoch} steps/epoch, steps {state.step}..{stop_step} of {total_steps}",
              flush=True)  # fmt: skip
    progress = Progress(args, runtime, steps_per_epoch)
    accuracy = {}  # "best", "last", "ema": held-out top-1
    model.train()
    while state.step < stop_step:
        epoch, skip = divmod(state.step, steps_per_epoch)
        progress.start_window()
        loader = epoch_loader(train_set, args, runtime, epoch, skip)
        saved = train_steps(state, criterion, loader, stop_step, progress, epoch, args, runtime)
        if state.step % steps_per_epoch == 0 and held_out is not None:
            accuracy["last"] = top1(model, held_out, args, runtime)
            accuracy["best"] = max(accuracy["last"], accuracy.get("best", 0.0))
            ema_text = ""
            if ema is not None:
                accuracy["ema"] = top1(ema.module, held_out, args, runtime)
                ema_text = f", EMA {accuracy['ema']:.2f}"
            progress.note(f"epoch {epoch + 1}: held-out top-1 {accuracy['last']:.2f}{ema_text}")
        if args.output and saved != state.step:  # the end of an epoch or of the run
            progress.note(f"saved {save_checkpoint(state, args.output, args.keep_checkpoints, runtime)}")
    progress.note(progress.summary(state.step, accuracy))


def main(argv=None) -> None:
    args = parse_args(argv)
    runtime, sharding = init_runtime(args.sharding, args.amp)
    try:
        train(args, runtime, sharding)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
