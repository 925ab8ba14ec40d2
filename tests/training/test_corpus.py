"""Corpora: split by document, folder and file sources, the token cache and its fingerprint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modlm.training.corpus import prepare_corpus, split_documents
from modlm.training.tokenizers import ByteTokenizer, load_tokenizer
from modlm.training.wiki import default_corpus_path

# --------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------


def test_split_documents_is_deterministic_disjoint_and_non_empty() -> None:
    sizes = [100] * 50
    train, val = split_documents(sizes, 0.1, seed=3)
    assert (train, val) == split_documents(sizes, 0.1, seed=3)
    assert set(train).isdisjoint(val) and sorted(train + val) == list(range(50))
    assert len(val) == 5
    assert split_documents(sizes, 0.1, seed=4)[1] != val
    # Tiny fractions still hold out one document; two documents split one/one.
    assert len(split_documents([10, 10], 0.01, seed=0)[1]) == 1
    assert len(split_documents([10, 10], 0.99, seed=0)[0]) == 1


def test_split_documents_skips_a_huge_document() -> None:
    sizes = [1_000_000] + [100] * 100
    for seed in range(5):
        _, val = split_documents(sizes, 0.005, seed=seed)
        assert 0 not in val


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1])
def test_split_documents_rejects_bad_fraction(bad: float) -> None:
    with pytest.raises(ValueError, match=str(bad)):
        split_documents([1, 2, 3], bad, seed=0)


# --------------------------------------------------------------------------------------------
# User corpora and the cache
# --------------------------------------------------------------------------------------------


def _make_folder(root: Path, n_docs: int = 30) -> Path:
    """A folder of documents, each made of one unique marker repeated, in nested dirs and suffixes."""
    src = root / "src"
    for i in range(n_docs):
        sub = src / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        suffix = (".txt", ".md", ".text")[i % 3]
        (sub / f"doc{i:02d}{suffix}").write_text(f"DOC{i:02d}MARK " * (20 + i), encoding="utf-8")
    (src / "empty.txt").write_text("")
    (src / "ignored.csv").write_text("IGNOREDMARK " * 50)
    return src


def _markers(data: np.ndarray) -> set[str]:
    text = ByteTokenizer().decode(np.asarray(data))
    return {word for word in text.split() if word.startswith("DOC")}


def test_folder_corpus_splits_by_document(tmp_path: Path) -> None:
    src = _make_folder(tmp_path)
    corpus = prepare_corpus(str(src), cache_dir=tmp_path / "cache", val_fraction=0.2, seed=1)
    train, val = _markers(corpus.train), _markers(corpus.val)
    assert train.isdisjoint(val)
    assert train | val == {f"DOC{i:02d}MARK" for i in range(30)}
    assert b"IGNOREDMARK" not in bytes(corpus.train) + bytes(corpus.val)
    meta = corpus.meta
    assert meta["train_docs"] + meta["val_docs"] == 30 and meta["val_docs"] >= 1
    assert meta["train_tokens"] == len(corpus.train) and meta["val_tokens"] == len(corpus.val)
    assert 0.1 < meta["val_bytes"] / (meta["train_bytes"] + meta["val_bytes"]) < 0.35
    assert corpus.train.dtype == np.uint8 and corpus.tokens_per_byte == 1.0
    # Documents are joined by a blank line.
    assert ByteTokenizer().decode(corpus.val).count("\n\n") == meta["val_docs"] - 1


def test_cache_is_reused_then_rebuilt_when_a_file_changes(tmp_path: Path) -> None:
    src = _make_folder(tmp_path, n_docs=10)
    cache = tmp_path / "cache"
    first = prepare_corpus(str(src), cache_dir=cache)
    train_bin = first.path / "train.bin"
    stamp = train_bin.stat().st_mtime_ns
    assert json.loads((first.path / "meta.json").read_text()) == first.meta

    second = prepare_corpus(str(src), cache_dir=cache)
    assert second.meta == first.meta and second.path == first.path
    assert train_bin.stat().st_mtime_ns == stamp  # not rewritten
    assert not list(first.path.glob("*.tmp-*"))

    (src / "part0" / "doc00.txt").write_text("CHANGEDMARK " * 40, encoding="utf-8")
    third = prepare_corpus(str(src), cache_dir=cache)
    assert third.path != first.path
    assert third.meta["fingerprint_hash"] != first.meta["fingerprint_hash"]
    assert b"CHANGEDMARK" in bytes(third.train) + bytes(third.val)
    # Another split setting is another cache entry too.
    assert prepare_corpus(str(src), cache_dir=cache, seed=7).path not in {first.path, third.path}


def test_incomplete_cache_is_rebuilt(tmp_path: Path) -> None:
    src = _make_folder(tmp_path, n_docs=6)
    first = prepare_corpus(str(src), cache_dir=tmp_path / "cache")
    n_val = len(first.val)
    del first  # release the memmaps before truncating the file
    val_bin = next((tmp_path / "cache").glob("*/val.bin"))
    val_bin.write_bytes(b"x")  # as if a crash had left a short file behind
    again = prepare_corpus(str(src), cache_dir=tmp_path / "cache")
    assert len(again.val) == n_val


def test_cache_dir_defaults_to_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _make_folder(tmp_path, n_docs=4)
    monkeypatch.setenv("MODLM_CACHE", str(tmp_path / "envcache"))
    corpus = prepare_corpus(str(src))
    assert corpus.path.parent == tmp_path / "envcache"


def test_single_file_is_chunked_into_documents(tmp_path: Path) -> None:
    paragraphs = [f"PARA{i:03d} " + "lorem ipsum dolor sit amet " * 30 for i in range(200)]
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    corpus = prepare_corpus(str(path), cache_dir=tmp_path / "cache")
    assert corpus.meta["train_docs"] + corpus.meta["val_docs"] > 10
    tok = ByteTokenizer()
    train = {w for w in tok.decode(corpus.train).split() if w.startswith("PARA")}
    val = {w for w in tok.decode(corpus.val).split() if w.startswith("PARA")}
    assert train.isdisjoint(val) and len(train | val) == 200
    assert 0.02 < corpus.meta["val_bytes"] / len(path.read_bytes()) < 0.15


def test_bad_sources(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such_corpus"
    with pytest.raises(FileNotFoundError, match="such_corpus") as err:
        prepare_corpus(str(missing), cache_dir=tmp_path / "cache")
    assert str(missing) in str(err.value) and "\n" not in str(err.value)

    empty_dir = tmp_path / "nothing_here"
    (empty_dir / "sub").mkdir(parents=True)
    (empty_dir / "sub" / "empty.txt").write_text("")
    (empty_dir / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="nothing_here"):
        prepare_corpus(str(empty_dir), cache_dir=tmp_path / "cache")

    one_line = tmp_path / "one_line.txt"
    one_line.write_text("a single paragraph cannot be split")
    with pytest.raises(ValueError, match="at least 2 documents"):
        prepare_corpus(str(one_line), cache_dir=tmp_path / "cache")

    with pytest.raises(ValueError, match="1.5"):
        prepare_corpus(str(one_line), cache_dir=tmp_path / "cache", val_fraction=1.5)


def test_a_text_with_single_newlines_is_cut_at_line_ends(tmp_path: Path) -> None:
    """No blank line anywhere (one sentence per line): documents of whole lines, none cut."""
    lines = [f"LINE{i:04d} " + " ".join(["the quick brown fox jumps over the lazy dog"] * 3) for i in range(800)]
    for name, newline in (("lines.txt", "\n"), ("crlf.txt", "\r\n")):
        path = tmp_path / name
        path.write_bytes(newline.join(lines).encode())
        corpus = prepare_corpus(str(path), cache_dir=tmp_path / "cache")
        assert corpus.meta["train_docs"] + corpus.meta["val_docs"] >= 15
        tok = ByteTokenizer()
        train, val = tok.decode(corpus.train), tok.decode(corpus.val)
        assert "\r" not in train + val
        got = [line for line in (train + "\n\n" + val).split("\n") if line]
        assert sorted(got) == sorted(lines)  # every line whole, exactly once
        train_marks = {w for w in train.split() if w.startswith("LINE")}
        assert train_marks.isdisjoint(w for w in val.split() if w.startswith("LINE"))


def _refused(path: Path, tmp_path: Path, *fragments: str) -> None:
    """prepare_corpus refuses ``path`` at once with one line naming it (an alarm turns a hang into a failure)."""

    def hang(signum, frame):
        raise TimeoutError(f"prepare_corpus({path}) blocked")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(20)
    try:
        with pytest.raises(ValueError) as err:
            prepare_corpus(str(path), cache_dir=tmp_path / "cache")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # no cache left


def test_only_regular_files_are_read(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    _refused(fifo, tmp_path, "FIFO")
    _refused(Path("/dev/zero"), tmp_path, "character device")
    sock_path = tmp_path / "sock.txt"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(sock_path))
        _refused(sock_path, tmp_path, "socket")
    # In a folder, what is not a regular file is not part of the corpus.
    src = _make_folder(tmp_path, n_docs=4)
    os.mkfifo(src / "part0" / "fifo.txt")
    (src / "part1" / "zero.txt").symlink_to("/dev/zero")
    assert prepare_corpus(str(src), cache_dir=tmp_path / "cache2").meta["train_docs"] >= 3


def test_binary_files_are_refused_by_name(tmp_path: Path) -> None:
    ls_copy = tmp_path / "ls"
    shutil.copy("/bin/ls", ls_copy)
    _refused(ls_copy, tmp_path, "binary", "NUL")
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"plain text\nthen a NUL\x00 byte\n" * 100)
    _refused(nul, tmp_path, "binary", "NUL")
    noise = tmp_path / "noise.txt"
    noise.write_bytes(bytes(range(1, 256)) * 40)  # no NUL, mostly not UTF-8
    _refused(noise, tmp_path, "binary", "not UTF-8 text")
    # One binary file in a folder is refused by its name.
    src = _make_folder(tmp_path, n_docs=4)
    shutil.copy("/bin/ls", src / "part2" / "ls.txt")
    _refused(src, tmp_path, str(src / "part2" / "ls.txt"))
    # A few bad bytes in a real text are kept (as U+FFFD), not a reason to refuse it.
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("\n".join(f"{i} café déjà vu, a naïve line of text" for i in range(400)).encode("latin-1"))
    assert prepare_corpus(str(latin1), cache_dir=tmp_path / "cache3").meta["train_docs"] > 1


# A builder that is killed while it writes the cache: its tokenizer is slow after the first document.
_SLOW_BUILD = """
import sys, time
from modlm.training.corpus import prepare_corpus
from modlm.training.tokenizers import ByteTokenizer

class Slow(ByteTokenizer):  # name "byte": the same cache folder as the byte tokenizer's
    calls = 0

    def encode(self, text):
        Slow.calls += 1
        if Slow.calls == 2:
            print("writing", flush=True)
            time.sleep(600)
        return super().encode(text)

prepare_corpus(sys.argv[1], cache_dir=sys.argv[2], tokenizer=Slow())
"""


def test_a_builder_killed_mid_write_leaves_no_temporary_file_after_the_next_run(tmp_path: Path) -> None:
    src, cache = _make_folder(tmp_path, n_docs=6), tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_BUILD, str(src), str(cache)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert list(cache.glob("*/train.bin.tmp-*"))  # what SIGKILL leaves behind
    corpus = prepare_corpus(str(src), cache_dir=cache)
    assert not list(corpus.path.glob("*.tmp-*"))
    assert corpus.meta["train_docs"] + corpus.meta["val_docs"] == 6


# --------------------------------------------------------------------------------------------
# Other tokenizers
# --------------------------------------------------------------------------------------------


def test_hf_tokenizer_gets_its_own_cache(tmp_path: Path, bpe_tokenizer_file: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):  # prose like the tokenizer's training text, so its merges apply
        (src / f"doc{i:02d}.txt").write_text(f"DOC{i:02d} The history of the city café. " * (10 + i))
    cache = tmp_path / "cache"
    tok = load_tokenizer(str(bpe_tokenizer_file))
    by_bytes = prepare_corpus(str(src), cache_dir=cache, seed=2)
    by_bpe = prepare_corpus(str(src), cache_dir=cache, seed=2, tokenizer=tok)
    assert by_bpe.path != by_bytes.path
    assert by_bpe.meta["fingerprint_hash"] != by_bytes.meta["fingerprint_hash"]
    assert by_bpe.meta["tokenizer"] == tok.name and by_bpe.meta["vocab_size"] == 400
    assert by_bpe.train.dtype == np.uint16 and by_bpe.tokenizer is tok
    # Same documents on each side of the split; fewer tokens than bytes.
    assert tok.decode(by_bpe.val) == ByteTokenizer().decode(by_bytes.val)
    assert tok.decode(by_bpe.train) == ByteTokenizer().decode(by_bytes.train)
    assert by_bpe.meta["val_bytes"] == by_bytes.meta["val_bytes"]
    assert 0 < by_bpe.tokens_per_byte < 0.75
    # The same tokenizer.json loaded again (e.g. from a checkpoint) reuses the cache.
    stamp = (by_bpe.path / "train.bin").stat().st_mtime_ns
    again = prepare_corpus(str(src), cache_dir=cache, seed=2, tokenizer=load_tokenizer(str(bpe_tokenizer_file)))
    assert again.path == by_bpe.path and (again.path / "train.bin").stat().st_mtime_ns == stamp


class _WideTokenizer(ByteTokenizer):
    """Byte ids moved up by ``shift`` in a vocabulary of ``vocab_size``: checks dtype and range."""

    name = "wide"

    def __init__(self, vocab_size: int, shift: int):
        self.vocab_size = vocab_size
        self.shift = shift

    def encode(self, text: str) -> list[int]:
        return [i + self.shift for i in super().encode(text)]


def test_token_dtype_follows_the_vocabulary(tmp_path: Path) -> None:
    src = _make_folder(tmp_path, n_docs=4)
    wide = prepare_corpus(str(src), cache_dir=tmp_path / "cache", tokenizer=_WideTokenizer(70_000, shift=66_000))
    assert wide.train.dtype == np.uint32 and int(np.asarray(wide.train).min()) >= 66_000
    # An id the vocabulary does not hold is an error, not a silently wrapped value.
    with pytest.raises(ValueError, match=r"produced id 66\d+, outside its vocabulary \[0, 300\)"):
        prepare_corpus(str(src), cache_dir=tmp_path / "cache", tokenizer=_WideTokenizer(300, shift=66_000))


# --------------------------------------------------------------------------------------------
# Default corpus
# --------------------------------------------------------------------------------------------


def _enwiki_available() -> bool:
    try:
        default_corpus_path()
    except FileNotFoundError:
        return False
    return True


@pytest.mark.skipif(
    not _enwiki_available(),
    reason="gensim's enwiki sample not installed (pip install --no-deps gensim==4.4.0)",
)
def test_default_enwiki_corpus(tmp_path: Path) -> None:
    corpus = prepare_corpus(None, cache_dir=tmp_path)
    meta = corpus.meta
    assert meta["source"] == "enwiki" and meta["train_docs"] > 50 and meta["val_docs"] >= 1
    assert len(corpus.train) > 1_000_000 and len(corpus.val) > 20_000
    for split in (corpus.train, corpus.val):
        text = corpus.tokenizer.decode(split)
        for markup in ("{{", "}}", "[[", "]]", "<ref", "'''", "&nbsp;", "thumb|"):
            assert markup not in text, markup
        letters = sum(c.isascii() and c.isalpha() for c in text)
        assert letters / len(text) > 0.7
        assert sum(not c.isascii() for c in text) / len(text) < 0.01
    assert corpus.tokenizer.decode(corpus.train[:9]) == "Anarchism"
    # Same name → same cache.
    assert prepare_corpus("enwiki", cache_dir=tmp_path).path == corpus.path
