"""Tokenizers: exact round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modlm.training.tokenizers import ByteTokenizer

TEXTS = ["", "hello world\n", "naïve café — 東京 🚀", "\x00\xff"]


# --------------------------------------------------------------------------------------------
# Bytes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    # Arrays and tensors (what the sampler hands over) decode the same way.
    assert tok.decode(np.array(ids, dtype=np.uint8)) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_byte_tokenizer_partial_character_and_bad_id() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("é")[:1]  # half of a 2-byte character
    assert tok.decode(ids) == "\ufffd"
    with pytest.raises(ValueError, match="300"):
        tok.decode([65, 300])
