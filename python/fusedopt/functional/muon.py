"""Muon as a function over lists of tensors, with the arguments of
torch.optim._muon.muon (torch 2.13) and its numbers.

A call checks every tensor and hyperparameter, then runs per (device, dtype)
batch of the params (nothing reads back to the host):

1. ``_C.multi_tensor_muon_momentum``: one fused pass over all params of the
   batch: the buffers and each param's update direction, written into its slot
   of the batch's Newton-Schulz workspace (``_kernels/muon.py``);
2. the Frobenius norms of the updates (the deterministic tensor_norms kernel),
   then the Newton-Schulz iteration batched over the matrices of each shape
   (``torch.baddbmm`` in ``ns_dtype``);
3. ``_C.multi_tensor_muon_apply``: decay and the final add, one fused pass.

The per-element math is csrc/ops/muon.h.

FSDP2 (DTensor params sharded on dim 0, evenly or not; ``_dtensor.row_shard``):
steps 1 and 3 run on the local shards, as for every optimizer, and the state
stays a DTensor like its param. Newton-Schulz needs the whole matrix, so
between them each rank all-gathers the update rows of its batch's sharded
matrices (``gather_full_matrices``: one all-gather per process group and
batch, in a fixed order, no host sync), takes the norms of and orthogonalizes
the full matrices (every rank computes the same thing: simple and exact, at
the price of every rank doing all of the Newton-Schulz flops and holding full
buffers), and keeps its own rows for step 3 (``take_own_rows``). lr factors use
the full shape. Giving each rank whole matrices to orthogonalize and sending
the results back (a scatter instead of redundant work) is a possible later
optimization. Replicated DTensors need no gather; other placements are refused.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import List, Optional, Sequence

import torch

from .. import _hyper
from .._dtensor import all_gather_into, chunk_span, is_dtensor, local_tensor, row_shard
from .._kernels import MASTER, STATE, Column, Labels, StepPlan, prepare
from .._kernels import muon as _kmuon
from .._kernels.checks import is_flat_run
from ._step import capturing, compiling, device_scalars, finish

_NOT_A_MATRIX = ("Muon orthogonalizes weight matrices; put 0-D and 1-D params (biases, norm weights, scalars) "
                 "in a param group with use_muon=False, which fusedopt.Muon steps with AdamW "
                 "(fusedopt.muon_param_groups(model) builds that split)")


def check_muon_params(params: Sequence[torch.Tensor], labels: Labels) -> None:
    """Every param is a matrix Muon can orthogonalize (see _kernels/muon.py matrix_of);
    a DTensor is replicated or sharded on dim 0 (``_dtensor.row_shard``), its local
    shard holding the rows DTensor's Shard(0) gives this rank, dim 0 outermost."""
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{labels.param(i)} is a {type(p).__name__}; expected a torch.Tensor")
        if p.dim() < 2:
            raise ValueError(f"{labels.param(i)} has shape {list(p.shape)} ({p.dim()}-D); {_NOT_A_MATRIX}")
        shard = None
        if is_dtensor(p):
            try:
                shard = row_shard(p)
            except NotImplementedError as e:
                raise NotImplementedError(f"{labels.param(i)} is a DTensor with {e} by fusedopt.Muon's "
                                          "Newton-Schulz gather") from None
            local = local_tensor(p)
            if shard is not None and local.shape[0] != shard.span(p.shape[0])[2]:
                raise ValueError(f"{labels.param(i)}: its local shard has {local.shape[0]} rows; Shard(0) of "
                                 f"{p.shape[0]} rows over {shard.world} ranks gives rank {shard.rank} "
                                 f"{shard.span(p.shape[0])[2]}")
            p = local
        if p.layout is torch.strided and is_flat_run(p):
            m = _kmuon.matrix_of(p)
            if m is None or (shard is not None and m != _kmuon.logical_matrix(p.shape)):
                raise ValueError(
                    f"{labels.param(i)} has strides {list(p.stride())} for shape {list(p.shape)}"
                    f"{' (its local shard)' if shard is not None else ''}: dim 0 is not outermost in memory, so "
                    "its memory is not a (shape[0], -1) matrix up to a column permutation; Muon needs "
                    "contiguous, channels_last or another layout with dim 0 outermost"
                    f"{' (sharded on dim 0: also for 2-D params)' if shard is not None else ''}")


def gather_full_matrices(ws) -> None:
    """The full matrices of the workspace's sharded rows into their Newton-Schulz buffers:
    per process group one all-gather of every rank's rows, then each rank's block into
    its rows (rank w holds rows ``w * chunk`` on, the last ranks fewer or none)."""
    for gather in ws.gathers:
        all_gather_into(gather.recv, gather.send, gather.group)
        for g in gather.members:
            blocks = gather.received(g)  # (k, world, chunk, cols)
            if g.chunk * gather.world == g.shape[0]:  # even shards: one copy
                g.a.view(blocks.shape).copy_(blocks)
                continue
            for w in range(gather.world):
                _, start, count = chunk_span(g.shape[0], gather.world, w)
                if count:
                    g.a[:, start:start + count].copy_(blocks[:, w, :count])


def take_own_rows(ws) -> None:
    """After Newton-Schulz: this rank's rows of each full result into its update slots."""
    for gather in ws.gathers:
        for g in gather.members:
            if g.count:
                g.send[:, :g.count].copy_(g.a[:, g.start:g.start + g.count])


@functools.lru_cache(maxsize=None)
def _openmp_backend() -> bool:
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


@contextmanager
def _cpu_matmul_threads_at_most(n: int, device: torch.device):
    """torch's CPU intra-op threads capped at ``n`` (the batch of the matmuls) inside.

    Why: torch's CPU bmm/baddbmm (MKL's batched gemm) give bits that depend on the
    thread count when a batch has fewer matrices than threads: the spare threads
    split single gemms, in a reduction order of their own (measured with torch 2.13
    and MKL 2024.2 in fp64 and fp32, e.g. one 17 x 17 fp64 matrix at 2 threads, or two
    7 x 300 at 3; README "Muon"). With at least as many matrices as threads each
    matrix is one thread's, and the bits are those of one thread whatever the count
    (measured for batches of 2 to 8 in fp64, fp32 and bf16; tests/test_muon.py holds a step to it). So a
    batch of k matrices runs on at most k threads: results independent of the thread
    count, at the price of idle cores while fewer matrices than cores share a shape.
    The cap is torch's global setting, restored on exit (torch ops that other Python
    threads run meanwhile see it too). torch's native (non-OpenMP) parallel backend
    cannot change its thread count once work has run, so there nothing is capped and
    the bits may depend on the thread count (README "Muon")."""
    before = torch.get_num_threads() if device.type == "cpu" and _openmp_backend() else 0
    if before <= n:
        yield
        return
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def newton_schulz(ws, coefficients: Sequence[float], steps: int, eps: float) -> None:
    """Orthogonalizes every workspace slot in place, batched per shape: X <- A / max(||A||_F, eps),
    then ``steps`` times X <- a X + (b G + c G^2) X with G = X X^T (X^T X and X (b G + c G^2)
    for a tall X: the transposed iteration torch runs, without a transpose). The result lands
    in each group's ``a`` buffer: the normalization writes into ``b`` when ``steps`` is odd.
    On CPU a shape's matmuls use at most as many threads as it has matrices
    (``_cpu_matmul_threads_at_most``: the same bits for every thread count)."""
    for g in ws.groups:
        with _cpu_matmul_threads_at_most(len(g.rows), g.a.device):
            _newton_schulz_group(ws, g, coefficients, steps, eps)


def _newton_schulz_group(ws, g, coefficients: Sequence[float], steps: int, eps: float) -> None:
    a, b, c = (float(x) for x in coefficients)
    bf16 = ws.ns_dtype is torch.bfloat16
    n = g.norms
    if bf16:  # torch: grad.bfloat16().norm().clamp(min=eps), all bf16
        n = n.to(torch.bfloat16).clamp(min=eps)
        n = n.float() if ws.emulate_bf16 else n
    else:
        n = n.clamp(min=eps)
    n = n.view(-1, 1, 1)
    x, other = (g.b, g.a) if steps % 2 else (g.a, g.b)
    torch.div(g.a, n, out=x)
    rnd = _kmuon.round_bf16_ if ws.emulate_bf16 else (lambda t: None)
    rnd(x)
    wide = g.shape[0] <= g.shape[1]
    for _ in range(steps):
        if wide:
            torch.bmm(x, x.mT, out=g.gram)
        else:
            torch.bmm(x.mT, x, out=g.gram)
        rnd(g.gram)
        torch.baddbmm(g.gram, g.gram, g.gram, beta=b, alpha=c, out=g.gram2)
        rnd(g.gram2)
        if wide:
            torch.baddbmm(x, g.gram2, x, beta=a, out=other)
        else:
            torch.baddbmm(x, x, g.gram2, beta=a, out=other)
        rnd(other)
        x, other = other, x


def muon(params: List[torch.Tensor], grads: List[torch.Tensor], muon_momentum_bufs: List[torch.Tensor], *,
         foreach: Optional[bool] = None, lr, weight_decay: float, momentum: float, nesterov: bool,
         ns_coefficients, ns_steps: int, eps: float, adjust_lr_fn: Optional[str], has_complex: bool = False,
         ns_dtype: torch.dtype = torch.bfloat16, grad_scale: Optional[torch.Tensor] = None,
         found_inf: Optional[torch.Tensor] = None, master_params: Optional[List[Optional[torch.Tensor]]] = None,
         state_dtype: Optional[torch.dtype] = None, plan: Optional[StepPlan] = None, launch: bool = True,
         _names=None):
    r"""Muon over lists of matrices: ``torch.optim._muon.muon``'s arguments and numbers.

    For each param p (a matrix; more than 2 dims: ``p.view(p.shape[0], -1)``) with grad g
    (divided by ``grad_scale`` when given):
    :math:`B \leftarrow B + (1-\mu)(g - B)` (``buf.lerp_(g, 1 - momentum)``; the buffers start
    as zeros, as torch creates them); :math:`U = g + \mu (B - g)` with nesterov, else
    :math:`U = B`; :math:`O = \mathrm{NS}_k^{(a,b,c)}(U / \max(\lVert U\rVert_F, \epsilon))`
    (``ns_steps`` = k quintic Newton-Schulz steps on the wide orientation of the matrix, in
    ``ns_dtype``); :math:`p \leftarrow p (1 - \gamma\lambda) - \gamma\, r(A, B)\, O` with
    :math:`r = \sqrt{\max(1, A/B)}` (adjust_lr_fn None or "original") or
    :math:`0.2\sqrt{\max(A, B)}` ("match_rms_adamw"). When ``found_inf`` is nonzero nothing
    is written.

    fusedopt keywords:
        ns_dtype: dtype of the Newton-Schulz matmuls: torch.bfloat16 (torch's; on CPUs
            computed as fp32 matmuls of bf16 values whose every output is rounded to bf16),
            torch.float32 or torch.float64.
        master_params, state_dtype, plan, launch: as in :func:`fusedopt.functional.sgd`.

    ``foreach`` and ``has_complex`` are accepted and ignored (always fused).
    """
    h = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
             ns_coefficients=ns_coefficients, ns_steps=ns_steps, eps=eps, adjust_lr_fn=adjust_lr_fn,
             ns_dtype=ns_dtype)
    _hyper.check_muon(h)
    labels = Labels(_names)
    check_muon_params(params, labels)
    if compiling():
        from .. import _ops
        return _ops.compiled_step("muon", params, grads, dict(muon_momentum_bufs=muon_momentum_bufs,
                                                              master_params=master_params),
                                  _ops.muon_options(h), lr, grad_scale, found_inf)
    columns = [Column("momentum_buffer", "muon_momentum_bufs", STATE, muon_momentum_bufs)]
    if master_params is not None:
        columns.append(Column("master", "master_params", MASTER, master_params))
    plan = prepare(_kmuon.MUON, params, grads, columns, labels=labels, state_dtype=state_dtype, plan=plan)
    scalars = device_scalars(plan, lr, grad_scale, found_inf)  # checked now, before anything is written
    # Under CUDA graph capture: no new workspace (its zero fill and the lr factors' host
    # copy would be captured; refused, before anything is written), and the ones the graph
    # uses stay alive with the plan, whatever later rebuilds drop (_kernels/muon.py).
    under_capture = capturing(plan)
    workspaces = [_kmuon.workspace(b.table, ns_dtype, adjust_lr_fn, b.sources, may_create=not under_capture)
                  for b in plan.batches]
    if under_capture:
        plan.keep_alive(workspaces)

    def run() -> None:
        for b, ws in zip(plan.batches, workspaces):
            s = scalars[b.table.device]
            _kmuon.launch_momentum(b.table, b.state_dtype, s, ws, momentum, nesterov)
            gather_full_matrices(ws)
            _kmuon.update_norms(ws)
            newton_schulz(ws, ns_coefficients, ns_steps, eps)
            take_own_rows(ws)
            _kmuon.launch_apply(b.table, b.state_dtype, s, ws, weight_decay)
    return finish(plan, columns, run, launch)
