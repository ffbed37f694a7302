"""Command line: ``python -m fusedopt <command>`` (also installed as ``fusedopt``).

Commands:
  bench      optimizer step benchmark against torch.optim (fusedopt.bench)
  spectrum   Hessian spectrum of a model (fusedopt.hessian.cli)
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from . import __version__
    ap = argparse.ArgumentParser(prog="fusedopt", description="fusedopt: fused optimizers and Hessian tools.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1].split('"""')[0])
    ap.add_argument("--version", action="version", version=f"fusedopt {__version__}")
    ap.add_argument("command", choices=["bench", "spectrum"], help="see COMMAND --help")
    if not argv:  # no command: the help, not an error
        ap.print_help()
        return 0
    if argv[0].startswith("-"):
        ap.parse_args(argv)  # --help, --version, or an argparse error line
        return 0
    ns = ap.parse_args(argv[:1])
    rest = argv[1:]
    # Imported lazily: each command pulls in only what it needs.
    if ns.command == "bench":
        from .bench import main as bench_main

        return int(bench_main(rest) or 0)
    from .hessian.cli import spectrum_main

    return int(spectrum_main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
