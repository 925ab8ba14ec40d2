"""Token-choice routing: each token decides for itself whether a routed block processes it.

The MoD paper (Raposo et al. 2024, §3.1-3.2) considered this and chose expert-choice top-k
instead: token choice needs a balancing loss, its load varies from sequence to sequence, and a
fixed compute budget means dropping or padding. This router exists to measure that trade-off
at equal FLOPs (``modlm reproduce``). It is ``router="token_choice"`` in the registry.

Axis legend: B batch, T sequence length, K slots of the routed block, D model width.

What it does (our design; the paper gives no recipe):

- Decision: r_t = w·x_t (one fp32 logit per token), gate g_t = sigmoid(r_t); token t asks to be
  processed iff g_t > 0.5, i.e. r_t > ``threshold`` (0). The decision depends on the token
  alone, so it is causal: training and decoding route the same way (up to the cap below).
- Static shapes, exact compute: a routed block keeps K = capacity_k(capacity, T) slots per
  sequence, as expert-choice does (capacity factor 1). If more than K tokens ask, the K with
  the largest r_t are processed and the rest are *dropped* (they ride the residual stream, as
  in MoE token dropping); if fewer ask, the spare slots are *padding*: computed and discarded.
  So its FLOPs equal expert-choice's at the same capacity, and under-use shows as waste.
  In ``"causal"`` mode (decoding, causal evaluation) there is no cap: every token that asks is
  processed, so the processed fraction is whatever the router has learnt.
- Update: x_t + g_t · f_t for processed tokens (g_t in (0.5, 1)), which puts the router on the
  LM gradient path the way MoD's x + r·f does.
- Balancing loss, per sequence: with h_b the fraction of tokens that ask (hard) and s_b the mean
  gate (soft), ``aux_loss_weight * mean_b (h_b + s_b - sg(s_b) - capacity)^2``. Its value is the
  squared gap between the real asking fraction and the capacity; its gradient is
  2·(h_b - capacity)·∂s_b, which lowers every gate of an over-subscribed sequence and raises
  those of an under-subscribed one (a straight-through estimate of the hard fraction).
  ``ModelConfig.aux_loss_weight`` is its weight (the BCE weight of the learned router is the
  same field); 0.01, the default, balances too weakly at small scale: use ~1.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from modlm.config import ModelConfig
from modlm.routing.base import Router, RouterOutput
from modlm.routing.ops import router_scores
from modlm.spec import roles
from modlm.spec.capacity import capacity_k

__all__ = ["TokenChoiceRouter", "capped_selection"]


def capped_selection(scores_BT: torch.Tensor, chosen_BT: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``k`` of the chosen tokens per row, the highest-scoring ones, in exactly k slots.

    Args:
        scores_BT: routing scores (B, T); only their order among chosen tokens matters.
        chosen_BT: bool (B, T), tokens that asked to be processed.
        k: slots per row, 1 <= k <= T.
    Returns:
        idx_BK: int64 (B, k). Processed positions first, ascending (causal order); then padding
            slots pointing at T - 1. Padding sits after every real slot, so the block's causal
            mask hides it from real queries.
        valid_BK: bool (B, k), True for real slots.
    """
    B, T = scores_BT.shape
    if not 1 <= k <= T:
        raise ValueError(f"k={k} must be in [1, T={T}]")
    masked_BT = scores_BT.masked_fill(~chosen_BT, float("-inf"))
    # Stable descending sort: ties (and the -inf of unchosen tokens) resolve to earlier positions.
    order_BT = torch.sort(masked_BT, dim=-1, descending=True, stable=True).indices
    keep_BT = torch.zeros_like(chosen_BT).scatter(1, order_BT[:, :k], True) & chosen_BT
    pos_T = torch.arange(T, device=scores_BT.device)
    # Kept positions sort first in ascending order, then the rest: key = pos (kept) or T + pos.
    key_BT = torch.where(keep_BT, pos_T, pos_T + T)
    idx_BK = torch.sort(key_BT, dim=-1).indices[:, :k]
    valid_BK = torch.gather(keep_BT, 1, idx_BK)
    idx_BK = idx_BK.masked_fill(~valid_BK, T - 1)
    return idx_BK, valid_BK


class TokenChoiceRouter(Router):
    """Per-token sigmoid gate with a balancing loss and a K-slot cap (see the module docstring)."""

    param_roles = {"weight": roles.ROUTER}

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.balance_weight = config.aux_loss_weight
        self.weight = nn.Parameter(torch.zeros(config.d_model))  # init by MoDTransformer.init_weights
        # Logit threshold of the decision (0 <=> g = 0.5); a buffer like LearnedRouter.threshold,
        # so modlm.inference.calibrate can move it.
        self.register_buffer("threshold", torch.zeros(()), persistent=True)

    def scores(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """Router logits r_BT in fp32."""
        return router_scores(x_BTD, self.weight)

    def causal_logits(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """The decision signal is the router logit itself."""
        return self.scores(x_BTD)

    def token_weights(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """The gate g = sigmoid(r): a processed token becomes x + g·f(x)."""
        return torch.sigmoid(self.scores(x_BTD))

    def decide(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sel_BT = r > threshold, weight_BT = sigmoid(r)); each token decides alone. In causal
        mode there is no cap: every token that asks is processed."""
        r_BT = self.scores(x_BTD)
        return r_BT > self.threshold, torch.sigmoid(r_BT)

    def route_topk(
        self, x_BTD: torch.Tensor, token_mask_BT: torch.Tensor | None, received_BT: torch.Tensor | None = None
    ) -> RouterOutput:
        """At most K tokens per row, in exactly K slots (``valid_BK`` marks the real ones)."""
        B, T, _ = x_BTD.shape
        zero = x_BTD.new_zeros((), dtype=torch.float32)
        r_BT = self.scores(x_BTD)
        g_BT = torch.sigmoid(r_BT)
        chosen_BT = r_BT.detach() > self.threshold
        real_BT = torch.ones_like(chosen_BT) if token_mask_BT is None else token_mask_BT
        chosen_BT = chosen_BT & real_BT
        n_real = real_BT.sum().clamp(min=1)
        k = capacity_k(self.capacity, T)
        idx_BK, valid_BK = capped_selection(r_BT.detach(), chosen_BT, k)
        weight_BK = torch.gather(g_BT, 1, idx_BK)
        processed = valid_BK.sum()
        stats = {
            "routed_frac": (processed / n_real).detach(),  # processed (after the cap)
            "chosen_frac": (chosen_BT.sum() / n_real).detach(),  # asked (before the cap)
            "dropped_frac": ((chosen_BT.sum() - processed) / n_real).detach(),  # asked, over the cap
            "empty_slot_frac": (1.0 - processed / valid_BK.numel()).detach(),
        }  # padding computed
        aux = zero
        if token_mask_BT is None:  # training: balance each sequence's asking fraction towards capacity
            hard_B = chosen_BT.float().mean(1)
            soft_B = g_BT.mean(1)
            frac_B = hard_B + soft_B - soft_B.detach()  # value: hard fraction; gradient: soft
            balance = (frac_B - self.capacity).pow(2).mean()
            aux = self.balance_weight * balance
            stats["balance"] = balance.detach()
        return RouterOutput(idx_BK, valid_BK, weight_BK, aux, stats)
