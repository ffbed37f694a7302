"""What every functional entry shares: the per-device scalars of a call, and
the two phases of a step (``prepare`` checks everything and returns a
``PreparedStep``; ``launch`` writes)."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from .. import _C, _hyper
from .._kernels import Column, DeviceScalars, StepPlan
from .._kernels.rows import check_tables_apart
from .._kernels.checks import check_rounding_words, check_scalar_tensor

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
    the step count and a stream number (e.g. the param group), computed on the
    host (csrc/ops/stochastic_round.h rounding_call_seed). The same bits as
    passing ``stochastic_rounding_state(seed, step, stream)`` instead."""
    return _C.rounding_call_seed(int(seed) % 2**64, int(step) % 2**64, int(stream) % 2**64)


def _int64_word(v: int) -> int:
    """v mod 2**64 as the int64 with the same bits (the kernel reads the words as uint64)."""
    v = int(v) % 2**64
    return v - 2**64 if v >= 2**63 else v


def stochastic_rounding_state(seed: int, step: int = 0, stream: int = 0, device=None) -> torch.Tensor:
    """The device form of ``rounding_seed``: an int64 tensor ``[seed, step, stream]``
    (each mod 2**64) from which the kernel derives the call seed where it runs,
    with the same function as :func:`stochastic_rounding_seed` (same bits). Advance
    ``t[1]`` in place between steps (``t[1:2].add_(1)``, capturable): a CUDA graph
    that captured a call with it rounds with the step the tensor holds at replay."""
    for v, what in ((seed, "seed"), (step, "step"), (stream, "stream")):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"stochastic_rounding_state: {what} must be an int; got {v!r}")
    return torch.tensor([_int64_word(seed), _int64_word(step), _int64_word(stream)], dtype=torch.int64,
                        device=device)


RoundingSeed = Union[int, torch.Tensor]


def checked_rounding_seed(stochastic_rounding, rounding_seed, master_params) -> Optional[RoundingSeed]:
    """The call's stochastic-rounding seed after its checks; None: round to nearest.

    Stochastic rounding stores the 16-bit params of the call (fp16/bf16; fp32 and
    fp64 params have nothing to round) rounded up or down at random; it replaces
    master weights, so a call with both is refused. The seed is an int in
    [0, 2**64) or its device form (``stochastic_rounding_state``: three int64
    words the kernel reads; device checked per batch by ``device_scalars``).
    Under torch.compile an int seed would be fixed into the graph, so only the
    tensor form is accepted there."""
    _hyper.check_bool(stochastic_rounding, "stochastic_rounding")
    if not stochastic_rounding:
        return None
    if master_params is not None:
        raise ValueError("stochastic_rounding=True with master_params: stochastic rounding is for float16/bfloat16 "
                         "params without master weights (pass one or the other)")
    if isinstance(rounding_seed, torch.Tensor):
        check_rounding_words(rounding_seed, "rounding_seed")
        return rounding_seed
    if isinstance(rounding_seed, bool) or not isinstance(rounding_seed, int):
        raise TypeError("stochastic_rounding=True needs rounding_seed, an int in [0, 2**64) that changes every step "
                        "(e.g. fusedopt.functional.stochastic_rounding_seed(seed, step)) or an int64 tensor "
                        f"[seed, step, stream] (fusedopt.functional.stochastic_rounding_state); got {rounding_seed!r}")
    if not 0 <= rounding_seed < 2**64:
        raise ValueError(f"rounding_seed must be in [0, 2**64); got {rounding_seed}")
    if compiling():
        raise RuntimeError("stochastic_rounding=True under torch.compile needs rounding_seed as a tensor "
                           "(fusedopt.functional.stochastic_rounding_state(seed, step, stream, device), advanced "
                           "in place each step): an int seed would be fixed into the graph")
    return rounding_seed


def _rounding_words(words: torch.Tensor, dev: torch.device, capturing: bool) -> torch.Tensor:
    """The seed words on the batch's device: a view when already there (the
    optimizer classes keep them on the group's device); else a copy, refused under
    capture (a copy made at capture time would replay with its captured step).
    A copy to the CPU waits for the words (the CPU kernel reads them at once)."""
    if words.device == dev:
        return words
    if capturing:
        raise RuntimeError(f"under CUDA graph capture the rounding_seed tensor must be on {dev}, the device of "
                           f"the params it rounds; it is on {words.device}")
    return words.to(dev, non_blocking=dev.type == "cuda")


def device_scalars(plan: StepPlan, lr, grad_scale, found_inf, amp_names=("grad_scale", "found_inf"),
                   rounding_seed: Optional[RoundingSeed] = None) -> Dict[torch.device, DeviceScalars]:
    """The scalars of a call for each device its batches are on. An int
    ``rounding_seed`` (from ``checked_rounding_seed``) is refused under CUDA graph
    capture for 16-bit batches: a host seed would be fixed into the graph, and
    every replay would round with the same bits; the tensor form is read by
    the kernel at replay."""
    out: Dict[torch.device, DeviceScalars] = {}
    words = rounding_seed if isinstance(rounding_seed, torch.Tensor) else None
    host_seed = None if words is not None else rounding_seed
    rounded = {b.table.device for b in plan.batches if b.table.dtype in _SIXTEEN_BIT}  # devices that need the words
    for b in plan.batches:
        dev = b.table.device
        capturing = dev.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing and host_seed is not None and b.table.dtype in _SIXTEEN_BIT:
            raise RuntimeError(
                "stochastic_rounding=True with an int rounding_seed cannot be captured in a CUDA graph: the host "
                "number would be fixed into the graph (every replay would round with the same bits); pass "
                "rounding_seed as a device tensor instead (fusedopt.functional.stochastic_rounding_state(seed, "
                "step, stream, device='cuda'), advanced in place each step), as the optimizer classes do")
        if dev not in out:
            if capturing:
                plan.captured = True  # its buffers may now be used by a graph: keep them alive
            lr_value, lr_tensor = _lr_scalars(lr, dev, capturing)
            out[dev] = DeviceScalars(lr_value, lr_tensor, _amp_scalar(grad_scale, dev, amp_names[0]),
                                     _amp_scalar(found_inf, dev, amp_names[1]), host_seed,
                                     _rounding_words(words, dev, capturing) if words is not None and dev in rounded
                                     else None)
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


def check_calls_apart(calls: Sequence[PreparedStep], memo: list) -> None:
    """Prepared calls of one step (an optimizer's param groups) write no memory that
    another reads or writes (each call checked its own tensors). Raises before any runs.
    ``memo``: the caller's cache for ``check_tables_apart``."""
    check_tables_apart([b.table for c in calls for b in c.plan.batches], memo)


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
