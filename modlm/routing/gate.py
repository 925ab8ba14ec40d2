"""Hard causal gates for adapting a pretrained model: one threshold rule in training and decoding.

Axis legend: B batch, T sequence length, K tokens routed into the block, D model width.

Built for ``modlm adapt --router gate``. Token t is processed iff s_t > ``threshold``, with
s_t = w · x̂_t (x̂ = x / rms(x), fp32, as ``modlm.routing.tuned``), in training and in decoding
alike: no top-k in training that decoding cannot reproduce. The first ``ModelConfig.n_sink``
real tokens of every sequence (attention sinks) are always processed.

Estimator. The update is x + g_t·f(x_t) with the straight-through gate
g_t = hard_t + (σ_t - stopgrad(σ_t)), σ_t = σ((s_t - threshold) / τ): exactly 0 or 1 in the
forward (a processed token computes exactly what the pretrained block computes, a skipped one
passes unchanged), and ds_t = σ'_t·<dL/dy_t, f(x_t)>/τ in the backward for *every* token, so a
skipped token learns that it should have been processed. That needs f(x_t) for the skipped
tokens too, so in training every token runs the block:

- in ``"keys-kept"`` layers (``modlm.model.keys_kept``, what ``modlm adapt`` builds for this
  router) the training route is every token, weighted by g. There a processed token's update is
  exactly the decode-time one (every earlier token is a key in both), and a skipped token's f is
  exactly what it would have computed had it been processed. NOTE: the cost, honestly: a routed
  layer's forward and backward in training are the dense layer's (the backward only through
  activations: the base is frozen), whatever the gates decide. Decoding skips for real.
- in MoD's ``"routed"`` layers (skipped tokens are not keys) a dense forward would let processed
  tokens attend to skipped ones, which decoding never does; there the training route is the
  causal one (the processed tokens only, weights g), so training still computes what decoding
  does, but only processed tokens receive the straight-through gradient (plus the compute term).

Compute target: ``aux_loss = compute_weight·(mean σ - capacity)²`` over the real non-sink tokens,
which ``modlm adapt`` weights by ``--compute-weight`` (the attribute is set from outside, as the
training capacity is); 0 by default, so the router costs nothing outside adaptation. After
training, ``calibrate_thresholds`` moves the threshold to the score quantile that keeps the
capacity, so the decode-time compute is what was asked.

Keep-all start: w = 0 and threshold = ``INIT_THRESHOLD`` (< 0), so s = 0 > threshold for every
token: the adapted model computes exactly what the original does, and σ = σ(2) leaves the
gradient room to move (a threshold of -inf would pin every gate open with zero gradient).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from modlm.config import ModelConfig
from modlm.routing.base import Router, RouterOutput, causal_output
from modlm.routing.ops import normalized_scores
from modlm.spec import roles
from modlm.spec.kinds import block_spec

__all__ = ["GateRouter", "sink_mask"]

# The start: s = 0 (w = 0) above it for every token, with σ((0 - (-2)) / 1) = 0.88.
INIT_THRESHOLD = -2.0


def sink_mask(T: int, n_sink: int, token_mask_BT: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """(B or 1, T) bool: the first ``n_sink`` real tokens of each row (left padding skipped)."""
    if token_mask_BT is None:
        return (torch.arange(T, device=device) < n_sink).unsqueeze(0)
    rank_BT = token_mask_BT.long().cumsum(1)  # 1 at the first real token
    return token_mask_BT & (rank_BT <= n_sink)


class GateRouter(Router):
    """Hard threshold gates, straight-through to every token (see the module docstring)."""

    param_roles = {"weight": roles.ROUTER_ZERO}
    temperature = 1.0  # τ of the soft gate

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.weight = nn.Parameter(torch.zeros(config.d_model))
        self.register_buffer("threshold", torch.full((), INIT_THRESHOLD), persistent=True)
        self.n_sink = config.n_sink
        self.compute_weight = 0.0  # the compute term's weight; ``modlm adapt`` sets it
        kinds = {k for k in config.layer_types if block_spec(k).routed}
        # Every token may run the block in training only where skipped tokens stay keys.
        self.dense_training = bool(kinds) and all(block_spec(k).keeps_keys for k in kinds)

    def scores(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """s = w · x / rms(x), (B, T) fp32 (``modlm.routing.ops.normalized_scores``)."""
        return normalized_scores(x_BTD, self.weight)

    def causal_logits(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.scores(x_BTD)

    def decide(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, None]:
        """s above ``threshold``; unit weight. (Sinks need positions: ``route_causal`` adds them.)"""
        return self.scores(x_BTD) > self.threshold, None

    def _gates(self, x_BTD: torch.Tensor, token_mask_BT: torch.Tensor | None):
        """(hard_BT bool, soft_BT fp32 σ, free_BT bool: real tokens that are not sinks)."""
        B, T, _ = x_BTD.shape
        s_BT = self.scores(x_BTD)
        sink_BT = sink_mask(T, self.n_sink, token_mask_BT, x_BTD.device).expand(B, T)
        real_BT = torch.ones_like(sink_BT) if token_mask_BT is None else token_mask_BT
        hard_BT = ((s_BT > self.threshold) | sink_BT) & real_BT
        soft_BT = torch.sigmoid((s_BT - self.threshold) / self.temperature)
        return hard_BT, soft_BT, real_BT & ~sink_BT

    def route_causal(self, x_BTD: torch.Tensor, token_mask_BT: torch.Tensor | None) -> RouterOutput:
        """The decode rule over a whole sequence (``routing="causal"``): the tokens with
        s > threshold and the sinks, unit weight. (``"topk"`` routing is the training rule:
        ``route_topk``.)"""
        hard_BT, _, _ = self._gates(x_BTD, token_mask_BT)
        zero = x_BTD.new_zeros((), dtype=torch.float32)
        if token_mask_BT is None and bool(hard_BT.all()):
            # Every token processed (the keep-all start): the dense route, so a "keys-kept"
            # block takes its dense path and the model computes exactly what the original does.
            B, T = hard_BT.shape
            idx_BK = torch.arange(T, device=x_BTD.device).expand(B, T)
            return RouterOutput(idx_BK, None, None, zero, {"routed_frac": zero + 1.0})
        return causal_output(hard_BT, None, token_mask_BT, zero)

    def route_topk(
        self, x_BTD: torch.Tensor, token_mask_BT: torch.Tensor | None, received_BT: torch.Tensor | None = None
    ) -> RouterOutput:
        """The training rule: the decode rule's decisions, weights g = hard + σ - stopgrad(σ)
        (exactly 0/1 in value) and the compute term; every token routed where keys are kept."""
        hard_BT, soft_BT, free_BT = self._gates(x_BTD, token_mask_BT)
        # Sinks and padding carry no estimator: their gate is fixed.
        ste_BT = torch.where(free_BT, soft_BT - soft_BT.detach(), torch.zeros_like(soft_BT))
        g_BT = hard_BT.float() + ste_BT
        n_free = free_BT.sum().clamp(min=1)
        mean_soft = (soft_BT * free_BT).sum() / n_free
        aux = self.compute_weight * (mean_soft - self.capacity) ** 2
        stats = {"gate_mean": mean_soft.detach()}
        if not self.dense_training:
            out = causal_output(hard_BT, g_BT, token_mask_BT, aux)
            return out._replace(stats={**out.stats, **stats})
        B, T = hard_BT.shape
        idx_BK = torch.arange(T, device=x_BTD.device).expand(B, T)  # every token: f for all
        n_real = T * B if token_mask_BT is None else token_mask_BT.sum().clamp(min=1)
        stats["routed_frac"] = (hard_BT.sum() / n_real).detach()
        return RouterOutput(idx_BK, None, g_BT, aux, stats)
