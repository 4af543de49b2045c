"""The sdist is complete: built from this tree, installed on its own with --no-build-isolation into a fresh target
(against the torch already installed, which is not reinstalled), the package imports from outside the tree and runs
one op of each kind on its compiled CPU kernels. And a build without torch stops at once, saying what to do.

The install compiles the C++ CPU kernels only (VITOPS_BUILD_CUDA=0): about 2 minutes on 2 cores. It works in
temporary folders: the tree's in-place vitops/_C*.so and build/ are left alone."""
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run from a folder outside the tree, with only the installed target (and torch's environment) on the path.
SMOKE_TEST = r"""
import sys
from pathlib import Path

import torch

import vitops
import vitops._C
from vitops.ops import attention_packed, drop_path_add, fuse_conv_bn
from vitops.optim import Lamb

target = Path(sys.argv[1]).resolve()
for module in (vitops, vitops._C):
    assert Path(module.__file__).resolve().is_relative_to(target), f"{module.__name__} from {module.__file__}"
for op in ("drop_path_add", "fuse_conv_bn", "lamb_moments"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vitops::{op}", "CPU"), f"no compiled CPU {op}"

torch.manual_seed(0)
residual, branch = torch.randn(8, 5, 16), torch.randn(8, 5, 16)
with vitops.use_backend("cpu"):
    out = drop_path_add(residual, branch, drop_prob=0.5, training=True)
kept = torch.isclose(out, residual + branch / 0.5).flatten(1).all(1)
dropped = torch.equal(out[~kept], residual[~kept])
assert dropped and 0 < kept.sum() < 8, "drop_path_add: each sample is its residual or residual + branch / keep"

qkv = torch.randn(2, 7, 3 * 2 * 4)  # 2 heads of 4 channels
q, k, v = qkv.reshape(2, 7, 3, 2, 4).permute(2, 0, 3, 1, 4)
want = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 7, 8)
torch.testing.assert_close(attention_packed(qkv, 2), want)

conv, bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4).eval()
bn.running_mean.uniform_(-1, 1)
bn.running_var.uniform_(0.5, 2)
with torch.no_grad(), vitops.use_backend("cpu"):
    got = fuse_conv_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    want = torch.nn.utils.fusion.fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
for a, b in zip(got, want):
    torch.testing.assert_close(a, b)

params = {backend: torch.nn.Parameter(torch.ones(16, 16)) for backend in ("cpu", "torch")}
for backend, p in params.items():
    p.grad = torch.linspace(-1, 1, 256).reshape(16, 16)
    with vitops.use_backend(backend):
        Lamb([p], lr=1e-2, weight_decay=0.1).step()
assert not torch.equal(params["cpu"], torch.ones(16, 16))
torch.testing.assert_close(params["cpu"], params["torch"])
print("ok")
"""


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def build_sdist(out: Path) -> Path:
    run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(ROOT)], timeout=300)
    (sdist,) = out.glob("vitops-*.tar.gz")
    return sdist


@pytest.mark.slow
def test_sdist_installs_and_runs_outside_the_tree(tmp_path):
    sdist = build_sdist(tmp_path / "dist")
    with tarfile.open(sdist) as archive:
        names = {Path(name).relative_to(Path(name).parts[0]).as_posix() for name in archive.getnames()}
    sources = [p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()]
    missing = {"LICENSE", "README.md", "CMakeLists.txt", "vitops/ops/schemas.def", "tests/cpp/dispatch_test.cpp"}
    missing = (missing | set(sources)) - names
    assert not missing, f"the sdist lacks {sorted(missing)}"
    extra = [name for name in names if name.startswith("tests/") and not name.startswith("tests/cpp")]
    extra += [name for name in names if name.endswith((".so", ".pyc"))]
    assert not extra, f"the sdist carries {extra}"

    target = tmp_path / "site"
    env = dict(os.environ, VITOPS_BUILD_CUDA="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
    run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "--target",
         str(target), str(sdist)], env=env, timeout=900)  # fmt: skip

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    result = run([sys.executable, "-c", SMOKE_TEST, str(target)], cwd=outside, env=env, timeout=300)
    assert result.stdout.strip().endswith("ok")


def test_build_without_torch_stops_at_once_with_what_to_do(tmp_path):
    """pip's metadata step (setup.py dist_info), in an environment where torch can't be imported, as in an isolated
    build environment: it fails within seconds, before pip would resolve and download any dependency."""
    without_torch = (
        "import runpy, sys; sys.modules['torch'] = None; "
        "sys.argv = ['setup.py', 'dist_info', '--output-dir', sys.argv[1]]; "
        "runpy.run_path('setup.py', run_name='__main__')"
    )
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", without_torch, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "--no-build-isolation" in result.stderr and "install torch first" in result.stderr, result.stderr
    assert time.monotonic() - start < 30
    assert not list(tmp_path.iterdir())
