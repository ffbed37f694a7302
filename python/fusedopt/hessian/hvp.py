"""HessianOperator: the Hessian of a model's loss as an operator (Hessian-vector products)."""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence

import torch

METHODS = ("auto", "double_backward", "forward_over_reverse")


class _BatchLoss(torch.nn.Module):
    """One batch's loss as a module's forward, for :func:`torch.func.functional_call`. It swaps
    the tensors in on the module objects themselves, so the model held here as ``model`` (the
    operator's own) is the one ``loss_of_batch`` calls, for both batch kinds."""

    def __init__(self, model: torch.nn.Module, loss_of_batch: Callable):
        super().__init__()
        self.model = model
        self.loss_of_batch = loss_of_batch

    def forward(self, batch):
        return self.loss_of_batch(batch)


class HessianOperator:
    """Hessian of the mean loss w.r.t. ``params`` at their current values, as an operator.

    ``matvec(v)`` returns ``H v``, one Hessian-vector product per batch, by one of two methods
    (``method``); both give the same vector to rounding:

    - "double_backward" (Pearlmutter's trick): the gradient ``g`` is taken with
      ``create_graph=True`` and ``H v = d(g . v)/dtheta``. The graph of the backward pass is
      kept for the second backward, on top of the forward's saved activations.
    - "forward_over_reverse": ``torch.func.jvp`` of ``torch.func.grad`` of the batch loss as a
      function of the selected params (``torch.func.functional_call``; the other params enter
      as constants). No graph of the gradient is kept, but the backward pass needs every saved
      activation together with its tangent (forward-mode AD), and the backward itself runs on
      (value, tangent) pairs. Every operation of the model and the loss must support
      forward-mode AD and torch.func (a custom ``torch.autograd.Function`` needs
      ``setup_context`` and ``jvp``; a module must not update a buffer in place in eval mode),
      and ``params`` must be the model's own parameters. It is checked at construction by
      one product on the first batch (not counted in ``num_matvecs``; the global RNG state and
      the buffers are left as they were): where that fails but double backward works, a
      NotImplementedError names the failure and suggests method="double_backward" (where
      both fail, the loss's own error is raised).
    - "auto" (default): double_backward. The memory trade-off went the other way from the
      expected one: on CPU (torch 2.13) forward-over-reverse took 1.1-1.65x the peak memory of
      double backward on every model tried (conv nets with and without BatchNorm, in eval and
      train mode, tanh/GELU/LayerNorm MLPs, a 2-layer transformer with math attention), and
      on the small BatchNorm CNN of benchmarks/bench_hessian.py (61,514 params, batch 64 of
      3x32x32, fp32, one thread) it took 75.0 MiB against 53.7 MiB in eval mode and 75.0
      against 65.7 in train mode, at 0.8-0.9x the speed. So "auto" keeps double backward and
      runs nothing at construction; forward_over_reverse is there to measure elsewhere (e.g.
      a GPU, not measured) or to use where it wins. Neither method helps where the model has
      no second derivatives at all (e.g. CPU flash attention has neither a double backward
      nor a forward-mode derivative).

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
        method: "auto", "double_backward" or "forward_over_reverse": how one batch's HVP is
            computed (above). Everything else (the batches and their weights, ``params``,
            ``mode`` and the buffers' restoration, the distributed reduction, ``num_matvecs``)
            is the same for both.

    Distributed: when torch.distributed is initialized, every rank passes its own shard of the
    data; each HVP all-reduces the sum of batch-size-weighted HVPs and the total weight, so all
    ranks get the same vector and hence the same eigenvalues (the start vectors must agree: pass
    the same ``v0``/generator seed on every rank; :func:`fusedopt.hessian.analyze` does).

    The operator's ``shape`` is (n, n) with n the total number of parameter elements; its
    ``dtype``/``device`` are those of the first parameter (all must share them).
    ``num_matvecs`` counts HVPs. ``method`` is the method in use: "double_backward" or
    "forward_over_reverse" ("auto" resolved). ``matmat(V)`` takes the HVPs of the b columns of
    an (n, b) block together (see there; :func:`trace` and :func:`density` use it) and counts b.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Optional[Callable] = None, data=None, *,
                 params: Optional[Sequence] = None, mode: str = "eval", batch_loss: Optional[Callable] = None,
                 method: str = "auto"):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if batch_loss is not None:
            if loss_fn is not None:
                raise TypeError("give loss_fn (with (inputs, targets) batches) or batch_loss, not both")
            if not callable(batch_loss):
                raise TypeError("batch_loss must be callable as batch_loss(model, batch) -> scalar loss")
        elif not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(output, targets)")
        if data is None:
            raise TypeError("data is required: one batch or an iterable of batches")
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train'; got {mode!r}")
        if not isinstance(method, str) or method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(repr(m) for m in METHODS)}; got {method!r}")
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
        self.method = self._resolve_method(method)

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

    def _loss(self, batch) -> torch.Tensor:
        """A batch's mean loss."""
        if self.batch_loss is not None:
            return self.batch_loss(self.model, batch).reshape(())
        inputs, targets = batch
        return self.loss_fn(self.model(inputs), targets)

    def _weight(self, batch) -> float:
        """A batch's weight in the mean: its size for (inputs, targets) batches, 1 for batch_loss
        batches (their sizes are unknown: each batch counts once)."""
        return 1.0 if self.batch_loss is not None else float(len(batch[0]))

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
            return (buf[:-1] / buf[-1]).view_as(vecs)
        return vecs / weight

    def _batch_mean(self, per_batch, with_loss: bool = False):
        """Batch-size-weighted mean over the data (and the ranks) of the flat vector made of
        per_batch(batch)'s per-param tensors (None: zeros), with the batch's loss appended as
        one more element when ``with_loss``. per_batch(batch) -> (tensors, loss or None)."""
        total = torch.zeros(self.shape[0] + int(with_loss), dtype=self.dtype, device=self.device)
        weight = 0.0
        for batch in self.batches:
            tensors, loss = per_batch(batch)
            bs = self._weight(batch)
            parts = [(t if t is not None else torch.zeros_like(p)).reshape(-1)
                     for t, p in zip(tensors, self.params)]
            if with_loss:
                parts.append(loss.detach().reshape(1).to(self.dtype))
            total += bs * torch.cat(parts)
            weight += bs
        return self._reduce(total, weight)

    def _of_loss(self, fn):
        """per_batch for _batch_mean from fn(loss) -> per-param tensors (autograd on the loss)."""
        def per_batch(batch):
            loss = self._loss(batch)
            return fn(loss), loss
        return per_batch

    def _double_backward(self, vs):
        def hvp(loss):
            grads = torch.autograd.grad(loss, self.params, create_graph=True)
            dot = sum((g * u).sum() for g, u in zip(grads, vs))
            return torch.autograd.grad(dot, self.params, allow_unused=True)
        return self._of_loss(hvp)

    def _forward_over_reverse(self, vs):
        """per_batch: ``jvp(grad(loss of the selected params), v)`` through torch.func. The other
        params enter detached (constants, and no autograd graph is recorded for them). In train
        mode the buffers are cloned inside the transform (torch.func refuses in-place updates of
        tensors captured from outside it, e.g. BatchNorm's running stats) and the updated clones
        copied back after each batch, so the buffers evolve batch by batch as with double
        backward (and _run restores them at the end)."""
        from torch.func import functional_call, grad, jvp

        wrapper, keys = self._functional
        primals = tuple(p.detach() for p in self.params)
        tangents = tuple(vs)
        train = self.mode == "train"

        def per_batch(batch):
            state = {name: p.detach() for name, p in wrapper.named_parameters()}
            buffers = dict(wrapper.named_buffers()) if train else {}

            def loss_of(chosen):
                inner = {name: b.clone() for name, b in buffers.items()}
                loss = functional_call(wrapper, {**state, **dict(zip(keys, chosen)), **inner}, (batch,))
                return loss.reshape(()), (loss.detach(), inner)

            _, hv, (loss, updated) = jvp(grad(loss_of, has_aux=True), (primals,), (tangents,), has_aux=True)
            with torch.no_grad():
                for name, b in updated.items():
                    buffers[name].copy_(b)
            return hv, loss
        return per_batch

    def _per_batch_hvp(self, vs):
        return self._forward_over_reverse(vs) if self.method == "forward_over_reverse" else self._double_backward(vs)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector v (n elements); batch-size-weighted mean over the data."""
        vs = self.unflatten(v.to(device=self.device, dtype=self.dtype))
        self.num_matvecs += 1
        return self._run(lambda: self._batch_mean(self._per_batch_hvp(vs)))

    def _check_block(self, V: torch.Tensor) -> torch.Tensor:
        """V as an (n, b) tensor of the operator's dtype and device, b >= 1."""
        if not isinstance(V, torch.Tensor) or V.dim() != 2 or V.shape[0] != self.shape[0] or V.shape[1] < 1:
            got = list(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise ValueError(f"V must be a 2-D tensor of shape ({self.shape[0]}, b) with b >= 1; got {got}")
        return V.to(device=self.device, dtype=self.dtype)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H V`` for an (n, b) block of vectors (columns), as an (n, b) tensor; counts b products.

        With method="double_backward" one batch's b products share one forward pass and one
        gradient graph: the second backward runs once for all columns, vectorized over them
        (``torch.autograd.grad(..., is_grads_batched=True)``, i.e. torch.func.vmap of the
        backward). Memory: b times that backward's intermediate tensors. With
        method="forward_over_reverse" the b products of a batch are one ``torch.func.vmap`` over
        the tangents of ``jvp(grad(loss))`` (b times the forward-mode intermediates), in eval
        mode or for a model without buffers; in train mode with buffers (BatchNorm's running
        stats, updated in place per product) it stays a loop of matvecs. Where the vmap is not
        supported by some operation of the model (a RuntimeError on the first block), the
        operator warns once and falls back to a loop of matvecs from then on. The columns equal
        matvec's to rounding."""
        V = self._check_block(V)
        b = V.shape[1]
        if b == 1 or not self._batches_blocks() or getattr(self, "_matmat_unsupported", False):
            return torch.stack([self.matvec(V[:, j]) for j in range(b)], dim=1)
        try:
            out = self._block_product(V)
        except torch.OutOfMemoryError:
            raise  # not a vmap problem: a smaller block_size is the fix, not a silent loop
        except RuntimeError as exc:
            if hasattr(self, "_matmat_unsupported"):
                raise  # batched products worked before: not a vmap problem
            import warnings
            text = str(exc).strip()
            warnings.warn(f"{type(self).__name__}.matmat: the batched product failed ({type(exc).__name__}: "
                          f"{text.splitlines()[0][:200] if text else ''}); falling back to a loop of matvecs",
                          RuntimeWarning, stacklevel=2)
            self._matmat_unsupported = True
            return torch.stack([self.matvec(V[:, j]) for j in range(b)], dim=1)
        self._matmat_unsupported = False
        self.num_matvecs += b
        return out

    def _batches_blocks(self) -> bool:
        """Whether matmat has a batched product (else it loops over matvec)."""
        if self.method == "double_backward":
            return True
        return self.mode != "train" or next(self.model.buffers(), None) is None

    def _block_rows(self, V: torch.Tensor) -> List[torch.Tensor]:
        """An (n, b) block as per-param tensors of shape (b, *p.shape): row j is column j of V."""
        rows, out, i = V.T.contiguous(), [], 0
        for p in self.params:
            out.append(rows[:, i:i + p.numel()].reshape(V.shape[1], *p.shape))
            i += p.numel()
        return out

    def _block_product(self, V: torch.Tensor) -> torch.Tensor:
        block = self._forward_over_reverse_block if self.method == "forward_over_reverse" else self._double_backward_block
        return self._run(lambda: self._block_mean(block(self._block_rows(V)), V.shape[1]))

    def _forward_over_reverse_block(self, vs):
        """per_batch for _block_mean: the b HVPs of one batch as one torch.func.vmap over the
        tangents (rows of ``vs``, shapes (b, *p.shape)) of ``jvp(grad(loss))``. Only where no
        buffer is updated (see _batches_blocks), so the loss is a pure function of the params.
        Random operations (dropout in train mode) draw one mask for all b columns, as the
        shared forward pass of double backward's block does."""
        from torch.func import functional_call, grad, jvp, vmap

        wrapper, keys = self._functional
        primals = tuple(p.detach() for p in self.params)

        def per_batch(batch):
            state = {name: p.detach() for name, p in wrapper.named_parameters()}

            def loss_of(chosen):
                return functional_call(wrapper, {**state, **dict(zip(keys, chosen))}, (batch,)).reshape(())

            def product(tangents):
                return jvp(grad(loss_of), (primals,), (tangents,))[1]

            return vmap(product, randomness="same")(tuple(vs)), None
        return per_batch

    def _double_backward_block(self, vs):
        """per_batch for _block_mean: the b HVPs of one batch, per param tensors of shape (b, *p.shape)."""
        def hvp(loss):
            grads = torch.autograd.grad(loss, self.params, create_graph=True)
            # A gradient that does not depend on the params (a zero Hessian block row) cannot be
            # differentiated again: it contributes nothing.
            pairs = [(g, u) for g, u in zip(grads, vs) if g.requires_grad]
            if not pairs:
                return [None] * len(self.params)
            return torch.autograd.grad([g for g, _ in pairs], self.params, grad_outputs=[u for _, u in pairs],
                                       is_grads_batched=True, allow_unused=True)
        return self._of_loss(hvp)

    def _block_mean(self, per_batch, b: int) -> torch.Tensor:
        """_batch_mean for b columns: per_batch(batch) gives per-param tensors (b, *p.shape) (None:
        zeros); returns the weighted mean over the data (and the ranks) as an (n, b) tensor."""
        total = torch.zeros(b, self.shape[0], dtype=self.dtype, device=self.device)
        weight = 0.0
        for batch in self.batches:
            tensors, _ = per_batch(batch)
            bs = self._weight(batch)
            total += bs * self._flatten_rows(tensors, b)
            weight += bs
        return self._reduce(total, weight).T.contiguous()

    def _flatten_rows(self, tensors, b: int) -> torch.Tensor:
        """Per-param tensors (b, *p.shape) (None: zeros) -> (b, n), the inverse of _block_rows."""
        return torch.cat([(t if t is not None else torch.zeros(b, *p.shape, dtype=p.dtype, device=p.device))
                          .reshape(b, -1).to(self.dtype) for t, p in zip(tensors, self.params)], dim=1)

    # ---- method --------------------------------------------------------------------
    def _resolve_method(self, method: str) -> str:
        """"auto" is double_backward (the class docstring says why); forward_over_reverse is
        checked here, by one product on the first batch, so that a model without forward-mode
        support is refused before any HVP is counted."""
        if method != "forward_over_reverse":
            return "double_backward"
        names = {id(p): name for name, p in self.model.named_parameters()}
        for i, p in enumerate(self.params):
            if id(p) not in names:
                raise ValueError(f"params[{i}] is not a parameter of the model: method='forward_over_reverse' "
                                 "needs the model's own parameters (torch.func.functional_call); "
                                 "use method='double_backward'")
        self._functional = (_BatchLoss(self.model, self._loss), ["model." + names[id(p)] for p in self.params])
        ones = [torch.ones_like(p) for p in self.params]
        batch = self.batches[0]
        try:
            self._probe(lambda: self._forward_over_reverse(ones)(batch))
        except Exception as exc:
            try:
                self._probe(lambda: self._double_backward(ones)(batch))
            except Exception:
                raise exc from None  # the loss fails either way: not a forward-mode problem
            text = str(exc).strip()
            first = f"{type(exc).__name__}: {text.splitlines()[0][:400] if text else ''}"
            raise NotImplementedError(
                "method='forward_over_reverse' does not work with this model: torch.func.jvp of torch.func.grad "
                f"of the loss failed on the first batch ({first}), while a double-backward HVP works. Some "
                "operation lacks forward-mode AD or torch.func support (e.g. a custom torch.autograd.Function "
                "without setup_context and jvp, or a module that updates a buffer in place in eval mode). "
                "Use method='double_backward' (the default, 'auto')") from exc
        return method

    def _probe(self, fn) -> None:
        """One product on one batch in the operator's mode, without touching the global RNG
        state (dropout in train mode draws from it) or the buffers (_run restores them)."""
        devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            self._run(fn)

    def loss_and_gradient(self):
        """(mean loss as a float, flat gradient of it), same weighting and reduction as matvec."""
        both = self._run(lambda: self._batch_mean(
            self._of_loss(lambda loss: torch.autograd.grad(loss, self.params, allow_unused=True)), with_loss=True))
        return float(both[-1]), both[:-1]

    def gradient(self) -> torch.Tensor:
        """Flat gradient of the mean loss (same weighting and reduction as matvec)."""
        return self.loss_and_gradient()[1]
