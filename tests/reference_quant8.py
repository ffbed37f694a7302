"""The reference of 8-bit blockwise states (state_dtype=torch.int8), written from
the format's definition (README "8-bit states", csrc/ops/quant8.h), not from the
kernel's bit tricks: the codes' values as a table, the nearest entry by
comparing with the midpoints (ties to the even code), the block absmax by
``amax``; and Adam's and SGD's fp32 steps as separate torch ops in the order of
csrc/ops/adam.h and sgd.h, so a kernel must agree bit for bit.

Two torch ops are avoided because they are not the IEEE operation on this
torch: fp32 ``sqrt`` (taken in fp64 and rounded, which is exact for a square
root) and division by a 0-d tensor (torch multiplies by its reciprocal).

RefAdam8bit, RefAdamW8bit and RefSGD8bit are torch.optim.Optimizer subclasses
with fusedopt's state keys (int8 codes, ``absmax``), for the registry suites.
"""
from __future__ import annotations

import math

import torch

from fusedopt._kernels.quant8 import BLOCK, num_blocks


def _table(exp_bits: int, mant_bits: int) -> torch.Tensor:
    """The values of the codes 0 .. 2^(exp_bits + mant_bits) - 1 of a small float
    whose top exponent field stands for 2^0 (fp64, exact)."""
    top = 2 ** exp_bits - 1
    vals = []
    for code in range(2 ** (exp_bits + mant_bits)):
        field, mant = divmod(code, 2 ** mant_bits)
        if field == 0:
            vals.append(mant / 2 ** mant_bits * 2.0 ** (1 - top))
        else:
            vals.append((1 + mant / 2 ** mant_bits) * 2.0 ** (field - top))
    return torch.tensor(vals, dtype=torch.float64)


SIGNED_MAG = _table(3, 4)  # the 7 bits under the sign bit
UNSIGNED = _table(5, 3)


def _nearest(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry (of those <= 1) to each x, clamped to [0, 1];
    a tie goes to the even index. NaN gives some valid index."""
    x = torch.nan_to_num(x.to(torch.float64), nan=0.0).clamp(0.0, 1.0)
    used = table[table <= 1.0]
    mid = (used[1:] + used[:-1]) / 2
    idx = torch.bucketize(x, mid, right=False)  # the number of midpoints below x
    tie = (idx < len(mid)) & (x == mid[idx.clamp(max=len(mid) - 1)])
    return torch.where(tie & (idx % 2 == 1), idx + 1, idx)


def encode(x: torch.Tensor, signed: bool) -> torch.Tensor:
    if signed:
        mag = _nearest(SIGNED_MAG, x.abs())
        return ((x < 0).to(torch.int64) * 128 + mag).to(torch.uint8).view(torch.int8)  # -0, NaN: +0's code
    return _nearest(UNSIGNED, x).to(torch.uint8).view(torch.int8)


def decode(codes: torch.Tensor, signed: bool) -> torch.Tensor:
    c = codes.view(torch.uint8).to(torch.int64)
    if signed:
        v = SIGNED_MAG[c % 128]
        return torch.where(c >= 128, -v, v).to(torch.float32)
    return UNSIGNED[c].to(torch.float32)


def _per_element(per_block: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return per_block.repeat_interleave(BLOCK)[:like.numel()].reshape(like.shape)


def block_absmax(values: torch.Tensor) -> torch.Tensor:
    """The block scales: max |v| per block, 0 where that is below the smallest normal
    fp32, NaN where a block holds a NaN."""
    flat = values.reshape(-1).to(torch.float32)
    pad = torch.zeros(num_blocks(flat.numel()) * BLOCK, dtype=torch.float32)
    pad[:flat.numel()] = flat
    blocks = pad.abs().reshape(-1, BLOCK)
    amax = blocks.amax(dim=1)
    amax = torch.where(amax < torch.finfo(torch.float32).tiny, torch.zeros_like(amax), amax)  # subnormal: 0
    return torch.where(blocks.isnan().any(dim=1), torch.full((blocks.shape[0],), float("nan")), amax)


def quantize(values: torch.Tensor, signed: bool):
    """(codes, absmax) of fp32 values in memory order: x = value * (1 / absmax), nearest code."""
    absmax = block_absmax(values)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    return encode(values * _per_element(inv, values), signed), absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    return decode(codes, signed) * _per_element(absmax, codes)


def f32(x: float) -> torch.Tensor:
    return torch.tensor(float(x), dtype=torch.float32)


def _div_scalar(a: torch.Tensor, x: float) -> torch.Tensor:
    return a / torch.full_like(a, x)


def _sqrt(a: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(a.double()).float()


def adam_math(p, g, m, v, vmax, *, lr, beta1, beta2, eps, weight_decay, t, decoupled, amsgrad, maximize=False,
              eps_inside_sqrt=False, grad_scale=1.0):
    """One fp32 Adam/AdamW step, op for op as csrc/ops/adam.h (scalars in fp64, then fp32)."""
    bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
    g = _div_scalar(g, grad_scale)
    if maximize:
        g = -g
    if not decoupled and weight_decay != 0:
        g = g + f32(weight_decay) * p
    if decoupled and weight_decay != 0:
        p = p * f32(1 - lr * weight_decay)
    w = f32(1 - beta1)
    m = m + w * (g - m) if float(w) < 0.5 else g - (g - m) * (f32(1) - w)
    v = v * f32(beta2)
    v = v + f32(1 - beta2) * g * g
    if amsgrad:
        vmax = torch.maximum(vmax, v)
    second = vmax if amsgrad else v
    if eps_inside_sqrt:
        denom = _sqrt(_div_scalar(second, bc2) + f32(eps))
    else:
        denom = _div_scalar(_sqrt(second), math.sqrt(bc2)) + f32(eps)
    p = p + f32(-(lr / bc1)) * m / denom
    return p, m, v, vmax


def sgd_math(p, g, buf, first, *, lr, momentum, dampening, weight_decay, nesterov, maximize=False, grad_scale=1.0):
    """One fp32 SGD step, op for op as csrc/ops/sgd.h."""
    g = _div_scalar(g, grad_scale)
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g + f32(weight_decay) * p
    if momentum == 0:
        return p + f32(-lr) * g, buf
    buf = g if first else buf * f32(momentum) + f32(1 - dampening) * g
    d = g + f32(momentum) * buf if nesterov else buf
    return p + f32(-lr) * d, buf


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.as_strided((t.numel(),), (1,))  # memory order (dense params)


def _store_buffer(st: dict, p: torch.Tensor, values: torch.Tensor) -> None:
    """A momentum buffer's fp32 values (memory order) as int8 codes like p and its absmax row."""
    codes, absmax = quantize(values, True)
    st["momentum_buffer"] = torch.empty_like(p, dtype=torch.int8, memory_format=torch.preserve_format)
    _flat(st["momentum_buffer"]).copy_(codes)
    st["absmax"] = absmax.reshape(1, -1)


class _Ref8bit(torch.optim.Optimizer):
    """Params of any float dtype but fp64: the math in fp32 on flat views in memory
    order, the param stored back in its dtype (round to nearest even)."""

    @staticmethod
    def _load(p):
        return _flat(p.detach()).to(torch.float32)

    @staticmethod
    def _store(p, value):
        _flat(p.detach()).copy_(value.to(p.dtype))

    def load_state_dict(self, state_dict):
        # torch.optim casts floating params' state to the param's dtype: codes and absmax back
        super().load_state_dict(state_dict)
        for st in self.state.values():
            for k, v in list(st.items()):
                if k == "absmax":
                    st[k] = v.to(torch.float32)
                elif k != "step" and isinstance(v, torch.Tensor):
                    st[k] = v.to(torch.int8)


class RefAdam8bit(_Ref8bit):
    SIGNED = (True, False, False)
    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 maximize=False, eps_inside_sqrt=False, state_dtype=None, foreach=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                                      maximize=maximize, eps_inside_sqrt=eps_inside_sqrt))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = (float(b) for b in group["betas"])
            keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")[:3 if group["amsgrad"] else 2]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    for k in keys:
                        st[k] = torch.zeros_like(p, dtype=torch.int8, memory_format=torch.preserve_format)
                    st["absmax"] = torch.zeros(len(keys), num_blocks(p.numel()))
                vals = [dequantize(_flat(st[k]), st["absmax"][j], self.SIGNED[j]) for j, k in enumerate(keys)]
                vmax = vals[2] if group["amsgrad"] else torch.zeros_like(vals[0])
                t = float(st["step"]) + 1
                new_p, m, v, vm = adam_math(self._load(p), self._load(p.grad), vals[0], vals[1], vmax,
                                            lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                                            weight_decay=group["weight_decay"], t=t, decoupled=self.decoupled,
                                            amsgrad=group["amsgrad"], maximize=group["maximize"],
                                            eps_inside_sqrt=group["eps_inside_sqrt"])
                self._store(p, new_p)
                st["step"].fill_(t)
                for j, (k, value) in enumerate(zip(keys, (m, v, vm))):
                    codes, absmax = quantize(value, self.SIGNED[j])
                    _flat(st[k]).copy_(codes)
                    st["absmax"][j] = absmax


class RefAdamW8bit(RefAdam8bit):
    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, **kw):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, **kw)


class RefSGD8bit(_Ref8bit):
    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, state_dtype=None, foreach=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                first = "momentum_buffer" not in st
                buf = None if first else dequantize(_flat(st["momentum_buffer"]), st["absmax"][0], True)
                new_p, buf = sgd_math(self._load(p), self._load(p.grad), buf, first, lr=float(group["lr"]),
                                      momentum=mu, dampening=group["dampening"],
                                      weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                                      maximize=group["maximize"])
                self._store(p, new_p)
                if mu != 0:
                    _store_buffer(st, p, buf)


class RefLARS8bit(_Ref8bit):
    """LARS with 8-bit buffers, for the registry suites. LARS's math is not rewritten
    here: each step runs fusedopt's fp32-state LARS (itself checked against the fp64
    RefLARS in tests/reference_optim.py) on the group's params in the same order as
    the optimizer calls it (so the per-tensor norms are summed in the same order),
    with the buffers dequantized by this module, and quantizes the new buffers with
    this module's codec. What it checks is the 8-bit path: blocks, codes, scales,
    first steps and NaN blocks."""

    def __init__(self, params, lr=1.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 trust_coeff=0.001, eps=1e-8, trust_clip=False, always_adapt=False, *, state_dtype=None, foreach=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip,
                                      always_adapt=always_adapt))

    @torch.no_grad()
    def step(self):
        from fusedopt import functional
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            mu = group["momentum"]
            bufs = []
            for p in params:
                st = self.state[p]
                if "momentum_buffer" in st:
                    values = dequantize(_flat(st["momentum_buffer"]), st["absmax"][0], True)
                    buf = torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    _flat(buf).copy_(values)
                    bufs.append(buf)
                else:
                    bufs.append(None)
            hyper = {k: group[k] for k in ("momentum", "dampening", "weight_decay", "nesterov", "trust_coeff", "eps",
                                           "trust_clip", "always_adapt")}
            functional.lars(params, [p.grad for p in params], bufs, lr=group["lr"], state_dtype=torch.float32,
                            **hyper)
            if mu == 0:
                continue
            for p, buf in zip(params, bufs):
                _store_buffer(self.state[p], p, _flat(buf))


class RefLAMB8bit(_Ref8bit):
    """LAMB with 8-bit m, v: fp32 math op for op as csrc/ops/lamb.h (u from m, v as
    stored, i.e. decoded again after encoding), the trust ratio from fp64 sums of
    the fp32 p'^2 and u^2. The kernels sum in fp32 lanes: the ratio, hence the
    params, agree to about 1e-6 relative, not bit for bit; m and v do not depend on
    the ratio, so the codes and scales agree exactly (without clipping; with it the
    divisor's own rounding may differ)."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 grad_averaging=True, max_grad_norm=1.0, trust_clip=False, always_adapt=False,
                 decoupled_decay=False, *, state_dtype=None, foreach=None):
        super().__init__(params, dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                                      weight_decay=weight_decay, grad_averaging=grad_averaging,
                                      max_grad_norm=max_grad_norm, trust_clip=trust_clip,
                                      always_adapt=always_adapt, decoupled_decay=decoupled_decay))

    @torch.no_grad()
    def step(self):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        total = math.sqrt(sum(float(g.double().square().sum()) for g in grads)) if grads else 0.0
        for group in self.param_groups:
            lr, wd = float(group["lr"]), group["weight_decay"]
            b1, b2 = (float(b) for b in group["betas"])
            b3 = 1 - b1 if group["grad_averaging"] else 1.0
            divisor = 1.0
            if group["max_grad_norm"] is not None:
                c = total / group["max_grad_norm"]
                divisor = c if not c < 1.0 else 1.0
            decoupled = group["decoupled_decay"] and wd != 0
            adapts = wd != 0 or group["always_adapt"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    for k in ("exp_avg", "exp_avg_sq"):
                        st[k] = torch.zeros_like(p, dtype=torch.int8, memory_format=torch.preserve_format)
                    st["absmax"] = torch.zeros(2, num_blocks(p.numel()))
                t = float(st["step"]) + 1
                x, g = self._load(p), _div_scalar(self._load(p.grad), divisor)
                m = dequantize(_flat(st["exp_avg"]), st["absmax"][0], True)
                v = dequantize(_flat(st["exp_avg_sq"]), st["absmax"][1], False)
                m = f32(b1) * m + f32(b3) * g
                v = f32(b2) * v + f32(1 - b2) * g * g
                (mc, ma), (vc, va) = quantize(m, True), quantize(v, False)
                _flat(st["exp_avg"]).copy_(mc)
                _flat(st["exp_avg_sq"]).copy_(vc)
                st["absmax"] = torch.stack([ma, va])
                m, v = dequantize(mc, ma, True), dequantize(vc, va, False)  # as stored
                bc1, bc2 = (1 - b1 ** t, 1 - b2 ** t) if group["bias_correction"] else (1.0, 1.0)
                u = _div_scalar(m, bc1) / (_div_scalar(_sqrt(v), math.sqrt(bc2)) + f32(group["eps"]))
                if wd != 0 and not decoupled:
                    u = u + f32(wd) * x
                xd = x * f32(1 - lr * wd) if decoupled else x
                r = 1.0
                if adapts:
                    pn, un = math.sqrt(float(xd.double().square().sum())), math.sqrt(float(u.double().square().sum()))
                    r = pn / un if (pn > 0 and un > 0) else 1.0
                    if group["trust_clip"]:
                        r = r if r < 1.0 else 1.0
                self._store(p, xd + f32(-lr) * (u * f32(r)))
                st["step"].fill_(t)
