"""MoD's learned expert-choice router (Raposo et al. 2024, §3) and its causal predictor (§3.5).

Axis legend: B batch, T sequence length, K tokens routed into the block, D model width.

Top-k picks the k tokens of each sequence with the largest r = w·x. For decoding, each token
decides causally from its own state: with the small stop-gradient predictor's logit, or, with
the auxiliary BCE loss, from the router logit itself (sigmoid(r) > 0.5 <=> r > 0).
"""

from __future__ import annotations

from statistics import NormalDist

import torch
import torch.nn as nn
import torch.nn.functional as F

from modlm.config import ModelConfig
from modlm.routing.base import Router, RouterOutput
from modlm.routing.ops import router_scores, select_route, topk_mask
from modlm.spec import roles


class CausalPredictor(nn.Module):
    """Small MLP predicting top-k membership from the token's own state (paper §3.5, method 2).

    Its inputs are detached (stop-gradient), so training it has no effect on the LM objective.
    Besides the residual x it sees the router's own logit r = w·x (also detached), standardised
    by running statistics: top-k membership is "r above this sequence's k-th largest r", so the
    predictor only has to learn a threshold and a margin on r_hat, plus corrections from x.

    NOTE: raw r is tiny early in training (the residual stream starts at init_std scale), and a
    predictor fed raw r or x alone learns only the 87.5% prior "never route" for hundreds of
    steps. Standardising r and starting the logit at gain·(r_hat - z), z the (1 - capacity)
    quantile of a standard normal, makes the untrained predictor already route ~capacity of the
    tokens, and training refines it.

    The running mean/variance are updated only by top-k training forwards (``update_stats``),
    never from the tokens being scored, so a causal decision depends on its own token alone.
    Runs in fp32: the logit is thresholded at 0, where bf16 rounding would flip decisions.
    """

    param_roles = {
        "fc1.weight": roles.PREDICTOR_MATRIX,
        "fc1.bias": roles.PREDICTOR_VECTOR,
        "fc2.weight": roles.PREDICTOR_MATRIX,
        "fc2.bias": roles.PREDICTOR_VECTOR,
        "r_gain": roles.PREDICTOR_VECTOR,
        "r_bias": roles.PREDICTOR_VECTOR,
    }

    def __init__(self, d_model: int, hidden: int, capacity: float, momentum: float = 0.2, gain: float = 4.0):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        z = NormalDist().inv_cdf(1.0 - capacity) if capacity < 1.0 else -4.0
        self.r_gain = nn.Parameter(torch.tensor(gain))
        self.r_bias = nn.Parameter(torch.tensor(-gain * z))
        self.momentum = momentum
        self.register_buffer("r_mean", torch.zeros(()))
        self.register_buffer("r_var", torch.ones(()))
        self.register_buffer("stats_ready", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update_stats(self, r_BT: torch.Tensor) -> None:
        """Track the router logit's mean and variance (EMA; the first batch sets them)."""
        m, v = r_BT.to(self.r_mean.dtype).mean(), r_BT.to(self.r_var.dtype).var()
        w = torch.where(self.stats_ready, torch.tensor(self.momentum, device=m.device), torch.ones((), device=m.device))
        self.r_mean.lerp_(m, w)
        self.r_var.lerp_(v, w)
        self.stats_ready.fill_(True)

    def forward(self, x_BTD: torch.Tensor, r_BT: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x_BTD.device.type, enabled=False):
            h = F.silu(F.linear(x_BTD.detach().float(), self.fc1.weight.float(), self.fc1.bias.float()))
            mlp_BT = F.linear(h, self.fc2.weight.float(), self.fc2.bias.float()).squeeze(-1)
            r_hat_BT = (r_BT.detach().float() - self.r_mean) * torch.rsqrt(self.r_var + 1e-12)
            return mlp_BT + self.r_gain * r_hat_BT + self.r_bias  # (B, T)

    @torch.no_grad()
    def fold(
        self, router_w_D: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The router and this predictor as two matrix products (inference only, no gradients).

        r = w·x and its standardisation are linear, and silu(t) - silu(-t) = t exactly
        (sigmoid(t) + sigmoid(-t) = 1), so r can ride through the hidden activation as a pair of
        units. With ``a = r_gain / std(r)``:

            z = silu([fc1.weight; w; -w] x + [fc1.bias; 0; 0])          (h + 2 units)
            logit = [fc2.weight, a, -a] · z + fc2.bias + r_bias - a * r_mean

        which equals ``forward(x, w·x)`` up to float rounding: a product, one activation over
        the whole vector, a product. Returns (W_in (h+2, D), W_in^T (D, h+2), b_in (h+2,),
        w_out (h+2,), b_out (1,)), fp32 and contiguous: W_in for ``addmv`` (one token),
        W_in^T for ``addmm`` (many).
        """
        a = self.r_gain.float() * torch.rsqrt(self.r_var.float() + 1e-12)
        w = router_w_D.float().view(1, -1)
        W_in = torch.cat([self.fc1.weight.float(), w, -w], 0).contiguous()
        b_in = torch.cat([self.fc1.bias.float(), self.fc1.bias.new_zeros(2, dtype=torch.float32)]).contiguous()
        w_out = torch.cat([self.fc2.weight.float().view(-1), a.view(1), -a.view(1)]).contiguous()
        b_out = (self.fc2.bias.float() + self.r_bias.float() - a * self.r_mean.float()).view(1).contiguous()
        return W_in, W_in.t().contiguous(), b_in, w_out, b_out


class LearnedRouter(Router):
    """MoD's learned expert-choice router: r = w·x, top-k of r per sequence.

    With ``causal_routing`` in {aux_loss, both} an auxiliary BCE pulls sigmoid(r) towards
    top-k membership; in {predictor, both} a stop-gradient predictor learns the same target.
    Causal decisions use the predictor when there is one, else the router logit.
    """

    param_roles = {"weight": roles.ROUTER}

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.weight = nn.Parameter(torch.zeros(config.d_model))
        self.use_aux = config.uses_aux_loss
        self.aux_weight = config.aux_loss_weight
        self.pred_weight = config.predictor_loss_weight
        self.predictor = (
            CausalPredictor(config.d_model, config.predictor_hidden, config.capacity) if config.uses_predictor else None
        )
        # Logit threshold for causal decisions: 0 <=> probability 0.5. Raising it routes fewer
        # tokens (an inference-time compute knob); it is a buffer so it travels with checkpoints.
        self.register_buffer("threshold", torch.zeros(()), persistent=True)
        self._fold_cache: tuple | None = None  # (source tensors, their versions, folded weights)

    # The router's three numbers per token, one method each (the ``Router`` contract):
    #   scores         r = w·x, the top-k score and the update's weight (token_weights)
    #   causal_logits  what a causal decision thresholds: the predictor's logit, else r itself
    #   decide         causal_logits > threshold, weighted by r

    def scores(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """Router logits r_BT in fp32 (routing decisions are precision-sensitive)."""
        return router_scores(x_BTD, self.weight)

    def token_weights(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """r = w·x: a processed token becomes x + r·f(x)."""
        return self.scores(x_BTD)

    def causal_logits(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """The causal logit (B, T) in fp32 that ``decide`` thresholds; each token's depends on it alone.

        Aux-loss routing thresholds r itself; a predictor router its predictor's logit. Without
        gradients (decoding, evaluation, calibration) a predictor router runs folded: one product
        gives the predictor's hidden units and ±r, one SiLU, a second product the logit (see
        ``CausalPredictor.fold``), instead of ~15 small operators. At batch size 1 a skipped
        routed block costs only this, so it sets how much of MoD's saving decoding keeps. The
        folded weights are cached and rebuilt when any parameter or buffer they come from
        changes (an optimizer step, a load, new running statistics).
        """
        if self.predictor is None:
            return self.scores(x_BTD)
        if torch.is_grad_enabled():
            return self.predictor(x_BTD, self.scores(x_BTD))
        B, T, _ = x_BTD.shape
        return self._folded_logits(x_BTD).view(B, T)

    def _folded_logits(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """Flat (B*T,) causal logits from the folded weights (see ``CausalPredictor.fold``)."""
        folded = self._folded()
        if torch.is_autocast_enabled(x_BTD.device.type):  # entering the context costs more than the math
            with torch.autocast(device_type=x_BTD.device.type, enabled=False):
                return self._folded_math(x_BTD, *folded)
        return self._folded_math(x_BTD, *folded)

    @staticmethod
    def _folded_math(x_BTD, W_in, W_in_t, b_in, w_out, b_out):
        x_ND = x_BTD.reshape(-1, W_in.shape[1]).float()
        if x_ND.shape[0] == 1:  # one token (decoding at batch size 1): matrix-vector products only
            z_H = F.silu(torch.addmv(b_in, W_in, x_ND[0]), inplace=True)
            return torch.addmv(b_out, z_H.unsqueeze(0), w_out)
        z_NH = F.silu(torch.addmm(b_in, x_ND, W_in_t), inplace=True)
        return torch.addmv(b_out, z_NH, w_out)

    def _folded(self) -> tuple[torch.Tensor, ...]:
        # NOTE: validity is checked by the version counters of the tensors the fold was built
        # from (bumped by every in-place change: optimizer steps, load_state_dict's copy_,
        # running-statistics updates). Replacing a tensor object instead (.to(), assign=True
        # loads, train()/eval()) drops the cache through _apply / _load_from_state_dict / train.
        cache = self._fold_cache
        if cache is not None and cache[1] == tuple(t._version for t in cache[0]):
            return cache[2]
        p = self.predictor
        srcs = (self.weight, p.fc1.weight, p.fc1.bias, p.fc2.weight, p.fc2.bias, p.r_gain, p.r_bias, p.r_mean, p.r_var)
        folded = p.fold(self.weight)
        self._fold_cache = (srcs, tuple(t._version for t in srcs), folded)
        return folded

    def _apply(self, fn, *args, **kwargs):
        self._fold_cache = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._fold_cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    def train(self, mode: bool = True):
        self._fold_cache = None
        return super().train(mode)

    def decide(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token causal routing: (sel_BT bool, weight_BT = r). Depends on each token alone."""
        r_BT = self.scores(x_BTD)
        logit_BT = r_BT if self.predictor is None else self.causal_logits(x_BTD)
        return logit_BT > self.threshold, r_BT

    def route_topk(
        self, x_BTD: torch.Tensor, token_mask_BT: torch.Tensor | None, received_BT: torch.Tensor | None = None
    ) -> RouterOutput:
        """Top-k of r per sequence; the aux BCE and the predictor learn its membership."""
        T = x_BTD.shape[1]
        zero = x_BTD.new_zeros((), dtype=torch.float32)
        r_BT = self.scores(x_BTD)
        idx_BK, valid_BK, frac = select_route(r_BT.detach(), self.capacity, token_mask_BT)
        weight_BK = torch.gather(r_BT, 1, idx_BK)
        if valid_BK is not None:  # a padded batch of known prompts (scoring): no losses to learn from
            return RouterOutput(idx_BK, valid_BK, weight_BK, zero, {"routed_frac": frac})
        target_BT = topk_mask(idx_BK, T).float()
        aux = zero
        stats: dict[str, torch.Tensor] = {"routed_frac": frac, "r_mean_selected": weight_BK.detach().mean()}
        if self.use_aux:
            bce = F.binary_cross_entropy_with_logits(r_BT, target_BT)
            aux = aux + self.aux_weight * bce
            stats["aux_bce"] = bce.detach()
            stats["aux_acc"] = ((r_BT.detach() > 0).float() == target_BT).float().mean()
        if self.predictor is not None:
            if self.training:
                self.predictor.update_stats(r_BT)
            p_BT = self.predictor(x_BTD, r_BT)
            bce = F.binary_cross_entropy_with_logits(p_BT, target_BT)
            aux = aux + self.pred_weight * bce
            stats["pred_bce"] = bce.detach()
            stats["pred_acc"] = ((p_BT.detach() > 0).float() == target_BT).float().mean()
            # Recall on the routed tokens: accuracy alone is 87.5% for "never route" at 12.5%.
            stats["pred_recall"] = ((p_BT.detach() > 0).float() * target_BT).sum() / target_BT.sum()
        return RouterOutput(idx_BK, None, weight_BK, aux, stats)
