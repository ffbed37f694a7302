import pytest
import torch
import torch.distributed as dist

from fusedopt.hessian import HessianOperator, eigsh
from test_distributed import spawn_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")


def _problem(seed):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8, dtype=torch.float64), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3, dtype=torch.float64))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    X = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    return model, X, y


def _rank_eigenvalues(rank, seed, method="auto"):
    model, X, y = _problem(seed)
    shard = slice(0, 12) if rank == 0 else slice(12, 30)  # unequal shards: weights matter
    op = HessianOperator(model, torch.nn.functional.cross_entropy, (X[shard], y[shard]), method=method)
    res = eigsh(op, k=2, which="BE", tol=1e-10, generator=torch.Generator().manual_seed(seed + 1))
    loss, grad = op.loss_and_gradient()  # the report's loss: the same weighted mean over the ranks
    mine = torch.cat([res.eigenvalues, torch.tensor([loss], dtype=torch.float64), grad])
    theirs = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(theirs, mine)
    return theirs


@pytest.mark.parametrize("method", ["auto", "forward_over_reverse"])
def test_two_ranks_agree_with_full_data(method, seed):
    out = spawn_ranks(_rank_eigenvalues, seed, method)
    model, X, y = _problem(seed)
    full = HessianOperator(model, torch.nn.functional.cross_entropy, (X, y))
    ref = eigsh(full, k=2, which="BE", tol=1e-10)
    assert torch.equal(out[0], out[1])
    torch.testing.assert_close(out[0][:2], ref.eigenvalues, rtol=1e-8, atol=1e-10)
    loss, grad = full.loss_and_gradient()
    assert out[0][2].item() == pytest.approx(loss, rel=1e-12)
    torch.testing.assert_close(out[0][3:], grad, rtol=1e-10, atol=1e-12)


def _rank_blocks(rank, seed):
    """matmat of the three operators and a blocked trace on a rank's shard."""
    from fusedopt.hessian import EmpiricalFisherOperator, GGNOperator, trace
    model, X, y = _problem(seed)
    shard = slice(0, 12) if rank == 0 else slice(12, 30)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, generator=torch.Generator().manual_seed(seed + 2),
                    dtype=torch.float64)
    parts = []
    for cls in (HessianOperator, GGNOperator, EmpiricalFisherOperator):
        op = cls(model, torch.nn.functional.cross_entropy, (X[shard], y[shard]))
        parts.append(op.matmat(V).reshape(-1))
        parts.append(torch.tensor([trace(op, num_probes=6, seed=seed, block_size=4).estimate], dtype=torch.float64))
    mine = torch.cat(parts)
    theirs = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(theirs, mine)
    return theirs


def test_two_ranks_block_products_agree_with_full_data(seed):
    """matmat reduces an (n, b) block over the ranks: the full data's block, the same on both."""
    from fusedopt.hessian import EmpiricalFisherOperator, GGNOperator, trace
    out = spawn_ranks(_rank_blocks, seed)
    model, X, y = _problem(seed)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, generator=torch.Generator().manual_seed(seed + 2),
                    dtype=torch.float64)
    want = []
    for cls in (HessianOperator, GGNOperator, EmpiricalFisherOperator):
        op = cls(model, torch.nn.functional.cross_entropy, (X, y))
        want.append(torch.stack([op.matvec(V[:, j]) for j in range(3)], dim=1).reshape(-1))
        want.append(torch.tensor([trace(op, num_probes=6, seed=seed, block_size=1).estimate], dtype=torch.float64))
    assert torch.equal(out[0], out[1])
    torch.testing.assert_close(out[0], torch.cat(want), rtol=1e-9, atol=1e-11)
