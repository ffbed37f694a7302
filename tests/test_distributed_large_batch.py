"""LARS and LAMB under FSDP2 (fully_shard, DTensor params) on 2 CPU processes
with gloo: the per-tensor norms (LARS |p|, |g|; LAMB |p'|, |u|) and LAMB's
global grad norm are all-reduced over the shard group, so a sharded run must
match one process training on the whole batch. Model, data and the spawn
harness (spawn_ranks: bounded, clean rank exit) come from test_distributed.py."""
import pytest
import torch
import torch.distributed as dist

import fusedopt
from test_distributed import STEPS, WORLD, data, fsdp_wrap, make_model, spawn_ranks, train_on_shard

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")

OPTS = {
    # weight decay: the trust ratios are used.
    "LARS": (fusedopt.LARS, dict(lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coeff=0.02)),
    # max_grad_norm far below the grad norms of this model and data: clipping is active.
    "LAMB": (fusedopt.LAMB, dict(lr=2e-2, weight_decay=0.05, max_grad_norm=0.05)),
    "LAMB-trustclip-decoupled": (fusedopt.LAMB, dict(lr=2e-2, weight_decay=0.05, max_grad_norm=0.05,
                                                     trust_clip=True, decoupled_decay=True)),
}


def single_process(name):
    cls, kw = OPTS[name]
    model = make_model()
    opt = cls(model.parameters(), **kw)
    grad_norms = []
    for x, y in data():
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grad_norms.append(float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))))
        opt.step()
    return [p.detach().clone() for p in model.parameters()], grad_norms


def fsdp_train(rank, name):
    """One rank's share of the sharded training; returns the full params."""
    from torch.distributed.tensor import DTensor
    cls, kw = OPTS[name]
    model = fsdp_wrap(make_model())
    opt = cls(model.parameters(), **kw)
    train_on_shard(rank, model, opt)
    for p in model.parameters():
        assert isinstance(p, DTensor), type(p)
        if "step" in opt.state[p]:
            assert float(opt.state[p]["step"]) == STEPS  # advanced once per step by the split step
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def fsdp_train_each(rank, names):
    return {name: fsdp_train(rank, name) for name in names}


@pytest.fixture(scope="module")
def sharded():
    """One spawn trains every optimizer (spawning costs seconds)."""
    return spawn_ranks(fsdp_train_each, list(OPTS))


@pytest.mark.parametrize("name", list(OPTS))
def test_fsdp2_large_batch_matches_unsharded(sharded, name):
    want, grad_norms = single_process(name)
    kw = OPTS[name][1]
    if "max_grad_norm" in kw:
        assert min(grad_norms) > 2 * kw["max_grad_norm"]  # the clip really acts
    got = sharded[name]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
