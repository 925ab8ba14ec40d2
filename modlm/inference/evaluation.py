"""The one held-out loss loop, and the one measure of the block compute a model kept.

``evaluate_lm`` is what every validation loss and perplexity in modlm comes from: the trainer's
periodic evaluation (``modlm.training.evaluation``), the threshold sweep
(``modlm.inference.calibrate.sweep_knob``), the adaptation study and ``modlm bench adapt``. The
routing mode is a parameter: ``"topk"`` looks at the whole sequence (training's routing, the
optimistic loss), ``"causal"`` routes each token by its own causal signal, as decoding does.

``block_compute_fraction`` is the fraction of block compute kept: every layer counts 1/L of it
and a routed layer keeps its processed share. ``EvalResult.compute_fraction`` applies it to an
evaluation's routes, ``decode_compute_fraction`` to a traced generation's decisions.

Axis legend: B windows per forward, T tokens per window (inputs), L layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from modlm.devices import autocast
from modlm.model.block import route_mask
from modlm.model.eval_mode import eval_mode
from modlm.model.inputs import check_token_ids

__all__ = [
    "EvalResult",
    "block_compute_fraction",
    "decode_compute_fraction",
    "evaluate_lm",
    "window_batches",
]


def block_compute_fraction(n_layers: int, processed: Mapping[int, float]) -> float:
    """Fraction of the block compute of ``n_layers`` layers kept, when each layer named in
    ``processed`` ({layer: share of the tokens it processed}) runs that share and every other
    layer runs all tokens. Routing n of L layers at share c keeps 1 - n(1 - c)/L."""
    return (n_layers - len(processed) + sum(processed.values())) / n_layers


@dataclass(frozen=True)
class EvalResult:
    """What ``evaluate_lm`` measured.

    loss: mean next-token LM loss, nats/token (aux losses excluded). tokens: targets scored.
    routed_frac: the routers' own ``routed_frac`` statistic, mean over routed blocks and batches
    (None when no block reports one). layer_fractions: {routed layer: share of the tokens its
    route processed}, token-weighted over the batches. n_layers: the model's layers.
    """

    loss: float
    tokens: int
    n_layers: int
    routed_frac: float | None = None
    layer_fractions: dict[int, float] = field(default_factory=dict)

    @property
    def perplexity(self) -> float:
        """exp(loss)."""
        return math.exp(self.loss)

    @property
    def compute_fraction(self) -> float:
        """Fraction of the block compute the evaluation kept (``block_compute_fraction``)."""
        return block_compute_fraction(self.n_layers, self.layer_fractions)


def window_batches(
    model: nn.Module, windows_BT1: torch.Tensor, batch_size: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) batches of ``batch_size`` rows (None: all at once) of (B, T+1) token
    windows, on the model's device; a one-line ValueError for windows the model cannot read."""
    if not isinstance(windows_BT1, torch.Tensor) or windows_BT1.dim() != 2 or windows_BT1.shape[1] < 2:
        raise ValueError("validation windows must be a (B, T+1) tensor of token ids with T >= 1")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: must be >= 1 (or None: every window at once)")
    check_token_ids(windows_BT1, model.config.vocab_size, "validation windows", check_range=True)
    if windows_BT1.shape[1] - 1 > model.config.max_seq_len:
        raise ValueError(
            f"validation windows have {windows_BT1.shape[1] - 1} input tokens per row, "
            f"more than max_seq_len={model.config.max_seq_len}"
        )
    windows_BT1 = windows_BT1.to(next(model.parameters()).device)
    step = windows_BT1.shape[0] if batch_size is None else batch_size
    for i in range(0, windows_BT1.shape[0], step):
        w = windows_BT1[i : i + step]
        yield w[:, :-1], w[:, 1:]


def evaluate_lm(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    routing: str = "topk",
    dtype: str = "fp32",
    seed: int | None = None,
) -> EvalResult:
    """The mean next-token loss of ``model`` over ``batches`` of (x_BT, y_BT), in eval mode
    without gradients, under ``routing`` ("topk" or "causal") and ``dtype`` autocast.

    ``seed``: run under a forked RNG seeded with it, so a random router gives the same estimate
    every time and the caller's random streams do not advance (None: use and advance the
    caller's RNG). The model's mode is restored afterwards, exception or not.
    """
    device = next(model.parameters()).device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    total = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = 0
    fracs: list[float] = []
    kept: dict[int, torch.Tensor] = {}
    with eval_mode(model), torch.no_grad(), torch.random.fork_rng(devices=cuda, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for x_BT, y_BT in batches:
            with autocast(device, dtype):
                out = model(x_BT, y_BT, routing=routing)
            total += out.lm_loss.double() * y_BT.numel()
            n_tokens += y_BT.numel()
            routed = [v for k, v in out.router_stats().items() if k.endswith("/routed_frac")]
            if routed:
                fracs.append(sum(routed) / len(routed))
            for i, r in out.routes.items():  # tokens each routed layer processed (a count, on device)
                kept[i] = kept.get(i, 0) + route_mask(r, x_BT.shape[1]).sum()
    return EvalResult(
        loss=(total / max(1, n_tokens)).item(),
        tokens=n_tokens,
        n_layers=model.config.n_layers,
        routed_frac=sum(fracs) / len(fracs) if fracs else None,
        layer_fractions={i: float(k) / max(1, n_tokens) for i, k in kept.items()},
    )


def decode_compute_fraction(model: nn.Module, result) -> float:
    """Fraction of block compute a traced generation (``generate(..., trace=True)``) kept: each
    routed layer's share of the decoded tokens it processed (``block_compute_fraction``)."""
    steps = [r for row in result.routing for r in row]
    if not steps:
        return 1.0
    shares = {i: sum(i in s for s in steps) / len(steps) for i in model.config.routed_layers}
    return block_compute_fraction(model.config.n_layers, shares)
