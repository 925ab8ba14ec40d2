"""What keeps ``modlm adapt`` from quietly writing a ruined model.

- ``CollapseGuard``: router tuning stops, with one line saying why and what to change, when the
  adapted model's training loss runs far above the original's on the same batches, or above
  ln(vocabulary) (worse than guessing uniformly). ``adapt_checkpoint`` then writes nothing.
- ``heldout_report``: every method ends by measuring the adapted and the original model on the
  data's validation split (never seen in adaptation) as they decode (causal routing,
  ``modlm.inference.evaluation.evaluate_lm``), and the fraction of the original's block compute
  the adapted model keeps there (``block_compute_fraction``, as ``modlm adapt-study`` reports it).
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch

from modlm.inference.evaluation import evaluate_lm, window_batches
from modlm.model.transformer import MoDTransformer

__all__ = ["AdaptationCollapsed", "CollapseGuard", "heldout_report", "heldout_windows"]

# The guard looks at the mean of the last GUARD_WINDOW steps, from step GUARD_WINDOW on: one
# unlucky window of text must not stop a run, a loss that stays up must.
GUARD_WINDOW = 10
# The relative part of the margin: the training loss may exceed the original's by
# max(max_loss_rise nats, GUARD_RELATIVE of the original's loss).
GUARD_RELATIVE = 0.25


class AdaptationCollapsed(FloatingPointError):
    """Router tuning stopped by ``CollapseGuard`` (a diverged run: the CLI's one-line error)."""


class CollapseGuard:
    """Stops router tuning whose LM loss runs away from the original's.

    Rule: from step ``GUARD_WINDOW`` on, with a and o the means over the last ``GUARD_WINDOW``
    steps of the adapted model's LM loss and of the original's on the same batches, stop when a
    is not finite or a > ``limit(o)`` = max(o + max_loss_rise, min(o + max(max_loss_rise, 0.25 · o),
    ln(vocab_size))): a rise of max(max_loss_rise nats, 25%), and never worse than uniform
    guessing unless the original itself is within max_loss_rise of it. ``max_loss_rise`` 0: never stop.
    ``advice``: what to change, ending the message.
    """

    def __init__(self, vocab_size: int, max_loss_rise: float, advice: str) -> None:
        self.limit_uniform = math.log(vocab_size)
        self.max_loss_rise = max_loss_rise
        self.advice = advice
        self.adapted: deque[float] = deque(maxlen=GUARD_WINDOW)
        self.original: deque[float] = deque(maxlen=GUARD_WINDOW)

    @property
    def active(self) -> bool:
        """Whether the guard can stop a run (``max_loss_rise`` > 0)."""
        return self.max_loss_rise > 0

    def check(self, step: int, adapted_loss: float, original_loss: float) -> None:
        """Take one step's LM losses; raise ``AdaptationCollapsed`` when the rule says stop."""
        if not self.active:
            return
        self.adapted.append(adapted_loss)
        self.original.append(original_loss)
        if len(self.adapted) < GUARD_WINDOW:
            return
        a, o = sum(self.adapted) / GUARD_WINDOW, sum(self.original) / GUARD_WINDOW
        limit = self.limit(o)
        if a > limit or not math.isfinite(a):
            raise AdaptationCollapsed(
                f"router tuning collapsed at step {step}: training LM loss {a:.2f} (mean of the last "
                f"{GUARD_WINDOW} steps) against the original's {o:.2f} on the same batches, above the limit "
                f"{limit:.2f} (original + max({self.max_loss_rise:g}, {GUARD_RELATIVE:.0%}), at most "
                f"ln(vocab)={self.limit_uniform:.2f} unless that is within {self.max_loss_rise:g} of the original); "
                f"nothing was written. {self.advice}"
            )

    def limit(self, original: float) -> float:
        """The highest training loss allowed against the original's ``original``: original +
        max(max_loss_rise, 25%), capped at ln(vocab) (worse than uniform guessing), but never
        below original + max_loss_rise (a model near uniform itself may come close to ln(vocab))."""
        relative = original + max(self.max_loss_rise, GUARD_RELATIVE * original)
        return max(original + self.max_loss_rise, min(relative, self.limit_uniform))


def heldout_windows(val: np.ndarray | torch.Tensor, seq_len: int, eval_tokens: int) -> torch.Tensor:
    """(N, T+1) windows, one after another from the start of the held-out stream ``val``: T =
    ``seq_len`` (shorter if ``val`` is), N enough for ``eval_tokens`` targets (fewer if ``val``
    runs out). A one-line ValueError when ``val`` is too short to score anything."""
    n_val = len(val)
    if n_val < 2:
        raise ValueError(
            f"the validation split has {n_val} tokens, too few to measure held-out perplexity: give more text with --data"
        )
    T = min(seq_len, n_val - 1)
    n = max(1, min(math.ceil(eval_tokens / T), n_val // (T + 1)))
    stream = val[: n * (T + 1)]
    stream = stream if isinstance(stream, torch.Tensor) else torch.from_numpy(np.asarray(stream).astype(np.int64))
    return stream.long().view(n, T + 1)


def heldout_report(original: MoDTransformer, adapted: MoDTransformer, windows_BT1: torch.Tensor) -> dict:
    """Held-out perplexity of ``adapted`` and ``original`` under causal routing (as decoding), one
    window per forward, and the fraction of the original's block compute ``adapted`` keeps there
    (its own ``compute_fraction`` scaled by its share of the original's layers: a model with
    layers removed keeps kept/L). Returns {ppl_original, ppl_adapted, compute_kept, eval_tokens}."""
    res_o = evaluate_lm(original, window_batches(original, windows_BT1, 1), routing="causal")
    res_a = evaluate_lm(adapted, window_batches(adapted, windows_BT1, 1), routing="causal")
    return {
        "ppl_original": res_o.perplexity,
        "ppl_adapted": res_a.perplexity,
        "compute_kept": res_a.compute_fraction * adapted.config.n_layers / original.config.n_layers,
        "eval_tokens": res_a.tokens,
    }
