"""DTensor (FSDP2) plumbing: kernels update the local shards; norm-based steps
(LARS, LAMB) sum their per-shard squared norms over the shard group."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
        return DTensor
    except Exception:  # torch built without distributed
        return None


_DTensor = _dtensor_type()


def is_dtensor(t: Any) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


def local_tensor(t):
    """The local shard of a DTensor (FSDP2 params, grads, states); t itself otherwise."""
    if _DTensor is not None and isinstance(t, _DTensor):
        return t._local_tensor
    return t


def shard_groups(t: Any) -> tuple:
    """The process groups over which a DTensor is sharded (one per sharded mesh
    dim); () for plain tensors and replicated DTensors."""
    if not is_dtensor(t):
        return ()
    from torch.distributed.tensor import Shard
    mesh = t.device_mesh
    return tuple(mesh.get_group(d) for d, pl in enumerate(t.placements) if isinstance(pl, Shard))


def reduce_rows_over_shards(sums: torch.Tensor, sources: Sequence[torch.Tensor]) -> torch.Tensor:
    """In place: row i of ``sums`` (sums of squares over the local shard of
    ``sources[i]``) becomes the sum over all shards of that tensor.

    Rows of plain or replicated tensors are left alone; rows sharded over the
    same process groups go through one all-reduce (the whole tensor when every
    row is, the common FSDP2 case: no copies). Stream-ordered on CUDA (no host
    sync); the collective adds in rank order, so every rank gets the same bits."""
    import torch.distributed as dist
    rows: Dict[tuple, List[int]] = {}
    for i, p in enumerate(sources):
        key = shard_groups(p)
        if key:
            rows.setdefault(key, []).append(i)
    for groups, idx in rows.items():
        whole = len(idx) == len(sources) and sums.is_contiguous()
        part = sums
        if not whole:
            at = torch.tensor(idx, dtype=torch.long).to(sums.device, non_blocking=True)
            part = sums.index_select(0, at)
        for group in groups:
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
        if not whole:
            sums.index_copy_(0, at, part)
    return sums
