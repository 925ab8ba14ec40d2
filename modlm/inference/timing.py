"""Decoders timed side by side: tokens/s of several greedy decoders, interleaved round by round
(so load on a shared machine hits them alike)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from modlm.inference.generate import generate

__all__ = ["modlm_decoder", "side_by_side"]


def modlm_decoder(model, prompt: list[int], new_tokens: int) -> Callable[[], tuple[list[int], float]]:
    """A callable timing one modlm greedy ``generate`` (cached, causal routing) of ``new_tokens``:
    returns (the new tokens, seconds)."""

    def run():
        t0 = time.perf_counter()
        res = generate(model, [prompt], new_tokens, temperature=0, ignore_eos=True)
        return res.tokens[0], time.perf_counter() - t0

    return run


def side_by_side(decoders: dict[str, Callable], new_tokens: int, rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median tokens/s of each decoder, run in turn within each round (after ``warmup`` rounds)."""
    rates: dict[str, list[float]] = {name: [] for name in decoders}
    for r in range(warmup + rounds):
        for name, run in decoders.items():
            _, seconds = run()
            if r >= warmup:
                rates[name].append(new_tokens / seconds)
    return {name: statistics.median(v) for name, v in rates.items()}
