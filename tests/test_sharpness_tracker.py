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


def dense_top(op, k=1):
    """The top eigenvalue (k = 1) or the k largest, largest first, of the dense operator."""
    h = op.matmat(torch.eye(op.shape[0], dtype=torch.float64))  # column i: H e_i
    top = torch.linalg.eigvalsh(0.5 * (h + h.T)).flip(0)[:k]
    return float(top[0]) if k == 1 else top.tolist()


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


def test_top_two_start_from_both_eigenvectors(seed):
    # k = 2 starts from the sum of both extrapolated eigenvectors: 4.9 +- 0.9 HVPs per warm
    # estimate over 60 seeds (max 7.7), against 9.7 from the top eigenvector alone.
    hvps = []
    for run in range(3):
        model, loss_fn, x, y = problem(seed * 3 + run)
        opt = fusedopt.SGD(model.parameters(), lr=0.05)
        tracker = SharpnessTracker(model, loss_fn, (x, y), optimizer=opt, k=2, tol=1e-3)
        for step in range(80):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            if step % 4 == 0:
                record = tracker.update(step)
                assert record.converged
                if step % 40 == 0:
                    want = dense_top(HessianOperator(model, loss_fn, (x, y)), k=2)
                    for got, w in zip(record.sharpness, want):
                        assert abs(got - w) <= 2e-3 * abs(w), (run, step, record.sharpness, want)
        hvps += [r.num_hvps for r in tracker.history[1:]]
    assert sum(hvps) / len(hvps) <= 7, hvps


def test_extrapolated_start_follows_the_step_spacing(seed):
    model, loss_fn, x, y = problem(seed)
    tracker = SharpnessTracker(model, loss_fn, (x, y))
    assert tracker.warm_start(0) is None  # first estimate: random
    g = torch.Generator().manual_seed(seed)
    n = tracker.op.shape[0]
    x0, _ = torch.linalg.qr(torch.randn(n, 2, dtype=torch.float64, generator=g))
    x1, _ = torch.linalg.qr(x0 + 0.1 * torch.randn(n, 2, dtype=torch.float64, generator=g))
    x1 *= torch.sign((x0 * x1).sum(0))
    top0, top1 = x0[:, 1:], x1[:, 1:]  # k = 1: one column
    tracker._anchors = [(10, top1)]
    assert torch.equal(tracker.warm_start(14), top1[:, 0])  # one anchor: the old eigenvector
    tracker._anchors = [(6, -top0), (10, top1)]  # eigenvectors have no sign: -x0 is x0
    close = dict(rtol=0, atol=1e-15)
    assert torch.allclose(tracker.warm_start(14), (2 * top1 - top0)[:, 0], **close)
    assert torch.allclose(tracker.warm_start(12), (1.5 * top1 - 0.5 * top0)[:, 0], **close)
    assert torch.allclose(tracker.warm_start(100), (3 * top1 - 2 * top0)[:, 0], **close)  # capped at 2
    far = torch.randn(n, 1, dtype=torch.float64, generator=g)
    far -= (far.T @ top1) * top1
    tracker._anchors = [(6, far / far.norm()), (10, top1)]  # the top eigenvector changed places
    assert torch.equal(tracker.warm_start(14), top1[:, 0])
    # k = 2: the sum of the two extrapolated eigenvectors, each signed on its own.
    tracker._anchors = [(6, x0 * torch.tensor([1.0, -1.0], dtype=torch.float64)), (10, x1)]
    assert torch.allclose(tracker.warm_start(14), (2 * x1 - x0).sum(1), **close)


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
