"""Every op of vitops/ops/schemas.def exists as torch.ops.vitops.<op>, with a kernel on every device's dispatch
key and a fake kernel, whatever was built. Each op's own tests (tests/ops/, tests/optim/) run opcheck and
torch.compile on it."""
import torch

from vitops import _backend, _extension


def test_every_op_is_visible():
    for name in _extension.SCHEMAS:
        assert hasattr(torch.ops.vitops, name)
        for key in _extension.DISPATCH_KEYS:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vitops::{name}", key), (name, key)


def test_every_op_has_a_fake_kernel_and_a_backend_table():
    for name in _extension.SCHEMAS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vitops::{name}", "Meta"), name
        for device_type in _backend.DEVICE_TYPES:
            assert _backend.availability()[name][device_type]["torch"] is None, name
