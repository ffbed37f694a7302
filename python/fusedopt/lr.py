"""Learning-rate helpers for large-batch training (Goyal et al. 2017, "Accurate,
Large Minibatch SGD: Training ImageNet in 1 Hour").

Linear scaling rule: when the minibatch is multiplied by k, multiply the
learning rate by k. Because the scaled rate is too large for the first steps,
ramp it up linearly from a small value over a warmup period (5 epochs in the
paper), then hand over to the usual schedule (step, cosine, ...).

The schedulers returned here are ordinary ``torch.optim.lr_scheduler`` objects:
they work with float and tensor learning rates, any fusedopt or torch
optimizer, ``state_dict``/``load_state_dict`` and CUDA graphs (a tensor lr is
updated in place).
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def linear_scaling(base_lr: float, batch_size: int, base_batch_size: int = 256) -> float:
    """``base_lr * batch_size / base_batch_size``: the learning rate for ``batch_size``
    when ``base_lr`` was tuned for ``base_batch_size`` (e.g. 0.1 per 256 images
    for ResNet-50 with SGD gives 3.2 at batch 8192)."""
    if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) or not math.isfinite(base_lr) \
            or base_lr < 0:
        raise ValueError(f"base_lr must be a finite number >= 0; got {base_lr!r}")
    for name, v in (("batch_size", batch_size), ("base_batch_size", base_batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    return float(base_lr) * batch_size / base_batch_size


def linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, start_factor: float = 0.0,
                  after: Optional[torch.optim.lr_scheduler.LRScheduler] = None
                  ) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup of every group's lr from ``start_factor * lr`` to ``lr`` over
    ``warmup_steps`` scheduler steps, then ``after`` (if given) takes over.

    Goyal et al. start at the unscaled rate: pass ``start_factor=base_batch/batch``
    (= 1/k) to reproduce that; the default 0 starts from (almost) zero. Step the
    returned scheduler once per iteration (or per epoch if warmup_steps counts
    epochs). ``after`` must be built on the same optimizer *before* calling this
    and counts its steps from the end of the warmup.

    Returns a ``LinearLR`` (no ``after``) or a ``SequentialLR(LinearLR, after)``.
    """
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps <= 0:
        raise ValueError(f"warmup_steps must be a positive int; got {warmup_steps!r}")
    if not 0.0 <= float(start_factor) <= 1.0:
        raise ValueError(f"start_factor must be in [0, 1]; got {start_factor!r}")
    # LinearLR multiplies by start_factor at step 0 and needs it > 0.
    first = max(float(start_factor), 1.0 / (warmup_steps + 1))
    if after is None:
        return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=first, end_factor=1.0,
                                                 total_iters=warmup_steps)
    if after.optimizer is not optimizer:
        raise ValueError("`after` must schedule the same optimizer")
    warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=first, end_factor=1.0, total_iters=warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, after], milestones=[warmup_steps])
