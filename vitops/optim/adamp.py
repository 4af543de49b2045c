"""AdamP with timm's numerics, on fused multi-tensor kernels."""

from __future__ import annotations

import numbers

from vitops.optim._base import (
    MOMENT_KEYS,
    FusedOptimizer,
    check_nonnegative,
    on_each_device,
    summed_over_shards,
    zero_process_group,
)


class AdamP(FusedOptimizer):
    """AdamP (https://arxiv.org/abs/2006.08217) as timm.optim.AdamP: same arguments, defaults, math and
    state_dict (`state['step']` a Python int per param), on fused kernels.

    For params of 2 or more dims, the Adam direction loses its component along p when the gradient is nearly
    orthogonal to p: per output channel if every channel's |cos(g, p)| < delta / sqrt(channel size), else for
    the whole layer if |cos| < delta / sqrt(numel); weight decay is then scaled by wd_ratio. The cosines and
    projections are sums computed inside the fused kernels. Moment buffers are float32 for float16/bfloat16
    params. `caution` runs the reference path. `maximize` and `foreach` are not taken (a TypeError, as timm).

    Bad gradients: as timm, a NaN or inf grad element turns that element's moments NaN or inf and its param NaN,
    and leaves its param unprojected (a NaN cosine fails timm's tests); the other elements and params are untouched
    by it. A zero grad or a zero param is fine.

    skip_nonfinite=True (vitops only; apex's no-op flag): a step in which the sum of squares of every grad of every
    param group is not finite (some grad element is NaN or +-inf, or the global grad norm is past float32's
    range, about 1.8e19) leaves every param and moment as it was, decided on the device with no host sync; the
    check reads every grad once more. It is counted in each group's `group['skipped_steps']` (a float32 0-d
    tensor on the params' device, created by the first step; it is in state_dict). `state['step']` counts skipped
    steps too, as apex's: it is a host value that sets the bias corrections, and keeping it exact would wait for
    the device every step. Under FSDP2 or a ZeroRedundancyOptimizer every rank skips the same steps. With
    skip_nonfinite False (the default) the state_dict is timm's.

    A param that changes dtype between steps (model.half(), .double()) keeps going, as in timm, its moments
    float32 (float64 for float64 params); one moved to another device raises a ValueError (timm fails on the first
    op mixing devices): load the state_dict again to move the state with it.

    Distributed: under DDP and ZeroRedundancyOptimizer every param is whole on the ranks that step it. Params
    sharded by FSDP2 on dim 0 (DTensors) are stepped on their local shards: a channel row is whole on one rank, the
    layer-wise sums and the count of rows failing the channel-wise test are summed over the ranks holding the
    pieces (one small all_reduce per step).
    """

    _name = "AdamP"
    _whole_rows = True
    _state_keys = ("step", *MOMENT_KEYS)
    _group_options = ("lr", "betas", "eps", "weight_decay", "delta", "wd_ratio", "nesterov")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        nesterov: bool = False,
        caution: bool = False,
        skip_nonfinite: bool = False,
    ):
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "delta": delta,
            "wd_ratio": wd_ratio,
            "nesterov": nesterov,
            "caution": caution,
            "skip_nonfinite": bool(skip_nonfinite),
        }
        super().__init__(params, defaults)
        # skip_nonfinite's check sums over every rank's params under a ZeroRedundancyOptimizer (not state)
        self.partition_group = zero_process_group()

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("partition_group", None)

    def _check_hyperparameters(self, group) -> None:
        super()._check_hyperparameters(group)
        check_nonnegative("AdamP", "delta", group["delta"])
        check_nonnegative("AdamP", "wd_ratio", group["wd_ratio"])

    def _check_loaded_value(self, what: str, key: str, value) -> None:
        if key == "step" and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0):
            raise TypeError(f"vitops.optim.AdamP.load_state_dict: {what}: step must be an int >= 0 (timm's AdamP "
                            f"counts steps per param in a Python int), got {value!r}")  # fmt: skip

    def _step(self) -> None:
        work = self._groups_with_grads()
        # Counted once every param's state is known to fit.
        for _, params, _, _ in work:
            for p in params:
                self.state[p]["step"] = self.state[p].get("step", 0) + 1
        found_inf = None
        if self.defaults["skip_nonfinite"]:
            found_inf = self._found_inf(self._grad_sq_sum([e for _, _, entries, _ in work for e in entries]))
        skip_on = on_each_device(found_inf)
        staged, staged_sums = [], []  # what adamp_apply finishes: (batch, args, found_inf, options, row_coefs), sums
        for group, params, entries, caution in work:
            beta1, beta2 = group["betas"]
            steps = [self.state[p]["step"] for p in params]
            hyper = (float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"], group["delta"],
                     group["wd_ratio"], bool(group["nesterov"]))  # fmt: skip
            options = {"caution": True} if caution else {}
            for batch in self._batches(entries, caution):
                bias_corrections = ([1 - beta1 ** steps[i] for i in batch.indices],
                                    [1 - beta2 ** steps[i] for i in batch.indices])  # fmt: skip
                args = (*batch.lists(), *bias_corrections, *hyper)
                skip = skip_on(batch.entries[0].param.device)
                row_coefs, tensor_sums = batch.run("adamp_moments", *args, skip, **options)
                if any(e.param.ndim > 1 for e in batch.entries):
                    staged.append((batch, args, skip, options, row_coefs))
                    staged_sums.append(tensor_sums)
        staged_sums = summed_over_shards([s[0] for s in staged], staged_sums)  # projections: whole tensors' sums
        for (batch, args, skip, options, row_coefs), sums in zip(staged, staged_sums):
            batch.run("adamp_apply", *args[:4], row_coefs, sums.to(row_coefs.device),
                      [e.full_numel for e in batch.entries], *args[4:], skip, **options)  # fmt: skip
