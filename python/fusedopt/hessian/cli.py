"""fusedopt spectrum: train a small built-in model and show its Hessian spectrum before and after."""
from __future__ import annotations

import argparse
import sys

import torch

from .._cli_types import integer_at_least, positive_float


def _progress(total, desc):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc)
    except ImportError:
        class Simple:  # a plain text bar, updated in place
            def __init__(self):
                self.n = 0
            def update(self, k=1):
                self.n += k
                done = int(30 * self.n / total)
                sys.stderr.write(f"\r{desc} [{'#' * done}{'.' * (30 - done)}] {self.n}/{total}")
                sys.stderr.flush()
            def set_postfix_str(self, s):
                pass
            def close(self):
                sys.stderr.write("\n")
        return Simple()


def synthetic_problem(seed: int, n: int = 1024, dim: int = 20, classes: int = 10, hidden: int = 32):
    """Gaussian class clusters in `dim` dims and an MLP dim-hidden-hidden-classes with tanh."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    X = centers[y] + torch.randn(n, dim, generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
                                torch.nn.Tanh(), torch.nn.Linear(hidden, classes))
    return model, X, y


def spectrum_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fusedopt spectrum", description=__doc__)
    ap.add_argument("--steps", type=integer_at_least(0), default=300, help="training steps (default 300)")
    ap.add_argument("--lr", type=positive_float, default=1e-2, help="fusedopt.Adam learning rate (> 0)")
    ap.add_argument("--k", type=integer_at_least(1), default=5, help="eigenvalues from each end (>= 1)")
    ap.add_argument("--seed", type=integer_at_least(0), default=0)
    ap.add_argument("--plot-prefix", default="spectrum", help="plots go to PREFIX_init.png and PREFIX_final.png")
    ap.add_argument("--track-every", type=integer_at_least(0), default=0, metavar="N",
                    help="every N training steps, estimate the top Hessian eigenvalue and that of Adam's "
                         "preconditioned Hessian P^-1 H (warm-started), next to Adam's stability threshold; "
                         "the table and PREFIX_sharpness.png at the end (default 0: off)")
    args = ap.parse_args(argv)
    from .. import Adam
    from .analysis import analyze
    from .tracking import SharpnessTracker

    model, X, y = synthetic_problem(args.seed)
    loss_fn = torch.nn.functional.cross_entropy
    print(f"model: MLP 20-32-32-10 (tanh), {sum(p.numel() for p in model.parameters())} parameters; "
          f"data: {len(X)} points from 10 Gaussian clusters")
    # The step at which each report was taken; the report's loss is the training loss there.
    steps = {"init": 0, "final": args.steps}
    reports = {"init": analyze(model, loss_fn, (X, y), k=args.k, seed=args.seed)}
    opt = Adam(model.parameters(), lr=args.lr)
    trackers = {}
    if args.track_every:
        trackers = {kind: SharpnessTracker(model, loss_fn, (X, y), optimizer=opt, preconditioned=kind == "P^-1 H",
                                           seed=args.seed) for kind in ("H", "P^-1 H")}
    bar = _progress(args.steps, "training")
    for step in range(1, args.steps + 1):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix_str(f"loss {loss.item():.4f}")
        if args.track_every and step % args.track_every == 0:
            for tracker in trackers.values():
                tracker.update(step)
    bar.close()
    if trackers:
        _print_sharpness(trackers, f"{args.plot_prefix}_sharpness.png")
    reports["final"] = analyze(model, loss_fn, (X, y), k=args.k, seed=args.seed)
    for name, rep in reports.items():
        print(f"\n== {name}: step {steps[name]}, training loss {rep.loss:.6g} ==\n{rep}")
        path = f"{args.plot_prefix}_{name}.png"
        try:
            rep.plot(path)
            print(f"  plot: {path}")
        except ImportError as e:
            print(f"  plot skipped: {e}")
    return 0


def _print_sharpness(trackers, path: str) -> None:
    plain, pre = trackers["H"].history, trackers["P^-1 H"].history
    print("\nsharpness during training (top eigenvalue; Adam's threshold (2 + 2 beta1) / ((1 - beta1) lr) "
          "applies to P^-1 H):")
    print(f"{'step':>6} {'lambda_max(H)':>14} {'lambda_max(P^-1 H)':>19} {'threshold':>10} {'HVPs':>5}")
    for a, b in zip(plain, pre):
        print(f"{a.step:>6} {a.sharpness[0]:>14.5g} {b.sharpness[0]:>19.5g} {b.threshold:>10.5g} "
              f"{a.num_hvps + b.num_hvps:>5}")
    try:
        trackers["P^-1 H"].plot(path)
        print(f"  plot: {path}")
    except ImportError as e:
        print(f"  plot skipped: {e}")
