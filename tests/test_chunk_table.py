"""fusedopt._C.build_chunk_table (the host plan of CUDA launches) against a pure-Python model.

The plan is [(rows, row_is_last, [(row, chunk)])] per launch: `rows` are global
tensor indices, each block entry names a launch-local row and a chunk of it.
"""
from __future__ import annotations

import random

import pytest

from fusedopt import _C

LIMITS = [(4, 1, 3), (64, 5, 7), (65536, 240, 1536), (3, 2, 2), (1000, 1, 1)]


def model_plan(numels, chunk, max_rows, max_blocks):
    """The packing written the obvious way: tensors in order, greedily, split across launches when full."""
    plans, rows, last, blocks = [], [], [], []
    for t, n in enumerate(numels):
        chunks = -(-n // chunk)
        c = 0
        while c < chunks:
            if len(rows) == max_rows or len(blocks) == max_blocks:
                plans.append((rows, last, blocks))
                rows, last, blocks = [], [], []
            take = min(chunks - c, max_blocks - len(blocks))
            blocks += [(len(rows), c + k) for k in range(take)]
            rows.append(t)
            c += take
            last.append(c == chunks)
    if blocks:
        plans.append((rows, last, blocks))
    return plans


def check_invariants(numels, chunk, max_rows, max_blocks, plans):
    covered = {}  # (tensor, chunk) -> times
    last_seen = {}
    for rows, last, blocks in plans:
        assert 0 < len(blocks) <= max_blocks
        assert 0 < len(rows) <= max_rows
        assert len(last) == len(rows)
        used_rows = set()
        for r, c in blocks:
            assert 0 <= r < len(rows)
            used_rows.add(r)
            key = (rows[r], c)
            covered[key] = covered.get(key, 0) + 1
        assert used_rows == set(range(len(rows))), "a row without blocks"
        for t, is_last in zip(rows, last):
            if is_last:
                assert t not in last_seen, "two launches claim a tensor's last chunk"
                last_seen[t] = True
    for t, n in enumerate(numels):
        chunks = -(-n // chunk)
        for c in range(chunks):
            assert covered.pop((t, c), 0) == 1, f"chunk {c} of tensor {t} not covered exactly once"
        assert (t in last_seen) == (chunks > 0), f"tensor {t}: last chunk flag"
        # elements: chunk c covers [c*chunk, min(n, (c+1)*chunk)); the union is [0, n) without overlap.
        if chunks:
            assert (chunks - 1) * chunk < n <= chunks * chunk
    assert not covered, f"chunks beyond a tensor's end: {sorted(covered)[:5]}"


@pytest.mark.parametrize("chunk,max_rows,max_blocks", LIMITS)
def test_random_sizes_match_model(chunk, max_rows, max_blocks, seed):
    rng = random.Random(seed)
    for _ in range(30):
        numels = [rng.choice([0, 1, chunk - 1, chunk, chunk + 1, rng.randrange(1, 20 * chunk)])
                  for _ in range(rng.randrange(0, 40))]
        plans = [(list(r), list(l), list(b)) for r, l, b in _C.build_chunk_table(numels, chunk, max_rows, max_blocks)]
        assert plans == model_plan(numels, chunk, max_rows, max_blocks)
        check_invariants(numels, chunk, max_rows, max_blocks, plans)


def test_empty_inputs():
    assert _C.build_chunk_table([], 16, 4, 4) == []
    assert _C.build_chunk_table([0, 0, 0], 16, 4, 4) == []


def test_empty_tensors_get_no_row():
    plans = _C.build_chunk_table([0, 5, 0, 17, 0], 16, 8, 8)
    assert len(plans) == 1
    rows, last, blocks = plans[0]
    assert list(rows) == [1, 3]
    assert list(blocks) == [(0, 0), (1, 0), (1, 1)]


def test_tensor_split_across_launches():
    plans = _C.build_chunk_table([10 * 16], 16, 8, 3)  # 10 chunks, 3 per launch
    assert [len(b) for _, _, b in plans] == [3, 3, 3, 1]
    assert [list(last) for _, last, _ in plans] == [[False], [False], [False], [True]]
    assert [c for _, _, b in plans for _, c in b] == list(range(10))


def test_row_limit_starts_new_launch():
    plans = _C.build_chunk_table([1] * 7, 16, 3, 100)
    assert [list(r) for r, _, _ in plans] == [[0, 1, 2], [3, 4, 5], [6]]


def test_huge_sizes_as_numbers_only():
    """Sizes over 2^31 elements: int64 arithmetic all the way (no memory is touched)."""
    big = 2**31 + 12345
    chunk, max_blocks = 65536, 1536
    numels = [big, 3, 2**33 + 1]
    plans = [(list(r), list(l), list(b)) for r, l, b in _C.build_chunk_table(numels, chunk, 240, max_blocks)]
    assert plans == model_plan(numels, chunk, 240, max_blocks)
    check_invariants(numels, chunk, 240, max_blocks, plans)
    chunks_big = -(-big // chunk)
    assert chunks_big * chunk >= big and (chunks_big - 1) * chunk < big
    # the last chunk of the first tensor ends exactly at its size
    last_chunk = max(c for rows, _, blocks in plans for r, c in blocks if rows[r] == 0)
    assert last_chunk == chunks_big - 1 and min(big, (last_chunk + 1) * chunk) == big


@pytest.mark.parametrize("args", [([5], 0, 4, 4), ([5], 16, 0, 4), ([5], 16, 4, 0), ([-1], 16, 4, 4),
                                  ([2**62], 1, 4, 4)])
def test_invalid_arguments_raise(args):
    with pytest.raises(ValueError):
        _C.build_chunk_table(*args)
