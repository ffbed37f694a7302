"""The CUDA vector path's alignment tiers (common/packet_tier.h, the function the kernels
call through cuda/multi_tensor.cuh load_packet/store_packet), on the host: every column
moves its packets in the widest word its base address allows, so one misaligned column
(a grad at an odd element offset of a DDP bucket) no longer sends its whole row to the
element-by-element path."""
from __future__ import annotations

import random

import pytest

from fusedopt import _C

# (element bytes, elements per packet) of the kernels: 16 / sizeof(P) elements, and the
# 32-byte packets of fp32 state next to 16-bit params
PACKETS = [(2, 8), (4, 4), (8, 2), (4, 8), (1, 16)]


def expected_tier(address: int, elem_bytes: int, vec: int) -> int:
    """The largest power of two dividing the address, capped at 16 and at the packet,
    when it is wider than an element; 0 otherwise."""
    align = address & -address if address else 1 << 62
    word = min(align, 16, elem_bytes * vec)
    while (elem_bytes * vec) % word:
        word //= 2
    return word if word > elem_bytes else 0


@pytest.mark.parametrize("elem_bytes,vec", PACKETS)
def test_tier_is_the_widest_word_the_address_allows(elem_bytes, vec):
    bases = [0x7F0000000000 + k * elem_bytes for k in range(64)]
    bases += [random.randrange(2 ** 46) * elem_bytes for _ in range(200)]
    for base in bases:
        assert _C.packet_tier(base, elem_bytes, vec) == expected_tier(base, elem_bytes, vec), hex(base)


@pytest.mark.parametrize("elem_bytes,vec", PACKETS)
def test_every_packet_of_a_column_has_its_base_tier(elem_bytes, vec):
    # chunks are multiples of vec elements long (multi_tensor.cuh), so packet i starts at
    # base + i * vec elements: the kernels decide the tier once per column from its base
    for k in range(32):
        base = random.randrange(2 ** 40) * elem_bytes
        tier = _C.packet_tier(base, elem_bytes, vec)
        for i in range(0, 65536, 4099 * vec):
            assert _C.packet_tier(base + i * elem_bytes, elem_bytes, vec) == tier


def test_the_tiers_of_a_ddp_bucket_grad():
    # fp32 grads at element offsets 0, 1, 2, 3 of a 16-byte-aligned bucket: 16, 0, 8, 0;
    # bf16 grads at offsets 0..7: 16, 0, 4, 0, 8, 0, 4, 0
    bucket = 0x7F0000001000
    assert [_C.packet_tier(bucket + 4 * k, 4, 4) for k in range(4)] == [16, 0, 8, 0]
    assert [_C.packet_tier(bucket + 2 * k, 2, 8) for k in range(8)] == [16, 0, 4, 0, 8, 0, 4, 0]
    # fp64: a packet is two elements; no word between an element and the packet
    assert [_C.packet_tier(bucket + 8 * k, 8, 2) for k in range(2)] == [16, 0]


@pytest.mark.parametrize("elem_bytes,vec", [(-1, 4), (0, 4), (3, 4), (16, 1), (4, 0)])
def test_bad_sizes_are_refused(elem_bytes, vec):
    with pytest.raises(ValueError, match="elem_bytes must be 1, 2, 4 or 8 and vec >= 1"):
        _C.packet_tier(16, elem_bytes, vec)
