"""LARS on ResNet-50 parameter shapes and LAMB on BERT-base shapes: fusedopt against a foreach
(torch._foreach_*) implementation of the same math, timm's Lars/Lamb when installed, and with
--full a per-tensor for-loop; plus how close fusedopt comes to its memory-bandwidth floor.

    python benchmarks/bench_large_batch.py [--quick | --full] [--device cpu|cuda|all] [--scale 0.25]

Sizes: every tensor shrinks to --scale of its elements (the tensor count stays). By default a
CPU case is scaled to about 16M elements (4M with --quick), beyond the last-level cache so
that the floor applies, and a GPU case runs at full size; --full runs full size everywhere.

The floor is the bytes fusedopt's passes must move (fp32: LARS 28 B/param = norms pass reads p, g;
update reads p, g, buf, writes p, buf; LAMB 44 B/param = grad-norm pass reads g; moments pass
reads p, g, m, v, writes m, v; apply pass reads p, m, v, writes p) divided by the best streaming
rate measured in the same repetitions: the fastest of a copy (1 read + 1 write stream), an
in-place add (2 + 1) and an in-place multiply-add (3 + 1) over buffers of the workload's size.
"""
from __future__ import annotations

import sys
from typing import Dict, List, Optional

import torch

import fusedopt
from fusedopt.benchmarking import cli, environment, report
from fusedopt.benchmarking.compare import (Candidate, any_errors, error_summary, note_cell, run_candidates,
                                           timing_cells, timing_header)
from fusedopt.benchmarking.peers import timm_lamb, timm_lars
from fusedopt.benchmarking.progress import Progress
from fusedopt.benchmarking.timing import Measured, Summary
from fusedopt.benchmarking.workloads import bert_base_shapes, numel, random_params_and_grads, resnet50_shapes, scaled

BASELINE = "foreach-reference"
LARS_HP = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, trust_coeff=1e-3, eps=1e-8)
LAMB_HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_grad_norm=1.0)
FLOOR_BYTES_PER_PARAM = {"lars": 4 * (2 + 5), "lamb": 4 * (1 + 6 + 4)}
CASES = {"lars": ("LARS resnet50", resnet50_shapes), "lamb": ("LAMB bert-base", bert_base_shapes)}
TARGET_ELEMENTS = {"cpu": {"quick": 4e6, "default": 16e6, "full": None}, "cuda": {"quick": 25e6, "default": None,
                                                                                 "full": None}}
REPS = {"quick": 3, "default": 5, "full": 7}
SECONDS_PER_REP = {"quick": 0.05, "default": 0.2, "full": 0.5}
# Streaming probes: (bytes moved per element, the call on buffers a, b, c).
STREAMS = {"copy": (8, lambda a, b, c: b.copy_(a)),
           "add": (12, lambda a, b, c: a.add_(b, alpha=1e-9)),
           "multiply-add": (16, lambda a, b, c: a.addcmul_(b, c, value=1e-9))}


# ---- references of the same math ---------------------------------------------------------------
def lars_ratio(pn, gn, wd, tc, eps):
    r = tc * pn / (gn + wd * pn + eps)
    return torch.where((pn > 0) & (gn > 0), r, torch.ones_like(r))


def lars_loop(params, grads, bufs, lr, momentum, weight_decay, trust_coeff, eps):
    for p, g, b in zip(params, grads, bufs):
        r = lars_ratio(torch.linalg.vector_norm(p), torch.linalg.vector_norm(g), weight_decay, trust_coeff, eps)
        b.mul_(momentum).add_((g + weight_decay * p) * r)
        p.add_(b, alpha=-lr)


def lars_foreach(params, grads, bufs, lr, momentum, weight_decay, trust_coeff, eps):
    r = lars_ratio(torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(grads)),
                   weight_decay, trust_coeff, eps)
    d = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_mul_(d, list(r.unbind()))
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, d)
    torch._foreach_add_(params, bufs, alpha=-lr)


def lamb_trust(pn, un):
    return torch.where((pn > 0) & (un > 0), pn / un, torch.ones_like(pn))


def lamb_loop(params, grads, ms, vs, step, lr, betas, eps, weight_decay, max_grad_norm):
    (b1, b2), bc1, bc2 = betas, 1 - betas[0] ** step, 1 - betas[1] ** step
    c = torch.clamp(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                    / max_grad_norm, min=1.0)
    for p, g, m, v in zip(params, grads, ms, vs):
        g = g / c
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        u = (m / bc1) / (v.sqrt() / bc2 ** 0.5 + eps) + weight_decay * p
        p.add_(u * lamb_trust(torch.linalg.vector_norm(p), torch.linalg.vector_norm(u)), alpha=-lr)


def lamb_foreach(params, grads, ms, vs, step, lr, betas, eps, weight_decay, max_grad_norm):
    (b1, b2), bc1, bc2 = betas, 1 - betas[0] ** step, 1 - betas[1] ** step
    c = torch.clamp(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) / max_grad_norm, min=1.0)
    g = torch._foreach_div(grads, c)
    torch._foreach_mul_(ms, b1)
    torch._foreach_add_(ms, g, alpha=1 - b1)
    torch._foreach_mul_(vs, b2)
    torch._foreach_addcmul_(vs, g, g, value=1 - b2)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, bc2 ** 0.5)
    torch._foreach_add_(denom, eps)
    u = torch._foreach_div(ms, bc1)
    torch._foreach_div_(u, denom)
    torch._foreach_add_(u, params, alpha=weight_decay)
    r = lamb_trust(torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(u)))
    torch._foreach_mul_(u, list(r.unbind()))
    torch._foreach_add_(params, u, alpha=-lr)


# ---- candidates ------------------------------------------------------------------------------------
def optimizer_setup(make, params, grads):
    """A setup for an optimizer class over the shared tensors (wrapped, not copied)."""
    def setup():
        wrapped = [torch.nn.Parameter(p) for p in params]
        for p, g in zip(wrapped, grads):
            p.grad = g
        opt = make(wrapped)
        opt.step()  # state created outside the timed region
        return opt.step
    return setup


def reference_setup(fn, params, grads, n_state, *extra):
    def setup():
        states = [[torch.zeros_like(p) for p in params] for _ in range(n_state)]
        return lambda: fn(params, grads, *states, *extra)
    return setup


def candidates(case: str, params, grads, with_loop: bool) -> List[Candidate]:
    """Every candidate shares the params and grads (memory: --full at BERT-base size): each keeps
    its own state, and the params drift under all of them, which does not change the timing."""
    if case == "lars":
        ref_args, hp = tuple(LARS_HP.values()), LARS_HP
        refs = {"loop-reference": lars_loop, "foreach-reference": lars_foreach}
        ours = lambda ps: fusedopt.LARS(ps, **hp)  # noqa: E731
        peer = lambda ps: timm_lars(ps, **hp)  # noqa: E731
        n_state, step = 1, ()
    else:
        ref_args, hp = tuple(LAMB_HP.values()), LAMB_HP
        refs = {"loop-reference": lamb_loop, "foreach-reference": lamb_foreach}
        ours = lambda ps: fusedopt.LAMB(ps, **hp)  # noqa: E731
        peer = lambda ps: timm_lamb(ps, **hp)  # noqa: E731
        n_state, step = 2, (10,)  # a fixed bias-correction step: its value does not change the cost
    out = [Candidate(name, reference_setup(fn, params, grads, n_state, *step, *ref_args))
           for name, fn in refs.items() if with_loop or name != "loop-reference"]
    out.append(Candidate("fusedopt", optimizer_setup(ours, params, grads), must_work=True))
    out.append(Candidate("timm", optimizer_setup(peer, params, grads)))
    return out


def stream_probes(n: int, device: torch.device) -> Dict[str, callable]:
    a, b, c = (torch.empty(n, device=device).uniform_() for _ in range(3))
    return {f"stream {name}": (lambda fn=fn: fn(a, b, c)) for name, (_, fn) in STREAMS.items()}


def stream_rates(probes: Dict[str, Measured], n: int) -> Dict[str, Summary]:
    """Bytes per second of each streaming probe, per repetition."""
    return {name.split(" ", 1)[1]: Summary.of([STREAMS[name.split(" ", 1)[1]][0] * n / t for t in m.samples])
            for name, m in probes.items() if m.error is None}


def floor_fraction(fused: Optional[Summary], rates: Dict[str, Summary], bytes_per_param: int, n: int):
    """(best streaming rate per repetition in B/s, floor time / fusedopt time per repetition).
    The best of the streams, repetition by repetition: a copy alone is not the attainable rate
    (more read streams in flight stream faster), and a rate measured at another moment of a
    shared machine is not this repetition's."""
    if fused is None or not rates:
        return None, None
    best = Summary.of([max(per_rep) for per_rep in zip(*(r.samples for r in rates.values()))])
    fractions = Summary.of([bytes_per_param * n / rate / t for rate, t in zip(best.samples, fused.samples)])
    return best, fractions


def bench_case(case: str, device: torch.device, args, reps: int, warmup: int, llc: Optional[int], bar):
    """One case: (rows, table lines, JSON records, notes)."""
    label, shapes_of = CASES[case]
    target = TARGET_ELEMENTS[device.type][args.mode]
    scale = args.scale or (min(1.0, target / numel(shapes_of())) if target else 1.0)
    shapes = scaled(shapes_of(), scale)
    n = numel(shapes)
    params, grads = random_params_and_grads(shapes, device)
    rows, probes = run_candidates(
        candidates(case, params, grads, with_loop=args.full), baseline=BASELINE, device=device, reps=reps,
        warmup=warmup, iters=args.iters, target_s=SECONDS_PER_REP[args.mode], probes=stream_probes(n, device),
        after_rep=lambda i: bar.update(label))
    rates = stream_rates(probes, n)
    fused = next(r for r in rows if r.name == "fusedopt")
    bandwidth, fraction = floor_fraction(fused.time, rates, FLOOR_BYTES_PER_PARAM[case], n)
    table, records, notes = [], [], []
    for r in rows:
        record = dict(case=label, scale=scale, tensors=len(shapes), params=n, **r.as_dict())
        floor_cell = ""
        if r is fused and fraction is not None:
            floor_cell = f"{100 * fraction.median:.0f}% ({100 * fraction.low:.0f}-{100 * fraction.high:.0f})"
            record.update(floor_bytes_per_step=FLOOR_BYTES_PER_PARAM[case] * n, fraction_of_floor=fraction.as_dict(),
                          attainable_bytes_per_s=bandwidth.as_dict(),
                          stream_bytes_per_s={k: v.as_dict() for k, v in rates.items()})
        table.append([label, r.name, *timing_cells(r, "ms"), floor_cell, note_cell(r)])
        records.append(record)
    if bandwidth is not None:
        streams = ", ".join(f"{k} {v.median / 1e9:.1f}" for k, v in rates.items())
        notes.append(f"{label}: {n:,} params (scale {scale:.3g}); streaming GB/s (median): {streams}; best per "
                     f"repetition {bandwidth.median / 1e9:.1f} ({bandwidth.low / 1e9:.1f}-{bandwidth.high / 1e9:.1f})")
    if llc and 4 * n < llc:
        notes.append(f"{label}: one fp32 array ({4 * n / 2**20:.0f} MiB) fits in the last-level cache "
                     f"({llc / 2**20:.0f} MiB): reads can hit the cache, so '% of floor' may pass 100")
    return rows, table, records, notes


def main(argv: Optional[List[str]] = None) -> int:
    ap = cli.benchmark_parser("bench_large_batch.py", __doc__)
    ap.add_argument("--scale", type=cli.fraction_of_one, default=None,
                    help="fraction of every tensor's elements (default: see above)")
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    args = cli.parse(ap, argv)
    devices = cli.resolve_devices(ap, args.device)
    cli.apply_threads(args.threads)
    reps, warmup = cli.pick(args.reps, args.mode, REPS), 1 if args.warmup is None else args.warmup
    failed = False
    for device in devices:
        env = environment.capture(device)
        llc = env["last_level_cache_bytes"] if device.type == "cpu" else None
        rows, table, records, notes = [], [], [], []
        with Progress(len(args.cases) * reps, f"large batch {device.type}", enabled=not args.no_progress) as bar:
            for case in args.cases:
                for into, part in zip((rows, table, records, notes), bench_case(case, device, args, reps, warmup,
                                                                                  llc, bar)):
                    into += part
        report.print_title(f"large-batch optimizers ({args.mode})", env, reps)
        print(report.format_table(["case", "impl", *timing_header("ms", BASELINE), "% of floor", "note"], table))
        for line in notes:
            print(line)
        print("floor = bytes fusedopt's passes move (LARS 28 B/param, LAMB 44 B/param) / best streaming rate of "
              "the same repetition")
        for line in error_summary(rows):
            print(line, file=sys.stderr)
        settings = dict(mode=args.mode, reps=reps, warmup=warmup, iters=args.iters, scale=args.scale,
                        baseline=BASELINE, lars=LARS_HP, lamb=LAMB_HP, floor_bytes_per_param=FLOOR_BYTES_PER_PARAM,
                        streams={k: v[0] for k, v in STREAMS.items()})
        report.save(report.results_payload("large_batch", env, settings, records), name="large_batch",
                    device=device.type, out=args.out, devices_in_run=len(devices))
        failed = failed or any_errors(rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
