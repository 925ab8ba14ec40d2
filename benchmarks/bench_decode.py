"""Decode speed, MoD vs its dense twin.

The code lives in ``modlm/bench/decode.py``;
also ``modlm bench decode``. Options: ``--help``."""

import sys

from modlm.bench.decode import main
from modlm.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main, prog="bench_decode.py"))  # a mistake: one line, exit 2
