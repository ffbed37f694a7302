"""Positive semi-definite curvature operators of a model's loss: the generalized Gauss-Newton
matrix and the empirical Fisher, on the same data, weighting and distributed reduction as
:class:`HessianOperator` (their constructor arguments are its own).

- :class:`GGNOperator`: ``G = J^T H_out J``, with J the Jacobian of the model's output in the
  parameters and ``H_out`` the Hessian of the loss in the output (cross-entropy, MSE or any
  loss that is twice differentiable in it). ``G v`` takes three backward passes and never
  forms J: ``J v`` by the double-vjp trick (the gradient of ``J^T u`` in a dummy u), then
  ``H_out (J v)`` by a Hessian-vector product in the output, then ``J^T`` of that. PSD when the
  loss is convex in the output (cross-entropy, MSE).
- :class:`EmpiricalFisherOperator`: ``F = (1/N) sum_i g_i g_i^T`` over the per-sample
  gradients ``g_i`` (``torch.func.vmap`` of ``grad`` of the loss of one sample), so
  ``F v = (1/N) sum_i g_i (g_i . v)``. PSD by construction. Needs a module torch.func can
  call functionally and a loss that takes a batch of one; memory: one batch's per-sample
  gradients (batch size x n). ``matmat(V)`` reuses them for all columns of V.

Two ways to give the loss, the same for both operators:

- ``loss_fn`` with ``(inputs, targets)`` batches: the output is ``model(inputs)``, the loss
  ``loss_fn(output, targets)``; batches are weighted by their size (``len(inputs)``).
- the closure form, for batches of any other kind (e.g. dicts for a Hugging Face style model):
  ``batch_output(model, batch) -> output tensor`` (e.g. ``model(**batch).logits``) and
  ``output_loss(output, batch) -> scalar loss`` (e.g. cross-entropy of the logits against
  ``batch["labels"]``). The loss must be a function of the output (and the batch's constants)
  only: H_out is its Hessian in the output. Each batch counts once in the mean, as with
  HessianOperator's ``batch_loss``. Both are checked at construction on the first batch (one
  forward pass without gradients, no product): ``batch_output`` must return a floating-point
  tensor, ``output_loss`` a one-element floating-point tensor. HessianOperator's single
  ``batch_loss`` is refused: it hides the output.

Per-sample gradients of the Fisher over a closure batch: the batch dimension is dim 0 of every
tensor in the batch (the leaves of nested dicts, lists and tuples; other leaves, e.g. strings
or ints, are passed to every sample unchanged). Every tensor leaf of every batch must have at
least one dimension, and all of a batch's tensor leaves the same size along dim 0 (checked at
construction, naming the leaves that differ); sample i is the batch made of ``t[i:i+1]`` for
every tensor leaf t (a batch of one, so ``batch_output`` and ``output_loss`` run unchanged),
under ``torch.func.vmap``. A batch's Fisher is the mean over its samples of ``g_i g_i^T``.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .hvp import HessianOperator, _BatchLoss


def _zeros_for_none(grads, params):
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]


class _Const:
    """A leaf of a batch that is not a tensor: given to every sample unchanged."""

    def __init__(self, value):
        self.value = value


def _split_leaves(batch) -> Tuple[List[torch.Tensor], List[str], Callable]:
    """(tensor leaves, their paths, rebuild(new tensor leaves) -> a batch of the same structure)
    of a batch made of nested dicts, lists and tuples; other leaves stay as they are."""
    leaves, paths = [], []

    def walk(node, path):
        if isinstance(node, torch.Tensor):
            leaves.append(node)
            paths.append(path or "batch")
            return len(leaves) - 1
        if isinstance(node, dict):
            return {k: walk(v, f"{path}[{k!r}]") for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v, f"{path}[{i}]") for i, v in enumerate(node))
        return _Const(node)

    skeleton = walk(batch, "")

    def rebuild(new, node=skeleton):
        if isinstance(node, int):
            return new[node]
        if isinstance(node, _Const):
            return node.value
        if isinstance(node, dict):
            return {k: rebuild(new, v) for k, v in node.items()}
        return type(node)(rebuild(new, v) for v in node)

    return leaves, paths, rebuild


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}, dtype {value.dtype}"
    return type(value).__name__


class GGNOperator(HessianOperator):
    """The generalized Gauss-Newton matrix ``J^T H_out J`` of the mean loss, as an operator.

    Arguments and attributes of :class:`HessianOperator`, except how the loss is given (see the
    module docstring): ``loss_fn(output, targets)`` with ``(inputs, targets)`` batches, or the
    closure form ``batch_output(model, batch) -> output`` with ``output_loss(output, batch) ->
    scalar loss`` for batches of any kind (each batch counts once), checked on the first batch
    at construction. ``method`` does not apply (only its default "auto" is accepted; ``.method``
    is None). ``matmat(V)`` runs each of matvec's three backward passes once for the whole
    block, vectorized over its columns (``is_grads_batched``; counted one product per column),
    with HessianOperator.matmat's fallback to a loop of matvecs where that vmap fails."""

    def __init__(self, model: torch.nn.Module, loss_fn: Optional[Callable] = None, data=None, *,
                 params: Optional[Sequence] = None, mode: str = "eval", batch_output: Optional[Callable] = None,
                 output_loss: Optional[Callable] = None, batch_loss: Optional[Callable] = None,
                 method: str = "auto"):
        name = type(self).__name__
        if batch_loss is not None:
            raise TypeError(f"{name} needs the model's output apart from the loss: instead of batch_loss, give "
                            "batch_output(model, batch) -> output and output_loss(output, batch) -> scalar loss "
                            "(or loss_fn(output, targets) with (inputs, targets) batches)")
        closure = batch_output is not None or output_loss is not None
        if closure:
            if loss_fn is not None:
                raise TypeError(f"give loss_fn (with (inputs, targets) batches) or batch_output and output_loss, "
                                "not both")
            for arg, val, form in (("batch_output", batch_output, "batch_output(model, batch) -> output tensor"),
                                   ("output_loss", output_loss, "output_loss(output, batch) -> scalar loss")):
                if val is None:
                    raise TypeError(f"{name}'s closure form needs both batch_output and output_loss; {arg} is "
                                    f"missing ({form})")
                if not callable(val):
                    raise TypeError(f"{arg} must be callable as {form}; got {type(val).__name__}")
            self.batch_output, self.output_loss = batch_output, output_loss
            composed = lambda m, b: output_loss(batch_output(m, b), b)  # noqa: E731 (HessianOperator's checks)
        else:
            self.batch_output = self.output_loss = None
            composed = None
        super().__init__(model, loss_fn, data, params=params, mode=mode, batch_loss=composed, method=method)

    # The output and the loss of the output, in either form.
    def _output(self, batch) -> torch.Tensor:
        return self.batch_output(self.model, batch) if self.batch_output is not None else self.model(batch[0])

    def _output_loss(self, out, batch) -> torch.Tensor:
        if self.output_loss is not None:
            return self.output_loss(out, batch).reshape(())
        return self.loss_fn(out, batch[1])

    def _check_batch_loss(self) -> None:
        """The closure form, on the first batch, before any product: batch_output must give a
        floating-point tensor and output_loss a one-element floating-point tensor."""
        batch = self.batches[0]
        with torch.no_grad():
            out = self._run(lambda: self.batch_output(self.model, batch))
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                raise ValueError("batch_output(model, batch) must return the model's output as a floating-point "
                                 f"tensor (e.g. model(**batch).logits); got {_describe(out)}")
            loss = self._run(lambda: self.output_loss(out, batch))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
            raise ValueError("output_loss(output, batch) must return a scalar floating-point loss; got "
                             f"{_describe(loss)}")

    def _resolve_method(self, method: str) -> None:
        """GGN and Fisher products are not Hessian-vector products: ``method`` (of
        HessianOperator) does not apply; only its default is accepted. ``self.method`` is None."""
        if method != "auto":
            raise ValueError(f"{type(self).__name__} computes its products its own way (see its docstring); "
                             f"method={method!r} is HessianOperator's choice of HVP: leave it out")
        return None

    def _products(self, vs, batched: bool):
        """per (index, batch) for _mean_over_batches: ``J^T H_out J`` of one batch applied to vs,
        one vector (param-shaped tensors) or, when ``batched``, a block (tensors of shape
        (b, *p.shape), each backward vectorized over b by ``is_grads_batched``); per-param
        results (None where a param does not reach the output)."""
        params = self.params

        def batch_product(batch):
            out = self._output(batch)
            u = torch.zeros_like(out, requires_grad=True)
            jt_u = torch.autograd.grad(out, params, grad_outputs=u, create_graph=True, allow_unused=True)
            used = [(g, w) for g, w in zip(jt_u, vs) if g is not None]
            if not used:  # no parameter reaches the output
                return [None] * len(params)
            jv = torch.autograd.grad([g for g, _ in used], u, grad_outputs=[w for _, w in used],
                                     is_grads_batched=batched)[0]
            loss = self._output_loss(out, batch)
            g_out = torch.autograd.grad(loss, out, create_graph=True)[0]
            h_jv = torch.autograd.grad(g_out, out, grad_outputs=jv, retain_graph=True, is_grads_batched=batched)[0]
            return torch.autograd.grad(out, params, grad_outputs=h_jv, allow_unused=True, is_grads_batched=batched)
        return batch_product

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        product = self._products(self.unflatten(v.to(device=self.device, dtype=self.dtype)), batched=False)
        self.num_matvecs += 1
        return self._run(lambda: self._mean_over_batches(
            lambda _, batch: self.flatten(_zeros_for_none(product(batch), self.params))))

    def _batches_blocks(self) -> bool:
        return True

    def _block_product(self, V: torch.Tensor) -> torch.Tensor:
        """matmat's product: the three backward passes of matvec, each once for the block
        (vectorized over its columns); a loop of matvecs where that fails (HessianOperator.matmat)."""
        b = V.shape[1]
        product = self._products(self._block_rows(V), batched=True)
        return self._run(lambda: self._mean_over_batches(
            lambda _, batch: self._flatten_rows(product(batch), b))).T.contiguous()

    def _mean_over_batches(self, batch_product) -> torch.Tensor:
        """Weighted mean over the batches (and ranks) of batch_product(index, batch), a tensor."""
        total, weight = None, 0.0
        for i, batch in enumerate(self.batches):
            bs = self._weight(batch)
            part = bs * batch_product(i, batch)
            total = part if total is None else total + part
            weight += bs
        return self._reduce(total, weight)


class EmpiricalFisherOperator(GGNOperator):
    """The empirical Fisher ``(1/N) sum_i g_i g_i^T`` over per-sample gradients, as an operator.

    Arguments and attributes of :class:`GGNOperator` (loss_fn with (inputs, targets) batches, or
    batch_output with output_loss for any batches; see the module docstring for the batch
    dimension of a closure batch: dim 0 of every tensor leaf, equal sizes checked at
    construction). ``params`` must be the model's own parameters (torch.func.functional_call),
    checked at construction. ``matmat(V)`` takes each batch's per-sample gradients once for all
    columns of V (counted one product per column)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        names = {id(p): name for name, p in self.model.named_parameters()}
        missing = [i for i, p in enumerate(self.params) if id(p) not in names]
        if missing:
            raise ValueError(f"params[{missing[0]}] is not a parameter of the model: the empirical Fisher "
                             "needs the model's own parameters (torch.func.functional_call)")
        self._keys = ["model." + names[id(p)] for p in self.params]
        self._wrapper = _BatchLoss(self.model, lambda batch: self._output_loss(self._output(batch), batch))
        self._split = [self._check_samples(i, batch) for i, batch in enumerate(self.batches)]

    @staticmethod
    def _check_samples(index: int, batch):
        """(tensor leaves, rebuild, number of samples) of a batch: dim 0 of every tensor leaf is the
        batch dimension, the same size for all of them."""
        leaves, paths, rebuild = _split_leaves(batch)
        if not leaves:
            raise ValueError(f"batch {index} has no tensor: the empirical Fisher takes per-sample gradients over "
                             "dim 0 of the batch's tensors")
        flat = [p for p, t in zip(paths, leaves) if t.dim() == 0]
        if flat:
            raise ValueError(f"batch {index}: {flat[0]} is a 0-d tensor; the empirical Fisher takes per-sample "
                             "gradients over dim 0 of every tensor in a batch")
        sizes = {int(t.shape[0]) for t in leaves}
        if len(sizes) > 1:
            listed = ", ".join(f"{p}: {int(t.shape[0])}" for p, t in zip(paths, leaves))
            raise ValueError(f"batch {index}: the empirical Fisher takes per-sample gradients over dim 0 of every "
                             f"tensor in a batch, so their sizes along dim 0 must agree; got {listed}")
        return leaves, rebuild, sizes.pop()

    def _per_sample_gradients(self, split) -> torch.Tensor:
        """The (B, n) per-sample gradients of one batch: vmap over dim 0 of its tensor leaves of
        grad of the loss of a batch of one."""
        from torch.func import functional_call, grad, vmap

        leaves, rebuild, count = split
        state = {k: p.detach() for k, p in zip(self._keys, self.params)}

        def sample_loss(chosen, *sample):
            one = rebuild([t.unsqueeze(0) for t in sample])
            return functional_call(self._wrapper, {**state, **chosen}, (one,)).reshape(())

        g = vmap(grad(sample_loss), in_dims=(None,) + (0,) * len(leaves))(dict(state), *leaves)
        return torch.cat([g[k].reshape(count, -1) for k in self._keys], dim=1)

    def _product(self, V: torch.Tensor) -> torch.Tensor:
        """Weighted mean over the batches of each batch's mean of g_i (g_i^T V), V of shape (n,) or (n, b)."""
        def batch_product(index, _):
            split = self._split[index]
            flat = self._per_sample_gradients(split)
            return flat.T @ (flat @ V) / split[2]

        return self._run(lambda: self._mean_over_batches(batch_product))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        v = v.to(device=self.device, dtype=self.dtype)
        if v.dim() != 1 or v.shape[0] != self.shape[0]:
            raise ValueError(f"v must be a 1-D tensor of {self.shape[0]} elements; got {list(v.shape)}")
        self.num_matvecs += 1
        return self._product(v)

    def _block_product(self, V: torch.Tensor) -> torch.Tensor:
        return self._product(V)
