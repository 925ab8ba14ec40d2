"""The KV cache: one object per layer, built from the config's layer kinds.

Axis legend: B batch rows, b rows taking part in this update, G key/value heads,
K new tokens per row in this update, S cached slots, E head size.

- A dense layer processes every token of every row, so every row holds the same number of
  slots: ``ContiguousLayerCache`` appends with slice copies and returns views.
- In a routed layer a token that skipped the layer has no key or value there: later tokens
  cannot attend to it (Raposo et al. 2024, §3.1), so nothing is stored, and rows hold different
  numbers of tokens. ``RaggedLayerCache`` keeps per-row lengths on the host and writes
  (row, slot) pairs for the rows that ran.

Which layout a layer gets is its block kind's ``cache_layout`` (``modlm.spec.kinds``): a
``"keys-kept"`` routed layer stores every token's key and value, so it is contiguous. Each
layer preallocates a buffer per row and doubles it when full (amortised O(1) per token).

The contract is narrow, in the spirit of Hugging Face's ``Cache.update``:
``ModelCache.update(k, v, layer_idx, rows=None, valid=None) -> (k_all, v_all, attn_mask)``.
"""

from __future__ import annotations

import torch

from modlm.config import ModelConfig
from modlm.spec.kinds import block_spec

__all__ = ["CacheView", "ContiguousLayerCache", "ModelCache", "RaggedLayerCache"]


class _Scratch:
    """Flat buffers that receive row-subset gathers of keys and values, shared by the layers of
    one cache. Reusing them avoids a fresh multi-megabyte allocation per routed block and step,
    which on some systems costs a page-fault storm (milliseconds) each time."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.buffers = [torch.empty(0, device=device, dtype=dtype) for _ in range(2)]

    def gather(self, which: int, src_BGSE: torch.Tensor, rows_b: torch.Tensor) -> torch.Tensor:
        """src[rows] into buffer ``which`` (valid until the next row-subset update of any layer)."""
        shape = (rows_b.numel(),) + tuple(src_BGSE.shape[1:])
        n = rows_b.numel() * src_BGSE[0].numel()
        buf = self.buffers[which]
        if buf.numel() < n:
            buf = self.buffers[which] = torch.empty(max(n, 2 * buf.numel()), device=buf.device, dtype=buf.dtype)
        return torch.index_select(src_BGSE, 0, rows_b, out=buf[:n].view(shape))


class ContiguousLayerCache:
    """One layer's keys/values when every row holds the same number of slots.

    Args:
        batch_size: rows B. n_kv_heads, head_dim: G and E.
        capacity: initial slots per row (grows by doubling). device, dtype: of the storage.

    ``slot_ok[b, s]``: slot s of row b holds a real token (left-padding slots and slots past the
    row's end do not). ``lengths``: slots used per row (padding included), host ints.
    """

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        capacity: int,
        device: torch.device,
        dtype: torch.dtype,
        scratch: _Scratch | None = None,
    ):
        self.batch_size, self.shape = batch_size, (n_kv_heads, head_dim)
        self.device, self.dtype = device, dtype
        self.capacity = capacity
        self.k = torch.zeros(batch_size, n_kv_heads, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.slot_ok = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self.lengths = [0] * batch_size
        self.max_len = 0
        self.uniform = True  # every row has length max_len
        self.scratch = scratch

    def grow(self, needed: int) -> None:
        cap = self.capacity
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap)
        B, (G, E) = self.batch_size, self.shape
        for name in ("k", "v"):
            buf = torch.zeros(B, G, new_cap, E, device=self.device, dtype=self.dtype)
            buf[:, :, :cap] = getattr(self, name)
            setattr(self, name, buf)
        ok = torch.zeros(B, new_cap, dtype=torch.bool, device=self.device)
        ok[:, :cap] = self.slot_ok
        self.slot_ok, self.capacity = ok, new_cap

    def update(
        self,
        k_bGKE: torch.Tensor,
        v_bGKE: torch.Tensor,
        rows: torch.Tensor | None = None,
        valid_bK: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append K new keys/values to every row; see ``ModelCache.update``."""
        if rows is not None:
            raise ValueError("a contiguous (dense) layer cache takes every row; rows must be None")
        return self._append_all(k_bGKE, v_bGKE, valid_bK)

    def _append_all(
        self, k_BGKE: torch.Tensor, v_BGKE: torch.Tensor, valid_BK: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # NOTE: padding tokens take slots too (masked out for everyone but themselves): writes stay
        # rectangular and no compaction pass is needed; real_lengths() counts real tokens only.
        K = k_BGKE.shape[2]
        start = self.max_len
        S = start + K
        self.grow(S)
        self.k[:, :, start:S] = k_BGKE.to(self.dtype)
        self.v[:, :, start:S] = v_BGKE.to(self.dtype)
        self.slot_ok[:, start:S] = True if valid_BK is None else valid_BK
        self.lengths = [S] * self.batch_size
        self.max_len = S
        single = K == 1 and valid_BK is None
        slot_1K = None if single else torch.arange(start, S, device=self.device)[None]  # the same slots in every row
        return self.k[:, :, :S], self.v[:, :, :S], _attention_mask(self.slot_ok[:, :S], slot_1K, single)

    def real_lengths(self) -> torch.Tensor:
        """Tokens stored per row (B,): real tokens only."""
        return self.slot_ok.sum(dim=1)

    def truncate(self, lengths_B: list[int]) -> None:
        """Keep the first ``lengths_B[b]`` slots of each row and forget the rest (rollback).

        Rows share one slot count here, so a row that keeps fewer slots than the longest keeps
        its dropped slots as holes: marked empty (``slot_ok`` False), seen by no one, and
        skipped by ``real_lengths``. Keys carry their rotary position, so a hole changes nothing
        for later tokens; it only costs a masked slot until the cache is rebuilt.
        """
        S = self._check_truncate(lengths_B)
        for b, n in enumerate(lengths_B):
            self.slot_ok[b, n : self.max_len] = False
        self.lengths = [S] * self.batch_size
        self.max_len = S

    def _check_truncate(self, lengths_B: list[int]) -> int:
        """The longest kept row, after checking that no row is asked to grow."""
        if len(lengths_B) != self.batch_size or any(not 0 <= n <= m for n, m in zip(lengths_B, self.lengths)):
            raise ValueError(f"truncate lengths {list(lengths_B)} must be, per row, in [0, {self.lengths}]")
        return max(lengths_B)


class RaggedLayerCache(ContiguousLayerCache):
    """One routed layer's keys/values: each row holds only the tokens processed there.

    While every row holds the same number of slots (until the first row-subset update) appends
    take the contiguous path; after that, positions come from the host-side per-row lengths.
    """

    def update(
        self,
        k_bGKE: torch.Tensor,
        v_bGKE: torch.Tensor,
        rows: torch.Tensor | None = None,
        valid_bK: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append K new keys/values to the given rows; see ``ModelCache.update``."""
        if rows is None and self.uniform:
            return self._append_all(k_bGKE, v_bGKE, valid_bK)
        b, _, K, _ = k_bGKE.shape
        B = self.batch_size
        k_new, v_new = k_bGKE.to(self.dtype), v_bGKE.to(self.dtype)
        rows_l = list(range(B)) if rows is None else rows.tolist()  # host indices are free; device ones sync
        lens = self.lengths
        start_l = [lens[r] for r in rows_l]
        S = max(start_l) + K if b > 0 else 0
        self.grow(S)
        for r, s0 in zip(rows_l, start_l):
            lens[r] = s0 + K
        self.max_len = max(self.max_len, S)
        if rows is not None and 0 < b < B:
            self.uniform = False
        if b == 0:
            empty = self.k[:0, :, :0]
            return empty, empty, torch.zeros(0, 1, K, 0, dtype=torch.bool, device=self.device)
        if rows is not None and rows.device == self.device and rows.dtype == torch.long:
            rows_d = rows
        else:
            rows_d = torch.tensor(rows_l, device=self.device)
        if K == 1:
            # One new token per row (decoding): index (row, slot) pairs directly. With the two
            # advanced indices around a slice, the indexed view is (b, G, E).
            slot_b = torch.tensor(start_l, device=self.device)
            self.k[rows_d, :, slot_b] = k_new[:, :, 0]
            self.v[rows_d, :, slot_b] = v_new[:, :, 0]
            self.slot_ok[rows_d, slot_b] = True if valid_bK is None else valid_bK[:, 0]
            slot_bK = slot_b[:, None]
        else:
            slot_bK = torch.tensor(start_l, device=self.device)[:, None] + torch.arange(K, device=self.device)
            r_bK = rows_d[:, None].expand(b, K)
            # Advanced indexing (b, K) on dims 0 and 2 puts those dims first: (b, K, G, E).
            self.k[r_bK, :, slot_bK] = k_new.permute(0, 2, 1, 3)
            self.v[r_bK, :, slot_bK] = v_new.permute(0, 2, 1, 3)
            self.slot_ok[r_bK, slot_bK] = True if valid_bK is None else valid_bK
        if rows is None:
            k_all, v_all, ok_bS = self.k[:, :, :S], self.v[:, :, :S], self.slot_ok[:, :S]
        else:
            k_all = self.scratch.gather(0, self.k[:, :, :S], rows_d)
            v_all = self.scratch.gather(1, self.v[:, :, :S], rows_d)
            ok_bS = self.slot_ok[:, :S].index_select(0, rows_d)
        return k_all, v_all, _attention_mask(ok_bS, slot_bK, K == 1 and valid_bK is None)

    def truncate(self, lengths_B: list[int]) -> None:
        """Keep the first ``lengths_B[b]`` slots of each row and forget the rest (rollback): each
        row's next token is stored right after its kept slots."""
        S = self._check_truncate(lengths_B)
        for b, n in enumerate(lengths_B):
            self.slot_ok[b, n : self.lengths[b]] = False
        if len(set(lengths_B)) > 1:
            self.uniform = False
        self.lengths = list(lengths_B)
        self.max_len = S


def _attention_mask(ok_bS: torch.Tensor, slot_bK: torch.Tensor | None, single_real: bool) -> torch.Tensor:
    """(b, 1, K, S) bool: new token j of a row sees the slots up to its own (``slot_bK``, (b, K) or
    (1, K)) that hold real tokens, and always itself (so no softmax row is empty).

    ``single_real``: one real new token per row, so the slots after it are empty and the mask is
    just "holds a real token" (the new slot included); ``slot_bK`` is then not needed.
    """
    if single_real:
        return ok_bS[:, None, None, :]
    S = ok_bS.shape[1]
    s_11S = torch.arange(S, device=ok_bS.device).view(1, 1, S)
    causal_bKS = s_11S <= slot_bK.unsqueeze(-1)
    self_bKS = s_11S == slot_bK.unsqueeze(-1)
    return ((causal_bKS & ok_bS.unsqueeze(1)) | self_bKS).unsqueeze(1)


LAYOUTS: dict[str, type[ContiguousLayerCache]] = {"contiguous": ContiguousLayerCache, "ragged": RaggedLayerCache}


class ModelCache:
    """The per-layer caches of one batch of sequences.

    Args:
        layouts: one cache layout per layer ("contiguous" or "ragged"; see ``for_config``).
        batch_size: rows B. n_kv_heads, head_dim: G and E.
        capacity: initial slots per row and layer (grows by doubling).
        device, dtype: of the stored keys and values.
    """

    def __init__(
        self,
        layouts: list[str] | tuple[str, ...],
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        capacity: int = 64,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        unknown = sorted(set(layouts) - set(LAYOUTS))
        if unknown:
            raise ValueError(f"cache layout(s) {unknown} unknown; available: {sorted(LAYOUTS)}")
        device = torch.device(device)
        self.batch_size, self.device, self.dtype = batch_size, device, dtype
        scratch = _Scratch(device, dtype)
        self.layers = [
            LAYOUTS[lay](batch_size, n_kv_heads, head_dim, capacity, device, dtype, scratch) for lay in layouts
        ]

    @classmethod
    def for_config(
        cls,
        config: ModelConfig,
        batch_size: int,
        capacity: int = 64,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> ModelCache:
        """The cache a model of this config needs: each layer's layout from its block kind."""
        layouts = [block_spec(kind).cache_layout for kind in config.layer_types]
        return cls(layouts, batch_size, config.n_kv_heads, config.head_dim, capacity, device, dtype)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def update(
        self,
        k_bGKE: torch.Tensor,
        v_bGKE: torch.Tensor,
        layer_idx: int,
        rows: torch.Tensor | None = None,
        valid_bK: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append K new keys/values to the given rows of a layer; return what those rows may attend to.

        Args:
            k_bGKE, v_bGKE: new keys/values for rows ``rows`` (all B rows if None), in causal order.
            rows: (b,) distinct int64 row indices, or None for every row (dense layers: always).
                Host (CPU) indices are cheapest: the host-side lengths need them, so device
                indices are copied back (a host sync on an accelerator).
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
        return self.layers[layer_idx].update(k_bGKE, v_bGKE, rows=rows, valid_bK=valid_bK)

    def layer_lengths(self, layer_idx: int) -> torch.Tensor:
        """Tokens stored per row in this layer (B,): real tokens only."""
        return self.layers[layer_idx].real_lengths()

    def slot_lengths(self, layer_idx: int) -> torch.Tensor:
        """Slots used per row in this layer (B,), padding slots included (host tensor)."""
        return torch.tensor(self.layers[layer_idx].lengths, dtype=torch.long)

    def truncate(self, lengths_LB: list[list[int]]) -> None:
        """Roll back: layer l keeps the first ``lengths_LB[l][b]`` slots of row b (see
        ``slot_lengths``; a snapshot of them taken earlier restores that moment's contents).

        Used by speculative decoding to drop rejected draft tokens. A contiguous layer cannot
        shorten one row alone: the dropped slots of shorter rows stay as empty holes that no
        token sees (``ContiguousLayerCache.truncate``)."""
        if len(lengths_LB) != self.n_layers:
            raise ValueError(f"truncate takes one list of lengths per layer ({self.n_layers}), got {len(lengths_LB)}")
        for layer, lengths_B in zip(self.layers, lengths_LB):
            layer.truncate(lengths_B)

    def view(self, rows: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> CacheView:
        """Bind the rows and token validity of one forward call, so attention only calls update()."""
        return CacheView(self, rows, valid)


class CacheView:
    """The cache as one attention call sees it: ``update(k, v, layer_idx)`` for fixed rows/validity."""

    __slots__ = ("cache", "rows", "valid")

    def __init__(self, cache: ModelCache, rows: torch.Tensor | None, valid: torch.Tensor | None):
        self.cache, self.rows, self.valid = cache, rows, valid

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int):
        return self.cache.update(k, v, layer_idx, rows=self.rows, valid_bK=self.valid)
