"""Command line: `fusedopt spectrum ...` and `fusedopt bench ...`."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="fusedopt")
    ap.add_argument("command", choices=["spectrum", "bench"], help="spectrum: Hessian spectrum demo; bench: benchmarks")
    if not argv or argv[0] in ("-h", "--help"):
        ap.print_help()
        return 0 if argv else 2
    args, rest = ap.parse_known_args(argv[:1])
    rest = argv[1:]
    if args.command == "spectrum":
        from .hessian.cli import spectrum_main
        return spectrum_main(rest)
    from . import bench  # owned by the benchmark work; may not exist in every build
    return bench.main(rest)


if __name__ == "__main__":
    sys.exit(main())
