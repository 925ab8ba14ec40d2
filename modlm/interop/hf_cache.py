"""``MoDCache``: modlm's per-layer KV cache behind ``transformers``' ``Cache`` type.

``generate`` keeps the cache an output hands back and passes it to the next forward; it asks
it little else (``get_seq_length``, ``batch_size``, whether it can be cropped or compiled).
What it holds is modlm's own ``ModelCache``: contiguous for dense layers, ragged for routed
ones (each row holds only the tokens that went through the block, at their true positions),
which ``transformers``' per-layer caches do not model. So the keys and values are written by
modlm's attention (``ModelCache.update``), never through ``Cache.update``.

Besides the layers it keeps what decoding needs between calls: how many input positions were
fed (``get_seq_length``: padding included, as ``transformers`` counts), each row's next true
position (left padding counts none), and the decode policy (``HostDecisions``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Cache

from modlm.config import ModelConfig
from modlm.inference.cache import ModelCache
from modlm.inference.decode import HostDecisions

__all__ = ["MoDCache"]

# Slots preallocated per row beyond the prompt; ModelCache doubles its buffers when full.
_HEADROOM = 64


class MoDCache(Cache):
    """A ``transformers`` cache holding modlm's ``ModelCache`` (built on the first forward).

    Args:
        config: the model's ``ModelConfig`` (each layer's cache layout, its router).
    """

    def __init__(self, config: ModelConfig):
        # transformers' per-layer objects stay empty: modlm's ModelCache holds the layers.
        super().__init__(layers=[])
        self.config = config
        self.model_cache: ModelCache | None = None
        self.policy = HostDecisions(config.router)
        self.seen = 0  # input positions fed so far (padding included)
        self.next_pos_B1: torch.Tensor | None = None  # each row's next true position

    def start(self, batch_size: int, prompt_len: int, device: torch.device, dtype: torch.dtype) -> ModelCache:
        """Allocate the per-layer caches for a prompt of ``prompt_len`` positions (the prefill)."""
        if self.model_cache is not None:
            raise ValueError("this MoDCache already holds a sequence: start a new one for a new prompt")
        self.model_cache = ModelCache.for_config(
            self.config, batch_size, capacity=prompt_len + _HEADROOM, device=device, dtype=dtype
        )
        return self.model_cache

    def advance(self, n: int, next_pos_B1: torch.Tensor) -> None:
        """Record that ``n`` positions were fed; the rows' next true positions are ``next_pos_B1``."""
        self.seen += n
        self.next_pos_B1 = next_pos_B1

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Input positions fed so far (padding included): what ``generate`` slices the inputs by."""
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no fixed maximum: the buffers grow

    def layer_lengths(self, layer_idx: int) -> torch.Tensor:
        """Real tokens stored per row in a layer (B,): fewer than the sequence in a routed layer."""
        if self.model_cache is None:
            raise ValueError("this MoDCache is empty: nothing was prefilled yet")
        return self.model_cache.layer_lengths(layer_idx)

    def __len__(self) -> int:
        return self.config.n_layers

    @property
    def batch_size(self) -> int:
        return -1 if self.model_cache is None else self.model_cache.batch_size

    @property
    def is_initialized(self) -> bool:
        return self.model_cache is not None

    @property
    def is_compileable(self) -> bool:
        return False  # data-dependent row counts in routed layers

    @property
    def is_croppable(self) -> bool:
        return False  # a ragged layer's rows hold different numbers of tokens

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.config.n_layers

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.config.n_layers

    def update(self, *args: Any, **kwargs: Any):
        raise ValueError("MoDCache is written by modlm's attention (ModelCache.update), not through Cache.update")

    def _refuse(self, what: str):
        raise ValueError(f"MoDCache does not support {what} (beam search, assisted decoding): use greedy or sampling")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._refuse("reorder_cache")

    def crop(self, max_length: int) -> None:
        self._refuse("crop")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._refuse("batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._refuse("batch_select_indices")

    def reset(self) -> None:
        """Forget the sequence (the next forward prefills again)."""
        self.model_cache, self.seen, self.next_pos_B1 = None, 0, None

    def __repr__(self) -> str:
        return f"MoDCache(layers={self.config.n_layers}, batch={self.batch_size}, seen={self.seen})"
