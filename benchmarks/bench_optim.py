"""Optimizer step benchmark (fusedopt vs torch.optim and installed peers): the same program as
`fusedopt bench`, whose logic lives in fusedopt.bench; see `--help`."""
import sys

from fusedopt.bench import main

if __name__ == "__main__":
    sys.exit(main())
