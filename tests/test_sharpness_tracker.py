"""SharpnessTracker (issue 15): warm-started top-eigenvalue estimates during training against
the dense Hessian's, the optimizer's threshold in every record, the preconditioned variant
against dense P^-1/2 H P^-1/2, the plot, and its refusals."""
from __future__ import annotations

import pytest
import torch

import fusedopt
from fusedopt.hessian import HessianOperator, SharpnessTracker, preconditioned


def problem(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).double()
    x, y = torch.randn(64, 6, dtype=torch.float64), torch.randint(0, 3, (64,))
    return model, torch.nn.functional.cross_entropy, x, y


def dense_top(op) -> float:
    h = op.matmat(torch.eye(op.shape[0], dtype=torch.float64))  # column i: H e_i
    return float(torch.linalg.eigvalsh(0.5 * (h + h.T))[-1])


def track(seed, steps=80, every=4, check_every=5):
    """SGD on problem(seed), an estimate every ``every`` steps, every ``check_every``-th
    estimate against the dense top eigenvalue (a dense Hessian costs n HVPs)."""
    model, loss_fn, x, y = problem(seed)
    opt = fusedopt.SGD(model.parameters(), lr=0.05)
    tracker = SharpnessTracker(model, loss_fn, (x, y), optimizer=opt, tol=1e-3, seed=seed)
    for step in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        if step % every == 0:
            record = tracker.update(step)
            assert record.threshold == pytest.approx(2 / 0.05) and record.converged and record.step == step
            if len(tracker.history) % check_every == 1:
                want = dense_top(HessianOperator(model, loss_fn, (x, y)))
                assert abs(record.sharpness[0] - want) <= 2e-3 * abs(want), (seed, step, record.sharpness[0], want)
    return [r.num_hvps for r in tracker.history]


def test_tracks_the_dense_top_eigenvalue_in_few_hvps_per_warm_estimate(seed):
    # The target: <= 4 HVPs per warm estimate on average at tol 1e-3, each estimate
    # within 2e-3 of the dense truth. Per run the mean varies (100 seeds: 2.99 +- 0.66, 6 of
    # them above 4, on problems whose top two eigenvalues nearly meet); over 5 runs the mean
    # exceeding 4 is a 3.4-sigma event. Without the extrapolated start it was 4.5.
    runs = [track(seed * 5 + i) for i in range(5)]
    warm = [h for hvps in runs for h in hvps[1:]]
    assert sum(warm) / len(warm) <= 4, runs
    assert all(sum(h[1:]) / len(h[1:]) < h[0] for h in runs), runs  # warm starts are cheaper than cold ones


def test_extrapolated_start_follows_the_step_spacing(seed):
    model, loss_fn, x, y = problem(seed)
    tracker = SharpnessTracker(model, loss_fn, (x, y))
    assert tracker.warm_start(0) is None  # first estimate: random
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(tracker.op.shape[0], dtype=torch.float64, generator=g)
    x0 /= x0.norm()
    x1 = x0 + 0.1 * torch.randn(x0.shape, dtype=torch.float64, generator=g)
    x1 /= x1.norm()
    tracker._anchors = [(10, x1)]
    assert torch.equal(tracker.warm_start(14), x1)  # one anchor: the old eigenvector
    tracker._anchors = [(6, -x0), (10, x1)]  # eigenvectors have no sign: -x0 is x0
    assert torch.allclose(tracker.warm_start(14), 2 * x1 - x0, rtol=0, atol=1e-15)
    assert torch.allclose(tracker.warm_start(12), 1.5 * x1 - 0.5 * x0, rtol=0, atol=1e-15)
    assert torch.allclose(tracker.warm_start(100), 3 * x1 - 2 * x0, rtol=0, atol=1e-15)  # capped at 2
    far = torch.randn(x0.shape, dtype=torch.float64, generator=g)
    far -= (far @ x1) * x1
    tracker._anchors = [(6, far / far.norm()), (10, x1)]  # the top eigenvector changed places
    assert torch.equal(tracker.warm_start(14), x1)


def test_preconditioned_tracker_follows_adams_preconditioner(seed):
    model, loss_fn, x, y = problem(seed)
    opt = fusedopt.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    tracker = SharpnessTracker(model, loss_fn, (x, y), optimizer=opt, k=2, tol=1e-6, preconditioned=True)
    record = tracker.update()
    want = dense_top(preconditioned(HessianOperator(model, loss_fn, (x, y)), opt))
    assert abs(record.sharpness[0] - want) <= 1e-5 * abs(want)
    assert record.sharpness[0] >= record.sharpness[1]  # largest first
    assert record.threshold == pytest.approx((2 + 2 * 0.9) / (0.1 * 1e-2))


def test_plot_writes_a_png(tmp_path, seed):
    pytest.importorskip("matplotlib")
    model, loss_fn, x, y = problem(seed)
    opt = fusedopt.SGD(model.parameters(), lr=0.05)
    tracker = SharpnessTracker(model, loss_fn, (x, y), optimizer=opt)
    for _ in range(2):
        tracker.update()
    path = tmp_path / "sharpness.png"
    tracker.plot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_are_refused(seed):
    model, loss_fn, x, y = problem(seed)
    with pytest.raises(ValueError, match="preconditioned=True needs the optimizer"):
        SharpnessTracker(model, loss_fn, (x, y), preconditioned=True)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        SharpnessTracker(model, loss_fn, (x, y), k=0)
    with pytest.raises(ValueError, match=r"tol must be a float in \(0, 1\)"):
        SharpnessTracker(model, loss_fn, (x, y), tol=2.0)
