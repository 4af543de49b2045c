"""What vitops' fused optimizers share: argument checks, float32 moment buffers, the params of a step as the kernels
take them (local shards of sharded params), the choice of backend, the grads' sum of squares over every rank
(LAMB's clipping, skip_nonfinite) and the checks of a state_dict before it is loaded."""

from __future__ import annotations

import functools
import numbers
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from vitops.optim import _kernels, _sharding, reference

try:
    from torch.distributed.optim import ZeroRedundancyOptimizer
except ImportError:  # torch built without distributed support
    ZeroRedundancyOptimizer = ()

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
LOOKAHEAD_KEY = "lookahead_slow_buff"  # Lookahead's slow weights, kept in the base optimizer's state


def check_nonnegative(cls: str, name: str, value) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"vitops.optim.{cls}: {name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = float(value)
    if not value >= 0.0:  # also rejects nan
        raise ValueError(f"vitops.optim.{cls}: {name} must be >= 0, got {value}")


def check_betas(cls: str, betas) -> None:
    if len(betas) != 2:
        raise ValueError(f"vitops.optim.{cls}: betas must be a pair (beta1, beta2), got {betas}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"vitops.optim.{cls}: betas[{i}] must be in [0, 1), got {beta}")


def check_state_dict(
    optimizer: torch.optim.Optimizer,
    state_dict,
    who: str,
    own_keys: tuple[str, ...] | None = None,
    tensor_keys: Iterable[str] = (),
    check_value: Callable[[str, str, object], None] | None = None,
    group_options: Iterable[str] = (),
    check_group: Callable[[dict], None] | None = None,
) -> None:
    """Raises a ValueError (TypeError for a value of the wrong type) naming what of `state_dict` does not fit
    `optimizer`, before anything is loaded. Every param's state must be all or none of `own_keys` (the per-param
    state the optimizer keeps) and nothing else but Lookahead's slow weights (any keys with `own_keys` None); the
    values of `tensor_keys` must be real floating-point tensors of the param's shape, the others pass `check_value`
    (what, key, value); every group must have `group_options` and pass `check_group`."""
    where = f"vitops.optim.{who}.load_state_dict"
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        got = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise ValueError(f"{where}: a state_dict has 'state' and 'param_groups', got {got}")
    saved_groups, groups = state_dict["param_groups"], optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(f"{where}: the state_dict has {len(saved_groups)} param groups, the optimizer {len(groups)}")
    params = {}  # the state_dict's param ids -> (the optimizer's param, its index over all groups)
    for g, (saved, group) in enumerate(zip(saved_groups, groups)):
        if not isinstance(saved, Mapping) or "params" not in saved:
            raise ValueError(f"{where}: param_groups[{g}] must be a dict with 'params'")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"{where}: param_groups[{g}] has {len(saved['params'])} params in the state_dict, "
                             f"{len(group['params'])} in the optimizer")  # fmt: skip
        missing = [key for key in group_options if key not in saved]
        if missing:
            raise ValueError(f"{where}: param_groups[{g}] lacks {', '.join(missing)}: a state_dict of another "
                             "optimizer?")  # fmt: skip
        if check_group is not None:
            check_group(saved)
        for saved_id, p in zip(saved["params"], group["params"]):
            params[saved_id] = (p, len(params))
    tensor_keys = set(tensor_keys)
    for saved_id, state in state_dict["state"].items():
        if saved_id not in params:
            raise ValueError(f"{where}: the state_dict has state for param {saved_id!r}, which no param group has")
        p, index = params[saved_id]
        what = f"the state of param {index} (shape {tuple(p.shape)})"
        if not isinstance(state, Mapping):
            raise TypeError(f"{where}: {what} must be a dict, got {type(state).__name__}")
        if own_keys is not None:
            unknown = sorted(str(key) for key in state if key not in own_keys and key != LOOKAHEAD_KEY)
            if unknown:
                raise ValueError(f"{where}: {what} has {', '.join(unknown)}, which {who} does not keep: a "
                                 "state_dict of another optimizer?")  # fmt: skip
            present = [key for key in own_keys if key in state]
            if present and len(present) != len(own_keys):
                missing = [key for key in own_keys if key not in state]
                raise ValueError(f"{where}: {what} lacks {', '.join(missing)}")
        for key, value in state.items():
            if key in tensor_keys:
                if not isinstance(value, Tensor) or not value.is_floating_point():
                    got = value.dtype if isinstance(value, Tensor) else type(value).__name__
                    raise TypeError(f"{where}: {what}: {key} must be a floating-point tensor, got {got}")
                if value.shape != p.shape:
                    raise ValueError(f"{where}: {what}: {key} has shape {tuple(value.shape)}")
            elif check_value is not None:
                check_value(what, key, value)


class Entry(NamedTuple):
    """A param of a step as the kernels see it: this rank's pieces of the param, its grad and moments, the process
    groups its partial sums add up over (none when whole), and its numel over all ranks."""

    param: Tensor
    grad: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    shard_groups: tuple
    full_numel: int


class Batch(NamedTuple):
    """Entries one op call takes (one device), their positions in the step's list, and whether the ops take them
    (kernel) or the reference runs them."""

    kernel: bool
    entries: list
    indices: list

    def lists(self) -> tuple[list, list, list, list]:
        return tuple([getattr(e, f) for e in self.entries] for f in ("param", "grad", "exp_avg", "exp_avg_sq"))

    def run(self, op: str, *args, **reference_options):
        """torch.ops.vitops.<op> (its backend chosen inside the op), or the reference for what the ops don't take
        (with `reference_options`, caution)."""
        if self.kernel:
            return getattr(torch.ops.vitops, op)(*args)
        return getattr(reference, op)(*args, **reference_options)


class FusedOptimizer(torch.optim.Optimizer):
    """torch.optim.Optimizer with the checks and state layout of vitops' fused optimizers.

    skip_nonfinite (in defaults only, not in the param groups, whose keys stay timm's: it is the whole step's): a
    step whose grads' sum of squares is not finite is skipped on the device, by the ops' found_inf
    (vitops/ops/schemas.def), and counted in every group's 'skipped_steps'."""

    _name = "Optimizer"
    _whole_rows = False  # whether the kernels need each param's dim-0 rows whole on a rank (AdamP)
    _state_keys: tuple[str, ...] = MOMENT_KEYS  # what each param's state holds once stepped
    _group_options: tuple[str, ...] = ()  # what every param group holds (timm's options)

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.defaults.setdefault("skip_nonfinite", False)  # pickled before it existed

    def add_param_group(self, param_group):
        skip_nonfinite = self.defaults.get("skip_nonfinite", False)
        if isinstance(param_group, dict) and param_group.get("skip_nonfinite", skip_nonfinite) != skip_nonfinite:
            raise ValueError(f"vitops.optim.{self._name}: skip_nonfinite applies to the whole step: set it in the "
                             "constructor, not per param group")  # fmt: skip
        super().add_param_group(param_group)
        self.param_groups[-1].pop("skip_nonfinite", None)
        self._check_group(self.param_groups[-1])

    def _check_group(self, group) -> None:
        for p in group["params"]:
            if p.is_sparse:
                raise ValueError(f"vitops.optim.{self._name}: sparse params are not supported")
            if p.is_complex():
                raise ValueError(
                    f"vitops.optim.{self._name}: complex params are not supported (got {p.dtype}); optimize "
                    "torch.view_as_real(param) instead"
                )
            if not p.is_floating_point():
                raise ValueError(f"vitops.optim.{self._name}: params must be floating point, got {p.dtype}")
            _sharding.shard_groups(p, self._name, self._whole_rows)  # rejects shardings the kernels can't take
        self._check_hyperparameters(group)

    def _check_hyperparameters(self, group) -> None:
        check_nonnegative(self._name, "lr", group["lr"])
        check_nonnegative(self._name, "eps", group["eps"])
        check_nonnegative(self._name, "weight_decay", group["weight_decay"])
        check_betas(self._name, group["betas"])

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every param group; `closure`, if given, is called with grad enabled first and its loss
        returned (torch's Optimizer.step contract)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step()
        return loss

    def _step(self) -> None:
        """The step itself (each optimizer's)."""
        raise NotImplementedError

    def _groups_with_grads(self) -> list[tuple[dict, list[Tensor], list[Entry], bool]]:
        """(group, its params with grads, their entries, caution) per param group with grads. Every param's state
        is made and checked here, before a step counts or changes anything (an error leaves the optimizer as it
        was)."""
        work = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            entries = self._entries(params)
            caution = bool(group.get("caution", False))
            if caution:
                self._no_caution_when_sharded(entries)
            work.append((group, params, entries, caution))
        return work

    def _grad_of(self, p: Tensor) -> Tensor:
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError(
                f"vitops.optim.{self._name} does not support sparse gradients; use torch.optim.SparseAdam"
            )
        return grad

    def _moments(self, p: Tensor) -> tuple[Tensor, Tensor]:
        state = self.state[p]
        # float32 whatever the param dtype (float64 params keep float64); DTensors for DTensor params
        dtype = moment_dtype(p)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        exp_avg = state["exp_avg"]
        if exp_avg.device != p.device or exp_avg.dtype != dtype:
            self._refit_moments(p, dtype)
        return state["exp_avg"], state["exp_avg_sq"]

    def _refit_moments(self, p: Tensor, dtype: torch.dtype) -> None:
        """p changed dtype since its last step (model.half(), .double()): its moments take the one they would have
        been made in. p moved to another device: a ValueError (timm fails there too, on the first op mixing
        devices)."""
        state = self.state[p]
        for key in MOMENT_KEYS:
            moment = state[key]
            if moment.device != p.device:
                index = next(i for i, q in enumerate(q for g in self.param_groups for q in g["params"]) if q is p)
                raise ValueError(
                    f"vitops.optim.{self._name}: param {index} (shape {tuple(p.shape)}) is on {p.device} but its "
                    f"{key} is on {moment.device}: after moving the model, move the optimizer's state too, e.g. "
                    "optimizer.load_state_dict(optimizer.state_dict())"
                )
        for key in MOMENT_KEYS:
            state[key] = state[key].to(dtype)

    def _layout(self, p: Tensor) -> tuple[tuple, int]:
        """p's shard groups and numel over all ranks, worked out once: a param's sharding does not change, and
        asking a DTensor costs more than the step's arithmetic on small params."""
        layouts = self.__dict__.setdefault("_layouts", {})
        if p not in layouts:
            layouts[p] = (_sharding.shard_groups(p, self._name, self._whole_rows), p.numel())
        return layouts[p]

    def _entries(self, params: list[Tensor]) -> list[Entry]:
        """The step's view of params that have grads (their moments are created here)."""
        entries = []
        local = _sharding.local
        for p in params:
            exp_avg, exp_avg_sq = self._moments(p)
            groups, full_numel = self._layout(p)
            entries.append(Entry(local(p), local(self._grad_of(p)), local(exp_avg), local(exp_avg_sq), groups,
                                 full_numel))  # fmt: skip
        return entries

    @staticmethod
    def _batches(entries: list[Entry], caution: bool = False) -> list[Batch]:
        """The entries by op call: the ops take contiguous float32/16/bf16 params on one device; anything else, and
        caution, runs on the reference."""
        by_key = defaultdict(list)
        for i, e in enumerate(entries):
            by_key[(e.param.device, not caution and _kernels.kernel_ok(e.param, e.grad))].append(i)
        return [Batch(kernel, [entries[i] for i in indices], indices) for (_, kernel), indices in by_key.items()]

    def _grad_sq_sum(self, entries: list[Entry]) -> Tensor | None:
        """The sum of squares of every grad of the step (float32, 0-d), over whole tensors and, with a partition
        group, over every rank's params; None without grads anywhere. The same on every rank."""
        partition_group = getattr(self, "partition_group", None)
        if not entries and partition_group is None:
            return None
        batches = self._batches(entries)
        per_param = summed_over_shards(batches, [b.run("lamb_grad_sq_sums", b.lists()[1])[:, None] for b in batches])
        if per_param:
            device = per_param[0].device
            total = torch.stack([s.sum().to(device) for s in per_param]).sum()
        else:  # this rank holds none of the params with grads
            total = torch.zeros((), device=_partition_device(partition_group))
        if partition_group is not None:
            dist.all_reduce(total, group=partition_group)
        return total

    def _found_inf(self, grad_sq_sum: Tensor | None) -> Tensor | None:
        """skip_nonfinite's flag, on the device: 1.0 (float32, 0-d) if the grads' sum of squares is not finite,
        else 0.0, added to every group's skipped_steps; None when steps are not skipped."""
        if not self.defaults["skip_nonfinite"] or grad_sq_sum is None:
            return None
        found_inf = (~torch.isfinite(grad_sq_sum)).float()
        for group in self.param_groups:
            count = group.get("skipped_steps", 0)
            if not isinstance(count, Tensor) or count.device != found_inf.device or count.dtype != torch.float32:
                group["skipped_steps"] = count = torch.as_tensor(count, dtype=torch.float32).to(found_inf.device)
            count.add_(found_inf)
        return found_inf

    def _check_loaded_group(self, group: dict) -> None:
        """A param group of a state_dict being loaded: the hyperparameters' checks, and skipped_steps."""
        self._check_hyperparameters(group)
        count = group.get("skipped_steps", 0)
        if not is_count(count):
            raise ValueError(f"vitops.optim.{self._name}: skipped_steps must be a count (a number or a one-element "
                             f"tensor >= 0), got {count!r}")  # fmt: skip

    def _check_loaded_value(self, what: str, key: str, value) -> None:
        """A per-param state value that is not a tensor of the param's shape (AdamP's step)."""

    def _no_caution_when_sharded(self, entries: list[Entry]) -> None:
        if any(e.shard_groups for e in entries):
            raise NotImplementedError(
                f"vitops.optim.{self._name}: caution is not supported with sharded params (its mask is scaled by "
                "a mean over the whole tensor, which the stages do not sum over ranks)"
            )

    def load_state_dict(self, state_dict):
        """torch's load_state_dict, after checks that leave the optimizer as it was when the state_dict does not fit
        it: every param's state holds this optimizer's keys with the param's shape, every group its options."""
        check_state_dict(self, state_dict, self._name, own_keys=self._state_keys,
                         tensor_keys=(*MOMENT_KEYS, LOOKAHEAD_KEY), check_value=self._check_loaded_value,
                         group_options=self._group_options, check_group=self._check_loaded_group)  # fmt: skip
        # torch casts floating state to the param's dtype; vitops keeps moments in float32 (timm's checkpoints of
        # float16/bfloat16 params hold them in the param dtype: they are upcast here).
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            for key in MOMENT_KEYS:
                value = state.get(key)
                if isinstance(value, Tensor):
                    want = moment_dtype(p)
                    if value.dtype != want or not value.is_contiguous():
                        state[key] = value.to(want).contiguous()


def moment_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def is_count(value) -> bool:
    if isinstance(value, Tensor):
        return value.numel() == 1 and not value.is_complex() and bool(value >= 0)
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value >= 0


def gathered(tensors: list[Tensor]) -> Tensor:
    """The tensors concatenated on the first one's device."""
    device = tensors[0].device
    return torch.cat([t.to(device) for t in tensors])


def summed_over_shards(batches: list[Batch], sums: list[Tensor]) -> list[Tensor]:
    """Each batch's per-param sums (a row per entry) over whole tensors: the rows of sharded params summed over the
    ranks holding their pieces, all batches' at once; `sums` itself when no param is sharded."""
    groups = [e.shard_groups for batch in batches for e in batch.entries]
    if not any(groups):
        return sums
    flat = gathered(sums)
    _sharding.sum_over_shards(flat, groups)
    return list(flat.split([len(batch.entries) for batch in batches]))


def on_each_device(t: Tensor | None) -> Callable[[torch.device], Tensor | None]:
    """t on a given device, copied there once per step (the step's params may span devices); None stays None."""
    return functools.lru_cache(maxsize=None)(lambda device: t.to(device) if t is not None else None)


def _partition_device(group) -> torch.device:
    """Where a rank holding no params puts its share of a collective: the GPU for NCCL."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def zero_process_group():
    """The process group of the ZeroRedundancyOptimizer constructing the calling optimizer (called from its
    __init__), if one is: it hands each rank a part of the params, so what is summed over every grad of a step
    (LAMB's global grad norm, skip_nonfinite's check) must be summed over its ranks."""
    frame = sys._getframe(2)  # the caller of the optimizer's __init__, then a few more for subclasses' __init__
    for _ in range(4):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if isinstance(owner, ZeroRedundancyOptimizer):
            return owner.process_group
        frame = frame.f_back
    return None
