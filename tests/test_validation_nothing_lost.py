"""Bad input is rejected with a clear message, and nothing is lost.

Every test runs for every optimizer of optim_registry.OPTIMIZERS, on both paths
of the per-step checks (``checks``: the C++ pass and the Python checks). Most build an
optimizer that has taken one good step (params, grads AND state exist; with
``steps=0`` it never stepped), introduce one defect, check the exception type
and message, and check that params, grads, state and hyperparameters are
bit-identical to what they were before the failing call (so a fresh optimizer
also created no state). Some then check that the optimizer still works once the
defect is removed.

Messages name a param by its place in ``opt.param_groups`` (``at``), which for
most optimizers is the order the test gave: the Newton-Schulz settings of Muon
(registry ``split_muon``) keep each given group's matrices in a Muon group and
move its 0-D and 1-D params to an AdamW group after it, and a param a test adds
joins a group that steps its kind (registry ``home_group``).
"""
import copy
import warnings

import pytest
import torch

import fusedopt
from fusedopt._kernels import fast_checks
from optim_registry import BY_NAME, OPTIMIZERS, group_index, home_group, snapshot, state_dict_bits
from reference_optim import drift_tol

STATEFUL = [s for s in OPTIMIZERS if s.state_keys]


@pytest.fixture(autouse=True, params=["fast", "python"])
def checks(request):
    """Every test on both paths of a kept plan's per-step checks: the C++ pass
    through torch's C shim, and the Python checks (fusedopt/_kernels/fast_checks.py)."""
    fast_checks.set_enabled(request.param == "fast")
    yield request.param
    fast_checks.set_enabled(True)


def sgd_family(spec) -> bool:
    """SGD and LARS: a missing momentum buffer means "first step", as in torch."""
    return isinstance(spec.make, type) and issubclass(spec.make, (fusedopt.SGD, fusedopt.LARS))


def buffer_optional(spec, p) -> bool:
    """A missing momentum buffer of p means "first step", as in torch: SGD, LARS, and
    Muon's matrices (torch.optim.Muon makes a missing buffer as zeros)."""
    return sgd_family(spec) or (spec.matrices != () and p.dim() >= 2)


def same_group_pair(opt, params):
    """The first two of params that are in one param group, as (aliased, other): the
    per-step checks of a group compare its tensors with each other; across groups:
    test_aliasing_across_param_groups)."""
    for k, a in enumerate(params):
        for b in params[k + 1:]:
            if group_index(opt, a)[0] == group_index(opt, b)[0]:
                return a, b
    raise AssertionError("no two params share a group")


def view_into(t, like):
    """A view of ``like``'s numel elements inside t's memory (from element 1), shaped like ``like``."""
    return t.detach().reshape(-1)[1:1 + like.numel()].view(like.shape)


def fresh(spec, n=3, dtype=torch.float32, steps=1):
    """An optimizer over n params (odd sizes) that has taken `steps` steps; fresh grads."""
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in [(7,), (3, 5), (2, 3, 4)][:n]]
    opt = spec.make(params, **spec.hyper)
    for _ in range(steps):
        new_grads(params)
        opt.step()
    new_grads(params)
    return opt, params


def new_grads(params):
    for p in params:
        p.grad = torch.randn_like(p)


def assert_rejected_unchanged(opt, exc, match, *, call=None):
    before = snapshot(opt)
    with pytest.raises(exc, match=match):
        (call or opt.step)()
    assert snapshot(opt) == before, "a rejected call changed params, grads, state or hyperparameters"


def add_param(opt, p, grad):
    """Adds p (with grad) to the optimizer's first group (Muon: the first that steps its
    kind); returns ``at(opt, p)``."""
    p.grad = grad
    opt.param_groups[home_group(opt, p)]["params"].append(p)
    return at(opt, p)


def at(opt, p) -> str:
    """The regex of p's name in messages: param_groups[g]['params'][i]."""
    gi, i = group_index(opt, p)
    return rf"param_groups\[{gi}\]\['params'\]\[{i}\]"


def state_id(opt, p) -> int:
    """p's key in opt.state_dict()['state'] (torch numbers params in group order)."""
    flat = [q for g in opt.param_groups for q in g["params"]]
    return next(k for k, q in enumerate(flat) if q is p)


def new_group(opt, params) -> dict:
    """A param group of vectors: Muon steps them in an AdamW group (a Muon group refuses them)."""
    return {"params": params, **({"use_muon": False} if isinstance(opt, fusedopt.Muon) else {})}


ids = pytest.mark.parametrize("spec", OPTIMIZERS, ids=repr)
ids_stateful = pytest.mark.parametrize("spec", STATEFUL, ids=repr)
# 0: the defect is there before the first step (no state yet); 1: after a good step.
steps = pytest.mark.parametrize("steps", [0, 1])

# ---- devices and dtypes -----------------------------------------------------------------


@ids
@steps
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.complex64])
def test_unsupported_param_dtype(spec, steps, dtype):
    opt, _ = fresh(spec, steps=steps)
    bad = torch.ones(6, dtype=dtype)  # not a Parameter: ints cannot require grad
    where = add_param(opt, bad, torch.ones(6, dtype=dtype))
    assert_rejected_unchanged(opt, TypeError, rf"{where} has dtype {dtype}; "
                                              r"expected float32, float16, bfloat16 or float64")


@ids
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("which", ["new", "trained"])
def test_grad_dtype_differs_from_param(spec, which, dtype):
    opt, params = fresh(spec)
    if which == "new":
        p = torch.nn.Parameter(torch.randn(6))
        where, what = add_param(opt, p, torch.randn(6)), "grad"
    else:
        p, what = params[1], r"(grad|state\['\w+'\])"
        where = at(opt, p)  # its fp32 state no longer fits an fp64 param
    p.data = p.data.to(dtype)  # torch refuses p.grad = <other dtype>; swapping .data gets there
    if spec.param_dtypes is not None and dtype not in spec.param_dtypes:  # 8-bit state refuses fp64 first
        assert_rejected_unchanged(opt, TypeError, rf"{where} is float64: 8-bit state")
        return
    assert_rejected_unchanged(opt, TypeError, rf"{what} of {where} has dtype "
                                              rf"torch.float32; expected {dtype}")


@ids
@steps
def test_meta_device_param(spec, steps):
    opt, _ = fresh(spec, steps=steps)
    p = torch.nn.Parameter(torch.empty(6, device="meta"))
    where = add_param(opt, p, torch.empty(6, device="meta"))
    assert_rejected_unchanged(opt, ValueError, rf"{where} is on meta; fusedopt runs on cpu and cuda")


@pytest.mark.cuda
@ids
def test_grad_on_other_device(spec):
    opt, params = fresh(spec)
    p = torch.nn.Parameter(torch.randn(6, device="cuda"))
    add_param(opt, p, torch.randn(6, device="cuda"))
    p.data = p.data.cpu()
    assert_rejected_unchanged(opt, ValueError, r"grad of .* is on cuda:0; expected cpu")


# ---- shapes ---------------------------------------------------------------------------------


@ids
@steps
@pytest.mark.parametrize("how", ["same_storage", "new_storage"])
def test_param_resized_after_its_grad(spec, steps, how):
    opt, params = fresh(spec, steps=steps)
    # same_storage: same pointer, fewer elements (a cached table must notice)
    params[0].data = params[0].data[:4] if how == "same_storage" else torch.randn(4)
    assert_rejected_unchanged(opt, ValueError,
                              rf"(grad|state\['\w+'\]) of {at(opt, params[0])} has shape \[7\]; "
                              r"expected \[4\]")


@ids_stateful
def test_param_resized_under_its_state(spec):
    # Regression: the cached kernel table kept the old size and the kernel read
    # past the new grad's end.
    opt, params = fresh(spec)
    opt.step()  # a second step so the row table is cached
    params[0].data = params[0].data[:4]
    params[0].grad = torch.randn(4)
    assert_rejected_unchanged(opt, ValueError,
                              rf"state\['\w+'\] of {at(opt, params[0])} has shape \[7\]; "
                              r"expected \[4\], the shape of its parameter")


@ids_stateful
def test_param_reshaped_same_numel(spec):
    opt, params = fresh(spec)
    opt.step()
    params[1].data = params[1].data.view(5, 3)
    params[1].grad = torch.randn(5, 3)
    assert_rejected_unchanged(opt, ValueError, r"has shape \[3, 5\]; expected \[5, 3\]")


# ---- layouts ----------------------------------------------------------------------------


@ids
def test_sparse_grad(spec):
    opt, params = fresh(spec)
    params[0].grad = torch.randn(7).to_sparse()
    assert_rejected_unchanged(opt, TypeError, rf"grad of {at(opt, params[0])} is sparse; "
                                              r"fusedopt needs dense grads")


@ids
def test_sparse_param(spec):
    opt, _ = fresh(spec)
    p = torch.randn(6).to_sparse().requires_grad_()
    where = add_param(opt, p, torch.randn(6).to_sparse())
    assert_rejected_unchanged(opt, TypeError, rf"{where} has layout torch.sparse_coo; "
                                              r"fusedopt needs dense")


@ids
@steps
@pytest.mark.parametrize("how", ["gaps", "overlaps"])
def test_param_whose_memory_is_not_one_run(spec, steps, how):
    opt, _ = fresh(spec, steps=steps)
    data = torch.randn(4, 12)[:, ::2] if how == "gaps" else torch.randn(4, 1).expand(4, 6)
    p = torch.nn.Parameter(data)
    where = add_param(opt, p, torch.randn(4, 6))
    assert_rejected_unchanged(opt, ValueError, rf"{where} has memory with gaps or overlaps \(strides \[\d+, "
                                               r"\d+\].*dense and non-overlapping.*call .contiguous\(\)")


@ids
def test_param_layout_changed_under_cached_table(spec):
    # Same pointer, new layout (a transposed view is one flat run): the cached
    # table must notice, and the state and grad made for the old layout no longer fit.
    opt, params = fresh(spec)
    p = torch.nn.Parameter(torch.randn(4, 4))
    where = add_param(opt, p, torch.randn(4, 4))
    opt.step()
    opt.step()
    p.data = p.data.t()
    p.grad = torch.randn(4, 4)
    assert_rejected_unchanged(opt, ValueError, rf"{where} (is not contiguous|has strides \[4, 1\]; "
                                               r"expected \[1, 4\], the memory layout of its parameter)")


@ids
@steps
def test_channels_last_param_with_contiguous_grad(spec, steps):
    opt, _ = fresh(spec, steps=steps)
    p = torch.nn.Parameter(torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last))
    where = add_param(opt, p, torch.randn(2, 3, 4, 5))
    assert_rejected_unchanged(opt, ValueError, rf"grad of {where} has strides "
                                               r"\[60, 20, 5, 1\]; expected \[60, 1, 15, 3\], the memory layout")


@ids_stateful
def test_loaded_state_of_another_layout_is_copied_into_the_params(spec):
    """A checkpoint whose state is contiguous (e.g. saved from a contiguous model)
    loads into a channels_last param's layout."""
    p = torch.nn.Parameter(torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last))
    p.grad = torch.randn_like(p)
    opt = spec.make([p], **spec.hyper)
    opt.step()
    sd = opt.state_dict()
    for key in spec.keys_of(p):
        sd["state"][0][key] = sd["state"][0][key].contiguous()
    fresh_opt = spec.make([p], **spec.hyper)
    fresh_opt.load_state_dict(sd)
    for key in spec.keys_of(p):
        st = fresh_opt.state[p][key]
        assert st.stride() == p.stride() and torch.equal(st, opt.state[p][key])
    fresh_opt.step()


@ids
@steps
def test_non_contiguous_grad(spec, steps):
    opt, params = fresh(spec, steps=steps)
    params[1].grad = torch.randn(5, 3).t()
    assert_rejected_unchanged(opt, ValueError, rf"grad of {at(opt, params[1])} is not contiguous")


# ---- aliasing ---------------------------------------------------------------------------


@ids
def test_grad_is_its_param(spec):
    opt, params = fresh(spec)
    params[0].grad = params[0].detach()
    assert_rejected_unchanged(opt, ValueError, rf"grad of {at(opt, params[0])} shares memory")


@ids
def test_grad_overlaps_another_param(spec):
    opt, params = fresh(spec)
    opt.step()  # cached table: the per-step grad check must catch it
    p, other = same_group_pair(opt, params)
    p.grad = view_into(other, p)
    assert_rejected_unchanged(opt, ValueError, rf"grad of {at(opt, p)} shares memory "
                                               r"with a parameter or optimizer state")


@ids
@pytest.mark.parametrize("kind", ["grad_is_param", "grad_is_state", "state_is_state"])
@pytest.mark.parametrize("trained", [1, 2])
def test_aliasing_across_param_groups(spec, kind, trained):
    """Regression (found when Muon's split put the suite's params into two groups): the
    checks compared only the tensors of one group, so a grad aliasing another group's
    param or state, or a state aliasing another group's state, was stepped; the second
    group read memory the first had just written. trained=2: the plans are kept."""
    if kind != "grad_is_param" and (not spec.state_keys or spec.param_dtypes is not None):
        pytest.skip("no float state to alias")
    a, b = torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(4, 6))
    opt = spec.make([{"params": [a]}, {"params": [b]}], **spec.hyper)
    for _ in range(trained):
        new_grads([a, b])
        opt.step()
    assert group_index(opt, a)[0] != group_index(opt, b)[0]
    if kind == "grad_is_param":
        a.grad = view_into(b, a)
    elif kind == "grad_is_state":
        a.grad = view_into(opt.state[b][spec.keys_of(b)[0]], a)
    else:
        opt.state[a][spec.keys_of(a)[0]] = view_into(opt.state[b][spec.keys_of(b)[-1]], a)
    what = rf"grad of {at(opt, a)}" if kind != "state_is_state" else ""
    assert_rejected_unchanged(opt, ValueError, rf"{what}.* shares memory with (a|another) parameter or optimizer state")
    if kind != "state_is_state":
        a.grad = torch.randn_like(a)
        opt.step()  # usable once the grad has its own memory


@ids_stateful
def test_grad_overlaps_state(spec):
    if spec.param_dtypes is not None:
        pytest.skip("int8 codes cannot be a float grad here; test_quant8.py aliases a grad with 8-bit state")
    opt, params = fresh(spec)
    p, other = same_group_pair(opt, params)
    p.grad = view_into(opt.state[other][spec.keys_of(other)[0]], p)
    assert_rejected_unchanged(opt, ValueError, rf"grad of {at(opt, p)} shares memory")


@ids
@steps
def test_params_overlapping_views(spec, steps):
    opt, _ = fresh(spec, steps=steps)
    base = torch.randn(20)
    a, b = torch.nn.Parameter(base[0:12]), torch.nn.Parameter(base[8:20])
    where = f"({add_param(opt, a, torch.randn(12))}|{add_param(opt, b, torch.randn(12))})"
    assert_rejected_unchanged(opt, ValueError, rf"{where} shares memory with another parameter")


@ids
def test_duplicate_param(spec):
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = spec.make([p, p], **spec.hyper)
    assert_rejected_unchanged(opt, ValueError, r"shares memory with another parameter")


@ids_stateful
def test_state_tensors_share_memory(spec):
    opt, params = fresh(spec)
    p, other = same_group_pair(opt, params)
    opt.state[p][spec.keys_of(p)[0]] = view_into(opt.state[other][spec.keys_of(other)[-1]], p)
    assert_rejected_unchanged(opt, ValueError, r"shares memory with another parameter or optimizer state")


@ids_stateful
def test_state_is_the_param(spec):
    opt, params = fresh(spec)
    opt.state[params[2]][spec.keys_of(params[2])[-1]] = params[2].detach()
    if spec.hyper.get("state_dtype") is torch.int8:  # an fp32 tensor in place of int8 codes: its dtype first
        assert_rejected_unchanged(opt, TypeError, r"has dtype torch.float32; expected torch.int8")
        return
    assert_rejected_unchanged(opt, ValueError, r"shares memory")


# ---- state entries -----------------------------------------------------------------------

STATE_DEFECTS = {  # what: (replacement for the (3, 5) state tensor or None to delete it, message after the key;
    # {dtype}: the state dtype of the setting)
    "shape": (lambda t: torch.zeros(t.numel() + 2, dtype=t.dtype),
              r"has shape \[17\]; expected \[3, 5\], the shape of its parameter"),
    "float64": (lambda t: t.double(), r"has dtype torch.float64; expected torch.{dtype}"),
    "float16": (lambda t: t.half(), r"has dtype torch.float16; expected torch.{dtype}"),
    "device": (lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"),
               r"is on meta; expected cpu, the device of its parameter"),
    "missing": (None, None),
}


@ids_stateful
@pytest.mark.parametrize("what", list(STATE_DEFECTS))
def test_state_does_not_fit_param(spec, what):
    if what == "missing" and buffer_optional(spec, torch.empty(3, 5)):
        pytest.skip("torch.optim.SGD treats a missing momentum buffer as the first step")
    replace, tail = STATE_DEFECTS[what]
    for key in spec.keys_of(torch.empty(3, 5)):  # params[1]'s
        opt, params = fresh(spec)
        st = opt.state[params[1]]
        if replace is None:
            del st[key]
            match = rf"state of {at(opt, params[1])} has no '{key}'"
        else:
            st[key] = replace(st[key])
            dtype = str(spec.hyper.get("state_dtype") or torch.float32).split(".")[-1]
            match = rf"state\['{key}'\] of {at(opt, params[1])} {tail.format(dtype=dtype)}"
        assert_rejected_unchanged(opt, (TypeError, ValueError), match)


@pytest.mark.parametrize("spec", [s for s in OPTIMIZERS if s.name.startswith("Adam")], ids=repr)
def test_enabling_amsgrad_midway(spec):
    # Regression: the cached table had no max_exp_avg_sq column and the kernel
    # dereferenced a null pointer.
    opt, params = fresh(spec)
    opt.step()
    if opt.param_groups[0]["amsgrad"]:
        pytest.skip("already amsgrad")
    opt.param_groups[0]["amsgrad"] = True
    assert_rejected_unchanged(opt, ValueError, r"has no 'max_exp_avg_sq'")


def test_sgd_enabling_momentum_midway_matches_torch():
    spec = BY_NAME["SGD"]
    params = [torch.nn.Parameter(torch.randn(9)) for _ in range(2)]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref = spec.make(params, lr=0.1), spec.reference(ref_params, lr=0.1)
    for k in range(4):
        if k == 2:
            for o in (opt, ref):
                o.param_groups[0]["momentum"] = 0.9
        for p, q in zip(params, ref_params):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    assert_close_to_reference(params, ref_params, 4)


def assert_close_to_reference(params, ref_params, steps, slack=None):
    """fp32 drift bounds; ``slack``: an extra absolute bound per param."""
    for p, q, extra in zip(params, ref_params, slack or [0.0] * len(params)):
        rtol, atol = drift_tol(torch.float32, steps, float(q.detach().abs().max()))
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol + extra)


def test_sgd_loaded_none_momentum_buffer_is_first_step():
    # Regression: a state {'momentum_buffer': None} made the kernel read an
    # uninitialized buffer; torch treats it as the first step.
    spec = BY_NAME["SGD-momentum"]
    p = torch.nn.Parameter(torch.randn(11))
    q = torch.nn.Parameter(p.detach().clone())
    opt, ref = spec.make([p], **spec.hyper), spec.reference([q], **spec.hyper)
    sd = opt.state_dict()
    sd["state"] = {0: {"momentum_buffer": None}}
    opt.load_state_dict(sd)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
        opt.step()
        ref.step()
    assert_close_to_reference([p], [q], 3)


# ---- hyperparameters ----------------------------------------------------------------------

BAD_HYPER = [(s, *bad) for s in OPTIMIZERS for bad in s.bad_hyper]
bad_ids = [f"{s.name}-" + ",".join(f"{k}={v!r}" for k, v in changes.items()) for s, changes, _, _ in BAD_HYPER]
bad_hyper = pytest.mark.parametrize("spec,changes,exc,match", BAD_HYPER, ids=bad_ids)


@bad_hyper
def test_bad_hyperparameter_in_constructor(spec, changes, exc, match):
    p = torch.nn.Parameter(torch.randn(3))
    # Muon checks its Newton-Schulz settings in the groups that have matrices
    matrices = [torch.nn.Parameter(torch.randn(s)) for s in spec.matrices[:1]]
    with pytest.raises(exc, match=match):
        spec.make([p] + matrices, **{**spec.hyper, **changes})


@bad_hyper
def test_bad_hyperparameter_set_between_steps(spec, changes, exc, match):
    opt, _ = fresh(spec)
    opt.add_param_group(new_group(opt, [torch.nn.Parameter(torch.randn(4))]))  # a later group: error names [0]
    opt.param_groups[-1]["params"][0].grad = torch.randn(4)
    before = snapshot(opt)
    opt.param_groups[0].update(changes)
    with pytest.raises(exc, match=match):
        opt.step()
    after = snapshot(opt)
    before["groups"][0] = after["groups"][0]  # the hyperparameters are the one thing the test changed
    assert after == before


def test_differentiable_rejected():
    with pytest.raises(ValueError, match="differentiable"):
        fusedopt.SGD([torch.randn(3)], lr=0.1, differentiable=True)


# ---- validate everything before writing anything ---------------------------------------------


@ids
@pytest.mark.parametrize("problem", ["bad_lr", "bad_param", "sparse_grad", "non_contiguous_grad", "bad_state"])
@pytest.mark.parametrize("trained", [True, False])
def test_bad_second_group_leaves_first_group_untouched(spec, problem, trained):
    """The first group (trained, or never stepped) must not move when the second is bad."""
    first = [torch.randn(7), torch.randn(3, 3), torch.randn(())]
    second = [torch.randn(5), torch.randn(4, 6)]
    opt = spec.make([{"params": first}, {"params": second}], **spec.hyper)
    for _ in range(2 if trained else 0):
        new_grads(first + second)
        opt.step()
    new_grads(first + second)
    if problem == "bad_lr":
        gi = group_index(opt, second[0])[0]
        opt.param_groups[gi]["lr"] = float("nan")
        exc, match = ValueError, rf"invalid lr in param_groups\[{gi}\]"
    elif problem == "bad_param":
        second[1].data = torch.randn(4, 12)[:, ::2]  # memory with gaps
        second[1].grad = torch.randn(4, 12)[:, ::2]
        exc, match = ValueError, rf"{at(opt, second[1])} has memory with gaps or overlaps"
    elif problem == "sparse_grad":
        second[0].grad = second[0].grad.to_sparse()
        exc, match = TypeError, rf"{at(opt, second[0])} is sparse"
    elif problem == "non_contiguous_grad":
        second[1].grad = torch.randn(6, 4).t()
        exc, match = ValueError, rf"{at(opt, second[1])} is not contiguous"
    else:
        if not trained or not spec.state_keys:
            pytest.skip("no state to spoil")
        key = spec.keys_of(second[0])[-1]
        opt.state[second[0]][key] = torch.zeros(2, dtype=opt.state[second[0]][key].dtype)
        exc, match = ValueError, rf"{at(opt, second[0])} has shape \[2\]"
    assert_rejected_unchanged(opt, exc, match)


@ids
def test_optimizer_usable_after_rejected_step(spec):
    """After a rejected step and the fix, fusedopt continues exactly like its reference from the same state."""
    opt, params = fresh(spec, steps=2)
    good_grad = params[0].grad
    params[0].grad = good_grad.to_sparse()
    with pytest.raises(TypeError):
        opt.step()
    params[0].grad = good_grad
    ref_params = [p.detach().clone() for p in params]
    copy_of = dict(zip(map(id, params), ref_params))
    # the reference in the optimizer's groups (Muon's split into two), so its state_dict loads
    ref = spec.reference([{"params": [copy_of[id(p)] for p in g["params"]]} for g in opt.param_groups],
                         **spec.hyper)
    # deepcopy: torch's load_state_dict keeps (does not copy) tensors already of the right dtype/device
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    for rp, p in zip(ref_params, params):
        rp.grad = p.grad.clone()
    before = [rp.clone() for rp in ref_params]
    opt.step()
    ref.step()
    # Muon's Newton-Schulz below fp64: its bound, a fraction of the reference's update
    slack = [spec.update_rtol(p) * float((rp - b).abs().max()) for p, rp, b in zip(params, ref_params, before)]
    assert_close_to_reference(params, ref_params, 1, slack)  # one step from the same state


# ---- load_state_dict ---------------------------------------------------------------------


def assert_load_rejected(opt, sd, exc, match):
    before_sd = state_dict_bits(opt)
    assert_rejected_unchanged(opt, exc, match, call=lambda: opt.load_state_dict(sd))
    assert state_dict_bits(opt) == before_sd
    opt.step()  # still usable


@ids
def test_load_missing_top_level_key(spec):
    opt, _ = fresh(spec)
    sd = opt.state_dict()
    del sd["state"]
    assert_load_rejected(opt, sd, ValueError, r"state_dict must be a dict with 'state' and 'param_groups'")


@ids
def test_load_wrong_group_count(spec):
    opt, _ = fresh(spec)
    sd = opt.state_dict()
    sd["param_groups"].append(dict(sd["param_groups"][0]))
    n = len(opt.param_groups)  # 1 (Muon: 2, its matrices and its vectors)
    assert_load_rejected(opt, sd, ValueError, rf"loaded state dict has {n + 1} parameter groups; this optimizer has {n}")


@ids
def test_load_wrong_group_size(spec):
    opt, _ = fresh(spec)
    sd = opt.state_dict()
    n = len(sd["param_groups"][0]["params"])  # 3 (Muon: 2, its matrices)
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    assert_load_rejected(opt, sd, ValueError, rf"loaded param_groups\[0\] has {n - 1} params; this optimizer's has {n}")


@ids
def test_load_group_without_params(spec):
    opt, _ = fresh(spec)
    sd = opt.state_dict()
    del sd["param_groups"][0]["params"]
    assert_load_rejected(opt, sd, ValueError, r"loaded param_groups\[0\] must be a dict with a 'params' list")


@ids
@pytest.mark.parametrize("lr", [float("nan"), -1.0])
def test_load_bad_hyperparameter(spec, lr):
    opt, _ = fresh(spec)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = lr
    assert_load_rejected(opt, sd, ValueError, rf"invalid lr in param_groups\[0\]: {lr}; expected a value in")


@ids
def test_load_unknown_param_id(spec):
    opt, _ = fresh(spec)
    sd = opt.state_dict()
    sd["state"][99] = {}
    assert_load_rejected(opt, sd, ValueError, r"loaded state refers to parameter id 99")


@ids_stateful
def test_load_missing_state_key(spec):
    opt, params = fresh(spec)
    sd = opt.state_dict()
    # params[1]; Muon: its vector params[0], whose AdamW moments a step needs
    p = next((q for q in (params[1], params[0]) if not buffer_optional(spec, q)), None)
    if p is None:
        pytest.skip("a missing momentum buffer means 'first step', as in torch")
    key = spec.keys_of(p)[-1]
    del sd["state"][state_id(opt, p)][key]
    assert_load_rejected(opt, sd, ValueError, rf"loaded state of {at(opt, p)} has no '{key}'")


@ids_stateful
def test_load_wrong_state_shape(spec):
    opt, params = fresh(spec)
    sd = opt.state_dict()
    key = spec.keys_of(params[2])[0]
    sd["state"][state_id(opt, params[2])][key] = torch.randn(5)
    sd["param_groups"][0]["lr"] = 0.5 * spec.hyper["lr"]  # would show if loading went half way
    assert_load_rejected(opt, sd, ValueError, rf"loaded state\['{key}'\] of {at(opt, params[2])} "
                                              r"has shape \[5\]; expected \[2, 3, 4\]")


@ids_stateful
@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64])
def test_load_non_float_state(spec, dtype):
    opt, params = fresh(spec)
    sd = opt.state_dict()
    key = spec.keys_of(params[0])[-1]
    sd["state"][state_id(opt, params[0])][key] = torch.ones(7, dtype=dtype)
    assert_load_rejected(opt, sd, TypeError, rf"loaded state\['{key}'\] of .* has dtype {dtype}; expected a float")


@ids_stateful
def test_load_state_not_a_dict(spec):
    opt, params = fresh(spec)
    sd = opt.state_dict()
    sd["state"][state_id(opt, params[0])] = [1, 2]
    assert_load_rejected(opt, sd, ValueError, rf"loaded state of {at(opt, params[0])} must be a dict")


@pytest.mark.parametrize("spec", [s for s in STATEFUL if s.name.startswith(("Adam", "LAMB"))], ids=repr)
def test_load_step_with_many_elements(spec):
    opt, _ = fresh(spec)
    sd = opt.state_dict()
    sd["state"][0]["step"] = torch.ones(3)
    assert_load_rejected(opt, sd, ValueError, r"loaded state\['step'\] of .* has 3 elements; expected 1")
