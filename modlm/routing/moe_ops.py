"""Dispatch and combine for Mixture-of-Experts feed-forward layers: small pure functions.

Axis legend: N tokens (batch and sequence flattened), D model width, F expert hidden size,
E real experts, X all experts (real + no-op), k experts per token, A = N·k assignments,
a kept assignments (sent to a real expert within its capacity).

The MoE layer is ``gates -> plan -> gather -> one matmul per expert on a contiguous slice ->
weighted scatter-add``, in the megablocks/torchtitan style:

- ``topk_gates``: token-choice top-k over fp32 softmax probabilities, gates renormalised over
  the chosen k (Mixtral).
- ``dispatch_plan``: the k choices flattened choice-major (every token's first choice before any
  second choice, so capacity drops second choices first, as GShard does), sorted stably by
  expert so each expert's tokens are one contiguous slice in token order; assignments to no-op
  experts (ids >= E), past an expert's capacity, or of masked tokens are dropped. No loop over
  tokens or rows.
- ``expert_mlps``: SwiGLU of each expert on its own slice only (an expert never sees a token it
  was not given). One matmul pair per expert: a loop over E, never over tokens.
- ``combine``: out[token] += gate · y, an index_add; tokens with no kept assignment get 0 (they
  ride the residual stream).

``torch._grouped_mm`` would fuse the per-expert loop; in torch 2.13 on CPU its forward works
for fp32 but its backward raises on these shapes, so the loop is used everywhere.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["DispatchPlan", "combine", "dispatch_plan", "expert_capacity", "expert_mlps", "topk_gates"]


def expert_capacity(capacity_factor: float, top_k: int, n_tokens: int, n_all_experts: int) -> int:
    """Assignments one expert takes at most: max(1, round(c · k · N / X)) (Switch/GShard)."""
    return max(1, math.floor(capacity_factor * top_k * n_tokens / n_all_experts + 0.5))


def topk_gates(logits_NX: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-choice top-k in fp32.

    Returns probs_NX (softmax over all experts, fp32), expert_Nk (int64, best first; ties go to
    the lower expert id via a stable sort) and gate_Nk (fp32): for k >= 2 the chosen experts'
    probabilities renormalised to sum to 1 per token (Mixtral); for k = 1 the chosen expert's
    probability itself (Switch).

    NOTE: renormalising a single choice would make every gate 1, and the router would get no
    gradient from the LM loss at all (only from the balance and z losses): it could never learn
    which tokens an expert, or a no-op, suits.
    """
    probs_NX = torch.softmax(logits_NX.float(), dim=-1)
    if k == 1:
        gate_N1, expert_N1 = probs_NX.max(dim=-1, keepdim=True)
        return probs_NX, expert_N1, gate_N1
    order_NX = torch.sort(probs_NX, dim=-1, descending=True, stable=True).indices
    expert_Nk = order_NX[:, :k]
    gate_Nk = torch.gather(probs_NX, 1, expert_Nk)
    return probs_NX, expert_Nk, gate_Nk / gate_Nk.sum(-1, keepdim=True)


class DispatchPlan(NamedTuple):
    """Which assignments go where.

    token_a: the token of each kept assignment, grouped by expert (expert 0's first), in token
        order within an expert. choice_a: which of the token's k choices it is.
    counts: host ints, kept assignments per real expert (the slice lengths of ``token_a``).
    requested_X: assignments asked of every expert (no-op included) before any drop (fp32).
    """

    token_a: torch.Tensor
    choice_a: torch.Tensor
    counts: list[int]
    requested_X: torch.Tensor


def dispatch_plan(
    expert_Nk: torch.Tensor,
    n_experts: int,
    n_all_experts: int,
    capacity: int | None = None,
    valid_N: torch.Tensor | None = None,
) -> DispatchPlan:
    """Sort assignments by expert; drop no-op ones, those past ``capacity`` and masked tokens.

    Args:
        expert_Nk: chosen expert ids (N, k); ids >= ``n_experts`` are no-op experts.
        n_experts: E real experts. n_all_experts: X (E + no-op experts).
        capacity: assignments per real expert at most (None: no drop). First come first served
            in choice-major order: all first choices (by token) before any second choice.
        valid_N: tokens that may be dispatched (False: padding; nothing is computed for it).
    """
    N, k = expert_Nk.shape
    expert_A = expert_Nk.t().reshape(-1)  # choice-major: a = j·N + n
    token_A = torch.arange(N, device=expert_Nk.device).repeat(k)
    if valid_N is not None:
        # Masked tokens go to an id past every expert: sorted last and never kept.
        expert_A = torch.where(valid_N.repeat(k), expert_A, torch.full_like(expert_A, n_all_experts))
    requested_X = torch.bincount(expert_A, minlength=n_all_experts + 1)[:n_all_experts].float()
    order_A = torch.sort(expert_A, stable=True).indices
    sorted_A = expert_A[order_A]
    # Rank of each assignment within its expert's queue: its index minus the queue's start.
    counts_X1 = torch.bincount(sorted_A, minlength=n_all_experts + 1)
    starts = torch.cumsum(counts_X1, 0) - counts_X1
    rank_A = torch.arange(sorted_A.numel(), device=sorted_A.device) - starts[sorted_A]
    keep_A = sorted_A < n_experts
    if capacity is not None:
        keep_A = keep_A & (rank_A < capacity)
    kept = order_A[keep_A]
    kept_counts = counts_X1[:n_experts]
    if capacity is not None:
        kept_counts = kept_counts.clamp(max=capacity)
    return DispatchPlan(token_A[kept], kept // N, kept_counts.tolist(), requested_X)


def expert_mlps(
    x_aD: torch.Tensor, counts: list[int], w_gate_up_EDF2: torch.Tensor, w_down_EFD: torch.Tensor
) -> torch.Tensor:
    """SwiGLU of expert e on rows [start_e, start_e + counts[e]) of ``x_aD`` (rows grouped by expert).

    Returns y_aD. Each expert runs one gate/up matmul and one down matmul over its own slice
    (three of each in the backward); an expert with no rows is skipped and gets zero gradients.
    """
    if torch.is_autocast_enabled(x_aD.device.type):
        # Mixed precision: the products in the autocast dtype, computed with autocast off (the
        # matmuls write into preallocated outputs, which autocast does not handle).
        dt = torch.get_autocast_dtype(x_aD.device.type)
        x_aD, w_gate_up_EDF2, w_down_EFD = x_aD.to(dt), w_gate_up_EDF2.to(dt), w_down_EFD.to(dt)
        with torch.autocast(device_type=x_aD.device.type, enabled=False):
            return _ExpertMLPs.apply(x_aD, w_gate_up_EDF2, w_down_EFD, tuple(int(n) for n in counts))
    return _ExpertMLPs.apply(x_aD, w_gate_up_EDF2, w_down_EFD, tuple(int(n) for n in counts))


def _bounds(counts: tuple[int, ...]):
    """(expert, start, end) of every expert with rows."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


class _ExpertMLPs(torch.autograd.Function):
    """The per-expert SwiGLU loop with a hand-written backward.

    Autograd through slices of the stacked weights (``w[e]``, or ``unbind``) would build each
    weight's gradient from per-expert pieces (a full-size zero tensor per expert, or a stack
    copying all of them); here every matmul writes its result straight into its slot of one
    preallocated output or gradient. The pre-activations (a, 2F) are kept for the backward.
    """

    @staticmethod
    def forward(ctx, x_aD, w1_EDF2, w2_EFD, counts):
        a, D = x_aD.shape
        F2 = w1_EDF2.shape[-1]
        h_aF2 = x_aD.new_empty(a, F2)
        y_aD = x_aD.new_empty(a, D)
        for e, s, t in _bounds(counts):
            torch.mm(x_aD[s:t], w1_EDF2[e], out=h_aF2[s:t])
            gate, up = h_aF2[s:t].chunk(2, dim=-1)
            torch.mm(F.silu(gate) * up, w2_EFD[e], out=y_aD[s:t])
        ctx.save_for_backward(x_aD, w1_EDF2, w2_EFD, h_aF2)
        ctx.counts = counts
        return y_aD

    @staticmethod
    def backward(ctx, dy_aD):
        x_aD, w1_EDF2, w2_EFD, h_aF2 = ctx.saved_tensors
        dy_aD = dy_aD.contiguous()
        dx_aD = torch.empty_like(x_aD)
        dw1 = torch.zeros_like(w1_EDF2) if ctx.needs_input_grad[1] else None
        dw2 = torch.zeros_like(w2_EFD) if ctx.needs_input_grad[2] else None
        F_ = w2_EFD.shape[1]
        for e, s, t in _bounds(ctx.counts):
            gate, up = h_aF2[s:t, :F_], h_aF2[s:t, F_:]
            sg = torch.sigmoid(gate)
            silu = gate * sg
            dy = dy_aD[s:t]
            if dw2 is not None:
                torch.mm((silu * up).t(), dy, out=dw2[e])
            d_act = dy @ w2_EFD[e].t()  # (n, F)
            dh = torch.cat((d_act * up * sg * (1 + gate * (1 - sg)), d_act * silu), dim=-1)  # d gate, d up
            if dw1 is not None:
                torch.mm(x_aD[s:t].t(), dh, out=dw1[e])
            torch.mm(dh, w1_EDF2[e].t(), out=dx_aD[s:t])
        return dx_aD, dw1, dw2, None


def combine(n_tokens: int, token_a: torch.Tensor, gate_a: torch.Tensor, y_aD: torch.Tensor) -> torch.Tensor:
    """out_ND with out[token_a[i]] += gate_a[i] · y_aD[i]; tokens never named stay exactly 0."""
    out_ND = y_aD.new_zeros(n_tokens, y_aD.shape[-1])
    return out_ND.index_add(0, token_a, y_aD * gate_a.unsqueeze(-1).to(y_aD.dtype))
