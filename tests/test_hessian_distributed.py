import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fusedopt.hessian import HessianOperator, eigsh


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem():
    g = torch.Generator().manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8, dtype=torch.float64), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3, dtype=torch.float64))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    X = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    return model, X, y


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, X, y = _problem()
        shard = slice(0, 12) if rank == 0 else slice(12, 30)  # unequal shards: weights matter
        op = HessianOperator(model, torch.nn.functional.cross_entropy, (X[shard], y[shard]))
        res = eigsh(op, k=2, which="BE", tol=1e-10, generator=torch.Generator().manual_seed(3))
        out[rank] = res.eigenvalues.clone()
    finally:
        dist.destroy_process_group()


def test_two_ranks_agree_with_full_data():
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    model, X, y = _problem()
    ref = eigsh(HessianOperator(model, torch.nn.functional.cross_entropy, (X, y)), k=2, which="BE", tol=1e-10)
    assert torch.equal(out[0], out[1])
    torch.testing.assert_close(out[0], ref.eigenvalues, rtol=1e-8, atol=1e-10)
