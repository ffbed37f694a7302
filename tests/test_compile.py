"""torch.compile, for every optimizer of the registry's TRAINING list: compiled
models train with fusedopt, and optimizer.step() inside compiled code traces
through the fusedopt custom ops (optimizer_step, the functional entries as one op;
grad_sq_norms for LAMB's clipping), without graph breaks
once the state exists, with the numbers of the eager step."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fusedopt
from fusedopt import _ops
from helpers import assert_params_close, tiny_model, twin
from optim_registry import BY_NAME, TRAINING, TRAINING_BY_CLASS, variant

specs = pytest.mark.parametrize("spec", TRAINING, ids=repr)
# LAMB without clipping: no grad_sq_norms op in the graph.
# 8-bit states: the op carries the int8 codes and the absmax lists.
COMPILED = TRAINING + [variant(TRAINING_BY_CLASS[fusedopt.LAMB], "LAMB-noclip", max_grad_norm=None,
                               decoupled_decay=True), BY_NAME["AdamW-int8-amsgrad"], BY_NAME["SGD-momentum-int8"]]


ADAM_OPTIONS = dict(amsgrad=False, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, maximize=False)
LAMB_OPTIONS = dict(beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True, grad_averaging=True,
                    max_grad_norm=0.5, trust_clip=False, always_adapt=False, decoupled_decay=False)


def test_custom_op_is_registered_with_fake_impl():
    op = torch.ops.fusedopt.optimizer_step.default
    assert op._schema.arguments[2].alias_info.is_write  # params are declared mutated
    assert op._schema.arguments[4].alias_info.is_write  # and the states
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        p, g, m, v, s = torch.empty(4), torch.empty(4), torch.empty(4), torch.empty(4), torch.empty(())
        lists = dict(exp_avgs=[m], exp_avg_sqs=[v], state_steps=[s])
        _ops.compiled_step("adam", [p], [g], lists, ADAM_OPTIONS, 1e-3, None, None)
        sq = torch.ops.fusedopt.grad_sq_norms([g])
        assert sq.shape == (1,) and sq.dtype is torch.float64
        _ops.compiled_step("lamb", [p], [g], lists, LAMB_OPTIONS, 1e-3, None, None, clip_grad_sq=sq)


@pytest.mark.parametrize("cls,name,options,kw", [
    (fusedopt.Adam, "adam", ADAM_OPTIONS, {}),
    (fusedopt.LAMB, "lamb", LAMB_OPTIONS, dict(max_grad_norm=0.5)),
], ids=["Adam", "LAMB"])
def test_custom_op_eager_matches_optimizer(cls, name, options, kw):
    """The op runs the same functional entry as the eager step: the same bits."""
    p = torch.nn.Parameter(torch.randn(9))
    q = p.detach().clone()
    g = torch.randn(9)
    p.grad = g.clone()
    opt = cls([p], lr=1e-2, **kw)
    opt.step()
    m, v, s = torch.zeros(9), torch.zeros(9), torch.zeros(())
    extra = dict(clip_grad_sq=torch.ops.fusedopt.grad_sq_norms([g])) if name == "lamb" else {}
    _ops.compiled_step(name, [q], [g], dict(exp_avgs=[m], exp_avg_sqs=[v], state_steps=[s]), options, 1e-2,
                       None, None, **extra)
    assert torch.equal(p.detach(), q) and torch.equal(opt.state[p]["exp_avg"], m) and float(s) == 1.0


def test_options_round_trip_through_the_op_schema():
    options = dict(amsgrad=True, beta1=0.5, max_grad_norm=None, lr=3.0)
    names, values = _ops._encode_options(options)
    assert _ops._decode_options(names, values) == options


def train(model, opt, batches, step):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        step()


@specs
def test_compiled_model_trains(spec):
    """A torch.compile'd model trained by fusedopt ends where the eager twin trained by the reference does."""
    torch._dynamo.reset()
    model = tiny_model()
    ref = twin(model)
    compiled = torch.compile(model, backend="eager")
    opt, ref_opt = spec.make(model.parameters(), **spec.hyper), spec.reference(ref.parameters(), **spec.hyper)
    batches = [(torch.randn(8, 6), torch.randn(8, 3)) for _ in range(3)]
    train(compiled, opt, batches, opt.step)
    train(ref, ref_opt, batches, ref_opt.step)
    assert_params_close(model, ref)


def compile_and_compare(spec, model, kw):
    """Trains ``model`` with one compiled first step (it creates the state, eagerly,
    inside the compiled function) and three steps that must trace as one graph
    (fullgraph=True raises on any graph break), and an eager twin alongside; checks
    the same bits. Returns the compiled run's optimizer and the graph counter."""
    ref = twin(model)
    opt, ref_opt = spec.make(model.parameters(), **kw), spec.make(ref.parameters(), **kw)
    dtype = next(model.parameters()).dtype
    batches = [(torch.randn(8, 6, dtype=dtype), torch.randn(8, 3, dtype=dtype)) for _ in range(4)]
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend="aot_eager")
    def first_step():
        opt.step()

    @torch.compile(backend=counter, fullgraph=True)
    def compiled_step():
        opt.step()

    train(model, opt, batches[:1], first_step)
    train(model, opt, batches[1:], compiled_step)
    train(ref, ref_opt, batches, ref_opt.step)
    assert_params_close(model, ref, rtol=0, atol=0)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert set(opt.state[p]) == set(ref_opt.state[q])
        for k, v in ref_opt.state[q].items():
            assert torch.equal(opt.state[p][k], v), k
    assert counter.frame_count >= 1, "opt.step() was not captured in any graph"
    assert "optimizer_step" in "\n".join(str(g.graph) for g in counter.graphs)
    return opt, counter


@pytest.mark.parametrize("master", [False, True], ids=["fp32", "bf16-master"])
@pytest.mark.parametrize("spec", COMPILED, ids=repr)
def test_compiled_step_uses_custom_op_and_matches_eager(spec, master):
    torch._dynamo.reset()
    model = tiny_model()
    kw = dict(spec.hyper)
    if master:
        model = model.bfloat16()
        kw["master_weights"] = True
    _, counter = compile_and_compare(spec, model, kw)
    code = "\n".join(str(g.graph) for g in counter.graphs)
    assert ("grad_sq_norms" in code) == spec.clips


@pytest.mark.parametrize("spec", [BY_NAME[n] for n in ("SGD-sr", "Adam-sr", "AdamW-sr", "LARS-sr", "LAMB-sr")],
                         ids=repr)
def test_compiled_stochastic_rounding_step_has_no_graph_break(spec):
    """Stochastic rounding under torch.compile: the seed travels as the group's device
    words (an input of the op) and their advance is an in-place add in the graph, so
    the step traces as one graph, with the bits of the eager steps and words that
    count every step (a seed frozen into the graph would repeat its bits)."""
    torch._dynamo.reset()
    opt, _ = compile_and_compare(spec, tiny_model().bfloat16(), dict(spec.hyper, seed=3))
    assert opt.param_groups[0]["rounding_state"].tolist() == [3, 4, 0]


@pytest.mark.slow
@specs
def test_inductor_compiled_train_step(spec):
    torch._dynamo.reset()
    model = tiny_model()
    ref = twin(model)
    opt, ref_opt = spec.make(model.parameters(), **spec.hyper), spec.reference(ref.parameters(), **spec.hyper)

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
