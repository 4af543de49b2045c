"""Backend selection, overrides, and the `python -m vitops info` report."""
import json
import os
import subprocess
import sys
import threading
from unittest import mock

import pytest
import torch

import vitops
from vitops import _backend, _extension
from vitops.ops import drop_path_add


def test_default_backend_per_device():
    # drop_path_add has every kind of kernel: each device's default is its compiled one when built, else the next.
    cpu = _backend.default_backend("drop_path_add", "cpu")
    assert cpu == ("cpu" if _extension.has_compiled_kernel("drop_path_add", "CPU") else "torch")
    cuda = _backend.default_backend("drop_path_add", "cuda")
    if _extension.has_compiled_kernel("drop_path_add", "CUDA"):
        assert cuda == "cuda"
    else:
        assert cuda == ("triton" if _backend.TRITON_BLOCKER is None else "torch")


def test_forcing_an_unavailable_backend_says_why():
    x = torch.randn(2, 3)
    with vitops.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' can't run cpu tensors: runs CUDA tensors only"):
            drop_path_add(x, x, 0.5, True)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with vitops.use_backend("fast"):
            pass


def test_use_backend_nests_restores_and_ignores_case():
    default = _backend.default_backend("drop_path_add", "cpu")
    with vitops.use_backend("TORCH"):
        assert _backend.backend_for("drop_path_add", "cpu") == "torch"
        with vitops.use_backend("Cpu" if default == "cpu" else "torch"):
            assert _backend.backend_for("drop_path_add", "cpu") == default
        assert _backend.backend_for("drop_path_add", "cpu") == "torch"
    assert _backend.backend_for("drop_path_add", "cpu") == default


def test_use_backend_is_per_thread():
    """Two threads force different backends at the same time; each op call runs on its own thread's choice."""
    if _backend.default_backend("drop_path_add", "cpu") != "cpu":
        pytest.skip("needs the compiled CPU kernel as a second backend")
    ran_on = {}
    barrier = threading.Barrier(2)
    original = _backend.backend_for

    def record(op, device_type):
        backend = original(op, device_type)
        ran_on.setdefault(threading.current_thread().name, set()).add(backend)
        return backend

    def worker(backend):
        with vitops.use_backend(backend):
            barrier.wait()  # both threads are inside their use_backend blocks now
            x = torch.randn(4, 8)
            for _ in range(20):
                drop_path_add(x, x, 0.5, True, torch.ones(8))
            barrier.wait()

    with mock.patch.object(_backend, "backend_for", record):
        threads = [threading.Thread(target=worker, args=(b,), name=b) for b in ("cpu", "torch")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert ran_on == {"cpu": {"cpu"}, "torch": {"torch"}}
    assert _backend.forced_backend() is None


def _run_module(*args, env=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=full_env, check=False, timeout=300
    )


def test_env_var_forces_backend_in_any_case():
    code = (
        "import torch, vitops\n"
        "from vitops import _backend\n"
        "print(_backend.backend_for('drop_path_add', 'cpu'))\n"
    )
    result = _run_module("-c", code, env={"VITOPS_BACKEND": "Torch"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch"


@pytest.mark.parametrize("args", [("-c", "import vitops"), ("-m", "vitops", "info")])
def test_unknown_env_backend_fails_at_import_naming_the_variable(args):
    result = _run_module(*args, env={"VITOPS_BACKEND": "nonsense"})
    assert result.returncode != 0
    assert "VITOPS_BACKEND" in result.stderr and "'nonsense'" in result.stderr
    assert "cuda, triton, cpu, torch" in result.stderr


def test_info_command_lists_every_op_and_reason():
    result = _run_module("-m", "vitops", "info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert set(info["ops"]) >= set(op for op in _extension.SCHEMAS if not op.endswith("_backward"))
    cpu = info["ops"]["drop_path_add"]["cpu"]
    assert cpu["default"] in _backend.BACKENDS
    assert cpu["unavailable"]["cuda"] == "runs CUDA tensors only"
    text = _run_module("-m", "vitops", "info")
    assert "drop_path_add" in text.stdout and "cpu tensors ->" in text.stdout


def test_missing_extension_falls_back(tmp_path):
    """With vitops._C unloadable, import still works, the ops still exist, and info says why."""
    code = (
        "import sys\n"
        "sys.modules['vitops._C'] = None\n"  # makes `from vitops import _C` raise ImportError
        "import torch, vitops\n"
        "from vitops import _extension, _backend\n"
        "x = torch.randn(3, 4)\n"
        "out = vitops.ops.drop_path_add(x, x, 0.5, True, torch.ones(4))\n"
        "out2 = torch.ops.vitops.drop_path_add(x, x, None, torch.ones(3))\n"
        "assert torch.equal(out2, x + x)\n"
        "print(_backend.default_backend('drop_path_add', 'cpu'))\n"
        "print(vitops.backend_info()['extension']['error'])\n"
    )
    result = _run_module("-c", code)
    assert result.returncode == 0, result.stderr
    backend, error = result.stdout.strip().splitlines()
    assert backend == "torch"
    assert error.startswith("failed to load") or error.startswith("not built")


def test_availability_is_public_and_says_why():
    table = vitops.availability()
    assert table["drop_path_add"]["cpu"]["cpu"] is None  # the compiled CPU kernel runs (the build has it)
    assert "none is written" in table["attention"]["cpu"]["cpu"]
    assert set(table["lamb_moments"]) == {"cpu", "cuda"}
