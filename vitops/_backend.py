"""Which backend runs each op, and why the others can't.

Backends: "cuda" (compiled CUDA kernels), "triton", "cpu" (compiled C++ kernels) and "torch" (plain PyTorch: the
reference in vitops/ops/reference.py, or PyTorch's own fused kernel where one computes the same thing). By default
an op runs on the best backend available for its tensors' device. `VITOPS_BACKEND=<name>` (read at import) or
`with vitops.use_backend(name):` forces one: every op that has a kernel of that kind runs it, and one that can't
run the op's tensors (not built, no triton, the other device) raises an error that says why; an op with no kernel
of that kind by design (e.g. attention has no compiled CPU kernel) stays on its default.

The choice is made inside each op's kernel, at run time (vitops/ops/_define.py), so it never breaks a
torch.compile graph and a compiled graph follows `use_backend` too. `use_backend` is per thread (and per asyncio
task): a ContextVar, so forcing a backend in one thread leaves every other thread's choice alone.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os

BACKENDS = ("cuda", "triton", "cpu", "torch")
DEVICE_TYPES = ("cpu", "cuda")
# Best first. Triton runs CPU tensors only under its interpreter, which is for testing: it is never a default.
DEFAULT_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
ENV_VAR = "VITOPS_BACKEND"


def normalize(name: str, *, source: str = "backend") -> str:
    """`name` in lower case, if it names a backend; else a ValueError that names `source` and the choices."""
    backend = name.strip().lower() if isinstance(name, str) else name
    if backend not in BACKENDS:
        raise ValueError(f"vitops: unknown {source} {name!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def _env_backend() -> str | None:
    value = os.environ.get(ENV_VAR, "")
    return normalize(value, source=ENV_VAR) if value.strip() else None


ENV_BACKEND = _env_backend()
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("vitops_forced_backend", default=None)

TRITON_BLOCKER = None if importlib.util.find_spec("triton") is not None else "triton is not installed"
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# op -> device type -> backend -> None if it can run, else why not.
_REASONS: dict[str, dict[str, dict[str, str | None]]] = {}
# op -> device type -> backends, best first.
_ORDER: dict[str, dict[str, tuple[str, ...]]] = {}
# op -> the backends it has no kernel of, by design (a forced one of these leaves the op on its default).
_ABSENT: dict[str, frozenset[str]] = {}


def register(
    op: str, reasons: dict[str, dict[str, str | None]], order: dict[str, tuple[str, ...]], absent: frozenset[str]
) -> None:
    """Records where `op` can run (see vitops/ops/_define.py, which works the reasons out)."""
    _REASONS[op] = reasons
    _ORDER[op] = order
    _ABSENT[op] = absent


def forced_backend() -> str | None:
    """The backend forced in this thread by use_backend, else by VITOPS_BACKEND, else None."""
    return _forced.get() or ENV_BACKEND


def order(op: str, device_type: str) -> tuple[str, ...]:
    return _ORDER[op][device_type]


def availability_of(op: str, device_type: str) -> dict[str, str | None]:
    """backend -> None when it can run `op` on `device_type` tensors, else why not."""
    return _REASONS[op][device_type]


def default_backend(op: str, device_type: str) -> str:
    reasons = _REASONS[op][device_type]
    return next(b for b in _ORDER[op][device_type] if reasons[b] is None)


def backend_for(op: str, device_type: str) -> str:
    """The backend that runs `op` on tensors of `device_type` now, in this thread."""
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"vitops.{op}: tensors on {device_type!r} are not supported (cpu or cuda only)")
    forced = forced_backend()
    if forced is None or forced in _ABSENT[op]:
        return default_backend(op, device_type)
    reason = _REASONS[op][device_type][forced]
    if reason is not None:
        raise RuntimeError(f"vitops.{op}: backend {forced!r} can't run {device_type} tensors: {reason}")
    return forced


@contextlib.contextmanager
def use_backend(backend: str):
    """Runs every vitops op inside the block, in this thread, on `backend` ("cuda", "triton", "cpu" or "torch";
    any case). The backward of an op called inside the block runs on the same backend, wherever and whenever
    autograd runs it. An input the forced backend's kernel does not take (e.g. a head_dim the CUDA attention
    kernel was not built for) runs on the op's next backend in its default order."""
    with forcing(normalize(backend)):
        yield


@contextlib.contextmanager
def forcing(backend: str | None):
    """Forces `backend` (already normalized) in this thread for the block; None forces nothing."""
    if backend is None:
        yield
        return
    token = _forced.set(backend)
    try:
        yield
    finally:
        _forced.reset(token)


def availability() -> dict[str, dict[str, dict[str, str | None]]]:
    """op -> device type -> backend -> None when it can run, else the reason it can't."""
    return {op: {d: dict(r) for d, r in table.items()} for op, table in _REASONS.items()}
