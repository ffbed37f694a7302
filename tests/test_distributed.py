"""DDP and FSDP2 (fully_shard, DTensor params) on 2 CPU processes with gloo, for
every optimizer of the registry's TRAINING list (LARS and LAMB with settings of
their own). Each rank trains on its half of the batch; the result must match one
process training on the whole batch. Under FSDP2 the per-tensor norms (LARS |p|,
|g|; LAMB |p'|, |u|) and LAMB's global grad norm are all-reduced over the shard
group, so the sharded LARS/LAMB steps must match too.

The harness (spawn_ranks / rank_main) is shared with other distributed test
files. How a rank ends matters, see rank_main: on torch 2.13 a gloo rank that
tears its process group down normally can hang or abort at exit."""
import datetime
import faulthandler
import os
import sys
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedopt
from optim_registry import TRAINING, TRAINING_BY_CLASS, variant

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")

WORLD = 2
STEPS = 4
# Bound on one spawn_ranks call: a rank still running after this prints every
# thread's Python stack and exits 1 (faulthandler); the parent gives up a little
# later. A normal run takes a few seconds.
RANK_TIMEOUT_S = 120
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=30)  # a collective whose peer died fails
_LARS, _LAMB = TRAINING_BY_CLASS[fusedopt.LARS], TRAINING_BY_CLASS[fusedopt.LAMB]
SPECS = {s.name: s for s in TRAINING[:3] + [
    # weight decay: the trust ratios are used.
    variant(_LARS, "LARS", lr=0.5, weight_decay=1e-2),
    # max_grad_norm far below the grad norms of this model and data: clipping is active.
    variant(_LAMB, "LAMB", lr=2e-2, max_grad_norm=0.05),
    variant(_LAMB, "LAMB-trustclip-decoupled", lr=2e-2, max_grad_norm=0.05, trust_clip=True, decoupled_decay=True),
]}


# --------------------------------------------------------------------------- harness
def rank_main(rank, store, out, fn, args=()):
    """Body of one spawned rank: joins the gloo group through the file `store`,
    runs fn(rank, *args), saves rank 0's return value to `out`, then ends the
    process with os._exit after every rank has finished communicating.

    Why os._exit, never destroy_process_group + a normal exit: the collectives
    DDP and FSDP2 launch inside backward() capture the thread-local state, which
    on torch 2.13 holds a Python object (the contextvars.Context that
    torch.autograd stashes in TLS for the duration of backward). A gloo worker
    thread that drops the last reference to such a Work must take the GIL to
    free it. If that happens (a) while the main thread holds the GIL in
    ~ProcessGroupGloo joining that very worker (the group is freed by
    destroy_process_group, by DDP's Reducer or by gc), the rank deadlocks and
    its peer waits forever; (b) after Py_Finalize has begun, CPython ends the
    worker with pthread_exit, whose forced unwind meets a noexcept destructor
    (~AsyncWork) and calls std::terminate: "terminate called without an active
    exception", SIGABRT. Skipping the group's destruction and the interpreter's
    finalization avoids both; the barrier plus the store rendezvous first make
    sure no rank leaves while a peer still needs it.
    """
    faulthandler.dump_traceback_later(RANK_TIMEOUT_S, exit=True)
    code = 1
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                                timeout=COLLECTIVE_TIMEOUT)
        torch.set_num_threads(1)
        result = fn(rank, *args)
        if rank == 0:
            torch.save(result, out)
        # Every collective of every rank has completed once the barrier returns
        # (gloo's barrier waits for the rank's earlier work first) ...
        dist.barrier()
        # ... and once every rank has counted itself here, every rank is past the
        # barrier too: no gloo message is left in flight when one process exits.
        done = dist.FileStore(store + ".done", WORLD)
        done.add("finished", 1)
        while done.add("finished", 0) < WORLD:
            time.sleep(0.005)
        code = 0
    except BaseException:  # the parent shows this; peers are killed by spawn_ranks
        with open(f"{out}.rank{rank}.err", "w") as f:
            f.write(traceback.format_exc())
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def spawn_ranks(fn, *args, timeout_s=RANK_TIMEOUT_S):
    """Runs fn(rank, *args) on WORLD spawned CPU processes sharing a gloo default
    group; returns rank 0's return value (anything torch.save can store). A rank
    that raises fails the caller with the rank's traceback; a rank that hangs
    fails it after `timeout_s` instead of hanging the test run."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.pt")
        # A fresh file store per call: no TCP port to pick, nothing reused.
        ctx = mp.start_processes(rank_main, args=(os.path.join(d, "store"), out, fn, args),
                                 nprocs=WORLD, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s + 30  # the ranks' own watchdog fires first
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    alive = [i for i, p in enumerate(ctx.processes) if p.is_alive()]
                    pytest.fail(f"ranks {alive} of {fn.__name__} still running after {timeout_s + 30}s")
        except mp.ProcessExitedException as e:
            errors = [open(f"{out}.rank{r}.err").read() for r in range(WORLD)
                      if os.path.exists(f"{out}.rank{r}.err")]
            raise AssertionError(f"{e}\n" + "\n".join(errors)) from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join()
        return torch.load(out)


# --------------------------------------------------------------------------- the tests
def make_model(seed):
    torch.manual_seed(seed)
    # Linear widths divisible by WORLD so FSDP2 shards every param evenly on dim 0.
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))


def data(seed):
    g = torch.Generator().manual_seed(seed + 1)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 4, generator=g)) for _ in range(STEPS)]


def single_process(name, seed):
    """The whole batch in one process: the final params and each step's global grad norm."""
    spec = SPECS[name]
    model = make_model(seed)
    opt = spec.make(model.parameters(), **spec.hyper)
    grad_norms = []
    for x, y in data(seed):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grad_norms.append(float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))))
        opt.step()
    return [p.detach().clone() for p in model.parameters()], grad_norms


def fsdp_wrap(model):
    """FSDP2 over all ranks: each Linear its own unit, then the whole model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train_on_shard(rank, model, opt, seed):
    """Every step of data(seed) on this rank's share of each batch."""
    for x, y in data(seed):
        xs, ys = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(xs), ys).backward()
        opt.step()


def train(rank, mode, name, seed):
    """One rank's share of the training ("ddp" or "fsdp"); returns the full params."""
    spec = SPECS[name]
    model = make_model(seed)
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        fsdp_wrap(model)
    opt = spec.make(model.parameters(), **spec.hyper)
    train_on_shard(rank, model, opt, seed)
    if mode == "ddp":
        return [p.detach().clone() for p in model.parameters()]
    from torch.distributed.tensor import DTensor
    for p in model.parameters():
        assert isinstance(p, DTensor), type(p)
        for k, v in opt.state[p].items():
            if torch.is_tensor(v) and v.dim() > 0:
                assert isinstance(v, DTensor), (k, type(v))  # torch.optim-compatible layout
        if "step" in opt.state[p]:
            assert float(opt.state[p]["step"]) == STEPS  # advanced once per step (LARS/LAMB: by the split step)
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def train_each(rank, mode, names, seed):
    return {name: train(rank, mode, name, seed) for name in names}


@pytest.fixture(scope="module")
def trained(module_seed):
    """One spawn per mode trains every optimizer (spawning costs seconds)."""
    cache = {}

    def get(mode):
        if mode not in cache:
            cache[mode] = spawn_ranks(train_each, mode, list(SPECS), module_seed)
        return cache[mode]
    return get


@pytest.mark.parametrize("name", list(SPECS))
def test_ddp_matches_single_process(trained, name, module_seed):
    got, (want, _) = trained("ddp")[name], single_process(name, module_seed)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(SPECS))
def test_fsdp2_matches_unsharded(trained, name, module_seed):
    got, (want, grad_norms) = trained("fsdp")[name], single_process(name, module_seed)
    if SPECS[name].clips:
        assert min(grad_norms) > 2 * SPECS[name].hyper["max_grad_norm"]  # the clip really acts
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _fail_on_rank_1(rank):
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
    dist.barrier()  # rank 0 waits for a peer that never comes: the harness must not hang


def test_harness_reports_a_failing_rank_without_hanging():
    t = time.monotonic()
    with pytest.raises(AssertionError, match="rank 1 fails on purpose"):
        spawn_ranks(_fail_on_rank_1)
    assert time.monotonic() - t < 60


def test_reduce_rows_over_shards_leaves_plain_tensors_alone(seed):
    from fusedopt._dtensor import reduce_rows_over_shards
    t = torch.rand(2) + 1.0
    before = t.clone()
    assert reduce_rows_over_shards(t, [torch.randn(3), torch.randn(4)]) is t
    assert torch.equal(t, before)
