"""`vitops.patch_model(model)`: swaps a timm model's Attention and DropPath modules for vitops layers in place."""
from __future__ import annotations

import dataclasses

from torch import nn

from vitops.layers.attention import Attention
from vitops.layers.drop_path import DropPath


@dataclasses.dataclass
class PatchReport:
    """What patch_model did. `replaced` and `skipped` hold (module name, class name[, reason]) tuples."""

    replaced: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (name, old class, new class)
    skipped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (name, class, why)
    _model: nn.Module | None = dataclasses.field(default=None, repr=False)
    _originals: dict[str, nn.Module] = dataclasses.field(default_factory=dict, repr=False)

    def counts(self) -> dict[str, int]:
        """Number of replaced modules per original class name."""
        out: dict[str, int] = {}
        for _, old, _ in self.replaced:
            out[old] = out.get(old, 0) + 1
        return out

    def revert(self) -> None:
        """Puts the original modules back (they share their parameters with the vitops ones, so any training
        done in between is kept)."""
        if self._model is None:
            return
        for name, module in self._originals.items():
            _set_submodule(self._model, name, module)
        self._originals.clear()
        self.replaced.clear()

    def __str__(self) -> str:
        lines = [f"vitops.patch_model: replaced {len(self.replaced)} modules {self.counts()}"]
        lines += [f"  skipped {name} ({cls}): {why}" for name, cls, why in self.skipped]
        return "\n".join(lines)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _timm_classes():
    try:
        from timm.layers import Attention as TimmAttention
        from timm.layers import DropPath as TimmDropPath
    except ImportError:
        return None, None
    return TimmAttention, TimmDropPath


def patch_model(model: nn.Module, *, attention: bool = True, drop_path: bool = True) -> PatchReport:
    """Replaces, in place, every timm `Attention` with `vitops.layers.Attention` and every timm `DropPath` with
    `vitops.layers.DropPath`. The new modules share the old ones' submodules and parameters: the state_dict,
    the optimizer's parameters and the outputs are unchanged (up to the kernels' rounding).

    Only modules whose class is exactly timm's are replaced; subclasses and other attention variants (their
    forward may differ) are listed in the report's `skipped` with the reason. Returns a PatchReport; its
    `revert()` puts the original modules back. A model without timm modules is returned untouched.

    A patched model still runs under torch.jit.script (the new layers call vitops' ops), torch.export and
    torch.compile; a program that loads the scripted or exported model must `import vitops` first.
    """
    report = PatchReport(_model=model)
    timm_attention, timm_drop_path = _timm_classes()
    if timm_attention is None:
        report.skipped.append(("", type(model).__name__, "timm is not installed"))
        return report
    for name, module in list(model.named_modules()):
        if not name:
            continue
        new = None
        if attention and isinstance(module, timm_attention):
            if type(module) is not timm_attention:
                report.skipped.append((name, type(module).__name__, "a subclass of timm Attention"))
                continue
            try:
                new = Attention.from_timm(module)
            except ValueError as error:
                report.skipped.append((name, type(module).__name__, str(error)))
                continue
        elif drop_path and isinstance(module, timm_drop_path):
            if type(module) is not timm_drop_path:
                report.skipped.append((name, type(module).__name__, "a subclass of timm DropPath"))
                continue
            new = DropPath(module.drop_prob, module.scale_by_keep)
            new.fused = True  # the point of patching, whatever the layer config says (as Attention.from_timm)
            new.train(module.training)
        elif attention and type(module).__name__.startswith("Attention") and "timm" in type(module).__module__:
            report.skipped.append((name, type(module).__name__, "not timm's plain Attention"))
        if new is None:
            continue
        _set_submodule(model, name, new)
        report._originals[name] = module
        report.replaced.append((name, type(module).__name__, f"vitops.layers.{type(new).__name__}"))
    return report
