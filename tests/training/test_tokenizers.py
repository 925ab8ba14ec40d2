"""Tokenizers: exact round trips, identity by content, rebuilding from a spec, streaming decode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from modlm.training.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    StreamDecoder,
    load_tokenizer,
    tokenizer_from_spec,
)

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


# --------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_hf_tokenizer_round_trip(bpe_tokenizer_file: Path, text: str) -> None:
    tok = load_tokenizer(str(bpe_tokenizer_file))
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids, dtype=np.uint16)) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_hf_tokenizer_merges_and_specials(bpe_tokenizer_file: Path) -> None:
    tok = load_tokenizer(str(bpe_tokenizer_file))
    assert tok.vocab_size == 400
    text = "The history of the city"
    assert len(tok.encode(text)) < len(text.encode("utf-8"))  # BPE merged something
    # No special token is added by encode; a sampled special token is shown, not dropped.
    eot = json.loads(bpe_tokenizer_file.read_text())["added_tokens"][0]
    assert eot["content"] not in tok.decode(tok.encode(text))
    assert tok.decode([eot["id"]]) == eot["content"]
    with pytest.raises(ValueError, match="400"):
        tok.decode([400])


def test_load_tokenizer_by_file_or_directory(bpe_tokenizer_file: Path, tmp_path: Path) -> None:
    by_file = load_tokenizer(str(bpe_tokenizer_file))
    by_dir = load_tokenizer(str(bpe_tokenizer_file.parent))
    assert isinstance(by_file, HFTokenizer) and by_file.name == by_dir.name
    assert by_file.name.startswith("hf-")
    assert isinstance(load_tokenizer(None), ByteTokenizer) and isinstance(load_tokenizer("byte"), ByteTokenizer)
    # The identity is the content: a copy elsewhere is the same tokenizer, an edit is another.
    copy = tmp_path / "copy" / "tokenizer.json"
    copy.parent.mkdir()
    shutil.copy(bpe_tokenizer_file, copy)
    assert load_tokenizer(str(copy)).name == by_file.name
    doc = json.loads(bpe_tokenizer_file.read_text())
    doc["added_tokens"][0]["content"] = "<|other|>"
    copy.write_text(json.dumps(doc))
    assert load_tokenizer(str(copy)).name != by_file.name


@pytest.mark.parametrize("value", ["bytes", "no/such/tokenizer.json", "gpt2"])
def test_load_tokenizer_rejects_unknown_values(value: str) -> None:
    with pytest.raises(ValueError, match="tokenizer=") as err:
        load_tokenizer(value)
    assert repr(value) in str(err.value) and "\n" not in str(err.value)


def test_load_tokenizer_rejects_a_file_that_is_not_a_tokenizer(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json") as err:
        load_tokenizer(str(tmp_path))
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------
# Spec and save: what a checkpoint stores
# --------------------------------------------------------------------------------------------


def test_spec_and_save_rebuild_the_same_tokenizer(bpe_tokenizer_file: Path, tmp_path: Path) -> None:
    for tok in (ByteTokenizer(), load_tokenizer(str(bpe_tokenizer_file))):
        folder = tmp_path / tok.name
        folder.mkdir()
        files = tok.save(folder)
        assert sorted(p.name for p in folder.iterdir()) == sorted(files)
        spec = json.loads(json.dumps(tok.spec()))  # what config.json holds
        again = tokenizer_from_spec(spec, folder)
        assert type(again) is type(tok) and again.name == tok.name and again.vocab_size == tok.vocab_size
        assert again.encode(TEXTS[2]) == tok.encode(TEXTS[2])
    # The saved file is the original, byte for byte.
    hf_name = load_tokenizer(str(bpe_tokenizer_file)).name
    assert (tmp_path / hf_name / "tokenizer.json").read_bytes() == bpe_tokenizer_file.read_bytes()


def test_spec_errors(bpe_tokenizer_file: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(str(bpe_tokenizer_file))
    with pytest.raises(ValueError, match="kind='sentencepiece'"):
        tokenizer_from_spec({"kind": "sentencepiece"}, tmp_path)
    with pytest.raises(ValueError, match="missing"):
        tokenizer_from_spec(tok.spec(), tmp_path)
    (tmp_path / "tokenizer.json").write_text(bpe_tokenizer_file.read_text().replace("<|endoftext|>", "<|eot|>"))
    with pytest.raises(ValueError, match="sha256"):
        tokenizer_from_spec(tok.spec(), tmp_path)


# --------------------------------------------------------------------------------------------
# Streaming decode
# --------------------------------------------------------------------------------------------


def test_stream_decoder_waits_for_a_whole_character() -> None:
    tok = ByteTokenizer()
    stream = StreamDecoder(tok)
    first, second = tok.encode("é")
    assert stream.push(ord("a")) == "a"  # printed at once
    assert stream.push(first) == ""  # half a character: held back
    assert stream.push(second) == "é"
    assert stream.flush() == ""


@pytest.mark.parametrize("make", ["byte", "bpe"])
def test_stream_decoder_pieces_join_to_the_whole_decode(make: str, bpe_tokenizer_file: Path) -> None:
    tok = load_tokenizer(None if make == "byte" else str(bpe_tokenizer_file))
    prompt, text = "Ein naïve", " café in 東京 🚀 and Zürich."
    context, whole = tok.encode(prompt), tok.encode(prompt + text)
    assert whole[: len(context)] == context
    ids = whole[len(context) :]
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # some character spans several tokens
    stream = StreamDecoder(tok, context=context)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(bool(p) for p in pieces) > len(pieces) // 2  # incremental, not all at the end


def test_stream_decoder_flushes_an_incomplete_character() -> None:
    tok = ByteTokenizer()
    stream = StreamDecoder(tok, context=tok.encode("x"))
    assert stream.push(tok.encode("東")[0]) == ""
    assert stream.flush() == "\ufffd"
    # A stray continuation byte is garbage, printed as U+FFFD once text follows it.
    stream = StreamDecoder(tok, context=tok.encode("x"))
    assert stream.push(0x80) == ""
    assert stream.push(ord("b")) == "\ufffdb"
