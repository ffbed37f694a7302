"""GPU-only integration: CUDA-graph capture of a whole training step (and of steps
with stochastic rounding), GradScaler on CUDA, master weights on CUDA. Skipped without a GPU (CI builds but cannot run these)."""
import pytest
import torch

import fusedopt
from helpers import assert_capture_refused, assert_params_close, tiny_model, twin
from optim_registry import BY_NAME, TRAINING

pytestmark = pytest.mark.cuda
specs = pytest.mark.parametrize("spec", TRAINING, ids=repr)
# 8-bit states: the codes and block scales are preallocated, so a step captures like the others.
captured_specs = pytest.mark.parametrize(
    "spec", TRAINING + [BY_NAME[n] for n in ("AdamW-int8-amsgrad", "SGD-momentum-int8", "LARS-int8")], ids=repr)


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def eager_step(m, o, x, y):
    o.zero_grad(set_to_none=True)
    loss_fn(m, x, y).backward()
    o.step()


def warm_up_and_capture(model, opt, ref, ref_opt, data, static_x, static_y):
    """Three eager steps of both twins on a side stream (they create the state, which
    cannot be created during capture), then a training step of ``model`` captured."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for x, y in data:
            eager_step(model, opt, x, y)
            eager_step(ref, ref_opt, x, y)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss_fn(model, static_x, static_y).backward()
        opt.step()
    return graph


@captured_specs
def test_captured_train_step_replays_like_eager(spec):
    model = tiny_model().cuda()
    ref = twin(model)
    lr = torch.tensor(spec.hyper["lr"], device="cuda")
    ref_lr = lr.clone()
    opt = spec.make(model.parameters(), **dict(spec.hyper, lr=lr))
    ref_opt = spec.make(ref.parameters(), **dict(spec.hyper, lr=ref_lr))
    data = [(torch.randn(8, 6, device="cuda"), torch.randn(8, 3, device="cuda")) for _ in range(9)]
    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    graph = warm_up_and_capture(model, opt, ref, ref_opt, data[:3], static_x, static_y)
    # Capture recorded but did not run the step: params still equal the reference.
    assert_params_close(model, ref, rtol=0, atol=0)

    for i, (x, y) in enumerate(data[3:]):
        if i == 3:  # a scheduler-style in-place lr change is seen by the replay
            lr.fill_(spec.hyper["lr"] * 0.5)
            ref_lr.fill_(spec.hyper["lr"] * 0.5)
        static_x.copy_(x), static_y.copy_(y)
        graph.replay()
        eager_step(ref, ref_opt, x, y)
        torch.cuda.synchronize()
        assert_params_close(model, ref, rtol=0, atol=0)
    if "step" in opt.state[next(model.parameters())]:
        assert float(opt.state[next(model.parameters())]["step"]) == 9.0


ROUNDING_SPECS = [BY_NAME[n] for n in ("SGD-sr", "Adam-sr", "AdamW-sr", "LARS-sr", "LAMB-sr")]


def _bf16_params(gen, shapes):
    return [torch.randn(s, generator=gen).bfloat16().cuda() for s in shapes]


def _bits(ps):
    return [p.detach().view(torch.int16).clone() for p in ps]


@pytest.mark.parametrize("spec", ROUNDING_SPECS, ids=repr)
def test_captured_stochastic_rounding_replays_like_eager(spec, seed):
    """A captured step with stochastic rounding reads its group's device words at each
    replay: every replay is bit for bit the eager step with the same step count, and
    the words advance once per replay. A seed frozen at capture time would repeat the
    bits of one step and fail from the second replay on."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3 * 65536 + 5,), (37, 11)]
    params = _bf16_params(gen, shapes)
    grads = [_bf16_params(gen, shapes) for _ in range(8)]
    lr, ref_lr = torch.tensor(spec.hyper["lr"], device="cuda"), torch.tensor(spec.hyper["lr"], device="cuda")
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    qs = [torch.nn.Parameter(p.clone()) for p in params]
    opt = spec.make(ps, **dict(spec.hyper, lr=lr), seed=7)
    ref = spec.make(qs, **dict(spec.hyper, lr=ref_lr), seed=7)
    static = [torch.zeros_like(p) for p in ps]
    for p, g in zip(ps, static):
        p.grad = g

    def step(k):
        for g, new in zip(static, grads[k]):
            g.copy_(new)
        for q, new in zip(qs, grads[k]):
            q.grad = new.clone()
        ref.step()

    s = torch.cuda.Stream()  # warm up on a side stream: creates the state
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for k in range(2):
            step(k)
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    words = opt.param_groups[0]["rounding_state"]
    assert words.tolist() == [7, 2, 0]  # capture recorded the add, did not run it
    for k in range(2, 8):
        step(k)
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(_bits(ps), _bits(qs))), f"replay {k - 1}"
        assert words.tolist() == [7, k + 1, 0] == ref.param_groups[0]["rounding_state"].tolist()


def test_captured_rounding_bits_change_every_replay(seed):
    """Replays of one captured SGD step (no momentum) from the same params with the same
    grads round differently each time (the step word differs), and each equals the
    eager step with that step count."""
    gen = torch.Generator().manual_seed(seed)
    p0 = _bf16_params(gen, [(65536 + 3,)])[0]
    g0 = _bf16_params(gen, [(65536 + 3,)])[0] * 1e-3  # far below half an ulp: the rounding decides
    p = torch.nn.Parameter(p0.clone())
    p.grad = g0.clone()
    opt = fusedopt.SGD([p], lr=torch.tensor(1.0, device="cuda"), stochastic_rounding=True, seed=11)
    opt.step()  # eager: the plan exists before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    results = []
    for k in range(1, 5):
        with torch.no_grad():
            p.copy_(p0)
        graph.replay()
        torch.cuda.synchronize()
        results.append(p.detach().view(torch.int16).clone())
        q = torch.nn.Parameter(p0.clone())
        q.grad = g0.clone()
        ref = fusedopt.SGD([q], lr=1.0, stochastic_rounding=True, seed=11)
        ref.param_groups[0]["rounding_state"][1] = k
        ref.step()
        assert torch.equal(results[-1], q.detach().view(torch.int16)), f"replay {k}"
    assert len({bytes(r.cpu().numpy().tobytes()) for r in results}) == len(results), "replays gave equal bits"


def test_state_creation_during_capture_is_refused():
    p = torch.randn(16, device="cuda", requires_grad=True)
    p.grad = torch.randn(16, device="cuda")
    opt = fusedopt.Adam([p], lr=torch.tensor(1e-3, device="cuda"))
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="eager step before capturing"):
        with torch.cuda.graph(graph):
            opt.step()
    assert len(opt.state) == 0


@specs
def test_grad_scaler_cuda_matches_reference(spec):
    model = tiny_model().cuda()
    ref = twin(model)
    opt, ref_opt = spec.make(model.parameters(), **spec.hyper), spec.reference(ref.parameters(), **spec.hyper)
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0 ** 12) for _ in range(2)]
    for poison in [None, float("inf"), None, float("nan"), None]:
        x, y = torch.randn(16, 6, device="cuda"), torch.randn(16, 3, device="cuda")
        for m, o, s in ((model, opt, scalers[0]), (ref, ref_opt, scalers[1])):
            o.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = loss_fn(m, x, y)
            s.scale(loss).backward()
            if poison is not None:
                next(m.parameters()).grad.view(-1)[0] = poison
            s.step(o)
            s.update()
        assert_params_close(model, ref, rtol=1e-5, atol=1e-6)


@specs
def test_master_weights_cuda_match_cpu(spec):
    ps = [torch.randn(257).bfloat16() for _ in range(3)]
    cpu = [p.clone().requires_grad_() for p in ps]
    gpu = [p.cuda().requires_grad_() for p in ps]
    oc = spec.make(cpu, master_weights=True, state_dtype=torch.bfloat16, **spec.hyper)
    og = spec.make(gpu, master_weights=True, state_dtype=torch.bfloat16, **spec.hyper)
    for _ in range(4):
        for c, g in zip(cpu, gpu):
            grad = torch.randn(257).bfloat16()
            c.grad, g.grad = grad, grad.cuda()
        oc.step(), og.step()
    for c, g in zip(cpu, gpu):
        torch.testing.assert_close(oc.state[c]["master"], og.state[g]["master"].cpu(), rtol=1e-6, atol=1e-7)


@specs
@pytest.mark.parametrize("count", [3, 300], ids=["small-table", "full-tables"])
@pytest.mark.parametrize("offset", [0, 1, 2], ids=["aligned", "element-tier", "8-byte-tier"])
def test_misaligned_grads_and_both_launch_tables_match_cpu(spec, count, offset):
    # Grads as views at an element offset into one flat buffer, as DDP's gradient_as_bucket_view
    # gives: offset 1 puts fp32 grads on the element-by-element path, 2 on the 8-byte words
    # (common/packet_tier.h), while params and state stay 16-byte aligned. 3 tensors launch with
    # the 1 152-byte table, 300 with full ones (two launches: 240 rows, then 60).
    shapes = [(1 + (7 * k) % 300,) if k % 5 else (33, 9) for k in range(count)]
    params = [torch.randn(s) for s in shapes]
    cpu = [p.clone().requires_grad_() for p in params]
    gpu = [p.cuda().requires_grad_() for p in params]
    oc, og = spec.make(cpu, **spec.hyper), spec.make(gpu, **spec.hyper)
    total = sum(p.numel() for p in params)
    for _ in range(3):
        flat = torch.randn(offset + total, device="cuda")
        at = offset
        for c, g in zip(cpu, gpu):
            g.grad = flat[at:at + g.numel()].view(g.shape)
            c.grad = g.grad.cpu()
            at += g.numel()
        oc.step(), og.step()
    for c, g in zip(cpu, gpu):
        torch.testing.assert_close(g.detach().cpu(), c.detach(), rtol=1e-5, atol=1e-6)


class ConvNet(torch.nn.Module):
    """A conv weight (4-D, orthogonalized as (16, 27)), a wide and a tall matrix for
    Muon; biases and the head for its AdamW group (fusedopt.muon_param_groups)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.hidden = torch.nn.Linear(16, 40)
        self.narrow = torch.nn.Linear(40, 12)
        self.head = torch.nn.Linear(12, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).mean(dim=(2, 3))
        return self.head(torch.tanh(self.narrow(torch.tanh(self.hidden(h)))))


@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_captured_muon_step_replays_like_eager(ns_dtype):
    """A whole training step of fusedopt.Muon (Muon and AdamW groups, each with its own CUDA
    tensor lr, both changed between replays) captured once: every replay gives the bits of
    the same step run eagerly on a twin."""
    model = ConvNet().cuda()
    ref = twin(model)
    lrs = {"muon": 0.02, "adamw": 3e-3}

    def make(m):
        groups = fusedopt.muon_param_groups(m, head="head")
        tensors = {g["use_muon"]: torch.tensor(lrs["muon" if g["use_muon"] else "adamw"], device="cuda")
                   for g in groups}
        for g in groups:
            g["lr"] = tensors[g["use_muon"]]
        return fusedopt.Muon(groups, weight_decay=0.05, ns_dtype=ns_dtype), tensors

    (opt, lr), (ref_opt, ref_lr) = make(model), make(ref)
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    data = [(torch.randn(4, 3, 8, 8, device="cuda"), torch.randn(4, 3, device="cuda")) for _ in range(9)]
    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    # the warm-up makes the state and the Newton-Schulz workspaces
    graph = warm_up_and_capture(model, opt, ref, ref_opt, data[:3], static_x, static_y)
    assert_params_close(model, ref, rtol=0, atol=0)  # capture records, does not run
    for i, (x, y) in enumerate(data[3:]):
        if i in (2, 4):  # a scheduler's in-place change of either group's lr is seen by the replay
            for use_muon in (True, False):
                for t in (lr[use_muon], ref_lr[use_muon]):
                    t.mul_(0.5 if use_muon == (i == 2) else 0.8)
        static_x.copy_(x), static_y.copy_(y)
        graph.replay()
        eager_step(ref, ref_opt, x, y)
        torch.cuda.synchronize()
        assert_params_close(model, ref, rtol=0, atol=0)
        for p, q in zip(model.parameters(), ref.parameters()):
            for key, v in opt.state[p].items():
                assert torch.equal(v, ref_opt.state[q][key]), key


def test_muon_capture_refuses_a_float_lr():
    """Under capture a float lr would be fixed into the graph: refused, nothing written."""
    p = torch.nn.Parameter(torch.randn(8, 5, device="cuda"))
    assert_capture_refused(fusedopt.Muon([p], lr=0.02), p, "under CUDA graph capture lr must be a CUDA tensor")
