"""Which backend runs each op, and why the others can't.

Backends: "cuda" (compiled CUDA kernels), "triton", "cpu" (compiled C++ kernels) and "torch" (the pure-PyTorch
reference in vitops.ops.reference). By default an op runs on the best backend available for its tensors'
device; VITOPS_BACKEND=<name> (read at import) or `with vitops.use_backend(name):` forces one, and forcing a
backend that can't run gives an error that says why.

Availability is worked out once, when an op registers itself, so choosing a backend inside torch.compile is a
dictionary lookup and never breaks the graph.
"""
import contextlib
import importlib.util
import os

from vitops import _extension

BACKENDS = ("cuda", "triton", "cpu", "torch")
DEVICE_TYPES = ("cpu", "cuda")
# Best first. Triton runs CPU tensors only under its interpreter, which is for testing: it is never a default.
_PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

# op -> device type -> backend -> None if it can run, else why not.
_AVAILABILITY: dict[str, dict[str, dict[str, str | None]]] = {}
# op -> device type -> its own order of preference, where it differs from _PREFERENCE.
_OP_PREFERENCE: dict[str, dict[str, tuple[str, ...]]] = {}
_forced: list[str] = []
_ENV_BACKEND = os.environ.get("VITOPS_BACKEND") or None


def _triton_blocker() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


TRITON_BLOCKER = _triton_blocker()
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def register_op(
    op: str,
    *,
    has_triton: bool,
    triton_blocker: str | None = None,
    preference: dict[str, tuple[str, ...]] | None = None,
    cuda_blocker: str | None = None,
) -> None:
    """Records where `op` can run. `triton_blocker` says why its Triton kernels failed to import, if they did;
    `preference` (device type -> backends, best first) overrides the default order for this op; `cuda_blocker`
    says why an op has no compiled CUDA kernel by design."""
    _OP_PREFERENCE[op] = dict(preference or {})
    table = {}
    for device_type in DEVICE_TYPES:
        key = device_type.upper()
        reasons: dict[str, str | None] = {}
        for backend in ("cuda", "cpu"):
            if backend != device_type:
                reasons[backend] = f"runs {backend.upper()} tensors only"
            elif backend == "cuda" and cuda_blocker:
                reasons[backend] = cuda_blocker
            elif _extension.has_compiled_kernel(op, key):
                reasons[backend] = None
            elif _extension.LOAD_ERROR:
                reasons[backend] = f"vitops._C is {_extension.LOAD_ERROR}"
            else:
                reasons[backend] = f"vitops._C was built without {key} kernels for {op}"
        if not has_triton:
            reasons["triton"] = f"{op} has no Triton kernels"
        elif TRITON_BLOCKER or triton_blocker:
            reasons["triton"] = TRITON_BLOCKER or triton_blocker
        elif device_type == "cpu" and not TRITON_INTERPRET:
            reasons["triton"] = "Triton runs CPU tensors only under its interpreter (TRITON_INTERPRET=1)"
        else:
            reasons["triton"] = None
        reasons["torch"] = None
        table[device_type] = {backend: reasons[backend] for backend in BACKENDS}
    _AVAILABILITY[op] = table


def _check_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"vitops: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def default_backend(op: str, device_type: str) -> str:
    reasons = _AVAILABILITY[op][device_type]
    order = _OP_PREFERENCE[op].get(device_type, _PREFERENCE[device_type])
    return next(b for b in order if reasons[b] is None)


def backend_for(op: str, device_type: str) -> str:
    """The backend that runs `op` on tensors of `device_type` now."""
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"vitops.{op}: tensors on {device_type!r} are not supported (cpu or cuda only)")
    forced = _forced[-1] if _forced else _ENV_BACKEND
    if forced is None:
        return default_backend(op, device_type)
    _check_name(forced)
    reason = _AVAILABILITY[op][device_type][forced]
    if reason is not None:
        raise RuntimeError(f"vitops.{op}: backend {forced!r} can't run {device_type} tensors: {reason}")
    return forced


@contextlib.contextmanager
def use_backend(backend: str):
    """Runs every vitops op inside the block on `backend` ("cuda", "triton", "cpu" or "torch")."""
    _check_name(backend)
    _forced.append(backend)
    try:
        yield
    finally:
        _forced.pop()


def availability() -> dict[str, dict[str, dict[str, str | None]]]:
    """op -> device type -> backend -> None when it can run, else the reason it can't."""
    return {op: {d: dict(r) for d, r in table.items()} for op, table in _AVAILABILITY.items()}
