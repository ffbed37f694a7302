"""Property-based fuzz of fusedopt.functional.tensor_norms and the Hessian API.

tensor_norms: random lists of tensors (0-d, empty, odd sizes; all four float
dtypes; storage offsets; views of one shared buffer; requires_grad; rare inf /
nan values) with at most one defect per entry (non-contiguous, expanded,
channels_last, sparse, complex, int, bool, meta, not a tensor) and sometimes
an empty list. Accepted: matches torch.linalg.vector_norm (fp64) and leaves the
inputs bit-identical. Rejected: ValueError/TypeError naming the first bad entry.

Hessian: eigsh on random symmetric matrices with a known, well-separated
spectrum (raw tensor, MatrixOperator or a custom operator, fp64/fp32), or on
the Hessian of a small random MLP (HessianOperator, checked against the dense
Hessian), with random k / which / tol / ncv / max_matvecs / v0 /
multiplicity_check, valid or not; and operators that turn non-finite after a
random number of products. Accepted: k ascending eigenvalues, each within its
residual of a true eigenvalue, the residual the one the eigenvector really has,
a RuntimeWarning exactly when a pair did not converge, and the exact wanted
eigenvalues when everything converged to a tight tol (except LM with ncv < k + 3,
which warns that it may settle on the wrong end). Rejected: ValueError or
TypeError whose message starts with the name of the first bad argument. A
non-finite product: FloatingPointError (eigsh, trace, density).

Each fuzz runs in a child process (tests/crash_guard.py): a signal fails the
parent test and prints the case. FUSEDOPT_FUZZ_EXAMPLES examples (default 60;
600 with --runslow), drawn from the test's seed (FUSEDOPT_TEST_SEED replays a run).
"""
import math
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from crash_guard import CHILD, log_case, run_in_child
from fusedopt.functional import tensor_norms
from fusedopt.hessian import HessianOperator, MatrixOperator, density, eigsh, trace

EXAMPLES = int(os.environ.get("FUSEDOPT_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
child_only = pytest.mark.skipif(not CHILD, reason="runs inside its *_in_child_process test")

# ---- tensor_norms ----------------------------------------------------------------------------

SHAPES = [(), (0,), (1,), (5,), (3, 0), (7, 3), (33,), (2, 3, 4), (1025,), (40000,)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DEFECTS = ["non_contiguous", "expanded", "channels_last", "sparse", "complex", "int", "bool", "meta",
                         "not_a_tensor"]


@st.composite
def norm_cases(draw):
    """Valid entries, except (in about a third of the cases) one defective entry or an empty list."""
    entries = [dict(shape=draw(st.sampled_from(SHAPES)), dtype=draw(st.sampled_from(DTYPES)),
                    offset=draw(st.integers(0, 5)), shared=draw(st.booleans()), grad=draw(st.booleans()),
                    scale=draw(st.sampled_from([1e-3, 1.0, 1e3])),
                    special=draw(st.sampled_from([None] * 8 + ["inf", "nan"])), defect="ok")
               for _ in range(draw(st.integers(1, 7)))]
    defect = draw(st.sampled_from(["ok"] * 18 + DEFECTS + ["empty"]))
    if defect == "empty":
        entries = []
    elif defect != "ok":
        entries[draw(st.integers(0, len(entries) - 1))]["defect"] = defect
    return dict(entries=entries, container=draw(st.sampled_from(["list", "tuple"])),
                seed=draw(st.integers(0, 2**31 - 1)))


def build_norm_inputs(case, gen):
    shared = torch.randn(sum(int(torch.Size(e["shape"]).numel()) + e["offset"] for e in case["entries"]) + 1,
                         generator=gen, dtype=torch.float64)
    cursor, out = 0, []
    for e in case["entries"]:
        n = int(torch.Size(e["shape"]).numel())
        if e["shared"]:  # views of one buffer, one dtype per entry: converted copies of its slice
            base = shared[cursor + e["offset"]:cursor + e["offset"] + n]
            cursor += n + e["offset"]
        else:
            base = torch.randn(n, generator=gen, dtype=torch.float64)
        base = base * e["scale"]
        if e["special"] and n:
            base[int(torch.randint(0, n, (), generator=gen))] = float(e["special"])
        buf = torch.empty(n + e["offset"], dtype=e["dtype"])
        buf[e["offset"]:] = base.to(e["dtype"])
        t = buf[e["offset"]:].view(e["shape"])
        d = e["defect"]
        if d == "non_contiguous":
            t = torch.randn(4, 6, generator=gen).to(e["dtype"]).t()
        elif d == "expanded":
            t = torch.randn(1, generator=gen).to(e["dtype"]).expand(5)
        elif d == "channels_last":
            t = torch.randn(2, 3, 4, 5, generator=gen).to(e["dtype"]).to(memory_format=torch.channels_last)
        elif d == "sparse":
            t = torch.randn(6, generator=gen).to_sparse()
        elif d == "complex":
            t = torch.randn(6, generator=gen, dtype=torch.complex64)
        elif d == "int":
            t = torch.randint(-3, 3, (6,), generator=gen)
        elif d == "bool":
            t = torch.ones(6, dtype=torch.bool)
        elif d == "meta":
            t = torch.empty(6, device="meta")
        elif d == "not_a_tensor":
            t = [1.0, 2.0]
        if e["grad"] and isinstance(t, torch.Tensor) and t.dtype.is_floating_point and t.layout is torch.strided:
            t = torch.nn.Parameter(t)
        out.append(t)
    return tuple(out) if case["container"] == "tuple" else out


def bits(t):
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return repr(t) if not isinstance(t, torch.Tensor) else ("meta", tuple(t.shape))
    t = t.detach()
    if t.layout is not torch.strided:
        t = t.to_dense()
    return (tuple(t.shape), t.stride(), str(t.dtype), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def run_norm_case(case):
    gen = torch.Generator().manual_seed(case["seed"])
    inputs = build_norm_inputs(case, gen)
    before = [bits(t) for t in inputs]
    first_bad = next((i for i, e in enumerate(case["entries"]) if e["defect"] != "ok"), None)
    if not inputs or first_bad is not None:
        with pytest.raises((ValueError, TypeError)) as info:
            tensor_norms(inputs)
        want = "empty" if not inputs else f"tensors[{first_bad}]"
        assert want in str(info.value), str(info.value)
        assert [bits(t) for t in inputs] == before
        return "rejected"
    out = tensor_norms(inputs)
    assert [bits(t) for t in inputs] == before, "tensor_norms wrote to an input"
    want_dtype = torch.float64 if any(t.dtype is torch.float64 for t in inputs) else torch.float32
    assert out.dtype is want_dtype and out.shape == (len(inputs),)
    ref = torch.stack([torch.linalg.vector_norm(t.detach().double()) if t.numel() else torch.zeros((), dtype=torch.float64)
                       for t in inputs])
    # fp32 results (rtol ~ a few fp32 ulps); a 16-bit sum of squares can overflow fp32 only beyond 1e19
    torch.testing.assert_close(out.double(), ref.float().double(), rtol=2e-6, atol=0, equal_nan=True)
    fp64 = [i for i, t in enumerate(inputs) if t.dtype is torch.float64]  # fp64 norms: fp64 tolerance
    torch.testing.assert_close(out[fp64].double(), ref[fp64], rtol=1e-12, atol=0, equal_nan=True)
    return "accepted"


@child_only
@FUZZ
@given(case=norm_cases())
def test_tensor_norms_fuzz_body(case):
    log_case(repr(case))
    event(f"tensor_norms: {run_norm_case(case)}")


def test_tensor_norms_fuzz_in_child_process(request, tmp_path, seed):
    if CHILD:
        pytest.skip("this is the child")
    run_in_child(__file__, "test_tensor_norms_fuzz_body",
                 10 * EXAMPLES if request.config.getoption("--runslow") else EXAMPLES, tmp_path, seed)


# ---- Hessian ---------------------------------------------------------------------------------

WHICH = ("LA", "SA", "LM", "BE")
NAN = float("nan")


class CountingOperator:
    """A custom operator (the protocol, not MatrixOperator) that can turn non-finite at product ``bad_at``."""

    def __init__(self, A, bad_at=None, bad_value=NAN):
        self.A, self.bad_at, self.bad_value = A, bad_at, bad_value
        self.shape, self.dtype, self.device = tuple(A.shape), A.dtype, A.device
        self.calls = 0

    def matvec(self, x):
        self.calls += 1
        y = self.A @ x
        if self.bad_at is not None and self.calls >= self.bad_at:
            y = y.clone()
            y[self.calls % y.numel()] = self.bad_value
        return y


def known_spectrum(n, gen, scale):
    """Distinct eigenvalues, gaps >= 0.05 * scale, random signs and offsets."""
    gaps = 0.05 + torch.rand(n, generator=gen, dtype=torch.float64)
    evals = (torch.cumsum(gaps, 0) - gaps.sum() * float(torch.rand((), generator=gen, dtype=torch.float64))) * scale
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    A = Q @ torch.diag(evals) @ Q.T
    return (A + A.T) / 2, evals


def mlp_problem(gen, widths, act):
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(a, b), {"tanh": torch.nn.Tanh(), "sigmoid": torch.nn.Sigmoid()}[act]]
    model = torch.nn.Sequential(*layers[:-1]).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    X = torch.randn(7, widths[0], generator=gen, dtype=torch.float64)
    y = torch.randn(7, widths[-1], generator=gen, dtype=torch.float64)
    loss = torch.nn.functional.mse_loss
    op = HessianOperator(model, loss, (X, y))
    params = list(model.parameters())

    def f(flat):
        out, i = {}, 0
        for (name, p) in model.named_parameters():
            out[name] = flat[i:i + p.numel()].view(p.shape)
            i += p.numel()
        return loss(torch.func.functional_call(model, out, (X,)), y)

    H = torch.autograd.functional.hessian(f, torch.cat([p.detach().reshape(-1) for p in params]))
    return op, (H + H.T) / 2


GOOD = dict(k=["1", "2", "3", "min(n, 5)", "n"], which=list(WHICH), tol=[1e-10, 1e-8, 1e-6, 1e-3, 1e-1],
            ncv=["None", "None", "min(n, k + 1)", "min(n, k + 3)", "n"], max_matvecs=["None", "None", "k", "k + 2", "500"],
            v0=["none", "none", "random", "int"])
BAD = dict(k=["0", "-1", "n + 1", "True", "1.0"], which=["la", "", None, 0], tol=[0.0, -1e-3, NAN, float("inf"), "1e-3"],
           ncv=["k", "0", "n + 1", "2.0", "True"], max_matvecs=["k - 1", "0", "-1", "2.5", "True"],
           v0=["zeros", "nan", "short", "complex", "list", "sparse"])


@st.composite
def eigsh_cases(draw):
    """Valid arguments, except (in about a third of the cases) one drawn from the invalid ones."""
    bad_arg = draw(st.sampled_from([None] * 12 + list(BAD)))
    args = {name: draw(st.sampled_from(BAD[name] if name == bad_arg else GOOD[name])) for name in GOOD}
    return dict(
        kind=draw(st.sampled_from(["tensor", "matrix_operator", "custom", "model", "non_finite"])),
        n=draw(st.integers(1, 40)), dtype=draw(st.sampled_from([torch.float64, torch.float64, torch.float32])),
        scale=draw(st.sampled_from([1e-3, 1.0, 1e4])),
        widths=draw(st.lists(st.integers(1, 4), min_size=2, max_size=3)), act=draw(st.sampled_from(["tanh", "sigmoid"])),
        multiplicity_check=draw(st.booleans()),
        bad_at=draw(st.integers(1, 30)), bad_value=draw(st.sampled_from([NAN, float("inf"), -float("inf")])),
        seed=draw(st.integers(0, 2**31 - 1)), **args)


def _resolve(expr, k, n):
    return eval(expr, {"min": min}, {"k": k, "n": n}) if isinstance(expr, str) else expr  # noqa: S307


def expected_error(k, which, tol, ncv, max_matvecs, v0_kind, n):
    """The first argument the eigsh docstring rules out, in the order eigsh checks them; None if valid."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        return "k"
    if which not in WHICH:
        return "which"
    if not isinstance(tol, (int, float)) or not tol > 0 or not math.isfinite(tol):
        return "tol"
    if ncv is not None and (isinstance(ncv, bool) or not isinstance(ncv, int) or not (k < ncv <= n or ncv == n >= k)):
        return "ncv"
    if max_matvecs is not None and (isinstance(max_matvecs, bool) or not isinstance(max_matvecs, int)
                                    or max_matvecs < k):
        return "max_matvecs"
    if v0_kind in ("zeros", "nan", "short", "complex", "list", "sparse") and not (v0_kind == "short" and n == 0):
        return "v0"
    return None


def make_v0(kind, n, gen):
    return {"none": lambda: None, "random": lambda: torch.randn(n, generator=gen, dtype=torch.float64),
            "int": lambda: torch.randint(1, 5, (n,), generator=gen), "zeros": lambda: torch.zeros(n),
            "nan": lambda: torch.full((n,), NAN), "short": lambda: torch.randn(n + 1, generator=gen),
            "complex": lambda: torch.randn(n, generator=gen, dtype=torch.complex128),
            "list": lambda: [1.0] * n, "sparse": lambda: torch.randn(n, generator=gen).to_sparse()}[kind]()


def check_eigsh_result(res, A, k, tol, dtype, caught, locked):
    assert res.eigenvalues.shape == (k,) and res.eigenvalues.dtype is torch.float64
    assert res.eigenvectors.shape == (A.shape[0], k)
    lam = res.eigenvalues
    assert torch.isfinite(lam).all() and (lam[1:] >= lam[:-1]).all(), lam
    unconverged_warned = any(issubclass(w.category, RuntimeWarning) and "did not converge" in str(w.message)
                             for w in caught)
    assert unconverged_warned == (not res.all_converged)
    true = torch.linalg.eigvalsh(A)
    anorm = float(true.abs().max()) or 1.0
    eps = float(torch.finfo(torch.float64 if dtype is torch.float64 else torch.float32).eps)
    # rounding level of the basis (full reorthogonalization keeps fp64 far below 1e6 eps; fp32 at ~1e3 eps)
    slack = (1e6 if dtype is torch.float64 else 1e3) * eps * anorm * max(1, A.shape[0])
    X = res.eigenvectors.double()
    actual = (A @ X - X * lam).norm(dim=0)
    for i in range(k):
        # the reported residual is the true one (an upper bound after multiplicity_check's lock),
        # and the Ritz value lies within it of an eigenvalue
        assert float(actual[i]) <= float(res.residuals[i]) * (1 + 1e-3) + slack, (actual, res.residuals)
        if not locked:
            assert float(res.residuals[i]) <= float(actual[i]) * (1 + 1e-3) + slack, (actual, res.residuals)
        assert float((true - lam[i]).abs().min()) <= float(actual[i]) * (1 + 1e-6) + slack
    return true, anorm


def wanted(true, k, which):
    e = true.numpy()
    s = np.sort(e)
    if which == "LA":
        sel = s[-k:]
    elif which == "SA":
        sel = s[:k]
    elif which == "LM":
        sel = e[np.argsort(-np.abs(e), kind="stable")[:k]]
    else:
        sel = np.concatenate([s[:k // 2], s[len(s) - (k - k // 2):]])
    return np.sort(sel)


def run_eigsh_case(case):
    gen = torch.Generator().manual_seed(case["seed"])
    n, dtype = case["n"], case["dtype"]
    if case["kind"] == "model":
        op, A = mlp_problem(gen, case["widths"], case["act"])
        n, dtype = op.shape[0], torch.float64
        v = torch.randn(n, generator=gen, dtype=torch.float64)
        Av = A @ v  # fp64 both ways: equal to fp64 rounding of the vector's scale
        torch.testing.assert_close(op.matvec(v), Av, rtol=1e-12, atol=1e-12 * float(Av.abs().max()) + 1e-300)
    else:
        A, _ = known_spectrum(n, gen, case["scale"])
        op = {"tensor": lambda: A.to(dtype), "matrix_operator": lambda: MatrixOperator(A.to(dtype)),
              "custom": lambda: CountingOperator(A.to(dtype)),
              "non_finite": lambda: CountingOperator(A.to(dtype), case["bad_at"], case["bad_value"])}[case["kind"]]()
        A = A.to(dtype).double()  # the matrix the operator really applies
    k = _resolve(case["k"], None, n)
    ncv = _resolve(case["ncv"], k if isinstance(k, int) else 1, n) if case["ncv"] != "None" else None
    max_matvecs = _resolve(case["max_matvecs"], k if isinstance(k, int) else 1, n) if case["max_matvecs"] != "None" else None
    v0 = make_v0(case["v0"], n, gen)
    which, tol = case["which"], case["tol"]
    bad = expected_error(k, which, tol, ncv, max_matvecs, case["v0"], n)
    kwargs = dict(k=k, which=which, tol=tol, ncv=ncv, max_matvecs=max_matvecs, v0=v0,
                  generator=torch.Generator().manual_seed(case["seed"]), multiplicity_check=case["multiplicity_check"])
    if bad is not None:
        with pytest.raises((ValueError, TypeError)) as info:
            eigsh(op, **kwargs)
        assert str(info.value).startswith(f"{bad} must"), (bad, str(info.value))
        return "rejected"
    if case["kind"] == "non_finite":
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = eigsh(op, **kwargs)
        except FloatingPointError as e:
            assert op.calls >= op.bad_at and "non-finite" in str(e)
            return "non-finite: raised"
        assert op.calls < op.bad_at, "a non-finite product went unnoticed"
        check_eigsh_result(res, A, k, tol, dtype, caught, case["multiplicity_check"])
        return "non-finite: finished before it"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = eigsh(op, **kwargs)
    true, anorm = check_eigsh_result(res, A, k, tol, dtype, caught, case["multiplicity_check"])
    # LM with a basis too small to keep both ends' next candidates may settle on the wrong end
    # (documented, like ARPACK), and says so
    basis = ncv if ncv is not None else min(n, max(2 * k + 1, 20))
    unguarded_lm = which == "LM" and basis < min(n, k + 3)
    warned = any(issubclass(w.category, UserWarning) and "wrong end" in str(w.message) for w in caught)
    assert warned == unguarded_lm, (warned, basis, k, n)
    if res.all_converged and tol <= 1e-6 and dtype is torch.float64 and case["kind"] != "model" and not unguarded_lm:
        # well-separated spectrum, tight tol: exactly the wanted eigenvalues
        np.testing.assert_allclose(res.eigenvalues.numpy(), wanted(true, k, which), rtol=0, atol=1e-5 * anorm)
    return "accepted"


@child_only
@FUZZ
@given(case=eigsh_cases())
def test_eigsh_fuzz_body(case):
    log_case(repr(case))
    event(f"eigsh {case['kind']}: {run_eigsh_case(case)}")


def test_eigsh_fuzz_in_child_process(request, tmp_path, seed):
    if CHILD:
        pytest.skip("this is the child")
    run_in_child(__file__, "test_eigsh_fuzz_body",
                 10 * EXAMPLES if request.config.getoption("--runslow") else EXAMPLES, tmp_path, seed)


@st.composite
def stochastic_cases(draw):
    return dict(fn=draw(st.sampled_from(["trace", "density"])), n=draw(st.integers(1, 30)),
                num_probes=draw(st.sampled_from([2, 5, 1, 0, True, 2.0])),
                num_runs=draw(st.sampled_from([1, 3, 0, True])), num_steps=draw(st.sampled_from([1, 5, 40, 0, 1.5])),
                num_points=draw(st.sampled_from([2, 50, 1, "50"])),
                sigma=draw(st.sampled_from([None, None, 0.1, 0.0, -1.0, NAN, float("inf"), "0.1"])),
                seed=draw(st.sampled_from([None, 0, 7, -1, 1.5, "x", True])),
                bad_at=draw(st.sampled_from([None, None, 1, 3, 10])), seed_data=draw(st.integers(0, 2**31 - 1)))


def _bad_int(v, lo):
    return isinstance(v, bool) or not isinstance(v, int) or v < lo


def run_stochastic_case(case):
    gen = torch.Generator().manual_seed(case["seed_data"])
    A, evals = known_spectrum(case["n"], gen, 1.0)
    op = CountingOperator(A, case["bad_at"])
    seed_bad = case["seed"] is not None and (isinstance(case["seed"], bool) or not isinstance(case["seed"], int))
    if case["fn"] == "trace":
        bad = "num_probes" if _bad_int(case["num_probes"], 2) else ("seed" if seed_bad else None)
        call = lambda: trace(op, num_probes=case["num_probes"], seed=case["seed"])  # noqa: E731
    else:
        s = case["sigma"]
        sigma_bad = s is not None and (isinstance(s, bool) or not isinstance(s, (int, float))
                                       or not math.isfinite(s) or not s > 0)
        bad = next((name for name, v, lo in (("num_runs", case["num_runs"], 1), ("num_steps", case["num_steps"], 1),
                                             ("num_points", case["num_points"], 2)) if _bad_int(v, lo)), None)
        bad = bad or ("seed" if seed_bad else None) or ("sigma" if sigma_bad else None)
        call = lambda: density(op, num_runs=case["num_runs"], num_steps=case["num_steps"],  # noqa: E731
                               num_points=case["num_points"], sigma=s, seed=case["seed"])
    if bad is not None:
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        assert str(info.value).startswith(f"{bad} must"), (bad, str(info.value))
        assert op.calls == 0, "a product was computed before the arguments were checked"
        return "rejected"
    try:
        out = call()
    except FloatingPointError:
        assert op.bad_at is not None and op.calls >= op.bad_at
        return "non-finite: raised"
    assert op.bad_at is None or op.calls < op.bad_at, "a non-finite product went unnoticed"
    if case["fn"] == "trace":
        assert math.isfinite(out.estimate) and math.isfinite(out.stderr) and out.num_matvecs == case["num_probes"]
        if case["num_probes"] >= 5:  # a Student t with >= 4 dof beyond 50: ~1e-6
            assert abs(out.estimate - float(evals.sum())) <= 50 * out.stderr + 1e-8 * case["n"] * float(evals.abs().max())
    else:
        assert np.isfinite(out.density).all() and np.isfinite(out.grid).all() and 0 <= out.positive_fraction <= 1 + 1e-12
        assert abs(np.trapezoid(out.density, out.grid) - 1) < 1e-6
        nodes = np.concatenate(out.nodes)  # Ritz values lie inside the spectrum
        assert nodes.min() >= float(evals.min()) - 1e-8 and nodes.max() <= float(evals.max()) + 1e-8
        assert out.grid.min() <= nodes.min() and out.grid.max() >= nodes.max()
    return "accepted"


@child_only
@FUZZ
@given(case=stochastic_cases())
def test_trace_density_fuzz_body(case):
    log_case(repr(case))
    event(f"{case['fn']}: {run_stochastic_case(case)}")


def test_trace_density_fuzz_in_child_process(request, tmp_path, seed):
    if CHILD:
        pytest.skip("this is the child")
    run_in_child(__file__, "test_trace_density_fuzz_body",
                 10 * EXAMPLES if request.config.getoption("--runslow") else EXAMPLES, tmp_path, seed)
