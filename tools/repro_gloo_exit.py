"""Reproduces, without fusedopt, the gloo exit abort/hang seen by DDP tests on torch 2.13.

Collectives launched inside backward() (DDP's allreduce, FSDP2's reduce-scatter)
copy the thread-local state, which includes the contextvars.Context that
torch.autograd stashes in TLS during backward. A gloo worker thread that drops
the last reference to such a Work takes the GIL to free that object. If the
main thread meanwhile destroys the process group while holding the GIL
(~ProcessGroupGloo joins the worker), the rank deadlocks; if the interpreter is
already finalizing, CPython ends the worker with pthread_exit, whose forced
unwind hits the noexcept ~AsyncWork: std::terminate, "terminate called without
an active exception", SIGABRT.

The script widens the race deterministically: every thread of a rank on one CPU,
gloo worker threads on SCHED_IDLE (they run only when nothing else can), and a
GIL-holding spin after the last backward.

    python tools/repro_gloo_exit.py destroy   # destroy_process_group + normal exit: SIGABRT
    python tools/repro_gloo_exit.py nostash   # same, backward stashes nothing in TLS: passes
    python tools/repro_gloo_exit.py harness   # barrier + store rendezvous + os._exit: passes
"""
import datetime
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank(rank, store, variant):
    if variant == "nostash":  # the only Python object in the Works' TLS goes away
        torch._C._stash_obj_in_tls = lambda *a: None
        torch._C._remove_obj_from_tls = lambda *a: None
    os.sched_setaffinity(0, {0})  # inherited by the gloo threads created below
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            if f.read().startswith("pt_gloo_runloop"):
                os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
    sys.setswitchinterval(100.0)  # the main thread keeps the GIL while it runs bytecode
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
    t = time.perf_counter()
    while time.perf_counter() - t < 0.2:
        pass
    if variant == "harness":
        dist.barrier()
        done = dist.FileStore(store + ".done", 2)
        done.add("finished", 1)
        while done.add("finished", 0) < 2:
            time.sleep(0.005)
        os._exit(0)
    dist.destroy_process_group()
    print(f"rank {rank}: returning to interpreter exit", flush=True)


if __name__ == "__main__":
    variant = sys.argv[1] if len(sys.argv) > 1 else "destroy"
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.start_processes(rank, args=(os.path.join(d, "store"), variant), nprocs=2,
                                 join=False, start_method="spawn")
        start = time.monotonic()
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() - start > 60:
                    print("HANG: a rank is still running after 60 s")
                    for p in ctx.processes:
                        p.kill()
                    sys.exit(3)
        except mp.ProcessExitedException as e:
            print("FAIL:", e)
            sys.exit(2)
    print("OK")
