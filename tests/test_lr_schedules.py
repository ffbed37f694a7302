"""torch.optim.lr_scheduler drives fusedopt with float and tensor learning rates,
and fusedopt.lr implements the linear scaling rule with warmup."""
import pytest
import torch

import fusedopt
from fusedopt.lr import linear_scaling, linear_warmup
from helpers import assert_params_close, tiny_model, twin
from optim_registry import TRAINING

S = torch.optim.lr_scheduler

SCHEDULES = {
    "warmup": lambda o: S.SequentialLR(o, [S.LinearLR(o, start_factor=0.1, total_iters=3),
                                           S.CosineAnnealingLR(o, T_max=5)], milestones=[3]),
    "step": lambda o: S.StepLR(o, step_size=2, gamma=0.5),
    "exponential": lambda o: S.ExponentialLR(o, gamma=0.8),
    "cosine": lambda o: S.CosineAnnealingLR(o, T_max=6, eta_min=1e-4),
    "plateau": lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=0),
    "fusedopt_warmup": lambda o: linear_warmup(o, 3, after=S.StepLR(o, step_size=2, gamma=0.3)),
}


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("spec", TRAINING, ids=repr)
def test_schedule_matches_torch(spec, schedule, tensor_lr):
    model = tiny_model()
    ref = twin(model)
    lr = spec.hyper["lr"]
    opt = spec.make(model.parameters(), **dict(spec.hyper, lr=torch.tensor(lr) if tensor_lr else lr))
    ref_opt = spec.reference(ref.parameters(), **dict(spec.hyper, lr=torch.tensor(lr) if tensor_lr else lr))
    sched, ref_sched = SCHEDULES[schedule](opt), SCHEDULES[schedule](ref_opt)
    lr_object = opt.param_groups[0]["lr"]
    seen = set()
    for step in range(8):
        x, y = torch.randn(8, 6), torch.randn(8, 3)
        losses = []
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            o.step()
            losses.append(loss.item())
        if schedule == "plateau":
            sched.step(1.0), ref_sched.step(1.0)  # never improves: lr halves
        else:
            sched.step(), ref_sched.step()
        got, want = float(opt.param_groups[0]["lr"]), float(ref_opt.param_groups[0]["lr"])
        assert got == pytest.approx(want, rel=1e-6), step
        seen.add(round(got, 12))
        assert_params_close(model, ref, rtol=1e-5, atol=1e-6)
    assert len(seen) > 2  # the schedule really changed the lr the kernels used
    if tensor_lr:
        assert opt.param_groups[0]["lr"] is lr_object  # updated in place (CUDA-graph friendly)


def test_tensor_lr_is_read_at_step_time():
    p = torch.randn(5, requires_grad=True)
    lr = torch.tensor(0.1)
    opt = fusedopt.SGD([p], lr=lr)
    g = torch.randn(5)
    before = p.detach().clone()
    p.grad = g
    lr.fill_(0.5)
    opt.step()
    torch.testing.assert_close(p.detach(), before - 0.5 * g)


def test_linear_scaling():
    assert linear_scaling(0.1, 8192) == pytest.approx(3.2)
    assert linear_scaling(0.1, 512, base_batch_size=128) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="batch_size"):
        linear_scaling(0.1, 0)
    with pytest.raises(ValueError, match="base_lr"):
        linear_scaling(float("nan"), 256)


def test_linear_warmup_ramps_to_scaled_lr_then_hands_over():
    lr = linear_scaling(0.1, 1024)  # 0.4
    p = torch.randn(3, requires_grad=True)
    opt = fusedopt.SGD([p], lr=lr, momentum=0.9)
    after = S.MultiStepLR(opt, milestones=[2], gamma=0.1)
    sched = linear_warmup(opt, warmup_steps=4, start_factor=0.25, after=after)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.randn(3)
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.1, 0.175, 0.25, 0.325, 0.4])
    assert lrs[5:] == pytest.approx([0.4, 0.04, 0.04])
    with pytest.raises(ValueError, match="warmup_steps"):
        linear_warmup(opt, 0)
