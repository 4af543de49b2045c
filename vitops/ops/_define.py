"""Defines a vitops op in one call: what each op's file gives, and everything it would otherwise repeat.

An op's file (vitops/ops/<op>.py, vitops/optim/_kernels.py) writes only what is specific to the op: its Python
argument check, its fake kernel, its reference, the name of its Triton launcher, and its autograd formula. Given
those, `define_op`:

- takes the schema from vitops/ops/schemas.def (declared by vitops._C, or by vitops._extension from the same
  file when the library is missing);
- registers the fake kernel and the autograd formula;
- works out, per device type, which backends can run the op and why the others can't (vitops._backend);
- puts one kernel on each device's dispatch key (CPU, CUDA) that chooses the backend at run time: the compiled
  kernel that vitops._C registered there (captured before it is shadowed, called through `call_boxed`), the
  Triton launcher, or the plain-PyTorch implementation. So `torch.ops.vitops.<op>` is the only op there is: it
  works whatever was built, torch.compile sees one opaque op with a fake kernel, and `use_backend` reaches
  inside compiled graphs.

The compiled kernels check their own arguments; `check` runs before the Python backends (Triton, torch), so
every backend rejects the same inputs with the same kind of error.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

from vitops import _backend, _extension

_KEYSETS = {key: torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key)) for key in _extension.DISPATCH_KEYS}


def _triton_launcher(op: str, target: str | None, no_kernel: dict[str, str]):
    """(launcher, None) or (None, why there is none). `target` is "module:function" in vitops.ops.triton."""
    if target is None:
        return None, no_kernel.get("triton", f"{op} has no Triton kernels")
    if _backend.TRITON_BLOCKER:
        return None, _backend.TRITON_BLOCKER
    module, function = target.split(":")
    try:
        return getattr(importlib.import_module(f"vitops.ops.triton.{module}"), function), None
    except ImportError as error:  # a broken triton install must not break `import vitops`
        return None, f"its Triton kernels failed to import: {error}"


def _compiled_reason(op: str, backend: str, device_type: str, no_kernel: dict[str, str]) -> str | None:
    if backend != device_type:
        return f"runs {backend.upper()} tensors only"
    if backend in no_kernel:
        return no_kernel[backend]
    key = backend.upper()
    if _extension.has_compiled_kernel(op, key):
        return None
    if _extension.LOAD_ERROR:
        return f"vitops._C is {_extension.LOAD_ERROR}"
    if key == "CUDA" and not _extension.BUILT_WITH_CUDA:
        return "vitops._C was built without CUDA kernels (no nvcc or CUDA torch at build time, or VITOPS_BUILD_CUDA=0)"
    return f"this vitops._C was built without {op}'s {key} kernel: rebuild it"


def check_device_and_dtype(
    op: str, name: str, t: torch.Tensor, like_name: str, like: torch.Tensor, dtype: torch.dtype, why: str = ""
) -> None:
    """Argument `name` of `op` must be on the device of argument `like_name` (else ValueError) and be `dtype` (else
    TypeError; `why` ends the requirement, e.g. " for float16 inputs")."""
    if t.device != like.device:
        raise ValueError(f"vitops.{op}: {name} is on {t.device} but {like_name} is on {like.device}")
    if t.dtype != dtype:
        raise TypeError(f"vitops.{op}: {name} must be {dtype}{why}, got {t.dtype}")


def define_op(
    name: str,
    *,
    fake: Callable,
    reference: Callable,
    check: Callable | None = None,
    triton: str | None = None,
    torch_impl: Callable | None = None,
    supports: dict[str, Callable[..., bool]] | None = None,
    no_kernel: dict[str, str] | None = None,
    order: dict[str, tuple[str, ...]] | None = None,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
):
    """Registers everything of op `name` (declared in vitops/ops/schemas.def) and returns its OpOverload.

    Args:
        fake: the fake (meta) kernel: checks the arguments, returns empty outputs with the right metadata.
        reference: the op computed with plain PyTorch, with the op's exact output metadata (the spec).
        check: the Python argument check, run before the Triton and torch backends.
        triton: "module:function" of the Triton launcher in vitops.ops.triton, same signature as the op.
        torch_impl: the "torch" backend where it is not `reference` (PyTorch's own fused kernel, say).
        supports: backend -> predicate over the op's arguments, for a kernel that takes only some inputs; the
            others run on the next backend in the op's order.
        no_kernel: backend -> why the op has no kernel of that kind by design ("cpu", "cuda", "triton").
        order: device type -> backends, best first, where the op's differs from the default.
        backward, setup_context: the autograd formula (torch.library.register_autograd).
    """
    qualname = f"vitops::{name}"
    no_kernel = no_kernel or {}
    supports = supports or {}
    triton_fn, triton_reason = _triton_launcher(name, triton, no_kernel)
    torch_fn = torch_impl or reference

    def checked(fn):
        if check is None:
            return fn

        def run(*args):
            check(*args)
            return fn(*args)

        return run

    reasons, orders = {}, {}
    for device_type in _backend.DEVICE_TYPES:
        table = {b: _compiled_reason(name, b, device_type, no_kernel) for b in ("cuda", "cpu")}
        if triton_reason is None and device_type == "cpu" and not _backend.TRITON_INTERPRET:
            table["triton"] = "Triton runs CPU tensors only under its interpreter (TRITON_INTERPRET=1)"
        else:
            table["triton"] = triton_reason
        table["torch"] = None
        reasons[device_type] = {b: table[b] for b in _backend.BACKENDS}
        orders[device_type] = (order or {}).get(device_type, _backend.DEFAULT_ORDER[device_type])
    absent = frozenset(no_kernel) | ({"triton"} if triton is None else set())
    _backend.register(name, reasons, orders, absent)

    for key in _extension.DISPATCH_KEYS:
        device_type = key.lower()
        impls = {"triton": checked(triton_fn), "torch": checked(torch_fn)}
        compiled = _extension.COMPILED_KERNELS[name].get(key)
        if compiled is not None:
            impls[device_type] = lambda *args, _k=compiled, _ks=_KEYSETS[key]: _k.call_boxed(_ks, *args)
        _extension.LIBRARY.impl(name, _run_on_chosen_backend(name, device_type, impls, supports), key)

    torch.library.register_fake(qualname)(fake)
    if backward is not None:
        torch.library.register_autograd(
            qualname, _on_forward_backend(backward), setup_context=_remembering_forced_backend(setup_context)
        )
    return getattr(torch.ops.vitops, name).default


# A backend forced around a forward call also runs its backward, as SDPA's backend choice does; autograd may run
# the backward later, outside the `use_backend` block, and on another thread (CUDA's autograd worker).
def _remembering_forced_backend(setup_context):
    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.forced_backend = _backend.forced_backend()

    return setup


def _on_forward_backend(backward):
    def run(ctx, *grads):
        with _backend.forcing(ctx.forced_backend):
            return backward(ctx, *grads)

    return run


def _run_on_chosen_backend(name: str, device_type: str, impls: dict, supports: dict):
    def kernel(*args):
        backend = _backend.backend_for(name, device_type)
        if backend in supports and not supports[backend](*args):
            reasons = _backend.availability_of(name, device_type)
            backend = next(
                b
                for b in _backend.order(name, device_type) + ("torch",)
                if b != backend and reasons[b] is None and (b not in supports or supports[b](*args))
            )
        return impls[backend](*args)

    kernel.__name__ = f"{name}_{device_type}"
    return kernel
