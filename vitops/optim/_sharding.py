"""How vitops' optimizers step params that are sharded over ranks.

A param is whole on this rank (a plain tensor, also under DDP; a DTensor replicated on every mesh dim) or sharded
(a DTensor with Shard placements, as FSDP2's fully_shard makes them: Shard(0), uneven shards, possibly empty). The
kernels run on the local shards. What a step needs over a whole tensor (LAMB's norms, AdamP's cosines) comes out of
them as per-param partial sums; `sum_over_shards` adds those up over the ranks holding the pieces, one all_reduce
per process group for all the step's params at once. ZeroRedundancyOptimizer keeps params whole but spreads them
over ranks: only LAMB's global grad norm then needs a sum over ranks (lamb.py).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = None


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """This rank's piece of t (t itself unless it is a DTensor). The optimizers step without autograd, so this reads
    the DTensor's local tensor directly: to_local() is an autograd Function that makes a new view on every call
    (about 10 us, four calls per param and step, which added up to a fifth of a ViT-S step under FSDP2)."""
    return t._local_tensor if t is not None and is_dtensor(t) else t


def shard_groups(p: Tensor, optimizer: str, whole_rows: bool = False) -> tuple:
    """The process groups over whose ranks p's partial sums add up to the whole tensor's: one per mesh dim p is
    sharded on, none when p is whole on this rank. `whole_rows`: the optimizer needs p's dim-0 rows whole on a rank
    (AdamP's channel-wise view), so only Shard(0) is accepted."""
    if not is_dtensor(p):
        return ()
    groups = []
    for mesh_dim, placement in enumerate(p.placements):
        if placement.is_partial():
            raise NotImplementedError(
                f"vitops.optim.{optimizer}: a param with a Partial placement ({p.placements}) is not supported; "
                "redistribute it to Shard or Replicate first"
            )
        if placement.is_shard():
            if whole_rows and p.ndim > 1 and placement.dim != 0:
                raise NotImplementedError(
                    f"vitops.optim.{optimizer}: a param of {p.ndim} dims sharded on dim {placement.dim} "
                    f"({p.placements}) is not supported: its channel-wise projection needs whole rows of dim 0 on "
                    "each rank, as FSDP2's default Shard(0) gives"
                )
            groups.append(p.device_mesh.get_group(mesh_dim))
    return tuple(groups)


@functools.lru_cache(maxsize=64)
def _row_index(device: torch.device, rows: tuple) -> Tensor:
    return torch.tensor(rows, dtype=torch.int64, device=device)  # once per param layout


def sum_over_shards(sums: Tensor, groups: list) -> None:
    """In place: row i of `sums` (param i's partial sums on this rank) becomes the sum over every rank holding a
    piece of param i (groups[i], from shard_groups). One all_reduce per process group, of all its params' rows at
    once; every rank must call this with the same params."""
    rows_of_group: dict = {}
    for i, param_groups in enumerate(groups):
        for group in param_groups:
            rows_of_group.setdefault(group, []).append(i)
    for group, rows in rows_of_group.items():
        if len(rows) == sums.shape[0]:
            dist.all_reduce(sums, group=group)
        else:
            index = _row_index(sums.device, tuple(rows))
            part = sums.index_select(0, index)
            dist.all_reduce(part, group=group)
            sums.index_copy_(0, index, part)
