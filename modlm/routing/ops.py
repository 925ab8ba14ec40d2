"""Dispatch and combine for Mixture-of-Depths: small pure functions, each tested on its own.

Axis legend: B batch, T sequence length, K tokens routed into a block (capacity), D model width.

The routed block is ``select -> gather -> f -> weighted scatter``. Only the K gathered rows
go through attention and the MLP, so the block costs O(K) matmuls and O(K^2) attention,
and the unselected rows are never touched (they leave the block bit-for-bit unchanged).
"""

from __future__ import annotations

import math

import torch

from modlm.spec.capacity import capacity_k

__all__ = [
    "gather_tokens",
    "mask_to_padded_indices",
    "normalized_scores",
    "router_scores",
    "scatter_add_weighted",
    "select_route",
    "select_topk",
    "select_topk_masked",
    "topk_mask",
]


def select_topk(scores_BT: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores of each row, sorted ascending (causal order).

    Ties go to the earlier position (a stable descending sort), so the choice is
    deterministic on every device. Returns ``idx_BK`` (int64).
    """
    T = scores_BT.shape[-1]
    if not 1 <= k <= T:
        raise ValueError(f"k={k} must be in [1, T={T}]")
    if k == T:
        return torch.arange(T, device=scores_BT.device).expand(scores_BT.shape[0], T)
    # NOTE: torch.topk does not promise which of equal values it returns; a stable sort does.
    order_BT = torch.sort(scores_BT, dim=-1, descending=True, stable=True).indices
    idx_BK = order_BT[:, :k]
    return torch.sort(idx_BK, dim=-1).values


def select_topk_masked(
    scores_BT: torch.Tensor, token_mask_BT: torch.Tensor, capacity: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row over the real tokens only (left-padded prompts): k_b = capacity_k(c, len_b).

    Returns padded ``idx_BK`` and ``valid_BK`` as ``mask_to_padded_indices`` does.
    """
    B, T = scores_BT.shape
    len_B = token_mask_BT.sum(1)
    k_B = torch.clamp(torch.floor(capacity * len_B.float() + 0.5).long(), min=1)
    k_B = torch.minimum(k_B, len_B)
    s_BT = scores_BT.masked_fill(~token_mask_BT, float("-inf"))
    order_BT = torch.sort(s_BT, dim=-1, descending=True, stable=True).indices
    keep_BT = torch.arange(T, device=scores_BT.device).unsqueeze(0) < k_B.unsqueeze(1)
    sel_BT = torch.zeros_like(token_mask_BT).scatter(1, order_BT, keep_BT)
    return mask_to_padded_indices(sel_BT)


def select_route(
    score_BT: torch.Tensor, capacity: float, token_mask_BT: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The one expert-choice selection step of every top-k router.

    Without a mask: the k = capacity_k(c, T) highest scores of each row (``select_topk``), no
    padding slots. With ``token_mask_BT`` (a left-padded batch of known prompts): top-k over each
    row's real tokens (``select_topk_masked``). ``score_BT`` should carry no gradient (the choice
    is discrete; weights are gathered from the live scores by the router).

    Returns (idx_BK, valid_BK or None, routed_frac): the fraction of real tokens processed, a
    detached scalar for the router's stats.
    """
    if token_mask_BT is not None:
        idx_BK, valid_BK = select_topk_masked(score_BT, token_mask_BT, capacity)
        return idx_BK, valid_BK, (valid_BK.float().sum() / token_mask_BT.sum()).detach()
    T = score_BT.shape[-1]
    k = capacity_k(capacity, T)
    return select_topk(score_BT, k), None, score_BT.new_full((), k / T, dtype=torch.float32)


def topk_mask(idx_BK: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Boolean membership mask (B, T) of the selected indices: the target of causal routing."""
    mask_BT = torch.zeros(idx_BK.shape[0], seq_len, dtype=torch.bool, device=idx_BK.device)
    return mask_BT.scatter_(1, idx_BK, True)


def mask_to_padded_indices(mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged selection (a bool mask) to padded indices.

    Used when routing is causal (each token decides on its own), so rows select different
    numbers of tokens. K = the largest count in the batch (at least 1).

    Returns:
        idx_BK: selected positions in ascending order, padded at the end with T - 1
            (a harmless valid index; padded slots are never written back).
        valid_BK: bool, True for real selections.
    """
    B, T = mask_BT.shape
    counts_B = mask_BT.sum(dim=1)
    K = max(1, int(counts_B.max().item())) if B > 0 else 1
    pos_BT = torch.arange(T, device=mask_BT.device).expand(B, T)
    # Unselected positions sort after all selected ones; selected keep ascending order.
    key_BT = torch.where(mask_BT, pos_BT, pos_BT + T)
    idx_BK = torch.sort(key_BT, dim=1).values[:, :K]
    valid_BK = idx_BK < T
    idx_BK = torch.where(valid_BK, idx_BK, torch.full_like(idx_BK, T - 1))
    return idx_BK, valid_BK


def gather_tokens(x_BTD: torch.Tensor, idx_BK: torch.Tensor) -> torch.Tensor:
    """x_BKD = x_BTD[b, idx_BK[b, k]] for every row at once (no Python loop over the batch)."""
    D = x_BTD.shape[-1]
    return torch.gather(x_BTD, 1, idx_BK.unsqueeze(-1).expand(-1, -1, D))


def scatter_add_weighted(
    x_BTD: torch.Tensor, idx_BK: torch.Tensor, f_BKD: torch.Tensor, weight_BK: torch.Tensor | None
) -> torch.Tensor:
    """out = x, except out[b, idx[b, k]] = x[b, idx[b, k]] + weight[b, k] * f[b, k].

    This is the MoD combine ``x + r * f(x)`` (Raposo et al. 2024, eq. 1): the router weight
    scales the block's update, never the residual. Rows not in ``idx_BK`` are copied unchanged.
    Indices must be unique per row except where ``weight_BK`` is 0 (padding).
    """
    upd_BKD = f_BKD if weight_BK is None else f_BKD * weight_BK.unsqueeze(-1).to(f_BKD.dtype)
    D = x_BTD.shape[-1]
    return x_BTD.scatter_add(1, idx_BK.unsqueeze(-1).expand(-1, -1, D), upd_BKD.to(x_BTD.dtype))


def router_scores(x_BTD: torch.Tensor, w_D: torch.Tensor) -> torch.Tensor:
    """Router logits r = w·x per token, (B, T), in fp32 even under autocast.

    Routing decisions are precision-sensitive (a top-k boundary or a threshold), so they are
    computed from fp32 copies. The autocast context is entered only when autocast is on:
    entering it costs more than this product when a decode step scores one token.
    """
    if torch.is_autocast_enabled(x_BTD.device.type):
        with torch.autocast(device_type=x_BTD.device.type, enabled=False):
            return x_BTD.float() @ w_D.float()
    return x_BTD.float() @ w_D.float()


def normalized_scores(x_BTD: torch.Tensor, w_D: torch.Tensor) -> torch.Tensor:
    """s = w · x / rms(x), (B, T) in fp32: a score on the normalised stream, so a zero-initialised w
    on a pretrained model's residual (whose scale varies by layer) starts every layer alike."""
    with torch.autocast(device_type=x_BTD.device.type, enabled=False):
        xf = x_BTD.float()
        return (xf @ w_D.float()) * torch.rsqrt(xf.pow(2).mean(-1) + 1e-6)


@torch.no_grad()
def received_attention(
    q_BHTE: torch.Tensor, k_BGTE: torch.Tensor, valid_BT: torch.Tensor | None = None
) -> torch.Tensor:
    """Causally normalised attention each token receives, averaged over heads, (B, T), fp32 (fp64 for fp64 inputs).

    Recomputes softmax(q k^T / sqrt(E)) under the causal mask (and the key mask of ``valid_BT``:
    padding is never attended to, as in the block), averages over query heads, sums each key's
    column over the real queries and divides by the number of real queries that can see it
    (itself and every later real query). Padded tokens score 0.

    Args:
        q_BHTE: queries after RoPE (B, H, T, E). k_BGTE: keys after RoPE (B, G, T, E); grouped
            query heads are matched to their key head without repeating the keys.
        valid_BT: real tokens (None: all).
    """
    B, H, T, E = q_BHTE.shape
    G = k_BGTE.shape[1]
    dtype = torch.promote_types(q_BHTE.dtype, torch.float32)  # fp32 at least: it decides a top-k
    q = q_BHTE.to(dtype).view(B, G, H // G, T, E)
    k = k_BGTE.to(dtype).unsqueeze(2)  # (B, G, 1, T, E)
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(E))  # (B, G, H/G, T, T): the one counted product
    allowed_TT = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    allowed = allowed_TT.view(1, 1, 1, T, T)
    if valid_BT is not None:
        # A query always sees itself (no empty softmax row), as the block's own padding mask does.
        eye = torch.eye(T, dtype=torch.bool, device=q.device).view(1, 1, 1, T, T)
        allowed = (allowed & valid_BT.view(B, 1, 1, 1, T)) | eye
    p_BTT = s.masked_fill(~allowed, float("-inf")).softmax(-1).mean(dim=(1, 2))  # (B, Tq, Tk), head mean
    if valid_BT is None:
        viewers_T = torch.arange(T, 0, -1, device=q.device, dtype=dtype)  # T - t queries see t
        return p_BTT.sum(1) / viewers_T
    w_BT = valid_BT.to(dtype)
    col_BT = (p_BTT * w_BT.unsqueeze(-1)).sum(1)  # over real queries only
    viewers_BT = w_BT.flip(1).cumsum(1).flip(1)  # real queries at or after t
    return torch.where(valid_BT, col_BT / viewers_BT.clamp(min=1.0), torch.zeros_like(col_BT))
