"""fusedopt.functional against torch.optim's functional forms (foreach=False):
the same arguments, the same numbers; bad input is rejected before anything
is written; a kept StepPlan is reused only while the tensors are the same."""
import random

import pytest
import torch
from torch.optim.adam import adam as torch_adam
from torch.optim.adamw import adamw as torch_adamw
from torch.optim.sgd import sgd as torch_sgd

import fusedopt
from fusedopt import functional as F
from optim_registry import tensor_bits

# fp32 results differ from torch's CPU kernels by about one ulp per step (no FMA
# contraction here); fp64 results agree to fp64 rounding.
TOL = {torch.float32: dict(rtol=2e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}
DTYPES = [torch.float32, torch.float64]


def random_shapes(rng):
    return [tuple(rng.randint(1, 9) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 6))]


def adam_lists(shapes, dtype, amsgrad):
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    zeros = lambda: [torch.zeros_like(p) for p in params]  # noqa: E731
    steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    return params, zeros(), zeros(), zeros() if amsgrad else [], steps


def clone_lists(lists):
    return [[t.clone() for t in lst] for lst in lists]


def random_adam_hyper(rng):
    return dict(amsgrad=rng.random() < 0.5, beta1=rng.choice([0.0, 0.5, 0.9]), beta2=rng.choice([0.9, 0.999]),
                lr=rng.uniform(1e-4, 0.1), weight_decay=rng.choice([0.0, 1e-3, 0.1]),
                eps=rng.choice([1e-8, 1e-3]), maximize=rng.random() < 0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_matches_torch_functional(name, dtype, seed):
    rng = random.Random(seed)
    shapes, h = random_shapes(rng), random_adam_hyper(rng)
    ours = adam_lists(shapes, dtype, h["amsgrad"])
    theirs = clone_lists(ours)
    plan = F.StepPlan()
    for _ in range(5):
        grads = [torch.randn_like(p) for p in ours[0]]
        getattr(F, name)(ours[0], grads, *ours[1:], plan=plan, **h)
        torch_fn = torch_adam if name == "adam" else torch_adamw
        torch_fn(theirs[0], [g.clone() for g in grads], *theirs[1:], foreach=False, **h)
    for a, b in zip(ours[:4], theirs[:4]):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, **TOL[dtype])
    assert all(float(s) == 5 for s in ours[4])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_matches_torch_functional_and_fills_new_buffers(dtype, seed):
    rng = random.Random(seed)
    shapes = random_shapes(rng)
    nesterov = rng.random() < 0.5
    h = dict(weight_decay=rng.choice([0.0, 1e-3]), momentum=rng.choice([0.5, 0.9]), lr=rng.uniform(1e-3, 0.1),
             dampening=0.0 if nesterov else rng.choice([0.0, 0.3]), nesterov=nesterov, maximize=rng.random() < 0.5)
    ours = [torch.randn(s, dtype=dtype) for s in shapes]
    theirs = [p.clone() for p in ours]
    bufs, ref_bufs = [None] * len(ours), [None] * len(ours)
    plan = F.StepPlan()
    for _ in range(4):
        grads = [torch.randn_like(p) for p in ours]
        F.sgd(ours, grads, bufs, plan=plan, **h)
        torch_sgd(theirs, [g.clone() for g in grads], ref_bufs, foreach=False, **h)
        assert all(isinstance(b, torch.Tensor) and b.dtype is dtype for b in bufs)  # as torch fills the list
    for x, y in zip(ours + bufs, theirs + ref_bufs):
        torch.testing.assert_close(x, y, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_scale_and_found_inf_as_torch_fused(dtype, seed):
    """grad_scale divides the grads; found_inf set skips the whole step (counters included)."""
    shapes = random_shapes(random.Random(seed))
    ours = adam_lists(shapes, dtype, False)
    ref = clone_lists(ours)
    grads = [torch.randn_like(p) for p in ours[0]]
    h = dict(amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-2, weight_decay=0.0, eps=1e-8, maximize=False)
    F.adam(ours[0], [g * 256 for g in grads], *ours[1:], grad_scale=torch.tensor(256.0), found_inf=torch.tensor(0.0),
           **h)
    torch_adam(ref[0], grads, *ref[1:], foreach=False, **h)
    for a, b in zip(ours[0], ref[0]):
        torch.testing.assert_close(a, b, **TOL[dtype])
    before = [tensor_bits(t) for lst in ours for t in lst]
    F.adam(ours[0], grads, *ours[1:], found_inf=torch.tensor(1.0), **h)
    assert [tensor_bits(t) for lst in ours for t in lst] == before


def test_lars_and_lamb_run_like_their_classes(seed):
    """The functional LARS/LAMB give the bits of the optimizer classes (which call them)."""
    shapes = random_shapes(random.Random(seed))
    for name, cls, kw in [
        ("lars", fusedopt.LARS, dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=True,
                                     trust_coeff=0.01, eps=1e-8, trust_clip=False, always_adapt=False)),
        ("lamb", fusedopt.LAMB, dict(lr=1e-2, eps=1e-6, weight_decay=0.01, bias_correction=True,
                                     grad_averaging=True, max_grad_norm=0.5, trust_clip=False, always_adapt=False,
                                     decoupled_decay=False)),
    ]:
        params = [torch.randn(s) for s in shapes]
        ref = [torch.nn.Parameter(p.clone()) for p in params]
        ckw = dict(kw)
        if name == "lamb":
            ckw["betas"] = (0.9, 0.999)
            fkw = dict(kw, beta1=0.9, beta2=0.999)
            lists = ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
                     [torch.zeros(()) for _ in params])
        else:
            fkw, lists = kw, ([None] * len(params),)
        opt = cls(ref, **ckw)
        for _ in range(3):
            grads = [torch.randn_like(p) for p in params]
            for p, g in zip(ref, grads):
                p.grad = g.clone()
            opt.step()
            getattr(F, name)(params, grads, *lists, **fkw)
        assert all(torch.equal(a, b.detach()) for a, b in zip(params, ref)), name


def bad_adam_calls(shapes):
    """(description, lists mutator, exception, message regex)."""
    def shape(lists):
        lists[1][-1] = torch.zeros(len(shapes) + 40)
    def dtype(lists):
        lists[2][0] = lists[2][0].half()
    def short(lists):
        lists[3].pop()
    def step(lists):
        lists[5][0] = torch.zeros(2)
    def grad_none(lists):
        lists[1][0] = None
    return [("grad shape", shape, ValueError, r"grad of params\[\d+\] has shape"),
            ("state dtype", dtype, TypeError, r"exp_avgs\[0\] has dtype torch.float16; expected torch.float32"),
            ("list length", short, ValueError, r"exp_avg_sqs has \d+ entries; expected \d+, one per param"),
            ("step tensor", step, ValueError, r"state_steps\[0\] must be a one-element float32 tensor"),
            ("missing grad", grad_none, TypeError, r"grad of params\[0\] is a NoneType")]


@pytest.mark.parametrize("case", range(5))
def test_bad_input_writes_nothing(case, seed):
    shapes = random_shapes(random.Random(seed))
    params, m, v, _, steps = adam_lists(shapes, torch.float32, False)
    lists = [params, [torch.randn_like(p) for p in params], m, v, [], steps]
    plan = F.StepPlan()
    h = dict(amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-2, weight_decay=0.0, eps=1e-8, maximize=False)
    F.adam(*lists, plan=plan, **h)  # a good step first: the plan holds these tensors
    _, mutate, exc, match = bad_adam_calls(shapes)[case]
    mutate(lists)
    before = [tensor_bits(t) for lst in lists for t in lst if isinstance(t, torch.Tensor)]
    with pytest.raises(exc, match=match):
        F.adam(*lists, plan=plan, **h)
    assert [tensor_bits(t) for lst in lists for t in lst if isinstance(t, torch.Tensor)] == before


@pytest.mark.parametrize("key,value,exc,match", [
    ("lr", -1.0, ValueError, r"invalid lr: -1.0; expected a value in \[0.0, inf\)"),
    ("eps", 0.0, ValueError, r"invalid eps: 0.0"),
    ("beta1", 1.0, ValueError, r"invalid betas\[0\]: 1.0"),
    ("weight_decay", float("nan"), ValueError, r"invalid weight_decay: nan"),
    ("lr", "0.1", TypeError, r"lr must be a number"),
    ("beta2", torch.tensor([0.9, 0.9]), TypeError, r"beta2 must be a float or a one-element CPU tensor"),
])
def test_bad_hyperparameters_write_nothing(key, value, exc, match, seed):
    params, m, v, _, steps = adam_lists([(3,), (4, 2)], torch.float32, False)
    grads = [torch.randn_like(p) for p in params]
    h = dict(amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-2, weight_decay=0.0, eps=1e-8, maximize=False)
    h[key] = value
    before = [tensor_bits(t) for t in params + m + v + steps]
    with pytest.raises(exc, match=match):
        F.adam(params, grads, m, v, [], steps, **h)
    assert [tensor_bits(t) for t in params + m + v + steps] == before


def test_plan_is_rebuilt_when_a_state_tensor_is_replaced(seed):
    """A kept plan is reused only for the same tensor objects: a replaced state
    entry is re-checked (a wrong one raises) and then written, not the old one."""
    params, m, v, _, steps = adam_lists([(5,), (6,)], torch.float32, False)
    h = dict(amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-2, weight_decay=0.0, eps=1e-8, maximize=False)
    plan = F.StepPlan()
    grads = [torch.randn_like(p) for p in params]
    F.adam(params, grads, m, v, [], steps, plan=plan, **h)
    old = m[1]
    m[1] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"exp_avgs\[1\] has shape \[7\]"):
        F.adam(params, grads, m, v, [], steps, plan=plan, **h)
    m[1] = old.clone()
    kept = old.clone()
    F.adam(params, grads, m, v, [], steps, plan=plan, **h)
    assert torch.equal(old, kept) and not torch.equal(m[1], kept)  # the new tensor was written


def test_prepared_step_writes_only_when_launched(seed):
    params, m, v, _, steps = adam_lists([(5,), (2, 3)], torch.float32, False)
    grads = [torch.randn_like(p) for p in params]
    before = [tensor_bits(t) for t in params + m + v + steps]
    call = F.adam(params, grads, m, v, [], steps, launch=False, amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-2,
                  weight_decay=0.0, eps=1e-8, maximize=False)
    assert isinstance(call, F.PreparedStep)
    assert [tensor_bits(t) for t in params + m + v + steps] == before
    call.launch()
    assert all(float(s) == 1 for s in steps) and not torch.equal(params[0], torch.zeros(5))


def test_owned_lists_plan_still_sees_a_param_whose_storage_changed(seed):
    """With owned_lists the per-tensor identity comparison is skipped for the same
    list objects, but a param whose storage changed is re-checked (and a wrong
    one rejected before anything is written)."""
    params, m, v, _, steps = adam_lists([(5,), (6,)], torch.float32, False)
    h = dict(amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-2, weight_decay=0.0, eps=1e-8, maximize=False)
    plan = F.StepPlan(owned_lists=True)
    grads = [torch.randn_like(p) for p in params]
    F.adam(params, grads, m, v, [], steps, plan=plan, **h)
    params[1].data = torch.randn(3)  # same tensor object, new storage and shape
    before = [tensor_bits(t) for t in params + m + v + steps]
    with pytest.raises(ValueError, match=r"exp_avgs\[1\] has shape \[6\]; expected \[3\]"):
        F.adam(params, grads, m, v, [], steps, plan=plan, **h)
    assert [tensor_bits(t) for t in params + m + v + steps] == before


def test_host_lr_is_refused_under_cuda_graph_capture():
    """The rule (checked on CPU): under capture only a CUDA tensor lr is accepted,
    since a host value would be frozen into the graph."""
    from fusedopt.functional._step import _lr_scalars
    cuda = torch.device("cuda")
    for lr in (1e-3, torch.tensor(1e-3)):
        with pytest.raises(RuntimeError, match="under CUDA graph capture lr must be a CUDA tensor"):
            _lr_scalars(lr, cuda, capturing=True)
    assert _lr_scalars(1e-3, torch.device("cpu")) == (1e-3, None)


@pytest.mark.parametrize("cls", [fusedopt.LARS, fusedopt.LAMB])
def test_rebuild_after_capture_keeps_the_norm_slots_alive(cls, seed):
    """A plan that served a captured step keeps the norm buffers of its old tables
    when it is rebuilt (a graph replays writes to them); one that never did frees them."""
    params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 7, 3)]
    for captured in (False, True):
        opt = cls(params, lr=0.1, weight_decay=1e-3)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        plan = opt._plans[0]
        old = plan.batches[0].table.norms
        plan.captured = captured  # what a step prepared during CUDA graph capture sets
        params[1].grad = None     # another set of params with grads: the plan is rebuilt
        opt.step()
        assert plan.batches[0].table.norms is not old
        assert any(t is old for t in plan.retired) == captured


@pytest.mark.parametrize("bad", [lambda sq: sq.float(), lambda sq: sq.reshape(1, -1), lambda sq: "sums"])
def test_lamb_bad_clip_sums_write_nothing(bad, seed):
    """A wrong clip_grad_sq is rejected before any batch of the call is written
    (fp32 and fp64 params: two batches)."""
    params = [torch.randn(5), torch.randn(4, dtype=torch.float64)]
    lists = ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
             [torch.zeros(()) for _ in params])
    grads = [torch.randn_like(p) for p in params]
    sq = F.grad_sq_norms([g.double() for g in grads])
    before = [tensor_bits(t) for t in params + [t for lst in lists for t in lst]]
    with pytest.raises(ValueError, match="clip_grad_sq must give a contiguous 1-D float64 tensor"):
        F.lamb(params, grads, *lists, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01,
               bias_correction=True, grad_averaging=True, max_grad_norm=0.5, trust_clip=False, always_adapt=False,
               decoupled_decay=False, clip_grad_sq=bad(sq))
    assert [tensor_bits(t) for t in params + [t for lst in lists for t in lst]] == before
