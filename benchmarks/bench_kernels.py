"""Few-row linear products, torch vs modlm's native kernel.

The code lives in ``modlm/bench/kernels.py``;
also ``modlm bench kernels``. Options: ``--help``."""

from modlm.bench.kernels import main

if __name__ == "__main__":
    main()
