"""torch.compile, for every optimizer of the registry's TRAINING list: compiled
models train with fusedopt, and optimizer.step() inside compiled code traces
through the fusedopt custom ops (fused_step for SGD/Adam/AdamW; large_batch_step
and, for LAMB's clipping, grad_sq_norms for LARS/LAMB), without graph breaks
once the state exists, with the numbers of the eager step."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fusedopt
from helpers import assert_params_close, tiny_model, twin
from optim_registry import TRAINING, TRAINING_BY_CLASS, variant

specs = pytest.mark.parametrize("spec", TRAINING, ids=repr)
# LAMB without clipping: no grad_sq_norms op in the graph.
COMPILED = TRAINING + [variant(TRAINING_BY_CLASS[fusedopt.LAMB], "LAMB-noclip", max_grad_norm=None,
                               decoupled_decay=True)]


def test_custom_op_is_registered_with_fake_impl():
    op = torch.ops.fusedopt.fused_step.default
    assert op._schema.arguments[1].alias_info.is_write  # params are declared mutated
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        p, g = torch.empty(4), torch.empty(4)
        m, v, s = torch.empty(4), torch.empty(4), torch.empty(())
        torch.ops.fusedopt.fused_step("adam", [p], [g], [m, v, s], [2, 3, 5], [0, 0, 1], 0, 1e-3, None,
                                      [0.9, 0.999, 1e-8, 0.0], 0, None, None)


def test_large_batch_custom_ops_are_registered_with_fake_impls():
    op = torch.ops.fusedopt.large_batch_step.default
    assert op._schema.arguments[1].alias_info.is_write  # params are declared mutated
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        p, g, m, v, s = torch.empty(4), torch.empty(4), torch.empty(4), torch.empty(4), torch.empty(())
        sq = torch.ops.fusedopt.grad_sq_norms([g])
        assert sq.shape == (1,) and sq.dtype is torch.float32
        torch.ops.fusedopt.large_batch_step("lamb", [p], [g], [m, v, s], [2, 3, 4], [0, 0, 1], 0, 1e-3, None,
                                            [0.9, 0.999, 1e-6, 0.01, 1.0], 32, None, None, sq)


def test_custom_op_eager_matches_optimizer():
    p = torch.randn(9, requires_grad=True)
    q = p.detach().clone()
    g = torch.randn(9)
    p.grad = g.clone()
    opt = fusedopt.Adam([p], lr=1e-2)
    opt.step()
    m, v, s = torch.zeros(9), torch.zeros(9), torch.zeros(())
    torch.ops.fusedopt.fused_step("adam", [q], [g], [m, v, s], [2, 3, 5], [0, 0, 1], 0, 1e-2, None,
                                  [0.9, 0.999, 1e-8, 0.0], 0, None, None)
    assert torch.equal(p.detach(), q) and torch.equal(opt.state[p]["exp_avg"], m) and float(s) == 1.0


# uses internals: ported by the redesign
def test_large_batch_custom_op_eager_matches_optimizer():
    p = torch.nn.Parameter(torch.randn(9))
    q = p.detach().clone()
    g = torch.randn(9)
    p.grad = g.clone()
    opt = fusedopt.LAMB([p], lr=1e-2, max_grad_norm=0.5)
    opt.step()
    m, v, s = torch.zeros(9), torch.zeros(9), torch.zeros(())
    hyper, flags = opt.kernel_hyper(opt.param_groups[0])
    sq = torch.ops.fusedopt.grad_sq_norms([g])
    torch.ops.fusedopt.large_batch_step("lamb", [q], [g], [m, v, s], [2, 3, 4], [0, 0, 1], 0, 1e-2, None,
                                        list(hyper), flags, None, None, sq)
    assert torch.equal(p.detach(), q) and torch.equal(opt.state[p]["exp_avg"], m) and float(s) == 1.0


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


@pytest.mark.parametrize("master", [False, True], ids=["fp32", "bf16-master"])
@pytest.mark.parametrize("spec", COMPILED, ids=repr)
def test_compiled_step_uses_custom_op_and_matches_eager(spec, master):
    torch._dynamo.reset()
    model = tiny_model()
    kw = dict(spec.hyper)
    if master:
        model = model.bfloat16()
        kw["master_weights"] = True
    ref = twin(model)
    opt, ref_opt = spec.make(model.parameters(), **kw), spec.make(ref.parameters(), **kw)
    dtype = next(model.parameters()).dtype
    batches = [(torch.randn(8, 6, dtype=dtype), torch.randn(8, 3, dtype=dtype)) for _ in range(4)]
    counter = CompileCounterWithBackend("aot_eager")

    # The first compiled step creates the state (eagerly, inside the compiled
    # function); after that the step must trace as one graph: fullgraph=True
    # raises on any graph break.
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
    code = "\n".join(str(g.graph) for g in counter.graphs)
    assert ("large_batch_step" if spec.make in (fusedopt.LARS, fusedopt.LAMB) else "fused_step") in code
    assert ("grad_sq_norms" in code) == spec.clips


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
