"""A Mixture-of-Experts SwiGLU feed-forward layer, optionally with no-op experts (integrated MoDE).

Axis legend: B batch, T sequence length, N = B·T tokens, D model width, F expert hidden size,
E real experts, X = E + no-op experts, k experts per token, a kept assignments.

What it does (``modlm.routing.moe_ops`` holds the dispatch and combine ops):

- Router: logits = W_r h over all X experts, in fp32. Token-choice top-k (k = 1 or 2), gates
  renormalised over the chosen k for k = 2 (Mixtral); for k = 1 the gate is the chosen
  expert's probability (Switch), since a renormalised single gate is always 1 and would leave
  the router without any gradient from the LM loss.
- No-op experts (Raposo et al. 2024 §4.3, integrated MoDE): choosing one adds nothing, so the
  token rides the residual stream through this MLP for free. Its gate still sums with the real
  choice's to 1, so with k = 2 a real expert's update can be scaled down.
- Capacity (``ModelConfig.moe_capacity_factor`` c, None: no drop): each real expert takes at most
  round(c·k·N/X) assignments per call; the rest are dropped (their tokens get no update from that
  expert). Dropping depends on the other tokens of the batch, so it is a training-time budget
  only: ``routing="causal"`` (decoding, causal evaluation) never drops, which keeps every token's
  output a function of that token alone and cached decoding equal to recomputation.
- Losses (returned, never stashed): the Switch/megablocks balance loss X · Σ_x f_x · P_x over all X
  experts (f_x the fraction of assignments asked of expert x, P_x its mean probability; 1 when
  uniform), weight ``moe_balance_weight``; the ST-MoE router z-loss mean(logsumexp(logits)²),
  weight ``moe_z_weight``.
- Optional shared expert (``moe_shared_expert``): a dense SwiGLU every token also goes through.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from modlm.config import ModelConfig
from modlm.model.layers import MLP
from modlm.routing.moe_ops import combine, dispatch_plan, expert_capacity, expert_mlps, topk_gates
from modlm.spec import roles

__all__ = ["MoE", "MoEOutput"]


class MoEOutput(NamedTuple):
    """aux_loss: weighted scalar (balance + z-loss) to add to the LM loss.
    stats: detached scalars: balance_loss, z_loss, dropped_frac (kept-back assignments to real
    experts over all real requests), noop_frac (fraction of assignments choosing a no-op
    expert; with no-op experts only), expert_tokens (assignments computed by real experts in
    this call: what the expert FLOPs scale with), load_e{i} (share of the assignments that
    expert i received).
    """

    aux_loss: torch.Tensor
    stats: dict[str, torch.Tensor]


class MoE(nn.Module):
    """E SwiGLU experts (hidden size ``config.d_mlp`` each) plus ``n_noop`` no-op experts.

    With E = 1, k = 1 and no drop it computes exactly the dense ``MLP`` holding the same weights
    (the one expert's probability is 1).
    """

    param_roles = {"router.weight": roles.ROUTER, "w_gate_up": roles.MATRIX, "w_down": roles.OUT_MATRIX}

    def __init__(self, config: ModelConfig, n_noop: int = 0):
        super().__init__()
        D, Fh = config.d_model, config.d_mlp
        self.n_experts, self.n_noop, self.top_k = config.n_experts, n_noop, config.moe_top_k
        self.capacity_factor = config.moe_capacity_factor
        self.balance_weight, self.z_weight = config.moe_balance_weight, config.moe_z_weight
        self.router = nn.Linear(D, self.n_experts + n_noop, bias=False)
        # x @ w layouts, so each expert's slice is one plain matmul: (E, D, 2F) and (E, F, D).
        self.w_gate_up = nn.Parameter(torch.empty(self.n_experts, D, 2 * Fh))
        self.w_down = nn.Parameter(torch.empty(self.n_experts, Fh, D))
        self.shared = MLP(config) if config.moe_shared_expert else None

    def forward(
        self, h_BTD: torch.Tensor, routing: str = "topk", valid_BT: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MoEOutput]:
        """y (B, T, D) and the aux output. ``routing="topk"`` applies the capacity (training);
        ``"causal"`` never drops. ``valid_BT``: tokens to dispatch (padding gets no expert)."""
        B, T, D = h_BTD.shape
        N, X = B * T, self.n_experts + self.n_noop
        h_ND = h_BTD.reshape(N, D)
        with torch.autocast(device_type=h_ND.device.type, enabled=False):
            logits_NX = F.linear(h_ND.float(), self.router.weight.float())  # router math in fp32
        probs_NX, expert_Nk, gate_Nk = topk_gates(logits_NX, self.top_k)
        drop = self.capacity_factor is not None and routing == "topk"
        cap = expert_capacity(self.capacity_factor, self.top_k, N, X) if drop else None
        valid_N = None if valid_BT is None else valid_BT.reshape(N)
        plan = dispatch_plan(expert_Nk, self.n_experts, X, cap, valid_N)
        x_aD = h_ND.index_select(0, plan.token_a)
        y_aD = expert_mlps(x_aD, plan.counts, self.w_gate_up, self.w_down)
        gate_a = gate_Nk[plan.token_a, plan.choice_a]
        y_ND = combine(N, plan.token_a, gate_a, y_aD).to(h_ND.dtype)
        if self.shared is not None:
            y_ND = y_ND + self.shared(h_ND)
        return y_ND.view(B, T, D), self._aux(logits_NX, probs_NX, plan, valid_N)

    def _aux(self, logits_NX, probs_NX, plan, valid_N) -> MoEOutput:
        requested_X = plan.requested_X
        n_req = requested_X.sum().clamp(min=1)
        if valid_N is not None:
            w_N1 = valid_N.float().unsqueeze(-1)
            mean_prob_X = (probs_NX * w_N1).sum(0) / w_N1.sum().clamp(min=1)
            z_loss = (torch.logsumexp(logits_NX, -1).pow(2) * w_N1[:, 0]).sum() / w_N1.sum().clamp(min=1)
        else:
            mean_prob_X = probs_NX.mean(0)
            z_loss = torch.logsumexp(logits_NX, -1).pow(2).mean()
        X = requested_X.numel()
        balance = X * (requested_X / n_req * mean_prob_X).sum()
        kept = sum(plan.counts)
        real_req = requested_X[: self.n_experts].sum().clamp(min=1)
        stats = {
            "balance_loss": balance.detach(),
            "z_loss": z_loss.detach(),
            "dropped_frac": (1.0 - kept / real_req).detach(),
            "expert_tokens": probs_NX.new_tensor(float(kept)),
        }
        if self.n_noop:
            stats["noop_frac"] = (requested_X[self.n_experts :].sum() / n_req).detach()
        for i in range(self.n_experts):
            stats[f"load_e{i}"] = (requested_X[i] / n_req).detach()
        return MoEOutput(self.balance_weight * balance + self.z_weight * z_loss, stats)
