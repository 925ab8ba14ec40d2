"""How many tokens a routed block takes: the one rule every router, FLOP count and decoder shares. No torch."""

from __future__ import annotations

import math


def capacity_k(capacity: float, seq_len: int) -> int:
    """Tokens a routed block takes per sequence: k = max(1, round(capacity * T)), at most T.

    NOTE: ``int(c * T)`` gives k = 0 at T = 1 (a common bug when decoding); we round half up
    and never go below one token.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    return min(seq_len, max(1, math.floor(capacity * seq_len + 0.5)))
