"""Plain-torch references: LARS and LAMB (which torch.optim lacks), and
fusedopt's mixed-precision contract (MixedPrecisionReference) over any of them.

RefLARS and RefLAMB are written from the formulas in the docstrings of
fusedopt.LARS and fusedopt.LAMB, one tensor at a time, in fp64 (the result is
stored back in the param's dtype, so an fp64 param gets an fp64 trajectory and
an fp32 param an fp32 one). They are torch.optim.Optimizer subclasses:
``step()`` reads ``p.grad`` (params without a grad are skipped), ``state[p]``
holds the same keys as the fused optimizer (same dtypes for fp32/fp64 params),
so the suites driven by tests/optim_registry.py can compare state too.
``foreach`` is accepted and ignored, as the registry passes it to torch.optim.

The ratios are computed on 0-d fp64 tensors, not Python floats, so that a
division by zero (trust_clip with lr = 0) or a non-finite norm follows IEEE
rules exactly as the C++ code does. "r = 1 where a norm is 0" is written as
``pn > 0 and gn > 0`` (as in csrc/ops and timm): a NaN norm also gives r = 1.
"""
from __future__ import annotations

import torch


def _f64(x: float) -> torch.Tensor:
    return torch.tensor(float(x), dtype=torch.float64)


def _where(cond: torch.Tensor, a, b) -> torch.Tensor:
    return torch.where(cond, torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))


class RefLARS(torch.optim.Optimizer):
    """fusedopt.LARS's docstring formulas, per tensor, fp64 math."""

    def __init__(self, params, lr=1.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 trust_coeff=0.001, eps=1e-8, trust_clip=False, always_adapt=False, foreach=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip,
                                      always_adapt=always_adapt))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd, mom = float(group["lr"]), group["weight_decay"], group["momentum"]
            adapt = wd != 0 or group["always_adapt"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                x, g = p.double(), p.grad.double()
                d = g + wd * x if wd != 0 else g
                if adapt:
                    pn, gn = x.norm(), g.norm()
                    r = _where((pn > 0) & (gn > 0), group["trust_coeff"] * pn / (gn + wd * pn + group["eps"]), 1.0)
                    if group["trust_clip"]:
                        q = r / _f64(lr)  # IEEE: lr = 0 gives inf or nan, both clip to 1
                        r = _where(q < 1.0, q, 1.0)
                    d = d * r
                if mom != 0:
                    st = self.state[p]
                    if "momentum_buffer" not in st:
                        b = d.clone()
                    else:
                        b = mom * st["momentum_buffer"].double() + (1 - group["dampening"]) * d
                    st["momentum_buffer"] = b.to(p.dtype)
                    d = d + mom * b if group["nesterov"] else b
                p.copy_((x - lr * d).to(p.dtype))


class RefLAMB(torch.optim.Optimizer):
    """fusedopt.LAMB's docstring formulas, per tensor, fp64 math.

    The clipping norm covers every grad of every group (all params are on one
    device here); the step count is kept per param (``state[p]['step']``, an
    fp32 scalar tensor) as in torch.optim.Adam and fusedopt.LAMB.
    """

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 grad_averaging=True, max_grad_norm=1.0, trust_clip=False, always_adapt=False,
                 decoupled_decay=False, foreach=None):
        super().__init__(params, dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                                      weight_decay=weight_decay, grad_averaging=grad_averaging,
                                      max_grad_norm=max_grad_norm, trust_clip=trust_clip,
                                      always_adapt=always_adapt, decoupled_decay=decoupled_decay))
        # A bf16-state reference rounds m, v as stored before u is formed from
        # them, as fusedopt.LAMB does with state_dtype=torch.bfloat16.
        self.round_state = lambda t: t

    @torch.no_grad()
    def step(self):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        total = torch.stack([g.double().square().sum() for g in grads]).sum().sqrt() if grads else _f64(0.0)
        for group in self.param_groups:
            lr, wd = float(group["lr"]), group["weight_decay"]
            b1, b2 = (float(b) for b in group["betas"])
            b3 = 1 - b1 if group["grad_averaging"] else 1.0
            if group["max_grad_norm"] is None:
                c = _f64(1.0)
            else:
                c = total / group["max_grad_norm"]
                c = _where(c < 1.0, 1.0, c)  # NaN stays NaN
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                st["step"] += 1
                t = float(st["step"])
                x, g = p.double(), p.grad.double() / c
                m = self.round_state(b1 * st["exp_avg"].double() + b3 * g)
                v = self.round_state(b2 * st["exp_avg_sq"].double() + (1 - b2) * g * g)
                st["exp_avg"].copy_(m)
                st["exp_avg_sq"].copy_(v)
                bc1, bc2 = (1 - b1 ** t, 1 - b2 ** t) if group["bias_correction"] else (1.0, 1.0)
                u = (m / bc1) / (v.sqrt() / bc2 ** 0.5 + group["eps"])
                if wd != 0:
                    if group["decoupled_decay"]:
                        x = x * (1 - lr * wd)
                    else:
                        u = u + wd * x
                if wd != 0 or group["always_adapt"]:
                    pn, un = x.norm(), u.norm()
                    r = _where((pn > 0) & (un > 0), pn / un, 1.0)
                    if group["trust_clip"]:
                        r = _where(r < 1.0, r, 1.0)
                    u = u * r
                p.copy_((x - lr * u).to(p.dtype))


class MixedPrecisionReference:
    """fusedopt's master_weights / state_dtype contract, written out.

    Every param p has an fp32 copy, the master, updated by ``make_inner(masters,
    **hyper)``: the optimizer's fp32 math (torch.optim or the classes above on
    fp32 tensors). After each step p is the master rounded to nearest even
    (``Tensor.to``). Without master weights the master is p itself, re-read
    before each step: what rounding to p's dtype loses stays lost. With
    ``state_dtype=torch.bfloat16`` every state tensor of p's shape is stored
    rounded to bf16: after the step for SGD/Adam/AdamW/LARS (the step used the
    unrounded values), before u is formed for LAMB (``round_state``).
    ``masters[i]`` and ``state(i)`` expose the reference's values.
    """

    def __init__(self, make_inner, params, *, master_weights=False, state_dtype=None, **hyper):
        self.params = list(params)
        self.masters = [p.detach().float().clone() for p in self.params]
        self.inner = make_inner(self.masters, **hyper)
        self.master_weights = master_weights
        self.round_state = state_dtype is torch.bfloat16
        if self.round_state and hasattr(self.inner, "round_state"):
            self.inner.round_state = lambda t: t.bfloat16().to(t.dtype)

    def state(self, i: int) -> dict:
        return self.inner.state[self.masters[i]]

    @torch.no_grad()
    def step(self):
        for p, m in zip(self.params, self.masters):
            if not self.master_weights:
                m.copy_(p)
            m.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        for i, (p, m) in enumerate(zip(self.params, self.masters)):
            if self.round_state:
                for key, v in self.state(i).items():
                    if key != "step" and torch.is_tensor(v) and v.shape == m.shape:
                        v.copy_(v.bfloat16())
            p.copy_(m)


def drift_tol(dtype: torch.dtype, steps: int, scale: float = 1.0, roundings: int = 2):
    """(rtol, atol) for two implementations of the same math in ``dtype`` after ``steps`` steps.

    Each step rounds a few results on each side, and the two may land on
    different neighbours: ``roundings`` eps (the dtype's machine epsilon) of
    relative difference per step, added up over the steps. ``scale``: the
    tensor's magnitude; an element near zero carries the rounding of the larger
    terms it came from, so atol = rtol * scale.
    """
    rtol = roundings * steps * torch.finfo(dtype).eps
    return rtol, rtol * scale


def muon_matrix_step(p, g, buf, *, lr, weight_decay, momentum, nesterov, ns_coefficients=(3.4445, -4.775, 2.0315),
                     ns_steps=5, eps=1e-7, adjust_lr_fn=None):
    """torch.optim.Muon's step written from fusedopt.Muon's docstring, one matrix
    (``p.view(p.shape[0], -1)``), fp64. Returns (new p, new buffer) in fp64."""
    import math
    g, buf, p = g.double(), buf.double(), p.double()
    buf = buf + (1 - momentum) * (g - buf)
    u = g + momentum * (buf - g) if nesterov else buf
    x = u.reshape(u.shape[0], -1)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / torch.clamp(torch.linalg.norm(x), min=eps)
    a, b, c = ns_coefficients
    for _ in range(ns_steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = (x.T if tall else x).reshape(p.shape)
    rows, cols = p.shape[0], p.numel() // max(p.shape[0], 1)
    ratio = 0.2 * math.sqrt(max(rows, cols)) if adjust_lr_fn == "match_rms_adamw" else (math.sqrt(max(1, rows / cols)) if cols else 1.0)
    return p * (1 - lr * weight_decay) - lr * ratio * x, buf


class RefMuon(torch.optim.Optimizer):
    """fusedopt.Muon's docstring formulas: matrices (2 or more dims) by Muon in fp64
    (``muon_matrix_step``), every other param by AdamW (``torch.optim.AdamW``,
    foreach=False, with the same lr, betas, eps and weight_decay). State: the
    fused optimizer's keys (``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``)."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None,
                 betas=(0.9, 0.999), ns_dtype=None, foreach=None, **_):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
                                      adjust_lr_fn=adjust_lr_fn, betas=betas))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr = float(group["lr"])
            vectors = [p for p in group["params"] if p.grad is not None and p.dim() < 2]
            if vectors:
                self._adamw_step(group, vectors, lr)
            for p in group["params"]:
                if p.grad is None or p.dim() < 2:
                    continue
                st = self.state[p]
                buf = st.get("momentum_buffer")
                if buf is None:
                    buf = st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                new_p, new_buf = muon_matrix_step(
                    p, p.grad, buf, lr=lr, weight_decay=group["weight_decay"], momentum=group["momentum"],
                    nesterov=group["nesterov"], ns_coefficients=group["ns_coefficients"],
                    ns_steps=group["ns_steps"], eps=group["eps"], adjust_lr_fn=group["adjust_lr_fn"])
                p.copy_(new_p)
                buf.copy_(new_buf)

    def _adamw_step(self, group, params, lr):
        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        from torch.optim.adam import adam as torch_adam
        torch_adam(params, [p.grad for p in params], [st["exp_avg"] for st in states],
                              [st["exp_avg_sq"] for st in states], [], [st["step"] for st in states],
                              foreach=False, decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2,
                              lr=lr, weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
