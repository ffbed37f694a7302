"""HVP counts of fusedopt.hessian.eigsh vs power iteration with deflation (PyHessian's method) and
scipy.sparse.linalg.eigsh, and the share of time outside HVPs on a ~1M-parameter conv net.

Model (counts): MLP 20-32-32-10 (tanh, 2058 params) trained 100 steps with fusedopt.Adam on 1024 points
from 10 Gaussian clusters (fusedopt.hessian.cli.synthetic_problem). tol = 1e-3 for every method.
"""
import json
import os
import platform
import subprocess
import time

import numpy as np
import torch

import fusedopt
from fusedopt.hessian import HessianOperator, eigsh
from fusedopt.hessian.cli import synthetic_problem


def power_deflation(op, k, tol, max_iter=1000, seed=0):
    """PyHessian-style: power iteration per eigenvalue, deflating found ones; stop when the
    relative change of the Rayleigh quotient is below tol."""
    g = torch.Generator().manual_seed(seed)
    found, vecs, n_mv = [], [], 0
    for _ in range(k):
        v = torch.randn(op.shape[0], generator=g, dtype=op.dtype)
        v /= v.norm()
        lam = None
        for _ in range(max_iter):
            for u in vecs:
                v -= (u @ v) * u
            v /= v.norm()
            hv = op.matvec(v)
            n_mv += 1
            new = float(v @ hv)
            for u, l in zip(vecs, found):
                hv -= l * (u @ v) * u
            if lam is not None and abs(new - lam) <= tol * abs(new) + 1e-12:
                lam = new
                break
            lam = new
            v = hv / hv.norm()
        found.append(lam)
        vecs.append(v / v.norm())
    return sorted(found), n_mv


def scipy_eigsh(op, k, which, tol):
    from scipy.sparse.linalg import LinearOperator, eigsh as sp_eigsh
    count = [0]

    def mv(x):
        count[0] += 1
        return op.matvec(torch.from_numpy(np.asarray(x, dtype=np.float32).ravel())).numpy().astype(np.float64)
    L = LinearOperator(op.shape, matvec=mv, dtype=np.float64)
    vals = sp_eigsh(L, k=k, which=which, tol=tol, return_eigenvectors=False)
    return sorted(vals.tolist()), count[0]


def counts():
    model, X, y = synthetic_problem(0)
    opt = fusedopt.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    op = HessianOperator(model, torch.nn.functional.cross_entropy, (X, y))
    exact = torch.linalg.eigvalsh(torch.stack([op.matvec(e) for e in torch.eye(op.shape[0])]).double())
    rows = []
    for name, k, which in [("top-1", 1, "LA"), ("top-5", 5, "LA"), ("most negative", 1, "SA")]:
        r = eigsh(op, k=k, which=which, tol=1e-3)
        ref = exact[-k:] if which == "LA" else exact[:k]
        row = {"task": name, "fusedopt_hvps": r.num_matvecs, "fusedopt_converged": bool(r.all_converged),
               "fusedopt_max_rel_err": float(((r.eigenvalues - ref).abs() / ref.abs()).max())}
        s_vals, s_n = scipy_eigsh(op, k, which, 1e-3)
        row.update(scipy_hvps=s_n, scipy_max_rel_err=float(((torch.tensor(s_vals) - ref).abs() / ref.abs()).max()))
        if which == "LA":
            p_vals, p_n = power_deflation(op, k, 1e-3)
            row.update(power_hvps=p_n, power_max_rel_err=float(((torch.tensor(p_vals, dtype=torch.float64) - ref).abs() / ref.abs()).max()))
        rows.append(row)
    return rows


class Timed:
    def __init__(self, op):
        self.op, self.shape, self.dtype, self.device, self.seconds = op, op.shape, op.dtype, op.device, 0.0

    def matvec(self, x):
        t = time.perf_counter()
        y = self.op.matvec(x)
        self.seconds += time.perf_counter() - t
        return y


def conv_overhead():
    torch.manual_seed(0)
    c = 96
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, c, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.Tanh(),
        torch.nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), torch.nn.Tanh(),
        torch.nn.Conv2d(2 * c, 2 * c, 3, padding=1), torch.nn.Tanh(),
        torch.nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), torch.nn.Tanh(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4 * c, 10))
    X, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    op = Timed(HessianOperator(model, torch.nn.functional.cross_entropy, (X, y)))
    t = time.perf_counter()
    r = eigsh(op, k=5, tol=1e-3, max_matvecs=40)
    total = time.perf_counter() - t
    return {"model": f"5-layer tanh conv net, {op.shape[0]} params, batch 32x3x32x32", "hvps": r.num_matvecs,
            "seconds": total, "hvp_seconds": op.seconds, "fraction_outside_hvp": (total - op.seconds) / total}


def main():
    torch.set_num_threads(max(1, os.cpu_count() // 2))
    rows = counts()
    print(f"{'task':15s} {'fusedopt':>9s} {'power':>7s} {'scipy':>7s}   rel.err fusedopt/power/scipy")
    for r in rows:
        print(f"{r['task']:15s} {r['fusedopt_hvps']:9d} {r.get('power_hvps', '-')!s:>7s} {r['scipy_hvps']:7d}   "
              f"{r['fusedopt_max_rel_err']:.1e}/{r.get('power_max_rel_err', float('nan')):.1e}/{r['scipy_max_rel_err']:.1e}")
    conv = conv_overhead()
    print(f"conv net: {conv['model']}: {conv['hvps']} HVPs, {conv['seconds']:.1f} s, "
          f"outside HVPs {100 * conv['fraction_outside_hvp']:.2f}%")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"device": platform.processor() or platform.machine(), "torch": torch.__version__, "commit": commit,
           "counts": rows, "conv_overhead": conv}
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "hessian_cpu.json"), "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
