"""A byte-level BPE tokenizer trained on a corpus's training split, cached beside its tokens.

    path = bpe_tokenizer("enwiki", vocab_size=4096)   # .../enwiki-<hash>/bpe-4096/tokenizer.json
    TrainConfig(tokenizer=str(path), ...)              # then trains on BPE tokens

The tokenizer is learned with Hugging Face ``tokenizers`` (its BPE trainer over a byte-level
pre-tokenizer, so every text encodes, nothing is unknown and decoding is exact) from the
*training* split of the byte-level token cache (``modlm.training.corpus.prepare_corpus`` with
the same split seed): validation documents never shape the vocabulary. It is written into that
cache folder as ``bpe-<vocab>/tokenizer.json``; since the folder is named after everything that
decides the split, a changed corpus or split gets its own tokenizer. The file is then an
ordinary tokenizer.json: ``load_tokenizer`` reads it, the token cache keys on its hash, and
checkpoints carry a copy (``modlm.training.checkpoint``).
"""

from __future__ import annotations

import json
from pathlib import Path

from modlm.training.corpus import DOC_SEPARATOR, _atomic_write_bytes, _exclusive, prepare_corpus
from modlm.training.tokenizers import HF_FILENAME, _import_tokenizers

__all__ = ["MIN_VOCAB", "bpe_tokenizer", "parse_bpe_spec"]

MIN_VOCAB = 512  # 256 byte symbols plus room for merges; smaller is just the byte tokenizer
MAX_VOCAB = 65536  # the uint16 token cache


def parse_bpe_spec(spec: str) -> int | None:
    """'bpe:4096' -> 4096; any other text -> None (not a BPE request). A bad size is refused in one line."""
    if not spec.startswith("bpe:"):
        return None
    text = spec[4:]
    if not text.isdigit() or not MIN_VOCAB <= int(text) <= MAX_VOCAB:
        raise ValueError(f"tokenizer={spec!r} is invalid: 'bpe:N' needs a vocabulary N in [{MIN_VOCAB}, {MAX_VOCAB}]")
    return int(text)


def bpe_tokenizer(
    data: str | None,
    vocab_size: int,
    cache_dir: str | Path | None = None,
    split_seed: int = 0,
    val_fraction: float = 0.05,
) -> Path:
    """The tokenizer.json of a ``vocab_size`` byte-level BPE learned on the training split of
    ``data`` (split by ``split_seed`` and ``val_fraction``, as ``prepare_corpus`` splits it);
    trained once, then read from the cache. Training holds the cache folder's lock, so two
    processes asking at once train it once."""
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is invalid: a BPE vocabulary must be in [{MIN_VOCAB}, {MAX_VOCAB}]")
    corpus = prepare_corpus(data, cache_dir=cache_dir, val_fraction=val_fraction, seed=split_seed)
    folder = corpus.path / f"bpe-{vocab_size}"
    path = folder / HF_FILENAME
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder / ".lock"):
        if not path.is_file():  # another process may have trained it while this one waited
            text = bytes(corpus.train).decode("utf-8", errors="replace")
            _atomic_write_bytes(path, iter([_train(text.split(DOC_SEPARATOR), vocab_size).encode("utf-8")]))
            meta = {"vocab_size": vocab_size, "trained_on": "train split", "corpus": corpus.meta["fingerprint_hash"]}
            _atomic_write_bytes(folder / "meta.json", iter([json.dumps(meta, indent=2).encode()]))
    return path


def _train(paragraphs: list[str], vocab_size: int) -> str:
    """The tokenizer.json text of a byte-level BPE trained on ``paragraphs`` (no special tokens:
    documents are separated by the blank line the token streams already use)."""
    tk = _import_tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no text is unknown
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator((p for p in paragraphs if p), trainer=trainer)
    return tok.to_str()
