"""The Hessian report (issue 16 item 3): the positive fraction and its standard error (one
estimator for density() and analyze()), the order of the eigenvalues, flat directions, the
condition number of a saddle, the loss, the plot and the spectrum command's output.

Known spectra come from explicit symmetric matrices; analyze() sees one through a model whose
loss is the quadratic 0.5 theta^T A theta, whose Hessian is exactly A."""
import math
import re

import numpy as np
import pytest
import torch

from fusedopt.hessian import KIND_THRESHOLD, KINDS, PLOT_FLOOR, HessianOperator, analyze, classify, density
from test_hessian_lanczos import random_symmetric


class Quadratic(torch.nn.Module):
    """loss = 0.5 theta^T A theta: gradient A theta, Hessian A."""

    def __init__(self, A, g):
        super().__init__()
        self.A = A
        self.theta = torch.nn.Parameter(torch.randn(A.shape[0], dtype=A.dtype, generator=g))

    def forward(self, x):
        return 0.5 * self.theta @ (self.A @ self.theta)


def identity_loss(out, target):
    return out


DATA = (torch.zeros(1, 1), torch.zeros(1))  # one "batch": the model ignores it


def quadratic(evals, g):
    A = random_symmetric(evals, g)
    return A, Quadratic(A, g)


def gapped_spectrum(g, n=300):
    """Eigenvalues well away from 0 (gap of ~3 sigma each side): the smoothing bias is negligible,
    so the estimate should find the exact positive fraction within its standard error."""
    neg = int(n * (0.25 + 0.2 * float(torch.rand(1, generator=g))))
    return torch.cat([-torch.linspace(0.25, 2, neg, dtype=torch.float64),
                      torch.linspace(0.25, 5, n - neg, dtype=torch.float64)])


def cluster_spectrum(g):
    """Like a network's Hessian: 30% of the eigenvalues in a tight cluster at 0 (both signs).
    Counting the Ritz weights above 0 flips this cluster in or out per probe."""
    return torch.cat([1e-4 * torch.randn(120, generator=g, dtype=torch.float64),
                      -torch.linspace(0.02, 1, 120, dtype=torch.float64),
                      torch.linspace(0.02, 3, 160, dtype=torch.float64)])


def smoothed_target(evals, sigma):
    """What the estimator estimates: the exact spectrum's mass on lambda > 0 after the same smoothing."""
    return float(torch.special.ndtr(evals / sigma).mean())


# ---- the positive fraction and its standard error ---------------------------------------------

def test_positive_fraction_finds_the_exact_fraction_within_its_stderr(seed):
    g = torch.Generator().manual_seed(seed)
    evals = gapped_spectrum(g)
    d = density(random_symmetric(evals, g), num_runs=16, num_steps=30, seed=seed + 1)
    exact = float((evals > 0).double().mean())
    # t with 15 dof beyond 5: ~2e-4; the standard error is the spread over probes, not 0 or huge
    assert 1e-4 < d.positive_fraction_stderr < 0.03
    assert abs(d.positive_fraction - exact) <= 5 * d.positive_fraction_stderr, (d.positive_fraction, exact)


def test_positive_fraction_is_the_plotted_density_mass_above_zero(seed):
    g = torch.Generator().manual_seed(seed)
    d = density(random_symmetric(cluster_spectrum(g), g), num_runs=3, num_steps=30, num_points=40001, seed=seed)
    above = d.grid > 0
    mass = np.trapezoid(d.density[above], d.grid[above])
    assert abs(d.positive_fraction - mass) < 1e-3
    near = (d.grid >= -d.sigma) & (d.grid <= d.sigma)
    assert abs(d.near_zero_fraction - np.trapezoid(d.density[near], d.grid[near])) < 1e-3


def test_stderr_matches_the_spread_across_seeds(seed):
    g = torch.Generator().manual_seed(seed)
    A = random_symmetric(gapped_spectrum(g), g)
    runs = [density(A, num_runs=8, num_steps=25, seed=seed + i) for i in range(1, 13)]
    spread = float(np.std([d.positive_fraction for d in runs], ddof=1))
    typical_se = math.sqrt(np.mean([d.positive_fraction_stderr ** 2 for d in runs]))
    # 12 estimates: their sample spread is within a factor 2 of the truth with ~99.9% probability
    assert 0.4 < spread / typical_se < 2.5, (spread, typical_se)


def test_budgets_agree_on_a_cluster_at_zero(seed):
    """The bug of issue 16: analyze's 4 x 40 and density's 10 x 80 gave 0.523 and 0.416 for an exact
    0.514. Both budgets now estimate the same smoothed quantity within their standard errors."""
    g = torch.Generator().manual_seed(seed)
    evals = cluster_spectrum(g)
    A = random_symmetric(evals, g)
    small = density(A, num_runs=8, num_steps=40, seed=seed)
    large = density(A, num_runs=12, num_steps=80, seed=seed)
    se = math.hypot(small.positive_fraction_stderr, large.positive_fraction_stderr)
    assert abs(small.positive_fraction - large.positive_fraction) <= 4 * se
    for d in (small, large):
        assert abs(d.positive_fraction - smoothed_target(evals, d.sigma)) <= 5 * d.positive_fraction_stderr
        # near_zero_fraction: the smoothed mass on [-sigma, sigma] (the cluster, seen through the smoothing)
        t = evals / d.sigma
        near = float((torch.special.ndtr(1 - t) - torch.special.ndtr(-1 - t)).mean())
        assert near > 0.2 and abs(d.near_zero_fraction - near) < 0.05, (d.near_zero_fraction, near)


def test_one_run_has_no_stderr(seed):
    g = torch.Generator().manual_seed(seed)
    d = density(random_symmetric(gapped_spectrum(g, 50), g), num_runs=1, num_steps=20, seed=seed)
    assert 0 <= d.positive_fraction <= 1 and math.isnan(d.positive_fraction_stderr)


def test_analyze_and_density_agree(seed):
    g = torch.Generator().manual_seed(seed)
    evals = gapped_spectrum(g, 200)
    A, model = quadratic(evals, g)
    rep = analyze(model, identity_loss, DATA, k=2, seed=seed, density_runs=12, density_steps=40)
    # The same probes and the same estimator: the same number.
    same = density(HessianOperator(model, identity_loss, DATA), num_runs=12, num_steps=40, seed=seed)
    assert (rep.minimum_ratio, rep.minimum_ratio_stderr) == (same.positive_fraction, same.positive_fraction_stderr)
    # density's default budget on the matrix itself: within the standard errors of both.
    other = density(A, seed=seed)
    assert abs(rep.minimum_ratio - other.positive_fraction) <= 4 * math.hypot(rep.minimum_ratio_stderr,
                                                                              other.positive_fraction_stderr)
    exact = float((evals > 0).double().mean())
    assert abs(rep.minimum_ratio - exact) <= 5 * rep.minimum_ratio_stderr


# ---- analyze: order, kind, condition number, loss ----------------------------------------------

def test_eigenvalue_order_and_loss(seed):
    g = torch.Generator().manual_seed(seed)
    evals = torch.cat([torch.linspace(-3, -0.5, 20), torch.linspace(0.5, 6, 40)]).double()
    evals = evals + 0.01 * torch.rand(60, generator=g, dtype=torch.float64)
    A, model = quadratic(evals, g)
    rep = analyze(model, identity_loss, DATA, k=4, tol=1e-10, seed=seed)
    s = torch.sort(evals).values
    np.testing.assert_allclose(rep.top_eigenvalues, s.flip(0)[:4].numpy(), rtol=1e-8)  # largest first
    np.testing.assert_allclose(rep.bottom_eigenvalues, s[:4].numpy(), rtol=1e-8)  # smallest first
    assert all(0 <= e <= 1e-8 * 6 for e in rep.top_errors + rep.bottom_errors)
    theta = model.theta.detach()
    assert rep.loss == pytest.approx(float(0.5 * theta @ A @ theta), rel=1e-12)
    assert rep.grad_norm == pytest.approx(float((A @ theta).norm()), rel=1e-10)
    assert rep.num_params == 60
    text = str(rep)
    assert "(largest first)" in text and "(smallest first)" in text and f"{rep.loss:.6g}" in text


def test_tiny_negative_eigenvalues_are_flat_not_a_saddle(seed):
    g = torch.Generator().manual_seed(seed)
    top = 1 + 4 * float(torch.rand(1, generator=g))
    tiny = -top * KIND_THRESHOLD * torch.rand(5, generator=g, dtype=torch.float64).clamp_min(0.05) * 0.9
    evals = torch.cat([tiny, torch.linspace(0.1, top, 55, dtype=torch.float64)])
    _, model = quadratic(evals, g)
    rep = analyze(model, identity_loss, DATA, k=2, tol=1e-8, seed=seed)
    assert rep.bottom_eigenvalues[0] < 0  # really negative, but tiny against lambda_max
    assert rep.kind == "minimum (flat directions)" and rep.escape_direction is None
    lmin = float(tiny.min())
    assert math.isfinite(rep.condition_number)
    assert rep.condition_number == pytest.approx(top / abs(lmin), rel=1e-6)
    assert rep.condition_signs == "lambda_max > 0, lambda_min < 0"
    assert "minimum (flat directions)" in str(rep) and "none (no significant negative curvature)" in str(rep)
    # the same matrix negated: a maximum with flat directions
    _, neg = quadratic(-evals, g)
    rep = analyze(neg, identity_loss, DATA, k=2, tol=1e-8, seed=seed)
    assert rep.kind == "maximum (flat directions)" and rep.escape_direction is not None


def test_real_saddle_has_a_finite_condition_number_with_signs(seed):
    g = torch.Generator().manual_seed(seed)
    lmin = -(0.05 + 2 * float(torch.rand(1, generator=g)))  # 5% to 200% of lambda_max = 1
    evals = torch.cat([torch.linspace(lmin, -0.01, 20, dtype=torch.float64),
                       torch.linspace(0.01, 1.0, 40, dtype=torch.float64)])
    A, model = quadratic(evals, g)
    rep = analyze(model, identity_loss, DATA, k=2, tol=1e-8, seed=seed)
    assert rep.kind == "saddle"
    big, small = max(1.0, -lmin), min(1.0, -lmin)
    assert rep.condition_number == pytest.approx(big / small, rel=1e-6)
    assert rep.condition_signs == "lambda_max > 0, lambda_min < 0"
    ratio = "|lambda_max| / |lambda_min|" if 1.0 >= -lmin else "|lambda_min| / |lambda_max|"
    line = next(x for x in str(rep).splitlines() if "condition number" in x)
    assert line.endswith(f"= {ratio} (lambda_max > 0, lambda_min < 0)") and "inf" not in line
    # the escape direction is the eigenvector of lambda_min
    w, Q = torch.linalg.eigh(A)
    x = torch.cat([t.reshape(-1) for t in rep.escape_direction])
    assert abs(float(x @ Q[:, 0])) == pytest.approx(1.0, abs=1e-6)


def test_positive_definite_is_a_minimum(seed):
    g = torch.Generator().manual_seed(seed)
    lo = 0.2 + float(torch.rand(1, generator=g))  # > 5 sigma from 0: no smoothing mass below 0
    _, model = quadratic(torch.linspace(lo, 3, 50, dtype=torch.float64), g)
    rep = analyze(model, identity_loss, DATA, k=2, tol=1e-8, seed=seed)
    assert rep.kind == "minimum" and rep.escape_direction is None
    assert rep.condition_number == pytest.approx(3 / lo, rel=1e-6)
    assert rep.condition_signs == "lambda_max > 0, lambda_min > 0"
    assert rep.minimum_ratio > 0.99


@pytest.mark.parametrize("lmax,lmin,emax,emin,kind", [
    (1.0, 0.5, 0.0, 0.0, "minimum"),
    (1.0, -0.9e-3, 0.0, 0.0, "minimum (flat directions)"),   # tiny against lambda_max
    (1.0, 0.9e-3, 0.0, 0.0, "minimum (flat directions)"),
    (1.0, -0.02, 0.0, 0.05, "minimum (flat directions)"),    # within its error of 0
    (1.0, -0.02, 0.0, 0.01, "saddle"),
    (1.0, -1.1e-3, 0.0, 0.0, "saddle"),
    (-0.5, -1.0, 0.0, 0.0, "maximum"),
    (1e-4, -1.0, 0.0, 0.0, "maximum (flat directions)"),
    (1e-3, -1e-3, 0.01, 0.01, "degenerate"),                 # nothing beyond the errors
    (0.0, 0.0, 0.0, 0.0, "degenerate"),
])
def test_classify(lmax, lmin, emax, emin, kind, seed):
    scale = 10.0 ** float(torch.randint(-6, 6, (1,)))  # the rule is scale-free
    assert kind in KINDS and classify(lmax * scale, lmin * scale, emax * scale, emin * scale) == kind


@pytest.mark.parametrize("args,match", [
    ((1.0, 2.0), "lambda_max >= lambda_min"),
    ((1.0, 0.0, -1.0, 0.0), "errors >= 0"),
    ((float("nan"), 0.0), "lambda_max must be a finite number"),
    (("1", 0.0), "lambda_max must be a finite number"),
])
def test_classify_validates(args, match):
    with pytest.raises(ValueError, match=match):
        classify(*args)


@pytest.mark.parametrize("kw,match", [
    (dict(k=0), "k must be an int >= 1"),
    (dict(density_runs=0), "density_runs must be an int >= 1"),
    (dict(density_steps=1.5), "density_steps must be an int >= 1"),
    (dict(seed=None), "seed must be an int"),
])
def test_analyze_validates_before_any_hvp(kw, match, seed):
    g = torch.Generator().manual_seed(seed)
    _, model = quadratic(torch.linspace(1, 2, 10, dtype=torch.float64), g)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises((ValueError, TypeError), match=match):
        analyze(model, identity_loss, DATA, **kw)
    assert not calls


# ---- plot ---------------------------------------------------------------------------------------

def outlier_report(seed):
    """A bulk in [-1, 1] and outliers near 10: the density falls far below the floor in the gap."""
    g = torch.Generator().manual_seed(seed)
    evals = torch.cat([torch.linspace(-1, 1, 60, dtype=torch.float64), 9 + torch.rand(3, generator=g).double()])
    _, model = quadratic(evals, g)
    return analyze(model, identity_loss, DATA, k=2, seed=seed)


def test_plot_masks_below_the_floor_legend_outside_title(seed, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    rep = outlier_report(seed)
    fig = rep.figure()
    ax = fig.axes[0]
    title = ax.get_title()
    assert f"{rep.num_params} parameters" in title and f"sigma = {rep.density.sigma:.3g}" in title
    assert f"{rep.minimum_ratio:.3f} +/- {rep.minimum_ratio_stderr:.3f}" in title
    curve = ax.get_lines()[0].get_ydata()
    floor = PLOT_FLOOR * rep.density.density.max()
    # below the floor the curve is not drawn (masked), not drawn as a flat line at a clipping value
    assert np.ma.is_masked(curve) and np.array_equal(np.ma.getmaskarray(curve), rep.density.density < floor)
    assert curve.compressed().min() >= floor and ax.get_ylim()[0] == pytest.approx(floor)
    FigureCanvasAgg(fig).draw()
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    fig_box = fig.bbox
    assert legend.x0 >= axes.x1 and legend.x1 <= fig_box.x1  # outside the axes, inside the figure
    path = tmp_path / "spectrum.png"
    rep.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install(seed, monkeypatch, tmp_path):
    import sys
    rep = outlier_report(seed)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=re.escape('pip install ".[plot]"') + ".*pip install matplotlib"):
        rep.plot(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
