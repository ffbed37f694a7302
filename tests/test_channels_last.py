"""channels_last (and other dense, non-overlapping layouts) for every optimizer.

The update is elementwise, so a param whose memory is one flat run is updated
as such, with its grad and state in the same layout (state is made like the
param, as torch.optim makes it). Tests:

- a channels_last CNN trains with every optimizer like its reference (torch.optim
  with foreach=False; the fp64 per-tensor references for LARS and LAMB) stepped
  with the same grads, and the state keeps the params' layout;
- the same param in channels_last and contiguous layouts, with the same grads,
  gives the same update (bit for bit where the math is elementwise; LARS and
  LAMB sum their norms in memory order, so to rounding there);
- a state_dict round trip keeps the layout and continues bit for bit.
"""
from __future__ import annotations

import io

import pytest
import torch

from optim_registry import TRAINING, snapshot
from reference_optim import drift_tol

STEPS = 5
ELEMENTWISE = {"SGD", "Adam", "AdamW"}


def cnn(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 1),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
    return model.to(memory_format=torch.channels_last)


def batches(seed: int, n: int = STEPS):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 12, 12, generator=gen).to(memory_format=torch.channels_last),
             torch.randint(0, 10, (8,), generator=gen)) for _ in range(n)]


def train_step(model, opt, x, y) -> None:
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_the_model_really_is_channels_last(seed):
    conv = [m for m in cnn(seed) if isinstance(m, torch.nn.Conv2d)][0]
    assert not conv.weight.is_contiguous() and conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("spec", TRAINING, ids=repr)
def test_channels_last_cnn_trains_like_the_reference(spec, seed):
    ours, ref = cnn(seed), cnn(seed)
    opt = spec.make(ours.parameters(), **spec.hyper)
    ref_opt = spec.reference(list(ref.parameters()), **spec.hyper)
    for x, y in batches(seed):
        # The reference steps with our model's grads: through a network, a last-bit
        # difference in a param changes the next grads, which Adam's normalization
        # magnifies where a grad is tiny; the optimizers are compared, not the chaos.
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ours(x), y).backward()
        for p, q in zip(ours.parameters(), ref.parameters()):
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    rtol, atol = drift_tol(torch.float32, STEPS, roundings=16)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q.to(p.dtype), rtol=rtol, atol=atol, msg=name)
        assert p.stride() == q.stride(), name
        for key, st in opt.state[p].items():
            if isinstance(st, torch.Tensor) and st.shape == p.shape:
                assert st.stride() == p.stride(), f"state['{key}'] of {name} lost the param's layout"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("spec", TRAINING, ids=repr)
def test_layout_does_not_change_the_update(spec, device, seed):
    """Same values, same grads, two layouts: the same result."""
    gen = torch.Generator().manual_seed(seed)
    values = [torch.randn(s, generator=gen).to(device) for s in [(6, 4, 3, 3), (5, 2, 1, 1), (7, 3, 2, 5)]]
    grads = [[torch.randn(v.shape, generator=gen).to(device) for v in values] for _ in range(STEPS)]
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        params = [torch.nn.Parameter(v.clone().to(memory_format=layout)) for v in values]
        opt = spec.make(params, **spec.hyper)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.to(memory_format=layout)
            opt.step()
        results.append([p.detach().contiguous() for p in params])
    for a, b in zip(*results):
        if spec.name in ELEMENTWISE:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", TRAINING, ids=repr)
def test_state_dict_round_trip_keeps_the_layout(spec, seed):
    model = cnn(seed)
    opt = spec.make(model.parameters(), **spec.hyper)
    data = batches(seed, 2 * STEPS)
    for x, y in data[:STEPS]:
        train_step(model, opt, x, y)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = cnn(seed)
    twin.load_state_dict(saved["model"])
    twin_opt = spec.make(twin.parameters(), **spec.hyper)
    twin_opt.load_state_dict(saved["opt"])
    for p in twin.parameters():
        for st in twin_opt.state[p].values():
            if isinstance(st, torch.Tensor) and st.shape == p.shape:
                assert st.stride() == p.stride()
    for x, y in data[STEPS:]:
        train_step(model, opt, x, y)
        train_step(twin, twin_opt, x, y)
    assert snapshot(twin_opt) == snapshot(opt)


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_channels_last_bf16_params_with_master_weights(state_dtype, seed):
    """The fp32 master copy and bf16 state follow the param's layout too."""
    import fusedopt
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(4, 6, 3, 3, generator=gen).to(torch.bfloat16)
    grads = [torch.randn(values.shape, generator=gen).to(torch.bfloat16) for _ in range(STEPS)]
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        p = torch.nn.Parameter(values.clone().to(memory_format=layout))
        opt = fusedopt.AdamW([p], lr=1e-2, master_weights=True, state_dtype=state_dtype)
        for g in grads:
            p.grad = g.to(memory_format=layout)
            opt.step()
        for key in ("master", "exp_avg", "exp_avg_sq"):
            assert opt.state[p][key].stride() == p.stride(), key
        results.append((p.detach().contiguous(), opt.state[p]["master"].contiguous()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
