"""DTensor (FSDP2) plumbing: kernels update the local shards; norm-based steps
(LARS, LAMB) sum their per-shard squared norms over the shard group; Muon
gathers the rows of each sharded matrix (``row_shard``, ``all_gather_into``)."""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

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


def chunk_span(rows: int, world: int, rank: int) -> Tuple[int, int, int]:
    """(chunk, start, count): the rows ``rank`` of ``world`` holds when ``rows`` rows are
    split as ``torch.chunk`` splits them (DTensor's Shard and FSDP2's rule): every rank
    ``chunk = ceil(rows / world)`` rows from ``start = rank * chunk``, the last ranks
    fewer or none."""
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    return chunk, start, min(chunk, rows - start)


class RowShard(NamedTuple):
    """A DTensor sharded on dim 0 over one mesh dim (FSDP2's ``Shard(0)``; HSDP's
    ``(Replicate(), Shard(0))``): its process group, the group's size and this
    process's coordinate on that mesh dim (DTensor's shard index, its rank in the group)."""
    group: Any
    world: int
    rank: int

    def span(self, rows: int) -> Tuple[int, int, int]:
        """(chunk, start, count) of this rank's rows of a dim 0 of ``rows`` (chunk_span)."""
        return chunk_span(rows, self.world, self.rank)


def row_shard(t: Any) -> Optional[RowShard]:
    """How t is sharded on dim 0: None for plain tensors and replicated DTensors.
    Any other sharding (another dim, several sharded mesh dims, strided or partial
    placements) raises NotImplementedError."""
    if not is_dtensor(t):
        return None
    from torch.distributed.tensor import Replicate, Shard
    split = [(d, pl) for d, pl in enumerate(t.placements) if not isinstance(pl, Replicate)]
    if not split:
        return None
    d, pl = split[0]
    if len(split) > 1 or type(pl) is not Shard or pl.dim % t.dim() != 0:
        raise NotImplementedError(f"placements {tuple(t.placements)}: only replicated DTensors and DTensors "
                                  "sharded on dim 0 over one mesh dim (FSDP2's Shard(0)) are supported")
    mesh = t.device_mesh
    return RowShard(mesh.get_group(d), mesh.size(d), mesh.get_local_rank(d))


def all_gather_into(out: torch.Tensor, local: torch.Tensor, group: Any) -> None:
    """out <- the ``local`` of every rank of ``group``, concatenated in rank order: one
    collective, stream-ordered on CUDA (no host sync). A pure copy, so every rank
    gets the same bits."""
    import torch.distributed as dist
    dist.all_gather_into_tensor(out, local, group=group)
