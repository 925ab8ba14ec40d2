"""Tokenizers: the protocol the rest of the library needs, and UTF-8 bytes (the default)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

__all__ = ["ByteTokenizer", "Tokenizer"]


class Tokenizer(Protocol):
    """What the rest of the library needs from a tokenizer."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, no training, no unknown tokens, exact round trip."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        """``text`` -> list of ints in [0, 256), one per UTF-8 byte."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        """Ids -> text; a byte sequence cut mid-character (e.g. by sampling) decodes to U+FFFD."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        bad = arr[(arr < 0) | (arr >= self.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the byte vocabulary [0, 256)")
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"
