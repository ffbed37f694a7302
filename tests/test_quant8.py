"""8-bit blockwise states (state_dtype=torch.int8, csrc/ops/quant8.h): the codes
and one step of each optimizer against tests/reference_quant8.py (written from
the format's definition), bit for bit: codes, block scales and params."""
from __future__ import annotations

import pytest
import torch

import fusedopt
from fusedopt import functional as F
from fusedopt._kernels import quant8

BLOCK = quant8.BLOCK


from reference_quant8 import SIGNED_MAG, UNSIGNED, adam_math, f32 as _f32, quantize as ref_quantize
from reference_quant8 import dequantize as ref_dequantize


def ref_adam_step(p, g, m, v, vmax, *, wd, **kw):
    return adam_math(p, g, m, v, vmax, weight_decay=wd, **kw)


def _random_block_values(n, signed, gen):
    """Values over many decades, with exact zeros and the block's absmax in place."""
    mag = torch.exp(torch.empty(n).uniform_(-25, 0, generator=gen))
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if signed else torch.ones(n)
    x = (mag * sign).float()
    x[torch.rand(n, generator=gen) < 0.05] = 0.0
    return x


@pytest.mark.parametrize("signed", [True, False])
def test_codes_are_the_nearest_table_entry(signed, seed):
    gen = torch.Generator().manual_seed(seed)
    n = 40 * BLOCK + 17
    x = _random_block_values(n, signed, gen) * float(torch.empty(1).uniform_(1e-8, 1e3, generator=gen))
    # Exact midpoints and table values, in blocks whose absmax is 1 (so x is not rescaled).
    table = SIGNED_MAG if signed else UNSIGNED
    used = table[table <= 1].float()
    mids = ((table[table <= 1][1:] + table[table <= 1][:-1]) / 2).float()
    special = torch.cat([used, mids, torch.tensor([1.0])])
    if signed:
        special = torch.cat([special, -special])
    k = special.numel()
    x[:k] = special
    x[k:BLOCK] = 0.25
    codes = torch.full((n,), 99, dtype=torch.int8)  # poisoned
    absmax = torch.full((quant8.num_blocks(n),), float("nan"))
    fusedopt._C.quantize8(x.data_ptr(), n, codes.data_ptr(), absmax.data_ptr(), signed)
    want_codes, want_absmax = ref_quantize(x, signed)
    assert torch.equal(absmax, want_absmax)
    assert torch.equal(codes, want_codes), (codes != want_codes).nonzero()[:5]
    back = quant8.dequantize(codes, absmax, signed)
    assert torch.equal(back, ref_dequantize(codes, absmax, signed))
    # round to nearest: each value within half a step of its code (relative, of the block absmax)
    err = (back - x).abs() / want_absmax.repeat_interleave(BLOCK)[:n].clamp_min(1e-30)
    # half the step of the top binade: signed e3m4 2^-5 / 2, unsigned e5m3 2^-4 / 2
    assert float(err.max()) <= (2 ** -6 if signed else 2 ** -5) + 1e-7


def test_all_zero_and_nonfinite_blocks(seed):
    x = torch.zeros(2 * BLOCK)
    x[BLOCK + 3] = float("nan")
    codes, absmax = quant8.quantize(x, x, True)
    assert absmax[0] == 0 and torch.isnan(absmax[1])
    back = quant8.dequantize(codes, absmax, True)
    assert torch.equal(back[:BLOCK], torch.zeros(BLOCK)) and torch.isnan(back[BLOCK:]).all()


def _adam_case(dtype, n_params, gen):
    shapes = [(3 * BLOCK + 5,), (7, 11), (BLOCK,), (2, BLOCK + 1)][:n_params]
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(dtype) * 0.1 for s in shapes]
    return params, grads


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, False), (torch.float16, True),
                                          (torch.bfloat16, True)])
@pytest.mark.parametrize("amsgrad,decoupled", [(False, True), (True, False)])
def test_adam_step_equals_the_python_reference(dtype, master, amsgrad, decoupled, seed):
    gen = torch.Generator().manual_seed(seed)
    params, grads = _adam_case(dtype, 4, gen)
    n_states = 3 if amsgrad else 2
    signed = [True, False, False][:n_states]
    # Start from a quantized state of random moments (and step counts 0 and 4).
    fp_states = [[torch.randn(p.shape, generator=gen) * 0.01, torch.rand(p.shape, generator=gen) * 1e-4,
                  torch.rand(p.shape, generator=gen) * 2e-4][:n_states] for p in params]
    codes, absmaxes = [], []
    for p, sts in zip(params, fp_states):
        cs, rows = zip(*[ref_quantize(s, sg) for s, sg in zip(sts, signed)])
        codes.append(list(cs))
        absmaxes.append(torch.stack(rows))
    # Every code of every state once, in the first block of the first param (shuffled):
    # the decoders' special cases (subnormals, the lowest normal binade, the top one).
    for k in range(n_states):
        every = torch.randperm(256, generator=gen).to(torch.uint8).view(torch.int8)
        codes[0][k].view(-1)[:256] = every
    steps = [torch.tensor(float(4 * (i % 2))) for i in range(len(params))]
    masters = [p.float() + torch.randn(p.shape, generator=gen) * 1e-3 for p in params] if master else None
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.1)
    # reference
    want = []
    for i, p in enumerate(params):
        p32 = masters[i].clone() if master else p.float()
        st = [ref_dequantize(c, a, sg) for c, a, sg in zip(codes[i], absmaxes[i], signed)]
        vmax = st[2] if amsgrad else torch.zeros_like(p32)
        p_new, m, v, vm = ref_adam_step(p32, grads[i].float(), st[0], st[1], vmax, t=float(steps[i]) + 1,
                                        decoupled=decoupled, amsgrad=amsgrad, **hyper)
        new_states = [m, v, vm][:n_states]
        q = [ref_quantize(s, sg) for s, sg in zip(new_states, signed)]
        want.append((p_new, [c for c, _ in q], torch.stack([a for _, a in q])))
    # kernel
    got_params = [p.clone() for p in params]
    got_codes = [[c.clone() for c in cs] for cs in codes]
    got_absmax = [a.clone() for a in absmaxes]
    got_master = [m.clone() for m in masters] if master else None
    F.adam(got_params, [g.clone() for g in grads], [c[0] for c in got_codes], [c[1] for c in got_codes],
           [c[2] for c in got_codes] if amsgrad else [], [s.clone() for s in steps], amsgrad=amsgrad,
           beta1=hyper["beta1"], beta2=hyper["beta2"], lr=hyper["lr"], weight_decay=hyper["wd"], eps=hyper["eps"],
           maximize=False, decoupled_weight_decay=decoupled, master_params=got_master, state_dtype=torch.int8,
           absmaxes=got_absmax)
    for i, (p_new, c_new, a_new) in enumerate(want):
        assert torch.equal(got_absmax[i], a_new), i
        for k in range(n_states):
            assert torch.equal(got_codes[i][k], c_new[k]), (i, k, (got_codes[i][k] != c_new[k]).nonzero()[:5])
        if master:
            assert torch.equal(got_master[i], p_new)
        assert torch.equal(got_params[i], p_new.to(dtype)), (i, (got_params[i] - p_new.to(dtype)).abs().max(), (got_params[i] != p_new.to(dtype)).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_step_equals_the_python_reference(dtype, nesterov, seed):
    gen = torch.Generator().manual_seed(seed)
    params, grads = _adam_case(dtype, 3, gen)
    bufs = [ref_quantize(torch.randn(p.shape, generator=gen) * 0.05, True) for p in params]
    lr, mu, wd = 0.1, 0.9, 1e-3
    want = []
    for p, g, (c, a) in zip(params, grads, bufs):
        p32, b = p.float(), ref_dequantize(c, a, True)
        d = g.float() + _f32(wd) * p32
        b = b * _f32(mu) + _f32(1.0) * d
        direction = d + _f32(mu) * b if nesterov else b
        p_new = p32 + _f32(-lr) * direction
        want.append((p_new.to(dtype),) + ref_quantize(b, True))
    got = [p.clone() for p in params]
    got_bufs = [c.clone() for c, _ in bufs]
    got_abs = [a.reshape(1, -1).clone() for _, a in bufs]
    F.sgd(got, [g.clone() for g in grads], got_bufs, weight_decay=wd, momentum=mu, lr=lr, dampening=0.0,
          nesterov=nesterov, maximize=False, state_dtype=torch.int8, momentum_buffer_absmaxes=got_abs)
    for i, (p_new, c_new, a_new) in enumerate(want):
        assert torch.equal(got_abs[i][0], a_new) and torch.equal(got_bufs[i], c_new), i
        assert torch.equal(got[i], p_new), i


def test_sgd_first_step_makes_the_8bit_buffer(seed):
    p = torch.nn.Parameter(torch.randn(2 * BLOCK + 3))
    opt = fusedopt.SGD([p], lr=0.1, momentum=0.9, state_dtype=torch.int8)
    g = torch.randn_like(p)
    p.grad = g.clone()
    before = p.detach().clone()
    opt.step()
    st = opt.state[p]
    assert st["momentum_buffer"].dtype is torch.int8 and st["absmax"].shape == (1, 3)
    codes, absmax = ref_quantize(g, True)  # the first buffer is the grad itself
    assert torch.equal(st["momentum_buffer"], codes) and torch.equal(st["absmax"][0], absmax)
    assert torch.equal(p.detach(), before + _f32(-0.1) * g)


def test_state_memory_is_a_quarter(seed):
    p = torch.nn.Parameter(torch.randn(1024, 1024))
    opt = fusedopt.AdamW([p], state_dtype=torch.int8)
    p.grad = torch.randn_like(p)
    opt.step()
    nbytes = sum(t.numel() * t.element_size() for t in opt.state[p].values() if isinstance(t, torch.Tensor))
    assert nbytes / p.numel() <= 2.1  # 2 code bytes + 2 * 4 / 256 scale bytes + the step


def test_fp64_and_bad_state_are_rejected_before_writing(seed):
    p = torch.nn.Parameter(torch.randn(10, dtype=torch.float64))
    p.grad = torch.randn_like(p)
    opt = fusedopt.Adam([p], state_dtype=torch.int8)
    before = p.detach().clone()
    with pytest.raises(TypeError, match="float64.*8-bit"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state
    with pytest.raises(ValueError, match="state_dtype"):
        fusedopt.LAMB([torch.nn.Parameter(torch.randn(3))], state_dtype=torch.uint8)
    q = torch.randn(300)
    m, v = torch.zeros(300, dtype=torch.int8), torch.zeros(300, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"absmaxes\[0\].*\[2, 2\]"):
        F.adam([q], [torch.randn(300)], [m], [v], [], [torch.tensor(0.0)], amsgrad=False, beta1=0.9, beta2=0.999,
               lr=1e-3, weight_decay=0.0, eps=1e-8, maximize=False, state_dtype=torch.int8,
               absmaxes=[torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="block scales"):
        F.adam([q], [torch.randn(300)], [m], [v], [], [torch.tensor(0.0)], amsgrad=False, beta1=0.9, beta2=0.999,
               lr=1e-3, weight_decay=0.0, eps=1e-8, maximize=False, state_dtype=torch.int8)
    assert torch.equal(m, torch.zeros(300, dtype=torch.int8))


def test_stochastic_rounding_with_8bit_state(seed):
    """The 8-bit drivers store params through the same ParamIO: with stochastic
    rounding, bf16 params under steps far below half an ulp still move; without it
    they stay, and the same seed gives the same bits."""
    def run(sr, seed_=1):
        p = torch.nn.Parameter(torch.ones(4 * BLOCK, dtype=torch.bfloat16))
        opt = fusedopt.SGD([p], lr=1e-4, momentum=0.5, state_dtype=torch.int8, stochastic_rounding=sr, seed=seed_)
        for _ in range(20):
            p.grad = torch.ones_like(p)
            opt.step()
        return p.detach().float()
    nearest, rounded = run(False), run(True)
    assert torch.equal(nearest, torch.ones_like(nearest))  # 1e-4 steps vanish at 1.0 in bf16
    assert float(rounded.mean()) < 1.0 - 1e-3  # the exact drift is about 20 * 2e-4 = 4e-3
    assert torch.equal(rounded, run(True)) and not torch.equal(rounded, run(True, seed_=2))


CUDA_CASES = {
    "AdamW-amsgrad": lambda ps: fusedopt.AdamW(ps, lr=1e-2, amsgrad=True, state_dtype=torch.int8),
    "SGD-nesterov": lambda ps: fusedopt.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, state_dtype=torch.int8),
    "LARS": lambda ps: fusedopt.LARS(ps, lr=0.1, momentum=0.9, weight_decay=1e-3, state_dtype=torch.int8),
    "AdamW-bf16-master": lambda ps: fusedopt.AdamW(ps, lr=1e-2, master_weights=True, state_dtype=torch.int8),
    "AdamW-bf16-sr": lambda ps: fusedopt.AdamW(ps, lr=1e-2, stochastic_rounding=True, seed=7, state_dtype=torch.int8),
}


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(CUDA_CASES))
def test_cuda_matches_cpu_bit_for_bit(case, seed):
    """The CUDA kernels (a warp per block) and the CPU drivers make the same codes,
    scales and params: the same IEEE math without contraction on both sides."""
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if "bf16" in case else torch.float32
    shapes = [(3 * BLOCK + 5,), (70000,), (33, 17), (1,)]  # a tail block, a multi-chunk tensor, a tiny one
    base = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(3)]
    results = []
    for device in ("cpu", "cuda"):
        ps = [torch.nn.Parameter(b.clone().to(device)) for b in base]
        opt = CUDA_CASES[case](ps)
        for step_grads in grads:
            for p, g in zip(ps, step_grads):
                p.grad = g.to(device)
            opt.step()
        results.append(([p.detach().cpu() for p in ps],
                        [{k: v.detach().cpu() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in ps]))
    (cpu_p, cpu_st), (cuda_p, cuda_st) = results
    for i, (a, b) in enumerate(zip(cpu_p, cuda_p)):
        assert torch.equal(a, b), i
    for i, (a, b) in enumerate(zip(cpu_st, cuda_st)):
        for k in a:
            assert torch.equal(a[k], b[k]), (i, k)


def test_kernel_encodes_midpoints_and_edges_like_the_table(seed):
    """A first SGD step stores the grad itself as the buffer: blocks of table values,
    exact midpoints (ties go to the even code), +-0, half the smallest step (2^-10)
    and less, with the block absmax 1 so nothing is rescaled, through every SIMD
    path of the encoder."""
    used = SIGNED_MAG[SIGNED_MAG <= 1]
    mids = (used[1:] + used[:-1]) / 2
    special = torch.cat([used, mids, torch.tensor([2.0 ** -11, 2.0 ** -12, 3 * 2.0 ** -11, 2.0 ** -20, 0.0, -0.0])]).float()
    special = torch.cat([special, -special])
    gen = torch.Generator().manual_seed(seed)
    special = special[torch.randperm(special.numel(), generator=gen)]
    n = special.numel()
    g = torch.cat([special, torch.ones(1)])  # absmax 1 in every block: one 1.0 per block
    blocks = []
    for b in range(0, g.numel(), BLOCK - 1):
        blocks.append(torch.cat([g[b:b + BLOCK - 1], torch.ones(1)]))
    g = torch.cat(blocks)
    p = torch.nn.Parameter(torch.zeros(g.numel()))
    p.grad = g.clone()
    opt = fusedopt.SGD([p], lr=0.1, momentum=0.9, state_dtype=torch.int8)
    opt.step()
    codes, absmax = ref_quantize(g, True)
    assert torch.equal(opt.state[p]["absmax"][0], absmax) and bool((absmax == 1).all())
    assert torch.equal(opt.state[p]["momentum_buffer"], codes), n


@pytest.mark.cuda
@pytest.mark.parametrize("weight_decay", [0.0, 0.05], ids=["no-trust-ratio", "trust-ratio"])
def test_cuda_lamb_matches_cpu(weight_decay, seed):
    """LAMB with 8-bit m, v on CUDA and CPU: the same codes and scales (m and v do not
    depend on the trust ratio); params to rounding, as the ratio's sums are added in
    another order on each side."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3 * BLOCK + 5,), (70000,), (33, 17)]
    base = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    out = []
    for device in ("cpu", "cuda"):
        ps = [torch.nn.Parameter(b.clone().to(device)) for b in base]
        opt = fusedopt.LAMB(ps, lr=1e-2, weight_decay=weight_decay, state_dtype=torch.int8)
        for step_grads in grads:
            for p, g in zip(ps, step_grads):
                p.grad = g.to(device)
            opt.step()
        out.append((ps, opt))
    (cp, co), (gp, go) = out
    for p, q in zip(cp, gp):
        for k in ("exp_avg", "exp_avg_sq", "absmax"):
            assert torch.equal(co.state[p][k], go.state[q][k].cpu()), k
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-5, atol=1e-6)
