"""The cheap per-step path (issue 12) sees every change a step must see.

A step whose plan is kept checks its tensors in one C++ pass through torch's C
shim (fusedopt/_kernels/fast_checks.py) or, when that says anything differs or
is off, with the Python checks. Each test runs on both paths (``checks``):

- the shim reads exactly what torch's own attributes say, for every kind of tensor;
- every change a user can make between two steps (a grad replaced, resized,
  made non-contiguous, given another dtype or memory the step writes; a param
  whose storage changed or that was swapped; a state entry replaced; a param
  that gained or lost its grad; a group's list changed in place) gives either
  an error with nothing written, or a step bit-identical to one whose plan was
  built from scratch;
- a step with nothing changed takes the C++ path (no Python check runs).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import fusedopt
from fusedopt import _C
from fusedopt._kernels import fast_checks
from fusedopt._kernels.layout import DTYPE_CODES, FLAGS_COLUMN, ROW_FLAGS
from fusedopt._kernels.rows import RowTable
from fusedopt.functional import StepPlan
from optim_registry import TRAINING, snapshot


@pytest.fixture(params=["fast", "python"])
def checks(request):
    fast_checks.set_enabled(request.param == "fast")
    yield request.param
    fast_checks.set_enabled(True)


def test_fast_checks_are_on():
    # torch 2.13 (CI's) has every shim function: a silent fallback would be a 3x slower step
    assert fast_checks.status() == "on (torch C shim)"
    assert fast_checks.enabled()


# ---- the shim reads what torch says ---------------------------------------------------------------


python_facts = fast_checks._python_facts  # what the shim must read: torch's own attributes


def tensor_zoo(gen, device="cpu"):
    """Tensors of every kind a step meets: dtypes, 0-d, empty, views with offsets and odd strides."""
    out = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32):
        shape = tuple(int(d) for d in torch.randint(1, 7, (int(torch.randint(1, 4, (1,), generator=gen)),),
                                                    generator=gen))
        base = torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
        out += [base, base.reshape(-1)[1:], base.unsqueeze(0).expand(3, *shape)]
        if base.dim() >= 2:
            out += [base.transpose(0, 1), base[:, ::2]]
    out += [torch.zeros((), device=device), torch.empty(0, 4, device=device),
            torch.ones(1, 3, 1, device=device)[:, 1:], torch.nn.Parameter(torch.randn(4, 2, device=device)),
            torch.randn(2, 3, 4, 5, device=device).to(memory_format=torch.channels_last)]
    return out


def test_shim_reads_what_torch_attributes_say(seed):
    gen = torch.Generator().manual_seed(seed)
    for t in tensor_zoo(gen):
        assert _C.tensor_facts(t) == python_facts(t), t


def test_shim_reads_nothing_of_what_is_not_a_dense_tensor():
    assert _C.tensor_facts(torch.ones(3).to_sparse()) is None
    assert _C.tensor_facts(object()) is None
    assert _C.tensor_facts(None) is None


@pytest.mark.cuda
def test_shim_reads_what_torch_attributes_say_cuda(seed):
    gen = torch.Generator().manual_seed(seed)
    for t in tensor_zoo(gen, "cuda"):
        assert _C.tensor_facts(t) == python_facts(t), t


def test_shim_can_be_switched_off():
    fast_checks.set_enabled(False)
    try:
        assert _C.tensor_facts(torch.ones(2)) is None
        assert not fast_checks.enabled()
    finally:
        fast_checks.set_enabled(True)
    assert _C.tensor_facts(torch.ones(2)) is not None


# ---- _C.grads_of ----------------------------------------------------------------------------------


def test_grads_of():
    ps = [torch.nn.Parameter(torch.randn(3)) for _ in range(4)]
    ps[0].grad, ps[2].grad = torch.randn(3), torch.randn(3)
    grads, has, same = _C.grads_of(ps, None)
    assert grads == [ps[0].grad, ps[2].grad] and all(a is b for a, b in zip(grads, [ps[0].grad, ps[2].grad]))
    assert has == bytes([1, 0, 1, 0]) and same is False
    assert _C.grads_of(ps, list(ps))[2] is True  # another list of the same objects
    other = list(ps)
    other[3] = torch.nn.Parameter(torch.randn(3))
    assert _C.grads_of(ps, other)[2] is False
    assert _C.grads_of(ps, ps[:3])[2] is False
    assert _C.grads_of(tuple(ps), list(ps))[1] == has  # any sequence of params
    assert _C.grads_of([], None) == ([], b"", False)
    with pytest.raises(AttributeError):
        _C.grads_of([object()], None)


# ---- the row table the C++ pass leaves -----------------------------------------------------------


def adam_call(params, grads, state, plan):
    fusedopt.functional.adam(params, grads, state["m"], state["v"], [], state["steps"], amsgrad=False, beta1=0.9,
                             beta2=0.999, lr=1e-3, weight_decay=0.0, eps=1e-8, maximize=False, plan=plan)


def misaligned_grads(params, gen):
    """Grads one element into a fresh buffer: pointers 4 bytes past 16-byte alignment."""
    out = []
    for p in params:
        buf = torch.randn(p.numel() + 1, generator=gen)
        out.append(buf[1:].view_as(p) if p.numel() % 4 else torch.randn(p.shape, generator=gen))
    return out


def test_refreshed_rows_equal_the_python_ones(checks, seed):
    """After a step with new grads (some misaligned) the kept table's grad column
    and aligned16 flags are what the Python path computes, whichever path ran."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen) for n in (5, 8, 3, 16, 7)]
    state = {"m": [torch.zeros_like(p) for p in params], "v": [torch.zeros_like(p) for p in params],
             "steps": [torch.zeros((), dtype=torch.float32) for _ in params]}
    plan = StepPlan()
    adam_call(params, [torch.randn(p.shape, generator=gen) for p in params], state, plan)
    table = plan.batches[0].table
    grads = misaligned_grads(params, gen)
    table.rows[:, table.layout.column("grad")] = -1  # poison: every entry must be rewritten
    adam_call(params, grads, state, plan)
    assert plan.batches[0].table is table, "the kept table was rebuilt"
    assert list(table.rows[:, table.layout.column("grad")]) == [g.data_ptr() for g in grads]
    pointers = table.rows[:, :8]
    aligned = (pointers % 16 == 0).all(axis=1)
    assert list((table.rows[:, FLAGS_COLUMN] & ROW_FLAGS["aligned16"]) != 0) == list(aligned)
    assert not aligned.all() and aligned.any()


def test_a_rejected_refresh_writes_no_row(seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen) for n in (5, 8)]
    state = {"m": [torch.zeros_like(p) for p in params], "v": [torch.zeros_like(p) for p in params],
             "steps": [torch.zeros((), dtype=torch.float32) for _ in params]}
    plan = StepPlan()
    adam_call(params, [torch.randn(p.shape, generator=gen) for p in params], state, plan)
    table: RowTable = plan.batches[0].table
    before = table.rows.copy()
    bad = [torch.randn(5, generator=gen), torch.randn(8, dtype=torch.float64, generator=gen)]
    assert table.refresh_fast(bad) is False
    assert np.array_equal(table.rows, before)


# ---- every change between two steps ---------------------------------------------------------------


def build(spec, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(7,), (3, 5), (2, 3, 4), (6,)]]
    # and a channels_last one: the C++ checks compare its strides
    params.append(torch.nn.Parameter(torch.randn(3, 4, 2, 2, generator=gen).to(memory_format=torch.channels_last)))
    opt = spec.make(params, **spec.hyper)
    return opt, params, gen


def set_grads(params, gen, skip=()):
    for i, p in enumerate(params):  # grads in their param's layout, as autograd makes them
        p.grad = None if i in skip else torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen))


def rebuild_plans(opt):
    """What a step sees without kept plans: everything built and checked from scratch."""
    opt._plans.clear()
    opt._group_cache.clear()


def change_state_entry(opt, params):
    st = opt.state[params[1]]
    key = next(k for k in ("exp_avg", "momentum_buffer") if st.get(k) is not None)
    st[key] = st[key].clone()


def swap_param(opt, params, gen):
    twin = torch.nn.Parameter(params[0].detach().clone())
    torch.utils.swap_tensors(params[0], twin)
    params[0].grad = torch.randn(params[0].shape, generator=gen)


def replace_group_entry(opt, params, gen):
    new = torch.nn.Parameter(torch.randn(3, 5, generator=gen))
    new.grad = torch.randn(3, 5, generator=gen)
    opt.param_groups[0]["params"][1] = new  # in place: the group's list object stays


# Changes after which the step goes on: name -> change(opt, params, gen).
GOES_ON = {
    "new_grad_objects": lambda opt, ps, gen: set_grads(ps, gen),
    "grads_changed_in_place": lambda opt, ps, gen: [p.grad.copy_(torch.randn(p.shape, generator=gen)) for p in ps],
    "param_lost_its_grad": lambda opt, ps, gen: set_grads(ps, gen, skip=(2,)),
    "param_gained_a_grad": lambda opt, ps, gen: set_grads(ps, gen),  # after a step without params[2]'s grad
    "param_data_replaced": lambda opt, ps, gen: setattr(ps[1], "data", ps[1].data.clone()),
    "param_swapped": swap_param,
    "state_entry_replaced": lambda opt, ps, gen: change_state_entry(opt, ps),
    "group_list_entry_replaced": replace_group_entry,
}


def grad_alias_state(opt, ps):
    st = opt.state[ps[1]]
    key = next(k for k in ("exp_avg", "momentum_buffer") if st.get(k) is not None)
    ps[1].grad = st[key]


# Changes the step must refuse: name -> (change(opt, params), exception, message).
# ps[4] is params[4] of the one group, or [2] of Muon's matrix group (registry split_muon).
REFUSED = {
    "grad_resized": (lambda opt, ps: ps[0].grad.resize_(3), ValueError, r"grad of .*has shape \[3\]"),
    "grad_non_contiguous": (lambda opt, ps: setattr(ps[1], "grad", torch.randn(5, 3).t()), ValueError,
                            "grad of .*not contiguous"),
    "grad_other_dtype": (lambda opt, ps: setattr(ps[2].grad, "data", ps[2].grad.data.double()), TypeError,
                         "grad of .*dtype torch.float64"),
    "grad_is_a_state": (grad_alias_state, ValueError, "shares memory"),
    "grad_is_another_param": (lambda opt, ps: setattr(ps[3], "grad", ps[0].data[:6]), ValueError, "shares memory"),
    "param_resized": (lambda opt, ps: setattr(ps[0], "data", ps[0].data[:4]), ValueError, "shape"),
    "grad_of_another_layout": (lambda opt, ps: setattr(ps[4], "grad", ps[4].grad.contiguous()), ValueError,
                               r"grad of .*\['params'\]\[(4|2)\] has strides \[16, 4, 2, 1\]; expected \[16, 1, 8, 4\]"),
    "param_made_contiguous": (lambda opt, ps: setattr(ps[4], "data", ps[4].data.contiguous()), ValueError,
                              r"\['params'\]\[(4|2)\] (has strides|is not contiguous)"),
}


@pytest.mark.parametrize("spec", TRAINING, ids=repr)
@pytest.mark.parametrize("change", list(GOES_ON))
def test_a_change_between_steps_is_seen(spec, change, checks, seed):
    """Two equal optimizers take the same steps and changes; one keeps its plans,
    the other rebuilds them before every step: the results are bit-identical."""
    if change == "state_entry_replaced" and not spec.state_keys:
        pytest.skip("no state to replace")
    runs = []
    for keep in (True, False):
        opt, params, gen = build(spec, seed)
        for step in range(4):
            if step == 3:
                GOES_ON[change](opt, params, gen)
            else:
                set_grads(params, gen, skip=(2,) if change == "param_gained_a_grad" and step == 2 else ())
            if not keep:
                rebuild_plans(opt)
            opt.step()
        runs.append(snapshot(opt))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("spec", TRAINING, ids=repr)
@pytest.mark.parametrize("change", list(REFUSED))
def test_a_bad_change_between_steps_is_refused(spec, change, checks, seed):
    fn, exc, match = REFUSED[change]
    if change == "grad_is_a_state" and not spec.state_keys:
        pytest.skip("no state to alias")
    opt, params, gen = build(spec, seed)
    for _ in range(2):
        set_grads(params, gen)
        opt.step()
    set_grads(params, gen)
    fn(opt, params)
    before = snapshot(opt)
    with pytest.raises(exc, match=match):
        opt.step()
    assert snapshot(opt) == before


@pytest.mark.parametrize("spec", TRAINING, ids=repr)
def test_a_step_with_nothing_changed_runs_no_python_check(spec, seed, monkeypatch):
    """The point of the C++ pass: new grad objects of the same kind, and no
    Python check of a param or grad runs (neither is a per-tensor loop)."""
    opt, params, gen = build(spec, seed)
    for _ in range(2):
        set_grads(params, gen)
        opt.step()

    def forbidden(*args, **kwargs):
        raise AssertionError("a Python per-tensor check ran on a step with nothing changed")
    monkeypatch.setattr(RowTable, "params_changed", forbidden)
    monkeypatch.setattr(RowTable, "refresh_grads", forbidden)
    for _ in range(2):
        set_grads(params, gen)
        opt.step()


def test_functional_plan_sees_a_replaced_list_entry(checks, seed):
    """A functional caller's plan (lists it may change in place) sees a state
    tensor swapped inside the same list object."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(6, generator=gen) for _ in range(3)]
    state = {"m": [torch.zeros(6) for _ in params], "v": [torch.zeros(6) for _ in params],
             "steps": [torch.zeros(()) for _ in params]}
    plan = StepPlan()
    adam_call(params, [torch.randn(6, generator=gen) for _ in params], state, plan)
    twin_state = copy.deepcopy(state)
    twin_params = [p.clone() for p in params]
    state["m"][1] = state["m"][1].clone()  # same values, another tensor
    grads = [torch.randn(6, generator=gen) for _ in params]
    adam_call(params, grads, state, plan)
    adam_call(twin_params, grads, twin_state, StepPlan())
    assert all(torch.equal(a, b) for a, b in zip(params + state["m"], twin_params + twin_state["m"]))
    assert plan.columns[0][1] is state["m"][1]


def test_environment_variable_switches_the_fast_checks_off():
    import os
    import subprocess
    import sys
    code = ("import torch, fusedopt; p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3); "
            "o = fusedopt.Adam([p]); o.step(); o.step(); print(fusedopt.build_info()['fast_checks'])")
    env = dict(os.environ, FUSEDOPT_FAST_CHECKS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "off (FUSEDOPT_FAST_CHECKS=0)"
    assert fusedopt.build_info()["fast_checks"] == "on (torch C shim)"
