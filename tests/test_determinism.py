"""Same inputs, same bits: run to run and for any CPU thread count.

The CPU drivers split all elements of a call into fixed 32768-element chunks
whatever the thread count, and every element's update depends only on its own
inputs, so results must be bit-identical for 1, 2 and all threads. The inputs
mix tensors large enough for many chunks (and odd sizes that end mid-chunk)
with many small tensors, in fp32, bf16 and fp64. On CUDA: run to run.

Muon's Newton-Schulz path also runs torch's batched matmuls (bmm, baddbmm), which
use torch's own CPU threads: the thread count is changed for both (fusedopt's and
torch's), and the spec's matrices (``OptimSpec.matrices``) join the inputs.
torch's CPU matmuls do not promise thread-count independence in general; on the
MKL/oneDNN builds this was checked on (README "Muon") their results were the same
bits for 1 to 8 threads in fp64, fp32 and bf16, and this test holds them to it.
"""
import pytest
import torch

import fusedopt
from optim_registry import OPTIMIZERS, tensor_bits

CHUNK = 32768


def make_inputs(seed, spec):
    gen = torch.Generator().manual_seed(seed)
    sizes = [5 * CHUNK + 17, 3 * CHUNK, CHUNK - 1, 1] + torch.randint(1, 300, (200,), generator=gen).tolist()
    dtypes = [torch.float32, torch.bfloat16, torch.float64]
    if spec.param_dtypes is not None:  # 8-bit state: fp16 in place of fp64
        dtypes = [d if d in spec.param_dtypes else torch.float16 for d in dtypes]
    shapes = [(n,) for n in sizes] + list(spec.matrices)
    params = [torch.randn(s, generator=gen).to(dtypes[i % 3]) for i, s in enumerate(shapes)]
    grads = [[torch.randn(s, generator=gen).to(dtypes[i % 3]) for i, s in enumerate(shapes)] for _ in range(3)]
    return params, grads


@pytest.fixture(autouse=True)
def torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run(spec, threads, params, grads):
    if threads is not None:
        fusedopt.set_num_threads(threads)
        torch.set_num_threads(threads or fusedopt.get_num_threads())
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = spec.make([{"params": ps[::2]}, {"params": ps[1::2]}], **spec.hyper)
    for step_grads in grads:
        for p, g in zip(ps, step_grads):
            p.grad = g.clone()
        opt.step()
    return [tensor_bits(p) for p in ps], [tensor_bits(t) for p in ps for t in opt.state[p].values()]


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=repr)
def test_bit_identical_across_thread_counts_and_runs(spec, seed):
    params, grads = make_inputs(seed, spec)
    first = run(spec, 1, params, grads)
    for threads in (2, 3, 0, 1, 0):  # 0 = all cores; repeated runs check run-to-run too
        assert run(spec, threads, params, grads) == first, f"threads={threads} changed the bits"
    assert first[0] != [tensor_bits(p) for p in params], "the step changed nothing"


@pytest.mark.cuda
@pytest.mark.parametrize("spec", OPTIMIZERS, ids=repr)
def test_cuda_bit_identical_run_to_run(spec, seed):
    """Elementwise updates without atomics, fixed-order reductions: the same bits twice on one GPU."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).cuda() for s in [(3_000_000,), (333, 77), (5,)]]
    grads = [[torch.randn(p.shape, generator=gen).cuda() for p in params] for _ in range(3)]
    first = run(spec, None, params, grads)
    assert run(spec, None, params, grads) == first
    assert first[0] != [tensor_bits(p) for p in params], "the step changed nothing"
