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
    eye = torch.eye(op.shape[0], dtype=torch.float64)
    h = torch.stack([op.matvec(eye[i]) for i in range(op.shape[0])], dim=1)
    return float(torch.linalg.eigvalsh(0.5 * (h + h.T))[-1])


def test_tracks_the_dense_top_eigenvalue_with_warm_starts(seed):
    model, loss_fn, x, y = problem(seed)
    opt = fusedopt.SGD(model.parameters(), lr=0.05)
    tracker = SharpnessTracker(model, loss_fn, (x, y), optimizer=opt, tol=1e-3, seed=seed)
    for step in range(24):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        if step % 4 == 0:
            record = tracker.update(step)
            assert record.threshold == pytest.approx(2 / 0.05) and record.converged and record.step == step
            if step % 8 == 0:  # a dense Hessian costs n HVPs: every other estimate
                want = dense_top(HessianOperator(model, loss_fn, (x, y)))
                assert abs(record.sharpness[0] - want) <= 2e-3 * abs(want), (step, record.sharpness[0], want)
    hvps = [r.num_hvps for r in tracker.history]
    assert len(hvps) == 6 and sum(hvps[1:]) / 5 < hvps[0]  # warm starts are cheaper than the cold one


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
