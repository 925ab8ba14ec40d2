"""The training signal of router tuning: distillation from the frozen original, the LM loss, or both.

Axis legend: B windows, T tokens per window, V vocabulary.

The original is not a second model: it is the adapted model itself with every gate open
(``gates_open``: each routed block's causal threshold at -inf, so every token is processed with
unit weight and the block computes what the dense block did). It shares every weight, costs one
forward without gradients per step, and gives the original's next-token distribution on exactly
the batch the student sees, so the KL(original ‖ adapted) of ``kl_to_original`` is 0 at the
keep-all start and measures only what routing changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from modlm.inference.calibrate import calibratable_blocks, set_thresholds
from modlm.model.eval_mode import eval_mode
from modlm.model.transformer import MoDTransformer

__all__ = ["gates_open", "kl_to_original", "original_logits", "training_loss"]


@contextlib.contextmanager
def gates_open(model: MoDTransformer) -> Iterator[MoDTransformer]:
    """Every routed block's causal threshold at -inf for the block (causal routing then processes
    every token: the original model), the thresholds it had restored afterwards, exception or not."""
    blocks = calibratable_blocks(model)
    saved = {i: blk.router.threshold.detach().clone() for i, blk in blocks.items()}
    set_thresholds(model, float("-inf"))
    try:
        yield model
    finally:
        for i, t in saved.items():
            blocks[i].router.threshold.copy_(t)


@torch.no_grad()
def original_logits(model: MoDTransformer, x_BT: torch.Tensor) -> torch.Tensor:
    """(B, T, V) fp32 logits of the original model on ``x_BT``: ``model`` with every gate open,
    in eval mode (no dropout), without gradients."""
    with eval_mode(model), gates_open(model):
        return model(x_BT, routing="causal").logits.float()


def kl_to_original(logits_BTV: torch.Tensor, original_BTV: torch.Tensor) -> torch.Tensor:
    """KL(original ‖ adapted), nats per token (mean over B·T): sum_v p_o (log p_o - log p_a), in
    fp32. The forward KL, as in distillation: the adapted model is pushed to put mass wherever
    the original does, not only on the original's top token."""
    logp_BTV = F.log_softmax(logits_BTV.float(), dim=-1)
    logq_BTV = F.log_softmax(original_BTV.float(), dim=-1)
    kl = F.kl_div(logp_BTV.flatten(0, 1), logq_BTV.flatten(0, 1), log_target=True, reduction="batchmean")
    return kl


def training_loss(out, original_BTV: torch.Tensor | None, loss: str) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss to minimise for ``loss`` ("kl", "lm" or "kl+lm") from the model's output ``out``
    (with targets: lm_loss and aux_loss set) and the original's logits (None for "lm"), plus the
    logged parts ({"kl": ...} when computed). The routers' aux losses are always added: an A-MoD
    model trains its decode predictor only through them."""
    if loss == "lm":
        return out.loss, {}
    assert original_BTV is not None, "the kl losses need the original's logits"
    kl = kl_to_original(out.logits, original_BTV)
    total = kl + (out.loss if loss == "kl+lm" else out.aux_loss)
    return total, {"kl": float(kl.detach())}
