"""int64 indexing end to end: one tensor of more than 2**31 elements (slow).

CPU: SGD without momentum on a bf16 param + bf16 grad (2 x 4.3 GB), then
the per-tensor norm of the result (the LARS/LAMB reduction path). CUDA:
Adam on an fp32 param (param, grad, exp_avg, exp_avg_sq: 4 x 8.6 GB). Both
check elements on either side of 2**31 and the very last ones, where an int32
index would wrap. Skipped when the memory is not there.
"""
import pytest
import torch

import fusedopt

N = 2**31 + 4099  # past 2**31 and not a multiple of any chunk or vector width
EDGES = [0, 1, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1, N - 2, N - 1]


def available_host_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def mark_edges(t: torch.Tensor, values: torch.Tensor) -> None:
    t[torch.tensor(EDGES)] = values.to(t.dtype).to(t.device)


@pytest.mark.slow
def test_cpu_bf16_sgd_past_2_31_elements(seed):
    need = 2 * N * 2 + 2 * 2**30
    if available_host_bytes() < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free host memory")
    p = torch.nn.Parameter(torch.full((N,), 1.0, dtype=torch.bfloat16))
    p.grad = torch.full((N,), 0.5, dtype=torch.bfloat16)
    p0, g0 = torch.randn(len(EDGES)), torch.randn(len(EDGES))
    with torch.no_grad():
        mark_edges(p, p0)
        mark_edges(p.grad, g0)
    fusedopt.SGD([p], lr=0.25).step()
    # fp32 math, rounded to bf16 once: the same as fusedopt's kernel.
    want = (p0.bfloat16().float() - 0.25 * g0.bfloat16().float()).bfloat16()
    got = p.detach()[torch.tensor(EDGES)]
    assert torch.equal(got, want), (got, want)
    # Bulk elements (1 - 0.25 * 0.5 = 0.875, exact in bf16), sampled across the tensor.
    idx = torch.randint(0, N, (100_000,), dtype=torch.int64)
    idx = idx[~torch.isin(idx, torch.tensor(EDGES))]
    assert (p.detach()[idx] == 0.875).all()
    assert (p.detach()[-4096:-2] == 0.875).all()
    # The reduction path (LARS/LAMB norms) over the same tensor: int64 chunk
    # offsets, every element counted once.
    edge_sq = float((want.double() ** 2).sum())
    expected = ((N - len(EDGES)) * 0.875 ** 2 + edge_sq) ** 0.5
    got_norm = float(fusedopt.functional.tensor_norms([p.detach()])[0])
    assert abs(got_norm - expected) <= 1e-5 * expected, (got_norm, expected)


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_fp32_adam_past_2_31_elements(seed):
    free, _ = torch.cuda.mem_get_info()
    need = 4 * N * 4 + 2**30
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    p = torch.nn.Parameter(torch.full((N,), 1.0, device="cuda"))
    p.grad = torch.full((N,), 0.5, device="cuda")
    p0, g0 = torch.randn(len(EDGES)), torch.randn(len(EDGES))
    with torch.no_grad():
        mark_edges(p, p0)
        mark_edges(p.grad, g0)
    fusedopt.Adam([p], lr=0.1).step()
    # First Adam step: m_hat = g, v_hat = g^2, update = lr * g / (|g| + eps).
    want = p0 - 0.1 * g0 / (g0.abs() + 1e-8)
    torch.testing.assert_close(p.detach()[torch.tensor(EDGES, device="cuda")].cpu(), want, rtol=1e-6, atol=1e-6)
    bulk = 1.0 - 0.1 * 0.5 / (0.5 + 1e-8)
    tail = p.detach()[-4096:-2]
    torch.testing.assert_close(tail, torch.full_like(tail, bulk), rtol=1e-6, atol=1e-6)
    idx = torch.randint(0, N, (100_000,), device="cuda")
    idx = idx[~torch.isin(idx, torch.tensor(EDGES, device="cuda"))]
    torch.testing.assert_close(p.detach()[idx], torch.full((idx.numel(),), bulk, device="cuda"),
                               rtol=1e-6, atol=1e-6)
