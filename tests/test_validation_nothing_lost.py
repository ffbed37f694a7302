"""Bad input is rejected with a clear message, and nothing is lost.

Each test first takes one good step (so params, grads AND optimizer state
exist), then introduces one defect, asserts the exception type and message,
and asserts that params, grads, state and hyperparameters are bit-identical
to what they were before the failing call. Then it checks that the optimizer
still works once the defect is removed.
"""
import warnings

import pytest
import torch

import fusedopt
from optim_registry import OPTIMIZERS, snapshot, state_dict_bits

STATEFUL = [s for s in OPTIMIZERS if s.state_keys]


def sgd_family(spec) -> bool:
    """SGD and LARS: a missing momentum buffer means "first step", as in torch."""
    return isinstance(spec.make, type) and issubclass(spec.make, (fusedopt.SGD, fusedopt.LARS))


def fresh(spec, n=3, dtype=torch.float32):
    """An optimizer over n params (odd sizes) that has taken one step."""
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in [(7,), (3, 5), (2, 3, 4)][:n]]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = spec.make(params, **spec.hyper)
    opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    return opt, params


def assert_rejected_unchanged(opt, exc, match, *, before=None):
    before = snapshot(opt) if before is None else before
    with pytest.raises(exc, match=match):
        opt.step()
    assert snapshot(opt) == before, "a rejected step changed params, grads, state or hyperparameters"


def add_param(opt, p, grad):
    """Adds p (with grad) to the optimizer's first group."""
    p.grad = grad
    opt.param_groups[0]["params"].append(p)


ids = pytest.mark.parametrize("spec", OPTIMIZERS, ids=repr)
ids_stateful = pytest.mark.parametrize("spec", STATEFUL, ids=repr)

# ---- devices and dtypes -----------------------------------------------------------------


@ids
def test_int_param(spec, seed):
    opt, _ = fresh(spec)
    p = torch.randint(-5, 5, (6,))
    add_param(opt, p, torch.randint(-5, 5, (6,)))
    assert_rejected_unchanged(opt, TypeError, r"params'\]\[3\] has dtype torch.int64; expected float32, float16")


@ids
def test_complex_param(spec, seed):
    opt, _ = fresh(spec)
    p = torch.nn.Parameter(torch.randn(6, dtype=torch.complex64))
    add_param(opt, p, torch.randn(6, dtype=torch.complex64))
    assert_rejected_unchanged(opt, TypeError, r"params'\]\[3\] has dtype torch.complex64; expected float32")


@ids
def test_grad_dtype_mismatch(spec, seed):
    opt, _ = fresh(spec)
    p = torch.nn.Parameter(torch.randn(6))
    add_param(opt, p, torch.randn(6))
    p.data = p.data.double()  # torch refuses p.grad = <fp64>; swapping .data gets there
    assert_rejected_unchanged(opt, TypeError,
                              r"grad of param_groups\[0\]\['params'\]\[3\] has dtype torch.float32; "
                              r"expected torch.float64")


@ids
def test_meta_device_param(spec, seed):
    opt, _ = fresh(spec)
    p = torch.nn.Parameter(torch.empty(6, device="meta"))
    add_param(opt, p, torch.empty(6, device="meta"))
    assert_rejected_unchanged(opt, ValueError, r"params'\]\[3\] is on meta; fusedopt runs on cpu and cuda")


@pytest.mark.cuda
@ids
def test_grad_on_other_device(spec, seed):
    opt, params = fresh(spec)
    p = torch.nn.Parameter(torch.randn(6, device="cuda"))
    add_param(opt, p, torch.randn(6, device="cuda"))
    p.data = p.data.cpu()
    assert_rejected_unchanged(opt, ValueError, r"grad of .* is on cuda:0; expected cpu")


# ---- shapes ---------------------------------------------------------------------------------


@ids
def test_grad_shape_mismatch_after_param_resized(spec, seed):
    opt, params = fresh(spec)
    params[0].data = params[0].data[:4]  # same pointer, fewer elements
    assert_rejected_unchanged(opt, ValueError,
                              r"(grad|state\['\w+'\]) of param_groups\[0\]\['params'\]\[0\] has shape \[7\]; "
                              r"expected \[4\]")


@ids_stateful
def test_param_resized_under_its_state(spec, seed):
    # Regression: the cached kernel table kept the old size and the kernel read
    # past the new grad's end.
    opt, params = fresh(spec)
    opt.step()  # a second step so the row table is cached
    params[0].data = params[0].data[:4]
    params[0].grad = torch.randn(4)
    assert_rejected_unchanged(opt, ValueError,
                              r"state\['\w+'\] of param_groups\[0\]\['params'\]\[0\] has shape \[7\]; "
                              r"expected \[4\], the shape of its parameter")


@ids_stateful
def test_param_reshaped_same_numel(spec, seed):
    opt, params = fresh(spec)
    opt.step()
    params[1].data = params[1].data.view(5, 3)
    params[1].grad = torch.randn(5, 3)
    assert_rejected_unchanged(opt, ValueError, r"has shape \[3, 5\]; expected \[5, 3\]")


# ---- layouts ----------------------------------------------------------------------------


@ids
def test_sparse_grad(spec, seed):
    opt, params = fresh(spec)
    params[0].grad = torch.randn(7).to_sparse()
    assert_rejected_unchanged(opt, TypeError, r"grad of param_groups\[0\]\['params'\]\[0\] is sparse; "
                                              r"fusedopt needs dense grads")


@ids
def test_sparse_param(spec, seed):
    opt, _ = fresh(spec)
    p = torch.randn(6).to_sparse().requires_grad_()
    add_param(opt, p, torch.randn(6).to_sparse())
    assert_rejected_unchanged(opt, TypeError, r"params'\]\[3\] has layout torch.sparse_coo; "
                                              r"fusedopt needs dense")


@ids
def test_non_contiguous_param(spec, seed):
    opt, _ = fresh(spec)
    p = torch.nn.Parameter(torch.randn(4, 6).t())
    add_param(opt, p, torch.randn(6, 4))
    assert_rejected_unchanged(opt, ValueError, r"params'\]\[3\] is not contiguous \(strides \[1, 6\].*"
                                               r"call .contiguous\(\) on the parameter")


@ids
def test_non_contiguous_param_cached_table(spec, seed):
    # Same pointer, new layout: the cached table must notice.
    opt, params = fresh(spec)
    p = torch.nn.Parameter(torch.randn(4, 4))
    add_param(opt, p, torch.randn(4, 4))
    opt.step()
    opt.step()
    p.data = p.data.t()
    p.grad = torch.randn(4, 4)
    assert_rejected_unchanged(opt, (ValueError), r"params'\]\[3\] is not contiguous")


@ids
def test_channels_last_param(spec, seed):
    opt, _ = fresh(spec)
    p = torch.nn.Parameter(torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last))
    add_param(opt, p, torch.randn(2, 3, 4, 5))
    assert_rejected_unchanged(opt, ValueError, r"params'\]\[3\] is not contiguous.*channels_last")


@ids
def test_non_contiguous_grad(spec, seed):
    opt, params = fresh(spec)
    params[1].grad = torch.randn(5, 3).t()
    assert_rejected_unchanged(opt, ValueError, r"grad of param_groups\[0\]\['params'\]\[1\] is not contiguous")


# ---- aliasing ---------------------------------------------------------------------------


@ids
def test_grad_is_its_param(spec, seed):
    opt, params = fresh(spec)
    params[0].grad = params[0].detach()
    assert_rejected_unchanged(opt, ValueError, r"grad of param_groups\[0\]\['params'\]\[0\] shares memory")


@ids
def test_grad_overlaps_another_param(spec, seed):
    opt, params = fresh(spec)
    opt.step()  # cached table: the per-step grad check must catch it
    params[0].grad = params[1].detach().reshape(-1)[3:10]
    assert_rejected_unchanged(opt, ValueError, r"grad of param_groups\[0\]\['params'\]\[0\] shares memory "
                                               r"with a parameter or optimizer state")


@ids_stateful
def test_grad_overlaps_state(spec, seed):
    opt, params = fresh(spec)
    key = spec.state_keys[0]
    params[0].grad = opt.state[params[1]][key].reshape(-1)[1:8]
    assert_rejected_unchanged(opt, ValueError, r"grad of param_groups\[0\]\['params'\]\[0\] shares memory")


@ids
def test_params_overlapping_views(spec, seed):
    opt, _ = fresh(spec)
    base = torch.randn(20)
    a, b = torch.nn.Parameter(base[0:12]), torch.nn.Parameter(base[8:20])
    add_param(opt, a, torch.randn(12))
    add_param(opt, b, torch.randn(12))
    assert_rejected_unchanged(opt, ValueError, r"params'\]\[[34]\] shares memory with another parameter")


@ids
def test_duplicate_param(spec, seed):
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = spec.make([p, p], **spec.hyper)
    assert_rejected_unchanged(opt, ValueError, r"shares memory with another parameter")


@ids_stateful
def test_state_tensors_share_memory(spec, seed):
    opt, params = fresh(spec)
    keys = spec.state_keys
    opt.state[params[0]][keys[0]] = opt.state[params[1]][keys[-1]].reshape(-1)[:7]
    assert_rejected_unchanged(opt, ValueError, r"shares memory with another parameter or optimizer state")


@ids_stateful
def test_state_is_the_param(spec, seed):
    opt, params = fresh(spec)
    opt.state[params[2]][spec.state_keys[-1]] = params[2].detach()
    assert_rejected_unchanged(opt, ValueError, r"shares memory")


# ---- state entries -----------------------------------------------------------------------


@ids_stateful
def test_state_wrong_dtype(spec, seed):
    opt, params = fresh(spec)
    key = spec.state_keys[0]
    opt.state[params[0]][key] = opt.state[params[0]][key].double()
    assert_rejected_unchanged(opt, TypeError, rf"state\['{key}'\] of .* has dtype torch.float64; "
                                              r"expected torch.float32")


@pytest.mark.parametrize("spec", [s for s in OPTIMIZERS if s.name.startswith("Adam")], ids=repr)
def test_enabling_amsgrad_midway(spec, seed):
    # Regression: the cached table had no max_exp_avg_sq column and the kernel
    # dereferenced a null pointer.
    opt, params = fresh(spec)
    opt.step()
    if opt.param_groups[0]["amsgrad"]:
        pytest.skip("already amsgrad")
    opt.param_groups[0]["amsgrad"] = True
    assert_rejected_unchanged(opt, ValueError, r"has no 'max_exp_avg_sq'")


def test_sgd_enabling_momentum_midway_matches_torch(seed):
    from optim_registry import BY_NAME
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
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_sgd_loaded_none_momentum_buffer_is_first_step(seed):
    # Regression: a state {'momentum_buffer': None} made the kernel read an
    # uninitialized buffer; torch treats it as the first step.
    from optim_registry import BY_NAME
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
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ---- hyperparameters ----------------------------------------------------------------------

BAD_HYPER = [(s, *bad) for s in OPTIMIZERS for bad in s.bad_hyper]
bad_ids = [f"{s.name}-{k}={v!r}" for s, k, v, _, _ in BAD_HYPER]


@pytest.mark.parametrize("spec,key,value,exc,match", BAD_HYPER, ids=bad_ids)
def test_bad_hyperparameter_in_constructor(spec, key, value, exc, match):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(exc, match=match):
        spec.make([p], **{**spec.hyper, key: value})


@pytest.mark.parametrize("spec,key,value,exc,match", BAD_HYPER, ids=bad_ids)
def test_bad_hyperparameter_set_between_steps(spec, key, value, exc, match, seed):
    opt, _ = fresh(spec)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(4))]})  # second group: error names [0]
    opt.param_groups[1]["params"][0].grad = torch.randn(4)
    before = snapshot(opt)
    opt.param_groups[0][key] = value
    with pytest.raises(exc, match=match):
        opt.step()
    after = snapshot(opt)
    before["groups"][0] = after["groups"][0]  # the hyperparameter is the one thing the test changed
    assert after == before


@ids
def test_nesterov_needs_momentum(spec):
    if not sgd_family(spec):
        pytest.skip("SGD and LARS only")
    with pytest.raises(ValueError, match=r"nesterov momentum requires a momentum and zero dampening"):
        spec.make([torch.nn.Parameter(torch.randn(3))], lr=0.1, momentum=0.0, nesterov=True)


# ---- load_state_dict ---------------------------------------------------------------------


def assert_load_rejected(opt, sd, exc, match):
    before_sd, before = state_dict_bits(opt), snapshot(opt)
    with pytest.raises(exc, match=match):
        opt.load_state_dict(sd)
    assert state_dict_bits(opt) == before_sd
    assert snapshot(opt) == before
    opt.step()  # still usable


@ids
def test_load_missing_top_level_key(spec, seed):
    opt, _ = fresh(spec)
    sd = opt.state_dict()
    del sd["state"]
    assert_load_rejected(opt, sd, ValueError, r"state_dict must be a dict with 'state' and 'param_groups'")


@ids
def test_load_wrong_group_count(spec, seed):
    opt, _ = fresh(spec)
    sd = opt.state_dict()
    sd["param_groups"].append(dict(sd["param_groups"][0]))
    assert_load_rejected(opt, sd, ValueError, r"loaded state dict has 2 parameter groups; this optimizer has 1")


@ids
def test_load_wrong_group_size(spec, seed):
    opt, _ = fresh(spec)
    sd = opt.state_dict()
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:2]
    assert_load_rejected(opt, sd, ValueError, r"loaded param_groups\[0\] has 2 params; this optimizer's has 3")


@ids
def test_load_group_without_params(spec, seed):
    opt, _ = fresh(spec)
    sd = opt.state_dict()
    del sd["param_groups"][0]["params"]
    assert_load_rejected(opt, sd, ValueError, r"loaded param_groups\[0\] must be a dict with a 'params' list")


@ids
def test_load_bad_hyperparameter(spec, seed):
    opt, _ = fresh(spec)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = float("nan")
    assert_load_rejected(opt, sd, ValueError, _lr_msg())


def _lr_msg():
    return r"invalid lr in param_groups\[0\]: nan"


@ids
def test_load_unknown_param_id(spec, seed):
    opt, _ = fresh(spec)
    sd = opt.state_dict()
    sd["state"][99] = {}
    assert_load_rejected(opt, sd, ValueError, r"loaded state refers to parameter id 99")


@ids_stateful
def test_load_missing_state_key(spec, seed):
    opt, _ = fresh(spec)
    sd = opt.state_dict()
    if sgd_family(spec):
        pytest.skip("a missing momentum buffer means 'first step', as in torch")
    key = spec.state_keys[-1]
    del sd["state"][1][key]
    assert_load_rejected(opt, sd, ValueError, rf"loaded state of param_groups\[0\]\['params'\]\[1\] has no '{key}'")


@ids_stateful
def test_load_wrong_state_shape(spec, seed):
    opt, _ = fresh(spec)
    sd = opt.state_dict()
    key = spec.state_keys[0]
    sd["state"][2][key] = torch.randn(5)
    assert_load_rejected(opt, sd, ValueError, rf"loaded state\['{key}'\] of param_groups\[0\]\['params'\]\[2\] "
                                              r"has shape \[5\]; expected \[2, 3, 4\]")


@ids_stateful
@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64])
def test_load_non_float_state(spec, dtype, seed):
    opt, _ = fresh(spec)
    sd = opt.state_dict()
    key = spec.state_keys[-1]
    sd["state"][0][key] = torch.ones(7, dtype=dtype)
    assert_load_rejected(opt, sd, TypeError, rf"loaded state\['{key}'\] of .* has dtype {dtype}; expected a float")


@ids_stateful
def test_load_state_not_a_dict(spec, seed):
    opt, _ = fresh(spec)
    sd = opt.state_dict()
    sd["state"][0] = [1, 2]
    assert_load_rejected(opt, sd, ValueError, r"loaded state of param_groups\[0\]\['params'\]\[0\] must be a dict")


@pytest.mark.parametrize("spec", [s for s in STATEFUL if s.name.startswith(("Adam", "LAMB"))], ids=repr)
def test_load_step_with_many_elements(spec, seed):
    opt, _ = fresh(spec)
    sd = opt.state_dict()
    sd["state"][0]["step"] = torch.ones(3)
    assert_load_rejected(opt, sd, ValueError, r"loaded state\['step'\] of .* has 3 elements; expected 1")
