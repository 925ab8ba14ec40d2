"""Skipping that keeps keys: a routed block whose skipped tokens stay visible as keys and values.

Axis legend: B batch, T sequence length, K tokens routed into the block, S cached slots,
D model width, H query heads, G key/value heads, E head size, b rows computed in a decode step.

MoD's own rule (the ``"routed"`` kind, Raposo et al. 2024 §3.1) makes a token the router skips
invisible in that block: later tokens attend only to the tokens that ran it. That is the rule
for models trained from scratch, and the default. A pretrained model never learned it: each of
its layers expects every earlier token among its keys. FlexiDepth (arXiv 2503.23798) keeps them:
a skipped token still computes its key and value, and only the routed tokens run the rest.

In a ``"keys-kept"`` block (``KeysKeptBlock``), for h = attn_norm(x):

- every token: k, v = the key/value projections of h, RoPE at its true position; stored
  (the ``contiguous`` cache) and visible to every later token of the layer;
- the K routed tokens: q at their true positions, attention over every key at or before their
  own position (padding hidden), the output projection and the MLP; x + w·f(x), w from the
  router (unit weight for routers that give none), scattered back;
- a skipped token's residual stream leaves the block unchanged.

A skipped token costs the K/V projections (2·D·2·G·E FLOPs); a routed one the full block, with
attention over T keys instead of K (``modlm.flops``). Parameters keep the dense names, so a dense
(or converted Llama) checkpoint loads into it; only the routers are new.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from modlm.config import ModelConfig
from modlm.model.attention import Attention
from modlm.model.block import BlockContext, RoutedBlock, combine_route
from modlm.model.layers import apply_rotary
from modlm.routing.base import RouterOutput
from modlm.routing.ops import gather_tokens
from modlm.spec.kinds import block_spec
from modlm.spec.routers import router_spec

if TYPE_CHECKING:  # the decode policy's contract lives with the policy, a floor above the model
    from modlm.inference.decode import RowPlan

__all__ = ["KeysKeptAttention", "KeysKeptBlock", "visible_keys_mask"]


class KeysKeptAttention(Attention):
    """``Attention`` (same parameters: the fused ``qkv`` and ``proj``) whose query and key/value
    projections can run over different tokens: keys and values for every token, queries for
    the routed ones. Each takes its rows of the fused weight (``Linear.forward_rows``)."""

    def queries(self, h_BKD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Queries (B, H, K, E) of the normed stream ``h_BKD``, RoPE at cos/sin."""
        B, K, _ = h_BKD.shape
        H, E = self.n_heads, self.head_dim
        q = self.qkv.forward_rows(h_BKD, slice(0, H * E))
        return apply_rotary(q.view(B, K, H, E).transpose(1, 2), cos, sin)  # (B, H, K, E)

    def keys_values(
        self, h_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (RoPE at cos/sin) and values (B, G, T, E) of the normed stream ``h_BTD``."""
        B, T, _ = h_BTD.shape
        H, G, E = self.n_heads, self.n_kv_heads, self.head_dim
        kv = self.qkv.forward_rows(h_BTD, slice(H * E, None))
        k, v = kv.view(B, T, 2 * G, E).transpose(1, 2).split([G, G], dim=1)  # (B, G, T, E) each
        return apply_rotary(k, cos, sin), v


def visible_keys_mask(idx_BK: torch.Tensor, seq_len: int, token_mask_BT: torch.Tensor | None) -> torch.Tensor:
    """(B, 1, K, T) bool: the routed query at sequence index ``idx_BK[b, k]`` sees key j when
    j <= that index (causal: positions grow along a row, left padding included) and j is a real
    token; a query always sees itself, so no softmax row is empty."""
    j_11T = torch.arange(seq_len, device=idx_BK.device).view(1, 1, seq_len)
    q_BK1 = idx_BK.unsqueeze(-1)
    seen_BKT = j_11T <= q_BK1
    if token_mask_BT is not None:
        seen_BKT = (seen_BKT & token_mask_BT.unsqueeze(1)) | (j_11T == q_BK1)
    return seen_BKT.unsqueeze(1)


class KeysKeptBlock(RoutedBlock):
    """A routed block whose skipped tokens keep their keys and values (see the module docstring).

    It reuses ``RoutedBlock``'s routing (``forward``: the router in TRAIN / PREFILL, the decode
    policy's ``RowPlan`` in DECODE) and overrides the two ways it computes: ``run_route`` (whole
    sequences) and ``compute_rows`` (one new token per row).
    """

    kind: ClassVar[str] = "keys-kept"
    attention_class: ClassVar[type[Attention]] = KeysKeptAttention

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        nxt = layer_idx + 1
        if (
            router_spec(config.router).needs_received_attention
            and nxt < config.n_layers
            and block_spec(config.layer_types[nxt]).routed
        ):
            # Its K queries over T keys are not the square statistic A-MoD's next router reads.
            raise ValueError(
                f"ModelConfig.layer_types={config.layer_types!r} is invalid: layer {layer_idx} is "
                f"'keys-kept' and precedes routed layer {nxt}, but router={config.router!r} scores tokens by "
                "the attention received in the previous block, which a 'keys-kept' block does not record"
            )

    def run_route(self, x_BTD: torch.Tensor, ctx: BlockContext, route: RouterOutput) -> tuple[torch.Tensor, Any]:
        """Keys/values of every token, the rest of the block on the routed ones (TRAIN, PREFILL)."""
        idx_BK, valid_BK = route.idx_BK, route.valid_BK
        B, T, _ = x_BTD.shape
        if valid_BK is None and idx_BK.shape[1] == T:
            # Every token routed (top-k at capacity 1: idx = 0..T-1): every token is a query and
            # a key, which is the dense block's computation, fused projection and all.
            return super().run_route(x_BTD, ctx, route)
        h_BTD = self.attn_norm(x_BTD)
        k_BGTE, v_BGTE = self.attn.keys_values(h_BTD, ctx.cos, ctx.sin)
        if ctx.cache is None:
            k_BGSE, v_BGSE, mask_B1KS = k_BGTE, v_BGTE, visible_keys_mask(idx_BK, T, ctx.token_mask_BT)
        else:
            k_BGSE, v_BGSE, mask_B1TS = ctx.cache.view(valid=ctx.token_mask_BT).update(k_BGTE, v_BGTE, self.layer_idx)
            S, K = mask_B1TS.shape[-1], idx_BK.shape[1]
            # the routed tokens' rows of the cache's (B, 1, T, S) mask of every new token
            rows_B1KS = idx_BK.view(B, 1, K, 1).expand(B, 1, K, S)
            mask_B1KS = mask_B1TS.expand(B, 1, T, S).gather(2, rows_B1KS)
        cos, sin = ctx.rotary(torch.gather(ctx.pos_BT, 1, idx_BK))  # true positions of the routed tokens
        q_BHKE = self.attn.queries(gather_tokens(h_BTD, idx_BK), cos, sin)
        a_BKD = self.attn.attend(q_BHKE, k_BGSE, v_BGSE, mask_B1KS)
        x_BKD = gather_tokens(x_BTD, idx_BK)
        m_BKD, ffn_aux = self.ffn(self.mlp_norm(x_BKD + a_BKD), ctx.routing, valid_BK)
        return combine_route(x_BTD, route, a_BKD + m_BKD), ffn_aux

    def compute_rows(self, x_B1D: torch.Tensor, ctx: BlockContext, plan: RowPlan) -> tuple[torch.Tensor, Any]:
        """One new token per row: every row appends its key and value; the rows the plan names
        compute the rest, x + w·f(x). A block no row runs still costs the K/V projections."""
        if plan.rows is None and plan.n_rows > 0:
            # Every row runs: the dense block on all of them (its fused projection appends every K/V).
            return super().compute_rows(x_B1D, ctx, plan)
        h_B1D = self.attn_norm(x_B1D)
        k_BG1E, v_BG1E = self.attn.keys_values(h_B1D, ctx.cos, ctx.sin)
        k_BGSE, v_BGSE, mask_B11S = ctx.cache.view(valid=ctx.token_mask_BT).update(k_BG1E, v_BG1E, self.layer_idx)
        if plan.n_rows == 0:
            return x_B1D, None
        rows = plan.rows_dev
        cos, sin = ctx.rotary(ctx.pos_BT.index_select(0, rows))
        q_bH1E = self.attn.queries(h_B1D.index_select(0, rows), cos, sin)
        k_bGSE, v_bGSE = k_BGSE.index_select(0, rows), v_BGSE.index_select(0, rows)
        a_b1D = self.attn.attend(q_bH1E, k_bGSE, v_bGSE, mask_B11S.index_select(0, rows))
        x_b1D = plan.x_b1D if plan.x_b1D is not None else x_B1D.index_select(0, rows)
        m_b1D, aux = self.ffn(self.mlp_norm(x_b1D + a_b1D), "causal", None)
        f_b1D = a_b1D + m_b1D
        if plan.weight_b1 is not None:
            f_b1D = f_b1D * plan.weight_b1.unsqueeze(-1).to(f_b1D.dtype)
        return x_B1D.index_add(0, rows, f_b1D.to(x_B1D.dtype)), aux
