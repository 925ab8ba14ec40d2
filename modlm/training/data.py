"""Training data: the default Wikipedia corpus, a byte tokenizer, a cached train/val split, batching.

The pipeline is ``source -> documents -> split by document -> token ids on disk -> random windows``:

* ``prepare_corpus()`` turns a source (the embedded enwiki sample, a text file or a folder) into
  documents, shuffles them deterministically, holds out whole documents for validation, tokenizes
  once and caches ``train.bin`` / ``val.bin`` (flat token streams) plus ``meta.json``.
* ``get_batch()`` draws random ``(x, y)`` training windows from a token stream with a caller-owned
  ``torch.Generator`` so a run can be resumed bit-for-bit; ``iter_eval_batches()`` walks fixed,
  non-overlapping windows for evaluation.

Shape suffixes: B = batch size, T = sequence length, N = number of tokens in a split.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import importlib.util
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

__all__ = [
    "ByteTokenizer",
    "PreparedCorpus",
    "Tokenizer",
    "bits_per_byte",
    "clean_wikitext",
    "default_corpus_path",
    "get_batch",
    "iter_enwiki_documents",
    "iter_eval_batches",
    "prepare_corpus",
    "split_documents",
]

# Bump when the cleanup, chunking or on-disk layout changes so that old caches are not reused.
_FORMAT_VERSION = 1

ENWIKI_FILENAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_INSTALL_HINT = "run `pip install --no-deps gensim==4.4.0` (or `make install`)"

# Articles shorter than this after cleanup are stubs, disambiguation lists or leftovers of markup.
MIN_DOC_CHARS = 500
# Documents are joined with a blank line, the same separator that splits paragraphs inside them.
DOC_SEPARATOR = "\n\n"
# A single big text file is cut into documents of roughly this many characters (see _chunk_text).
CHUNK_CHARS = 20_000
TEXT_SUFFIXES = (".txt", ".md", ".text")


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Default corpus: the Wikipedia sample shipped inside the gensim wheel
# --------------------------------------------------------------------------------------------


def default_corpus_path() -> Path:
    """Path of gensim's bundled enwiki XML sample, found without importing gensim.

    gensim's own dependencies (scipy, smart_open...) are deliberately not installed, so importing
    it would fail; ``find_spec`` only locates the package folder.
    """
    spec = importlib.util.find_spec("gensim")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / "test" / "test_data" / ENWIKI_FILENAME
        if path.is_file():
            return path
    where = f" (gensim found at {', '.join(locations)} but without the file)" if locations else ""
    raise FileNotFoundError(f"default corpus {ENWIKI_FILENAME} not found{where}: {_INSTALL_HINT}")


# Innermost constructs only (no nested opener inside), so repeating the substitution until nothing
# changes peels nested templates/tables/links from the inside out.
_TEMPLATE_RE = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*?\}\}", re.S)
_TABLE_RE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*?\|\}", re.S)
# Single brackets are allowed inside a link ("Bicyclo[1.1.0]butane" in a caption), double ones are
# not; captions of [[File:...]] may span lines.
_LINK_RE = re.compile(r"\[\[((?:(?!\[\[|\]\]).)*)\]\]", re.S)
_COMMENT_RE = re.compile(r"<!--.*?(?:-->|$)", re.S)
_REF_SELF_CLOSING_RE = re.compile(r"<ref\b[^>]*/\s*>", re.I)
_REF_RE = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.I | re.S)
# Tags whose *content* is not prose either (formulas, galleries, code, charts).
_DROP_CONTENT_TAGS = (
    "math|chem|ce|gallery|timeline|imagemap|syntaxhighlight|source|score|hiero|graph|mapframe"
)
_DROP_TAG_RE = re.compile(rf"<({_DROP_CONTENT_TAGS})\b[^>]*>.*?</\1\s*>", re.I | re.S)
_HTML_TAG_RE = re.compile(r"</?[A-Za-z][^<>]*>")
_EXTERNAL_LINK_RE = re.compile(r"\[(?:(?:https?|ftp)://|//|mailto:)[^\s\]]*(?:\s+([^\]]*))?\]", re.I)
_HEADING_RE = re.compile(r"^(={1,6})[ \t]*(.*?)[ \t]*\1[ \t]*$", re.M)
_NON_PROSE_NAMESPACES = {"file", "image", "category", "media"}
_LANGUAGE_LINK_RE = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*:")
# Sections that are lists of citations or links, not prose.
_DROP_SECTIONS = {
    "see also", "references", "notes", "external links", "further reading", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "references and notes",
    "works cited", "external links and references", "other", "gallery",
}  # fmt: skip


def _sub_until_stable(pattern: re.Pattern[str], repl: Any, text: str) -> str:
    """Apply ``pattern.sub`` until the text stops changing (one pass per nesting level)."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _link_text(match: re.Match[str]) -> str:
    """``[[target|label]]`` -> label, ``[[target]]`` -> target; media/category/language links -> ''."""
    target, _, label = match.group(1).partition("|")
    target = target.strip()
    prefix = target.split(":", 1)[0].strip().lower() if ":" in target else ""
    if prefix in _NON_PROSE_NAMESPACES:
        return ""
    if not label and _LANGUAGE_LINK_RE.match(target):  # [[de:Anarchismus]] interlanguage link
        return ""
    if label.strip():
        return label
    # [[:Category:X]] shows "Category:X"; [[#Section]] shows "Section"; the pipe trick [[a (b)|]] shows "a".
    target = re.sub(r"^(?:wikt|wiktionary):", "", target.lstrip(":").lstrip("#"), flags=re.I)
    return re.sub(r"\s*\([^)]*\)$", "", target) if "|" in match.group(1) else target


def _drop_sections(text: str, titles: set[str]) -> str:
    """Remove each section whose heading is in ``titles`` (lowercase), with its subsections."""
    out: list[str] = []
    skip_level = 0  # level of the section being dropped; 0 = keeping
    pos = 0
    for m in _HEADING_RE.finditer(text):
        if not skip_level:
            out.append(text[pos : m.start()])
        level = len(m.group(1))
        if skip_level and level > skip_level:
            pos = m.end()
            continue
        skip_level = level if m.group(2).strip().lower() in titles else 0
        if not skip_level:
            out.append(m.group(0))
        pos = m.end()
    if not skip_level:
        out.append(text[pos:])
    return "".join(out)


def clean_wikitext(text: str) -> str:
    """MediaWiki markup -> readable plain text (headings become their own lines, links their labels).

    Regex-based, so it is an approximation tuned on the gensim sample, not a full wikitext parser:
    templates, references, tables, media and category links are dropped rather than rendered.
    """
    text = _COMMENT_RE.sub("", text)
    text = _REF_SELF_CLOSING_RE.sub("", text)
    text = _REF_RE.sub("", text)
    text = _DROP_TAG_RE.sub("", text)
    text = _sub_until_stable(_TEMPLATE_RE, "", text)
    text = _sub_until_stable(_TABLE_RE, "", text)
    # Leftovers of unbalanced braces (truncated articles, stray "}}" in a template argument).
    text = re.sub(r"\{\{[^\n]*|^[ \t]*(?:\}\}|\|\})[ \t]*$", "", text, flags=re.M)
    text = _HTML_TAG_RE.sub("", text)
    # External links first: in "[[File:x|a [http://y caption]]]" the link pattern would otherwise
    # end at the external link's "]" + the first "]" of the closing pair.
    text = _EXTERNAL_LINK_RE.sub(lambda m: m.group(1) or "", text)
    text = _sub_until_stable(_LINK_RE, _link_text, text)
    text = re.sub(r"\[\[|\]\]", "", text)  # unbalanced link brackets
    text = re.sub(r"'{2,}", "", text)  # ''italic'', '''bold''', '''''both'''''
    text = re.sub(r"__[A-Z]+__", "", text)  # __NOTOC__ and other behaviour switches
    text = _drop_sections(text, _DROP_SECTIONS)
    text = _HEADING_RE.sub(lambda m: m.group(2), text)
    text = re.sub(r"^-{4,}\s*$", "", text, flags=re.M)  # horizontal rules
    text = re.sub(r"^[*#:;]+[ \t]*", "", text, flags=re.M)  # list and indent markers
    text = re.sub(r"^\|.*$", "", text, flags=re.M)  # stray table rows
    # Entities last, so an escaped "&lt;tag&gt;" in the article text survives as literal text.
    text = html.unescape(text).replace("\xa0", " ").replace("\u200e", "").replace("\u200b", "")
    # Removed templates/refs leave "( )", "(; )", double spaces and spaces before punctuation.
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r"[ \t]+([,.;:])", r"\1", text)
    text = re.sub(r"\([ \t]*[,;:]*[ \t]*", "(", text)  # "( , Phoibos" -> "(Phoibos"
    text = re.sub(r"[,;: \t]+\)", ")", text)  # "(Akhilleus, )" -> "(Akhilleus)"
    text = re.sub(r" ?\(\)", "", text)
    text = re.sub(r"([,;:])(?:[ \t]*[,;])+", r"\1", text)  # ",," or ":," left by removed items
    text = "\n".join(line.strip() for line in text.split("\n"))
    # A line that is only punctuation is what is left of a removed list item or infobox.
    text = re.sub(r"^[\W_]+$", "", text, flags=re.M)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _local(tag: str) -> str:
    """'{http://www.mediawiki.org/xml/export-0.10/}page' -> 'page' (the namespace URI varies by dump)."""
    return tag.rsplit("}", 1)[-1]


def iter_enwiki_documents(path: str | Path, min_chars: int = MIN_DOC_CHARS) -> Iterator[str]:
    """Stream a MediaWiki XML dump (``.bz2``) and yield ``"Title\\n\\nclean text"`` per article.

    Only non-redirect pages in namespace 0 (articles) whose cleaned body has at least
    ``min_chars`` characters are yielded.
    """
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if _local(elem.tag) != "page":
                continue
            fields = {_local(child.tag): child for child in elem}
            title = (fields["title"].text or "").strip() if "title" in fields else ""
            ns = (fields["ns"].text or "").strip() if "ns" in fields else ""
            revision = fields.get("revision")
            raw = ""
            if revision is not None:
                text_el = next((c for c in revision if _local(c.tag) == "text"), None)
                raw = (text_el.text or "") if text_el is not None else ""
            # Free the page subtree now: a real dump is far larger than memory.
            elem.clear()
            if ns != "0" or "redirect" in fields or raw.lstrip()[:9].upper() == "#REDIRECT":
                continue
            body = clean_wikitext(raw)
            if len(body) >= min_chars:
                yield f"{title}\n\n{body}"


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


def _read_text(path: Path) -> str:
    # errors="replace": one bad byte in a scraped file should not stop a training run.
    return path.read_text(encoding="utf-8", errors="replace").strip()


def _chunk_text(text: str, target_chars: int) -> list[str]:
    """Split ``text`` on blank lines into chunks of at least ``target_chars`` (the last may be shorter)."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for para in re.split(r"\n[ \t]*\n", text):
        para = para.strip()
        if not para:
            continue
        current.append(para)
        size += len(para) + 2
        if size >= target_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def _single_file_documents(text: str) -> list[str]:
    """Cut one file into pseudo-documents so a by-document train/val split is possible.

    Chunks are ~CHUNK_CHARS, but never so few that the validation split must take a large share:
    a file under 20 * CHUNK_CHARS is cut into about 20 chunks.
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
    if vocab_size <= 2**8:
        return np.dtype(np.uint8)
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    raise ValueError(f"vocab_size {vocab_size} does not fit the uint16 token cache")


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


def _encode_stream(
    docs: list[str], tokenizer: Tokenizer, dtype: np.dtype, counts: dict[str, int]
) -> Iterator[bytes]:
    """Token bytes of ``docs`` joined by DOC_SEPARATOR, one document at a time (bounded memory).

    Fills ``counts["tokens"]`` and ``counts["bytes"]`` (UTF-8 bytes of the text) as it goes.
    """
    limit = np.iinfo(dtype).max
    for i, doc in enumerate(docs):
        text = doc if i == 0 else DOC_SEPARATOR + doc
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() > limit):
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise ValueError(f"tokenizer {tokenizer.name!r} produced id {bad}, outside {dtype.name}")
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
    # One document cannot be split by document; cut it into chunks instead.
    return _single_file_documents(docs[0]) if len(docs) == 1 else docs


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
) -> PreparedCorpus:
    """Load, split by document, tokenize and cache a corpus; reuse the cache when inputs are unchanged.

    Args:
        source: None or "enwiki" for the Wikipedia sample bundled with gensim 4.4.0; otherwise a text
            file or a folder searched recursively for *.txt, *.md and *.text files (one document per
            file; a lone file is cut into ~20k-character documents on blank lines).
        cache_dir: cache root; default ``$MODLM_CACHE`` or ``~/.cache/modlm``. The corpus lives in a
            subfolder named after a hash of the inputs' fingerprint (paths, sizes, mtimes, settings).
        val_fraction: share of the bytes (whole documents) held out for validation, in (0, 1).
        seed: seed of the document shuffle that decides the split.
    Returns:
        PreparedCorpus with ``train`` (N_train,) and ``val`` (N_val,) read-only token memmaps.
    Raises:
        FileNotFoundError: the source path (or, for the default, gensim's file) does not exist.
        ValueError: no usable text, fewer than 2 documents, or a bad ``val_fraction``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    tokenizer = ByteTokenizer()
    source_fp, label, source_path = _source_fingerprint(source)
    fingerprint = {
        "format_version": _FORMAT_VERSION,
        "source": source_fp,
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
    docs = _load_documents(source_path, display)
    sizes = [len(d.encode("utf-8")) for d in docs]
    train_ids, val_ids = split_documents(sizes, val_fraction, seed)

    folder.mkdir(parents=True, exist_ok=True)
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
    loaded = _load_cached(folder, fp_hash, tokenizer)
    assert loaded is not None, f"cache just written to {folder} does not load"
    return loaded


# --------------------------------------------------------------------------------------------
# Batching and metrics
# --------------------------------------------------------------------------------------------


def _check_length(data: np.ndarray, seq_len: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if len(data) < seq_len + 1:
        raise ValueError(f"data has {len(data)} tokens, fewer than seq_len + 1 = {seq_len + 1}")


def _to_device(windows: np.ndarray, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) token windows -> int64 (x_BT, y_BT) on ``device``, y shifted left by one."""
    w = torch.from_numpy(windows.astype(np.int64))
    if torch.device(device).type == "cuda":
        # Pinned memory lets the host->device copy overlap with compute.
        w = w.pin_memory().to(device, non_blocking=True)
    else:
        w = w.to(device)
    return w[:, :-1], w[:, 1:]


def get_batch(
    data: np.ndarray,
    batch_size: int,
    seq_len: int,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random training windows.

    Args:
        data: token stream, shape (N,), any integer dtype (a memmap is read lazily).
        batch_size: B.
        seq_len: T.
        generator: CPU generator the window offsets are drawn from; saving and restoring its state
            makes the batch sequence resumable.
        device: where the returned tensors live.
    Returns:
        (x_BT, y_BT) int64 tensors with y[:, t] == x[:, t + 1] within the same window.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_length(data, seq_len)
    # Offsets in [0, N - T - 1] so that every window of T + 1 tokens fits.
    starts_B = torch.randint(0, len(data) - seq_len, (batch_size,), generator=generator).numpy()
    idx_BT1 = starts_B[:, None] + np.arange(seq_len + 1)[None, :]
    return _to_device(np.asarray(data[idx_BT1]), device)


def iter_eval_batches(
    data: np.ndarray,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic, non-overlapping evaluation windows.

    Window k predicts tokens [k*T + 1, k*T + T] of ``data`` (shape (N,)), so each token is a target
    at most once. When ``max_batches`` caps the count, the windows used are spread evenly over the
    whole split instead of taking its beginning, so the estimate covers many documents.

    Yields:
        (x_BT, y_BT) int64 tensors; the last batch may have fewer than ``batch_size`` rows.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    _check_length(data, seq_len)
    n_windows = (len(data) - 1) // seq_len
    wanted = n_windows if max_batches is None else min(n_windows, max_batches * batch_size)
    # Distinct window indices, evenly spaced; distinct multiples of T never overlap.
    windows = np.unique(np.linspace(0, n_windows - 1, wanted).round().astype(np.int64))
    offsets = np.arange(seq_len + 1)[None, :]
    for b in range(0, len(windows), batch_size):
        starts_B = windows[b : b + batch_size] * seq_len
        yield _to_device(np.asarray(data[starts_B[:, None] + offsets]), device)


def bits_per_byte(loss_nats_per_token: float, tokens_per_byte: float = 1.0) -> float:
    """Cross-entropy in nats per token -> bits per UTF-8 byte (tokenizer-independent).

    For the byte tokenizer ``tokens_per_byte`` is 1 and this is ``loss / ln 2``.
    """
    if tokens_per_byte <= 0:
        raise ValueError(f"tokens_per_byte must be > 0, got {tokens_per_byte}")
    return loss_nats_per_token * tokens_per_byte / math.log(2)
