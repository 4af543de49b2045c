"""Which form vitops layers take when they are built: fused (the default) or plain PyTorch.

Fused layers run vitops' custom ops (`torch.ops.vitops.*`), in eager mode, under torch.compile, torch.export and
torch.jit.script alike; a program that loads such a scripted or exported model must `import vitops` first, since
the ops' kernels are registered by it. Plain layers compute the same function with stock PyTorch ops only (timm's
own formulas), so the model scripts, exports and converts to ONNX without vitops: that is what `scriptable` and
`exportable` ask for, as in timm.

The flags are read once, when a layer is built. They are set by `vitops.create_model(..., scriptable=True)` or
`exportable=True`, by `set_layer_config` below, and, when timm is imported, by timm's own
`timm.layers.set_layer_config`, `set_scriptable` and `set_exportable`.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Optional

_scriptable = False
_exportable = False


def _timm_says(flag: str) -> bool:
    # timm can only have set its flags if it has been imported, so vitops never imports timm for this.
    config = sys.modules.get("timm.layers.config")
    return bool(config is not None and getattr(config, flag)())


def is_scriptable() -> bool:
    """Whether layers built now must be scriptable without vitops (vitops' flag or timm's)."""
    return _scriptable or _timm_says("is_scriptable")


def is_exportable() -> bool:
    """Whether layers built now must export without vitops ops (vitops' flag or timm's)."""
    return _exportable or _timm_says("is_exportable")


def use_fused_ops() -> bool:
    """Whether layers built now run vitops' fused ops: unless scriptable or exportable was asked for."""
    return not (is_scriptable() or is_exportable())


@contextlib.contextmanager
def set_layer_config(scriptable: Optional[bool] = None, exportable: Optional[bool] = None) -> Iterator[None]:
    """Within the block, layers are built plain (stock PyTorch ops) when `scriptable` or `exportable` is True.
    None leaves a flag as it is; the previous flags come back on exit."""
    global _scriptable, _exportable
    previous = _scriptable, _exportable
    if scriptable is not None:
        _scriptable = bool(scriptable)
    if exportable is not None:
        _exportable = bool(exportable)
    try:
        yield
    finally:
        _scriptable, _exportable = previous
