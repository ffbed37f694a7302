"""Shared test helpers: tiny models and their comparison. The optimizers and
their references come from optim_registry.py."""
import copy

import torch


def tiny_model(width=8):
    """A small MLP drawn from the global RNG (seeded per test by conftest's `seed`)."""
    return torch.nn.Sequential(torch.nn.Linear(6, width), torch.nn.Tanh(), torch.nn.Linear(width, 3))


def twin(model):
    return copy.deepcopy(model)


def assert_params_close(a, b, rtol=2e-6, atol=2e-7):
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


def assert_capture_refused(opt, p, match):
    """After one eager step, a captured step of opt raises RuntimeError(match) and leaves p as it was."""
    import pytest
    p.grad = torch.randn_like(p)
    opt.step()
    before = p.detach().clone()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=match):
        with torch.cuda.graph(graph):
            opt.step()
    assert torch.equal(p.detach(), before)


def snapshot(params, opt):
    """Copies of params and of their optimizer state ({index: {key: value}})."""
    params = list(params)
    copies = [p.detach().clone() for p in params]
    state = {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
             for i, p in enumerate(params) if p in opt.state}
    return copies, state
