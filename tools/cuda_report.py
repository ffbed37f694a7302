"""Per CUDA kernel of a built fusedopt._C: registers, stack and spills, an occupancy bound, and
the widths of its global loads and stores, read from the compiler's output (no GPU needed).

    python tools/cuda_report.py [path/to/_C*.so] [--cuobjdump PATH]   (tools/cuda_report.sh wraps it)

A kernel's vector path moves 16 bytes per access (LDG.E.128 / STG.E.128); its scalar tail and
misaligned rows use 2-, 4- or 8-byte accesses, so narrow ones appear in every kernel: what a
review watches is the 128-bit count falling, spills (STACK/LOCAL above 0) and register counts
that cut occupancy. cuobjdump (and the nvdisasm it calls) come with the CUDA toolkit, or
`pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from typing import Dict, List

ACCESS = re.compile(r"\b(LDG|STG)\.E(?:\.(128|64|U16|S16|U8|S8))?(?:\.CONSTANT)?\b")
WIDTH = {"128": 16, "64": 8, None: 4, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
REGS_PER_SM, MAX_WARPS, ALLOC_UNIT = 65536, 64, 256  # sm_90: registers per SM, warps per SM, per-warp granularity


def run(cmd: List[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def demangle(names: List[str]) -> Dict[str, str]:
    if not shutil.which("c++filt"):
        return {n: n for n in names}
    out = run(["c++filt"] + names).splitlines() if names else []
    short = {}
    for mangled, plain in zip(names, out):
        plain = re.sub(r"\(anonymous namespace\)::|fusedopt::cuda::|fusedopt::", "", plain)
        short[mangled] = plain.split("(")[0]
    return short


def occupancy(regs: int) -> float:
    per_warp = -(-regs * 32 // ALLOC_UNIT) * ALLOC_UNIT
    return min(MAX_WARPS, REGS_PER_SM // max(per_warp, 1)) / MAX_WARPS


def report(so: str, cuobjdump: str) -> List[dict]:
    usage = run([cuobjdump, "-res-usage", so])
    rows: Dict[str, dict] = {}
    current = None
    for line in usage.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and current:
            rows[current] = dict(kernel=current, regs=int(m.group(1)), stack=int(m.group(2)),
                                 local=int(m.group(4)), loads=defaultdict(int), stores=defaultdict(int))
    sass = run([cuobjdump, "-sass", so])
    current = None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = rows.get(m.group(1))
            continue
        if current is None:
            continue
        for kind, width in ACCESS.findall(line):
            (current["loads"] if kind == "LDG" else current["stores"])[WIDTH[width or None]] += 1
    names = demangle(list(rows))
    for mangled, r in rows.items():
        r["kernel"] = names[mangled]
        r["occupancy"] = occupancy(r["regs"])
    return sorted(rows.values(), key=lambda r: r["kernel"])


TABLE_ARG = re.compile(r", TableOf<\d+, \d+> ?>$")


def merge_table_variants(rows: List[dict]) -> List[dict]:
    """Kernels are built for two launch-table sizes (csrc/cuda/multi_tensor.cuh TableOf):
    variants with the same registers, spills and accesses are one row, named without the
    table argument and marked "(both tables)"; variants that differ keep their own rows."""
    groups: Dict[str, List[dict]] = defaultdict(list)
    for r in rows:
        groups[TABLE_ARG.sub(">", r["kernel"])].append(r)
    out = []
    for name, rs in groups.items():
        key = [(r["regs"], r["stack"], r["local"], dict(r["loads"]), dict(r["stores"])) for r in rs]
        if len(rs) > 1 and all(k == key[0] for k in key):
            out.append(dict(rs[0], kernel=f"{name} (both tables)"))
        else:
            out.extend(rs)
    return sorted(out, key=lambda r: r["kernel"])


def widths(counts: Dict[int, int]) -> str:
    return " ".join(f"{b}B:{counts[b]}" for b in (16, 8, 4, 2, 1) if counts.get(b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("so", nargs="?", help="the _C extension (default: the installed fusedopt's)")
    ap.add_argument("--cuobjdump", default=os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump") or "cuobjdump")
    args = ap.parse_args(argv)
    so = args.so
    if so is None:
        import fusedopt._C as ext
        so = ext.__file__
    try:
        rows = report(so, args.cuobjdump)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"cuda_report: {exc} (cuobjdump and nvdisasm: CUDA toolkit, or pip install "
              "nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)", file=sys.stderr)
        return 2
    if not rows:
        print(f"cuda_report: {so} has no CUDA kernels (a build without CUDA?)", file=sys.stderr)
        return 1
    n_kernels = len(rows)
    rows = merge_table_variants(rows)
    print("| kernel | regs | stack | local | occupancy bound | global loads by width | global stores by width |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['kernel']}` | {r['regs']} | {r['stack']} | {r['local']} | {r['occupancy']:.0%} | "
              f"{widths(r['loads'])} | {widths(r['stores'])} |")
    spilling = [r["kernel"] for r in rows if r["stack"] or r["local"]]
    print(f"\n{n_kernels} kernels in {len(rows)} rows; {len(spilling)} of them with stack or local memory (spills)"
          + (": " + ", ".join(spilling) if spilling else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
