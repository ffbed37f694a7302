"""8-bit AdamW trains as well as fp32 AdamW: on a language-model-like task and a
small CNN (tests/quant8_tasks.py), the same seeds and hyperparameters, the mean
loss of the last 25 steps, averaged over three seeds (single short runs of the
CNN scatter by about +-2% around fp32 whatever the optimizer state): within 3%
of fp32's, and within 3% of bitsandbytes' AdamW8bit on the same runs (when
installed; every tensor 8-bit there too, min_8bit_size=0). Not "no worse" to the
digit: see the measured gap below.

Measured at 8 seeds (2026-12-02): LM 8-bit -0.06..+0.19% of fp32, bitsandbytes
-0.09..-0.04%; CNN 8-bit -1.95..+3.25%, bitsandbytes -2.00..+0.34% (8-bit over bitsandbytes
per seed -2.3..+3.5%, mean +1.0%): our 8-bit state is about 1% worse than
bitsandbytes' dynamic code on the CNN on average and 0.1% on the LM (probably
the first moment's 3-bit mantissa: bitsandbytes keeps about 6 bits near the
block maximum; not verified)."""
import importlib.util

import pytest
import torch

import fusedopt
from quant8_tasks import cnn_task, lm_task, train

TASKS = {"lm": (lm_task, 300), "cnn": (cnn_task, 200)}
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
