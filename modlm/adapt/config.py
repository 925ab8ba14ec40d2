"""What ``modlm adapt`` does: ``AdaptConfig`` and the routed layers' defaults.

Two routers:

- ``tuned`` (``modlm.routing.tuned``): a zero-initialised score w·x̂ trained through the LM loss
  (straight-through unit weights, so processed tokens compute exactly what the original block
  computes); decodes by thresholding the score.
- ``attention`` (A-MoD, ``modlm.routing.attention_based``): parameter-free top-k of the attention
  received in the previous block; only its stop-gradient decode predictor trains, by BCE on the
  top-k decisions, so nothing backpropagates through the frozen model at all.

Keep-all start: both routers decide causally by thresholding a logit, and every threshold starts
at -inf, so the adapted model, before tuning, processes every token in every layer and computes
exactly what the original does (``x + f(x)``, unit weights). Tuning trains with top-k at the
target capacity; calibration (``modlm.inference.calibrate``) then sets each threshold at the
quantile that routes the capacity on the sample, layer by layer.

Default sizing (SmolLM2-135M, 30 layers, one thread: ~2.2 s a step on a quiet CPU, ~5.4 s on the
shared one the study ran on, so ~10-20 min in all with the calibration): route the later half of
the layers but the last (14..28), sequences of 256 tokens, batch 1, 200 steps, lr 2e-3, the
capacity annealed from 1 over the first half. Routing the later layers follows Router-Tuning
(arXiv 2410.13184): early layers build the representation every later layer reads; the last
layer feeds the head directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from modlm.validation import is_int, is_number, require

__all__ = ["ADAPT_ROUTERS", "AdaptConfig", "default_layers", "parse_layers"]

ADAPT_ROUTERS = ("tuned", "attention")


def default_layers(n_layers: int) -> tuple[int, ...]:
    """The later half of the layers but the last (and never layer 0): 14..28 of 30."""
    start = max(1, n_layers - 1 - n_layers // 2)
    return tuple(range(start, max(start, n_layers - 1)))


def parse_layers(text: str) -> tuple[int, ...]:
    """ "14-28" or "3,5,7" or "10-12,20" -> sorted unique layer indices (one-line ValueError)."""
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            a, b = (int(lo), int(hi)) if sep else (int(part), int(part))
        except ValueError:
            raise ValueError(f"--layers {text!r} is invalid: give indices and ranges, e.g. 14-28 or 3,5,7") from None
        if a > b:
            raise ValueError(f"--layers {text!r} is invalid: range {part!r} runs backwards")
        out.update(range(a, b + 1))
    return tuple(sorted(out))


@dataclass
class AdaptConfig:
    """What ``modlm adapt`` does (see the module docstring for the defaults' reasons).

    router: "tuned" or "attention". capacity: fraction of the tokens a routed layer processes.
    layers: the layers to route (None: ``default_layers``). seq_len, batch_size, steps, lr:
    the tuning run (AdamW, no weight decay). calib_tokens: tokens of the sample the thresholds
    are calibrated on. anneal: fraction of the steps over which the training capacity falls
    linearly from 1.0 to ``capacity`` (keep-all start in training too: the first steps see nearly
    the original model, instead of a zero-initialised top-k that keeps the first k tokens of
    every window). None: 0.5 for ``tuned``, 0 for ``attention`` (its predictor learns the target
    capacity's decisions). grad_clip: max gradient norm per clip group (the trainer's clipping,
    ``modlm.training.optim.clip_gradients``); 0, the default, disables it. seed: the windows'.
    """

    router: str = "tuned"
    capacity: float = 0.5
    layers: tuple[int, ...] | None = None
    seq_len: int = 256
    batch_size: int = 1
    steps: int = 200
    lr: float = 2e-3
    calib_tokens: int = 1024
    anneal: float | None = None
    seed: int = 0
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        def check(cond: bool, name: str, allowed: str) -> None:
            require(cond, "AdaptConfig", name, getattr(self, name), allowed)

        check(self.router in ADAPT_ROUTERS, "router", f"must be one of {ADAPT_ROUTERS}")
        check(is_number(self.capacity) and 0 < self.capacity <= 1, "capacity", "must be in (0, 1]")
        check(is_int(self.seq_len) and self.seq_len >= 2, "seq_len", "must be an int >= 2")
        check(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "must be an int >= 1")
        check(is_int(self.steps) and self.steps >= 0, "steps", "must be an int >= 0")
        check(is_number(self.lr) and self.lr > 0, "lr", "must be > 0")
        check(is_int(self.calib_tokens) and self.calib_tokens >= 1, "calib_tokens", "must be an int >= 1")
        if self.anneal is None:
            self.anneal = 0.5 if self.router == "tuned" else 0.0
        check(is_number(self.anneal) and 0 <= self.anneal <= 1, "anneal", "must be in [0, 1]")
        check(is_int(self.seed), "seed", "must be an int")
        check(is_number(self.grad_clip) and self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        if self.layers is not None:
            self.layers = tuple(self.layers)
            check(len(self.layers) > 0 and all(is_int(i) for i in self.layers), "layers", "must name some layers")
