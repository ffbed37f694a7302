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
  call functionally and a ``loss_fn`` that takes a batch of one; memory: one batch's
  per-sample gradients (batch size x n).
"""
from __future__ import annotations

import torch

from .hvp import HessianOperator


def _zeros_for_none(grads, params):
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]


class GGNOperator(HessianOperator):
    """The generalized Gauss-Newton matrix ``J^T H_out J`` of the mean loss, as an operator
    (arguments and attributes of :class:`HessianOperator`, with loss_fn and (inputs, targets)
    batches: the output and the loss are needed apart; see the module docstring). ``method``
    does not apply (only its default "auto" is accepted; ``.method`` is None)."""

    _supports_batch_loss = False

    def _resolve_method(self, method: str) -> None:
        """GGN and Fisher products are not Hessian-vector products: ``method`` (of
        HessianOperator) does not apply; only its default is accepted. ``self.method`` is None."""
        if method != "auto":
            raise ValueError(f"{type(self).__name__} computes its products its own way (see its docstring); "
                             f"method={method!r} is HessianOperator's choice of HVP: leave it out")
        return None

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        vs = self.unflatten(v.to(device=self.device, dtype=self.dtype))
        params = self.params

        def batch_product(inputs, targets):
            out = self.model(inputs)
            u = torch.zeros_like(out, requires_grad=True)
            jt_u = torch.autograd.grad(out, params, grad_outputs=u, create_graph=True, allow_unused=True)
            used = [(g, w) for g, w in zip(jt_u, vs) if g is not None]
            if not used:  # no parameter reaches the output
                return [None] * len(params)
            jv = torch.autograd.grad([g for g, _ in used], u, grad_outputs=[w for _, w in used])[0]
            loss = self.loss_fn(out, targets)
            g_out = torch.autograd.grad(loss, out, create_graph=True)[0]
            h_jv = torch.autograd.grad(g_out, out, grad_outputs=jv, retain_graph=True)[0]
            return torch.autograd.grad(out, params, grad_outputs=h_jv, allow_unused=True)

        self.num_matvecs += 1
        return self._run(lambda: self._mean_over_batches(batch_product))

    def _mean_over_batches(self, batch_product) -> torch.Tensor:
        total = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        weight = 0.0
        for inputs, targets in self.batches:
            bs = float(len(inputs))
            total += bs * self.flatten(_zeros_for_none(batch_product(inputs, targets), self.params))
            weight += bs
        return self._reduce(total, weight)


class EmpiricalFisherOperator(GGNOperator):
    """The empirical Fisher ``(1/N) sum_i g_i g_i^T`` over per-sample gradients, as an operator
    (arguments and attributes of :class:`HessianOperator`; see the module docstring)."""

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, grad, vmap

        v = v.to(device=self.device, dtype=self.dtype)
        names = {id(p): name for name, p in self.model.named_parameters()}
        missing = [i for i, p in enumerate(self.params) if id(p) not in names]
        if missing:
            raise ValueError(f"params[{missing[0]}] is not a parameter of the model: the empirical Fisher "
                             "needs the model's own parameters (torch.func.functional_call)")
        keys = [names[id(p)] for p in self.params]
        detached = {k: p.detach() for k, p in zip(keys, self.params)}

        def sample_loss(chosen, x, y):
            out = functional_call(self.model, {**detached, **chosen}, (x.unsqueeze(0),))
            return self.loss_fn(out, y.unsqueeze(0))

        per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))

        def batch_product(inputs, targets):
            g = per_sample(dict(detached), inputs, targets)  # {name: (B, *shape)}
            flat = torch.cat([g[k].reshape(len(inputs), -1) for k in keys], dim=1)  # (B, n)
            sums = flat.T @ (flat @ v) / len(inputs)  # mean over the batch of g_i (g_i . v)
            return self.unflatten(sums)

        self.num_matvecs += 1
        return self._run(lambda: self._mean_over_batches(batch_product))
