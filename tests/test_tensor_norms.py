"""fusedopt.functional.tensor_norms against torch.linalg.vector_norm; result dtype;
determinism; validation."""
import pytest
import torch

import fusedopt
from fusedopt import _kernels
from fusedopt.functional import tensor_norms

# fp64 input: an fp64 result within fp64 rounding of the fp64 reference, as
# torch.linalg.vector_norm gives.
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def expected_dtype_and_rtol(dtype):
    """fp64 norms of fp64 tensors (to about 1e-12); fp32 norms (fp32 rounding) otherwise."""
    return (torch.float64, 1e-12) if dtype is torch.float64 else (torch.float32, 1e-5)


def random_tensors(gen, n, dtype, device="cpu", big=False):
    shapes = []
    for i in range(n):
        kind = torch.randint(0, 5, (1,), generator=gen).item()
        if kind == 0:
            shapes.append((0,) if i % 2 else (3, 0))
        elif kind == 1 or not big:
            shapes.append(tuple(torch.randint(1, 40, (2,), generator=gen).tolist()))
        else:
            shapes.append((int(torch.randint(40000, 150000, (1,), generator=gen)),))  # several CPU chunks
    return [(torch.randn(s, generator=gen, dtype=torch.float64) * 3).to(dtype).to(device) for s in shapes]


def reference(ts):
    return torch.stack([torch.linalg.vector_norm(t.double()) if t.numel() else torch.zeros((), dtype=torch.float64)
                        for t in ts])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_matches_vector_norm(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    ts = random_tensors(gen, 23, dtype, big=True)
    ts.append(torch.zeros(5, dtype=dtype))  # a zero-norm tensor
    out = tensor_norms(ts)
    assert out.dtype is (torch.float64 if dtype is torch.float64 else torch.float32) and out.shape == (len(ts),)
    # fp64: a fixed-order fp64 sum against torch's, both to rounding (n * eps64 at worst)
    rtol = 1e-12 if dtype is torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), reference(ts), rtol=rtol, atol=0)


@pytest.mark.parametrize("dtypes, want", [
    ([torch.float32], torch.float32),
    ([torch.float64], torch.float64),
    ([torch.float16], torch.float32),   # 16-bit inputs: fp32 norms, not torch's 16-bit ones
    ([torch.bfloat16], torch.float32),
    ([torch.bfloat16, torch.float16, torch.float32], torch.float32),
    ([torch.float32, torch.float64], torch.float64),  # any fp64 input: fp64 for all
    ([torch.float16, torch.float64, torch.bfloat16], torch.float64),
])
def test_result_dtype(dtypes, want, seed):
    gen = torch.Generator().manual_seed(seed)
    ts = [torch.randn(17 + i, generator=gen, dtype=torch.float64).to(d) for i, d in enumerate(dtypes)]
    out = tensor_norms(ts)
    assert out.dtype is want and out.shape == (len(ts),)
    # fp64 entries exact to fp64 rounding, the others to fp32's.
    for o, t in zip(out, ts):
        rtol = 1e-14 if t.dtype is torch.float64 and want is torch.float64 else 1e-6
        torch.testing.assert_close(o.double(), torch.linalg.vector_norm(t.double()), rtol=rtol, atol=0)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64])
def test_every_output_is_written(out_dtype, seed):
    # Poisoned outputs: each row's out slot (4 or 8 bytes apart) gets its norm.
    gen = torch.Generator().manual_seed(seed)
    ts = random_tensors(gen, 9, torch.float64, big=True) + random_tensors(gen, 9, torch.float32)
    # fp64 inputs into an fp64 out are exact to fp64 rounding; fp32 inputs sum in fp32 lanes.
    exact = out_dtype is torch.float64
    for take_sqrt in (True, False):
        out = torch.full((len(ts),), float("nan"), dtype=out_dtype)
        _kernels.tensor_norms_into(ts, out, take_sqrt=take_sqrt)
        want = reference(ts) if take_sqrt else reference(ts).square()
        torch.testing.assert_close(out[:9].double(), want[:9].to(out_dtype).double(), rtol=1e-12 if exact else 1e-5,
                                   atol=0)
        torch.testing.assert_close(out[9:].double(), want[9:], rtol=1e-5, atol=0)


def test_rejects_an_out_dtype_the_kernel_cannot_write():
    with pytest.raises(ValueError, match="float32 or float64"):
        _kernels.tensor_norms_into([torch.randn(3)], torch.empty(1, dtype=torch.float16), take_sqrt=True)
    rows = torch.zeros((1, 10), dtype=torch.int64).numpy()
    with pytest.raises(ValueError, match="out dtype"):
        fusedopt._C.multi_tensor_norms(rows, 0, 1, -1, 0, 0, True)


def test_mixed_dtypes_keep_order():
    # one result for a list of mixed dtypes: fp32 tolerance for every entry
    ts = [torch.randn(100), torch.randn(50).bfloat16(), torch.randn(0), torch.randn(7).double(), torch.randn(9).half()]
    torch.testing.assert_close(tensor_norms(ts).double(), reference(ts), rtol=1e-5, atol=0)


def test_many_small_tensors_and_tuple_input():
    ts = tuple(torch.randn(int(n)) for n in torch.randint(1, 30, (500,)))
    torch.testing.assert_close(tensor_norms(ts).double(), reference(ts), rtol=1e-5, atol=0)


def test_deterministic_across_runs_and_threads(seed):
    gen = torch.Generator().manual_seed(seed)
    ts = random_tensors(gen, 30, torch.float32, big=True) + [torch.randn(300000, generator=gen)]
    fusedopt.set_num_threads(2)
    a, b = tensor_norms(ts), tensor_norms(ts)
    fusedopt.set_num_threads(1)
    c = tensor_norms(ts)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_inputs_are_not_written():
    ts = [torch.randn(1000), torch.randn(33).bfloat16()]
    copies = [t.clone() for t in ts]
    tensor_norms(ts)
    assert all(torch.equal(t, c) for t, c in zip(ts, copies))


@pytest.mark.parametrize("bad, err, words", [
    ([], ValueError, "empty"),
    ([torch.randn(4, 4).t()], ValueError, "contiguous"),
    ([torch.arange(4)], TypeError, "dtype"),
    ([torch.randn(3), "x"], TypeError, "tensors[1]"),
    ([torch.randn(3, dtype=torch.complex64)], TypeError, "dtype"),
])
def test_rejects_bad_input(bad, err, words):
    with pytest.raises(err, match=words.replace("[", r"\[").replace("]", r"\]")):
        tensor_norms(bad)


def test_rejects_a_single_tensor():
    with pytest.raises(TypeError, match="list"):
        tensor_norms(torch.randn(3))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_vector_norm_and_is_deterministic(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    ts = random_tensors(gen, 40, dtype, device="cuda", big=True) + [torch.randn(3_000_000, device="cuda").to(dtype)]
    out = tensor_norms(ts)
    assert out.device.type == "cuda"
    assert out.dtype is (torch.float64 if dtype is torch.float64 else torch.float32)
    rtol = 1e-12 if dtype is torch.float64 else 1e-5
    torch.testing.assert_close(out.double().cpu(), reference([t.cpu() for t in ts]), rtol=rtol, atol=0)
    assert torch.equal(out, tensor_norms(ts))
    assert out.dtype is want_dtype


@pytest.mark.cuda
def test_cuda_rejects_mixed_devices():
    with pytest.raises(ValueError, match="device"):
        tensor_norms([torch.randn(3, device="cuda"), torch.randn(3)])
