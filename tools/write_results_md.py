"""Turn benchmarks/bench_cuda.py's JSON into the markdown of benchmarks/RESULTS.md.

    python tools/write_results_md.py bench_cuda.json [--env env.json] [--out RESULTS.md]

Writes the device, driver, torch and commit (env.json from tools/gpu_check.sh has the driver and
the checkout's commit, which an installed package cannot know), one table row per benchmark row,
then one line per issue-17 target: met, missed by how much, or not measured. Only numbers that
are in the JSON are written: a row with an error or without a time says so and nothing else.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

# Issue 17's targets on an H200: (rows, what is compared, threshold, description).
# "pct": percent of the measured copy bandwidth (for LARS/LAMB that is their byte floor);
# "speedup": torch's time over fusedopt's.
TARGETS = [
    (["adam-fp32-500M", "adamw-fp32-500M", "sgd-momentum-fp32-500M"], "pct", 90.0,
     "fp32 Adam/AdamW/SGD-momentum >= 90% of copy bandwidth on >= 500M params"),
    (["adam-bf16-master-500M"], "pct", 85.0, "bf16 params + fp32 master >= 85% of copy bandwidth"),
    (["lars-resnet50", "lamb-resnet50", "lars-bert-large", "lamb-bert-large"], "pct", 80.0,
     "LARS/LAMB >= 80% of their byte floors"),
    (["adam-10000x4096"], "speedup", 2.0, "10 000 x 4096 Adam step() >= 2x faster than torch fused Adam"),
]


def ms(summary: Optional[dict]) -> str:
    return "n/a" if not summary else f"{summary['median'] * 1e3:.3g}"


def row_line(row: dict) -> str:
    if "error" in row:
        return f"| {row['name']} | error: {row['error']} | | | |"
    pct = f"{row['pct_copy_bw']:.1f}%" if "pct_copy_bw" in row else "n/a"
    if "speedup" in row:
        s = row["speedup"]
        ratio = f"{s['median']:.2f}x vs {row['baseline']} ({s['min']:.2f}-{s['max']:.2f})"
    elif "baseline_error" in row:
        ratio = f"{row['baseline']}: error: {row['baseline_error']}"
    else:
        ratio = "no torch peer"
    noisy = " (noisy)" if row["time_s"].get("noisy") else ""
    host = ""
    if "host_s" in row:
        host = ", ".join(f"{impl} {t * 1e3:.3g} ms" for impl, t in row["host_s"].items())
    return f"| {row['name']} | {ms(row['time_s'])}{noisy} | {pct} | {ratio} | {host} |"


def target_lines(rows: List[dict]) -> List[str]:
    by_name = {r["name"]: r for r in rows}
    lines = []
    for names, kind, threshold, text in TARGETS:
        parts = []
        for name in names:
            row = by_name.get(name)
            key = "pct_copy_bw" if kind == "pct" else "speedup"
            if row is None:
                parts.append(f"{name}: not measured")
                continue
            if key not in row:
                parts.append(f"{name}: not measured ({row.get('error', 'no number')})")
                continue
            value = row[key] if kind == "pct" else row[key]["median"]
            shown = f"{value:.1f}%" if kind == "pct" else f"{value:.2f}x"
            if value >= threshold:
                parts.append(f"{name}: met ({shown})")
            elif kind == "pct":
                parts.append(f"{name}: MISSED, {shown} is {threshold - value:.1f} points short")
            else:
                parts.append(f"{name}: MISSED, {shown} is {threshold / value:.2f}x short of {threshold:g}x")
        lines.append(f"- {text}: " + "; ".join(parts))
    return lines


def render(bench: dict, env: dict) -> str:
    e = bench.get("environment", {})
    copy = next((r for r in bench["rows"] if r["name"] == "copy"), None)
    out = ["## CUDA results (tools/gpu_check.sh)", "",
           f"Device {env.get('gpu') or e.get('device_name', 'unknown')}, driver {env.get('driver', 'unknown')}, "
           f"torch {env.get('torch') or e.get('torch', 'unknown')} (CUDA {env.get('torch_cuda') or e.get('cuda_runtime')}), "
           f"commit {env.get('commit') or e.get('commit', 'unknown')}, {e.get('date', '')}; "
           f"mode {bench.get('settings', {}).get('mode', '?')}, median of "
           f"{bench.get('settings', {}).get('reps', '?')} interleaved repetitions.", ""]
    if copy:
        out += [f"Yardstick: device-to-device copy {copy['copy_bytes_per_s'] / 1e12:.2f} TB/s (bytes read + written), "
                f"{ms(copy['time_s'])} ms for {copy['bytes_per_step'] / 1e9:.1f} GB.", ""]
    out += ["Percent of copy bandwidth = bytes the step must move (benchmarks/bench_cuda.py's docstring) "
            "/ time per step / copy rate. Speed-up = torch's time / fusedopt's, higher is better.", "",
            "| row | ms/step | % of copy bandwidth | speed-up | host time per step() |",
            "| --- | ---: | ---: | --- | --- |"]
    out += [row_line(r) for r in bench["rows"] if r["name"] != "copy"]
    out += ["", "### Issue 17 targets", ""] + target_lines(bench["rows"])
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_json")
    ap.add_argument("--env", help="env.json of tools/gpu_check.sh (driver, commit)")
    ap.add_argument("--out", help="markdown path (default: stdout)")
    args = ap.parse_args(argv)
    bench = json.loads(Path(args.bench_json).read_text())
    env = json.loads(Path(args.env).read_text()) if args.env and Path(args.env).is_file() else {}
    text = render(bench, env)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
