"""Block products (issue 15, "Curvature during training"): ``matmat(V)`` of the operators equals
the loop of their matvecs at fp64 tolerances and counts one product per column; trace (Hutchinson,
Hutch++) and density (SLQ) give the same results for a seed whatever the block size, with the
same product counts; block_size is checked before any product."""
from __future__ import annotations

import pytest
import torch

from fusedopt.hessian import (EmpiricalFisherOperator, GGNOperator, HessianOperator, MatrixOperator,
                              PreconditionedOperator, density, trace)
from fusedopt.hessian.operator import apply_block

F = torch.nn.functional
RTOL = 1e-10  # relative to the largest element of the reference


def close(got, want, rtol=RTOL):
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()


def bn_cnn():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Tanh(), torch.nn.Conv2d(3, 2, 3),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(2, 3)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def batches(shape, sizes=(7, 5)):
    return [(torch.randn(b, *shape, dtype=torch.float64), torch.randint(0, 3, (b,))) for b in sizes]


def loop(op, V):
    return torch.stack([op.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)


def operators():
    """(name, factory) of the operators whose matmat is checked against their matvecs."""
    mk = {
        "hessian mlp": lambda: HessianOperator(mlp(), F.cross_entropy, batches((4,))),
        "hessian mlp, a param block": lambda: HessianOperator(mlp(), F.cross_entropy, batches((4,)),
                                                              params=["2.weight", "0.bias"]),
        "hessian bn cnn eval": lambda: HessianOperator(bn_cnn(), F.cross_entropy, batches((2, 6, 6))),
        "hessian bn cnn train": lambda: HessianOperator(bn_cnn(), F.cross_entropy, batches((2, 6, 6)), mode="train"),
        "hessian forward_over_reverse": lambda: HessianOperator(mlp(), F.cross_entropy, batches((4,)),
                                                                method="forward_over_reverse"),
        "hessian forward_over_reverse, a param block": lambda: HessianOperator(
            mlp(), F.cross_entropy, batches((4,)), params=["2.weight", "0.bias"], method="forward_over_reverse"),
        "hessian forward_over_reverse bn cnn eval": lambda: HessianOperator(
            bn_cnn(), F.cross_entropy, batches((2, 6, 6)), method="forward_over_reverse"),
        "hessian forward_over_reverse bn cnn train": lambda: HessianOperator(
            bn_cnn(), F.cross_entropy, batches((2, 6, 6)), mode="train", method="forward_over_reverse"),
        "hessian batch_loss dicts": lambda: HessianOperator(
            mlp(), data=[{"x": x, "y": y} for x, y in batches((4,))],
            batch_loss=lambda m, b: F.cross_entropy(m(b["x"]), b["y"])),
        "ggn": lambda: GGNOperator(mlp(), F.cross_entropy, batches((4,))),
        "fisher": lambda: EmpiricalFisherOperator(mlp(), F.cross_entropy, batches((4,))),
        "fisher closure dicts": lambda: EmpiricalFisherOperator(
            mlp(), data=[{"x": x, "y": y} for x, y in batches((4,))], batch_output=lambda m, b: m(b["x"]),
            output_loss=lambda out, b: F.cross_entropy(out, b["y"])),
    }
    return list(mk.items())


@pytest.mark.parametrize("name, make", operators(), ids=[n for n, _ in operators()])
@pytest.mark.parametrize("b", [1, 5])
def test_matmat_equals_the_loop_of_matvecs(name, make, b, seed):
    op = make()
    V = torch.randn(op.shape[0], b, dtype=torch.float64)
    buffers = {k: t.clone() for k, t in op.model.named_buffers()}
    got = op.matmat(V)
    assert op.num_matvecs == b
    assert got.shape == (op.shape[0], b)
    for k, t in op.model.named_buffers():  # train mode: the running stats are restored
        torch.testing.assert_close(t, buffers[k], rtol=0, atol=0)
    want = loop(op, V)
    assert op.num_matvecs == 2 * b
    close(got, want)


@pytest.mark.parametrize("model, mode, vectorized", [(mlp, "train", True), (bn_cnn, "eval", True),
                                                    (bn_cnn, "train", False)])
def test_forward_over_reverse_blocks_are_one_vmap_where_no_buffer_changes(model, mode, vectorized, seed, recwarn):
    op = HessianOperator(model(), F.cross_entropy, batches((4,) if model is mlp else (2, 6, 6)), mode=mode,
                         method="forward_over_reverse")
    calls = []
    single = op._forward_over_reverse
    op._forward_over_reverse = lambda vs: calls.append(1) or single(vs)
    V = torch.randn(op.shape[0], 4, dtype=torch.float64)
    got = op.matmat(V)
    assert len(calls) == (0 if vectorized else 4)  # the loop makes one single product per column
    assert not [w for w in recwarn if "falling back" in str(w.message)]
    op._forward_over_reverse = single
    close(got, loop(op, V))


def test_matmat_of_a_preconditioned_operator(seed):
    a = torch.randn(9, 9, dtype=torch.float64)
    inner = MatrixOperator(a + a.T)
    op = PreconditionedOperator(inner, torch.rand(9, dtype=torch.float64) + 0.5)
    V = torch.randn(9, 4, dtype=torch.float64)
    close(op.matmat(V), loop(op, V))
    assert op.num_matvecs == 8


def test_matmat_checks_its_block(seed):
    op = HessianOperator(mlp(), F.cross_entropy, batches((4,)))
    n = op.shape[0]
    for bad in (torch.randn(n, dtype=torch.float64), torch.randn(n + 1, 2, dtype=torch.float64),
                torch.randn(n, 0, dtype=torch.float64)):
        with pytest.raises(ValueError, match=rf"V must be a 2-D tensor of shape \({n}, b\) with b >= 1"):
            op.matmat(bad)
    assert op.num_matvecs == 0


class NoMatmat:
    """A matrix as an operator with matvec only: the block paths loop over matvec."""

    def __init__(self, a):
        self.a, self.shape, self.dtype, self.device, self.num_matvecs = a, tuple(a.shape), a.dtype, a.device, 0

    def matvec(self, x):
        self.num_matvecs += 1
        return self.a @ x


class WrongMatmat(NoMatmat):
    def matmat(self, X):
        return self.a @ X[:, :1]


def spd(n, seed):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.linspace(-1.0, 4.0, n, dtype=torch.float64)) @ q.T


@pytest.mark.parametrize("method, probes", [("hutchinson", 20), ("hutch++", 21), ("hutch++", 13)])
def test_trace_is_the_same_for_every_block_size(method, probes, seed):
    """Same probes for a seed whatever the block size: the estimates agree to rounding, on a
    HessianOperator (batched double backward) and on an operator without matmat."""
    model, data = mlp(), batches((4,))
    for make in (lambda: HessianOperator(model, F.cross_entropy, data), lambda: NoMatmat(spd(30, seed))):
        base = make()
        results = {}
        for block in (1, 3, 8, 64, None):
            op = make() if block is not None else base
            r = trace(op, num_probes=probes, seed=seed, method=method, block_size=block)
            assert r.num_matvecs == op.num_matvecs == probes
            results[block] = r
        want = results[1]
        for block, r in results.items():
            assert abs(r.estimate - want.estimate) <= 1e-12 * max(1.0, abs(want.estimate)), (block, r, want)
            assert abs(r.stderr - want.stderr) <= 1e-10 * max(1e-300, abs(want.stderr)) + 1e-14, (block, r, want)


def test_density_is_the_same_for_every_block_size(seed):
    """SLQ runs in lockstep (one block product per step) are the runs one at a time, to rounding;
    a breakdown in some runs (a matrix with 6 distinct eigenvalues, 12 steps) stops only those."""
    model, data = mlp(), batches((4,))
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    few = (q * torch.tensor([-1.0, 0.5, 1.0, 2.0, 3.0, 5.0], dtype=torch.float64).repeat_interleave(
        torch.tensor([5, 5, 10, 10, 5, 5]))) @ q.T
    for make, steps in ((lambda: HessianOperator(model, F.cross_entropy, data), 15),
                        (lambda: MatrixOperator(few), 12)):
        results = {}
        for block in (1, 2, 5, None):
            op = make()
            results[block] = density(op, num_runs=5, num_steps=steps, num_points=50, seed=seed, block_size=block)
            assert results[block].num_matvecs == op.num_matvecs
        want = results[1]
        for block, r in results.items():
            assert r.num_matvecs == want.num_matvecs
            for a, b in zip(r.nodes, want.nodes):
                assert len(a) == len(b)
                torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), rtol=1e-9, atol=1e-9)
            assert abs(r.positive_fraction - want.positive_fraction) < 1e-9
    assert results[1].num_matvecs == 5 * 6  # every run broke down after the 6 distinct eigenvalues


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "8"])
def test_block_size_is_checked_before_any_product(bad, seed):
    op = MatrixOperator(spd(10, seed))
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        trace(op, block_size=bad)
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        density(op, block_size=bad)
    assert op.num_matvecs == 0


def test_a_matmat_of_the_wrong_shape_is_refused(seed):
    op = WrongMatmat(spd(10, seed))
    with pytest.raises(ValueError, match=r"op.matmat must return a tensor of shape \[10, 4\]; got \[10, 1\]"):
        apply_block(op, torch.randn(10, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="op.matmat must return"):
        trace(op, num_probes=8, block_size=4)


class _Twice(torch.autograd.Function):
    """d(x^2)/dx = 2x g, whose own backward goes through numpy: fine one vector at a time, but
    not under the vmap of a batched backward (no batching rule for detach)."""

    @staticmethod
    def forward(ctx, g, x):
        ctx.save_for_backward(g, x)
        return 2 * x * g

    @staticmethod
    def backward(ctx, gg):
        g, x = ctx.saved_tensors
        a = torch.from_numpy(gg.detach().numpy().copy())
        return 2 * x * a, 2 * g * a


class _Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _Twice.apply(g, x)


class SquareNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2).double()

    def forward(self, x):
        return _Square.apply(self.linear(x))


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
def test_matmat_falls_back_to_matvecs_where_the_batched_backward_fails(cls, seed):
    op = cls(SquareNet(), F.mse_loss, (torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)))
    V = torch.randn(op.shape[0], 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=rf"{cls.__name__}.matmat: the batched product failed .*falling back "
                                            "to a loop of matvecs"):
        got = op.matmat(V)
    assert op.num_matvecs == 3
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the next blocks loop without trying again
        again = op.matmat(V)
    close(got, loop(op, V))
    close(again, got)
    assert op.num_matvecs == 9


def test_density_default_block_keeps_the_lanczos_vectors_bounded(monkeypatch, seed):
    """With DENSITY_BLOCK_BYTES room for 2 runs' vectors, the default takes 2 runs per block."""
    from fusedopt.hessian import stochastic

    a = spd(20, seed)
    blocks = []

    class Recording(MatrixOperator):
        def matmat(self, X):
            blocks.append(X.shape[1])
            return super().matmat(X)

    monkeypatch.setattr(stochastic, "DENSITY_BLOCK_BYTES", 2 * 10 * 20 * 8 + 7)
    r = density(Recording(a), num_runs=5, num_steps=10, num_points=20, seed=seed)
    assert max(blocks) == 2
    want = density(MatrixOperator(a), num_runs=5, num_steps=10, num_points=20, seed=seed, block_size=1)
    assert r.num_matvecs == want.num_matvecs
    assert abs(r.positive_fraction - want.positive_fraction) < 1e-9
