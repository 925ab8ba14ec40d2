"""The router protocol: what every router does, and the output it hands a routed block.

Axis legend: B batch, T sequence length, K tokens routed into the block, D model width.

A router does three things, and only these:

1. **Route a sequence** (``forward(x_BTD, routing, token_mask_BT, received_BT) -> RouterOutput``),
   by one of two rules (``modlm.spec.routers.ROUTINGS``):
   - ``"topk"``: expert-choice top-k over each sequence (training, and scoring a known text),
     through ``route_topk``. Non-causal: whether token t is chosen depends on later tokens.
     ``received_BT`` is the attention each token received in the previous block, which the
     model records for routers whose spec ``needs_received_attention`` (A-MoD's score); the
     others ignore it. The selection step itself is shared (``modlm.routing.ops.select_route``).
   - ``"causal"``: each token decides from its own state only (decoding; Raposo et al. 2024
     §3.5), through ``decide``.
2. **Decide causally per token** (``decide(x_BTD) -> (sel_BT, weight_BT | None)``). A router
   whose decision thresholds a logit (``RouterSpec.thresholded``) exposes the logit as
   ``causal_logits(x_BTD)`` and the threshold as its ``threshold`` buffer, and the weight its
   update is scaled by as ``token_weights(x_BTD)``; decoding and calibration use those three.
3. **Report aux losses and statistics** explicitly, in its ``RouterOutput``: nothing is stashed
   on modules or in globals.

The base class holds the routing check and the causal plumbing, so each router writes only
its own selection rule. Routers are built by name from the registry (``build_router``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from modlm.config import ModelConfig
from modlm.routing.ops import mask_to_padded_indices
from modlm.spec.routers import check_routing, router_spec


class RouterOutput(NamedTuple):
    """What a router hands the routed block.

    idx_BK: positions processed, ascending per row (causal order).
    valid_BK: None when every slot is a real selection (top-k); else a bool mask of real slots
        (causal routing selects a different number of tokens per row).
    weight_BK: multiplies the block's update (x + r * f); None means unit weight.
    aux_loss: scalar, already weighted; add it to the LM loss.
    stats: detached scalars for logging (no host sync inside forward).
    """

    idx_BK: torch.Tensor
    valid_BK: torch.Tensor | None
    weight_BK: torch.Tensor | None
    aux_loss: torch.Tensor
    stats: dict[str, torch.Tensor]


def causal_output(
    sel_BT: torch.Tensor, weight_BT: torch.Tensor | None, token_mask_BT: torch.Tensor | None, zero: torch.Tensor
) -> RouterOutput:
    """RouterOutput of per-token causal decisions: every selected real token, each row padded
    to the batch's largest count (``valid_BK`` marks real slots); weights gathered if given."""
    if token_mask_BT is not None:
        sel_BT = sel_BT & token_mask_BT
    idx_BK, valid_BK = mask_to_padded_indices(sel_BT)
    weight_BK = None if weight_BT is None else torch.gather(weight_BT, 1, idx_BK)
    n_real = sel_BT.numel() if token_mask_BT is None else token_mask_BT.sum().clamp(min=1)
    return RouterOutput(idx_BK, valid_BK, weight_BK, zero, {"routed_frac": (sel_BT.sum() / n_real).detach()})


class Router(nn.Module):
    """Base of every router (see the module docstring for the protocol).

    Subclasses implement ``route_topk`` and ``decide``; thresholded routers also implement
    ``causal_logits`` and ``token_weights`` and register a ``threshold`` buffer.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.capacity = config.capacity

    def forward(
        self,
        x_BTD: torch.Tensor,
        routing: str = "topk",
        token_mask_BT: torch.Tensor | None = None,
        received_BT: torch.Tensor | None = None,
    ) -> RouterOutput:
        """Route a (B, T, D) stream. ``token_mask_BT`` marks real tokens (left padding is never routed).

        ``received_BT``: the attention each token received in the previous block, which the model
        records for routers whose spec ``needs_received_attention`` (A-MoD); others ignore it.
        """
        if check_routing(routing) == "causal":
            return self.route_causal(x_BTD, token_mask_BT)
        return self.route_topk(x_BTD, token_mask_BT, received_BT)

    def route_causal(self, x_BTD: torch.Tensor, token_mask_BT: torch.Tensor | None) -> RouterOutput:
        """Every token's own causal decision (``decide``) over a whole sequence; a router whose rule
        also depends on a token's position in its row (e.g. attention sinks) overrides this."""
        zero = x_BTD.new_zeros((), dtype=torch.float32)
        return causal_output(*self.decide(x_BTD), token_mask_BT, zero)

    def route_topk(
        self, x_BTD: torch.Tensor, token_mask_BT: torch.Tensor | None, received_BT: torch.Tensor | None = None
    ) -> RouterOutput:
        """Expert-choice selection over each sequence (or over each row's real tokens).
        ``received_BT``: see ``forward``; only routers that declare the need read it."""
        raise NotImplementedError

    def decide(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token causal routing: (sel_BT bool, weight_BT or None for unit weight).
        Each token's decision depends on that token alone."""
        raise NotImplementedError

    def causal_logits(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """The fp32 logit (B, T) that ``decide`` compares with ``threshold`` (thresholded routers)."""
        raise NotImplementedError(f"{type(self).__name__} does not threshold a logit")

    def token_weights(self, x_BTD: torch.Tensor) -> torch.Tensor | None:
        """The weight (B, T) a processed token's update is scaled by; None: unit weight."""
        return None


def build_router(config: ModelConfig) -> Router:
    """The router for a routed block of this config (``config.router`` names it in the registry)."""
    return router_spec(config.router).load()(config)
