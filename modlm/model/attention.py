"""Causal self-attention with grouped-query heads and rotary positions.

Axis legend: B batch, T tokens in this call, S cached slots, D model width, H query heads,
G key/value heads, E head size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from modlm.config import ModelConfig
from modlm.model.layers import Linear, apply_rotary
from modlm.spec import roles


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads, over whatever tokens it is given.

    In a routed block it sees only the selected tokens, in causal order at their true RoPE
    positions, so a token that skipped this block is invisible here to every later token
    (``modlm.model.keys_kept.KeysKeptAttention`` keeps skipped tokens as keys instead).
    """

    param_roles = {"qkv.weight": roles.MATRIX, "proj.weight": roles.OUT_MATRIX}

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.qkv = Linear(config.d_model, (config.n_heads + 2 * config.n_kv_heads) * config.head_dim, bias=False)
        self.proj = Linear(config.d_model, config.d_model, bias=False)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache=None,
        record=None,
    ) -> torch.Tensor:
        """Attention over the given tokens. ``record``, if given, is called with this call's
        queries and keys after RoPE, (B, H, T, E) and (B, G, T, E), before any cache: the block
        derives the attention its tokens receive from them (A-MoD, ``modlm.routing.attention_based``)."""
        B, T, D = x_BTD.shape
        H, G, E = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x_BTD).split([H * E, G * E, G * E], dim=-1)
        q = q.view(B, T, H, E).transpose(1, 2)  # (B, H, T, E)
        k = k.view(B, T, G, E).transpose(1, 2)  # (B, G, T, E)
        v = v.view(B, T, G, E).transpose(1, 2)  # (B, G, T, E)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if record is not None:
            record(q, k)
        if cache is not None:
            # The cache returns this layer's keys/values for the whole visible history (B, G, S, E)
            # and the mask that makes each query see exactly its own causal past.
            k, v, attn_mask = cache.update(k, v, self.layer_idx)
        return self.attend(q, k, v, attn_mask)

    def attend(
        self, q_BHTE: torch.Tensor, k_BGSE: torch.Tensor, v_BGSE: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The output projection of softmax(q k^T / sqrt(E)) v: (B, T, D).

        ``attn_mask``: (B or 1, 1, T, S) bool, True where a query may see a key; None: the causal
        mask of T queries over the same T keys."""
        B, H, T, E = q_BHTE.shape
        G = k_BGSE.shape[1]
        if G != H:
            k_BGSE = k_BGSE.repeat_interleave(H // G, dim=1)  # (B, H, S, E)
            v_BGSE = v_BGSE.repeat_interleave(H // G, dim=1)
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q_BHTE, k_BGSE, v_BGSE, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q_BHTE, k_BGSE, v_BGSE, attn_mask=attn_mask)
        y = y.transpose(1, 2).reshape(B, T, H * E)  # (B, T, D)
        return self.proj(y)
