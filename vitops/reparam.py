"""vitops.reparameterize: turn a trained model into its inference form, with the same outputs in eval mode.

Two passes over the model:
  1. every module with a `reparameterize()` method that takes no arguments (vitops' ConvNormAct, RepVGGBlock and
     ACBlock, timm's RepVggBlock and MobileOneBlock, ...) is asked to re-parameterize itself, outermost first;
  2. every remaining Conv -> BatchNorm pair is folded: the conv takes the BatchNorm's scale and shift and the
     BatchNorm is replaced by nn.Identity (timm's BatchNormAct2d by its dropout and activation).

A pair is only folded where the BatchNorm is known to read the conv's output and nothing else reads it. That is
established from a torch.fx trace of the model, made as timm makes its own: convs, BatchNorms and the modules timm
registers as untraceable (timm.layers.register_notrace_module) are leaves, and timm's registered functions
(register_notrace_function) are wrapped. A conv qualifies when each of its calls feeds exactly one user, a call of
the same BatchNorm, and that BatchNorm reads nothing else. Leaf modules that hold convs and BatchNorms are traced
on their own, in turn, when their forward takes a single input (an option could send a caller down another path
than the trace's). A module that can't be traced is searched child by child the same way, and its own direct
(conv, BatchNorm) children are folded only when it is a plain nn.Sequential, which is always safe; the report
names such modules.
"""
from __future__ import annotations

import copy
import inspect
import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from vitops.layers._fusion import fold_bn, in_layout_of

_WHERE = "vitops.reparameterize"


@dataclass
class ReparamReport:
    """What vitops.reparameterize did.

    Attributes:
        blocks: class name -> how many modules of that class re-parameterized themselves (pass 1); blocks that
            already were in their inference form are not counted.
        conv_bn_pairs: Conv -> BatchNorm pairs folded by the model walk (pass 2).
        pair_search: how pass 2 found the pairs: "fx" when the whole model traced, else which modules could not
            be traced (and were searched child by child, with the Sequential rule for their own children).
        convs_before, convs_after: conv modules in the model.
        bns_before, bns_after: BatchNorm modules in the model.
        params_before, params_after: parameter counts.
        flops_before, flops_after: FLOPs of one forward of `example_input` (convs, linears and BatchNorms), or
            None when no example_input was given.
        max_rel_error: the largest |after - before| over the model's tensor outputs for `example_input`, relative
            to the largest |before|; None without example_input. A check that the result computes the same.
    """

    blocks: dict[str, int] = field(default_factory=dict)
    conv_bn_pairs: int = 0
    pair_search: str = "fx"
    convs_before: int = 0
    convs_after: int = 0
    bns_before: int = 0
    bns_after: int = 0
    params_before: int = 0
    params_after: int = 0
    flops_before: int | None = None
    flops_after: int | None = None
    max_rel_error: float | None = None

    @property
    def convs_folded(self) -> int:
        """Convs removed by merging branches (folding a BatchNorm into a conv keeps the conv)."""
        return self.convs_before - self.convs_after

    @property
    def bns_folded(self) -> int:
        """BatchNorms removed, by the blocks and by Conv -> BatchNorm folding together."""
        return self.bns_before - self.bns_after

    def __str__(self) -> str:
        blocks = ", ".join(f"{n} x{c}" for n, c in sorted(self.blocks.items())) or "none"
        lines = [
            f"re-parameterized blocks: {blocks}",
            f"conv->BN pairs folded: {self.conv_bn_pairs} (found by {self.pair_search})",
            f"convs: {self.convs_before} -> {self.convs_after}, BatchNorms: {self.bns_before} -> {self.bns_after}",
            f"parameters: {self.params_before:,} -> {self.params_after:,}",
        ]
        if self.flops_before is not None:
            lines.append(f"FLOPs: {self.flops_before:,} -> {self.flops_after:,}")
        if self.max_rel_error is not None:
            lines.append(f"largest output change on example_input: {self.max_rel_error:.2e} of the output's scale")
        return "\n".join(lines)


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, _ConvNd) and not m.transposed


_STOCK_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


def _is_foldable_conv(m: nn.Module) -> bool:
    """A conv whose output is `conv(x, weight) + bias` with its own weight as stored: torch's convs and
    subclasses that keep their forward, and timm's Conv2dSame (which only pads first). Not convs that transform
    their weight in forward (timm's StdConv2d standardizes it, which would undo a folded scale)."""
    if not _is_conv(m) or m.weight is None:
        return False
    return type(m).forward in _STOCK_CONV_FORWARDS or type(m).__name__ == "Conv2dSame"


def _is_bn(m: nn.Module) -> bool:
    """A BatchNorm torch implements (any rank, SyncBatchNorm), or timm's BatchNormAct2d (BN, then drop, act)."""
    if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
        return True
    timm_bn_act = type(m).__name__ == "BatchNormAct2d" and hasattr(m, "act") and hasattr(m, "drop")
    return isinstance(m, _BatchNorm) and timm_bn_act


def _count(model: nn.Module) -> tuple[int, int, int]:
    modules = list(model.modules())
    convs = sum(_is_conv(m) for m in modules)
    bns = sum(isinstance(m, _BatchNorm) for m in modules)
    return convs, bns, sum(p.numel() for p in model.parameters())


def _tensors(output) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves(output)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _relative_change(before, after) -> float:
    scale, change = 0.0, 0.0
    for a, b in zip(_tensors(before), _tensors(after)):
        scale = max(scale, a.abs().max().item() if a.numel() else 0.0)
        change = max(change, (a.double() - b.double()).abs().max().item() if a.numel() else 0.0)
    return change / scale if scale > 0 else change


def _run_counting(model: nn.Module, example_input):
    """(FLOPs, output) of one forward of `example_input`."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if not isinstance(output, torch.Tensor):
            return
        if _is_conv(module):
            per_output = module.in_channels // module.groups
            for k in module.kernel_size:
                per_output *= k
            total += 2 * output.numel() * per_output + (output.numel() if module.bias is not None else 0)
        elif isinstance(module, nn.Linear):
            total += 2 * output.numel() * module.in_features + (output.numel() if module.bias is not None else 0)
        elif isinstance(module, _BatchNorm):
            total += 2 * output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children()) or _is_bn(m)]
    try:
        with torch.no_grad():
            output = model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for h in handles:
            h.remove()
    return total, output


def _takes_no_arguments(method) -> bool:
    try:
        signature = inspect.signature(method)
    except (TypeError, ValueError):
        return False
    return all(
        p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        for p in signature.parameters.values()
    )


def _structure(module: nn.Module) -> tuple:
    return tuple(type(m) for m in module.modules()), tuple(p.shape for p in module.parameters())


def _reparameterize_blocks(module: nn.Module, counts: dict[str, int]) -> None:
    method = getattr(module, "reparameterize", None)
    if callable(method) and _takes_no_arguments(method):
        before = _structure(module)
        method()
        if _structure(module) != before:  # count only the blocks that were not re-parameterized already
            name = type(module).__name__
            counts[name] = counts.get(name, 0) + 1
        return  # the block has replaced its own children
    for child in list(module.children()):
        _reparameterize_blocks(child, counts)


def _timm_fx_lists() -> tuple[set, tuple]:
    """The module types and functions timm registers as untraceable (empty when timm is not imported: then no
    timm module can be in the model)."""
    for name in ("timm.layers", "timm.models"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "get_notrace_modules"):
            return set(module.get_notrace_modules()), tuple(module.get_notrace_functions())
    return set(), ()


class _LeafTracer(torch.fx.Tracer):
    def __init__(self, leaf_types: set, functions: tuple):
        super().__init__(autowrap_functions=functions, param_shapes_constant=True)
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_foldable_conv(m) or _is_bn(m) or type(m) in self.leaf_types or super().is_leaf_module(m, qualname)


def _pairs_in_graph(graph: torch.fx.Graph, modules: dict[str, nn.Module]) -> list[tuple[str, str]]:
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    pairs = []
    for conv_name, conv_calls in calls.items():
        if not _is_foldable_conv(modules.get(conv_name)):
            continue
        bn_names = set()
        for node in conv_calls:
            users = list(node.users)
            ok = (
                len(users) == 1
                and users[0].op == "call_module"
                and _is_bn(modules.get(users[0].target))
                and users[0].args == (node,)
                and not users[0].kwargs
            )
            bn_names.add(users[0].target if ok else None)
        if len(bn_names) != 1 or None in bn_names:
            continue
        (bn_name,) = bn_names
        # The BatchNorm must read this conv's output at every one of its calls.
        if all(n.args and n.args[0] in conv_calls for n in calls[bn_name]):
            pairs.append((conv_name, bn_name))
    return pairs


def _sequential_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """Adjacent (conv, BatchNorm) children of a plain nn.Sequential: the conv's output goes to the BatchNorm only."""
    if type(module) is not nn.Sequential:
        return []
    children = list(module.named_children())
    return [(a, b) for (a, conv), (b, bn) in zip(children, children[1:]) if _is_foldable_conv(conv) and _is_bn(bn)]


def _takes_one_input(module: nn.Module) -> bool:
    """Whether module.forward takes a single argument: then a trace of the module on its own follows the path its
    caller takes (a forward with options might be called with other values than the trace's defaults)."""
    try:
        return len(inspect.signature(module.forward).parameters) == 1
    except (TypeError, ValueError):
        return False


def _find_pairs(module: nn.Module, tracer_args: tuple, untraced: list[str], prefix: str = "") -> list[tuple[str, str]]:
    """The foldable (conv, BatchNorm) pairs inside `module`, with qualified names; the modules that could not be
    traced are appended to `untraced` as (name: why)."""
    modules = dict(module.named_modules())
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):  # containers without a forward of their own
        pairs, inner = [], list(module.named_children())
    elif prefix and not _takes_one_input(module):
        untraced.append(f"{prefix.rstrip('.')}: its forward takes options")
        pairs, inner = [], list(module.named_children())
    else:
        try:
            graph = _LeafTracer(*tracer_args).trace(module)
        except Exception as error:  # data-dependent control flow and the like: search the children one by one
            untraced.append(f"{prefix.rstrip('.') or type(module).__name__}: {type(error).__name__}")
            pairs, inner = _sequential_pairs(module), list(module.named_children())
        else:
            pairs = _pairs_in_graph(graph, modules)
            # leaves of the trace (timm's untraceable modules, mostly) are searched on their own
            inner = [(name, modules[name]) for name in sorted({n.target for n in graph.nodes if n.op == "call_module"})]
    pairs = [(prefix + conv, prefix + bn) for conv, bn in pairs]
    inner = [(name, child) for name, child in inner if not _is_bn(child) and any(_is_bn(m) for m in child.modules())]
    for name, child in inner:
        pairs += _find_pairs(child, tracer_args, untraced, f"{prefix}{name}.")
    return pairs


def _set_submodule(model: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, child = qualname.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def _fold_pair(model: nn.Module, conv_name: str, bn_name: str) -> bool:
    conv = model.get_submodule(conv_name)
    bn = model.get_submodule(bn_name)
    if bn.num_features != conv.out_channels or bn.running_mean is None:
        return False
    weight, bias = fold_bn(conv.weight, conv.bias, bn, _WHERE)
    old = conv.weight
    conv.weight = nn.Parameter(in_layout_of(weight.detach(), old), requires_grad=old.requires_grad)
    conv.bias = nn.Parameter(bias.detach())
    if type(bn).__name__ == "BatchNormAct2d":
        replacement = nn.Sequential(bn.drop, bn.act)
    else:
        replacement = nn.Identity()
    _set_submodule(model, bn_name, replacement.train(bn.training))
    return True


def reparameterize(
    model: nn.Module, inplace: bool = False, example_input=None
) -> tuple[nn.Module, ReparamReport]:
    """Re-parameterizes `model` for inference: vitops and timm re-parameterizable blocks become single convs and
    every Conv -> BatchNorm pair is folded into the conv (see the module docstring for how pairs are found).
    In eval mode the result computes the same function, up to rounding.

    Args:
        model: a model in eval mode (`model.eval()`); folding uses the BatchNorms' running statistics, which only
            eval mode uses, so a module in training mode is refused.
        inplace: change `model` itself; by default a deep copy is changed and `model` is left as it was.
        example_input: optional input (or tuple of inputs) used to count FLOPs before and after, and to
            measure how much the outputs changed (report.max_rel_error).

    Returns:
        (model, report): the re-parameterized model and a ReparamReport (str() gives a summary): blocks
        re-parameterized, Conv -> BatchNorm pairs folded, convs, BatchNorms and parameters before and after, and
        FLOPs before and after and the largest output change when `example_input` is given.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_WHERE}: model must be an nn.Module, got {type(model).__name__}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise RuntimeError(
            f"{_WHERE}: the model is in training mode ({len(training)} modules, first {training[0]!r}). Call "
            "model.eval() first: folding uses the BatchNorm running statistics, which only eval mode uses, so "
            "a training-mode model would compute something else afterwards."
        )
    if not inplace:
        model = copy.deepcopy(model)
    report = ReparamReport()
    report.convs_before, report.bns_before, report.params_before = _count(model)
    if example_input is not None:
        report.flops_before, output_before = _run_counting(model, example_input)

    _reparameterize_blocks(model, report.blocks)

    untraced: list[str] = []
    pairs = _find_pairs(model, _timm_fx_lists(), untraced)
    if untraced:
        report.pair_search = f"fx, except inside modules it could not trace ({'; '.join(untraced)})"
    report.conv_bn_pairs = sum(_fold_pair(model, conv_name, bn_name) for conv_name, bn_name in pairs)
    model.eval()  # it was all in eval mode; modules the blocks created may not be
    report.convs_after, report.bns_after, report.params_after = _count(model)
    if example_input is not None:
        report.flops_after, output_after = _run_counting(model, example_input)
        report.max_rel_error = _relative_change(output_before, output_after)
    return model, report
