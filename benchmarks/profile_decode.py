"""Where a decode step's time goes.

The code lives in ``modlm/bench/profile_decode.py``;
also ``modlm bench profile-decode``. Options: ``--help``."""

import sys

from modlm.bench.profile_decode import main
from modlm.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main, prog="profile_decode.py"))  # a mistake: one line, exit 2
