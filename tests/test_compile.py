"""torch.compile: compiled models train with fusedopt, and optimizer.step() inside
compiled code runs through the fusedopt::optimizer_step custom op."""
import pytest
import torch

import fusedopt
from fusedopt import _ops
from helpers import PAIR_IDS, PAIRS, assert_params_close, tiny_model, twin


ADAM_OPTIONS = dict(amsgrad=False, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, maximize=False)


def test_custom_op_is_registered_with_fake_impl():
    op = torch.ops.fusedopt.optimizer_step.default
    assert op._schema.arguments[2].alias_info.is_write  # params are declared mutated
    assert op._schema.arguments[4].alias_info.is_write  # and the states
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        p, g = torch.empty(4), torch.empty(4)
        m, v, s = torch.empty(4), torch.empty(4), torch.empty(())
        _ops.compiled_step("adam", [p], [g], dict(exp_avgs=[m], exp_avg_sqs=[v], state_steps=[s]), ADAM_OPTIONS,
                           1e-3, None, None)


def test_custom_op_eager_matches_optimizer(seed):
    """The op runs the same functional entry as the eager step: the same bits."""
    p = torch.randn(9, requires_grad=True)
    q = p.detach().clone()
    g = torch.randn(9)
    p.grad = g.clone()
    opt = fusedopt.Adam([p], lr=1e-2)
    opt.step()
    m, v, s = torch.zeros(9), torch.zeros(9), torch.zeros(())
    _ops.compiled_step("adam", [q], [g], dict(exp_avgs=[m], exp_avg_sqs=[v], state_steps=[s]), ADAM_OPTIONS,
                       1e-2, None, None)
    assert torch.equal(p.detach(), q) and torch.equal(opt.state[p]["exp_avg"], m) and float(s) == 1.0


def test_options_round_trip_through_the_op_schema():
    options = dict(amsgrad=True, beta1=0.5, max_grad_norm=None, lr=3.0)
    names, values = _ops._encode_options(options)
    assert _ops._decode_options(names, values) == options


def assert_compiled_model_trains(make_opt, make_ref_opt):
    """A torch.compile'd model trained by make_opt(params) ends where the eager
    twin trained by make_ref_opt(params) does."""
    torch._dynamo.reset()
    model = tiny_model()
    ref = twin(model)
    compiled = torch.compile(model, backend="eager")
    opt, ref_opt = make_opt(model.parameters()), make_ref_opt(ref.parameters())
    for _ in range(3):
        x, y = torch.randn(8, 6), torch.randn(8, 3)
        for m, o in ((compiled, opt), (ref, ref_opt)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    assert_params_close(model, ref)


@pytest.mark.parametrize("fcls,tcls,kw", PAIRS, ids=PAIR_IDS)
def test_compiled_model_trains(fcls, tcls, kw):
    assert_compiled_model_trains(lambda ps: fcls(ps, **kw), lambda ps: tcls(ps, foreach=False, **kw))


@pytest.mark.parametrize("fcls,tcls,kw", PAIRS, ids=PAIR_IDS)
def test_compiled_step_uses_custom_op_and_matches_eager(fcls, tcls, kw):
    torch._dynamo.reset()
    model = tiny_model()
    ref = twin(model)
    opt, ref_opt = fcls(model.parameters(), **kw), fcls(ref.parameters(), **kw)
    calls = []
    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter)
    def compiled_step():
        opt.step()

    for _ in range(4):
        x, y = torch.randn(8, 6), torch.randn(8, 3)
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
        compiled_step()
        ref_opt.step()
    assert_params_close(model, ref, rtol=0, atol=0)
    graphs = counter.graphs
    assert graphs, "opt.step() was not captured in any graph"
    assert any("optimizer_step" in str(g.code) or "optimizer_step" in str(g.graph) for g in graphs)


@pytest.mark.slow
@pytest.mark.parametrize("fcls,tcls,kw", PAIRS, ids=PAIR_IDS)
def test_inductor_compiled_train_step(fcls, tcls, kw):
    torch._dynamo.reset()
    model = tiny_model()
    ref = twin(model)
    opt, ref_opt = fcls(model.parameters(), **kw), tcls(ref.parameters(), foreach=False, **kw)

    @torch.compile
    def train_step(x, y):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    for _ in range(3):
        x, y = torch.randn(8, 6), torch.randn(8, 3)
        train_step(x, y)
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        ref_opt.step()
    assert_params_close(model, ref, rtol=1e-5, atol=1e-6)
