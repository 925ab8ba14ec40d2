"""A KV cache that holds, per layer and per sequence, only the tokens processed in that layer.

Axis legend: B batch rows, b rows taking part in this update, G key/value heads,
K new tokens per row in this update, S cached slots, E head size.

In a routed layer a token that skipped the layer has no key or value there: later tokens
cannot attend to it (Raposo et al. 2024, §3.1), so nothing is stored. Lengths are therefore
ragged across layers and rows. Each layer keeps a preallocated buffer per row and doubles it
when full (amortised O(1) per token, no quadratic copying).

The contract is narrow, in the spirit of Hugging Face's ``Cache.update``:
``update(k, v, layer_idx, rows=None, valid=None) -> (k_all, v_all, attn_mask)``.
"""

from __future__ import annotations

import torch


class RoutedKVCache:
    """Ragged per-layer, per-row key/value storage.

    Args:
        n_layers: layers of the model.
        batch_size: rows B.
        n_kv_heads, head_dim: G and E.
        capacity: initial slots per row and layer (grows by doubling).
        device, dtype: of the stored keys and values.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, capacity: int = 64,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1")
        self.n_layers, self.batch_size = n_layers, batch_size
        self.shape = (n_kv_heads, head_dim)
        self.device, self.dtype = torch.device(device), dtype
        self.capacity = [capacity] * n_layers
        self.k = [torch.zeros(batch_size, n_kv_heads, capacity, head_dim, device=device, dtype=dtype)
                  for _ in range(n_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        # slot_ok[l][b, s]: slot s of row b holds a real token (left-padding slots do not).
        self.slot_ok = [torch.zeros(batch_size, capacity, dtype=torch.bool, device=device) for _ in range(n_layers)]
        self.lengths = [torch.zeros(batch_size, dtype=torch.long, device=device) for _ in range(n_layers)]
        # Host-side mirror of max length per layer, so slicing needs no device sync.
        self._max_len = [0] * n_layers

    def layer_lengths(self, layer_idx: int) -> torch.Tensor:
        """Tokens stored per row in this layer (B,): real tokens only."""
        return self.slot_ok[layer_idx].sum(dim=1)

    def _grow(self, layer_idx: int, needed: int) -> None:
        cap = self.capacity[layer_idx]
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap)
        B, (G, E) = self.batch_size, self.shape
        for store in (self.k, self.v):
            buf = torch.zeros(B, G, new_cap, E, device=self.device, dtype=self.dtype)
            buf[:, :, :cap] = store[layer_idx]
            store[layer_idx] = buf
        ok = torch.zeros(B, new_cap, dtype=torch.bool, device=self.device)
        ok[:, :cap] = self.slot_ok[layer_idx]
        self.slot_ok[layer_idx] = ok
        self.capacity[layer_idx] = new_cap

    def update(self, k_bGKE: torch.Tensor, v_bGKE: torch.Tensor, layer_idx: int, rows: torch.Tensor | None = None,
               valid_bK: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append K new keys/values to the given rows of a layer; return what those rows may attend to.

        Args:
            k_bGKE, v_bGKE: new keys/values for rows ``rows`` (all B rows if None), in causal order.
            rows: (b,) int64 row indices, or None for every row.
            valid_bK: which of the K new tokens are real; invalid ones (padding) are stored in
                the slot sequence but never visible to anyone else. None: all real.

        Returns:
            k_all, v_all: (b, G, S, E) this layer's cache for those rows, S = the longest row.
            attn_mask: (b, 1, K, S) bool, True where new token j of a row may attend to slot s:
                slots up to its own (causal), holding real tokens; a token always sees itself,
                so no softmax row is empty.
        """
        b, _, K, _ = k_bGKE.shape
        rows_b = torch.arange(self.batch_size, device=self.device) if rows is None else rows
        start_b = self.lengths[layer_idx][rows_b]  # (b,)
        # NOTE: padding tokens take slots too (masked out for everyone but themselves): writes stay
        # rectangular and no compaction pass is needed; layer_lengths() counts real tokens only.
        if rows is None:
            needed = self._max_len[layer_idx] + K  # every row advances by K: no device sync
        else:
            # Row subsets come from a routing decision that was already synced to the host.
            needed = max(self._max_len[layer_idx], int(start_b.max()) + K) if b > 0 else self._max_len[layer_idx]
        self._grow(layer_idx, needed)
        slot_bK = start_b.unsqueeze(1) + torch.arange(K, device=self.device)  # (b, K)
        r_bK = rows_b.unsqueeze(1).expand(b, K)
        k_buf, v_buf = self.k[layer_idx], self.v[layer_idx]
        # Advanced indexing (b, K) on dims 0 and 2 puts those dims first: (b, K, G, E).
        k_buf[r_bK, :, slot_bK] = k_bGKE.permute(0, 2, 1, 3).to(self.dtype)
        v_buf[r_bK, :, slot_bK] = v_bGKE.permute(0, 2, 1, 3).to(self.dtype)
        ok_bK = torch.ones(b, K, dtype=torch.bool, device=self.device) if valid_bK is None else valid_bK
        self.slot_ok[layer_idx][r_bK, slot_bK] = ok_bK
        self.lengths[layer_idx][rows_b] = start_b + K
        self._max_len[layer_idx] = S = needed
        s_S = torch.arange(S, device=self.device)
        causal_bKS = s_S.view(1, 1, S) <= slot_bK.unsqueeze(-1)
        self_bKS = s_S.view(1, 1, S) == slot_bK.unsqueeze(-1)
        mask_bKS = (causal_bKS & self.slot_ok[layer_idx][rows_b, :S].unsqueeze(1)) | self_bKS
        if rows is None:  # views, no copy
            return k_buf[:, :, :S], v_buf[:, :, :S], mask_bKS.unsqueeze(1)
        return k_buf[rows_b, :, :S], v_buf[rows_b, :, :S], mask_bKS.unsqueeze(1)

    def view(self, rows: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> "CacheView":
        """Bind the rows and token validity of one forward call, so attention only calls update()."""
        return CacheView(self, rows, valid)


class CacheView:
    """The cache as one attention call sees it: ``update(k, v, layer_idx)`` for fixed rows/validity."""

    __slots__ = ("cache", "rows", "valid")

    def __init__(self, cache: RoutedKVCache, rows: torch.Tensor | None, valid: torch.Tensor | None):
        self.cache, self.rows, self.valid = cache, rows, valid

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int):
        return self.cache.update(k, v, layer_idx, rows=self.rows, valid_bK=self.valid)
