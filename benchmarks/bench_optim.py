"""Optimizer step benchmark (fusedopt vs torch.optim). The logic lives in fusedopt.bench so that
`python -m fusedopt bench` and this script are the same program; see `--help`."""
import sys

from fusedopt.bench import main

if __name__ == "__main__":
    sys.exit(main())
