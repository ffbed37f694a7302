"""Optimizer state: dicts that count their changes, and checkpoint loading.

``TrackedState`` tells its optimizer when an entry is replaced, so the cached
lists of state tensors are rebuilt only then. ``load_state_dict`` checks and
converts everything of a checkpoint before it commits anything.
"""
from __future__ import annotations

from typing import Any, List

import torch

from .._dtensor import is_dtensor, local_tensor
from .._kernels import quant8
from .._kernels.checks import check_rounding_words

# The param-group key of a group's stochastic-rounding words (seed, step, stream;
# base.py FusedOptimizer._new_rounding_state), saved and loaded with the groups.
ROUNDING_STATE = "rounding_state"


class TrackedState(dict):
    """A param's state dict that tells its optimizer when an entry is replaced."""

    __slots__ = ("_epoch",)

    def __init__(self, epoch: List[int], *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._epoch = epoch

    def _touch(self) -> None:
        self._epoch[0] += 1

    def __setitem__(self, k, v):
        self._touch()
        super().__setitem__(k, v)

    def __delitem__(self, k):
        self._touch()
        super().__delitem__(k)

    def _mutating(name):  # noqa: N805 - builds the wrappers below
        def method(self, *args, **kwargs):
            self._touch()
            return getattr(dict, name)(self, *args, **kwargs)

        method.__name__ = name
        return method

    update = _mutating("update")
    pop = _mutating("pop")
    popitem = _mutating("popitem")
    clear = _mutating("clear")
    setdefault = _mutating("setdefault")
    del _mutating

    def __reduce__(self):  # pickles (and deep-copies) as a plain dict
        return (dict, (dict(self),))


def load_state_dict(opt, state_dict: dict) -> None:
    """Loads a fusedopt or torch.optim checkpoint of the same optimizer into ``opt``.

    Everything is checked and converted first (state tensors are copied to the
    param's device and state dtype); on any error ``opt`` is left exactly as it was.
    """
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("state_dict must be a dict with 'state' and 'param_groups'")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups; "
                         f"this optimizer has {len(opt.param_groups)}")
    if not isinstance(state_dict["state"], dict):
        raise ValueError("state_dict['state'] must be a dict mapping parameter ids to state dicts")
    id_map = {}
    for gi, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
            raise ValueError(f"loaded param_groups[{gi}] must be a dict with a 'params' list")
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(f"loaded param_groups[{gi}] has {len(saved['params'])} params; "
                             f"this optimizer's has {len(group['params'])}")
        for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
            id_map[pid] = (p, gi, i)
    new_groups, legacy_codes = [], []
    for gi, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        legacy_codes.append(_saved_codes_format(saved, gi) == quant8.LEGACY_FORMAT)
        ng = {k: v for k, v in saved.items() if k not in ("params", quant8.CODES_FORMAT_KEY)}
        for k in ("foreach", "fused", "differentiable"):
            ng.pop(k, None)
        for k, v in opt.defaults.items():
            ng.setdefault(k, v)
        ng["params"] = group["params"]
        if "param_names" in group:
            ng["param_names"] = group["param_names"]
        _load_rounding_state(opt, ng, gi)
        opt._check_group(ng, gi)
        opt._ensure_rounding_state(ng, gi)  # a checkpoint without one (older fusedopt, torch.optim): step 0
        new_groups.append(ng)
    new_state = {}
    for pid, saved_st in state_dict["state"].items():
        if pid not in id_map:
            raise ValueError(f"loaded state refers to parameter id {pid!r}, which no param group lists")
        p, gi, i = id_map[pid]
        group = new_groups[gi]
        name = opt._param_label(group, gi, i)
        if not isinstance(saved_st, dict):
            raise ValueError(f"loaded state of {name} must be a dict; got {type(saved_st).__name__}")
        saved_st = dict(saved_st)
        if legacy_codes[gi]:
            saved_st = _legacy_codes_as_values(opt, saved_st, name)
        st = convert_loaded_state(opt, group, p, saved_st, name)
        if st:
            opt._check_state(group, local_tensor(p),
                             {k: local_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()}, name)
        new_state[p] = st
    # Commit.
    opt.state.clear()
    for p, st in new_state.items():
        opt.state[p] = TrackedState(opt._epoch, st)
    opt.param_groups[:] = new_groups
    opt._epoch[0] += 1
    opt._group_cache.clear()


def mark_codes_format(state_dict: dict) -> dict:
    """Names the 8-bit codes' format in every 8-bit group of a state_dict() (in place)."""
    for group in state_dict["param_groups"]:
        if group.get("state_dtype") is torch.int8:
            group[quant8.CODES_FORMAT_KEY] = quant8.CODES_FORMAT
    return state_dict


def _saved_codes_format(saved: dict, gi: int) -> str:
    """The format of a loaded group's 8-bit codes: LEGACY_FORMAT where the group does
    not name one (fusedopt before the key; torch.optim checkpoints have no codes)."""
    fmt = saved.get(quant8.CODES_FORMAT_KEY, quant8.LEGACY_FORMAT)
    if fmt not in (quant8.CODES_FORMAT, quant8.LEGACY_FORMAT):
        raise ValueError(f"loaded param_groups[{gi}]['{quant8.CODES_FORMAT_KEY}'] is {fmt!r}; this fusedopt "
                         f"reads {quant8.CODES_FORMAT!r} and {quant8.LEGACY_FORMAT!r}")
    return fmt


def _legacy_codes_as_values(opt, saved: dict, name: str) -> dict:
    """A loaded state whose signed 8-bit codes are in LEGACY_FORMAT, with those codes
    replaced by their fp32 values (quantized again in the current format where the
    optimizer keeps 8-bit state); unsigned codes, whose format did not change, and
    'absmax' stay as saved."""
    out = dict(saved)
    for row, (key, signed) in enumerate(opt._quantized_states):
        codes = saved.get(key)
        if not (signed and isinstance(codes, torch.Tensor) and codes.dtype is torch.int8):
            continue
        scales = _saved_scales(saved.get("absmax"), codes, row + 1, name)
        values = quant8.dequantize_legacy_signed(local_tensor(codes), scales[row])
        out[key] = _like_codes(values, codes)
    return out


def _load_rounding_state(opt, group: dict, gi: int) -> None:
    """A loaded group's stochastic-rounding words (seed, step, stream), checked and
    copied to the group's device: the resumed optimizer continues the saved bit
    stream (the saved seed included)."""
    words = group.get(ROUNDING_STATE)
    if words is None:
        return
    check_rounding_words(words, f"loaded param_groups[{gi}]['{ROUNDING_STATE}']")
    device = opt._group_device(group)
    group[ROUNDING_STATE] = words.to(device=device if device is not None else words.device, copy=True)


def _like_param(value: torch.Tensor, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A copy of a loaded state tensor on p's device, in ``dtype``, with p's memory
    layout (a channels_last param gets channels_last state, whatever the checkpoint
    holds: the kernels walk param and state as flat runs side by side)."""
    if is_dtensor(p):  # FSDP2 shards: contiguous, as the sharded params are
        return value.to(device=p.device, dtype=dtype, copy=True).contiguous()
    return torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format).copy_(value)


def _like_codes(values: torch.Tensor, codes) -> torch.Tensor:
    """Local values as a tensor like ``codes`` (a DTensor with its sharding, or plain)."""
    if not is_dtensor(codes):
        return values
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(values, codes.device_mesh, codes.placements, run_check=False, shape=codes.shape,
                              stride=codes.stride())


def _saved_fp32_values(opt, saved: dict, name: str) -> dict:
    """The fp32 values of the 8-bit states of a loaded state (codes and absmax
    rows, quant8.py), by key; {} when it has none. Sharded codes give fp32
    DTensors with their sharding."""
    coded = [(row, key, signed) for row, (key, signed) in enumerate(opt._quantized_states)
             if isinstance(saved.get(key), torch.Tensor) and saved[key].dtype is torch.int8]
    if not coded:
        return {}
    rows = max(row for row, _, _ in coded) + 1
    out = {}
    for row, key, signed in coded:
        codes = saved[key]
        scales = _saved_scales(saved.get("absmax"), codes, rows, name)
        out[key] = _like_codes(quant8.dequantize(local_tensor(codes), scales[row], signed), codes)
    return out


def _saved_scales(absmax, codes, rows: int, name: str) -> torch.Tensor:
    """The [rows, blocks] block scales of a loaded state's 8-bit ``codes`` (a sharded
    param's: its local rows), checked: at least ``rows`` rows, one scale per block."""
    if is_dtensor(codes):
        scales = quant8.local_absmax_rows(absmax, codes, f"loaded state['absmax'] of {name}")
        if scales.shape[0] < rows:
            raise ValueError(f"loaded state['absmax'] of {name} has {scales.shape[0]} rows; expected {rows}")
        return scales
    if not isinstance(absmax, torch.Tensor) or absmax.dim() != 2 or absmax.shape[0] < rows:
        got = list(absmax.shape) if isinstance(absmax, torch.Tensor) else type(absmax).__name__
        raise ValueError(f"loaded state of {name} holds 8-bit codes but its 'absmax' is {got}; expected a "
                         f"[{rows}, blocks] float32 tensor of block scales")
    if absmax.shape[1] != quant8.num_blocks(codes.numel()):
        raise ValueError(f"loaded state['absmax'] of {name} has {absmax.shape[1]} blocks; expected "
                         f"{quant8.num_blocks(codes.numel())} for {codes.numel()} elements")
    return absmax


def _quantized_state(opt, p: torch.Tensor, saved: dict, name: str) -> dict:
    """A loaded state made 8-bit: codes kept as saved (so training continues
    bit-identically), fp32/bf16 states quantized; a fresh 'absmax' of their rows.
    For a sharded p, each rank quantizes its local shard (quant8.py)."""
    out, rows = {}, []
    lp = local_tensor(p)
    for row, (key, signed) in enumerate(opt._quantized_states):
        value = saved.get(key)
        if not isinstance(value, torch.Tensor):
            continue
        if value.shape != p.shape:
            raise ValueError(f"loaded state['{key}'] of {name} has shape {list(value.shape)}; expected {list(p.shape)}")
        if is_dtensor(p) != is_dtensor(value):
            kind = "a DTensor" if is_dtensor(value) else "a plain tensor"
            raise TypeError(f"loaded state['{key}'] of {name} is {kind}; expected a tensor sharded like its param")
        if value.dtype is torch.int8:  # re-encoding its own decoded values could move a code: keep them
            codes = _like_param(value.detach(), p, torch.int8)
            scales = quant8.local_absmax_rows(saved["absmax"], p) if is_dtensor(p) else saved["absmax"]
            absmax = scales[row].to(device=lp.device, dtype=torch.float32, copy=True)
        elif value.is_floating_point():
            local_codes, absmax = quant8.quantize(local_tensor(value).to(torch.float32), lp, signed)
            codes = _like_param(_like_codes(local_codes, value) if is_dtensor(p) else local_codes, p, torch.int8)
        else:
            raise TypeError(f"loaded state['{key}'] of {name} has dtype {value.dtype}; expected a float or int8 codes")
        out[key] = codes
        rows.append(absmax.reshape(-1))
    if rows:
        out["absmax"] = quant8.pack_absmax(rows, p)
    return out


def convert_loaded_state(opt, group: dict, p: torch.Tensor, saved: dict, name: str) -> dict:
    """Copies a loaded state to p's device and the state dtype, checking it:
    8-bit states are quantized from fp32/bf16 checkpoints and dequantized for
    optimizers that keep fp32/bf16 states."""
    if not saved:
        return {}
    out = {}
    want = opt._state_dtype(group, p)
    fp32 = _saved_fp32_values(opt, saved, name)
    quantized = {key for key, _ in opt._quantized_states}
    if want is torch.int8:
        out.update(_quantized_state(opt, p, saved, name))
    saved = {k: (fp32[k] if k in fp32 else v) for k, v in saved.items() if k != "absmax"}
    for key, value in saved.items():
        if want is torch.int8 and key in quantized:
            continue  # done above
        if key == "step":
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"loaded state['step'] of {name} has {value.numel()} elements; expected 1")
                value = value.detach().reshape(())
            else:
                value = torch.tensor(float(value))
            out[key] = value.to(device=p.device, dtype=torch.float32, copy=True)
        elif isinstance(value, torch.Tensor):
            if value.shape != p.shape:
                raise ValueError(f"loaded state['{key}'] of {name} has shape {list(value.shape)}; "
                                 f"expected {list(p.shape)}")
            if not value.is_floating_point():
                raise TypeError(f"loaded state['{key}'] of {name} has dtype {value.dtype}; expected a float")
            dtype = torch.float32 if key == "master" else want
            out[key] = _like_param(value.detach(), p, dtype)
        else:
            out[key] = value
    for key in opt._required_state_keys(group):
        if out.get(key) is None and opt._state_key_required_when_loaded(key):
            raise ValueError(f"loaded state of {name} has no '{key}'")
    return out


def dequantized_state_dict(opt) -> dict:
    """``opt.state_dict()`` with every 8-bit state (int8 codes and their block
    scales, ``state['absmax']``) replaced by its fp32 values and the param
    groups' ``state_dtype`` key removed: a checkpoint that ``torch.optim``'s
    optimizer of the same name loads, and a fusedopt optimizer loads into the
    state dtype it was built with (quantized again if that is int8). A state
    dict without 8-bit states comes back unchanged.

    It reads the states on the host: call it when saving, not every step."""
    sd = opt.state_dict()
    quantized = getattr(opt, "_quantized_states", ())
    any_coded = False
    for pid, st in list(sd["state"].items()):
        fp32 = _saved_fp32_values(opt, st, f"state {pid!r}") if quantized else {}
        if fp32:
            any_coded = True
            sd["state"][pid] = {k: fp32.get(k, v) for k, v in st.items() if k != "absmax"}
    if any_coded:
        sd["param_groups"] = [{k: v for k, v in g.items() if k not in ("state_dtype", quant8.CODES_FORMAT_KEY)}
                              for g in sd["param_groups"]]
    return sd
