"""Loads the compiled library vitops._C, and defines from Python whatever it did not provide.

Every schema is written once, in vitops/ops/schemas.def, which the C++ build expands inside TORCH_LIBRARY and
this module reads as package data: when the library is missing (or was built before an op existed), the same
schemas are defined here, so torch.ops.vitops.<name> exists whatever was built.
"""
import re
from importlib import resources

import torch

_SCHEMA_FILE = "schemas.def"
_OP_PATTERN = re.compile(r'^VITOPS_OP\(((?:\s*"[^"]*")+)\s*\)', re.MULTILINE)


def _read_schemas() -> dict[str, str]:
    """op name -> schema, in the order of vitops/ops/schemas.def."""
    text = resources.files("vitops.ops").joinpath(_SCHEMA_FILE).read_text()
    schemas = {}
    for match in _OP_PATTERN.finditer(text):
        schema = "".join(re.findall(r'"([^"]*)"', match.group(1)))
        schemas[schema.split("(", 1)[0]] = schema
    return schemas


SCHEMAS = _read_schemas()

try:
    from vitops import _C  # noqa: F401  (loading it runs the static op registrations)

    LOAD_ERROR = None
except ImportError as error:
    _C = None
    if "No module named" in str(error):
        LOAD_ERROR = "not built (install with `pip install --no-build-isolation .`)"
    else:
        LOAD_ERROR = f"failed to load: {error}"

DISPATCH_KEYS = ("CPU", "CUDA")


def _compiled_kernel(op: str, key: str):
    qualname = f"vitops::{op}"
    if _C is None or not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key):
        return None
    return torch._C._dispatch_get_computed_kernel_for_dispatch_key(qualname, key)


# op -> dispatch key -> the kernel vitops._C registered, captured before vitops/ops/_define.py puts the run-time
# backend choice on those keys (the captured kernels stay callable through `call_boxed`).
COMPILED_KERNELS = {op: {key: k for key in DISPATCH_KEYS if (k := _compiled_kernel(op, key))} for op in SCHEMAS}
# Whether this build of vitops._C has any CUDA kernel, to tell "the build left it out" from "none is written".
BUILT_WITH_CUDA = any("CUDA" in kernels for kernels in COMPILED_KERNELS.values())

LIBRARY = torch.library.Library("vitops", "FRAGMENT")
for _name, _schema in SCHEMAS.items():
    if not hasattr(torch.ops.vitops, _name):
        LIBRARY.define(_schema)


def has_compiled_kernel(op: str, dispatch_key: str) -> bool:
    """Whether vitops._C registered a kernel of `op` for `dispatch_key` ("CPU" or "CUDA")."""
    return dispatch_key in COMPILED_KERNELS.get(op, {})
