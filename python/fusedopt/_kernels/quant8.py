"""8-bit blockwise optimizer states (``state_dtype=torch.int8``), the host side.

A quantized state is two tensors: ``codes``, int8 like its param (same shape,
device and memory layout; each byte one element's code), and the row of the
param's ``absmax`` tensor that holds the state's block scales: float32
``[k, blocks]``, k the number of quantized states of the optimizer (Adam: 2, 3
with amsgrad; SGD, LARS: 1), blocks = ceil(numel / BLOCK) over the param's
elements in memory order. An element's value is ``decode(code) * absmax``; the
codes are small floats relative to the block's absmax, csrc/ops/quant8.h
(signed states: sign + 3 exponent + 4 mantissa bits; non-negative states: 5
exponent + 3 mantissa bits; CODES_FORMAT, saved with the param groups). The kernels update them in place; this module
converts whole states for checkpoints (``quantize``, ``dequantize``) with the
same C++ code, on the host.

FSDP2 (DTensor params): the blocks are those of each rank's local shard (they
never cross a shard boundary), so a sharded param's 8-bit state is exactly
that of its shards stepped as separate tensors. The codes are a DTensor like
the param; ``absmax`` is a DTensor of global shape ``[shards, k * B]`` sharded
on dim 0 over the param's sharded mesh dim, B the blocks of the largest shard:
each rank's row holds its ``[k, blocks]`` scales packed at the front (the
kernels' layout), zeros after. torch.distributed.checkpoint saves and loads it
like any sharded tensor, for the same number of shards; to move an 8-bit FSDP2
checkpoint to another sharding, go through ``fusedopt.dequantized_state_dict``
(fp32 DTensors, which reshard).
"""
from __future__ import annotations

import functools
from typing import List, NamedTuple, Tuple

import torch

from .. import _C
from .._dtensor import is_dtensor, local_tensor
from .checks import is_flat_run, shape_str

BLOCK: int = _C.LAYOUT["quant_block"]

# The codes' format, saved as param-group key CODES_FORMAT_KEY of every 8-bit group in
# state_dict() (optim/state.py): a checkpoint names the code its bytes are in. A group
# saved without the key is in LEGACY_FORMAT, fusedopt's first: its signed codes had 4
# exponent and 3 mantissa bits; they are decoded with that table when loaded.
CODES_FORMAT_KEY = "int8_codes"
CODES_FORMAT = "signed e3m4, unsigned e5m3"
LEGACY_FORMAT = "signed e4m3, unsigned e5m3"


def num_blocks(numel: int) -> int:
    return (numel + BLOCK - 1) // BLOCK


def absmax_shape(p: torch.Tensor, states: int) -> Tuple[int, int]:
    return (states, num_blocks(p.numel()))


class ShardedAbsmax(NamedTuple):
    """How the absmax DTensor of a sharded param is laid out (module docstring)."""
    mesh: object
    placements: tuple
    shape: Tuple[int, int]  # global: [shards, states * blocks of the largest shard]


def sharded_absmax(p, states: int) -> ShardedAbsmax:
    """The absmax layout for DTensor param p: one Shard placement (FSDP2's
    Shard(0), or HSDP's replicate x shard mesh) is supported."""
    from torch.distributed.tensor import Replicate, Shard
    sharded = [(d, pl) for d, pl in enumerate(p.placements) if not isinstance(pl, Replicate)]
    if len(sharded) != 1 or not isinstance(sharded[0][1], Shard):
        raise NotImplementedError(f"8-bit state for a DTensor with placements {list(p.placements)}: one Shard "
                                  "placement (FSDP2, HSDP) is supported; use state_dtype=torch.bfloat16")
    mesh_dim, dim = sharded[0][0], sharded[0][1].dim
    shards = p.device_mesh.size(mesh_dim)
    size = p.shape[dim]
    # torch.chunk's split, as DTensor's Shard: the first shards get ceil(size / shards) slices
    largest = 0 if size == 0 else -(-size // shards) * (p.numel() // size)
    placements = tuple(Shard(0) if d == mesh_dim else Replicate() for d in range(p.device_mesh.ndim))
    return ShardedAbsmax(p.device_mesh, placements, (shards, states * num_blocks(largest)))


def new_absmax(p, states: int):
    """Zero block scales for p's ``states`` quantized states (a DTensor for a DTensor p)."""
    lp = local_tensor(p)
    if not is_dtensor(p):
        return torch.zeros(absmax_shape(lp, states), dtype=torch.float32, device=lp.device)
    from torch.distributed.tensor import DTensor
    spec = sharded_absmax(p, states)
    local = torch.zeros((1, spec.shape[1]), dtype=torch.float32, device=lp.device)
    return DTensor.from_local(local, spec.mesh, spec.placements, run_check=False, shape=torch.Size(spec.shape),
                              stride=(spec.shape[1], 1))


def pack_absmax(rows: List[torch.Tensor], p):
    """The absmax state of p from its local ``[blocks]`` rows, one per quantized state."""
    out = new_absmax(p, len(rows))
    stacked = torch.stack([r.reshape(-1).to(torch.float32) for r in rows])
    (local_absmax_rows(out, p) if is_dtensor(p) else out).copy_(stacked)
    return out


def local_absmax_rows(absmax, p, what: str = "absmax") -> torch.Tensor:
    """The ``[k, blocks]`` block scales of the local shard of a DTensor p (or of
    codes sharded like it) inside an absmax DTensor of the module docstring's
    layout, however many states k it holds (a view of its local row)."""
    spec = sharded_absmax(p, 1)
    per_state = spec.shape[1]
    ok = is_dtensor(absmax) and absmax.dim() == 2 and absmax.shape[0] == spec.shape[0] and \
        tuple(absmax.placements) == spec.placements and (per_state == 0 or absmax.shape[1] % per_state == 0)
    if not ok:
        got = f"a DTensor {list(absmax.shape)} {list(absmax.placements)}" if is_dtensor(absmax) else \
            type(absmax).__name__
        raise ValueError(f"{what} is {got}; the block scales of a sharded 8-bit state are a float32 DTensor of "
                         f"shape [{spec.shape[0]}, k * {per_state}] and placements {list(spec.placements)} "
                         "(fusedopt/_kernels/quant8.py)")
    k = absmax.shape[1] // per_state if per_state else 0
    n = num_blocks(local_tensor(p).numel())
    return local_tensor(absmax).reshape(-1)[:k * n].view(k, n)


def check_absmax(t, p, states: int, what: str) -> None:
    """The block scales of p's ``states`` quantized states: contiguous float32
    ``[states, blocks]`` on p's device; for a DTensor p the DTensor of the module
    docstring, whose local row is contiguous."""
    if is_dtensor(p):
        spec = sharded_absmax(p, states)
        ok = is_dtensor(t) and tuple(t.shape) == spec.shape and tuple(t.placements) == spec.placements
        if not ok:
            got = f"a DTensor {list(t.shape)} {list(t.placements)}" if is_dtensor(t) else type(t).__name__
            raise ValueError(f"{what} is {got}; the 8-bit state of a sharded param needs a float32 DTensor of shape "
                             f"{list(spec.shape)} and placements {list(spec.placements)} (fusedopt/_kernels/quant8.py)")
        if states * num_blocks(local_tensor(p).numel()) > spec.shape[1]:
            raise ValueError(f"the local shard of {what}'s param has {local_tensor(p).numel()} elements, more than "
                             f"the {spec.shape[1] // max(states, 1) * BLOCK} of torch.chunk's largest shard")
        t, p, want = local_tensor(t), local_tensor(p), (1, spec.shape[1])
    else:
        want = absmax_shape(p, states)
    if not isinstance(t, torch.Tensor) or t.layout is not torch.strided:
        raise TypeError(f"{what} is a {type(t).__name__}; expected a float32 tensor of shape {list(want)}")
    if t.dtype is not torch.float32 or t.device != p.device or tuple(t.shape) != want or not t.is_contiguous():
        raise ValueError(f"{what} is {shape_str(t)}; expected a contiguous float32 tensor of shape {list(want)} "
                         f"on {p.device} (the block absmax of {states} state(s) of {BLOCK}-element blocks)")


def _flat(t: torch.Tensor) -> torch.Tensor:
    """t's elements in memory order (t is dense: contiguous or channels_last)."""
    return t.as_strided((t.numel(),), (1,))


def quantize(values: torch.Tensor, like: torch.Tensor, signed: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(codes like ``like``, absmax [blocks]) of fp32 ``values`` (any device and
    layout, the shape of ``like``), computed on the host, returned on like's device."""
    host = torch.empty_like(like, dtype=torch.float32, device="cpu", memory_format=torch.preserve_format)
    host.copy_(values.detach())
    if not is_flat_run(host):
        host = host.contiguous()
    codes = torch.empty_like(host, dtype=torch.int8, memory_format=torch.preserve_format)
    absmax = torch.empty(num_blocks(host.numel()), dtype=torch.float32)
    _C.quantize8(_flat(host).data_ptr(), host.numel(), _flat(codes).data_ptr(), absmax.data_ptr(), bool(signed))
    return codes.to(like.device), absmax.to(like.device)


def _host_codes_and_scales(codes: torch.Tensor, absmax: torch.Tensor):
    """(codes on the host as a flat run, their block scales contiguous fp32, an fp32 output like
    the codes), the scales' count checked."""
    c = codes.detach().to("cpu")
    if not is_flat_run(c):
        c = c.contiguous()
    a = absmax.detach().to("cpu", torch.float32).contiguous()
    if a.numel() != num_blocks(c.numel()):
        raise ValueError(f"absmax has {a.numel()} entries; expected {num_blocks(c.numel())} for {c.numel()} codes")
    return c, a, torch.empty_like(c, dtype=torch.float32, memory_format=torch.preserve_format)


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """fp32 values (codes' shape, layout and device) of one quantized state."""
    c, a, out = _host_codes_and_scales(codes, absmax)
    _C.dequantize8(_flat(c).data_ptr(), a.data_ptr(), c.numel(), _flat(out).data_ptr(), bool(signed))
    return out.to(codes.device)


@functools.lru_cache(maxsize=None)
def _legacy_signed_table() -> torch.Tensor:
    """The values of LEGACY_FORMAT's signed codes 0..255 (fp32, exact): sign bit 0x80
    over a small float with 4 exponent bits (field 15 is 2^0, field 0 the subnormals
    in steps of 2^-17) and 3 mantissa bits."""
    values = []
    for code in range(256):
        field, mant = divmod(code & 0x7F, 8)
        mag = mant * 2.0 ** -17 if field == 0 else (1 + mant / 8) * 2.0 ** (field - 15)
        values.append(-mag if code & 0x80 else mag)
    return torch.tensor(values, dtype=torch.float32)


def dequantize_legacy_signed(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """fp32 values of signed codes in LEGACY_FORMAT: the table value times the block's
    absmax in fp32, as fusedopt's first kernels decoded them."""
    c, a, out = _host_codes_and_scales(codes, absmax)
    flat = _legacy_signed_table()[_flat(c).view(torch.uint8).long()]
    _flat(out).copy_(flat * a.repeat_interleave(BLOCK)[:c.numel()])
    return out.to(codes.device)
