"""AMP: torch.amp.GradScaler drives fusedopt through `_step_supports_amp_scaling`
(grad_scale / found_inf on the optimizer) and must give torch.optim's numbers."""
import pytest
import torch

from helpers import PAIR_IDS, PAIRS, assert_params_close, snapshot, tiny_model, twin


def scaled_backward(model, scaler, x, y, poison=None):
    loss = torch.nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    if poison is not None:
        next(model.parameters()).grad.view(-1)[3] = poison


@pytest.mark.parametrize("fcls,tcls,kw", PAIRS, ids=PAIR_IDS)
def test_grad_scaler_matches_torch_with_inf_and_nan_steps(fcls, tcls, kw):
    model = tiny_model(seed=None)
    ref = twin(model)
    opt, ref_opt = fcls(model.parameters(), **kw), tcls(ref.parameters(), foreach=False, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    poisons = [None, None, float("inf"), None, float("nan"), None, float("-inf"), None]
    for step, poison in enumerate(poisons):
        x, y = torch.randn(16, 6), torch.randn(16, 3)
        opt.zero_grad(), ref_opt.zero_grad()
        scaled_backward(model, scaler, x, y, poison)
        scaled_backward(ref, ref_scaler, x, y, poison)
        before = snapshot(model, opt)
        scaler.step(opt)
        ref_scaler.step(ref_opt)
        if poison is not None:  # skipped: params, state and step count untouched, bit for bit
            after = snapshot(model, opt)
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


@pytest.mark.parametrize("fcls,tcls,kw", PAIRS, ids=PAIR_IDS)
def test_unscale_then_clip_then_step(fcls, tcls, kw):
    model = tiny_model()
    ref = twin(model)
    opt, ref_opt = fcls(model.parameters(), **kw), tcls(ref.parameters(), foreach=False, **kw)
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


def test_grad_scale_without_scaler_divides_grads():
    """The protocol itself: grad_scale divides the grads, found_inf != 0 skips."""
    import fusedopt
    p = torch.randn(10, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    g = torch.randn(10)
    opt, ref = fusedopt.SGD([p], lr=0.1), fusedopt.SGD([q], lr=0.1)
    p.grad, q.grad = g * 8, g.clone()
    opt.grad_scale = torch.tensor(8.0)
    opt.found_inf = torch.tensor(0.0)
    opt.step(), ref.step()
    assert torch.equal(p, q)
    opt.found_inf = torch.tensor(1.0)
    before = p.detach().clone()
    opt.step()
    assert torch.equal(p, before)


def test_bad_amp_scalar_is_rejected_before_anything_is_written():
    import fusedopt
    p = torch.randn(4, requires_grad=True)
    p.grad = torch.randn(4)
    opt = fusedopt.Adam([p])
    opt.grad_scale = torch.ones(3)
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step()
    assert len(opt.state) == 0
