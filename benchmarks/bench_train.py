"""Training-step time, MoD vs its dense twin.

The code lives in ``modlm/bench/train.py``;
also ``modlm bench train``. Options: ``--help``."""

import sys

from modlm.bench.train import main
from modlm.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main, prog="bench_train.py"))  # a mistake: one line, exit 2
