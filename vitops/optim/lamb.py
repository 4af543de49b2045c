"""LAMB with timm's numerics, on fused multi-tensor kernels."""

from __future__ import annotations

import torch
import torch.distributed as dist

from vitops.optim import reference
from vitops.optim._base import (
    FusedOptimizer,
    check_nonnegative,
    is_count,
    on_each_device,
    summed_over_shards,
    zero_process_group,
)


class Lamb(FusedOptimizer):
    """LAMB (https://arxiv.org/abs/1904.00962) in the NVLAMB form of timm.optim.Lamb: same arguments, defaults,
    math, `group['step']` and state_dict, on fused kernels (multi-tensor CUDA, Triton, parallel vectorized C++).

    Per step: grads are divided by max(1, ||all grads|| / max_grad_norm), the global norm over every param group
    (from the constructor's max_grad_norm, as timm); m = lerp(m, g, 1 - beta1) (or beta1 m + g without
    grad_averaging); v = beta2 v + (1 - beta2) g^2; u = m_hat / (sqrt(v_hat) + eps); weight decay is added to u
    (or applied to p first with decoupled_decay); with weight decay (or always_adapt) u is scaled by the trust
    ratio ||p|| / ||u|| (1 if either is 0, capped at 1 with trust_clip); p -= lr u.

    Moment buffers are float32 for float16/bfloat16 params (timm keeps them in the param dtype), and the
    update is computed in float32. `caution` runs the reference path. `foreach` is accepted for timm
    compatibility and ignored; `maximize` is not taken (a TypeError, as timm).

    Bad gradients: as timm, a NaN or inf in any grad makes the global clipping coefficient NaN or inf, and with
    it every param's update: one NaN in one grad turns every param with a grad into NaN; an inf grad element
    becomes NaN in its param and leaves the other params' grads divided by inf (0: their moments decay). Without
    clipping (max_grad_norm=None) only the params with non-finite grads go NaN. A zero grad or a zero param is
    fine (trust ratio 1 where either norm is 0).

    skip_nonfinite=True (vitops only; apex's no-op flag): a step whose grads' sum of squares over every param
    group is not finite (some grad element is NaN or +-inf, or the global grad norm is past float32's range,
    about 1.8e19) leaves every param and moment as it was, decided on the device with no host sync. It is
    counted in each group's `group['skipped_steps']` (a float32 0-d tensor on the params' device, created by the
    first step; it is in state_dict). `group['step']` counts skipped steps too, as apex's: it is a host value
    that sets the bias corrections, and keeping it exact would wait for the device every step; the steps taken
    are step - skipped_steps. Under FSDP2 or a ZeroRedundancyOptimizer every rank skips the same steps (the sum
    is over all ranks). With skip_nonfinite False (the default) the state_dict is timm's.

    A param that changes dtype between steps (model.half(), .double()) keeps going, its moments float32 (float64
    for float64 params; timm's Lamb fails on the mixed dtypes); one moved to another device raises a ValueError
    (timm fails on the first op mixing devices): load the state_dict again to move the state with it.

    Distributed: under DDP every rank steps whole params with the same grads. Params sharded by FSDP2 (DTensors)
    are stepped on their local shards, the norms summed over the ranks holding the pieces (two small all_reduces
    per step: the global grad norm, then the per-param norms). `partition_group` is for optimizers that each get a
    part of the params, as ZeroRedundancyOptimizer's: the global grad norm is summed over its ranks. It is found
    on its own when a ZeroRedundancyOptimizer constructs this optimizer.
    """

    _name = "Lamb"
    _group_options = ("lr", "bias_correction", "betas", "eps", "weight_decay", "grad_averaging", "max_grad_norm",
                      "trust_clip", "always_adapt")  # fmt: skip

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        grad_averaging: bool = True,
        max_grad_norm: float | None = 1.0,
        trust_clip: bool = False,
        always_adapt: bool = False,
        caution: bool = False,
        decoupled_decay: bool = False,
        corrected_weight_decay: bool = False,
        foreach: bool | None = None,
        skip_nonfinite: bool = False,
        partition_group: dist.ProcessGroup | None = None,
    ):
        check_nonnegative("Lamb", "lr", lr)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"vitops.optim.Lamb: max_grad_norm must be > 0 or None, got {max_grad_norm}")
        if corrected_weight_decay and not float(lr) > 0:
            raise ValueError(f"vitops.optim.Lamb: corrected_weight_decay needs the peak lr (> 0), got {lr}")
        defaults = {
            "lr": lr,
            "bias_correction": bias_correction,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "grad_averaging": grad_averaging,
            "max_grad_norm": max_grad_norm,
            "trust_clip": trust_clip,
            "always_adapt": always_adapt,
            "caution": caution,
            "decoupled_decay": decoupled_decay,
            "corrected_weight_decay": corrected_weight_decay,
            "max_lr_snapshot": float(lr),
            "foreach": foreach,
            "skip_nonfinite": bool(skip_nonfinite),
        }
        super().__init__(params, defaults)
        # Not a default: a process group is not state (state_dict, checkpoints).
        self.partition_group = partition_group if partition_group is not None else zero_process_group()

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("partition_group", None)
        self.defaults.setdefault("max_lr_snapshot", float(self.defaults["lr"]))
        for group in self.param_groups:
            group.setdefault("caution", False)
            group.setdefault("decoupled_decay", False)
            group.setdefault("corrected_weight_decay", False)
            group.setdefault("max_lr_snapshot", self.defaults["max_lr_snapshot"])
            group.setdefault("foreach", None)
            if "step" in group and not torch.is_tensor(group["step"]):
                group["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)

    def _check_loaded_group(self, group: dict) -> None:
        super()._check_loaded_group(group)
        step = group.get("step", 0)
        if not is_count(step):
            raise ValueError(f"vitops.optim.Lamb.load_state_dict: a param group's step must be a count (a number or "
                             f"a one-element tensor >= 0), got {step!r}")  # fmt: skip

    def _step(self) -> None:
        work = []  # (entries, hyper, adapt, trust_clip, caution) per param group with grads
        for group, _, entries, caution in self._groups_with_grads():
            step = (group["step"] + 1).item() if "step" in group else 1.0  # float32, as the count kept below
            beta1, beta2 = group["betas"]
            beta3 = 1 - beta1 if group["grad_averaging"] else 1.0
            if group["bias_correction"]:
                bc1, bc2 = 1 - beta1**step, 1 - beta2**step
            else:
                bc1, bc2 = 1.0, 1.0
            lr = float(group["lr"])
            weight_decay = group["weight_decay"]
            decoupled = bool(group.get("decoupled_decay", False))
            decay_scale = lr
            if decoupled and group.get("corrected_weight_decay", False):
                decay_scale = lr**2 / group["max_lr_snapshot"]
            hyper = (lr, beta1, beta2, beta3, bc1, bc2, group["eps"], weight_decay, decay_scale, decoupled)
            work.append((entries, hyper, weight_decay != 0 or bool(group["always_adapt"]),
                         bool(group["trust_clip"]), caution))  # fmt: skip
        # Counted once every param's state is known to fit; groups without grads count the step too, as timm's.
        for group in self.param_groups:
            if "step" not in group:
                group["step"] = torch.tensor(0.0, dtype=torch.float32)
            group["step"].add_(1)

        entries = [e for w in work for e in w[0]]
        clipping = self.defaults["max_grad_norm"] is not None
        # One sum for both: the clipping coefficient's, and skip_nonfinite's check (non-finite iff a grad is, or
        # the norm overflows)
        grad_sq_sum = self._grad_sq_sum(entries) if clipping or self.defaults["skip_nonfinite"] else None
        max_grad_norm = self.defaults["max_grad_norm"] or 1.0
        clip_on = on_each_device(grad_sq_sum if clipping else None)
        skip_on = on_each_device(self._found_inf(grad_sq_sum))
        adapted, adapted_sums = [], []  # what lamb_apply finishes: (batch, hyper, trust_clip, caution_grads), sums
        for entries, hyper, adapt, trust_clip, caution in work:
            for batch in self._batches(entries, caution):
                params, grads, exp_avgs, exp_avg_sqs = batch.lists()
                clip = clip_on(params[0].device)
                options = {"caution": True} if caution else {}
                sums = batch.run("lamb_moments", params, grads, exp_avgs, exp_avg_sqs, clip, max_grad_norm, *hyper,
                                 adapt, skip_on(params[0].device), **options)  # fmt: skip
                caution_grads = None
                if caution:  # lamb_apply's reference recomputes the cautioned update from the clipped grads
                    coef = reference.lamb_clip_coef(clip, max_grad_norm)
                    caution_grads = [g.float() / coef if coef is not None else g.float() for g in grads]
                if adapt:
                    adapted.append((batch, hyper, trust_clip, caution_grads))
                    adapted_sums.append(sums)
        adapted_sums = summed_over_shards([a[0] for a in adapted], adapted_sums)  # trust ratios: whole tensors' norms
        for (batch, hyper, trust_clip, caution_grads), sums in zip(adapted, adapted_sums):
            params, _, exp_avgs, exp_avg_sqs = batch.lists()
            options = {"caution_grads": caution_grads} if caution_grads is not None else {}
            device = params[0].device
            batch.run("lamb_apply", params, exp_avgs, exp_avg_sqs, sums.to(device), *hyper, trust_clip,
                      skip_on(device), **options)  # fmt: skip
