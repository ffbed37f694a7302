"""What every functional entry shares: the per-device scalars of a call, and
the two phases of a step (``prepare`` checks everything and returns a
``PreparedStep``; ``launch`` writes)."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import _C, _hyper
from .._kernels import Column, DeviceScalars, StepPlan
from .._kernels.rows import check_tables_apart
from .._kernels.checks import check_scalar_tensor

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def _amp_scalar(t, device: torch.device, what: str) -> Optional[torch.Tensor]:
    """GradScaler's scale / found_inf as a 0-d fp32 tensor on ``device``: a view
    when it already is one (the usual case), else a non-blocking copy; never a host read."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"{what} must be a one-element tensor or a number; got {type(t).__name__}")
        return torch.full((), float(t), dtype=torch.float32, device=device)
    check_scalar_tensor(t, what)
    if t.device != device or t.dtype is not torch.float32:
        t = t.to(device=device, dtype=torch.float32, non_blocking=True)
    return t.reshape(())


def _lr_scalars(lr, device: torch.device, capturing: bool = False):
    """(float lr, device tensor lr or None). A CPU tensor lr is read on the host
    (no device sync); a CUDA tensor lr is passed by pointer and read by the kernel,
    so changing it in place (as lr schedulers do for tensor lrs) needs no recapture.
    Under CUDA graph capture a host lr would be frozen into the graph (a later
    scheduler change would silently do nothing on replay), so it is refused."""
    if capturing and not (isinstance(lr, torch.Tensor) and lr.device.type == "cuda"):
        raise RuntimeError(
            "under CUDA graph capture lr must be a CUDA tensor (e.g. lr=torch.tensor(1e-3, device='cuda'), "
            "changed in place by the scheduler); a float or CPU-tensor lr would be fixed into the graph")
    if isinstance(lr, torch.Tensor):
        if lr.device.type == "cpu":
            return float(lr), None
        if lr.device != device or lr.dtype is not torch.float32:
            lr = lr.to(device=device, dtype=torch.float32, non_blocking=True)
        return 0.0, lr.reshape(())
    return float(lr), None


def stochastic_rounding_seed(seed: int, step: int, stream: int = 0) -> int:
    """The per-call ``rounding_seed`` of a functional call from a fixed user seed,
    the step count and a stream number (e.g. the param group): what the optimizer
    classes pass (csrc/ops/stochastic_round.h rounding_call_seed). Host only."""
    return _C.rounding_call_seed(int(seed) % 2**64, int(step) % 2**64, int(stream) % 2**64)


def checked_rounding_seed(stochastic_rounding, rounding_seed, master_params) -> Optional[int]:
    """The call's stochastic-rounding seed after its checks; None: round to nearest.

    Stochastic rounding stores the 16-bit params of the call (fp16/bf16; fp32 and
    fp64 params have nothing to round) rounded up or down at random; it replaces
    master weights, so a call with both is refused. Under torch.compile the seed
    would be fixed into the graph, so it is refused there (the optimizer classes
    run such a step eagerly)."""
    _hyper.check_bool(stochastic_rounding, "stochastic_rounding")
    if not stochastic_rounding:
        return None
    if master_params is not None:
        raise ValueError("stochastic_rounding=True with master_params: stochastic rounding is for float16/bfloat16 "
                         "params without master weights (pass one or the other)")
    if isinstance(rounding_seed, bool) or not isinstance(rounding_seed, int):
        raise TypeError("stochastic_rounding=True needs rounding_seed, an int in [0, 2**64) that changes every step "
                        f"(e.g. fusedopt.functional.stochastic_rounding_seed(seed, step)); got {rounding_seed!r}")
    if not 0 <= rounding_seed < 2**64:
        raise ValueError(f"rounding_seed must be in [0, 2**64); got {rounding_seed}")
    if compiling():
        raise RuntimeError("stochastic_rounding=True is not supported under torch.compile (the seed of each step "
                           "would be fixed into the graph); call it eagerly (the optimizer classes do)")
    return rounding_seed


def device_scalars(plan: StepPlan, lr, grad_scale, found_inf, amp_names=("grad_scale", "found_inf"),
                   rounding_seed: Optional[int] = None) -> Dict[torch.device, DeviceScalars]:
    """The scalars of a call for each device its batches are on. ``rounding_seed``
    (from ``checked_rounding_seed``) is refused under CUDA graph capture for
    16-bit batches: a host seed would be fixed into the graph, and every replay
    would round with the same bits."""
    out: Dict[torch.device, DeviceScalars] = {}
    for b in plan.batches:
        dev = b.table.device
        capturing = dev.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing and rounding_seed is not None and b.table.dtype in _SIXTEEN_BIT:
            raise RuntimeError(
                "stochastic_rounding=True cannot be captured in a CUDA graph: its per-step seed is a host "
                "number that would be fixed into the graph (every replay would round with the same bits); "
                "use master_weights=True for captured steps, or run them eagerly")
        if dev not in out:
            if capturing:
                plan.captured = True  # its buffers may now be used by a graph: keep them alive
            lr_value, lr_tensor = _lr_scalars(lr, dev, capturing)
            out[dev] = DeviceScalars(lr_value, lr_tensor, _amp_scalar(grad_scale, dev, amp_names[0]),
                                     _amp_scalar(found_inf, dev, amp_names[1]), rounding_seed)
    return out


class PreparedStep:
    """A checked call that has not written anything yet: ``launch()`` runs it.

    Optimizers prepare every param group before launching any, so that an
    error in any group leaves everything untouched."""

    __slots__ = ("plan", "created", "_columns", "_run")

    def __init__(self, plan: StepPlan, columns: Sequence[Column], run: Callable[..., None]):
        self.plan = plan
        self.created: List[int] = []  # after launch: positions whose state the call made
        self._columns = columns
        self._run = run

    def launch(self, **options) -> None:
        self._run(**options)
        self.created = self.plan.commit_created(self._columns)


def check_calls_apart(calls: Sequence[PreparedStep]) -> None:
    """Prepared calls of one step (an optimizer's param groups) write no memory that
    another reads or writes (each call checked its own tensors). Raises before any runs."""
    check_tables_apart([b.table for c in calls for b in c.plan.batches])


def finish(plan: StepPlan, columns: Sequence[Column], run: Callable[..., None], launch: bool):
    """Runs the prepared call now (``launch=True``, returns None as torch's
    functional forms do) or hands it back as a ``PreparedStep``."""
    if plan.created and torch.cuda.is_available() and any(b.table.device.type == "cuda" for b in plan.batches) \
            and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "optimizer state is created on the first step and cannot be created inside CUDA graph "
            "capture (the zero fill would replay): run at least one eager step before capturing")
    prepared = PreparedStep(plan, columns, run)
    if not launch:
        return prepared
    prepared.launch()
    return None


def compiling() -> bool:
    return torch.compiler.is_compiling()


def capturing(plan: StepPlan) -> bool:
    """Whether this call of ``plan`` is being captured into a CUDA graph (a CUDA batch,
    the current stream capturing)."""
    return any(b.table.device.type == "cuda" for b in plan.batches) and torch.cuda.is_current_stream_capturing()
