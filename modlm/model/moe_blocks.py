"""Mixture-of-Experts blocks and Mixture-of-Depths-and-Experts (MoDE, Raposo et al. 2024 §4.3).

Axis legend: B batch, T sequence length, K tokens routed into a block, D model width.

Three block kinds behind the one block contract (``modlm.model.block``), each with an MoE
feed-forward (``modlm.model.moe``) in place of the dense SwiGLU:

- ``"moe"`` (``MoEBlock``): dense attention over every token, then the MoE.
- ``"mode-staged"`` (``StagedMoDEBlock``): the MoD router wraps the whole block first (top-k at
  capacity, x + r·f(x), the causal predictor / aux loss as for ``"routed"``); the MoE then routes
  the MLP of the tokens the block processes. Tokens can skip attention.
- ``"mode-integrated"`` (``IntegratedMoDEBlock``): attention always runs; the MLP router picks
  among ``n_experts`` real experts and ``n_noop_experts`` no-op experts, one token-choice
  decision per token. A no-op choice is the residual path and costs nothing; the fraction of
  assignments choosing one is reported per layer (stat ``noop_frac``).

The MoE routing is token choice (each token's decision depends on that token alone), so it is
causal as it stands; only capacity dropping depends on the batch, and it applies in training
(``routing="topk"``) only.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from modlm.config import ModelConfig
from modlm.model.block import DenseBlock, RoutedBlock
from modlm.model.moe import MoE

__all__ = ["IntegratedMoDEBlock", "MoEBlock", "StagedMoDEBlock"]


class MoEBlock(DenseBlock):
    """Pre-norm block whose feed-forward is an MoE of ``config.n_experts`` SwiGLU experts.

    Returns the MoE's ``MoEOutput`` (balance + z-loss, per-expert load) as its aux output.
    """

    kind: ClassVar[str] = "moe"
    n_noop: ClassVar[bool] = False

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.mlp = MoE(config, n_noop=config.n_noop_experts if self.n_noop else 0)

    def ffn(self, h_BTD: torch.Tensor, routing: str, valid_BT: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        return self.mlp(h_BTD, routing, valid_BT)


class IntegratedMoDEBlock(MoEBlock):
    """Integrated MoDE: attention on every token; the MoE also offers ``n_noop_experts`` no-ops."""

    kind: ClassVar[str] = "mode-integrated"
    n_noop: ClassVar[bool] = True


class StagedMoDEBlock(RoutedBlock):
    """Staged MoDE: MoD routing around the block, then MoE routing of the processed tokens' MLP.

    Its aux output is the router's ``RouterOutput`` with the MoE's losses added and its
    statistics merged in (``modlm.model.block.with_ffn_aux``).
    """

    kind: ClassVar[str] = "mode-staged"

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.mlp = MoE(config)

    def ffn(self, h_BTD: torch.Tensor, routing: str, valid_BT: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        return self.mlp(h_BTD, routing, valid_BT)
