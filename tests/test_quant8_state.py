"""8-bit states in checkpoints and under AMP: save and load continue bit for bit;
torch.optim checkpoints load (quantized) and fusedopt.dequantized_state_dict
gives torch.optim's layout back; GradScaler steps match the 8-bit reference
(tests/reference_quant8.py) bit for bit, skipped steps write nothing."""
import copy

import pytest
import torch

import fusedopt
from fusedopt._kernels import quant8
from helpers import snapshot, tiny_model, twin
import reference_quant8
from reference_quant8 import RefAdamW8bit, RefSGD8bit, dequantize, quantize

CASES = {
    "AdamW": (lambda ps, **kw: fusedopt.AdamW(ps, lr=1e-2, state_dtype=torch.int8, **kw), torch.optim.AdamW,
              (("exp_avg", True), ("exp_avg_sq", False))),
    "SGD": (lambda ps, **kw: fusedopt.SGD(ps, lr=0.05, momentum=0.9, state_dtype=torch.int8, **kw),
            lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), (("momentum_buffer", True),)),
}


def _train(model, opt, steps, gen):
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _states_equal(a, b, pa, pb):
    for p, q in zip(pa, pb):
        assert set(a.state[p]) == set(b.state[q])
        for k, v in a.state[p].items():
            assert torch.equal(v, b.state[q][k]), k


@pytest.mark.parametrize("name", list(CASES))
def test_save_and_load_continue_bit_identically(name, seed):
    make, _, keys = CASES[name]
    model = tiny_model()
    opt = make(model.parameters())
    _train(model, opt, 3, torch.Generator().manual_seed(seed))
    sd = copy.deepcopy(opt.state_dict())
    st = sd["state"][0]
    assert st[keys[0][0]].dtype is torch.int8 and st["absmax"].dtype is torch.float32
    assert st["absmax"].shape == (len(keys), quant8.num_blocks(next(model.parameters()).numel()))
    other = twin(model)
    loaded = make(other.parameters())
    loaded.load_state_dict(sd)
    _states_equal(opt, loaded, list(model.parameters()), list(other.parameters()))
    _train(model, opt, 3, torch.Generator().manual_seed(seed + 1))
    _train(other, loaded, 3, torch.Generator().manual_seed(seed + 1))
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)
    _states_equal(opt, loaded, list(model.parameters()), list(other.parameters()))


@pytest.mark.parametrize("name", list(CASES))
def test_torch_checkpoint_loads_quantized_and_dequantized_goes_back(name, seed):
    make, torch_make, keys = CASES[name]
    model = tiny_model()
    ref = torch_make(model.parameters())
    _train(model, ref, 3, torch.Generator().manual_seed(seed))
    other = twin(model)
    opt = make(other.parameters())
    opt.load_state_dict(ref.state_dict())
    for p, q in zip(model.parameters(), other.parameters()):
        rows = []
        for key, signed in keys:
            codes, absmax = quantize(ref.state[p][key].reshape(-1), signed)
            assert torch.equal(opt.state[q][key].reshape(-1), codes), key
            rows.append(absmax)
        assert torch.equal(opt.state[q]["absmax"], torch.stack(rows))
    # and back: torch.optim loads the dequantized checkpoint
    sd = fusedopt.dequantized_state_dict(opt)
    assert all("state_dtype" not in g for g in sd["param_groups"])
    back = torch_make(twin(model).parameters())
    back.load_state_dict(sd)
    for q, st in zip(other.parameters(), back.state.values()):
        for row, (key, signed) in enumerate(keys):
            want = dequantize(opt.state[q][key].reshape(-1), opt.state[q]["absmax"][row], signed)
            assert st[key].dtype is torch.float32 and torch.equal(st[key].reshape(-1), want), key
        assert "absmax" not in st
    # a fusedopt int8 optimizer loads it again, quantized anew
    again = make(twin(model).parameters())
    again.load_state_dict(sd)
    assert next(iter(again.state.values()))[keys[0][0]].dtype is torch.int8


def test_loading_codes_without_their_scales_is_refused(seed):
    model = tiny_model()
    opt = fusedopt.AdamW(model.parameters(), state_dtype=torch.int8)
    _train(model, opt, 1, torch.Generator().manual_seed(seed))
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][0]["absmax"]
    target = fusedopt.AdamW(twin(model).parameters(), state_dtype=torch.int8)
    with pytest.raises(ValueError, match="holds 8-bit codes but its 'absmax'"):
        target.load_state_dict(sd)
    assert not target.state


FP32 = {"AdamW": lambda ps: fusedopt.AdamW(ps, lr=1e-2), "SGD": lambda ps: fusedopt.SGD(ps, lr=0.05, momentum=0.9)}
LEGACY_SIGNED = reference_quant8._table(4, 3)  # fusedopt's first signed code: sign + e4m3


def _legacy_quantize(values):
    """(codes, absmax) of fp32 values in the first format (written from its definition)."""
    absmax = reference_quant8.block_absmax(values)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    x = values.reshape(-1) * reference_quant8._per_element(inv, values.reshape(-1))
    mag = reference_quant8._nearest(LEGACY_SIGNED, x.abs())
    return ((x < 0).to(torch.int64) * 128 + mag).to(torch.uint8).view(torch.int8).view(values.shape), absmax


def _legacy_dequantize(codes, absmax):
    c = codes.reshape(-1).view(torch.uint8).to(torch.int64)
    v = LEGACY_SIGNED[c % 128].float()
    v = torch.where(c >= 128, -v, v)
    return (v * reference_quant8._per_element(absmax, v)).view(codes.shape)


@pytest.mark.parametrize("name", list(CASES))
def test_checkpoint_in_the_first_code_format_loads(name, seed):
    """A checkpoint of fusedopt's first 8-bit format (signed codes sign + e4m3; its param
    groups do not name a format) loads: an int8 optimizer gets the values requantized in
    today's code, fp32 state gets the values themselves; unsigned codes (unchanged
    format) stay bit for bit. An unknown format is refused with nothing written."""
    make, torch_make, keys = CASES[name]
    model = tiny_model()
    opt = make(model.parameters())
    _train(model, opt, 3, torch.Generator().manual_seed(seed))
    sd = copy.deepcopy(opt.state_dict())
    assert all(g[quant8.CODES_FORMAT_KEY] == quant8.CODES_FORMAT for g in sd["param_groups"])
    old = copy.deepcopy(sd)
    for g in old["param_groups"]:
        del g[quant8.CODES_FORMAT_KEY]
    values = {}
    for pid, st in old["state"].items():
        fp32 = fusedopt.dequantized_state_dict(opt)["state"][pid]
        for row, (key, signed) in enumerate(keys):
            if signed:
                codes, absmax = _legacy_quantize(fp32[key])
                st[key], st["absmax"][row] = codes, absmax
                values[pid, key] = _legacy_dequantize(codes, absmax)
                assert not torch.equal(codes, sd["state"][pid][key])  # the formats differ
    fresh = make(twin(model).parameters())
    fresh.load_state_dict(old)
    assert all(quant8.CODES_FORMAT_KEY not in g for g in fresh.param_groups)
    for pid, q in enumerate(fresh.param_groups[0]["params"]):
        for row, (key, signed) in enumerate(keys):
            if signed:
                codes, absmax = quantize(values[pid, key].reshape(-1), True)
                assert torch.equal(fresh.state[q][key].reshape(-1), codes), key
                assert torch.equal(fresh.state[q]["absmax"][row], absmax), key
            else:
                assert torch.equal(fresh.state[q][key], old["state"][pid][key]), key
                assert torch.equal(fresh.state[q]["absmax"][row], old["state"][pid]["absmax"][row]), key
    # into fp32 state (a group without state_dtype): the values themselves
    plain = FP32[name](twin(model).parameters())
    as_fp32 = copy.deepcopy(old)
    for g in as_fp32["param_groups"]:
        del g["state_dtype"]
    plain.load_state_dict(as_fp32)
    for pid, q in enumerate(plain.param_groups[0]["params"]):
        for row, (key, signed) in enumerate(keys):
            want = values[pid, key] if signed else dequantize(
                old["state"][pid][key].reshape(-1), old["state"][pid]["absmax"][row], False).view(q.shape)
            assert plain.state[q][key].dtype is torch.float32 and torch.equal(plain.state[q][key], want), key
    # an unknown format: refused, naming the key, with nothing written
    bad = copy.deepcopy(sd)
    bad["param_groups"][0][quant8.CODES_FORMAT_KEY] = "signed e2m5"
    target = make(twin(model).parameters())
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in target.param_groups])
    with pytest.raises(ValueError, match=quant8.CODES_FORMAT_KEY):
        target.load_state_dict(bad)
    assert not target.state
    assert groups == [{k: v for k, v in g.items() if k != "params"} for g in target.param_groups]


@pytest.mark.parametrize("name,ref_cls", [("AdamW", RefAdamW8bit), ("SGD", RefSGD8bit)])
def test_grad_scaler_steps_match_the_8bit_reference(name, ref_cls, seed):
    make, _, _ = CASES[name]
    model = tiny_model()
    ref = twin(model)
    opt = make(model.parameters())
    hyper = dict(lr=1e-2) if name == "AdamW" else dict(lr=0.05, momentum=0.9)
    ref_opt = ref_cls(ref.parameters(), **hyper)
    # power-of-two scales: unscaling is exact, whether divided (fusedopt) or multiplied (torch)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2) for _ in range(2)]
    gen = torch.Generator().manual_seed(seed)
    for poison in [None, float("inf"), None, float("nan"), None]:
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)
        for m, o, s in ((model, opt, scalers[0]), (ref, ref_opt, scalers[1])):
            o.zero_grad()
            s.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
            if poison is not None:
                next(m.parameters()).grad.view(-1)[3] = poison
        before = snapshot(model.parameters(), opt)
        for o, s in ((opt, scalers[0]), (ref_opt, scalers[1])):
            s.step(o)
            s.update()
        if poison is not None:  # skipped: params and state untouched, bit for bit
            after = snapshot(model.parameters(), opt)
            assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
            for i, st in before[1].items():
                assert all(torch.equal(v, after[1][i][k]) for k, v in st.items() if torch.is_tensor(v))
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p, q)
