"""DDP and FSDP2 (fully_shard, DTensor params) on 2 CPU processes with gloo.
Each rank trains on its half of the batch; the result must match one process
training on the whole batch."""
import datetime
import os
import tempfile

import pytest

# Slow (run with --runslow): on this CPU torch build a spawned gloo rank has
# aborted at exit (SIGABRT, "terminate called without an active exception")
# and once left its peer hanging, in CI-like runs. Root cause open (notes).
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedopt

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")]

WORLD = 2
STEPS = 4
OPTS = {
    "SGD": (fusedopt.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "Adam": (fusedopt.Adam, dict(lr=1e-2, weight_decay=1e-3)),
    "AdamW": (fusedopt.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
}


def make_model():
    torch.manual_seed(1234)
    # Linear widths divisible by WORLD so FSDP2 shards every param evenly on dim 0.
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))


def data():
    g = torch.Generator().manual_seed(99)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 4, generator=g)) for _ in range(STEPS)]


def single_process(name):
    cls, kw = OPTS[name]
    model = make_model()
    opt = cls(model.parameters(), **kw)
    for x, y in data():
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def worker(rank, store, mode, name, out):
    # A file store: no TCP port to pick, so back-to-back runs cannot collide.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    try:
        cls, kw = OPTS[name]
        model = make_model()
        if mode == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh("cpu", (WORLD,))
            for layer in model:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        opt = cls(model.parameters(), **kw)
        for x, y in data():
            xs, ys = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(xs), ys).backward()
            opt.step()
        if mode == "fsdp":
            from torch.distributed.tensor import DTensor
            p0 = next(model.parameters())
            assert isinstance(p0, DTensor), type(p0)
            st = opt.state[p0]
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    assert isinstance(v, DTensor), (k, type(v))  # torch.optim-compatible layout
            params = [p.full_tensor().detach().clone() for p in model.parameters()]
        else:
            params = [p.detach().clone() for p in model.parameters()]
        if rank == 0:
            torch.save(params, out)
    finally:
        dist.destroy_process_group()


def run(mode, name):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "params.pt")
        mp.spawn(worker, args=(os.path.join(d, "store"), mode, name, out), nprocs=WORLD, join=True)
        return torch.load(out)


@pytest.mark.parametrize("name", list(OPTS))
def test_ddp_matches_single_process(name):
    got, want = run("ddp", name), single_process(name)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(OPTS))
def test_fsdp2_matches_unsharded(name):
    got, want = run("fsdp", name), single_process(name)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_reduce_square_norms_is_identity_for_plain_tensors():
    t = torch.tensor([4.0, 9.0])
    assert fusedopt.SGD.reduce_square_norms(t, torch.randn(3)) is t
