"""Decode speed, MoD vs its dense twin.

The code lives in ``modlm/bench/decode.py``;
also ``modlm bench decode``. Options: ``--help``."""

from modlm.bench.decode import main

if __name__ == "__main__":
    main()
