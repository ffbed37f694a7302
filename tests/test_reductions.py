"""The one combine order of csrc/ops/combine.h (``_C.fixed_order_sum``, the host
twin of the CUDA combine warp) against a pure-Python model of it, bit for bit;
and the CPU's fp64 per-tensor sum modelled end to end (lanes, chunks, combine)."""
import struct

import numpy as np
import pytest
import torch

from fusedopt import _C
from fusedopt.functional import tensor_norms

LANES = 32         # one CUDA warp (csrc/ops/combine.h kCombineLanes)
CPU_CHUNK = 32768  # csrc/cpu/multi_tensor_cpu.h kCpuChunkElements
CPU_LANES = 16     # csrc/cpu/reduce_cpu.h kSumLanes


def model_fixed_order_sum(xs):
    """Lane l adds items l, l + 32, ... in order from +0; then for off = 16, 8,
    4, 2, 1 lane l adds lane l + off; the total is lane 0. Python floats are
    IEEE doubles, so this is the same arithmetic as the C++ and CUDA code."""
    lanes = [0.0] * LANES
    for i, x in enumerate(xs):
        lanes[i % LANES] += float(x)
    off = LANES // 2
    while off:
        for lane in range(off):
            lanes[lane] += lanes[lane + off]
        off //= 2
    return lanes[0]


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


def wide_values(n, seed):
    """Random signs and magnitudes over 2^-30 .. 2^30: any other order of the
    additions rounds differently."""
    gen = torch.Generator().manual_seed(seed)
    mags = torch.randint(-30, 31, (n,), generator=gen).double()
    return (torch.randn(n, generator=gen, dtype=torch.float64) * torch.pow(2.0, mags)).numpy()


@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 63, 64, 65, 1000, 4099])
def test_fixed_order_sum_is_the_model_bit_for_bit(n, seed):
    x = wide_values(n, seed)
    assert bits(_C.fixed_order_sum(x)) == bits(model_fixed_order_sum(x))


def test_fixed_order_sum_of_nothing_is_positive_zero():
    assert bits(_C.fixed_order_sum(np.zeros(0))) == bits(0.0)


def test_the_order_is_not_index_order():
    # Lane 0 holds 1e16 and (item 32) -1e16, lane 1 holds 1.0: the lane sums
    # keep the 1.0 that a left-to-right sum loses (1e16 + 1.0 rounds to 1e16).
    x = np.zeros(40)
    x[0], x[1], x[32] = 1e16, 1.0, -1e16
    assert sum(x) == 0.0 and _C.fixed_order_sum(x) == 1.0
    # The tree: lane 0 meets lane 16 first (off = 16), before lane 1.
    y = np.zeros(40)
    y[0], y[1], y[16] = 1e16, 1.0, -1e16
    assert _C.fixed_order_sum(y) == 1.0 == model_fixed_order_sum(y)


def test_non_finite_items_propagate(seed):
    x = wide_values(100, seed)
    x[37] = np.inf
    assert _C.fixed_order_sum(x) == np.inf
    x[70] = -np.inf
    assert np.isnan(_C.fixed_order_sum(x))


def test_rejects_a_2d_array():
    with pytest.raises(ValueError, match="1-D"):
        _C.fixed_order_sum(np.zeros((2, 3)))


def model_cpu_square_sum(x: np.ndarray) -> float:
    """A tensor's fp64 sum of squares as the CPU computes it: per chunk of
    32768 elements, 16 lanes (element i of the chunk to lane i % 16, in order),
    the lanes added in lane order; the chunk partials in the combine order."""
    partials = []
    for b in range(0, x.size, CPU_CHUNK):
        q = x[b:b + CPU_CHUNK] ** 2
        q = np.concatenate([q, np.zeros(-q.size % CPU_LANES)])  # + 0.0 leaves a lane sum as it is
        lanes = np.cumsum(q.reshape(-1, CPU_LANES), axis=0)[-1]  # cumsum adds in order
        s = 0.0
        for v in lanes:
            s += float(v)
        partials.append(s)
    return model_fixed_order_sum(partials)


def test_cpu_fp64_norm_is_the_modelled_order(seed):
    # 40 chunks: more partials than combine lanes, so the lanes and the tree matter.
    n = 40 * CPU_CHUNK + 123
    x = torch.from_numpy(wide_values(n, seed))
    got = float(tensor_norms([x])[0])
    assert bits(got) == bits(float(np.sqrt(model_cpu_square_sum(x.numpy()))))
