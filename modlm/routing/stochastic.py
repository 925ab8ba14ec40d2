"""The random-routing baseline: stochastic top-k, no parameters (Raposo et al. 2024, §4.1).

Axis legend: B batch, T sequence length, K tokens routed into the block, D model width.
"""

from __future__ import annotations

import torch

from modlm.config import ModelConfig
from modlm.routing.base import Router, RouterOutput
from modlm.routing.ops import select_route


class RandomRouter(Router):
    """Baseline: a random k tokens per sequence (stochastic top-k), unit weight, no parameters.

    The paper reports it drastically worse than learned routing. In causal mode each token is
    routed independently with probability ``capacity``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config)

    def decide(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Each token independently with probability ``capacity``; unit weight."""
        B, T, _ = x_BTD.shape
        return torch.rand(B, T, device=x_BTD.device) < self.capacity, None

    def route_topk(
        self, x_BTD: torch.Tensor, token_mask_BT: torch.Tensor | None, received_BT: torch.Tensor | None = None
    ) -> RouterOutput:
        """A uniformly random k tokens per sequence (or per row's real tokens)."""
        B, T, _ = x_BTD.shape
        zero = x_BTD.new_zeros((), dtype=torch.float32)
        idx_BK, valid_BK, frac = select_route(torch.rand(B, T, device=x_BTD.device), self.capacity, token_mask_BT)
        return RouterOutput(idx_BK, valid_BK, None, zero, {"routed_frac": frac})
