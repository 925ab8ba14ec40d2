"""Training-step time, MoE and integrated MoDE vs their dense twin.

The code lives in ``modlm/bench/moe.py``;
also ``modlm bench moe``. Options: ``--help``."""

import sys

from modlm.bench.moe import main
from modlm.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main, prog="bench_moe.py"))  # a mistake: one line, exit 2
