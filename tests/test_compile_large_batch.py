"""torch.compile with LARS and LAMB: opt.step() inside compiled code traces
through the fusedopt::optimizer_step (and, for LAMB's clipping,
fusedopt::grad_sq_norms) custom ops, without graph breaks, with the numbers of
the eager step."""
import pytest
import torch

import fusedopt
from fusedopt import _ops
from helpers import assert_params_close, tiny_model, twin

OPTS = [
    (fusedopt.LARS, dict(lr=0.1, momentum=0.9, weight_decay=1e-3, trust_coeff=0.02)),
    (fusedopt.LAMB, dict(lr=1e-2, weight_decay=0.05, max_grad_norm=0.1)),
    (fusedopt.LAMB, dict(lr=1e-2, weight_decay=0.05, max_grad_norm=None, decoupled_decay=True)),
]
IDS = ["LARS", "LAMB-clip", "LAMB-noclip"]


LAMB_OPTIONS = dict(beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True, grad_averaging=True,
                    max_grad_norm=0.5, trust_clip=False, always_adapt=False, decoupled_decay=False)


def test_custom_ops_are_registered_with_fake_impls():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        p, g, m, v, s = torch.empty(4), torch.empty(4), torch.empty(4), torch.empty(4), torch.empty(())
        sq = torch.ops.fusedopt.grad_sq_norms([g])
        assert sq.shape == (1,) and sq.dtype is torch.float64
        _ops.compiled_step("lamb", [p], [g], dict(exp_avgs=[m], exp_avg_sqs=[v], state_steps=[s]), LAMB_OPTIONS,
                           1e-3, None, None, clip_grad_sq=sq)


def test_custom_op_eager_matches_optimizer(seed):
    p = torch.nn.Parameter(torch.randn(9))
    q = p.detach().clone()
    g = torch.randn(9)
    p.grad = g.clone()
    opt = fusedopt.LAMB([p], lr=1e-2, max_grad_norm=0.5)
    opt.step()
    m, v, s = torch.zeros(9), torch.zeros(9), torch.zeros(())
    sq = torch.ops.fusedopt.grad_sq_norms([g])
    _ops.compiled_step("lamb", [q], [g], dict(exp_avgs=[m], exp_avg_sqs=[v], state_steps=[s]), LAMB_OPTIONS,
                       1e-2, None, None, clip_grad_sq=sq)
    assert torch.equal(p.detach(), q) and torch.equal(opt.state[p]["exp_avg"], m) and float(s) == 1.0


def train(model, opt, batches, step):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        step()


@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("cls,kw", OPTS, ids=IDS)
def test_compiled_step_has_no_graph_break_and_matches_eager(cls, kw, master):
    torch._dynamo.reset()
    model = tiny_model()
    if master:
        model = model.bfloat16()
        kw = dict(kw, master_weights=True)
    ref = twin(model)
    opt, ref_opt = cls(model.parameters(), **kw), cls(ref.parameters(), **kw)
    batches = [(torch.randn(8, 6, dtype=next(model.parameters()).dtype),
                torch.randn(8, 3, dtype=next(model.parameters()).dtype)) for _ in range(4)]
    # The first step creates the state eagerly (as for SGD/Adam); after that the
    # step must trace as one graph: fullgraph=True raises on any graph break.
    train(model, opt, batches[:1], opt.step)
    train(ref, ref_opt, batches[:1], ref_opt.step)
    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True)
    def compiled_step():
        opt.step()

    train(model, opt, batches[1:], compiled_step)
    train(ref, ref_opt, batches[1:], ref_opt.step)
    assert_params_close(model, ref, rtol=0, atol=0)
    for p, q in zip(model.parameters(), ref.parameters()):
        for k, v in ref_opt.state[q].items():
            assert torch.equal(opt.state[p][k], v), k
    assert counter.frame_count >= 1
    code = "\n".join(str(g.graph) for g in counter.graphs)
    assert "optimizer_step" in code
    if kw.get("max_grad_norm") is not None:
        assert "grad_sq_norms" in code
