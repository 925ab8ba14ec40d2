"""Corpora: documents from a source, a train/val split by document, token ids cached on disk.

The pipeline is ``source -> documents -> split by document -> token ids on disk``:
``prepare_corpus()`` turns a source (the bundled enwiki sample, a text file or a folder) into
documents, shuffles them deterministically, holds out whole documents for validation, tokenizes
once and caches ``train.bin`` / ``val.bin`` (flat token streams) plus ``meta.json``. The cache
folder is named after a fingerprint of everything that decides the ids (source files, split
settings, the tokenizer's identity), so a changed input is never served a stale cache.

What is read: regular files only (a FIFO, a device such as /dev/zero or a socket is refused by
name before it is opened, and checked again on the open descriptor, so nothing blocks or reads
forever), decoded as UTF-8 (``\r\n`` read as ``\n``); a file with NUL bytes, or where more than
``MAX_NON_TEXT`` of the characters are undecodable bytes or control codes, is refused as binary.

Building the cache holds ``<cache folder>/.lock``, so two processes never build one cache at
once (the second waits, then reads the first one's), and any ``*.tmp-*`` file found there under
the lock was left by a builder that was killed: it is deleted.

Shape suffixes: D = number of documents, N = number of tokens in a split.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modlm.training.tokenizers import ByteTokenizer, Tokenizer
from modlm.training.wiki import MIN_DOC_CHARS, default_corpus_path, iter_enwiki_documents

__all__ = ["PreparedCorpus", "prepare_corpus", "split_documents"]

# Bump when the cleanup, chunking or on-disk layout changes so that old caches are not reused.
# 2: a lone file's long paragraphs are cut at line ends; \r\n is read as \n.
_FORMAT_VERSION = 2

# Documents are joined with a blank line, the same separator that splits paragraphs inside them.
DOC_SEPARATOR = "\n\n"
# A single big text file is cut into documents of roughly this many characters (see _chunk_text).
CHUNK_CHARS = 20_000
TEXT_SUFFIXES = (".txt", ".md", ".text")
# A file where more than this share of the characters are undecodable bytes or control codes
# (other than tab, newline, carriage return, form feed) is not text. Random bytes score ~57%; a
# Latin-1 text read as UTF-8 loses only its accented letters (a few %) and is kept.
MAX_NON_TEXT = 0.30
_CONTROL = {c: None for c in (*range(0, 9), 11, *range(14, 32), 127, 0xFFFD)}


# --------------------------------------------------------------------------------------------
# User corpora: a text file or a folder of them
# --------------------------------------------------------------------------------------------


def _list_text_files(folder: Path) -> list[Path]:
    """Non-empty *.txt / *.md / *.text files under ``folder``, recursively, in a stable order.

    Hidden files and folders (``.git``, ``.venv``...) are skipped: their READMEs and licences
    are not part of anyone's corpus.
    """
    files = [
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in TEXT_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
        and p.stat().st_size > 0
    ]
    return sorted(files)


def _file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _require_regular_file(path: Path) -> None:
    """A one-line ValueError naming ``path`` unless it is (a link to) a regular file."""
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise ValueError(f"corpus file {path} is {_file_kind(mode)}: only regular text files are read")


def _read_text(path: Path) -> str:
    """The UTF-8 text of the regular file ``path``, stripped; ValueError naming it if it is not
    a regular file or not text (NUL bytes, or mostly undecodable bytes and control codes)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; the descriptor is then checked.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise ValueError(f"corpus file {path} cannot be read ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"corpus file {path} is {_file_kind(mode)}: only regular text files are read")
        data = f.read()
    if b"\0" in data:
        raise ValueError(f"corpus file {path} is binary, not text (it contains NUL bytes)")
    # errors="replace": one bad byte in a scraped file should not stop a training run; many do.
    text = data.decode("utf-8", errors="replace")
    non_text = len(text) - len(text.translate(_CONTROL))
    if non_text > MAX_NON_TEXT * len(text):
        raise ValueError(
            f"corpus file {path} is binary, not UTF-8 text ({non_text / len(text):.0%} of it is undecodable "
            "bytes or control codes; a text in another encoding: convert it to UTF-8)"
        )
    return text.replace("\r\n", "\n").strip()


def _cut_at_line_ends(text: str, target_chars: int) -> list[str]:
    """Split ``text`` after whole lines into pieces of at least ``target_chars`` (the last may be shorter)."""
    pieces: list[str] = []
    lines: list[str] = []
    size = 0
    for line in text.split("\n"):
        lines.append(line)
        size += len(line) + 1
        if size >= target_chars:
            pieces.append("\n".join(lines))
            lines, size = [], 0
    if lines:
        pieces.append("\n".join(lines))
    return pieces


def _chunk_text(text: str, target_chars: int) -> list[str]:
    """Split ``text`` into chunks of at least ``target_chars`` (the last may be shorter).

    Whole paragraphs (separated by blank lines) are gathered until a chunk reaches the target; a
    paragraph longer than the target (all of a text that separates its lines by single newlines)
    is first cut at line ends (``_cut_at_line_ends``). A line is never cut.
    """
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for para in re.split(r"\n[ \t]*\n", text):
        para = para.strip()
        if not para:
            continue
        for piece in _cut_at_line_ends(para, target_chars) if len(para) > target_chars else [para]:
            current.append(piece)
            size += len(piece) + 2
            if size >= target_chars:
                chunks.append("\n\n".join(current))
                current, size = [], 0
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def _single_file_documents(text: str) -> list[str]:
    """Cut one file into pseudo-documents so a by-document train/val split is possible.

    The rule: chunks of about CHUNK_CHARS characters, but never so few that the validation split
    must take a large share (a file under 20 * CHUNK_CHARS is cut into about 20), made of whole
    paragraphs, or of whole lines where a paragraph is longer than that (``_chunk_text``).
    """
    target = max(1, min(CHUNK_CHARS, len(text) // 20))
    return _chunk_text(text, target)


# --------------------------------------------------------------------------------------------
# Split, tokenize, cache
# --------------------------------------------------------------------------------------------


def split_documents(sizes: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministically assign whole documents to train or validation.

    Args:
        sizes: length of each document (bytes), shape (D,).
        val_fraction: target share of the total size for validation, in (0, 1).
        seed: shuffle seed.
    Returns:
        (train_ids, val_ids): document indices, each sorted, disjoint, both non-empty.

    Documents are visited in a seeded random order and added to validation until it holds
    ``val_fraction`` of the bytes; a document that would overshoot the target by more than 2x is
    skipped so one huge document cannot swallow the validation set.
    """
    n = len(sizes)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if n < 2:
        raise ValueError(f"need at least 2 documents to split train/val by document, got {n}")
    target = val_fraction * float(sum(sizes))
    order = np.random.default_rng(seed).permutation(n)
    val: list[int] = []
    val_size = 0.0
    for i in order.tolist():
        if val_size >= target or len(val) == n - 1:
            break
        if val and val_size + sizes[i] > 2 * target:
            continue
        if not val and sizes[i] > 2 * target:
            continue
        val.append(i)
        val_size += sizes[i]
    if not val:
        # Every document is larger than twice the target: take the smallest (first in shuffle order on ties).
        rank = {i: r for r, i in enumerate(order.tolist())}
        val = [min(range(n), key=lambda i: (sizes[i], rank[i]))]
    val_set = set(val)
    return [i for i in range(n) if i not in val_set], sorted(val)


def _token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id: the cache is read at memory speed."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocab_size {vocab_size} does not fit the uint32 token cache")


def _default_cache_root() -> Path:
    env = os.environ.get("MODLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "modlm"


def _fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    blob = json.dumps(fingerprint, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _atomic_write_bytes(path: Path, chunks: Iterator[bytes]) -> None:
    """Write ``chunks`` to ``path`` via a temporary file and ``os.replace``: readers see all or nothing."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _encode_stream(docs: list[str], tokenizer: Tokenizer, dtype: np.dtype, counts: dict[str, int]) -> Iterator[bytes]:
    """Token bytes of ``docs`` joined by DOC_SEPARATOR, one document at a time (bounded memory).

    Fills ``counts["tokens"]`` and ``counts["bytes"]`` (UTF-8 bytes of the text) as it goes.
    """
    for i, doc in enumerate(docs):
        text = doc if i == 0 else DOC_SEPARATOR + doc
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
        # vocab_size bounds the ids a model can embed, and (via _token_dtype) what the dtype holds.
        if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise ValueError(
                f"tokenizer {tokenizer.name!r} produced id {bad}, outside its vocabulary [0, {tokenizer.vocab_size})"
            )
        counts["tokens"] += int(ids.size)
        counts["bytes"] += len(text.encode("utf-8"))
        yield ids.astype(dtype).tobytes()


@dataclass(frozen=True)
class PreparedCorpus:
    """A tokenized, split, cached corpus.

    Attributes:
        train: training token stream, shape (N_train,), uint8/uint16 memmap.
        val: validation token stream, shape (N_val,), uint8/uint16 memmap.
        meta: contents of ``meta.json`` (source, fingerprint, token/byte/document counts...).
        tokenizer: the tokenizer that produced the ids (decode with it).
        path: the cache folder holding ``train.bin``, ``val.bin`` and ``meta.json``.
    """

    train: np.memmap
    val: np.memmap
    meta: dict[str, Any]
    tokenizer: Tokenizer
    path: Path

    @property
    def tokens_per_byte(self) -> float:
        """Validation tokens per UTF-8 byte, the factor ``bits_per_byte`` needs (1.0 for bytes)."""
        return self.meta["val_tokens"] / max(1, self.meta["val_bytes"])


def _source_fingerprint(source: str | None) -> tuple[dict[str, Any], str, Path | None]:
    """Cheap identity of the inputs (no file is read): (fingerprint, human label, path or None=enwiki)."""
    if source is None or source == "enwiki":
        path = default_corpus_path()
        return {"kind": "enwiki", "file": path.name, "size": path.stat().st_size}, "enwiki", None
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus source not found: {path}")
    path = path.resolve()
    if path.is_dir():
        files = _list_text_files(path)
        if not files:
            raise ValueError(f"no non-empty {'/'.join('*' + s for s in TEXT_SUFFIXES)} files in {path}")
    else:
        _require_regular_file(path)  # before anything opens it: a FIFO would block, /dev/zero never end
        files = [path]
    base = path if path.is_dir() else path.parent
    entries = [[str(f.relative_to(base)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem or path.name)[:40] or "corpus"
    return {"kind": "files", "root": str(path), "files": entries}, label, path


def _load_documents(source_path: Path | None, display: str) -> list[str]:
    """Read the documents of a source (the enwiki sample when ``source_path`` is None)."""
    if source_path is None:
        return list(iter_enwiki_documents(default_corpus_path()))
    if source_path.is_dir():
        docs = [t for t in (_read_text(p) for p in _list_text_files(source_path)) if t]
    else:
        docs = [t] if (t := _read_text(source_path)) else []
    if not docs:
        raise ValueError(f"corpus source has no text: {display}")
    if len(docs) > 1:
        return docs
    # One document cannot be split by document; cut it into chunks instead.
    chunks = _single_file_documents(docs[0])
    if len(chunks) < 2:
        raise ValueError(
            f"corpus source {display} is a single line of {len(docs[0]):,} characters: a lone file is cut into "
            "documents at line ends, and need at least 2 documents to split train/val by document "
            "(give more lines, or a folder of files)"
        )
    return chunks


def _load_cached(folder: Path, fp_hash: str, tokenizer: Tokenizer) -> PreparedCorpus | None:
    """The cached corpus in ``folder`` if it is complete and matches ``fp_hash``, else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        if meta.get("fingerprint_hash") != fp_hash:
            return None
        for split in ("train", "val"):
            if (folder / f"{split}.bin").stat().st_size != meta[f"{split}_tokens"] * dtype.itemsize:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    train = np.memmap(folder / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(folder / "val.bin", dtype=dtype, mode="r")
    return PreparedCorpus(train=train, val=val, meta=meta, tokenizer=tokenizer, path=folder)


def prepare_corpus(
    source: str | None = None,
    cache_dir: str | Path | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
) -> PreparedCorpus:
    """Load, split by document, tokenize and cache a corpus; reuse the cache when inputs are unchanged.

    Args:
        source: None or "enwiki" for the Wikipedia sample bundled with gensim 4.4.0; otherwise a text
            file or a folder searched recursively for *.txt, *.md and *.text files (one document per
            file; a lone file is cut into ~20k-character documents of whole paragraphs, or of whole
            lines where a paragraph is longer: ``_single_file_documents``). Regular UTF-8 text
            files only (see the module docstring).
        cache_dir: cache root; default ``$MODLM_CACHE`` or ``~/.cache/modlm``. The corpus lives in a
            subfolder named after a hash of the inputs' fingerprint (paths, sizes, mtimes, settings,
            the tokenizer's ``name``).
        val_fraction: share of the bytes (whole documents) held out for validation, in (0, 1).
        seed: seed of the document shuffle that decides the split.
        tokenizer: turns documents into ids; None is the byte tokenizer. The cache dtype is the
            narrowest that holds its vocabulary (uint8 for bytes, uint16 up to 65536 ids, else uint32).
    Returns:
        PreparedCorpus with ``train`` (N_train,) and ``val`` (N_val,) read-only token memmaps.
    Raises:
        FileNotFoundError: the source path (or, for the default, gensim's file) does not exist.
        ValueError: no usable text, a binary file, a file that is not a regular one (FIFO,
            device, socket), fewer than 2 documents, or a bad ``val_fraction`` (one line each,
            naming the file).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    source_fp, label, source_path = _source_fingerprint(source)
    fingerprint = {
        "format_version": _FORMAT_VERSION,
        "source": source_fp,
        # The name is the tokenizer's identity (for a tokenizer.json, a hash of the file), so two
        # tokenizers never share a cache; the byte tokenizer's is "byte".
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "val_fraction": val_fraction,
        "seed": seed,
        "min_doc_chars": MIN_DOC_CHARS if source_path is None else 0,
    }
    fp_hash = _fingerprint_hash(fingerprint)
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_root()
    folder = root / f"{label}-{fp_hash}"
    cached = _load_cached(folder, fp_hash, tokenizer)
    if cached is not None:
        return cached
    display = "enwiki" if source_path is None else str(source_path)
    docs = _load_documents(source_path, display)  # a source that cannot be read leaves no cache folder
    folder.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder / ".lock"):
        # Another process may have built it while this one waited.
        if _load_cached(folder, fp_hash, tokenizer) is None:
            # Under the lock every temporary file is a killed builder's: none can be in use.
            for stale in folder.glob("*.tmp-*"):
                stale.unlink(missing_ok=True)
            _write_cache(folder, display, docs, fingerprint, fp_hash, tokenizer)
    loaded = _load_cached(folder, fp_hash, tokenizer)
    assert loaded is not None, f"cache just written to {folder} does not load"
    return loaded


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_path`` (waiting for another holder), released on exit
    (and by the kernel if the process dies). A filesystem without locks runs unlocked."""
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        yield


def _write_cache(
    folder: Path, display: str, docs: list[str], fingerprint: dict[str, Any], fp_hash: str, tokenizer: Tokenizer
) -> None:
    """Split and tokenize ``docs`` into ``folder`` (train.bin, val.bin, then meta.json)."""
    sizes = [len(d.encode("utf-8")) for d in docs]
    val_fraction, seed = fingerprint["val_fraction"], fingerprint["seed"]
    train_ids, val_ids = split_documents(sizes, val_fraction, seed)
    dtype = _token_dtype(tokenizer.vocab_size)
    counts: dict[str, dict[str, int]] = {}
    for split, ids in (("train", train_ids), ("val", val_ids)):
        counts[split] = {"tokens": 0, "bytes": 0}
        stream = _encode_stream([docs[i] for i in ids], tokenizer, dtype, counts[split])
        _atomic_write_bytes(folder / f"{split}.bin", stream)
    meta = {
        "source": display,
        "fingerprint": fingerprint,
        "fingerprint_hash": fp_hash,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "separator": DOC_SEPARATOR,
        "val_fraction": val_fraction,
        "seed": seed,
        "train_tokens": counts["train"]["tokens"],
        "val_tokens": counts["val"]["tokens"],
        "train_bytes": counts["train"]["bytes"],
        "val_bytes": counts["val"]["bytes"],
        "train_docs": len(train_ids),
        "val_docs": len(val_ids),
    }
    # meta.json goes last: its presence (with matching sizes) is what marks the cache as complete.
    _atomic_write_bytes(folder / "meta.json", iter([json.dumps(meta, indent=2).encode()]))
