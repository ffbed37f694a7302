"""HessianOperator: the Hessian of a model's loss as an operator (Hessian-vector products)."""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence

import torch


class HessianOperator:
    """Hessian of the mean loss w.r.t. ``params`` at their current values, as an operator.

    ``matvec(v)`` returns ``H v`` by double backward (Pearlmutter's trick): the
    gradient ``g`` is taken with ``create_graph=True`` and ``H v = d(g . v)/dtheta``.

    Args:
        model: a torch.nn.Module.
        loss_fn: ``loss_fn(model(inputs), targets)`` -> scalar mean loss of a batch.
        batch_loss: instead of loss_fn, for batches that are not (inputs, targets) pairs (e.g.
            dicts for a Hugging Face style model): ``batch_loss(model, batch)`` -> scalar loss;
            each batch then counts once in the mean (its size is unknown), and the first batch
            is evaluated once at construction to check that a scalar comes back.
        data: one ``(inputs, targets)`` batch, or an iterable (e.g. a list or DataLoader) of them.
            The HVP is the batch-size-weighted mean over all batches (batch size = ``len(inputs)``),
            i.e. the Hessian of the mean loss over all examples. A re-iterable (list, DataLoader) is
            needed for more than one matvec; a one-shot iterator is materialized into a list.
        params: the parameters (default: all of ``model.parameters()`` with requires_grad), as
            tensors or as names from ``model.named_parameters()``: the operator is the
            principal block of the Hessian for them (coordinates in the order given).
        mode: "eval" or "train": the module mode during HVPs (restored afterwards).
            "eval" (default) uses BatchNorm running statistics and no dropout: the loss is a
            deterministic function of the parameters, so the operator is fixed and symmetric, which
            Lanczos needs. "train" measures the Hessian of the loss the optimizer actually sees
            (batch statistics); it is deterministic only without dropout (dropout makes each HVP use
            a new mask, a different matrix), and BatchNorm running stats are updated by every HVP
            forward pass (they are saved and restored here).

    Distributed: when torch.distributed is initialized, every rank passes its own shard of the
    data; each HVP all-reduces the sum of batch-size-weighted HVPs and the total weight, so all
    ranks get the same vector and hence the same eigenvalues (the start vectors must agree: pass
    the same ``v0``/generator seed on every rank; :func:`fusedopt.hessian.analyze` does).

    The operator's ``shape`` is (n, n) with n the total number of parameter elements; its
    ``dtype``/``device`` are those of the first parameter (all must share them).
    ``num_matvecs`` counts HVPs.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Optional[Callable] = None, data=None, *,
                 params: Optional[Sequence] = None, mode: str = "eval", batch_loss: Optional[Callable] = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if batch_loss is not None:
            if loss_fn is not None:
                raise TypeError("give loss_fn (with (inputs, targets) batches) or batch_loss, not both")
            if not callable(batch_loss):
                raise TypeError("batch_loss must be callable as batch_loss(model, batch) -> scalar loss")
            if not self._supports_batch_loss:
                raise TypeError(f"{type(self).__name__} needs the model's output apart from the loss: give "
                                "loss_fn(output, targets) and (inputs, targets) batches")
        elif not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(output, targets)")
        if data is None:
            raise TypeError("data is required: one batch or an iterable of batches")
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train'; got {mode!r}")
        self.params: List[torch.Tensor] = self._select(model, params)
        if not self.params:
            raise ValueError("params is empty: there is no parameter to differentiate")
        p0 = self.params[0]
        for i, p in enumerate(self.params):
            if not isinstance(p, torch.Tensor) or not p.requires_grad:
                raise ValueError(f"params[{i}] must be a tensor with requires_grad=True")
            if p.dtype != p0.dtype or p.device != p0.device:
                raise ValueError(f"params[{i}] is {p.dtype} on {p.device}; all params must be {p0.dtype} on {p0.device}")
        self.model, self.loss_fn, self.mode, self.batch_loss = model, loss_fn, mode, batch_loss
        self.batches = self._closure_batches(data) if batch_loss is not None else self._batches(data)
        if batch_loss is not None:
            self._check_batch_loss()
        n = sum(p.numel() for p in self.params)
        self.shape = (n, n)
        self.dtype = p0.dtype
        self.device = p0.device
        self.num_matvecs = 0

    _supports_batch_loss = True  # GGN and Fisher need the output apart from the loss

    @staticmethod
    def _closure_batches(data) -> list:
        """Batches of any form for batch_loss: one dict, or an iterable of them (or of anything)."""
        if isinstance(data, dict):
            return [data]
        try:
            batches = list(data)
        except TypeError:
            raise TypeError("data must be a batch (a dict) or an iterable of batches") from None
        if not batches:
            raise ValueError("data has no batches")
        return batches

    def _check_batch_loss(self) -> None:
        """batch_loss must give a one-element floating-point tensor: checked on the first batch
        (a forward pass, no Hessian product) so that a wrong one fails here, not inside eigsh."""
        with torch.no_grad():
            loss = self._run(lambda: self.batch_loss(self.model, self.batches[0]))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
            got = f"shape {list(loss.shape)}, dtype {loss.dtype}" if isinstance(loss, torch.Tensor) else \
                type(loss).__name__
            raise ValueError(f"batch_loss(model, batch) must return a scalar floating-point loss; got {got}")

    def _loss_and_weight(self, batch):
        """A batch's mean loss and its weight: its size for (inputs, targets) batches, 1 for
        batch_loss batches (their sizes are unknown: each batch counts once)."""
        if self.batch_loss is not None:
            return self.batch_loss(self.model, batch).reshape(()), 1.0
        inputs, targets = batch
        return self.loss_fn(self.model(inputs), targets), float(len(inputs))

    @staticmethod
    def _select(model: torch.nn.Module, params) -> List[torch.Tensor]:
        """The parameters of the operator: all that require grad, or those given (tensors, or
        names as in ``model.named_parameters()``): the operator is then that principal block."""
        if params is None:
            return [p for p in model.parameters() if p.requires_grad]
        if isinstance(params, (str, torch.Tensor)):
            params = [params]
        named = dict(model.named_parameters())
        out = []
        for i, p in enumerate(params):
            if isinstance(p, str):
                if p not in named:
                    raise ValueError(f"params[{i}] is {p!r}, not a parameter name of the model; its names are "
                                     f"{', '.join(named) if len(named) <= 12 else ', '.join(list(named)[:12]) + ', ...'}")
                p = named[p]
            out.append(p)
        return out

    @staticmethod
    def _batches(data) -> list:
        if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
            return [tuple(data)]
        try:
            batches = list(data)
        except TypeError:
            raise TypeError("data must be an (inputs, targets) batch or an iterable of them") from None
        if not batches:
            raise ValueError("data has no batches")
        for i, b in enumerate(batches):
            if not (isinstance(b, (tuple, list)) and len(b) == 2):
                raise TypeError(f"batch {i} of data must be an (inputs, targets) pair")
        return batches

    # ---- flat <-> param-shaped -------------------------------------------------------
    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Param-shaped tensors -> one flat vector (the operator's coordinates)."""
        if len(tensors) != len(self.params):
            raise ValueError(f"expected {len(self.params)} tensors (one per param); got {len(tensors)}")
        return torch.cat([t.reshape(-1).to(self.dtype) for t in tensors])

    def unflatten(self, x: torch.Tensor) -> List[torch.Tensor]:
        """A flat vector of n elements -> a list of tensors shaped like the params (views of x)."""
        if x.dim() != 1 or x.shape[0] != self.shape[0]:
            raise ValueError(f"x must be a 1-D tensor of {self.shape[0]} elements; got {list(x.shape)}")
        out, i = [], 0
        for p in self.params:
            out.append(x[i:i + p.numel()].view_as(p))
            i += p.numel()
        return out

    # ---- products ------------------------------------------------------------------
    def _run(self, fn):
        was_training = self.model.training
        saved = {}
        if self.mode == "train":  # keep BN running stats as they were
            saved = {k: b.clone() for k, b in self.model.named_buffers()}
        self.model.train(self.mode == "train")
        try:
            return fn()
        finally:
            self.model.train(was_training)
            if saved:
                for k, b in self.model.named_buffers():
                    b.copy_(saved[k])

    def _reduce(self, vecs: torch.Tensor, weight: float) -> torch.Tensor:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            buf = torch.cat([vecs.reshape(-1), torch.tensor([weight], dtype=vecs.dtype, device=vecs.device)])
            dist.all_reduce(buf)
            return buf[:-1] / buf[-1]
        return vecs / weight

    def _batch_mean(self, per_batch, with_loss: bool = False):
        """Batch-size-weighted mean over the data (and the ranks) of the flat
        vector made of per_batch(loss)'s per-param tensors (None: zeros), with the
        loss itself appended as one more element when ``with_loss``."""
        total = torch.zeros(self.shape[0] + int(with_loss), dtype=self.dtype, device=self.device)
        weight = 0.0
        for batch in self.batches:
            loss, bs = self._loss_and_weight(batch)
            parts = [(t if t is not None else torch.zeros_like(p)).reshape(-1)
                     for t, p in zip(per_batch(loss), self.params)]
            if with_loss:
                parts.append(loss.detach().reshape(1).to(self.dtype))
            total += bs * torch.cat(parts)
            weight += bs
        return self._reduce(total, weight)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector v (n elements); batch-size-weighted mean over the data."""
        vs = self.unflatten(v.to(device=self.device, dtype=self.dtype))

        def hvp(loss):
            grads = torch.autograd.grad(loss, self.params, create_graph=True)
            dot = sum((g * u).sum() for g, u in zip(grads, vs))
            return torch.autograd.grad(dot, self.params, allow_unused=True)

        self.num_matvecs += 1
        return self._run(lambda: self._batch_mean(hvp))

    def loss_and_gradient(self):
        """(mean loss as a float, flat gradient of it), same weighting and reduction as matvec."""
        both = self._run(lambda: self._batch_mean(
            lambda loss: torch.autograd.grad(loss, self.params, allow_unused=True), with_loss=True))
        return float(both[-1]), both[:-1]

    def gradient(self) -> torch.Tensor:
        """Flat gradient of the mean loss (same weighting and reduction as matvec)."""
        return self.loss_and_gradient()[1]
