"""Every vitops op is a real custom op: opcheck passes, torch.compile(fullgraph=True) traces it, and the Python
copy of each schema agrees with the C++ one."""
import pytest
import torch

import vitops
from vitops import _extension
from vitops.ops import drop_path_add
from tests.conftest import HAS_CUDA, device_backend_params


def drop_path_add_samples(device):
    """Argument tuples for the forward op, mixing inputs that need gradients with inputs that don't."""
    def t(*shape, dtype=torch.float32, grad=False, memory_format=None):
        x = torch.randn(*shape, device=device, dtype=dtype)
        if memory_format is not None:
            x = x.contiguous(memory_format=memory_format)
        return x.requires_grad_(grad)

    scale = lambda b, dtype=torch.float32: torch.tensor([0.0, 2.0, 1.25][:b], device=device, dtype=dtype)  # noqa: E731
    return [
        (t(2, 5, 8, grad=True), t(2, 5, 8, grad=True), t(8, grad=True), scale(2)),
        (None, t(3, 4, 6, grad=True), None, scale(3)),
        (t(2, 4, 3, 3), t(2, 4, 3, 3, grad=True), t(4, 1, 1, grad=True), None),
        (t(2, 4, 3, 3, memory_format=torch.channels_last, grad=True),
         t(2, 4, 3, 3, memory_format=torch.channels_last, grad=True), t(4, 1, 1), scale(2)),
        (t(2, 7, grad=True), t(2, 7, dtype=torch.bfloat16, grad=True), t(7, grad=True), scale(2)),
        (t(1, 3, dtype=torch.float64, grad=True), t(1, 3, dtype=torch.float64, grad=True),
         t(3, dtype=torch.float64, grad=True), scale(1, torch.float64)),
    ]


def _op_for(backend):
    return torch.ops.vitops.drop_path_add_triton if backend == "triton" else torch.ops.vitops.drop_path_add


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params("drop_path_add") if p.values[1] != "torch"])
def test_opcheck_drop_path_add(device, backend):
    op = _op_for(backend)
    for args in drop_path_add_samples(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params("drop_path_add") if p.values[1] != "torch"])
def test_opcheck_drop_path_add_backward(device, backend):
    op = (
        torch.ops.vitops.drop_path_add_backward_triton
        if backend == "triton"
        else torch.ops.vitops.drop_path_add_backward
    )
    g = torch.randn(2, 5, 8, device=device)
    branch = torch.randn(2, 5, 8, device=device, dtype=torch.bfloat16)
    gamma = torch.randn(8, device=device)
    scale = torch.tensor([0.0, 2.0], device=device)
    for args in [
        (g, branch, gamma, scale, torch.bfloat16, True),
        (g, None, gamma, scale, torch.bfloat16, True),
        (g, branch, gamma, None, torch.bfloat16, False),
        (g, None, None, scale, torch.float32, True),
    ]:
        torch.library.opcheck(op, args)


def test_python_schemas_match_cpp():
    if _extension.LOAD_ERROR is not None:
        pytest.skip(f"vitops._C is {_extension.LOAD_ERROR}")
    for name, schema in _extension.SCHEMAS.items():
        registered = getattr(torch.ops.vitops, name).default._schema
        assert str(registered) == str(torch._C.parse_schema(f"vitops::{schema}"))


def test_every_op_is_visible():
    for name in _extension.SCHEMAS:
        assert hasattr(torch.ops.vitops, name)
        for key in _extension.DISPATCH_KEYS:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vitops::{name}", key), (name, key)


def block_end(residual, branch, gamma, training):
    return drop_path_add(residual, branch, 0.2, training, gamma) * 2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")])])
def test_compile_fullgraph_inductor(device):
    residual = torch.randn(4, 9, 16, device=device, requires_grad=True)
    branch = torch.randn(4, 9, 16, device=device, requires_grad=True)
    gamma = torch.randn(16, device=device, requires_grad=True)
    compiled = torch.compile(block_end, fullgraph=True)
    # Eval mode is deterministic, so compiled and eager must agree, gradients included.
    out = compiled(residual, branch, gamma, False)
    grads = torch.autograd.grad(out.sum(), (residual, branch, gamma))
    want = block_end(residual, branch, gamma, False)
    want_grads = torch.autograd.grad(want.sum(), (residual, branch, gamma))
    torch.testing.assert_close(out, want)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)
    # Training draws the mask inside the graph; every sample is either its residual or the full sum.
    out = compiled(residual, branch, gamma, True).detach() / 2
    dropped = (out == residual.detach()).flatten(1).all(1)
    kept = torch.isclose(out, residual + branch * gamma / 0.8, rtol=1e-5, atol=1e-5).flatten(1).all(1)
    assert torch.all(dropped | kept)


@pytest.mark.parametrize("device,backend", device_backend_params("drop_path_add"))
def test_compile_fullgraph_each_backend(device, backend):
    if backend == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter does not run inside compiled graphs")
    residual = torch.randn(2, 3, 8, device=device, requires_grad=True)
    branch = torch.randn(2, 3, 8, device=device, requires_grad=True)
    gamma = torch.randn(8, device=device, requires_grad=True)
    with vitops.use_backend(backend):
        compiled = torch.compile(block_end, fullgraph=True, backend="aot_eager")
        out = compiled(residual, branch, gamma, False)
        out.sum().backward()
    torch.testing.assert_close(out, block_end(residual, branch, gamma, False))
    assert gamma.grad is not None and branch.grad is not None
