"""Few-row linear products, torch vs modlm's native kernel.

The code lives in ``modlm/bench/kernels.py``;
also ``modlm bench kernels``. Options: ``--help``."""

import sys

from modlm.bench.kernels import main
from modlm.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main, prog="bench_kernels.py"))  # a mistake: one line, exit 2
