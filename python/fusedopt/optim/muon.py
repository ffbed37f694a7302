"""Fused Muon: a drop-in for torch.optim.Muon whose use_muon=False groups are
stepped by the fused AdamW, and ``muon_param_groups``, the usual split of a model."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch

from .. import _hyper, functional
from ..functional.muon import check_muon_params
from .._kernels import Labels
from .adam import check_adam_group, new_moments
from .base import FusedOptimizer

_ADAMW_KEYS = ("step", "exp_avg", "exp_avg_sq")


class Muon(FusedOptimizer):
    r"""Muon, the same arguments, numbers and state_dict as ``torch.optim.Muon``, for
    matrices of any layout and param groups stepped by AdamW.

    For each param p of a Muon group (a matrix: ``(A, B) = (p.shape[0], p.numel() / A)``;
    conv weights are orthogonalized as ``p.view(p.shape[0], -1)``) with grad g (after
    AMP unscaling):

    .. math::
        B &\leftarrow B + (1-\mu)(g - B) \quad\text{(the buffer starts at 0, as in torch)} \\
        U &= g + \mu (B - g) \text{ if nesterov else } B \\
        X_0 &= U / \max(\lVert U\rVert_F, \epsilon), \qquad
        X_{j+1} = a X_j + (b\, G_j + c\, G_j^2) X_j,\quad G_j = X_j X_j^\top
        \quad (j < k;\ X^\top X \text{ and } X(bG + cG^2) \text{ when } A > B) \\
        p &\leftarrow p\,(1 - \gamma\lambda) - \gamma\, r(A, B)\, X_k, \qquad
        r = \sqrt{\max(1, A/B)} \text{ (adjust\_lr\_fn None, "original")}, \;
        0.2\sqrt{\max(A, B)} \text{ ("match\_rms\_adamw")}

    Groups with ``use_muon=False`` are AdamW (``torch.optim.AdamW``'s numbers, the
    fused kernel of fusedopt.AdamW) with that group's lr, betas, eps and weight_decay:
    biases, norm weights, embeddings and the output head (``fusedopt.muon_param_groups``).

    Args:
        params: iterable of matrices (2 or more dims), or dicts defining param groups.
        lr (float or Tensor): :math:`\gamma` (default 1e-3).
        weight_decay (float): decoupled decay :math:`\lambda` (default 0.1).
        momentum (float): :math:`\mu` in [0, 1] (default 0.95).
        nesterov (bool): Nesterov momentum (default True).
        ns_coefficients (tuple): :math:`(a, b, c)` (default (3.4445, -4.775, 2.0315)).
        eps (float): :math:`\epsilon` > 0, the floor of the norm (default 1e-7).
        ns_steps (int): k, Newton-Schulz steps in [0, 100) (default 5).
        adjust_lr_fn (str, optional): None or "original" (Keller Jordan's factor), or
            "match_rms_adamw" (Moonshot's).
        ns_dtype (torch.dtype): dtype of the Newton-Schulz matmuls: ``torch.bfloat16``
            (default, torch's: torch's batched bf16 matmuls on CUDA and on CPUs with bf16
            units such as AVX512_BF16; elsewhere fp32 matmuls of bf16 values with every
            output rounded to bf16, the numbers of bf16 matmuls), ``torch.float32`` (more
            accurate; faster than the emulated bf16, slower than native bf16: README
            "Muon") or ``torch.float64``.
        betas (tuple): AdamW's :math:`(\beta_1, \beta_2)` for use_muon=False groups
            (default (0.9, 0.999)); such groups also use lr, eps and weight_decay.
        use_muon (bool): the default of a group's ``use_muon`` (default True).
        master_weights (bool): fp32 master copies of fp16/bf16 params in ``state['master']``.
        state_dtype (torch.dtype, optional): ``torch.float32`` (default) or ``torch.bfloat16``
            for the momentum buffer and AdamW's moments (fp64 params keep fp64).

    A 0-D or 1-D param in a Muon group is refused (at construction and at every step,
    before anything is written) with a message pointing to use_muon=False groups.

    State per Muon param: ``momentum_buffer`` (torch.optim.Muon's layout: checkpoints
    load both ways); per AdamW param: ``step``, ``exp_avg``, ``exp_avg_sq``.

    Per step and (device, dtype) batch of a Muon group: one momentum pass (reads g and
    B, writes B and the update into the workspace: fp32 params with fp32 state move
    4 + 8 bytes per element plus 4 (fp32 or emulated-bf16 workspace) or 2 (bf16)), the
    Newton-Schulz matmuls batched per matrix shape (``torch.baddbmm``; about
    :math:`k(4AB\min(A,B) + 2\min(A,B)^3)` flops per matrix), and one apply pass (reads p
    and the update, writes p: 8 + 4 or 2 bytes per element). Persistent memory: the
    buffer (4 bytes per element) and the workspace, kept between steps (two matrices
    and two Gram matrices per param, plus a bf16 copy when bf16 is emulated).

    FSDP2 (``fully_shard``: params, grads and ``momentum_buffer`` are DTensors sharded
    on dim 0, the last ranks with fewer rows or none): the momentum and apply passes
    run on the local shards; between them each rank all-gathers the update rows of
    every sharded matrix of the batch (one ``all_gather_into_tensor`` per process group
    and (device, dtype) batch, in a fixed order, no host sync), runs Newton-Schulz on
    the full matrices (every rank computes the same: simple and exact) and applies its
    own rows. :math:`r(A, B)` and the norm use the full matrix, so a sharded step gives
    the unsharded numbers (bit for bit, given the same grads; tests/test_distributed.py).
    Cost per step: one all-gather of the update of each Muon matrix (each rank receives
    the rows it lacks, in the Newton-Schulz storage dtype), all of the Newton-Schulz
    flops on every rank, and a full-size workspace on every rank (two full matrices, the
    gather's receive buffer, this rank's rows and two Gram matrices per sharded matrix).
    Giving each rank whole matrices to orthogonalize and sending back the results would
    divide the flops and the workspace by the ranks; it is a possible later optimization.
    Replicated DTensors need no communication; other shardings (another dim, several
    sharded mesh dims) are refused with NotImplementedError.

    Thread counts: on CPU each shape's matmuls run on at most as many of torch's
    threads as the shape has matrices (torch's bmm gives other bits at other thread
    counts otherwise), so results do not depend on the thread count (README "Muon").

    CUDA graphs: capturable after an eager warm-up, with CUDA tensor lrs; the
    workspaces a captured step used stay alive with its plan, and a step that would
    need a new one inside capture is refused before anything is written (README
    "CUDA graphs").
    """

    _functional = functional.muon
    # FSDP2 params: the step gathers matrices between kernel passes (runs eagerly under compile)
    _eager_for_dtensors_when_compiled = True

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None, *,
                 ns_dtype=torch.bfloat16, betas=(0.9, 0.999), use_muon=True, master_weights=False,
                 state_dtype=None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                        ns_dtype=ns_dtype, betas=betas, use_muon=use_muon, master_weights=master_weights,
                        state_dtype=state_dtype)
        super().__init__(params, defaults)

    @staticmethod
    def _is_muon(group: dict) -> bool:
        return group["use_muon"]

    def _check_hyperparameters(self, group, where):
        _hyper.check_bool(group["use_muon"], "use_muon", where)
        if self._is_muon(group):
            _hyper.check_muon(group, where)
        else:
            check_adam_group(group, where)

    def _check_group(self, group, gi):
        super()._check_group(group, gi)
        if self._is_muon(group):
            params = group["params"]
            check_muon_params(params, Labels([self._param_label(group, gi, i) for i in range(len(params))]))

    def _required_state_keys(self, group):
        return ("momentum_buffer",) if self._is_muon(group) else _ADAMW_KEYS

    def _new_state(self, group, p):
        dtype = self._state_dtype(group, p)
        if self._is_muon(group):
            return {"momentum_buffer": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)}
        return new_moments(p, dtype, _ADAMW_KEYS[1:])

    def _state_lists(self, group, states):
        if self._is_muon(group):
            return {"muon_momentum_bufs": [st["momentum_buffer"] for st in states]}
        return {"exp_avgs": [st["exp_avg"] for st in states], "exp_avg_sqs": [st["exp_avg_sq"] for st in states],
                "state_steps": [st["step"] for st in states], "max_exp_avg_sqs": []}

    def _functional_kwargs(self, group):
        if self._is_muon(group):
            return dict(weight_decay=group["weight_decay"], momentum=group["momentum"], nesterov=group["nesterov"],
                        ns_coefficients=group["ns_coefficients"], ns_steps=group["ns_steps"], eps=group["eps"],
                        adjust_lr_fn=group["adjust_lr_fn"], ns_dtype=group["ns_dtype"])
        beta1, beta2 = group["betas"]
        return dict(amsgrad=False, beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                    maximize=False)

    def _call(self, group, entry, grads, grad_scale, found_inf, **extra):
        fn = functional.muon if self._is_muon(group) else functional.adamw
        return fn(entry.params, grads, **entry.lists, **self._functional_kwargs(group), lr=group["lr"],
                  grad_scale=grad_scale, found_inf=found_inf, master_params=entry.master, **extra)


_EMBEDDINGS = (torch.nn.Embedding, torch.nn.EmbeddingBag)


def muon_param_groups(model: torch.nn.Module, lr: Optional[float] = None, weight_decay: Optional[float] = None, *,
                      adamw_lr: float = 3e-4, adamw_betas=(0.9, 0.95), adamw_eps: float = 1e-8,
                      adamw_weight_decay: float = 0.0, head: Union[None, str, Sequence[str]] = None) -> list:
    """The usual Muon/AdamW split of ``model``'s trainable params, as param groups for
    :class:`Muon`: hidden weight matrices (2 or more dims) to a Muon group; embeddings
    (``nn.Embedding``, ``nn.EmbeddingBag``), the output head, and every 0-D and 1-D param
    (biases, norm weights) to a ``use_muon=False`` group stepped by AdamW.

    Args:
        model: the module.
        lr, weight_decay: the Muon group's (None: the optimizer's defaults).
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW group's.
        head: the output head: the name of a module or param (or several), e.g.
            ``"lm_head"``; None: the last trainable ``nn.Linear`` in ``model.modules()`` order.

    Groups carry ``param_names`` (error messages name the param); an empty group
    is left out; a param shared by several modules (tied embeddings) appears once,
    in the AdamW group when any of its uses sends it there.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    to_adamw = set()
    for module in model.modules():
        if isinstance(module, _EMBEDDINGS):
            to_adamw.update(id(p) for p in module.parameters())
    heads = [head] if isinstance(head, str) else list(head or [])
    if heads:
        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        for h in heads:
            if h in modules:
                to_adamw.update(id(p) for p in modules[h].parameters())
            elif h in params:
                to_adamw.add(id(params[h]))
            else:
                raise ValueError(f"head {h!r} names no module or parameter of the model")
    else:
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad]
        if linears:
            to_adamw.update(id(p) for p in linears[-1].parameters())
    muon, adamw = [], []
    for p in model.parameters():  # unique, in registration order
        if not p.requires_grad:
            continue
        (adamw if id(p) in to_adamw or p.dim() < 2 else muon).append(p)
    groups = []
    if muon:
        g = {"params": muon, "param_names": [names[id(p)] for p in muon], "use_muon": True}
        if lr is not None:
            g["lr"] = lr
        if weight_decay is not None:
            g["weight_decay"] = weight_decay
        groups.append(g)
    if adamw:
        groups.append({"params": adamw, "param_names": [names[id(p)] for p in adamw], "use_muon": False,
                       "lr": adamw_lr, "betas": tuple(adamw_betas), "eps": adamw_eps,
                       "weight_decay": adamw_weight_decay})
    return groups
