"""The BPE option: a tokenizer learned on the training split only, cached beside the data, that
training uses and checkpoints carry."""

import dataclasses
import random

import numpy as np
import pytest

from modlm.training.bpe import bpe_tokenizer, parse_bpe_spec
from modlm.training.corpus import DOC_SEPARATOR, prepare_corpus
from modlm.training.tokenizers import load_tokenizer

COMMON = ["the", "router", "token", "block", "depth", "of", "a", "model"]


def _word(i: int) -> str:
    """Document i's own made-up word, letters only (a byte-level pre-tokenizer splits off digits)."""
    return f"qzv{'abcdefghijklmnopqrstuvwxyz'[i // 26]}{'abcdefghijklmnopqrstuvwxyz'[i % 26]}x"


def _corpus(tmp_path):
    """A folder of 40 documents; each repeats its own made-up word many times."""
    folder = tmp_path / "docs"
    folder.mkdir()
    rng = random.Random(0)
    for i in range(40):
        words = [rng.choice(COMMON) for _ in range(300)] + [_word(i)] * 60
        rng.shuffle(words)
        (folder / f"doc{i:02d}.txt").write_text(" ".join(words) + ".")
    return str(folder)


def test_bpe_is_learned_on_the_training_split_and_cached(tmp_path):
    data, cache = _corpus(tmp_path), tmp_path / "cache"
    path = bpe_tokenizer(data, 512, cache_dir=cache, split_seed=3)
    tok = load_tokenizer(str(path))
    assert 256 < tok.vocab_size <= 512  # a small corpus runs out of pairs to merge before 512
    byte_corpus = prepare_corpus(data, cache_dir=cache, seed=3)
    assert path.parent.parent == byte_corpus.path  # beside the data it was learned from
    val_text = bytes(np.asarray(byte_corpus.val)).decode()
    val_docs = {i for i in range(40) if _word(i) in val_text}
    assert val_docs and len(val_docs) < 40
    # A word of a training document became one token; no word seen only in validation did.
    one_token = {i for i in range(40) if len(tok.encode(" " + _word(i))) == 1}
    assert one_token and not (one_token & val_docs)
    # exact round trip, also of text it never saw
    text = DOC_SEPARATOR.join(["qzvadx router é 日本 42", "depth\tblock"])
    assert tok.decode(tok.encode(text)) == text
    # cached: a second call reads the same file; another split seed learns its own
    mtime = path.stat().st_mtime_ns
    assert bpe_tokenizer(data, 512, cache_dir=cache, split_seed=3) == path and path.stat().st_mtime_ns == mtime
    assert bpe_tokenizer(data, 512, cache_dir=cache, split_seed=4) != path


def test_training_uses_the_bpe_tokenizer_and_the_checkpoint_carries_it(tmp_path):
    from modlm.experiments.isoflop import Shape, SweepSettings, plan_run
    from modlm.training.checkpoint import load_tokenizer_from_checkpoint
    from modlm.training.trainer import train

    settings = SweepSettings(
        seq_len=16,
        batch_size=2,
        head_dim=8,
        predictor_hidden=4,
        data=_corpus(tmp_path),
        cache_dir=str(tmp_path / "cache"),
        tokenizer="bpe:512",
        device="cpu",
    )
    run = plan_run(3e8, "mod", Shape(16, 2), settings)
    assert run.overrides["vocab_size"] == 512  # planned (and its FLOPs counted) without training the tokenizer
    cfg = dataclasses.replace(run.train_config(settings, tmp_path / "run"), max_steps=3, warmup_steps=1)
    assert cfg.tokenizer == settings.tokenizer_path() and cfg.tokenizer.endswith("bpe-512/tokenizer.json")
    summary = train(cfg, progress=False)
    assert summary["step"] == 3
    tok = load_tokenizer_from_checkpoint(tmp_path / "run")
    assert tok.name == load_tokenizer(cfg.tokenizer).name


@pytest.mark.parametrize("spec", ["bpe:12", "bpe:x", "bpe:100000"])
def test_bad_bpe_sizes_are_refused_in_one_line(spec):
    with pytest.raises(ValueError, match="bpe:N") as err:
        parse_bpe_spec(spec)
    assert "\n" not in str(err.value)
    assert parse_bpe_spec("byte") is None
