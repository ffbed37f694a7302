"""8-bit optimizer states under FSDP2 (fully_shard on 2 gloo CPU ranks).

The blocks of a sharded param are those of each rank's local shard
(fusedopt/_kernels/quant8.py), so on every rank the sharded step must equal,
bit for bit, the same optimizer stepping that rank's local shards as plain
tensors with the same grads: params, codes and block scales. The model has
params whose dim 0 does not split evenly (one rank holds fewer rows) and a
param of many blocks with a short last one. Checkpoints: opt.state_dict()
round trip, torch.distributed.checkpoint (DCP) save and load, the fp32 form of
fusedopt.dequantized_state_dict, and an fp32 checkpoint loaded into 8-bit state.
Each rank checks its own shards; a mismatch on either rank fails the test."""
import copy
import os

import pytest
import torch
import torch.distributed as dist

import fusedopt
from fusedopt._kernels import quant8
from test_distributed import WORLD, fsdp_wrap, spawn_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")

STEPS = 3
CASES = {
    "AdamW": lambda ps: fusedopt.AdamW(ps, lr=1e-2, weight_decay=1e-2, state_dtype=torch.int8),
    "Adam-amsgrad": lambda ps: fusedopt.Adam(ps, lr=1e-2, amsgrad=True, state_dtype=torch.int8),
    "SGD-nesterov": lambda ps: fusedopt.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, state_dtype=torch.int8),
    # Norm-scaled: their norms cover the whole tensor (all-reduced over the shards), so
    # they are not their local shards stepped alone; the checkpoint checks still hold.
    "LAMB": lambda ps: fusedopt.LAMB(ps, lr=1e-2, weight_decay=1e-2, state_dtype=torch.int8),
    "LARS": lambda ps: fusedopt.LARS(ps, lr=0.1, momentum=0.9, weight_decay=1e-2, state_dtype=torch.int8),
}
NORM_SCALED = {"LAMB", "LARS"}


def make_model(seed):
    torch.manual_seed(seed)
    # dims 0 of 7 and 5 split 4 + 3 and 3 + 2 rows; 300 x 40 is 23 blocks and a short one per shard
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 40), torch.nn.Tanh(),
                               torch.nn.Linear(40, 300), torch.nn.Tanh(), torch.nn.Linear(300, 5))


def batches(seed):
    g = torch.Generator().manual_seed(seed + 1)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)) for _ in range(STEPS + 1)]


def backward(model, rank, x, y):
    xs, ys = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
    torch.nn.functional.mse_loss(model(xs), ys).backward()


def local_state(opt, p):
    """p's state on this rank: codes as local tensors, block scales as [k, blocks]."""
    out = {}
    for k, v in opt.state[p].items():
        if k == "absmax":
            out[k] = quant8.local_absmax_rows(v, p)
        elif isinstance(v, torch.Tensor) and v.dim() > 0:
            out[k] = v.to_local()
        else:
            out[k] = v
    return out


def assert_same_state(a: dict, b: dict, where: str):
    assert a.keys() == b.keys(), (where, a.keys(), b.keys())
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), (where, k)


def check_rank(rank, name, seed, ckpt_dir):
    from torch.distributed.tensor import DTensor
    model = fsdp_wrap(make_model(seed))
    params = list(model.parameters())
    opt = CASES[name](params)
    twins = [p.to_local().detach().clone() for p in params]
    twin_opt = CASES[name](twins)
    data = batches(seed)
    for step, (x, y) in enumerate(data[:STEPS]):
        opt.zero_grad()
        backward(model, rank, x, y)
        for p, t in zip(params, twins):
            t.grad = p.grad.to_local().clone()
        opt.step()
        twin_opt.step()
        if name in NORM_SCALED:
            continue
        for i, (p, t) in enumerate(zip(params, twins)):
            assert torch.equal(p.to_local(), t), (name, step, i)
            assert_same_state(local_state(opt, p), dict(twin_opt.state[t]), f"{name} step {step} param {i}")
    for p in params:
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                assert isinstance(v, DTensor), (k, type(v))
    assert any(quant8.num_blocks(p.to_local().numel()) > 1 for p in params)
    assert any(p.shape[0] % WORLD for p in params)

    # opt.state_dict() round trip: a fresh optimizer continues bit-identically.
    x, y = data[STEPS]
    opt.zero_grad()
    backward(model, rank, x, y)
    before = [p.to_local().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    opt.step()
    after = [p.to_local().clone() for p in params]
    with torch.no_grad():
        for p, b in zip(params, before):
            p.to_local().copy_(b)
    fresh = CASES[name](params)
    fresh.load_state_dict(saved)
    fresh.step()
    for i, (p, a) in enumerate(zip(params, after)):
        assert torch.equal(p.to_local(), a), (name, "state_dict round trip", i)
        assert_same_state(local_state(fresh, p), local_state(opt, p), f"{name} round trip param {i}")

    # DCP: save the sharded state, load it into an optimizer that has none yet.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt_dir)
    opt.zero_grad(set_to_none=True)  # as when resuming: DCP makes the new state by a step with lr 0
    loaded_opt = CASES[name](params)
    target = {"optim": get_optimizer_state_dict(model, loaded_opt)}
    dcp.load(target, checkpoint_id=ckpt_dir)
    set_optimizer_state_dict(model, loaded_opt, target["optim"])
    for i, p in enumerate(params):
        assert_same_state(local_state(loaded_opt, p), local_state(opt, p), f"{name} DCP param {i}")

    # The fp32 form: DTensors of the decoded values, which an fp32 optimizer loads;
    # and an fp32 checkpoint loaded into 8-bit state is quantized shard by shard.
    fp32 = fusedopt.dequantized_state_dict(opt)
    for i, p in enumerate(params):
        st, codes = fp32["state"][i], local_state(opt, p)
        assert "absmax" not in st
        for row, (k, signed) in enumerate(opt._quantized_states):
            if k not in codes:
                continue
            assert isinstance(st[k], DTensor) and st[k].dtype is torch.float32, k
            want = quant8.dequantize(codes[k], codes["absmax"][row], signed)
            assert torch.equal(st[k].to_local(), want), (name, k, i)
    requantized = CASES[name](params)
    requantized.load_state_dict(fp32)
    for i, p in enumerate(params):
        st = local_state(requantized, p)
        for row, (k, signed) in enumerate(requantized._quantized_states):
            if k not in st:
                continue
            codes, absmax = quant8.quantize(fp32["state"][i][k].to_local(), p.to_local(), signed)
            assert torch.equal(st[k], codes) and torch.equal(st["absmax"][row], absmax), (name, k, i)

    # A checkpoint in the first 8-bit format (its groups name none; the codes read as if
    # written in it): signed codes decoded with that format's table shard by shard and
    # quantized again in today's, unsigned codes and their scales kept as saved.
    legacy = copy.deepcopy(saved)
    for g in legacy["param_groups"]:
        del g[quant8.CODES_FORMAT_KEY]
    old_format = CASES[name](params)
    old_format.load_state_dict(legacy)
    for i, p in enumerate(params):
        st, was = local_state(old_format, p), saved["state"][i]
        scales = quant8.local_absmax_rows(was["absmax"], p)
        for row, (k, signed) in enumerate(old_format._quantized_states):
            if k not in st:
                continue
            codes = was[k].to_local()
            if signed:
                values = quant8.dequantize_legacy_signed(codes, scales[row])
                codes, absmax = quant8.quantize(values, p.to_local(), True)
            else:
                absmax = scales[row]
            assert torch.equal(st[k], codes) and torch.equal(st["absmax"][row], absmax), (name, "legacy", k, i)
    return {"checked": name}


def check_all(rank, seed, root):
    return [check_rank(rank, name, seed, os.path.join(root, name)) for name in CASES]


def test_fsdp2_8bit_state_equals_stepping_the_local_shards(module_seed, tmp_path):
    got = spawn_ranks(check_all, module_seed, str(tmp_path))
    assert [g["checked"] for g in got] == list(CASES)
