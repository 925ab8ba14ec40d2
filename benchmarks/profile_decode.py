"""Where a decode step's time goes.

The code lives in ``modlm/bench/profile_decode.py``;
also ``modlm bench profile-decode``. Options: ``--help``."""

from modlm.bench.profile_decode import main

if __name__ == "__main__":
    main()
