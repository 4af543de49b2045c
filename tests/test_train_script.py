"""examples/train.py run as users run it: under torchrun with 2 gloo processes on the CPU (FSDP2, DDP) and as one
plain process, on a 2-block, 64-wide DeiT and 32x32 synthetic images. Each run is a fresh launch, so most of its
cost is the processes' start-up (importing torch); a few training steps follow. All of it: ~75 CPU-seconds; 174 s
of wall time on the 2-core machine shared by ~10 busy processes (2026-12)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitops
from tests.conftest import requires_cuda

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "train.py"
# 192 synthetic images, 16 per process: 6 steps per epoch on 2 processes, 12 on one.
TINY = [
    "--model", "deit_tiny_patch16_224", "--model-kwargs", "depth=2", "embed_dim=64", "num_heads=2",
    "--img-size", "32", "--batch-size", "16", "--synthetic-size", "192", "--warmup-epochs", "0.5",
    "--log-interval", "1",
]  # fmt: skip
# LAMB's layer-wise trust ratio moves each weight by about lr of its norm a step: it needs a larger lr and more steps
# than AdamW to leave the plateau at initialization (24 steps, global batch 32).
LAMB = ["--opt", "lamb", "--lr", "1e-2", "--synthetic-size", "384", "--epochs", "2"]


def run_script(*args: str, processes: int | None = None, cpu: bool = True) -> str:
    """Runs the script (as one plain process, or under torchrun with `processes` processes) and returns its
    standard output; fails with the output's tail."""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread per process: the processes share the cores
    # The vitops under test, also when it is built in place rather than installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(vitops.__file__).parent.parent), env.get("PYTHONPATH")]))
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    launcher = [sys.executable]
    if processes is not None:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    result = subprocess.run(
        [*launcher, str(SCRIPT), *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(f"examples/train.py {' '.join(args)} exited with {result.returncode}:\n{output[-6000:]}")
    return result.stdout


def logged_losses(output: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (output / "log.jsonl").read_text().splitlines())}


def assert_loss_falls(losses: dict[int, float]) -> None:
    values = [losses[step] for step in sorted(losses)]
    first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
    assert last < first - 0.1, f"the loss did not fall: {values}"


def summary(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("done: "))


@pytest.mark.slow  # two launches of 2 processes: 86 s on the loaded 2-core machine
def test_fsdp2_run_learns_and_a_resumed_run_continues_it(tmp_path):
    common = [*TINY, "--sharding", "fsdp2", "--opt", "adamw", "--ema-decay", "0.9", "--clip-grad", "1.0"]
    full = tmp_path / "full"
    stdout = run_script(*common, "--epochs", "2", "--output", str(full), "--checkpoint-interval", "4",
                        "--keep-checkpoints", "4", processes=2)  # fmt: skip
    losses = logged_losses(full)
    assert sorted(losses) == list(range(1, 13))
    assert_loss_falls(losses)
    assert "12 steps" in summary(stdout) and "EMA" in summary(stdout)
    held_out_top1 = float(summary(stdout).split("last ")[1].split()[0])
    assert held_out_top1 > 30.0  # 10 classes: chance is 10%
    checkpoint = full / "checkpoint-00000004"
    assert (checkpoint / ".metadata").is_file()  # a torch.distributed.checkpoint directory

    # From step 4 (mid-epoch: 6 steps per epoch) to step 9, in a new process group: the steps, the data order, the
    # drop-path masks, the optimizer, schedule and EMA all carry on, so the losses are those of the run above.
    resumed = tmp_path / "resumed"
    stdout = run_script(*common, "--epochs", "2", "--output", str(resumed), "--resume", str(checkpoint),
                        "--stop-at-step", "9", processes=2)  # fmt: skip
    assert f"resumed from {checkpoint} at step 4" in stdout
    assert "9 steps" in summary(stdout)
    resumed_losses = logged_losses(resumed)
    assert sorted(resumed_losses) == list(range(5, 10))
    torch.testing.assert_close(
        [resumed_losses[s] for s in range(5, 10)], [losses[s] for s in range(5, 10)], rtol=1e-6, atol=0
    )
    assert (resumed / "checkpoint-00000009" / ".metadata").is_file()


@pytest.mark.slow  # one launch of 2 processes: 17 s on the loaded 2-core machine
def test_fsdp2_run_with_lamb_learns(tmp_path):
    run_script(*TINY, *LAMB, "--sharding", "fsdp2", "--output", str(tmp_path), processes=2)
    assert_loss_falls(logged_losses(tmp_path))


@pytest.mark.slow  # one launch of 2 processes: 33 s on the loaded 2-core machine
def test_ddp_run_with_lamb_learns_and_writes_a_torch_save_checkpoint(tmp_path):
    stdout = run_script(*TINY, *LAMB, "--ema-decay", "0.9", "--output", str(tmp_path), processes=2)
    assert "ddp x2 (gloo, cpu)" in stdout
    assert_loss_falls(logged_losses(tmp_path))
    checkpoint = torch.load(tmp_path / "checkpoint-00000024.pt", map_location="cpu", weights_only=False)
    assert checkpoint["step"] == 24 and len(checkpoint["rng"]) == 2
    assert {"state_dict", "state_dict_ema", "optimizer", "scheduler"} <= checkpoint.keys()


def test_single_process_distillation_with_bf16_autocast(tmp_path):
    stdout = run_script(*TINY, "--model", "deit_tiny_distilled_patch16_224", "--teacher", "resnet18", "--amp",
                        "--epochs", "1", "--ema-decay", "0.9", "--output", str(tmp_path))  # fmt: skip
    assert "none x1 (single process, cpu), bfloat16 autocast" in stdout
    assert_loss_falls(logged_losses(tmp_path))
    # The checkpoint uses timm's keys, so the zoo loads it (the EMA weights first, as timm does).
    checkpoint = tmp_path / "checkpoint-00000012.pt"
    model = vitops.create_model("deit_tiny_distilled_patch16_224", img_size=32, num_classes=10, depth=2,
                                embed_dim=64, num_heads=2, checkpoint_path=str(checkpoint))  # fmt: skip
    ema = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict_ema"]
    torch.testing.assert_close(model.state_dict(), ema, rtol=0, atol=0)


@pytest.mark.cuda
@requires_cuda
def test_gpu_run_fsdp2_bf16(tmp_path):
    processes = min(2, torch.cuda.device_count())
    stdout = run_script(*TINY, "--sharding", "fsdp2", "--amp", "--epochs", "1", "--ema-decay", "0.9",
                        "--output", str(tmp_path), processes=processes, cpu=False)  # fmt: skip
    assert f"fsdp2 x{processes} (nccl, cuda), bfloat16 autocast" in stdout
    assert_loss_falls(logged_losses(tmp_path))
