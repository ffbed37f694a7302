"""Host time of optimizer.step() on CPU: 1000 params of 64 elements, where the arithmetic is
negligible and what is timed is the per-step host work (Python, checks, pointer gathering,
dispatch). fusedopt next to torch's fused and foreach implementations and installed peers.

    python benchmarks/bench_host_overhead.py [--quick | --full] [--workloads 1000x64 5000x1000]

The same runner as `fusedopt bench` (fusedopt.bench), on the host-overhead workload, with
repetitions long enough (hundreds of steps) that the timer's resolution does not matter.
"""
import sys

from fusedopt.bench import IMPLS, OPTIMIZER_PEERS, Preset, main

HOST_OVERHEAD = Preset(
    name="host_overhead", prog="bench_host_overhead.py", description=__doc__,
    workloads={"quick": ("1000x64",), "default": ("1000x64",), "full": ("1000x64", "5000x1000")},
    impls={"quick": ("torch-foreach", "torch-fused", "fusedopt"),
           "default": ("torch-foreach", "torch-fused", "fusedopt", *OPTIMIZER_PEERS),
           "full": (*IMPLS, *OPTIMIZER_PEERS)},
    seconds_per_rep={"quick": 0.1, "default": 0.3, "full": 0.5},
    devices=("cpu",), unit="us", bandwidth_column=False,
)

if __name__ == "__main__":
    sys.exit(main(preset=HOST_OVERHEAD))
