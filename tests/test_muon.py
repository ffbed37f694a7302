"""fusedopt.Muon against torch.optim.Muon (bf16 Newton-Schulz), against an fp64
reference of the same iteration (fp32/fp64 Newton-Schulz), its AdamW groups
against torch.optim.AdamW, conv weights and memory layouts, checkpoints both
ways, muon_param_groups, and the two elementwise kernels on poisoned outputs."""
import math

import pytest
import torch

import fusedopt
from fusedopt._kernels import muon as kmuon
from fusedopt._kernels import Column, Labels, STATE, prepare
from fusedopt.functional._step import device_scalars
from optim_registry import snapshot
from reference_optim import muon_matrix_step

COEFFS = (3.4445, -4.775, 2.0315)
SHAPES = [(24, 40), (40, 24), (17, 17), (13, 29), (31, 7), (1, 19), (19, 1)]


def params_like(shapes, dtype=torch.float32, memory_format=None):
    out = []
    for s in shapes:
        t = torch.randn(s, dtype=dtype)
        if memory_format is not None:
            t = t.to(memory_format=memory_format)
        out.append(torch.nn.Parameter(t))
    return out


# bf16 Newton-Schulz: most steps give torch's update to within one bf16 rounding of each
# element (bf16_tight; most are bit-identical). Where a single intermediate element rounds
# the other way (fp32 sums in another order: batched vs single matmuls, the norm kernel),
# five quintic steps amplify that flip (the slope at 0 is a = 3.4445 per step) to about 1%
# of the update: bf16_close bounds every step by that, and the tests require most steps
# to be tight. An error in the math (lr, decay, nesterov, rounding) fails both.
def bf16_tight(actual, expected) -> bool:
    scale = float(expected.abs().max())
    return bool(((actual - expected).abs() <= 2 ** -8 * expected.abs() + 2 ** -9 * scale).all())


def bf16_close(actual, expected, what):
    scale = float(expected.abs().max())
    rel = float((actual - expected).norm() / expected.norm().clamp(min=1e-30))
    assert rel <= 2 ** -5, f"{what}: relative Frobenius difference {rel:.3g} > 2^-5"
    torch.testing.assert_close(actual, expected, rtol=0, atol=2 ** -3 * scale, msg=lambda m: f"{what}: {m}")


# ---- against torch.optim.Muon, step by step ----------------------------------------------

@pytest.fixture(autouse=True, params=["native-bf16", "emulated-bf16"])
def bf16_matmuls(request, monkeypatch):
    """Every test with both CPU bf16 paths: torch's own bf16 matmuls (where the CPU has
    bf16 units, as the development machine's AVX512_BF16) and fp32 matmuls of bf16
    values with rounded outputs (CPUs without them; fusedopt/_kernels/muon.py)."""
    if request.param == "emulated-bf16":
        monkeypatch.setenv("FUSEDOPT_MUON_EMULATE_BF16", "1")
    else:
        monkeypatch.delenv("FUSEDOPT_MUON_EMULATE_BF16", raising=False)
    return request.param


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_each_step_matches_torch_bf16(nesterov, adjust_lr_fn, weight_decay):
    ours = params_like(SHAPES)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    hyper = dict(lr=0.02, weight_decay=weight_decay, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    opt, ref = fusedopt.Muon(ours, **hyper), torch.optim.Muon(theirs, **hyper)
    tight = []
    for step in range(4):
        if step:  # each step from torch's state: every step's update is compared on its own
            with torch.no_grad():
                for p, q in zip(ours, theirs):
                    p.copy_(q)
                    opt.state[p]["momentum_buffer"].copy_(ref.state[q]["momentum_buffer"])
        before = [q.detach().clone() for q in theirs]
        for p, q in zip(ours, theirs):
            q.grad = torch.randn_like(q)
            p.grad = q.grad.clone()
        opt.step()
        ref.step()
        for i, (p, q, b) in enumerate(zip(ours, theirs, before)):
            bf16_close(p.detach() - b, q.detach() - b, f"step {step} update of {list(p.shape)}")
            tight.append(bf16_tight(p.detach() - b, q.detach() - b))
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"],
                                       rtol=1e-6, atol=1e-7)
    assert sum(tight) >= 0.6 * len(tight), f"only {sum(tight)} of {len(tight)} updates within one bf16 rounding"


@pytest.mark.parametrize("ns_steps", [0, 1, 2, 3, 5])
def test_ns_steps_parity_matches_torch(ns_steps):
    # the result lands in the rows' update buffer for even and odd step counts
    ours = params_like(SHAPES[:3])
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = fusedopt.Muon(ours, lr=0.05, ns_steps=ns_steps)
    ref = torch.optim.Muon(theirs, lr=0.05, ns_steps=ns_steps)
    before = [p.detach().clone() for p in ours]
    for p, q in zip(ours, theirs):
        q.grad = torch.randn_like(q)
        p.grad = q.grad.clone()
    opt.step()
    ref.step()
    for p, q, b in zip(ours, theirs, before):
        bf16_close(p.detach() - b, q.detach() - b, f"ns_steps={ns_steps} {list(p.shape)}")
        if ns_steps <= 1:  # nothing to amplify a flip: every element within one bf16 rounding
            assert bf16_tight(p.detach() - b, q.detach() - b), f"ns_steps={ns_steps} {list(p.shape)}"


@pytest.mark.parametrize("ns_dtype,dtype,tol", [(torch.float32, torch.float32, 1e-5),
                                                (torch.float64, torch.float64, 1e-12)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_fp32_and_fp64_newton_schulz_match_fp64_reference(ns_dtype, dtype, tol, nesterov):
    shapes = SHAPES + [(6, 3, 3, 3), (4, 5, 2)]
    params = params_like(shapes, dtype)
    with torch.no_grad():  # small params: their fp32 rounding stays far below the update's 1e-5
        for p in params:
            p.mul_(1e-3)
    hyper = dict(lr=0.03, weight_decay=0.05, momentum=0.9, nesterov=nesterov, adjust_lr_fn="match_rms_adamw")
    opt = fusedopt.Muon(params, ns_dtype=ns_dtype, **hyper)
    for step in range(3):
        olds = [(p.detach().clone(), opt.state[p]["momentum_buffer"].clone() if p in opt.state else
                 torch.zeros_like(p)) for p in params]
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        for p, (p0, b0) in zip(params, olds):
            want_p, want_b = muon_matrix_step(p0, p.grad, b0, **hyper)
            scale = float((want_p - p0.double()).abs().max())
            torch.testing.assert_close(p.detach().double() - p0.double(), want_p - p0.double(), rtol=tol,
                                       atol=tol * scale, msg=lambda m: f"step {step} {list(p.shape)}: {m}")
            torch.testing.assert_close(opt.state[p]["momentum_buffer"].double(), want_b, rtol=tol, atol=tol)


def test_functional_matches_torch_functional():
    shapes = SHAPES
    ps = [torch.randn(s) for s in shapes]
    qs = [p.clone() for p in ps]
    bufs, tbufs = [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, ns_coefficients=COEFFS, ns_steps=5,
              eps=1e-7, adjust_lr_fn=None)
    grads = [torch.randn(s) for s in shapes]
    fusedopt.functional.muon(ps, grads, bufs, **kw)
    torch.optim._muon.muon(qs, grads, tbufs, has_complex=False, **kw)
    for p, q, b, tb in zip(ps, qs, bufs, tbufs):
        bf16_close(p, q, f"{list(p.shape)}")
        torch.testing.assert_close(b, tb, rtol=1e-6, atol=1e-7)


def test_tensor_lr_and_grad_scale():
    params = params_like(SHAPES[:3])
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    a = fusedopt.Muon(params, lr=torch.tensor(0.02), ns_dtype=torch.float32)
    b = fusedopt.Muon(twins, lr=0.02, ns_dtype=torch.float32)
    a.grad_scale = torch.tensor(64.0)
    for p, q in zip(params, twins):
        q.grad = torch.randn_like(q)
        p.grad = q.grad * 64.0
    a.step()
    b.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_found_inf_skips_the_step_without_writing():
    params = params_like(SHAPES[:3])
    opt = fusedopt.Muon(params, lr=0.02)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    before = snapshot(opt)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert snapshot(opt) == before
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert snapshot(opt)["params"] != before["params"]


# ---- conv weights and memory layouts ------------------------------------------------------

@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (40, 2, 2, 2), (6, 4, 5)])
def test_conv_weight_is_the_shape0_matrix(shape):
    p = torch.nn.Parameter(torch.randn(shape))
    q = torch.nn.Parameter(p.detach().reshape(shape[0], -1).clone())
    opt, ref = fusedopt.Muon([p], lr=0.02), torch.optim.Muon([q], lr=0.02)
    for _ in range(3):
        before = q.detach().clone()
        with torch.no_grad():
            p.copy_(q.reshape(shape))
            if p in opt.state:
                opt.state[p]["momentum_buffer"].copy_(ref.state[q]["momentum_buffer"].reshape(shape))
        q.grad = torch.randn_like(q)
        p.grad = q.grad.reshape(shape).clone()
        opt.step()
        ref.step()
        bf16_close(p.detach().reshape(shape[0], -1) - before, q.detach() - before, f"conv {list(shape)}")


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_channels_last_and_transposed_give_the_contiguous_update(ns_dtype):
    # channels_last: each row's columns permuted in memory; a transposed matrix: the
    # memory holds its transpose. Newton-Schulz commutes with both.
    conv = torch.randn(8, 3, 3, 3)
    mat = torch.randn(24, 10)
    cases = [(conv, conv.to(memory_format=torch.channels_last)), (mat, mat.t().contiguous().t())]
    plain = [torch.nn.Parameter(a.clone()) for a, _ in cases]
    laid = [torch.nn.Parameter(b.clone()) for _, b in cases]
    assert laid[0].is_contiguous(memory_format=torch.channels_last) and not laid[0].is_contiguous()
    assert laid[1].stride() == (1, 24)
    a = fusedopt.Muon(plain, lr=0.05, ns_dtype=ns_dtype)
    b = fusedopt.Muon(laid, lr=0.05, ns_dtype=ns_dtype)
    tol = 1e-5 if ns_dtype is torch.float32 else 2 ** -7
    for _ in range(3):
        before = [p.detach().clone() for p in plain]
        before_laid = [q.detach().clone() for q in laid]
        for p, q in zip(plain, laid):
            p.grad = torch.randn_like(p)
            q.grad = torch.empty_like(q).copy_(p.grad)  # the grad in the param's layout
        a.step()
        b.step()
        for p, q, p0, q0 in zip(plain, laid, before, before_laid):
            # Each step's update is rounded into the param: the two updates may differ by
            # an ulp of the param on top of the Newton-Schulz tolerance.
            ulp = 2 * torch.finfo(torch.float32).eps * float(p0.abs().max())
            torch.testing.assert_close(q.detach() - q0, p.detach() - p0, rtol=tol,
                                       atol=tol * float((p.detach() - p0).abs().max()) + ulp)
            assert q.stride() == q.grad.stride()
    assert b.state[laid[0]]["momentum_buffer"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_empty_matrices_step_with_the_others(ns_dtype, seed):
    """Regression (the fuzz suite): a matrix with no columns, (4, 0) or (3, 0, 2), made the
    step raise ZeroDivisionError in the lr factor sqrt(max(1, A / B)). Empty matrices now
    step with the others, which move as they do without them."""
    gen = torch.Generator().manual_seed(seed)
    full = [torch.randn(s, generator=gen) for s in [(5, 4), (4, 9)]]
    grads = [[torch.randn(p.shape, generator=gen) for p in full] for _ in range(2)]
    with_empty = [torch.nn.Parameter(p.clone()) for p in full] + [
        torch.nn.Parameter(torch.empty(s)) for s in [(4, 0), (3, 0, 2), (0, 4)]]
    alone = [torch.nn.Parameter(p.clone()) for p in full]
    for adjust_lr_fn in (None, "match_rms_adamw"):
        opts = [fusedopt.Muon(ps, lr=0.02, ns_dtype=ns_dtype, adjust_lr_fn=adjust_lr_fn) for ps in (with_empty, alone)]
        for step_grads in grads:
            for ps, opt in zip((with_empty, alone), opts):
                for p, g in zip(ps, step_grads):
                    p.grad = g.clone()
                for p in ps[2:]:
                    p.grad = torch.empty(p.shape)
                opt.step()
    for p, q, p0 in zip(with_empty, alone, full):
        assert torch.equal(p, q) and not torch.equal(p, p0)


def test_layout_with_dim0_inside_is_refused_before_writing():
    t = torch.randn(3, 4, 5).permute(1, 0, 2)  # shape (4, 3, 5), dim 0 not outermost
    p = torch.nn.Parameter(t)
    with pytest.raises(ValueError, match=r"dim 0 is not outermost"):
        fusedopt.Muon([p])


# ---- AdamW groups, rejection, param groups -------------------------------------------------

def test_adamw_groups_match_torch_adamw():
    model = torch.nn.Sequential(torch.nn.Embedding(11, 16), torch.nn.Linear(16, 24), torch.nn.LayerNorm(24),
                                torch.nn.Linear(24, 5))
    groups = fusedopt.muon_param_groups(model, lr=0.02, adamw_lr=3e-3, adamw_betas=(0.8, 0.95), adamw_eps=1e-6,
                                        adamw_weight_decay=0.01)
    muon_params, adamw_params = groups[0]["params"], groups[1]["params"]
    twins = {id(p): torch.nn.Parameter(p.detach().clone()) for p in model.parameters()}
    opt = fusedopt.Muon(groups)
    t_muon = torch.optim.Muon([twins[id(p)] for p in muon_params], lr=0.02)
    t_adamw = torch.optim.AdamW([twins[id(p)] for p in adamw_params], lr=3e-3, betas=(0.8, 0.95), eps=1e-6,
                                weight_decay=0.01, foreach=False)
    for _ in range(4):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
            twins[id(p)].grad = p.grad.clone()
        opt.step()
        t_muon.step()
        t_adamw.step()
    for p in adamw_params:
        torch.testing.assert_close(p, twins[id(p)], rtol=1e-5, atol=1e-6)
    for p in muon_params:
        torch.testing.assert_close(p, twins[id(p)], rtol=2 ** -7, atol=2 ** -7)


@pytest.mark.parametrize("shape", [(7,), ()])
def test_vectors_and_scalars_in_a_muon_group_are_refused(shape):
    bad = torch.nn.Parameter(torch.randn(shape))
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] has shape .*use_muon=False"):
        fusedopt.Muon([torch.nn.Parameter(torch.randn(3, 4)), bad])
    # added after a good step: refused at the step, nothing written
    params = params_like([(3, 4), (5, 2)])
    opt = fusedopt.Muon(params, lr=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    bad.grad = torch.randn_like(bad)
    opt.param_groups[0]["params"].append(bad)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"\['params'\]\[2\] has shape .*use_muon=False"):
        opt.step()
    assert snapshot(opt) == before
    # the same param in an AdamW group is fine
    opt.param_groups[0]["params"].pop()
    opt.add_param_group({"params": [bad], "use_muon": False, "lr": 1e-3})
    opt.step()
    assert "exp_avg" in opt.state[bad]


def test_muon_param_groups_split():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(20, 8)
            self.conv = torch.nn.Conv1d(8, 8, 3)
            self.hidden = torch.nn.Linear(8, 8)
            self.norm = torch.nn.LayerNorm(8)
            self.head = torch.nn.Linear(8, 20, bias=False)
            self.frozen = torch.nn.Linear(8, 8)
            self.frozen.requires_grad_(False)

    net = Net()
    groups = fusedopt.muon_param_groups(net, lr=0.02, weight_decay=0.05)
    assert groups[0]["param_names"] == ["conv.weight", "hidden.weight"] and groups[0]["use_muon"]
    assert groups[0]["lr"] == 0.02 and groups[0]["weight_decay"] == 0.05
    assert sorted(groups[1]["param_names"]) == sorted(["embed.weight", "conv.bias", "hidden.bias", "norm.weight",
                                                       "norm.bias", "head.weight"])
    assert not groups[1]["use_muon"]
    named = fusedopt.muon_param_groups(net, head="hidden")  # the user names the head
    assert named[0]["param_names"] == ["conv.weight", "head.weight"]
    net.head.weight = net.embed.weight  # tied: once, in the AdamW group
    tied = fusedopt.muon_param_groups(net, head="hidden")
    assert tied[0]["param_names"] == ["conv.weight"]
    assert tied[1]["param_names"].count("embed.weight") == 1
    with pytest.raises(ValueError, match="names no module or parameter"):
        fusedopt.muon_param_groups(net, head="nope")
    opt = fusedopt.Muon(fusedopt.muon_param_groups(net))
    x = torch.randint(0, 20, (2, 6))
    h = net.embed(x).transpose(1, 2)
    loss = net.head(net.norm(net.hidden(net.conv(h).transpose(1, 2)))).square().mean()
    loss.backward()
    opt.step()


# ---- checkpoints ---------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["torch_to_fusedopt", "fusedopt_to_torch"])
def test_state_dict_both_ways(direction):
    shapes = SHAPES[:4]
    src_params = params_like(shapes)
    dst_params = [torch.nn.Parameter(p.detach().clone()) for p in src_params]
    cont_params = [torch.nn.Parameter(p.detach().clone()) for p in src_params]
    src_cls, dst_cls = ((torch.optim.Muon, fusedopt.Muon) if direction == "torch_to_fusedopt"
                        else (fusedopt.Muon, torch.optim.Muon))
    src = src_cls(src_params, lr=0.03, momentum=0.9)
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    for k in range(2):
        for p, g in zip(src_params, grads[k]):
            p.grad = g.clone()
        src.step()
    sd = src.state_dict()
    with torch.no_grad():
        for d, c, p in zip(dst_params, cont_params, src_params):
            d.copy_(p)
            c.copy_(p)
    dst = dst_cls(dst_params, lr=0.5)  # its lr is replaced by the checkpoint's
    dst.load_state_dict(sd)
    if dst_cls is fusedopt.Muon:  # a torch group lacks fusedopt's keys: defaults
        assert dst.param_groups[0]["ns_dtype"] is torch.bfloat16 and dst.param_groups[0]["use_muon"] is True
    src_cont = src_cls(cont_params, lr=0.03)
    src_cont.load_state_dict(sd)
    for k in range(2, 4):
        for p, c, g in zip(dst_params, cont_params, grads[k]):
            p.grad = g.clone()
            c.grad = g.clone()
        dst.step()
        src_cont.step()
    for p, c in zip(dst_params, cont_params):
        torch.testing.assert_close(p, c, rtol=2 ** -7, atol=2 ** -7 * 0.03)
        torch.testing.assert_close(dst.state[p]["momentum_buffer"], src_cont.state[c]["momentum_buffer"],
                                   rtol=1e-6, atol=1e-7)


# ---- the kernels, outputs poisoned ----------------------------------------------------------

@pytest.mark.parametrize("dtype,ns_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                            (torch.float64, torch.float64), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_and_apply_kernels_on_poisoned_outputs(dtype, ns_dtype, nesterov):
    shapes = [(5, 7), (7, 5), (5, 7), (3, 2, 2), (1, 33)]
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, dtype=dtype) for s in shapes]
    bufs = [torch.randn(s, dtype=torch.float64 if dtype is torch.float64 else torch.float32) for s in shapes]
    plan = prepare(kmuon.MUON, params, grads, [Column("momentum_buffer", "bufs", STATE, bufs)], labels=Labels())
    (batch,) = plan.batches
    ws = kmuon.workspace(batch.table, ns_dtype, "match_rms_adamw")
    for g in ws.groups:
        g.a.fill_(float("nan"))
    scalars = device_scalars(plan, 0.1, torch.tensor(2.0), None)[torch.device("cpu")]
    mu = 0.8
    bufs0 = [b.clone() for b in bufs]
    kmuon.launch_momentum(batch.table, batch.state_dtype, scalars, ws, mu, nesterov)
    compute = torch.float64 if dtype is torch.float64 else torch.float32
    slots = {}
    for g in ws.groups:
        for k, r in enumerate(g.rows):
            slots[r] = g.a[k]
    for i, (g, b0) in enumerate(zip(grads, bufs0)):
        gd = g.to(compute) / 2.0
        want_b = b0 + (1 - mu) * (gd - b0)
        want_u = gd + mu * (want_b - gd) if nesterov else want_b
        tol = 1e-12 if compute is torch.float64 else 1e-6
        torch.testing.assert_close(bufs[i].to(compute), want_b, rtol=tol, atol=tol)
        if ns_dtype is torch.bfloat16:
            # bf16 values, in an fp32 workspace (emulated bf16 matmuls) or a bf16 one (native),
            # rounded once, as torch's grad.bfloat16(). The fp32 update may differ from this
            # reference by an fp32 rounding (fused multiply-adds), which can move a value that lies
            # on a bf16 rounding midpoint to the other neighbour: so compare with the exact update
            # at half a bf16 ulp plus that fp32 error, and check the values are bf16.
            got = slots[i].reshape(g.shape).double()
            assert torch.equal(got, got.bfloat16().double()), "workspace values are not bf16 values"
            exact = g.double() / 2.0
            exact_b = b0.double() + (1 - mu) * (exact - b0.double())
            exact_u = exact + mu * (exact_b - exact) if nesterov else exact_b
            half_ulp = torch.exp2(torch.floor(torch.log2(exact_u.abs())) - 8)  # bf16: 8 significant bits
            bound = half_ulp + 4e-7 * float(exact_u.abs().max())
            err = (got - exact_u).abs()
            assert bool((err <= bound).all()), f"param {i}: bf16 update off by {float((err - bound).max())} past bound"
        else:
            torch.testing.assert_close(slots[i].reshape(g.shape).to(compute), want_u.to(slots[i].dtype).to(compute),
                                       rtol=tol, atol=tol)
    # apply: p <- p (1 - lr wd) - lr ratio U, U = whatever the workspace holds
    for g in ws.groups:
        g.a.copy_(torch.randn_like(g.a))
    before = [p.clone() for p in params]
    kmuon.launch_apply(batch.table, batch.state_dtype, scalars, ws, 0.05)
    for i, (p, p0) in enumerate(zip(params, before)):
        a, b = kmuon.logical_matrix(p.shape)
        ratio = 0.2 * math.sqrt(max(a, b))
        want = p0.double() * (1 - 0.1 * 0.05) - 0.1 * ratio * slots[i].reshape(p.shape).double()
        tol = 1e-12 if dtype is torch.float64 else (1e-6 if dtype is torch.float32 else 1e-2)
        torch.testing.assert_close(p.double(), want, rtol=tol, atol=tol)


def test_emulated_bf16_matmul_equals_torch_bf16_matmul_to_rounding():
    # the CPU path of ns_dtype=bfloat16: fp32 matmuls of bf16 values, outputs rounded
    # to bf16, against torch's own bf16 addmm
    x = torch.randn(32, 96).bfloat16()
    gram = (x.float() @ x.float().T).bfloat16()
    torch.testing.assert_close(gram, x @ x.T, rtol=2 ** -8, atol=1e-2)
    upd = torch.baddbmm(gram.float()[None], gram.float()[None], gram.float()[None], beta=-4.775, alpha=2.0315)
    want = torch.addmm(gram, gram, gram, beta=-4.775, alpha=2.0315)
    torch.testing.assert_close(upd[0].bfloat16(), want, rtol=2 ** -7, atol=2 ** -7 * float(want.abs().max()))


# Shapes whose single matmuls gave other bits at 2-4 torch threads than at one (torch 2.13,
# MKL 2024.2; fewer matrices of a shape than threads): one matrix of a shape, and pairs.
THREAD_SENSITIVE = [(17, 17), (31, 31), (33, 65), (24, 40), (40, 24), (7, 300), (7, 300), (300, 7), (300, 7)]


@pytest.mark.parametrize("ns_dtype,dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                            (torch.bfloat16, torch.float32)])
def test_deterministic_across_thread_counts(ns_dtype, dtype, seed):
    """Regression: torch's CPU bmm of a batch with fewer matrices than threads depends on
    the thread count; fusedopt caps a shape's matmul threads at its matrix count, so the
    bits are the same for any count of fusedopt's and torch's threads, which it restores."""
    torch_threads, own_threads = torch.get_num_threads(), fusedopt.get_num_threads()
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES + THREAD_SENSITIVE]
    grads = [[torch.randn(p.shape, generator=gen, dtype=dtype) for p in init] for _ in range(3)]
    results = []
    try:
        for threads in (1, 2, 3, 4, 1):
            fusedopt.set_num_threads(threads)
            torch.set_num_threads(threads)
            params = [torch.nn.Parameter(p.clone()) for p in init]
            opt = fusedopt.Muon(params, lr=0.02, ns_dtype=ns_dtype)
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = g.clone()
                opt.step()
            assert torch.get_num_threads() == threads, "the step left torch's thread count changed"
            results.append([p.detach().clone() for p in params])
    finally:
        fusedopt.set_num_threads(own_threads)
        torch.set_num_threads(torch_threads)
    for threads, result in zip((2, 3, 4, 1), results[1:]):
        for i, (a, b) in enumerate(zip(results[0], result)):
            assert torch.equal(a, b), f"{list(a.shape)} (param {i}): {threads} threads changed the bits"
    assert not torch.equal(results[0][0], init[0])


def test_bad_hyperparameters_are_refused():
    p = [torch.nn.Parameter(torch.randn(3, 4))]
    for kw, exc, match in [({"ns_steps": 100}, ValueError, "ns_steps"), ({"ns_steps": 2.0}, TypeError, "ns_steps"),
                           ({"adjust_lr_fn": "bogus"}, ValueError, "adjust_lr_fn"),
                           ({"ns_coefficients": (1.0, 2.0)}, ValueError, "ns_coefficients"),
                           ({"ns_dtype": torch.float16}, ValueError, "ns_dtype"),
                           ({"eps": 0.0}, ValueError, "eps"), ({"momentum": -0.1}, ValueError, "momentum"),
                           ({"lr": -1.0}, ValueError, "lr"), ({"nesterov": 1}, TypeError, "nesterov")]:
        with pytest.raises(exc, match=match):
            fusedopt.Muon(p, **kw)


def test_round_to_bf16_inplace_equals_torch_conversion(seed):
    """The rounding behind the CPU's bf16 Newton-Schulz: torch's fp32 -> bf16 -> fp32 bit
    for bit on random values across several chunks, ties, tiny and huge values, inf and NaN."""
    from fusedopt._kernels.muon import round_bf16_
    gen = torch.Generator().manual_seed(seed)
    n = 3 * 32768 + 123
    x = torch.randn(n, generator=gen) * torch.logspace(-40, 38, n).float()[torch.randperm(n, generator=gen)]
    ties = torch.arange(1000, dtype=torch.int32).bitwise_left_shift(16).bitwise_or(0x8000).view(torch.float32)
    x[:1000] = ties  # exactly halfway between two bf16 values: ties to even
    x[1000:1004] = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0])
    want = x.to(torch.bfloat16).float()
    got = x.clone()
    round_bf16_(got)
    finite = ~torch.isnan(want)
    assert torch.equal(got[finite].view(torch.int32), want[finite].view(torch.int32))  # bits: -0.0 too
    assert torch.isnan(got[1002]) and int(finite.logical_not().sum()) == 1
    with pytest.raises(ValueError, match="contiguous float32 CPU tensor"):
        round_bf16_(torch.ones(4, dtype=torch.float64))


# ---- CUDA graph capture, emulated on CPU ----------------------------------------------
# Under capture a graph replays the step with the workspace it was captured with: that
# workspace must outlive any later rebuild, and nothing new may be made inside capture.
# fusedopt.functional.muon asks ``capturing(plan)``; here it answers True on CPU.

def emulate_capture(monkeypatch, on: bool):
    import sys
    fmuon = sys.modules["fusedopt.functional.muon"]  # the module (fusedopt.functional.muon is the function)
    monkeypatch.setattr(fmuon, "capturing", lambda plan: on)


def muon_and_adamw(seed):
    gen = torch.Generator().manual_seed(seed)
    mats = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(6, 4), (5, 8), (4, 3, 2)]]
    vecs = [torch.nn.Parameter(torch.randn(7, generator=gen))]
    opt = fusedopt.Muon([{"params": mats}, {"params": vecs, "use_muon": False}], lr=0.02, ns_dtype=torch.float32)
    return opt, mats + vecs


def new_grads(params):
    for p in params:
        p.grad = torch.randn_like(p)


@pytest.mark.parametrize("rebuild", ["grad_disappears", "ns_dtype_changes"])
def test_workspace_a_capture_used_outlives_rebuilds(rebuild, monkeypatch, seed):
    import gc
    import weakref
    for captured in (False, True):
        opt, params = muon_and_adamw(seed)
        new_grads(params)
        opt.step()
        plan = opt._plans[0]
        ws = weakref.ref(kmuon._WORKSPACES[plan.batches[0].table])
        emulate_capture(monkeypatch, captured)
        new_grads(params)
        opt.step()  # the "captured" step uses the workspace
        emulate_capture(monkeypatch, False)
        new_grads(params)
        if rebuild == "grad_disappears":
            params[1].grad = None  # another set of params with grads: new row tables
        else:
            opt.param_groups[0]["ns_dtype"] = torch.float64  # same table, a new workspace
        opt.step()
        gc.collect()
        assert kmuon._WORKSPACES.get(plan.batches[0].table) is not ws()
        assert (ws() is not None) == captured, "a captured workspace was freed, or an uncaptured one kept"
        assert any(r is ws() for r in plan.retired) == captured


@pytest.mark.parametrize("change", ["ns_dtype", "adjust_lr_fn", "grad_disappears"])
def test_new_workspace_inside_capture_is_refused_before_writing(change, monkeypatch, seed):
    opt, params = muon_and_adamw(seed)
    new_grads(params)
    opt.step()
    new_grads(params)
    if change == "ns_dtype":
        opt.param_groups[0]["ns_dtype"] = torch.bfloat16
    elif change == "adjust_lr_fn":
        opt.param_groups[0]["adjust_lr_fn"] = "match_rms_adamw"  # its lr factors are not made yet
    else:
        params[0].grad = None
    emulate_capture(monkeypatch, True)
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match="cannot be made inside CUDA graph capture.*eager step"):
        opt.step()
    assert snapshot(opt) == before, "a refused step changed params, grads or state"
    emulate_capture(monkeypatch, False)
    opt.step()  # eagerly it is made; a capture after that reuses it
    emulate_capture(monkeypatch, True)
    new_grads([p for p in params if p.grad is not None])
    opt.step()
