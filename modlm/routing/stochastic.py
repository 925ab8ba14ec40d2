"""The random-routing baseline: stochastic top-k, no parameters (Raposo et al. 2024, §4.1).

Axis legend: B batch, T sequence length, K tokens routed into the block, D model width.
"""

from __future__ import annotations

import torch

from modlm.config import ModelConfig
from modlm.routing.base import Router, RouterOutput
from modlm.routing.ops import capacity_k, select_topk, select_topk_masked


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

    def route_topk(self, x_BTD: torch.Tensor, token_mask_BT: torch.Tensor | None) -> RouterOutput:
        """A uniformly random k tokens per sequence (or per row's real tokens)."""
        B, T, _ = x_BTD.shape
        zero = x_BTD.new_zeros((), dtype=torch.float32)
        u_BT = torch.rand(B, T, device=x_BTD.device)
        if token_mask_BT is not None:
            idx_BK, valid_BK = select_topk_masked(u_BT, token_mask_BT, self.capacity)
            return RouterOutput(
                idx_BK, valid_BK, None, zero, {"routed_frac": valid_BK.float().sum() / token_mask_BT.sum()}
            )
        k = capacity_k(self.capacity, T)
        return RouterOutput(select_topk(u_BT, k), None, None, zero, {"routed_frac": zero + k / T})
