"""Training-step time, MoD vs its dense twin.

The code lives in ``modlm/bench/train.py``;
also ``modlm bench train``. Options: ``--help``."""

from modlm.bench.train import main

if __name__ == "__main__":
    main()
