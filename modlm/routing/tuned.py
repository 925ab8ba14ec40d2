"""Router tuning for pretrained models: a zero-initialised score, unit-weight updates, a causal threshold.

Axis legend: B batch, T sequence length, K tokens routed into the block, D model width.

Built for ``modlm adapt`` (after Router-Tuning / MindSkip, arXiv 2410.13184, and the threshold
operator of MoDification, arXiv 2410.14268): a pretrained block must keep computing exactly what
it computed for the tokens it still processes, so the update is x + f(x) (r = 1 in the forward),
never x + r·f(x) with a fresh r that would rescale the pretrained block.

- Score s = w · x̂, x̂ = x / rms(x) (the residual stream of a pretrained model has a few huge
  channels and positions; normalising keeps w's scale meaningful), fp32, w initialised to 0.
- Top-k (training, scoring a known text): the k tokens of each sequence with the largest s. The
  weight is 1 + s - stopgrad(s): exactly 1 in the forward, and ds = <dL/dy, f(x)> in the
  backward, so a token's score rises where the block's update lowers the loss (the signal MoD's
  r·f gives its router) while the pretrained computation is untouched.
- Causal (decoding): s > ``threshold``. The buffer starts at -inf (keep-all start: every token is
  processed, so a freshly adapted model computes exactly what the original does); after tuning,
  ``calibrate_thresholds`` puts it at the score quantile that routes the target capacity.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from modlm.config import ModelConfig
from modlm.routing.base import Router, RouterOutput
from modlm.routing.ops import normalized_scores, select_route
from modlm.spec import roles

__all__ = ["TunedRouter"]


class TunedRouter(Router):
    """Zero-initialised score on the normalised stream; unit-weight (straight-through) updates."""

    param_roles = {"weight": roles.ROUTER_ZERO}

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.weight = nn.Parameter(torch.zeros(config.d_model))
        self.register_buffer("threshold", torch.full((), float("-inf")), persistent=True)

    def scores(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """s = w · x / rms(x), (B, T) fp32 (``modlm.routing.ops.normalized_scores``)."""
        return normalized_scores(x_BTD, self.weight)

    def causal_logits(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.scores(x_BTD)

    def decide(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, None]:
        """s above ``threshold``; unit weight."""
        return self.scores(x_BTD) > self.threshold, None

    def route_topk(
        self, x_BTD: torch.Tensor, token_mask_BT: torch.Tensor | None, received_BT: torch.Tensor | None = None
    ) -> RouterOutput:
        """Top-k of s per sequence (or per row's real tokens); straight-through unit weights."""
        zero = x_BTD.new_zeros((), dtype=torch.float32)
        s_BT = self.scores(x_BTD)
        idx_BK, valid_BK, frac = select_route(s_BT.detach(), self.capacity, token_mask_BT)
        weight_BK = None
        if s_BT.requires_grad:  # 1 in value, ds in the backward (see the module docstring)
            s_BK = torch.gather(s_BT, 1, idx_BK)
            weight_BK = 1.0 + (s_BK - s_BK.detach())
        return RouterOutput(idx_BK, valid_BK, weight_BK, zero, {"routed_frac": frac})
