"""AMP: torch.amp.GradScaler drives fusedopt through `_step_supports_amp_scaling`
(grad_scale / found_inf on the optimizer) and must give the reference's numbers,
for every optimizer of the registry's TRAINING list."""
import pytest
import torch

import fusedopt

from helpers import assert_params_close, snapshot, tiny_model, twin
from optim_registry import TRAINING, variant

specs = pytest.mark.parametrize("spec", TRAINING, ids=repr)


def scaled_backward(model, scaler, x, y, poison=None):
    loss = torch.nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    if poison is not None:
        next(model.parameters()).grad.view(-1)[3] = poison


@specs
def test_grad_scaler_matches_reference_with_inf_and_nan_steps(spec):
    model = tiny_model()
    ref = twin(model)
    opt, ref_opt = spec.make(model.parameters(), **spec.hyper), spec.reference(ref.parameters(), **spec.hyper)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    poisons = [None, None, float("inf"), None, float("nan"), None, float("-inf"), None]
    for step, poison in enumerate(poisons):
        x, y = torch.randn(16, 6), torch.randn(16, 3)
        opt.zero_grad(), ref_opt.zero_grad()
        scaled_backward(model, scaler, x, y, poison)
        scaled_backward(ref, ref_scaler, x, y, poison)
        before = snapshot(model.parameters(), opt)
        scaler.step(opt)
        ref_scaler.step(ref_opt)
        if poison is not None:  # skipped: params, state and step count untouched, bit for bit
            after = snapshot(model.parameters(), opt)
            for a, b in zip(before[0], after[0]):
                assert torch.equal(a, b)
            for i in before[1]:
                for k, v in before[1][i].items():
                    assert torch.equal(v, after[1][i][k]), (step, k)
        scaler.update(), ref_scaler.update()
        assert scaler.get_scale() == ref_scaler.get_scale()
        assert_params_close(model, ref)
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    if "step" in opt.state[next(model.parameters())]:
        steps = [float(opt.state[p]["step"]) for p in model.parameters()]
        assert steps == [float(ref_opt.state[p]["step"]) for p in ref.parameters()] == [5.0] * len(steps)


# SGD and LARS with dampening: where a skipped first step used to leave a trace (a zero
# buffer the next step took for a real one). Muon's buffer starts at zero in torch too.
FIRST_STEP_SPECS = [variant(s, s.name + "-dampening", dampening=0.5, nesterov=False)
                    if s.make in (fusedopt.SGD, fusedopt.LARS) else s for s in TRAINING]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("spec", FIRST_STEP_SPECS, ids=repr)
def test_a_skipped_first_step_is_as_if_it_never_happened(spec, device):
    """GradScaler often overflows on its first step. The skipped step must leave
    no trace: SGD/LARS momentum starts from the first real grad (b = g, not
    (1 - dampening) g into a zero buffer), and the checkpoint of a model whose only
    step was skipped has no momentum buffers, as torch.optim's has none (Adam and
    LAMB keep zero moments at step 0, equivalent to none: the next step is step 1)."""
    model = tiny_model().to(device)
    ref = twin(model)
    opt, ref_opt = spec.make(model.parameters(), **spec.hyper), spec.reference(ref.parameters(), **spec.hyper)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 12, growth_interval=2)
    ref_scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 12, growth_interval=2)
    for step, poison in enumerate([float("inf"), float("nan"), None, None, float("inf"), None]):
        x, y = torch.randn(16, 6, device=device), torch.randn(16, 3, device=device)
        opt.zero_grad(), ref_opt.zero_grad()
        scaled_backward(model, scaler, x, y, poison)
        scaled_backward(ref, ref_scaler, x, y, poison)
        scaler.step(opt)
        ref_scaler.step(ref_opt)
        scaler.update(), ref_scaler.update()
        assert_params_close(model, ref)
        if step < 2:  # nothing has really stepped yet
            if "dampening" in spec.hyper:
                assert opt.state_dict()["state"] == {} == ref_opt.state_dict()["state"], step
            else:  # Adam, LAMB (Muon): zero moments at step 0 (zero buffers), which the next step treats as torch's first
                assert all(float(st["step"]) == 0.0 for st in opt.state.values() if "step" in st), step
    if "dampening" in spec.hyper:
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"],
                                       rtol=1e-5, atol=1e-6)


@specs
def test_unscale_then_clip_then_step(spec):
    model = tiny_model()
    ref = twin(model)
    opt, ref_opt = spec.make(model.parameters(), **spec.hyper), spec.reference(ref.parameters(), **spec.hyper)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for poison in [None, None, float("inf"), None]:
        x, y = torch.randn(16, 6), 10 * torch.randn(16, 3)
        opt.zero_grad(), ref_opt.zero_grad()
        for m, s, o in ((model, scaler, opt), (ref, ref_scaler, ref_opt)):
            scaled_backward(m, s, x, y, poison)
            s.unscale_(o)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            s.step(o)
            s.update()
        assert_params_close(model, ref)


@specs
def test_grad_scale_without_scaler_divides_grads(spec):
    """The protocol itself: grad_scale divides the grads (a power of two: exactly),
    found_inf != 0 skips the step, leaving params and state (the step count too) untouched."""
    init = [torch.randn(s) for s in [(50, 20), (20,)]]
    plain, scaled = [[x.clone().requires_grad_() for x in init] for _ in range(2)]
    opt, ref = spec.make(scaled, **spec.hyper), spec.make(plain, **spec.hyper)
    opt.grad_scale = torch.tensor(1024.0)
    opt.found_inf = torch.tensor(0.0)
    for _ in range(4):
        for p, q in zip(scaled, plain):
            q.grad = torch.randn_like(q)
            p.grad = q.grad * 1024.0
        opt.step(), ref.step()
    assert all(torch.equal(p, q) for p, q in zip(scaled, plain))
    before = snapshot(scaled, opt)
    opt.found_inf = torch.tensor(1.0)
    for p in scaled:
        p.grad = torch.full_like(p, float("inf"))
    opt.step()
    after = snapshot(scaled, opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    for i, st in before[1].items():
        assert st.keys() == after[1][i].keys() and all(torch.equal(v, after[1][i][k]) for k, v in st.items())


def test_bad_amp_scalar_is_rejected_before_anything_is_written():
    import fusedopt
    p = torch.randn(4, requires_grad=True)
    p.grad = torch.randn(4)
    opt = fusedopt.Adam([p])
    opt.grad_scale = torch.ones(3)
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step()
    assert len(opt.state) == 0
