"""Stochastic rounding of fp16/bf16 params without master weights (README
"Stochastic rounding", csrc/ops/stochastic_round.h).

- the issue's acceptance test: steps far below half an ulp drift like their exact
  sum, where round-to-nearest does not move at all;
- the rounding itself: exactly unbiased over the random words, always one of the
  two neighbours, exact values stay exact, specials (inf, NaN, overflow, fp16
  subnormals) as documented;
- the bits: a function of (call seed, position of the param in the call, index in
  the param) only, checked against an independent numpy implementation of the
  documented generator, so independent of threads and chunking;
- every optimizer with it stays within one 16-bit ulp of the fp32 reference step;
- refused combinations leave everything bit-identical;
- the seed's device form (int64 words [seed, step, stream] the kernel reads, what the
  optimizer classes keep in group['rounding_state']): bit-identical to the host-int
  seed for every optimizer, continued across a state_dict round trip, step 0 for
  checkpoints without it, and refused (nothing written) when malformed.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import fusedopt
from fusedopt import _C
from fusedopt import functional as F
from fusedopt._kernels import DTYPE_CODES
from optim_registry import BY_NAME, snapshot, value_bits

SIXTEEN = [torch.bfloat16, torch.float16]
MANTISSA = {torch.bfloat16: 7, torch.float16: 10}
MIN_EXP = {torch.bfloat16: -126, torch.float16: -14}
CHUNK = 32768  # the CPU drivers' chunk (csrc/cpu/multi_tensor_cpu.h)


def dtype_id(d):
    return str(d).split(".")[-1]


# ---- an independent model of the documented generator and rounding ---------------------

GAMMA = np.uint64(0x9E3779B97F4A7C15)


def np_mix64(z):
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def np_bits(call_seed: int, salt: int, n: int) -> np.ndarray:
    """rounding_bits(rounding_row_key(call_seed, row with salt), i) for i < n."""
    with np.errstate(over="ignore"):
        key = np_mix64(np.uint64(call_seed) ^ np_mix64(np.uint64(salt) + GAMMA))
        idx = np.arange(1, n + 1, dtype=np.uint64)
        return (np_mix64(key + idx * GAMMA) >> np.uint64(32)).astype(np.uint32)


def neighbours(x: torch.Tensor, dtype: torch.dtype):
    """(toward zero, away from zero) 16-bit neighbours of fp32 x, in float64, and the
    ulp between them, from the format's parameters alone."""
    x = x.double()
    _, e = torch.frexp(x.abs())
    exp = torch.clamp(e - 1, min=MIN_EXP[dtype])
    ulp = torch.ldexp(torch.ones_like(x), exp - MANTISSA[dtype])
    lo = torch.trunc(x.abs() / ulp) * ulp
    return torch.copysign(lo, x), torch.copysign(lo + ulp, x), ulp


def round_with(x: torch.Tensor, words: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """_C's stochastic rounding of fp32 x with the given random words, as float64."""
    bits = _C.stochastic_round(x.float().numpy(), words.astype(np.uint32), DTYPE_CODES[dtype])
    return torch.from_numpy(bits.astype(np.int16)).view(dtype).double()


def sgd_sr(params, grads, seed, lr=1.0, **kw):
    F.sgd(params, grads, [None] * len(params), weight_decay=0.0, momentum=0.0, lr=lr, dampening=0.0,
          nesterov=False, maximize=False, stochastic_rounding=True, rounding_seed=seed, **kw)


def exact_inputs(n, dtype, gen):
    """bf16/fp16 params in [1, 2) and grads in [2^-12, 2^-8): with lr=1, p - g is exact in
    fp32 (exponents at most 12 apart), so the kernel's fp32 result is known bit for bit."""
    p = (1 + torch.rand(n, generator=gen)).to(dtype)
    g = torch.ldexp(1 + torch.rand(n, generator=gen), torch.randint(-12, -8, (n,), generator=gen)).to(dtype)
    return p, g


# ---- (a) the acceptance test -------------------------------------------------------------

@pytest.mark.parametrize("dtype", SIXTEEN, ids=dtype_id)
def test_tiny_updates_drift_like_their_exact_sum(dtype, seed):
    """SGD, lr 1, grads ~1e-4 (far below half an ulp of 1.0) for 100 steps from 1.0:
    round-to-nearest never moves; stochastic rounding drifts like the exact sum."""
    n, steps = 1 << 18, 100
    gen = torch.Generator().manual_seed(seed)
    g = (1e-4 * (0.5 + torch.rand(n, generator=gen))).to(dtype)
    exact = 1.0 - steps * g.double()  # the grads as stored, summed exactly
    nearest = torch.ones(n, dtype=dtype)
    sr = torch.ones(n, dtype=dtype)
    base = int(torch.randint(0, 2**62, (1,), generator=gen))
    for s in range(steps):
        F.sgd([nearest], [g], [None], weight_decay=0.0, momentum=0.0, lr=1.0, dampening=0.0, nesterov=False,
              maximize=False)
        sgd_sr([sr], [g], F.stochastic_rounding_seed(base, s))
    assert (nearest == 1.0).all(), "round to nearest moved: the updates are not below half an ulp"
    drift, want = 1.0 - sr.double().mean(), 1.0 - exact.mean()  # ~0.01
    assert abs(drift - want) <= 0.03 * want, f"mean drift {drift:.6f}, exact {want:.6f}"
    assert not sr.isnan().any()


# ---- (b) the rounding: unbiased, neighbours, exact values, specials ----------------------

def draws(dtype, gen, n=200):
    """fp32 values over the 16-bit format's range, both signs, fp16 subnormals included."""
    lo = -30 if dtype is torch.float16 else -130
    hi = 15 if dtype is torch.float16 else 126
    x = torch.ldexp(1 + torch.rand(n, generator=gen), torch.randint(lo, hi, (n,), generator=gen))
    return x * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)


@pytest.mark.parametrize("dtype", SIXTEEN, ids=dtype_id)
def test_rounding_is_unbiased_over_all_random_words(dtype, seed):
    """For each x, over 2^16 evenly spread random words, the rounding goes up for the
    fraction of words equal to x's distance to its lower neighbour in ulps (exactly,
    up to one word where x has more fraction bits than 16), and only to a neighbour."""
    gen = torch.Generator().manual_seed(seed)
    x = draws(dtype, gen)
    x = x[x.abs() < (3.3e38 if dtype is torch.bfloat16 else 65504.0)]
    words = (np.arange(1 << 16, dtype=np.uint64) << np.uint64(16)).astype(np.uint32)
    lo, hi, ulp = neighbours(x, dtype)
    for k in range(len(x)):
        got = round_with(x[k].repeat(len(words)), words, dtype)
        up = got == hi[k]
        assert ((got == lo[k]) | up).all(), f"x={x[k].item()!r}: a result is not a neighbour"
        want = float((x[k].double().abs() - lo[k].abs()) / ulp[k]) * len(words)
        assert abs(int(up.sum()) - want) <= 1, f"x={x[k].item()!r}: {int(up.sum())} ups, want {want}"


@pytest.mark.parametrize("dtype", SIXTEEN, ids=dtype_id)
def test_representable_values_stay_exact(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = draws(dtype, gen, 5000).to(dtype).float()  # exactly representable
    words = np.random.default_rng(seed).integers(0, 2**32, len(x), dtype=np.uint64)
    assert torch.equal(round_with(x, words, dtype), x.double())
    assert torch.equal(round_with(x, np.full(len(x), 2**32 - 1, np.uint64), dtype), x.double())


@pytest.mark.parametrize("dtype", SIXTEEN, ids=dtype_id)
def test_special_values(dtype, seed):
    """inf and NaN preserved; overflow exactly where round-to-nearest overflows (the
    largest finite otherwise); signed zeros kept; tiny values round to 0 or the least
    subnormal."""
    info = torch.finfo(dtype)
    big = float(info.max)
    half_ulp_above = big + float(info.eps) * 2 ** float(np.floor(np.log2(big))) / 2  # RNE's overflow threshold
    rng = np.random.default_rng(seed)
    words = np.concatenate([[0, 2**32 - 1], rng.integers(0, 2**32, 62, dtype=np.uint64)])
    tiny = float(info.smallest_normal) * 2.0 ** -MANTISSA[dtype]  # least subnormal
    below = np.nextafter(np.float32(half_ulp_above), np.float32(0))
    cases = {float("inf"): float("inf"), -float("inf"): -float("inf"), big: big, -big: -big,
             float(below): big, half_ulp_above: float("inf"), -half_ulp_above: -float("inf")}
    for value, want in cases.items():
        got = round_with(torch.full((len(words),), value), words, dtype)
        assert (got == want).all(), f"{value!r} -> {got.unique().tolist()}, want {want}"
    nan = round_with(torch.full((len(words),), float("nan")), words, dtype)
    assert nan.isnan().all()
    for z in (0.0, -0.0):
        got = round_with(torch.full((len(words),), z), words, dtype)
        assert (got == 0).all() and (torch.signbit(got) == (np.copysign(1.0, z) < 0)).all()
    frac = torch.rand(len(words), generator=torch.Generator().manual_seed(seed)).clamp(min=1e-3)
    for x in (frac * tiny, torch.full((len(words),), min(1e-40, 0.4 * tiny))):  # and an fp32 subnormal
        got = round_with(x, words, dtype)
        assert ((got == 0) | (got == tiny)).all()


def test_kernel_rounding_is_unbiased_in_the_mean(seed):
    """Through the SGD kernel: many copies of one fp32 result x average to x (within 6
    sigma of the binomial spread), for several positions of x between its neighbours."""
    gen = torch.Generator().manual_seed(seed)
    n = 1 << 16
    for dtype in SIXTEEN:
        p, g = exact_inputs(8, dtype, gen)
        params = [p[k].repeat(n) for k in range(8)]
        sgd_sr(params, [g[k].repeat(n) for k in range(8)], int(torch.randint(0, 2**62, (1,), generator=gen)))
        for k in range(8):
            x = p[k].float() - g[k].float()
            lo, hi, ulp = neighbours(x.reshape(1), dtype)
            got = params[k].double()
            assert ((got == lo) | (got == hi)).all()
            f = float((x.double().abs() - lo.abs()) / ulp)
            sigma = float(ulp) * (max(f * (1 - f), 1e-4) / n) ** 0.5
            assert abs(float(got.mean()) - float(x)) <= 6 * sigma, (dtype, f)


# ---- (c) the bits: seed, position, index; threads and chunking ----------------------------

def test_generator_matches_its_documented_formula(seed):
    rng = np.random.default_rng(seed)
    for _ in range(5):
        call, salt = int(rng.integers(0, 2**64, dtype=np.uint64)), int(rng.integers(0, 1000))
        assert np.array_equal(_C.rounding_bits(call, salt, 4099), np_bits(call, salt, 4099))
    # per-call seeds of neighbouring steps and streams differ
    seeds = {F.stochastic_rounding_seed(seed, s, g) for s in range(100) for g in range(4)}
    assert len(seeds) == 400


@pytest.mark.parametrize("dtype", SIXTEEN, ids=dtype_id)
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_bits_depend_only_on_seed_position_and_index(dtype, threads, seed):
    """Every element's result is the rounding of its exact fp32 value with the bits of
    (call seed, its param's position in the call, its index in the param), whatever
    the thread count and wherever the chunks of the call start (the first param spans
    5 chunks and ends mid-chunk, so the others start mid-chunk)."""
    fusedopt.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    sizes = [5 * CHUNK + 17, 1000, 3 * CHUNK - 5, 1]
    inputs = [exact_inputs(n, dtype, gen) for n in sizes]
    params = [p.clone() for p, _ in inputs]
    call_seed = int(torch.randint(0, 2**62, (1,), generator=gen)) * 3
    sgd_sr(params, [g for _, g in inputs], call_seed)
    for pos, ((p, g), got) in enumerate(zip(inputs, params)):
        want = round_with(p.float() - g.float(), np_bits(call_seed, pos, p.numel()), dtype)
        assert torch.equal(got.double(), want), f"param {pos} of the call"


def _train(spec_name, dtype, params, grads, seed_kw, threads=None, groups=None):
    if threads is not None:
        fusedopt.set_num_threads(threads)
    spec = BY_NAME[spec_name]
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = spec.make(groups(ps) if groups else ps, **spec.hyper, **seed_kw)
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach().view(torch.int16).clone() for p in ps]


@pytest.mark.parametrize("spec_name", ["SGD-sr", "Adam-sr", "LAMB-sr"])
def test_same_seed_same_bits_across_threads_and_runs(spec_name, seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = [3 * CHUNK + 7, 999, CHUNK]
    params = [torch.randn(n, generator=gen).bfloat16() for n in sizes]
    grads = [[torch.randn(n, generator=gen).bfloat16() for n in sizes] for _ in range(3)]
    first = _train(spec_name, torch.bfloat16, params, grads, {"seed": 7}, threads=1)
    for threads in (2, 1, 2):
        again = _train(spec_name, torch.bfloat16, params, grads, {"seed": 7}, threads=threads)
        assert all(torch.equal(a, b) for a, b in zip(first, again)), f"threads={threads} changed the bits"
    other = _train(spec_name, torch.bfloat16, params, grads, {"seed": 8}, threads=2)
    assert not any(torch.equal(a, b) for a, b in zip(first, other)), "another seed gave the same bits"
    nearest_spec = {k: v for k, v in BY_NAME[spec_name].hyper.items() if k != "stochastic_rounding"}
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = BY_NAME[spec_name].make(ps, **nearest_spec)
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = g.clone()
        opt.step()
    assert not any(torch.equal(a, p.detach().view(torch.int16)) for a, p in zip(first, ps)), \
        "stochastic rounding gave round-to-nearest's bits"


def test_param_bits_do_not_depend_on_the_params_after_it(seed):
    """A param keeps its bits when more params join the call after it (its salt is its
    position), and when the call also holds fp32 params (batched apart)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(2 * CHUNK + 3, generator=gen).bfloat16()
    others = [torch.randn(5000, generator=gen), torch.randn(77, generator=gen).bfloat16()]
    grads = [[torch.randn(a.shape, generator=gen).bfloat16()] + [torch.randn_like(o) for o in others]
             for _ in range(2)]
    alone = _train("Adam-sr", torch.bfloat16, [a], [g[:1] for g in grads], {"seed": 3})
    joined = _train("Adam-sr", torch.bfloat16, [a] + others, grads, {"seed": 3})
    assert torch.equal(alone[0], joined[0])


def test_groups_get_different_bits(seed):
    """Two groups holding the same values with the same grads round differently (the
    group is the stream of the per-call seed)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(4096, generator=gen).bfloat16()
    g = torch.randn(4096, generator=gen).bfloat16()
    got = _train("SGD-sr", torch.bfloat16, [a, a], [[g, g]], {"seed": 1},
                 groups=lambda ps: [{"params": [ps[0]]}, {"params": [ps[1]]}])
    assert not torch.equal(got[0], got[1])


# ---- (d) every optimizer, against its fp32 reference -----------------------------------

ROUNDING_SPECS = ["SGD-sr", "Adam-sr", "AdamW-sr", "LARS-sr", "LAMB-sr"]


@pytest.mark.parametrize("dtype", SIXTEEN, ids=dtype_id)
@pytest.mark.parametrize("spec_name", ROUNDING_SPECS)
def test_step_is_within_one_ulp_of_the_fp32_reference(spec_name, dtype, seed):
    """One step: each 16-bit param is within one ulp of the fp32 reference update
    (torch.optim / the fp64 LARS, LAMB references of tests/reference_optim.py, on an fp32
    copy), and as many elements go to the farther neighbour as stochastic rounding sends
    there. An fp32 param of the same group gets exactly its bits without stochastic rounding."""
    spec = BY_NAME[spec_name]
    hyper = {k: v for k, v in spec.hyper.items() if k != "stochastic_rounding"}
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3 * CHUNK + 11,), (37, 5)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    flt = torch.nn.Parameter(torch.randn(300, generator=gen))
    grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
    flt_grad = torch.randn(300, generator=gen)
    # the fp32 reference (with the fp32 param: LAMB's clipping norm covers every grad), and
    # the same fused step rounded to nearest
    ref = [torch.nn.Parameter(p.detach().to(torch.float32, copy=True)) for p in params + [flt]]
    nearest = [torch.nn.Parameter(p.detach().clone()) for p in params + [flt]]
    for p, q, r, g in zip(params + [flt], ref, nearest, grads + [flt_grad]):
        p.grad, q.grad, r.grad = g.clone(), g.float(), g.clone()
    before = [p.detach().double() for p in params]
    spec.make(params + [flt], **spec.hyper).step()
    spec.reference(ref, **spec.hyper).step()  # fp32 (the registry drops stochastic_rounding)
    spec.make(nearest, **hyper).step()
    farther, expected, variance = 0, 0.0, 0.0
    for p, q, r, old in zip(params, ref, nearest, before):
        got, want = p.detach().double(), q.detach().double()
        _, _, ulp = neighbours(q.detach(), dtype)
        # one ulp of the result, plus the fp32 math's own rounding (a few fp32 ulps of the
        # operands, and of the update: LARS/LAMB's ratios come from fp32 sums; it matters
        # where the update nearly cancels the param)
        err = (got - want).abs()
        slack = 1e-6 * (old.abs() + want.abs()) + 1e-5 * (old - want).abs()
        bad = err > ulp + slack
        assert not bad.any(), (f"{int(bad.sum())} elements beyond one ulp: got {got[bad][:3].tolist()}, want "
                               f"{want[bad][:3].tolist()}, from {old[bad][:3].tolist()}")
        # the farther neighbour is taken with probability min(f, 1 - f), f: where the
        # result lies between its neighbours (in ulps)
        lo, _, _ = neighbours(q.detach(), dtype)
        f = ((want.abs() - lo.abs()) / ulp).clamp(0, 1)
        m = torch.minimum(f, 1 - f)
        farther += int((p != r).sum())
        expected += float(m.sum())
        variance += float((m * (1 - m)).sum())
    assert abs(farther - expected) <= 6 * variance ** 0.5 + 0.01 * expected, \
        f"{farther} elements went to the farther neighbour; expected {expected:.0f}"
    assert torch.equal(flt.detach(), nearest[-1].detach()), "an fp32 param was changed by stochastic_rounding"


# ---- refusals leave everything as it was --------------------------------------------------

def _stepped_two_groups(spec):
    """An optimizer of two bf16 params in two groups after one step, with new grads."""
    params = [torch.nn.Parameter(torch.randn(n).bfloat16()) for n in (50, 70)]
    opt = spec.make([{"params": params[:1]}, {"params": params[1:]}], **spec.hyper)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    return opt


@pytest.mark.parametrize("spec_name", ROUNDING_SPECS)
@pytest.mark.parametrize("change,exc,match", [
    ({"master_weights": True}, ValueError, r"param_groups\[1\]: stochastic_rounding=True and master_weights=True"),
    ({"stochastic_rounding": 1}, TypeError, r"param_groups\[1\]\['stochastic_rounding'\] must be a bool"),
    ({"stochastic_rounding": None}, TypeError, r"param_groups\[1\]\['stochastic_rounding'\] must be a bool"),
])
def test_bad_group_between_steps_leaves_everything_unchanged(spec_name, change, exc, match, seed):
    opt = _stepped_two_groups(BY_NAME[spec_name])
    opt.param_groups[1].update(change)
    before = snapshot(opt)
    with pytest.raises(exc, match=match):
        opt.step()
    assert snapshot(opt) == before


def test_functional_refusals_write_nothing(seed):
    p = torch.randn(100).bfloat16()
    g = torch.randn(100).bfloat16()
    master = [p.float()]
    kept = (p.clone(), master[0].clone())
    base = dict(weight_decay=0.0, momentum=0.0, lr=0.1, dampening=0.0, nesterov=False, maximize=False)
    with pytest.raises(ValueError, match="stochastic_rounding=True with master_params"):
        F.sgd([p], [g], [None], **base, master_params=master, stochastic_rounding=True, rounding_seed=1)
    with pytest.raises(TypeError, match="needs rounding_seed"):
        F.sgd([p], [g], [None], **base, stochastic_rounding=True)
    with pytest.raises(ValueError, match=r"rounding_seed must be in \[0, 2\*\*64\)"):
        F.sgd([p], [g], [None], **base, stochastic_rounding=True, rounding_seed=-1)
    with pytest.raises(TypeError, match="stochastic_rounding must be a bool"):
        F.sgd([p], [g], [None], **base, stochastic_rounding="yes", rounding_seed=1)
    m, v, st = torch.zeros(100), torch.zeros(100), torch.zeros(())
    with pytest.raises(ValueError, match="stochastic_rounding=True with master_params"):
        F.adam([p], [g], [m], [v], [], [st], amsgrad=False, beta1=0.9, beta2=0.99, lr=0.1, weight_decay=0.0,
               eps=1e-8, maximize=False, master_params=master, stochastic_rounding=True, rounding_seed=1)
    assert torch.equal(p, kept[0]) and torch.equal(master[0], kept[1])
    assert not m.any() and not v.any() and st.item() == 0


def test_constructor_refusals():
    p = torch.nn.Parameter(torch.randn(4).bfloat16())
    with pytest.raises(TypeError, match="seed must be an int"):
        fusedopt.SGD([p], lr=0.1, stochastic_rounding=True, seed=1.5)
    with pytest.raises(ValueError, match="Muon does not support stochastic_rounding"):
        fusedopt.Muon([{"params": [p], "use_muon": False, "stochastic_rounding": True}])


# ---- the device form of the seed: words (seed, step, stream) the kernel reads --------------

def _draw_words(gen):
    """(seed, step, stream) with the high bit of seed and step set half the time (the
    words are int64 two's complement; the kernel reads them as uint64)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen)) | (int(torch.randint(0, 2, (1,), generator=gen)) << 63)
    step = int(torch.randint(0, 2**40, (1,), generator=gen)) | (int(torch.randint(0, 2, (1,), generator=gen)) << 63)
    return seed, step, int(torch.randint(0, 8, (1,), generator=gen))


@pytest.mark.parametrize("dtype", SIXTEEN, ids=dtype_id)
def test_functional_tensor_seed_equals_int_seed(dtype, seed):
    """rounding_seed=stochastic_rounding_state(s, k, g) rounds with the bits of
    rounding_seed=stochastic_rounding_seed(s, k, g) (and of the numpy model), and the
    call leaves the words as they were (advancing them is the caller's)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        words = _draw_words(gen)
        inputs = [exact_inputs(n, dtype, gen) for n in (2 * CHUNK + 9, 300)]
        by_int = [p.clone() for p, _ in inputs]
        by_tensor = [p.clone() for p, _ in inputs]
        state = F.stochastic_rounding_state(*words)
        kept = state.clone()
        sgd_sr(by_int, [g for _, g in inputs], F.stochastic_rounding_seed(*words))
        sgd_sr(by_tensor, [g for _, g in inputs], state)
        call_seed = F.stochastic_rounding_seed(*words)
        for pos, ((p, g), a, b) in enumerate(zip(inputs, by_int, by_tensor)):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"param {pos}, words {words}"
            want = round_with(p.float() - g.float(), np_bits(call_seed, pos, p.numel()), dtype)
            assert torch.equal(b.double(), want)
        assert torch.equal(state, kept)


def _host_int_seed(opt, user_seed: int):
    """Makes ``opt`` pass the host-int seed stochastic_rounding_seed(user_seed, step, group)
    to its functional entry instead of its device words (the path of a functional caller)."""
    step = [0]

    def kwargs(group, gi, pending):
        if not group.get("stochastic_rounding"):
            return {}
        return dict(stochastic_rounding=True, rounding_seed=F.stochastic_rounding_seed(user_seed, step[0], gi))

    opt._rounding_kwargs = kwargs
    opt._advance_rounding = lambda: step.__setitem__(0, step[0] + 1)


def _two_groups(ps):
    return [{"params": ps[:2]}, {"params": ps[2:]}]


def _inputs(dtype, gen, steps):
    """Params of two groups (a 16-bit one spanning chunks, one small 16-bit and an fp32
    one in the second group) and ``steps`` rounds of grads, all freshly drawn."""
    shapes = [(2 * CHUNK + 5,), (31, 7), (501,), (64,)]
    dtypes = [dtype, dtype, dtype, torch.float32]
    params = [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes)]
    grads = [[torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes)] for _ in range(steps)]
    return params, grads


def _run(spec_name, ps, grads, opt):
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach().view(torch.int16 if p.element_size() == 2 else torch.int32).clone() for p in ps]


@pytest.mark.parametrize("dtype", SIXTEEN, ids=dtype_id)
@pytest.mark.parametrize("spec_name", ROUNDING_SPECS)
def test_optimizer_device_words_equal_host_int_seeds(spec_name, dtype, seed):
    """Each optimizer's steps with its device words (the default: what CUDA graphs
    capture) are bit-identical, params and state, to the same steps with the host-int
    seeds stochastic_rounding_seed(seed, step, group); the words end at [seed, steps, group]."""
    spec = BY_NAME[spec_name]
    gen = torch.Generator().manual_seed(seed)
    user_seed = _draw_words(gen)[0] % 2**64
    params, grads = _inputs(dtype, gen, 3)
    runs = []
    for host in (False, True):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = spec.make(_two_groups(ps), **spec.hyper, seed=user_seed)
        if host:
            _host_int_seed(opt, user_seed)
        runs.append((_run(spec_name, ps, grads, opt), opt, ps))
    (a, opt_a, ps_a), (b, opt_b, ps_b) = runs
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for p, q in zip(ps_a, ps_b):
        assert value_bits(dict(opt_a.state[p])) == value_bits(dict(opt_b.state[q]))
    for gi, group in enumerate(opt_a.param_groups):
        want = F.stochastic_rounding_state(user_seed, 3, gi)
        assert torch.equal(group["rounding_state"], want), group["rounding_state"]


def _state_dict_copy(opt) -> dict:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("spec_name", ROUNDING_SPECS)
def test_state_dict_round_trip_continues_the_bit_stream(spec_name, seed):
    """Saved after 2 steps and loaded into a new optimizer (built with another seed: the
    saved one wins), 3 more steps give the bits of 5 uninterrupted steps."""
    spec = BY_NAME[spec_name]
    gen = torch.Generator().manual_seed(seed)
    user_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    params, grads = _inputs(torch.bfloat16, gen, 5)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    whole = _run(spec_name, ps, grads, spec.make(_two_groups(ps), **spec.hyper, seed=user_seed))
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    first = spec.make(_two_groups(ps), **spec.hyper, seed=user_seed)
    _run(spec_name, ps, grads[:2], first)
    saved = _state_dict_copy(first)
    resumed_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    resumed = spec.make(_two_groups(resumed_ps), **spec.hyper, seed=user_seed + 1)
    resumed.load_state_dict(saved)
    for gi, group in enumerate(resumed.param_groups):
        assert torch.equal(group["rounding_state"], F.stochastic_rounding_state(user_seed, 2, gi))
        assert group["rounding_state"] is not saved["param_groups"][gi]["rounding_state"]
    got = _run(spec_name, resumed_ps, grads[2:], resumed)
    assert all(torch.equal(x, y) for x, y in zip(whole, got))
    # another seed at the resume would have given other bits: the check above can fail
    other_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    other = spec.make(_two_groups(other_ps), **spec.hyper, seed=user_seed + 1)
    without = {**saved, "param_groups": [{k: v for k, v in g.items() if k != "rounding_state"}
                                         for g in saved["param_groups"]]}
    other.load_state_dict(without)
    assert not torch.equal(_run(spec_name, other_ps, grads[2:], other)[0], whole[0])


@pytest.mark.parametrize("spec_name", ["SGD-sr", "LAMB-sr"])
def test_checkpoint_without_rounding_state_starts_at_step_0(spec_name, seed):
    """A checkpoint of an older fusedopt (or of torch.optim) has no 'rounding_state':
    the loaded optimizer counts from 0 with its own seed (the old behaviour), bit for
    bit the host-int seeds of steps 0, 1, ..."""
    spec = BY_NAME[spec_name]
    gen = torch.Generator().manual_seed(seed)
    params, grads = _inputs(torch.float16, gen, 4)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    first = spec.make(_two_groups(ps), **spec.hyper, seed=11)
    _run(spec_name, ps, grads[:2], first)
    old = _state_dict_copy(first)
    for g in old["param_groups"]:
        del g["rounding_state"]
    runs = []
    for host in (False, True):
        qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        opt = spec.make(_two_groups(qs), **spec.hyper, seed=29)
        opt.load_state_dict(old)
        if host:
            _host_int_seed(opt, 29)
        else:
            for gi, group in enumerate(opt.param_groups):
                assert torch.equal(group["rounding_state"], F.stochastic_rounding_state(29, 0, gi))
        runs.append(_run(spec_name, qs, grads[2:], opt))
    assert all(torch.equal(x, y) for x, y in zip(*runs))


def test_rounding_switched_on_later_starts_its_words(seed):
    """A group that turns stochastic_rounding on after some steps gets words [seed, 0,
    group] at its first step with it (committed with the step), then counts on."""
    gen = torch.Generator().manual_seed(seed)
    params, grads = _inputs(torch.bfloat16, gen, 3)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = fusedopt.SGD(_two_groups(ps), lr=0.1, seed=5)
    _run("SGD", ps, grads[:1], opt)
    assert "rounding_state" not in opt.param_groups[1]
    opt.param_groups[1]["stochastic_rounding"] = True
    _run("SGD", ps, grads[1:], opt)
    assert torch.equal(opt.param_groups[1]["rounding_state"], F.stochastic_rounding_state(5, 2, 1))
    assert "rounding_state" not in opt.param_groups[0]


BAD_WORDS = [
    ("int32", lambda: torch.zeros(3, dtype=torch.int32)),
    ("float", lambda: torch.zeros(3)),
    ("shape [2]", lambda: torch.zeros(2, dtype=torch.int64)),
    ("shape [1, 3]", lambda: torch.zeros(1, 3, dtype=torch.int64)),
    ("strided", lambda: torch.arange(6, dtype=torch.int64)[::2]),
    ("list", lambda: [1, 2, 3]),
]
BAD_WORDS_MSG = r"must be a contiguous int64 tensor of shape \[3\] \(seed, step, stream\)"


@pytest.mark.parametrize("what,bad", BAD_WORDS, ids=[w for w, _ in BAD_WORDS])
def test_functional_bad_seed_tensor_writes_nothing(what, bad, seed):
    p, g = torch.randn(100).bfloat16(), torch.randn(100).bfloat16()
    m, v, st = torch.randn(100), torch.rand(100), torch.full((), 3.0)
    kept = [t.clone() for t in (p, g, m, v, st)]
    exc = TypeError if what == "list" else ValueError
    with pytest.raises(exc, match="rounding_seed"):
        sgd_sr([p], [g], bad())
    with pytest.raises(exc, match="rounding_seed"):
        F.adam([p], [g], [m], [v], [], [st], amsgrad=False, beta1=0.9, beta2=0.99, lr=0.1, weight_decay=0.0,
               eps=1e-8, maximize=False, stochastic_rounding=True, rounding_seed=bad())
    if exc is ValueError:
        with pytest.raises(ValueError, match=BAD_WORDS_MSG):
            sgd_sr([p], [g], bad())
    assert all(torch.equal(a, b) for a, b in zip((p, g, m, v, st), kept))


@pytest.mark.parametrize("what,bad", BAD_WORDS[:5], ids=[w for w, _ in BAD_WORDS[:5]])
@pytest.mark.parametrize("spec_name", ["Adam-sr", "LARS-sr"])
def test_bad_rounding_state_leaves_everything_unchanged(spec_name, what, bad, seed):
    """A replaced group['rounding_state'] of the wrong kind is refused at step() and at
    load_state_dict(), naming it, before anything is written."""
    opt = _stepped_two_groups(BY_NAME[spec_name])
    saved = _state_dict_copy(opt)
    good = opt.param_groups[1]["rounding_state"]
    opt.param_groups[1]["rounding_state"] = bad()
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['rounding_state'\] " + BAD_WORDS_MSG):
        opt.step()
    assert snapshot(opt) == before
    opt.param_groups[1]["rounding_state"] = good
    saved["param_groups"][0]["rounding_state"] = bad()
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"loaded param_groups\[0\]\['rounding_state'\] " + BAD_WORDS_MSG):
        opt.load_state_dict(saved)
    assert snapshot(opt) == before


def test_seed_state_checks_its_arguments():
    with pytest.raises(TypeError, match="step must be an int"):
        F.stochastic_rounding_state(1, 2.0)
    assert F.stochastic_rounding_state(2**64 - 1, 2**63, 5).tolist() == [-1, -2**63, 5]


# ---- CUDA (compiled, run only where a GPU is) ----------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", SIXTEEN, ids=dtype_id)
def test_cuda_bits_equal_cpu_bits(dtype, seed):
    """The same fp32 results get the same rounding on both devices (exact inputs: the fp32
    math is the same bits on both), in CUDA's vector and scalar paths, with the seed as an
    int and as device words."""
    gen = torch.Generator().manual_seed(seed)
    inputs = [exact_inputs(n, dtype, gen) for n in (3 * 65536 + 13, 1001, 8)]
    words = _draw_words(gen)
    cpu = [p.clone() for p, _ in inputs]
    gpu = [p.cuda() for p, _ in inputs]
    gpu_words = [p.cuda() for p, _ in inputs]
    sgd_sr(cpu, [g for _, g in inputs], F.stochastic_rounding_seed(*words))
    sgd_sr(gpu, [g.cuda() for _, g in inputs], F.stochastic_rounding_seed(*words))
    sgd_sr(gpu_words, [g.cuda() for _, g in inputs], F.stochastic_rounding_state(*words, device="cuda"))
    for a, b, c in zip(cpu, gpu, gpu_words):
        assert torch.equal(a.view(torch.int16), b.cpu().view(torch.int16))
        assert torch.equal(a.view(torch.int16), c.cpu().view(torch.int16))


@pytest.mark.cuda
def test_cuda_graph_capture_of_an_int_seed_is_refused():
    """The functional form with a host-int seed under capture: refused, naming the fix;
    nothing written (the optimizer classes pass device words: tests/test_cuda_integration.py)."""
    p = torch.randn(1000, device="cuda").bfloat16()
    g = torch.randn_like(p)
    before = p.clone()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="pass rounding_seed as a device tensor"):
        with torch.cuda.graph(graph):
            sgd_sr([p], [g], 12345, lr=torch.tensor(0.1, device="cuda"))
    assert torch.equal(p, before)
