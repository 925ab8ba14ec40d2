"""What ``modlm adapt`` does: ``AdaptConfig`` and the routed layers' defaults.

Two methods (``ADAPT_METHODS``):

- ``tune-routers`` (the default): routers on chosen layers, tuned on a text sample (below).
- ``remove-layers``: the baseline to beat, static removal of the blocks of lowest block influence
  (ShortGPT, arXiv 2403.03853: 1 - cos(block input, block output) on a calibration sample),
  never the first or the last; ``keep`` (a fraction of the blocks, rounded) or ``drop`` (a count).

The training signal of router tuning (``ADAPT_LOSSES``): ``lm`` (the default), the LM loss on the
sample's next tokens; ``kl``, KL(original ‖ adapted) between the next-token distributions of the
original (the same weights with every gate open) and the gated model, i.e. distillation from the
frozen original; ``kl+lm``, their sum. ``lm`` stays the default: on a tiny pretrained model (4
layers, 2 routed at 0.5, 3 seeds) the three ended within noise of each other on held-out text
(perplexity 1.170x / 1.170x / 1.161x the original's after 100 steps at lr 2e-3; 1.143x / 1.149x /
1.138x after 300 at 1e-2), against 1.68x untrained. The tuned router's straight-through gradient
reaches only the tokens a layer processed, which limits any loss alike.

Two routers:

- ``tuned`` (``modlm.routing.tuned``): a zero-initialised score w·x̂ trained through the LM loss
  (straight-through unit weights, so processed tokens compute exactly what the original block
  computes); decodes by thresholding the score.
- ``attention`` (A-MoD, ``modlm.routing.attention_based``): parameter-free top-k of the attention
  received in the previous block; only its stop-gradient decode predictor trains, by BCE on the
  top-k decisions, so nothing backpropagates through the frozen model at all.

- ``gate`` (``modlm.routing.gate``): hard gates s > threshold, the same rule in training and
  decoding, straight-through to every token (a skipped token learns it should have been
  processed), the first ``ModelConfig.n_sink`` tokens always processed; its routed layers are
  ``"keys-kept"`` (a skipped token still writes its key and value), where training computes
  every token's update (the dense layer's cost) and decoding skips for real. A compute term,
  ``compute_weight``·(mean soft gate - capacity)², holds the training compute near the target;
  no capacity anneal by default. Its keep-all start is its own (w = 0 below a threshold of -2).

Keep-all start: the tuned and attention routers decide causally by thresholding a logit, and every threshold starts
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

import math
from dataclasses import dataclass

from modlm.spec.fields import flag
from modlm.validation import is_int, is_number, require

__all__ = ["ADAPT_LOSSES", "ADAPT_METHODS", "ADAPT_ROUTERS", "AdaptConfig", "default_layers", "parse_layers"]

ADAPT_ROUTERS = ("tuned", "attention", "gate")
ADAPT_METHODS = ("tune-routers", "remove-layers")
ADAPT_LOSSES = ("kl", "lm", "kl+lm")
# The blocks remove-layers keeps when neither keep nor drop is given.
DEFAULT_KEEP = 0.8


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
    capacity's decisions) and ``gate`` (its compute term moves the gates from their open start).
    compute_weight: ``gate`` only, the weight of its compute term (the mean soft gate pulled to
    the training capacity). grad_clip: max gradient norm per clip group (the trainer's clipping,
    ``modlm.training.optim.clip_gradients``); 0, the default, disables it. seed: the windows'.

    method: "tune-routers" or "remove-layers". loss: "kl", "lm" or "kl+lm" (tune-routers).
    keep / drop: remove-layers only, at most one of them (neither: keep ``DEFAULT_KEEP``).
    eval_tokens: held-out tokens (the data's validation split) on which the adapted and the
    original model's perplexities are measured at the end. max_loss_rise: the collapse guard of
    router tuning (``modlm.adapt.guards.CollapseGuard``), in nats; 0 turns it off.
    """

    # Each field with a flag is a ``modlm adapt`` option (``modlm.spec.fields.add_field_flags``).
    method: str = flag(
        "tune-routers",
        None,
        "tune-routers (MoD routers on a frozen base) or remove-layers (drop whole blocks)",
        choices=ADAPT_METHODS,
    )
    loss: str = flag(
        "lm",
        None,
        "tune-routers: kl = distillation from the original's next-token distribution, lm = the LM loss, "
        "kl+lm = their sum",
        choices=ADAPT_LOSSES,
    )
    keep: float | None = flag(
        None,
        None,
        "remove-layers: fraction of the blocks to keep, rounded",
        shown=f"{DEFAULT_KEEP} unless --drop",
    )
    drop: int | None = flag(
        None, None, "remove-layers: number of blocks to drop, instead of --keep", shown="none, --keep decides"
    )
    eval_tokens: int = flag(2048, None, "held-out tokens the final perplexities are measured on")
    max_loss_rise: float = flag(
        1.0,
        None,
        "tune-routers: stop, writing nothing, when the training LM loss (mean of the last 10 steps) exceeds "
        "the original's on the same batches by more than max(this many nats, 25%%), or ln(vocab); 0 = no guard",
    )
    router: str = flag(
        "tuned", None, "tune-routers: tuned, attention (A-MoD) or gate (hard causal gates)", choices=ADAPT_ROUTERS
    )
    capacity: float = flag(0.5, None, "tune-routers: fraction of tokens a routed layer processes")
    layers: tuple[int, ...] | None = flag(
        None,
        None,
        "tune-routers: layers to route, e.g. 14-28 or 3,5,7",
        shown="the later half but the last",
        type=parse_layers,
    )
    seq_len: int = flag(256, None, "tokens per training window")
    batch_size: int = flag(1, None, "windows per step")
    steps: int = flag(200, None, "optimizer steps on the routing parameters")
    lr: float = flag(2e-3, None, "AdamW learning rate of the routing parameters")
    calib_tokens: int = flag(
        1024, None, "tokens to calibrate thresholds (tune-routers) or rank the layers (remove-layers) on"
    )
    anneal: float | None = None
    seed: int = flag(0, None, "seed of the window sampling")
    grad_clip: float = flag(0.0, None, "max gradient norm per clip group, 0 = off")
    compute_weight: float = flag(
        1.0, None, "router gate: weight of (mean soft gate - capacity)^2, which holds the compute near the target"
    )

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
        check(is_number(self.compute_weight) and 0 <= self.compute_weight < math.inf, "compute_weight", "must be >= 0")
        if self.layers is not None:
            self.layers = tuple(self.layers)
            check(len(self.layers) > 0 and all(is_int(i) for i in self.layers), "layers", "must name some layers")
        self._check_method(check)

    def _check_method(self, check) -> None:
        """The method, the loss, removal's keep/drop and the guards."""
        check(self.method in ADAPT_METHODS, "method", f"must be one of {ADAPT_METHODS}")
        check(self.loss in ADAPT_LOSSES, "loss", f"must be one of {ADAPT_LOSSES}")
        check(is_int(self.eval_tokens) and self.eval_tokens >= 1, "eval_tokens", "must be an int >= 1")
        check(
            is_number(self.max_loss_rise) and 0 <= self.max_loss_rise < float("inf"),
            "max_loss_rise",
            "must be a finite number of nats >= 0 (0 turns the collapse guard off)",
        )
        removing = self.method == "remove-layers"
        for name in ("keep", "drop"):
            check(getattr(self, name) is None or removing, name, "applies to method remove-layers only")
        check(self.keep is None or self.drop is None, "keep", f"give keep or drop, not both (drop={self.drop})")
        check(self.keep is None or (is_number(self.keep) and 0 < self.keep <= 1), "keep", "must be in (0, 1]")
        check(self.drop is None or (is_int(self.drop) and self.drop >= 1), "drop", "must be an int >= 1")

    def layers_to_drop(self, n_layers: int) -> int:
        """How many of ``n_layers`` blocks remove-layers drops: ``drop``, or the blocks beyond
        round(keep * n_layers); at most n_layers - 2 (the first and the last always stay)."""
        keep = DEFAULT_KEEP if self.keep is None and self.drop is None else self.keep
        n = self.drop if keep is None else n_layers - math.floor(keep * n_layers + 0.5)
        if n > n_layers - 2:
            what = f"drop={self.drop}" if keep is None else f"keep={keep:g} ({n} blocks dropped)"
            raise ValueError(
                f"{what} is invalid for a model of {n_layers} layers: at most {n_layers - 2} can go "
                "(the first and the last layer are never dropped)"
            )
        return n
