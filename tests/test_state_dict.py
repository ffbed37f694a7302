"""state_dict compatibility with torch.optim, schedulers, zero_grad, closures, tensor lr."""
from __future__ import annotations

import copy
import io

import pytest
import torch

import fusedopt
from optim_registry import BY_NAME, TRAINING, TRAINING_BY_CLASS, variant

SHAPES = [(), (5,), (17, 3), (0,), (64,)]
RTOL, ATOL = 1e-5, 1e-6

# (registry spec, options of the two param groups): spec.make builds fusedopt's
# optimizer, spec.reference torch.optim's (foreach=False) from the same groups.
SGD, ADAM, ADAMW = (TRAINING_BY_CLASS[c] for c in (fusedopt.SGD, fusedopt.Adam, fusedopt.AdamW))
TORCH_CASES = {
    "SGD": (SGD, [dict(lr=0.05, momentum=0.9, weight_decay=1e-3),
                  dict(lr=0.02, momentum=0.8, dampening=0.1, maximize=True)]),
    "SGD-nesterov": (SGD, [dict(lr=0.03, momentum=0.9, nesterov=True), dict(lr=0.01, momentum=0.0, weight_decay=0.01)]),
    "Adam": (ADAM, [dict(lr=1e-2, weight_decay=1e-2), dict(lr=3e-3, betas=(0.8, 0.99), amsgrad=True, maximize=True)]),
    "AdamW": (ADAMW, [dict(lr=1e-2, weight_decay=0.1, amsgrad=True), dict(lr=2e-3, eps=1e-6)]),
}
# LARS / LAMB (no torch.optim twin): the second group without weight decay, as for biases.
CASES = dict(TORCH_CASES, **{s.name: (s, [s.hyper, dict(s.hyper, weight_decay=0.0)])
                             for s in (BY_NAME["LARS"], BY_NAME["LAMB"])})


def make_params(n_copies: int):
    base = [torch.randn(s) for s in SHAPES]
    return [[b.clone() for b in base] for _ in range(n_copies)]


def grouped(params, options):
    return [dict(params=params[:3], **options[0]), dict(params=params[3:], **options[1])]


def make(build, params, options):
    """build (a spec's make or reference) over the two groups of params."""
    return build(grouped(params, options))


def train(pairs, steps, gen_seed, skip_every=0):
    """Same grads for every (params, optimizer) pair; the first param of the list skips every `skip_every` step."""
    for k in range(steps):
        g = torch.Generator().manual_seed(gen_seed + k)
        grads = [torch.randn(p.shape, generator=g) for p in pairs[0][0]]
        for params, opt in pairs:
            for i, (p, gr) in enumerate(zip(params, grads)):
                p.grad = None if (skip_every and i == 0 and k % skip_every == 0) else gr.clone()
            opt.step()


def assert_params_equal(a, b, exact=False):
    for x, y in zip(a, b):
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", list(TORCH_CASES))
@pytest.mark.parametrize("direction", ["torch_to_fused", "fused_to_torch"])
def test_checkpoint_crosses_implementations(case, direction, seed):
    spec, options = CASES[case]
    pa, pb, pc = make_params(3)
    src_build, dst_build = ((spec.reference, spec.make) if direction == "torch_to_fused"
                            else (spec.make, spec.reference))
    src = make(src_build, pa, options)
    train([(pa, src)], 7, seed, skip_every=3)
    sd = src.state_dict()
    # The layout torch.optim uses: the same keys per param and per group.
    ref_keys = {k for st in sd["state"].values() for k in st}
    assert ref_keys <= {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"}
    for p_dst, p_src in zip(pb, pa):
        p_dst.copy_(p_src)
    dst = make(dst_build, pb, options)
    dst.load_state_dict(copy.deepcopy(sd))
    for p_ref, p_src in zip(pc, pa):
        p_ref.copy_(p_src)
    ref = make(spec.reference, pc, options)
    ref.load_state_dict(copy.deepcopy(sd))  # torch.optim loads fusedopt's state dict too
    train([(pb, dst), (pc, ref)], 12, seed + 1000, skip_every=4)
    assert_params_equal(pb, pc)
    # And the state written back out matches torch's.
    sd_dst, sd_ref = dst.state_dict(), ref.state_dict()
    assert sd_dst["state"].keys() == sd_ref["state"].keys()
    for k, st in sd_ref["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(sd_dst["state"][k][key].float(), v.float(), rtol=RTOL, atol=ATOL)
            else:
                assert sd_dst["state"][k][key] == v


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_weights_only_round_trip(case, seed):
    spec, options = CASES[case]
    pa, pb = make_params(2)
    a = make(spec.make, pa, options)
    train([(pa, a)], 5, seed)
    sd = a.state_dict()
    for group, opts in zip(sd["param_groups"], options):  # the state torch.optim would keep, per param
        keys = variant_keys(spec, opts)
        for i in group["params"]:
            st = sd["state"].get(i, {})
            assert set(keys) <= set(st), (i, sorted(st))
            if "step" in st:
                assert st["step"].dtype is torch.float32 and st["step"].numel() == 1 and float(st["step"]) == 5
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    for x, y in zip(pb, pa):
        x.copy_(y)
    b = make(spec.make, pb, options)
    b.load_state_dict(loaded)
    assert b.param_groups[1]["lr"] == options[1]["lr"]
    train([(pa, a), (pb, b)], 6, seed + 7)
    assert_params_equal(pa, pb, exact=True)  # same kernels, same inputs: same bits


def variant_keys(spec, options):
    return variant(spec, spec.name, **options).state_keys


def lambda_warmup(step):
    return min(1.0, (step + 1) / 5)


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=1e-4),
    "LambdaLR-warmup": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda=lambda_warmup),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=1),
}


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("case", ["SGD", "Adam", "AdamW"])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_lr_schedulers_match_torch(case, sched, tensor_lr, seed):
    spec, options = CASES[case]
    if tensor_lr:
        options = [dict(o, lr=torch.tensor(o["lr"])) for o in options]
    pf, pt = make_params(2)
    of = make(spec.make, pf, copy.deepcopy(options))
    ot = make(spec.reference, pt, copy.deepcopy(options))
    sf, st = SCHEDULERS[sched](of), SCHEDULERS[sched](ot)
    metrics = [1.0, 0.9, 0.95, 0.97, 0.99, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1]
    for k, metric in enumerate(metrics):
        train([(pf, of), (pt, ot)], 1, seed + k)
        if sched == "ReduceLROnPlateau":
            sf.step(metric)
            st.step(metric)
        else:
            sf.step()
            st.step()
        lrs_f = [float(g["lr"]) for g in of.param_groups]
        lrs_t = [float(g["lr"]) for g in ot.param_groups]
        assert lrs_f == lrs_t, f"step {k}: {lrs_f} vs {lrs_t}"
        assert_params_equal(pf, pt)
    if sched != "ReduceLROnPlateau":
        assert sf.get_last_lr() == st.get_last_lr()


def test_tensor_lr_on_cpu_matches_float_lr(seed):
    pa, pb = make_params(2)
    a = fusedopt.Adam(pa, lr=torch.tensor(0.01))
    b = fusedopt.Adam(pb, lr=float(torch.tensor(0.01)))  # the fp32 value the tensor holds
    train([(pa, a), (pb, b)], 5, seed)
    assert_params_equal(pa, pb, exact=True)
    a.param_groups[0]["lr"].fill_(0.002)  # what a scheduler does to a tensor lr
    b.param_groups[0]["lr"] = float(torch.tensor(0.002))
    train([(pa, a), (pb, b)], 5, seed + 5)
    assert_params_equal(pa, pb, exact=True)


@pytest.mark.parametrize("spec", TRAINING, ids=repr)
def test_zero_grad(spec):
    params = [torch.randn(4, requires_grad=True) for _ in range(3)]
    opt = spec.make(params, **spec.hyper)
    for p in params:
        p.grad = torch.randn(4)
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros(4)) for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    before = [p.detach().clone() for p in params]
    opt.step()  # no grads: nothing moves, no state
    assert_params_equal(params, before, exact=True)
    assert len(opt.state) == 0


@pytest.mark.parametrize("case", ["SGD", "Adam", "AdamW"])
def test_closure_matches_torch(case, seed):
    spec, options = CASES[case]
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    models = [torch.nn.Linear(6, 1) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [spec.make(models[0].parameters(), **options[0]), spec.reference(models[1].parameters(), **options[0])]
    calls = [0, 0]
    for _ in range(10):
        losses = []
        for i, (m, o) in enumerate(zip(models, opts)):
            def closure(m=m, o=o, i=i):
                calls[i] += 1
                o.zero_grad()
                loss = torch.nn.functional.mse_loss(m(x), y)
                loss.backward()
                return loss
            losses.append(o.step(closure))
        torch.testing.assert_close(losses[0], losses[1], rtol=RTOL, atol=ATOL)
    assert calls == [10, 10]
    assert_params_equal(list(models[0].parameters()), list(models[1].parameters()))


def test_add_param_group_and_none_grads_match_torch(seed):
    pf, pt = make_params(2)
    of = fusedopt.Adam(pf[:2], lr=1e-2)
    ot = torch.optim.Adam(pt[:2], lr=1e-2, foreach=False)
    train([(pf[:2], of), (pt[:2], ot)], 3, seed)
    of.add_param_group(dict(params=pf[2:], lr=5e-3, amsgrad=True))
    ot.add_param_group(dict(params=pt[2:], lr=5e-3, amsgrad=True))
    train([(pf, of), (pt, ot)], 6, seed + 3, skip_every=2)
    assert_params_equal(pf, pt)


def test_sgd_momentum_switched_on_later_matches_torch(seed):
    """A checkpoint from momentum=0 (buffers None), then momentum turned on: torch starts the buffer from the grad."""
    pf, pt = make_params(2)
    ot0 = torch.optim.SGD(pt, lr=0.01, foreach=False)
    train([(pt, ot0)], 2, seed)
    for a, b in zip(pf, pt):
        a.copy_(b)
    of = fusedopt.SGD(pf, lr=0.01)
    of.load_state_dict(ot0.state_dict())
    ot = torch.optim.SGD(pt, lr=0.01, foreach=False)
    ot.load_state_dict(ot0.state_dict())
    for o in (of, ot):
        o.param_groups[0]["momentum"] = 0.9
    train([(pf, of), (pt, ot)], 4, seed + 2)
    assert_params_equal(pf, pt)


def test_sgd_none_momentum_buffer_in_checkpoint(seed):
    """Checkpoints of older torch versions store momentum_buffer=None (momentum 0). When momentum is
    then switched on, the first step must start the buffer from the grad, as torch does."""
    pf, pt = make_params(2)
    sd = {"state": {i: {"momentum_buffer": None} for i in range(len(SHAPES))},
          "param_groups": [dict(lr=0.01, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                                maximize=False, foreach=None, differentiable=False, fused=None,
                                params=list(range(len(SHAPES))))]}
    of = fusedopt.SGD(pf, lr=0.01)
    ot = torch.optim.SGD(pt, lr=0.01, foreach=False)
    of.load_state_dict(copy.deepcopy(sd))
    ot.load_state_dict(copy.deepcopy(sd))
    train([(pf, of), (pt, ot)], 2, seed)  # momentum 0: buffers stay None/absent
    for o in (of, ot):
        o.param_groups[0]["momentum"] = 0.9
    train([(pf, of), (pt, ot)], 4, seed + 2)
    assert_params_equal(pf, pt)


def test_sgd_momentum_switched_on_mid_training_matches_torch(seed):
    pf, pt = make_params(2)
    of = fusedopt.SGD(pf, lr=0.01)
    ot = torch.optim.SGD(pt, lr=0.01, foreach=False)
    train([(pf, of), (pt, ot)], 3, seed)
    for o in (of, ot):
        o.param_groups[0]["momentum"] = 0.9
    train([(pf, of), (pt, ot)], 3, seed + 3)
    for o in (of, ot):
        o.param_groups[0]["momentum"] = 0.0
    train([(pf, of), (pt, ot)], 2, seed + 6)
    assert_params_equal(pf, pt)


def test_amsgrad_switched_on_mid_training_raises_cleanly(seed):
    """torch.optim.Adam fails (KeyError) here; fusedopt must raise naming the missing state, not crash."""
    (pf,) = make_params(1)
    of = fusedopt.Adam(pf, lr=0.01)
    train([(pf, of)], 2, seed)
    of.param_groups[0]["amsgrad"] = True
    before = [p.clone() for p in pf]
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        train([(pf, of)], 1, seed + 2)
    assert_params_equal(pf, before, exact=True)
