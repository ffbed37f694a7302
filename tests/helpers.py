"""Shared test helpers: optimizer pairs (fusedopt vs torch.optim reference) and tiny models."""
import copy

import torch

import fusedopt
from reference_optim import RefLAMB, RefLARS

# (fusedopt class, reference class, hyperparameters): torch.optim where it has
# the optimizer, else the plain-torch references of tests/reference_optim.py.
# LARS and LAMB use weight decay (so the trust ratios act) and LAMB clips.
PAIRS = [
    (fusedopt.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    (fusedopt.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3)),
    (fusedopt.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    (fusedopt.LARS, RefLARS, dict(lr=0.1, momentum=0.9, weight_decay=1e-3, trust_coeff=0.02)),
    (fusedopt.LAMB, RefLAMB, dict(lr=1e-2, weight_decay=0.05, max_grad_norm=0.5)),
]
PAIR_IDS = [c.__name__ for c, _, _ in PAIRS]


def tiny_model(seed=None, width=8):
    if seed is not None:
        torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, width), torch.nn.Tanh(), torch.nn.Linear(width, 3))


def twin(model):
    return copy.deepcopy(model)


def assert_params_close(a, b, rtol=2e-6, atol=2e-7):
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
             for i, p in enumerate(model.parameters()) if p in opt.state}
    return params, state
