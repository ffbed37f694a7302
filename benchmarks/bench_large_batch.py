"""LARS on ResNet-50 parameter shapes and LAMB on BERT-base shapes: fusedopt against
a for-loop and a foreach (torch._foreach_*) reference of the same math.

Prints time per step, the speed-up over each reference and the bandwidth floor:
the bytes fusedopt's passes must move per step divided by the measured copy
bandwidth of the device. JSON goes to benchmarks/results/.

    python benchmarks/bench_large_batch.py                 # cuda if available, else cpu
    python benchmarks/bench_large_batch.py --device cpu --scale 0.25

--scale shrinks every tensor to that fraction of its elements (the tensor count
stays): default 1.0 on GPU, 0.15 on CPU so the run takes well under 2 minutes on
2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import torch

import fusedopt


# ---- parameter shapes ----------------------------------------------------------
def resnet50_shapes():
    """torchvision resnet50: 161 tensors, 25,557,032 parameters."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    shapes += [(1000, 2048), (1000,)]
    return shapes


def bert_base_shapes():
    """BertModel (bert-base-uncased): 199 tensors, 109,482,240 parameters."""
    h, ff = 768, 3072
    shapes = [(30522, h), (512, h), (2, h), (h,), (h,)]
    for _ in range(12):
        shapes += [(h, h), (h,)] * 4 + [(h,), (h,), (ff, h), (ff,), (h, ff), (h,), (h,), (h,)]
    shapes += [(h, h), (h,)]
    return shapes


def numel(s):
    n = 1
    for d in s:
        n *= d
    return n


def scaled(shapes, scale):
    return shapes if scale == 1.0 else [(max(1, round(numel(s) * scale)),) for s in shapes]


# ---- references of the same math (issue 3) ----------------------------------------
def lars_ratio(pn, gn, lr, wd, tc, eps):
    r = tc * pn / (gn + wd * pn + eps)
    return torch.where((pn > 0) & (gn > 0), r, torch.ones_like(r))


def lars_loop(params, grads, bufs, lr, mom, wd, tc, eps):
    for p, g, b in zip(params, grads, bufs):
        r = lars_ratio(torch.linalg.vector_norm(p), torch.linalg.vector_norm(g), lr, wd, tc, eps)
        d = (g + wd * p) * r
        b.mul_(mom).add_(d)
        p.add_(b, alpha=-lr)


def lars_foreach(params, grads, bufs, lr, mom, wd, tc, eps):
    pn = torch.stack(torch._foreach_norm(params))
    gn = torch.stack(torch._foreach_norm(grads))
    r = lars_ratio(pn, gn, lr, wd, tc, eps)
    d = torch._foreach_add(grads, params, alpha=wd)
    torch._foreach_mul_(d, list(r.unbind()))
    torch._foreach_mul_(bufs, mom)
    torch._foreach_add_(bufs, d)
    torch._foreach_add_(params, bufs, alpha=-lr)


def lamb_loop(params, grads, ms, vs, step, lr, b1, b2, eps, wd, mgn):
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    c = torch.clamp(total / mgn, min=1.0)
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    for p, g, m, v in zip(params, grads, ms, vs):
        g = g / c
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        u = (m / bc1) / (v.sqrt() / bc2 ** 0.5 + eps) + wd * p
        pn, un = torch.linalg.vector_norm(p), torch.linalg.vector_norm(u)
        r = torch.where((pn > 0) & (un > 0), pn / un, torch.ones_like(pn))
        p.add_(u * r, alpha=-lr)


def lamb_foreach(params, grads, ms, vs, step, lr, b1, b2, eps, wd, mgn):
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    c = torch.clamp(total / mgn, min=1.0)
    g = torch._foreach_div(grads, c)
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    torch._foreach_mul_(ms, b1)
    torch._foreach_add_(ms, g, alpha=1 - b1)
    torch._foreach_mul_(vs, b2)
    torch._foreach_addcmul_(vs, g, g, value=1 - b2)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, bc2 ** 0.5)
    torch._foreach_add_(denom, eps)
    u = torch._foreach_div(ms, bc1)
    torch._foreach_div_(u, denom)
    torch._foreach_add_(u, params, alpha=wd)
    pn = torch.stack(torch._foreach_norm(params))
    un = torch.stack(torch._foreach_norm(u))
    r = torch.where((pn > 0) & (un > 0), pn / un, torch.ones_like(pn))
    torch._foreach_mul_(u, list(r.unbind()))
    torch._foreach_add_(params, u, alpha=-lr)


# ---- timing --------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn, device, warmup, steps):
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def copy_bandwidth(device, n=1 << 26):
    """Bytes/s of a large tensor copy (read + write): the attainable streaming rate."""
    a = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    t = time_steps(lambda: b.copy_(a), device, 2, 5)
    return 2 * a.numel() * 4 / t


def make(shapes, device, n_state):
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device) * 1e-2 for s in shapes]
    states = [[torch.zeros_like(p) for p in params] for _ in range(n_state)]
    return params, grads, states


def time_fused(cls, params, grads, hp, device, warmup, steps):
    """Time of cls(params, **hp).step() with the given grads (params wrapped, not copied)."""
    ps = [torch.nn.Parameter(p) for p in params]
    for p, g in zip(ps, grads):
        p.grad = g
    return time_steps(cls(ps, **hp).step, device, warmup, steps)


def bench_lars(shapes, device, warmup, steps):
    hp = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, trust_coeff=1e-3, eps=1e-8)
    results = {}
    params, grads, (bufs,) = make(shapes, device, 1)
    args = (hp["lr"], hp["momentum"], hp["weight_decay"], hp["trust_coeff"], hp["eps"])
    results["loop"] = time_steps(lambda: lars_loop(params, grads, bufs, *args), device, warmup, steps)
    results["foreach"] = time_steps(lambda: lars_foreach(params, grads, bufs, *args), device, warmup, steps)
    results["fusedopt"] = time_fused(fusedopt.LARS, params, grads, hp, device, warmup, steps)
    n = sum(p.numel() for p in params)
    # pass 1 reads p, g; pass 2 reads p, g, buf and writes p, buf (fp32).
    return results, n, n * 4 * (2 + 5)


def bench_lamb(shapes, device, warmup, steps):
    hp = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_grad_norm=1.0)
    results = {}
    params, grads, (ms, vs) = make(shapes, device, 2)
    args = (hp["lr"], 0.9, 0.999, hp["eps"], hp["weight_decay"], hp["max_grad_norm"])
    results["loop"] = time_steps(lambda: lamb_loop(params, grads, ms, vs, 10, *args), device, warmup, steps)
    results["foreach"] = time_steps(lambda: lamb_foreach(params, grads, ms, vs, 10, *args), device, warmup, steps)
    results["fusedopt"] = time_fused(fusedopt.LAMB, params, grads, hp, device, warmup, steps)
    n = sum(p.numel() for p in params)
    # pass 1 reads g; pass 2 reads p, g, m, v, writes m, v; pass 3 reads p, m, v, writes p (fp32).
    return results, n, n * 4 * (1 + 6 + 4)


def git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(__file__) or ".",
                                       text=True).strip()
    except Exception:
        return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() and fusedopt.cuda_available() else "cpu")
    ap.add_argument("--scale", type=float, default=None, help="fraction of every tensor's elements (default: 1 on GPU, 0.15 on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on GPU, 3 on CPU)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/large_batch_<device>.json)")
    a = ap.parse_args()
    device = torch.device(a.device)
    on_gpu = device.type == "cuda"
    scale = a.scale if a.scale is not None else (1.0 if on_gpu else 0.15)
    steps = a.steps if a.steps is not None else (20 if on_gpu else 3)
    warmup = 3 if on_gpu else 1
    bw = copy_bandwidth(device, 1 << 26 if on_gpu else 1 << 24)
    name = torch.cuda.get_device_name(device) if on_gpu else f"cpu ({os.cpu_count()} cores, {fusedopt.get_num_threads()} fusedopt threads, simd {fusedopt.build_info()['cpu_simd']})"
    print(f"device: {name}; copy bandwidth {bw / 1e9:.1f} GB/s; scale {scale}; {steps} timed steps")
    rows = []
    for label, shapes, fn in (("LARS resnet50", resnet50_shapes(), bench_lars),
                              ("LAMB bert-base", bert_base_shapes(), bench_lamb)):
        sh = scaled(shapes, scale)
        res, n, nbytes = fn(sh, device, warmup, steps)
        floor = nbytes / bw
        row = dict(case=label, tensors=len(sh), params=n, bytes_per_step=nbytes, floor_ms=floor * 1e3,
                   **{f"{k}_ms": v * 1e3 for k, v in res.items()},
                   speedup_vs_loop=res["loop"] / res["fusedopt"], speedup_vs_foreach=res["foreach"] / res["fusedopt"],
                   fraction_of_floor=floor / res["fusedopt"])
        rows.append(row)
        del res
    hdr = f"{'case':16} {'tensors':>7} {'params':>11} {'loop ms':>9} {'foreach ms':>10} {'fused ms':>9} " \
          f"{'x loop':>7} {'x foreach':>9} {'MB/step':>8} {'floor ms':>8} {'% floor':>7}"
    print(hdr)
    for r in rows:
        print(f"{r['case']:16} {r['tensors']:>7} {r['params']:>11,} {r['loop_ms']:>9.2f} {r['foreach_ms']:>10.2f} "
              f"{r['fusedopt_ms']:>9.2f} {r['speedup_vs_loop']:>7.2f} {r['speedup_vs_foreach']:>9.2f} "
              f"{r['bytes_per_step'] / 1e6:>8.1f} {r['floor_ms']:>8.2f} {100 * r['fraction_of_floor']:>6.1f}%")
    print("bytes/step: fp32, LARS 2 passes = 28 B/param (norms: read p,g; update: read p,g,buf, write p,buf); "
          "LAMB 3 passes = 44 B/param (grad norm: read g; moments: read p,g,m,v, write m,v; apply: read p,m,v, write p). "
          "floor = bytes / copy bandwidth.")
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"large_batch_{device.type}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(device=name, torch=torch.__version__, fusedopt=fusedopt.__version__, git_commit=git_commit(),
                       scale=scale, steps=steps, copy_bandwidth_gbs=bw / 1e9, results=rows), f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
