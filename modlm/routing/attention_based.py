"""A-MoD: parameter-free routing by the attention a token receives (Gadhikar et al., arXiv 2412.20875).

Axis legend: B batch, T sequence length (tokens of the providing block), K tokens routed into a
block, D model width, H query heads, G key/value heads, E head size.

A routed block's score for token t is the attention t receives in the *previous* block, averaged
over heads and causally normalised (``received_attention``); the block takes the top-k at its
capacity. The router has no score parameters.

Where the scores come from: fused attention (SDPA) does not return its probabilities, so the
previous block recomputes them for this purpose: the model names the blocks that must provide
received attention (``BlockContext.record_attention``, built from ``RouterSpec.needs_received_attention``),
their attention hands its queries and keys to ``received_attention``, and the block stores the
(B, T) statistic in ``BlockContext.received_attention``. That costs one extra QK^T product
(2·T²·H·E FLOPs per providing block, no backward: the scores only choose indices), which
``modlm.flops`` counts. It happens only when routing by top-k (training, scoring a known text,
a top-k prefill); decoding never needs it.

Causal normalisation (our choice, the paper has no language-model variant). The raw column mean
over queries is non-causal and favours early tokens twice over: more queries see them, and the
first queries have few keys to spread their mass over. We divide the column sum by the number of
queries that can see the token (itself and every later real query): the score is the mean
attention the token gets *per query that could attend to it*. This removes the count bias while
keeping the scale a probability in [0, 1]; a token seen only by itself scores its own
self-attention. It is still non-causal (later queries contribute), hence the decode rule below.

Decode rule: a small stop-gradient predictor (``CausalPredictor``, the learned router's §3.5
machinery) learns A-MoD's top-k membership from the token's own state by BCE; a decoded token
routes iff the predictor's logit exceeds ``threshold`` (a buffer; ``modlm calibrate`` moves it).
Nothing backpropagates into the model from it, so the predictor trains on a frozen base too.

The update: A-MoD has no learned score to put on the gradient path, so a processed token becomes
x + f(x) (r = 1): at capacity 1.0 the model is exactly the dense one, and on a pretrained model
every processed token computes exactly what the original block computes for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modlm.config import ModelConfig
from modlm.routing.base import Router, RouterOutput
from modlm.routing.expert_choice import CausalPredictor

# received_attention lives in ops (a plain tensor op) so the blocks that record it need no router import.
from modlm.routing.ops import received_attention, select_route, topk_mask

__all__ = ["AttentionRouter", "received_attention"]


class AttentionRouter(Router):
    """A-MoD expert-choice router: top-k of the previous block's received attention.

    No score parameters; a processed token becomes x + f(x). Causal decisions (decoding,
    ``routing="causal"``) come from a stop-gradient predictor trained on the top-k decisions
    (see the module docstring).
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.pred_weight = config.predictor_loss_weight
        self.predictor = CausalPredictor(config.d_model, config.predictor_hidden, config.capacity)
        # NOTE: the predictor's score input is a constant 0 (there is no learned score), so its
        # standardised score term vanishes and only its MLP on x and its bias decide.
        self.register_buffer("threshold", torch.zeros(()), persistent=True)

    def causal_logits(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """The predictor's logit (B, T) in fp32 from each token's own state."""
        return self.predictor(x_BTD, x_BTD.new_zeros(x_BTD.shape[:2], dtype=torch.float32))

    def decide(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Per-token causal routing: predictor logit above ``threshold``; unit weight."""
        return self.causal_logits(x_BTD) > self.threshold, None

    def route_topk(
        self, x_BTD: torch.Tensor, token_mask_BT: torch.Tensor | None, received_BT: torch.Tensor | None = None
    ) -> RouterOutput:
        """Top-k of ``received_BT``, the previous block's received attention over the same T tokens
        (the model records it for this router); the predictor learns the top-k membership."""
        if received_BT is None:
            raise ValueError(
                "router='attention' routes top-k by the previous block's received attention, but none was "
                "recorded: run it inside MoDTransformer (which asks the previous block for it), or route causally"
            )
        T = x_BTD.shape[1]
        zero = x_BTD.new_zeros((), dtype=torch.float32)
        score_BT = received_BT.float()
        idx_BK, valid_BK, frac = select_route(score_BT, self.capacity, token_mask_BT)
        if valid_BK is not None:  # a padded batch of known prompts (scoring): no losses to learn from
            return RouterOutput(idx_BK, valid_BK, None, zero, {"routed_frac": frac})
        target_BT = topk_mask(idx_BK, T).float()
        p_BT = self.causal_logits(x_BTD)
        bce = F.binary_cross_entropy_with_logits(p_BT, target_BT)
        hit_BT = (p_BT.detach() > self.threshold).float()
        stats = {
            "routed_frac": frac,
            "score_mean_selected": torch.gather(score_BT, 1, idx_BK).mean(),
            "pred_bce": bce.detach(),
            "pred_acc": (hit_BT == target_BT).float().mean(),
            "pred_recall": (hit_BT * target_BT).sum() / target_BT.sum(),
        }
        return RouterOutput(idx_BK, None, None, self.pred_weight * bce, stats)
