"""What LARS and LAMB share: a per-tensor norm workspace and a step that, for
FSDP2-sharded params, is split in two ``_C`` calls around an all-reduce of
the shard norms."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _kernels, _ops
from .base import lr_value


class NormScaledStep:
    """Mixin for optimizers whose kernel scales each tensor's step by a ratio of
    norms (``_C.multi_tensor_<kernel>`` with a norms column).

    Subclasses set ``kernel`` and ``split_flags`` (the kernel's flags of the
    first and second call of a split step) and may override ``grad_sq`` (LAMB's
    clipping sums) and ``adapts``."""

    split_flags: Tuple[int, int] = (0, 0)
    # Private switch (tests): take the two-call path of sharded params for plain
    # tensors too, so that CI covers it without spawning ranks.
    _split_steps = False

    @staticmethod
    def adapts(group: dict) -> bool:
        """Whether the trust ratio is used (and so norms are needed) in this group."""
        return group["weight_decay"] != 0 or group["always_adapt"]

    def grad_sq(self, group: dict, device: torch.device, sums=None) -> Optional[torch.Tensor]:
        """LAMB's per-grad sums of squares for the clipping norm on ``device``
        (from ``sums``, the compiled step's, else this step's); None: no clipping."""
        return None

    def fill_table(self, table, group, states):
        _kernels.set_norms_column(table, _kernels.NORMS_COLUMN[self.kernel])

    def compiled_launch(self, group, args, ctx):
        _ops.large_batch_step(self.kernel, *args, self.grad_sq(group, args[0][0].device, ctx or {}))

    def launch(self, table, group, grad_scale, found_inf, batch=None):
        lr, lr_tensor = lr_value(group, table.device)
        hyper, flags = self.kernel_hyper(group)
        grad_sq = self.grad_sq(group, table.device)

        def call(extra_flags):
            _kernels.launch_large_batch(self.kernel, table, self.state_dtype(group, table.params[0]), lr=lr,
                                        lr_tensor=lr_tensor, hyper=hyper, flags=flags | extra_flags,
                                        grad_scale=grad_scale, found_inf=found_inf, grad_sq=grad_sq)

        sharded = batch is not None and batch.sharded
        if not ((sharded or self._split_steps) and self.adapts(group)):
            call(0)  # norms and update in one _C call
            return
        # FSDP2: the norms of the local shards, summed over the shard group, then
        # the update (found_inf skips both calls on the device).
        first, second = self.split_flags
        call(first)
        if sharded:
            self.reduce_rows_over_shards(table.norms, batch.sources)
        call(second)
