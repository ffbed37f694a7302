"""Property-based fuzz of every optimizer in optim_registry.OPTIMIZERS.

Random mixes of shapes (0-d, empty, odd), dtypes, storage offsets, shared flat
buffers, None grads, empty param groups and hyperparameters, plus at most one
deliberate defect per case (non-contiguous param, overlapping params, a grad
aliasing its param, an invalid hyperparameter). Properties:

- a valid case is accepted and matches the reference (torch.optim, foreach=False;
  16-bit params: the reference runs in fp32; each step is compared from the
  same start, the reference going on from the fused param);
- a defective case raises ValueError/TypeError and leaves params, grads and
  state bit-identical;
- the process never dies by a signal: the fuzz runs in a child process
  (``test_fuzz_in_child_process``); a crash fails that test and prints the
  case that was running.

Runs FUSEDOPT_FUZZ_EXAMPLES (default 100, 1000 with --runslow) hypothesis examples,
drawn from the test's seed (FUSEDOPT_TEST_SEED replays a run);
FUSEDOPT_FUZZ_OPTIMIZERS=LARS,LAMB restricts them to some registry entries.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fusedopt

from crash_guard import CHILD, log_case, run_in_child
from optim_registry import OPTIMIZERS, snapshot

EXAMPLES = int(os.environ.get("FUSEDOPT_FUZZ_EXAMPLES", "100"))
# FUSEDOPT_FUZZ_OPTIMIZERS=LARS,LAMB: fuzz only the registry entries whose names start so.
ONLY = tuple(x for x in os.environ.get("FUSEDOPT_FUZZ_OPTIMIZERS", "").split(",") if x)
FUZZED = [s for s in OPTIMIZERS if not ONLY or s.name.startswith(ONLY)]

SHAPES = [(), (0,), (1,), (3,), (7,), (33,), (1025,), (3, 0, 2), (5, 3), (2, 3, 5), (4, 1, 9), (130, 67)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DEFECTS = ["none"] * 12 + ["gapped", "overlap", "grad_is_param", "bad_hyper"]
TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-14),
       # one 16-bit rounding step apart at most (fp32 math rounded to nearest even)
       torch.float16: (2e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5)}


def tolerance(spec, dtype, case, dtypes):
    """fp64 params follow the fp64 reference to fp64 rounding, except under LAMB
    clipping across lower-precision grads: their sums of squares (fp32 within a
    chunk) enter the one clipping norm, so fp64 params get fp32 bounds then."""
    clips = spec.make is fusedopt.LAMB and any(g["hyper"].get("max_grad_norm") is not None for g in case["groups"])
    if dtype is torch.float64 and clips and any(d is not torch.float64 for d in dtypes):
        return TOL[torch.float32]
    # 16-bit params, with stochastic rounding too: the stored value is a 16-bit neighbour of
    # the step's fp32 result (the nearest one, or either one at random): within TOL of it.
    return TOL[dtype]


def check_step(i, p, q, before, spec, hyper, tol):
    """One step of fused param p against the reference q (both from ``before``): within
    rtol of the step's magnitude (the larger of the param before and after it) plus atol,
    plus, for settings computed below the param's precision (Muon's lower ns_dtype),
    spec.update_rtol of the reference's largest update element."""
    rtol, atol = tol
    got, want, start = p.detach().double(), q.detach().double(), before.double()
    bound = atol + rtol * torch.maximum(want.abs(), start.abs())
    rtol_update = spec.update_rtol(p, hyper)
    if rtol_update and q.numel():
        bound = bound + rtol_update * float((want - start).abs().max())
    ok = (got == want) | (got.isnan() & want.isnan()) | ((got - want).abs() <= bound)
    assert ok.all(), (f"param {i} ({p.dtype}, shape {list(p.shape)}): {int((~ok).sum())} of {p.numel()} "
                      f"elements differ beyond {rtol} x magnitude + {atol} in one step; first: got "
                      f"{got[~ok][:4].tolist()}, want {want[~ok][:4].tolist()}, from {start[~ok][:4].tolist()}")


@st.composite
def cases(draw):
    spec = draw(st.sampled_from(FUZZED))
    n_groups = draw(st.integers(1, 3))
    groups = []
    for _ in range(n_groups):
        n = draw(st.integers(0, 5))  # 0: an empty param group
        tensors = [dict(shape=draw(st.sampled_from(SHAPES)), dtype=draw(st.sampled_from(spec.param_dtypes or DTYPES)),
                        offset=draw(st.integers(0, 9)), shared=draw(st.booleans()),
                        grad_offset=draw(st.integers(0, 3)))
                   for _ in range(n)]
        groups.append(dict(tensors=tensors, hyper=draw(spec.space)))
    return dict(spec=spec, groups=groups, steps=draw(st.integers(1, 3)),
                none_grad_p=draw(st.sampled_from([0.0, 0.3])), defect=draw(st.sampled_from(DEFECTS)),
                seed=draw(st.integers(0, 2**31 - 1)))


def build_params(case, gen):
    """Params per group: own storage at a storage offset, or slices of one flat buffer per dtype."""
    flat_len = {}
    for g in case["groups"]:
        for t in g["tensors"]:
            if t["shared"]:
                n = int(torch.Size(t["shape"]).numel())
                flat_len[t["dtype"]] = flat_len.get(t["dtype"], 0) + n + t["offset"]
    flats = {dt: torch.randn(n, generator=gen).to(dt) for dt, n in flat_len.items()}
    cursor = {dt: 0 for dt in flats}
    out = []
    for g in case["groups"]:
        ps = []
        for t in g["tensors"]:
            n = int(torch.Size(t["shape"]).numel())
            if t["shared"]:
                c = cursor[t["dtype"]] + t["offset"]
                data = flats[t["dtype"]][c:c + n].view(t["shape"])
                cursor[t["dtype"]] = c + n
            else:
                buf = torch.randn(n + t["offset"], generator=gen).to(t["dtype"])
                data = buf[t["offset"]:].view(t["shape"])
            ps.append(torch.nn.Parameter(data))
        out.append(ps)
    return out


def apply_defect(case, groups, gen):
    """Adds the case's defect to the first group; returns True when one was added."""
    d = case["defect"]
    if d == "gapped":  # memory with gaps: not one flat run (a transposed param would be fine)
        p = torch.nn.Parameter(torch.randn(5, 12, generator=gen)[:, ::2])
    elif d == "overlap":
        base = torch.randn(16, generator=gen)
        groups[0] += [torch.nn.Parameter(base[:10]), torch.nn.Parameter(base[6:])]
        return True
    elif d == "grad_is_param":
        p = torch.nn.Parameter(torch.randn(6, generator=gen))
        p.grad = p.detach()
    else:
        return False
    groups[0].append(p)
    return True


def new_grads(params, gen, none_p, always):
    """Fresh random grads (at a storage offset), None with probability none_p."""
    grads = []
    for p in params:
        if id(p) in always:
            grads.append("keep")
        elif torch.rand((), generator=gen).item() < none_p:
            grads.append(None)
        else:
            off = int(torch.randint(0, 4, (), generator=gen))
            g = torch.randn(p.numel() + off, generator=gen)[off:].view(p.shape).to(p.dtype)
            grads.append(g)
    return grads


def run_case(case):
    gen = torch.Generator().manual_seed(case["seed"])
    spec = case["spec"]
    groups = build_params(case, gen)
    defective = apply_defect(case, groups, gen) if case["defect"] != "bad_hyper" else False
    pinned = {id(p) for ps in groups for p in ps if p.grad is not None}  # the aliasing grad stays
    hypers = [g["hyper"] for g in case["groups"]]

    if case["defect"] == "bad_hyper":
        changes, exc, match = spec.bad_hyper[case["seed"] % len(spec.bad_hyper)]
        params = groups[0] or [torch.nn.Parameter(torch.randn(2, generator=gen))]
        # Muon checks its Newton-Schulz settings in the groups that have matrices
        params = params + [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in spec.matrices[:1]]
        with pytest.raises(exc, match=match):
            spec.make([{"params": params, **hypers[0], **changes}])
        return "rejected"

    # Reference copies: fp32 for 16-bit params (rounded back after each step).
    ref_groups = [[torch.nn.Parameter(p.detach().float() if p.dtype in (torch.float16, torch.bfloat16)
                                      else p.detach().clone()) for p in ps] for ps in groups]
    opt = spec.make([{"params": ps, **h} for ps, h in zip(groups, hypers)])
    ref = spec.reference([{"params": ps, **h} for ps, h in zip(ref_groups, hypers)])
    flat, ref_flat = [p for ps in groups for p in ps], [p for ps in ref_groups for p in ps]
    flat_hyper = [h for ps, h in zip(groups, hypers) for _ in ps]
    dtypes = {t.dtype for t in flat}
    for step in range(case["steps"]):
        grads = new_grads(flat, gen, case["none_grad_p"] if step else 0.0, pinned)
        for p, q, g in zip(flat, ref_flat, grads):
            if isinstance(g, str):
                continue
            p.grad = g
            q.grad = None if g is None else g.to(q.dtype)
        if defective:
            before = snapshot(opt)
            with pytest.raises((ValueError, TypeError)) as info:
                opt.step()
            assert "shares memory" in str(info.value) or "gaps or overlaps" in str(info.value), info.value
            assert snapshot(opt) == before, "a rejected step changed something"
            return "rejected"
        before = [q.detach().clone() for q in ref_flat]
        opt.step()
        ref.step()
        with torch.no_grad():
            for i, (p, q) in enumerate(zip(flat, ref_flat)):
                check_step(i, p, q, before[i], spec, flat_hyper[i], tolerance(spec, p.dtype, case, dtypes))
                # The reference goes on from the fused param: each step is compared from the
                # same start. A rounding difference fed back through the next update can grow
                # far beyond an ulp: Adam with L2 decay and beta2 = 0 divides by |g + wd p|,
                # which cancels to near 0 for some elements (found by this fuzz, in fp32 and
                # with stochastic rounding), so a bound accumulated over steps does not hold.
                q.copy_(p.detach().to(q.dtype))
    return "accepted"


@pytest.mark.skipif(not CHILD, reason="runs inside test_fuzz_in_child_process")
@settings(max_examples=EXAMPLES, deadline=None, derandomize=False, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_fuzz_body(case):
    log_case(repr({**case, "spec": case["spec"].name}))  # before running: a crash leaves it in the log
    event(f"{case['spec'].name}: {run_case(case)}")


def test_fuzz_in_child_process(request, tmp_path, seed):
    """Runs test_fuzz_body in a child; a signal (segfault, abort) fails this test."""
    if CHILD:
        pytest.skip("this is the child")
    examples = 1000 if request.config.getoption("--runslow") else EXAMPLES
    run_in_child(__file__, "test_fuzz_body", examples, tmp_path, seed)
