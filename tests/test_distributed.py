"""DDP and FSDP2 (fully_shard, DTensor params) on 2 CPU processes with gloo, for
every optimizer of the registry's TRAINING list (LARS, LAMB and Muon with settings
of their own). Each rank trains on its half of the batch; the result must match one
process training on the whole batch. Under FSDP2 the per-tensor norms (LARS |p|,
|g|; LAMB |p'|, |u|) and LAMB's global grad norm are all-reduced over the shard
group, and Muon gathers each sharded matrix for Newton-Schulz, so the sharded
LARS/LAMB/Muon steps must match too. Muon trains a model of its own whose
matrices FSDP2 shards unevenly (one leaves rank 1 no rows); the same spawn also
steps directly sharded and replicated DTensors and compares with plain tensors.

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
_MUON = TRAINING_BY_CLASS[fusedopt.Muon]  # matrices by Muon, biases by its AdamW group
SPECS = {s.name: s for s in TRAINING[:3] + [
    # weight decay: the trust ratios are used.
    variant(_LARS, "LARS", lr=0.5, weight_decay=1e-2),
    # max_grad_norm far below the grad norms of this model and data: clipping is active.
    variant(_LAMB, "LAMB", lr=2e-2, max_grad_norm=0.05),
    variant(_LAMB, "LAMB-trustclip-decoupled", lr=2e-2, max_grad_norm=0.05, trust_clip=True, decoupled_decay=True),
    # fp32 Newton-Schulz (the registry's Muon runs fp64): the usual path, compared at fp32 tolerances.
    variant(_MUON, "Muon", ns_dtype=torch.float32),
    variant(_MUON, "Muon-match_rms_adamw-nonesterov", ns_dtype=torch.float32, adjust_lr_fn="match_rms_adamw",
            nesterov=False),
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
# Muon's model: Linear(6, 9), Linear(9, 5), ... Linear(4, 4). Weights (9, 6) tall and
# (5, 9), (5, 5), (5, 5) wide: dim 0 odd, FSDP2 gives rank 0 one row more than rank 1;
# (1, 5): rank 1 holds no rows; (4, 1) tall, (4, 4), (4, 4): even shards. The pairs of
# one shape are batched (one Newton-Schulz group, one block of the gather each).
MUON_WIDTHS = (6, 9, 5, 5, 5, 1, 4, 4, 4)
# dim 0 of each weight's local shard on each rank (torch.chunk's split, as FSDP2 shards)
MUON_LOCAL_ROWS = ([5, 3, 3, 3, 1, 2, 2, 2], [4, 2, 2, 2, 0, 2, 2, 2])


def uses_muon(name):
    return SPECS[name].make is _MUON.make


def make_model(seed, name=None):
    torch.manual_seed(seed)
    if name is not None and uses_muon(name):
        layers = []
        for n_in, n_out in zip(MUON_WIDTHS, MUON_WIDTHS[1:]):
            layers += [torch.nn.Linear(n_in, n_out), torch.nn.Tanh()]
        return torch.nn.Sequential(*layers[:-1])
    # Linear widths divisible by WORLD so FSDP2 shards every param evenly on dim 0.
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))


def data(seed):
    g = torch.Generator().manual_seed(seed + 1)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 4, generator=g)) for _ in range(STEPS)]


def single_process(name, seed):
    """The whole batch in one process: the final params and each step's global grad norm."""
    spec = SPECS[name]
    model = make_model(seed, name)
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
    model = make_model(seed, name)
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        fsdp_wrap(model)
        if uses_muon(name):  # the uneven and empty shards this model is for
            rows = [p.to_local().shape[0] for p in model.parameters() if p.dim() == 2]
            assert rows == MUON_LOCAL_ROWS[rank], rows
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


# Matrices sharded on dim 0 with distribute_tensor (uneven, an empty shard on rank 1,
# two of one shape, tall and wide, a 3-D one) for muon_dtensor_steps.
DTENSOR_SHAPES = [(7, 3), (3, 7), (5, 4), (5, 4), (1, 6), (4, 6), (5, 2, 3)]
DTENSOR_SETTINGS = {
    "fp32": dict(ns_dtype=torch.float32),
    "fp32-match_rms_adamw": dict(ns_dtype=torch.float32, adjust_lr_fn="match_rms_adamw", nesterov=False),
    "bf16": dict(ns_dtype=torch.bfloat16),
}
DTENSOR_STEPS = "Muon on DTensors"  # its key in train_each's result


def muon_dtensor_steps(rank, seed):
    """fusedopt.Muon on DTensor matrices (each placement, each setting) and on plain copies
    of them, with the same full grads, 3 steps: {(placement, setting): [(the DTensor's full
    tensor, the plain one, the initial one)]}; and the message a Shard(1) matrix is refused with."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(seed + 2)
    full = [torch.randn(s, generator=g) for s in DTENSOR_SHAPES]
    grads = [[torch.randn(s, generator=g) for s in DTENSOR_SHAPES] for _ in range(3)]
    out = {}
    for where, placement in {"Shard(0)": Shard(0), "Replicate()": Replicate()}.items():
        for setting, hyper in DTENSOR_SETTINGS.items():
            hyper = dict(lr=0.05, weight_decay=0.1, **hyper)
            dts = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [placement])) for t in full]
            plain = [torch.nn.Parameter(t.clone()) for t in full]
            opts = fusedopt.Muon(dts, **hyper), fusedopt.Muon(plain, **hyper)
            for step_grads in grads:
                for d, p, gr in zip(dts, plain, step_grads):
                    d.grad = distribute_tensor(gr.clone(), mesh, [placement])
                    p.grad = gr.clone()
                for opt in opts:
                    opt.step()
            if placement == Shard(0):
                assert [d.to_local().shape[0] for d in dts] == [[4, 2, 3, 3, 1, 2, 3], [3, 1, 2, 2, 0, 2, 2]][rank]
            out[where, setting] = [(d.full_tensor().detach(), p.detach().clone(), t)
                                   for d, p, t in zip(dts, plain, full)]
    try:
        fusedopt.Muon([torch.nn.Parameter(distribute_tensor(full[0], mesh, [Shard(1)]))])
    except Exception as e:  # anything else than the refusal fails that test alone
        out["Shard(1)"] = f"{type(e).__name__}: {e}"
    return out


def train_each(rank, mode, names, seed):
    out = {name: train(rank, mode, name, seed) for name in names}
    if mode == "fsdp":
        out[DTENSOR_STEPS] = muon_dtensor_steps(rank, seed)
    return out


@pytest.fixture(scope="module")
def trained(module_seed):
    """One spawn per mode trains every optimizer (spawning costs seconds)."""
    cache = {}

    def get(mode):
        if mode not in cache:
            cache[mode] = spawn_ranks(train_each, mode, list(SPECS), module_seed)
        return cache[mode]
    return get


def tolerance(name):
    """fp32 rounding. Muon: Newton-Schulz amplifies the grads' rounding differences (the
    ranks' half-batch grads averaged against one whole-batch grad) along the small
    singular values of an update, by up to about a^5 ~ 490 for 5 steps (a = 3.4445):
    over 22 seeds the worst param was 7.5e-7 off, at values near 0 where atol rules,
    with DDP (no gather) exactly as with FSDP2; atol 3e-6 for it. Given the same grads
    the sharded Muon step is the plain one to the bit (test_muon_dtensor_step_equals_plain_step)."""
    return dict(rtol=1e-5, atol=3e-6 if uses_muon(name) else 1e-6)


@pytest.mark.parametrize("name", list(SPECS))
def test_ddp_matches_single_process(trained, name, module_seed):
    got, (want, _) = trained("ddp")[name], single_process(name, module_seed)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tolerance(name))


@pytest.mark.parametrize("name", list(SPECS))
def test_fsdp2_matches_unsharded(trained, name, module_seed):
    got, (want, grad_norms) = trained("fsdp")[name], single_process(name, module_seed)
    if SPECS[name].clips:
        assert min(grad_norms) > 2 * SPECS[name].hyper["max_grad_norm"]  # the clip really acts
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tolerance(name))


@pytest.mark.parametrize("placement", ["Shard(0)", "Replicate()"])
@pytest.mark.parametrize("setting", list(DTENSOR_SETTINGS))
def test_muon_dtensor_step_equals_plain_step(trained, placement, setting):
    """Sharded: the gathered full matrices are the plain ones, Newton-Schulz runs on the
    same batches and each rank applies its own rows: the same numbers, to the bit here."""
    results = trained("fsdp")[DTENSOR_STEPS][placement, setting]
    for (got, want, before), shape in zip(results, DTENSOR_SHAPES):
        assert got.shape == want.shape == shape
        assert (want - before).abs().min() > 0  # every element moved
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_muon_refuses_dtensors_sharded_on_another_dim(trained):
    msg = trained("fsdp")[DTENSOR_STEPS].get("Shard(1)")
    assert msg is not None, "a DTensor sharded on dim 1 was accepted"
    assert msg.startswith("NotImplementedError: param_groups[0]['params'][0] is a DTensor with placements "
                          "(Shard(dim=1),)"), msg


def test_chunk_span_is_torch_chunk():
    """DTensor's Shard and FSDP2 split dim 0 as torch.chunk does (the last ranks fewer or no rows)."""
    from fusedopt._dtensor import chunk_span
    for rows in range(0, 12):
        for world in range(1, 6):
            chunks = list(torch.arange(rows).chunk(world)) if rows else []
            chunks += [torch.arange(0)] * (world - len(chunks))
            for rank, want in enumerate(chunks):
                chunk, start, count = chunk_span(rows, world, rank)
                assert chunk == (chunks[0].numel() if rows else 0)
                assert list(range(start, start + count)) == want.tolist(), (rows, world, rank)


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
