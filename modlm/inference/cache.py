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

    Row lengths (slots used, padding included) live on the host, so slicing and growing never
    wait for the device. While every row of a layer holds the same number of slots (dense
    layers always; routed layers until the first row-subset update) appends are plain slice
    copies and the returned keys/values are views.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, capacity: int = 64,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.n_layers, self.batch_size = n_layers, batch_size
        self.shape = (n_kv_heads, head_dim)
        self.device, self.dtype = torch.device(device), dtype
        self.capacity = [capacity] * n_layers
        self.k = [torch.zeros(batch_size, n_kv_heads, capacity, head_dim, device=device, dtype=dtype)
                  for _ in range(n_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        # slot_ok[l][b, s]: slot s of row b holds a real token (left-padding slots and slots past
        # the row's end do not).
        self.slot_ok = [torch.zeros(batch_size, capacity, dtype=torch.bool, device=device) for _ in range(n_layers)]
        # Slots used per row (padding included), on the host as plain ints: the per-token path
        # does its position arithmetic in Python rather than with tiny tensor operators.
        self.lengths = [[0] * batch_size for _ in range(n_layers)]
        self._max_len = [0] * n_layers  # host-side max of lengths[l]
        self._uniform = [True] * n_layers  # every row of layer l has length _max_len[l]
        # Flat scratch buffers that receive row-subset gathers of keys and values. Reusing them
        # avoids a fresh multi-megabyte allocation per routed block and step, which on some
        # systems costs a page-fault storm (milliseconds) each time.
        self._scratch = [torch.empty(0, device=device, dtype=dtype) for _ in range(2)]

    def layer_lengths(self, layer_idx: int) -> torch.Tensor:
        """Tokens stored per row in this layer (B,): real tokens only."""
        return self.slot_ok[layer_idx].sum(dim=1)

    def slot_lengths(self, layer_idx: int) -> torch.Tensor:
        """Slots used per row in this layer (B,), padding slots included (host tensor)."""
        return torch.tensor(self.lengths[layer_idx], dtype=torch.long)

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
            rows: (b,) distinct int64 row indices, or None for every row. Host (CPU) indices are
                cheapest: the host-side lengths need them, so device indices are copied back
                (a host sync on an accelerator).
            valid_bK: which of the K new tokens are real; invalid ones (padding) are stored in
                the slot sequence but never visible to anyone else. None: all real.

        Returns:
            k_all, v_all: (b, G, S, E) this layer's cache for those rows, S = the longest of those
                rows. Views of the cache when rows is None; row subsets are gathered into scratch
                buffers that the next row-subset update overwrites (use them before then).
            attn_mask: (b, 1, K, S) bool, True where new token j of a row may attend to slot s:
                slots up to its own (causal), holding real tokens; a token always sees itself,
                so no softmax row is empty.
        """
        b, _, K, _ = k_bGKE.shape
        L, B = layer_idx, self.batch_size
        k_new, v_new = k_bGKE.to(self.dtype), v_bGKE.to(self.dtype)
        # NOTE: padding tokens take slots too (masked out for everyone but themselves): writes stay
        # rectangular and no compaction pass is needed; layer_lengths() counts real tokens only.
        if rows is None and self._uniform[L]:
            # Every row holds the same number of slots: append with slice copies, return views.
            start = self._max_len[L]
            S = start + K
            self._grow(L, S)
            self.k[L][:, :, start:S] = k_new
            self.v[L][:, :, start:S] = v_new
            self.slot_ok[L][:, start:S] = True if valid_bK is None else valid_bK
            self.lengths[L] = [S] * B
            self._max_len[L] = S
            ok_bS = self.slot_ok[L][:, :S]
            if K == 1 and valid_bK is None:
                # One real new token per row: the slots after it are empty, so the causal mask is
                # just "holds a real token" (the new slot included).
                mask = ok_bS[:, None, None, :]
            else:
                s_S = torch.arange(S, device=self.device)
                slot_K = torch.arange(start, S, device=self.device)
                causal_KS = s_S[None, :] <= slot_K[:, None]
                self_KS = s_S[None, :] == slot_K[:, None]
                mask = ((causal_KS[None] & ok_bS[:, None, :]) | self_KS[None]).unsqueeze(1)
            return self.k[L][:, :, :S], self.v[L][:, :, :S], mask

        # Ragged rows: positions per row from the host-side lengths.
        if rows is None:
            rows_l = list(range(B))
        else:
            rows_l = rows.tolist()  # host indices are free; device ones cost a copy (a sync)
        lens = self.lengths[L]
        start_l = [lens[r] for r in rows_l]
        S = max(start_l) + K if b > 0 else 0
        self._grow(L, S)
        for r, s0 in zip(rows_l, start_l):
            lens[r] = s0 + K
        self._max_len[L] = max(self._max_len[L], S)
        if rows is not None and 0 < b < B:
            self._uniform[L] = False
        if b == 0:
            empty = self.k[L][:0, :, :0]
            return empty, empty, torch.zeros(0, 1, K, 0, dtype=torch.bool, device=self.device)
        if rows is not None and rows.device == self.device and rows.dtype == torch.long:
            rows_d = rows
        else:
            rows_d = torch.tensor(rows_l, device=self.device)
        if K == 1:
            # One new token per row (decoding): index (row, slot) pairs directly. With the two
            # advanced indices around a slice, the indexed view is (b, G, E).
            slot_b = torch.tensor(start_l, device=self.device)
            self.k[L][rows_d, :, slot_b] = k_new[:, :, 0]
            self.v[L][rows_d, :, slot_b] = v_new[:, :, 0]
            self.slot_ok[L][rows_d, slot_b] = True if valid_bK is None else valid_bK[:, 0]
            slot_bK = slot_b[:, None]
        else:
            slot_bK = torch.tensor(start_l, device=self.device)[:, None] + torch.arange(K, device=self.device)
            r_bK = rows_d[:, None].expand(b, K)
            # Advanced indexing (b, K) on dims 0 and 2 puts those dims first: (b, K, G, E).
            self.k[L][r_bK, :, slot_bK] = k_new.permute(0, 2, 1, 3)
            self.v[L][r_bK, :, slot_bK] = v_new.permute(0, 2, 1, 3)
            self.slot_ok[L][r_bK, slot_bK] = True if valid_bK is None else valid_bK
        if rows is None:
            k_all, v_all, ok_bS = self.k[L][:, :, :S], self.v[L][:, :, :S], self.slot_ok[L][:, :S]
        else:
            k_all = self._gather(0, self.k[L][:, :, :S], rows_d)
            v_all = self._gather(1, self.v[L][:, :, :S], rows_d)
            ok_bS = self.slot_ok[L][:, :S].index_select(0, rows_d)
        if K == 1 and valid_bK is None:
            mask = ok_bS[:, None, None, :]
        else:
            s_S = torch.arange(S, device=self.device)
            causal_bKS = s_S.view(1, 1, S) <= slot_bK.unsqueeze(-1)
            self_bKS = s_S.view(1, 1, S) == slot_bK.unsqueeze(-1)
            mask = ((causal_bKS & ok_bS.unsqueeze(1)) | self_bKS).unsqueeze(1)
        return k_all, v_all, mask

    def _gather(self, which: int, src_BGSE: torch.Tensor, rows_b: torch.Tensor) -> torch.Tensor:
        """src[rows] into scratch buffer ``which`` (valid until the next row-subset update)."""
        shape = (rows_b.numel(),) + tuple(src_BGSE.shape[1:])
        n = rows_b.numel() * src_BGSE[0].numel()
        if self._scratch[which].numel() < n:
            self._scratch[which] = torch.empty(max(n, 2 * self._scratch[which].numel()), device=self.device,
                                               dtype=self.dtype)
        return torch.index_select(src_BGSE, 0, rows_b, out=self._scratch[which][:n].view(shape))

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
