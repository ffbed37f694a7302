"""HessianOperator's HVP methods (issue 15, "Curvature during training"): forward-over-reverse
(torch.func.jvp of torch.func.grad) against double backward and against dense Hessians on small
fp64 models, at fp64 tolerances; the "auto" choice; the refusal of a model without forward-mode
support; method validation before any HVP."""
from __future__ import annotations

import re

import pytest
import torch
from torch.func import functional_call

from fusedopt.hessian import EmpiricalFisherOperator, GGNOperator, HessianOperator, SharpnessTracker, eigsh

F = torch.nn.functional
BOTH = ("double_backward", "forward_over_reverse")
RTOL = 1e-10  # relative to the largest element of the reference vector / matrix


def close(got, want, rtol=RTOL):
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()


def tiny_cnn():
    """Conv -> BatchNorm -> tanh -> conv -> mean pool -> linear, fp64, with running stats that are
    not the init values (so eval mode really uses them)."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Tanh(), torch.nn.Conv2d(3, 2, 3),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(2, 3)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def batches(n_in, shape=None, sizes=(7, 5)):
    """Two batches of different sizes (the weighted mean matters) of fp64 inputs, class targets."""
    out = []
    for b in sizes:
        x = torch.randn(b, *(shape or (n_in,)), dtype=torch.float64)
        out.append((x, torch.randint(0, 3, (b,))))
    return out


def dense_hessian(model, loss_fn, data, names=None, mode="eval"):
    """The Hessian of the batch-size-weighted mean loss in the named params (all by default),
    through torch.autograd.functional.hessian of the loss of the flat parameter vector (the
    buffers are restored after: train mode updates BatchNorm's running stats)."""
    named = dict(model.named_parameters())
    names = list(names or named)
    shapes = [named[n].shape for n in names]
    flat0 = torch.cat([named[n].detach().reshape(-1) for n in names])
    saved = {k: b.clone() for k, b in model.named_buffers()}
    was = model.training
    model.train(mode == "train")

    def f(flat):
        chosen, i = {}, 0
        for n, s in zip(names, shapes):
            chosen[n] = flat[i:i + s.numel()].view(s)
            i += s.numel()
        total = sum(len(x) * loss_fn(functional_call(model, chosen, (x,)), y) for x, y in data)
        return total / sum(len(x) for x, _ in data)

    try:
        return torch.autograd.functional.hessian(f, flat0)
    finally:
        model.train(was)
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(saved[k])


def counting_forwards(model):
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    return calls


# ---- forward-over-reverse = double backward = dense ---------------------------------------------

def test_mlp_both_methods_match_the_dense_hessian():
    model, data = mlp(), batches(4)
    H = dense_hessian(model, F.cross_entropy, data)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    got = {m: HessianOperator(model, F.cross_entropy, data, method=m).matvec(v) for m in BOTH}
    close(got["double_backward"], H @ v)
    close(got["forward_over_reverse"], H @ v)
    close(got["forward_over_reverse"], got["double_backward"], rtol=1e-12)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_batchnorm_cnn_both_modes_match_the_dense_hessian_and_restore_the_buffers(mode):
    model, data = tiny_cnn(), batches(None, (2, 6, 6))
    model.train(mode == "eval")  # the other mode than the operator's: it must be restored too
    before = {k: b.clone() for k, b in model.named_buffers()}
    H = dense_hessian(model, F.cross_entropy, data, mode=mode)
    ops = {m: HessianOperator(model, F.cross_entropy, data, method=m, mode=mode) for m in BOTH}
    assert ops["forward_over_reverse"].method == "forward_over_reverse"
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    for i in range(V.shape[1]):
        want = H @ V[:, i]
        for op in ops.values():
            close(op.matvec(V[:, i]), want)
    assert all(op.num_matvecs == V.shape[1] for op in ops.values())  # the construction check is not counted
    for k, b in model.named_buffers():  # running stats and num_batches_tracked as they were
        assert torch.equal(b, before[k]), k
    assert model.training == (mode == "eval")


class DecayingScale(torch.nn.Module):
    """In train mode each forward multiplies a buffer by 0.5 and scales by it: the loss of batch
    j depends on how many forwards came before, so it tests that forward-over-reverse updates the
    buffers batch by batch exactly as double backward does."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones((), dtype=torch.float64))

    def forward(self, x):
        if self.training:
            self.scale.mul_(0.5)
        return x * self.scale


def test_train_mode_buffers_evolve_batch_by_batch_as_with_double_backward():
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), DecayingScale(), torch.nn.Linear(5, 3))
    model = model.double()
    data = batches(4, sizes=(6, 4, 5))
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    got = {m: HessianOperator(model, F.cross_entropy, data, method=m, mode="train").matvec(v) for m in BOTH}
    close(got["forward_over_reverse"], got["double_backward"], rtol=1e-12)
    assert float(model[2].scale) == 1.0  # restored
    # and the scales really differed between batches: eval mode (no decay) gives another vector
    other = HessianOperator(model, F.cross_entropy, data, method="forward_over_reverse").matvec(v)
    assert float((other - got["double_backward"]).abs().max()) > 1e-3 * float(other.abs().max())


def test_a_parameter_block_by_name_is_the_dense_sub_block():
    model, data = tiny_cnn(), batches(None, (2, 6, 6))
    chosen = ["6.weight", "1.weight", "0.bias"]  # any order: coordinates follow it
    H = dense_hessian(model, F.cross_entropy, data, names=chosen)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    grads_before = [p.grad for p in model.parameters()]
    for m in BOTH:
        op = HessianOperator(model, F.cross_entropy, data, params=chosen, method=m)
        assert op.shape == H.shape
        close(op.matvec(v), H @ v)
    assert [p.grad for p in model.parameters()] == grads_before  # nothing accumulated in .grad


def test_batch_loss_closure_form():
    """Dict batches through batch_loss(model, batch): each batch counts once in the mean."""
    model = mlp()
    data = [{"x": x, "y": y} for x, y in batches(4, sizes=(6, 3))]
    fn = lambda m, b: F.cross_entropy(m(b["x"]), b["y"])  # noqa: E731
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    got = {m: HessianOperator(model, data=data, batch_loss=fn, method=m).matvec(v) for m in BOTH}
    # dense: the plain mean of the two batch Hessians
    Hs = [dense_hessian(model, F.cross_entropy, [(b["x"], b["y"])]) for b in data]
    close(got["forward_over_reverse"], (Hs[0] + Hs[1]) @ v / 2)
    close(got["forward_over_reverse"], got["double_backward"], rtol=1e-12)


def test_eigsh_top_eigenvalue_agrees(seed):
    model, data = tiny_cnn(), batches(None, (2, 6, 6))
    top = {}
    for m in BOTH:
        op = HessianOperator(model, F.cross_entropy, data, method=m)
        res = eigsh(op, k=1, which="LA", tol=1e-10, generator=torch.Generator().manual_seed(seed))
        assert res.all_converged and op.num_matvecs == res.num_matvecs
        top[m] = float(res.eigenvalues[0])
    want = float(torch.linalg.eigvalsh(dense_hessian(model, F.cross_entropy, data))[-1])
    assert top["forward_over_reverse"] == pytest.approx(want, rel=1e-8)
    assert top["forward_over_reverse"] == pytest.approx(top["double_backward"], rel=1e-8)


def test_sharpness_tracker_takes_the_method(seed):
    model, data = mlp(), batches(4)
    recs = [SharpnessTracker(model, F.cross_entropy, data, tol=1e-8, seed=seed, method=m).update(0) for m in BOTH]
    assert recs[0].num_hvps == recs[1].num_hvps
    assert recs[0].sharpness[0] == pytest.approx(recs[1].sharpness[0], rel=1e-8)


# ---- the choice and the refusals ---------------------------------------------------------------

def test_auto_is_double_backward_and_runs_nothing_at_construction():
    model, data = tiny_cnn(), batches(None, (2, 6, 6))
    calls = counting_forwards(model)
    op = HessianOperator(model, F.cross_entropy, data)
    assert op.method == "double_backward" and not calls
    assert HessianOperator(model, F.cross_entropy, data, method="auto").method == "double_backward"
    v = torch.randn(op.shape[0], dtype=torch.float64)
    assert torch.equal(op.matvec(v), HessianOperator(model, F.cross_entropy, data, method="double_backward").matvec(v))


def test_forward_over_reverse_is_checked_at_construction_on_one_batch_without_touching_the_rng():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Dropout(0.3), torch.nn.Linear(6, 3)).double()
    data = batches(4, sizes=(5, 5, 5))
    calls = counting_forwards(model)
    state = torch.get_rng_state()
    op = HessianOperator(model, F.cross_entropy, data, method="forward_over_reverse", mode="train")
    assert len(calls) == 1 and op.num_matvecs == 0  # one forward on the first batch, not an HVP
    assert torch.equal(torch.get_rng_state(), state)  # dropout's mask was drawn on a forked RNG


@pytest.mark.parametrize("bad", ["backward", "Forward_Over_Reverse", "", None, 1])
def test_an_invalid_method_is_refused_before_any_hvp(bad):
    model, data = mlp(), batches(4)
    calls = counting_forwards(model)
    with pytest.raises(ValueError, match=r"method must be one of 'auto', 'double_backward', "
                                         r"'forward_over_reverse'; got " + re.escape(repr(bad)) + "$"):
        HessianOperator(model, F.cross_entropy, data, method=bad)
    assert not calls


class OldStyleSquare(torch.autograd.Function):
    """A custom Function as often written: forward(ctx, x), no setup_context, no jvp."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class NoJvpSquare(torch.autograd.Function):
    """torch.func-ready (setup_context) but without jvp: forward-mode AD raises NotImplementedError."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class Squared(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(x)


@pytest.mark.parametrize("fn", [OldStyleSquare, NoJvpSquare])
def test_a_module_without_forward_mode_support_is_refused_clearly(fn):
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), Squared(fn), torch.nn.Linear(5, 3)).double()
    data = batches(4)
    with pytest.raises(NotImplementedError) as info:
        HessianOperator(model, F.cross_entropy, data, method="forward_over_reverse")
    text = str(info.value)
    assert text.startswith("method='forward_over_reverse' does not work with this model")
    assert "failed on the first batch" in text and "custom torch.autograd.Function" in text
    assert text.endswith("Use method='double_backward' (the default, 'auto')")
    assert type(info.value.__cause__).__name__ in text  # the original failure is named (and chained)
    # the default works on it, and is the dense Hessian
    op = HessianOperator(model, F.cross_entropy, data)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    close(op.matvec(v), dense_hessian(model, F.cross_entropy, data) @ v)


def test_a_loss_that_fails_either_way_raises_its_own_error():
    def broken(out, target):
        raise KeyError("no such loss")

    with pytest.raises(KeyError, match="no such loss"):
        HessianOperator(mlp(), broken, batches(4), method="forward_over_reverse")


def test_forward_over_reverse_needs_the_models_own_parameters():
    model, data = mlp(), batches(4)
    stranger = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"params\[1\] is not a parameter of the model: "
                                         r"method='forward_over_reverse' needs the model's own parameters"):
        HessianOperator(model, F.cross_entropy, data, params=[model[0].weight, stranger],
                        method="forward_over_reverse")


@pytest.mark.parametrize("cls", [GGNOperator, EmpiricalFisherOperator])
def test_ggn_and_fisher_take_only_the_default_method(cls):
    model, data = mlp(), batches(4)
    assert cls(model, F.cross_entropy, data).method is None
    assert cls(model, F.cross_entropy, data, method="auto").method is None
    for m in BOTH:
        with pytest.raises(ValueError, match=f"{cls.__name__} computes its products its own way"):
            cls(model, F.cross_entropy, data, method=m)
    with pytest.raises(ValueError, match="method must be one of"):
        cls(model, F.cross_entropy, data, method="bogus")
