"""8-bit AdamW trains as well as fp32 AdamW and bitsandbytes' AdamW8bit: on a
language-model-like task and a small CNN (fusedopt/benchmarking/training_tasks.py), the same seeds
and hyperparameters, the mean loss of the last 25 steps.

The default test averages three seeds and asserts within 3% of fp32's and within
3% of bitsandbytes' on the same runs (when installed; every tensor 8-bit there
too, min_8bit_size=0): single CNN runs scatter by about +-1.5% whatever the
optimizer state, so three seeds cannot show a smaller margin. The slow test
asserts "no worse than bitsandbytes" on 16 seeds of the CNN, the task where the
codes differ most, as the mean of the per-seed ratios against a bound of +0.5%
(the mean was -0.70% +- 0.30% over 30 seeds, README "8-bit states", so a false
failure is a more than 3-standard-error event).

Measured (2026-12-02, seeds 0-29 CNN, 0-19 LM): CNN 8-bit -0.20% of fp32,
bitsandbytes +0.52%, 8-bit against bitsandbytes -0.70% +- 0.30%; LM -0.04%,
-0.06%, +0.03% +- 0.02%. The first format (signed codes e4m3, 3 mantissa bits)
was +0.17% +- 0.33% against bitsandbytes on the CNN."""
import importlib.util

import pytest
import torch

import fusedopt
from fusedopt.benchmarking.training_tasks import TASKS, train

LR = 3e-3
SEEDS = 3


def _fused(state_dtype):
    return lambda ps: fusedopt.AdamW(ps, lr=LR, state_dtype=state_dtype)


def _mean_loss(fn, steps, make, seed):
    return sum(train(fn, make, seed + k, steps) for k in range(SEEDS)) / SEEDS


@pytest.mark.parametrize("task", list(TASKS))
def test_8bit_adamw_reaches_the_fp32_loss(task, seed):
    fn, steps = TASKS[task]
    fp32 = _mean_loss(fn, steps, _fused(None), seed)
    int8 = _mean_loss(fn, steps, _fused(torch.int8), seed)
    print(f"{task}: fp32 {fp32:.4f}, int8 {int8:.4f} ({int8 / fp32 - 1:+.2%})")
    assert abs(int8 / fp32 - 1) <= 0.03
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed: the fp32 comparison passed, the peer one did not run")
    import bitsandbytes as bnb
    peer = _mean_loss(fn, steps, lambda ps: bnb.optim.AdamW8bit(ps, lr=LR, weight_decay=1e-2, min_8bit_size=0),
                      seed)
    print(f"{task}: bitsandbytes AdamW8bit {peer:.4f} ({peer / fp32 - 1:+.2%})")
    assert int8 <= peer * 1.03


@pytest.mark.slow
def test_8bit_adamw_no_worse_than_bitsandbytes_on_16_cnn_seeds(seed):
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed")
    import bitsandbytes as bnb
    fn, steps = TASKS["cnn"]
    ratios = []
    for k in range(16):
        int8 = train(fn, _fused(torch.int8), seed + k, steps)
        peer = train(fn, lambda ps: bnb.optim.AdamW8bit(ps, lr=LR, weight_decay=1e-2, min_8bit_size=0), seed + k,
                     steps)
        ratios.append(int8 / peer - 1)
    mean = sum(ratios) / len(ratios)
    print(f"cnn: 8-bit against bitsandbytes over 16 seeds {mean:+.2%} (per seed {min(ratios):+.2%}..{max(ratios):+.2%})")
    assert mean <= 0.005
