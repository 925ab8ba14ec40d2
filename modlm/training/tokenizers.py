"""Tokenizers: the protocol the library needs, UTF-8 bytes (the default) and Hugging Face tokenizer.json.

A tokenizer travels with what it produced: ``spec()`` is a JSON description (stored in a
checkpoint's ``config.json``), ``save(directory)`` writes the files that description names, and
``tokenizer_from_spec(spec, directory)`` rebuilds it. ``name`` is its identity: two tokenizers with
equal names give equal ids for every text, so the token cache keys on it.

``ChatTemplate`` is a chat model's Jinja template (a conversation -> its prompt text), rendered
as ``transformers``' ``apply_chat_template`` renders it; ``HFTokenizer.chat_template`` carries it,
since the template is written for that tokenizer's special tokens.

``StreamDecoder`` turns a stream of sampled ids into text that can be printed as it comes, even
when one character spans several tokens (a byte tokenizer, byte-level BPE).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

__all__ = [
    "ByteTokenizer",
    "ChatTemplate",
    "HFTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "load_tokenizer",
    "tokenizer_from_spec",
]

HF_FILENAME = "tokenizer.json"
_HF_INSTALL_HINT = "pip install 'modlm[hf]' (or pip install 'tokenizers>=0.15')"

Ids = Sequence[int] | np.ndarray | torch.Tensor


class Tokenizer(Protocol):
    """What the rest of the library needs from a tokenizer.

    Attributes:
        name: identity; equal names mean equal ids for every text (the token cache keys on it).
        vocab_size: one more than the largest id ``encode`` can return (the model's embedding
            table needs at least this many rows).
    """

    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Ids) -> str: ...

    def spec(self) -> dict[str, Any]:
        """JSON-serialisable description; ``tokenizer_from_spec`` rebuilds the tokenizer from it."""
        ...

    def save(self, directory: Path) -> list[str]:
        """Write the files ``spec()`` refers to into ``directory``; returns their names."""
        ...


def _flat_ids(ids: Ids, vocab_size: int) -> np.ndarray:
    """Ids as a flat int64 array, every one checked to lie in [0, vocab_size)."""
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    bad = arr[(arr < 0) | (arr >= vocab_size)]
    if bad.size:
        raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {vocab_size})")
    return arr


# --------------------------------------------------------------------------------------------
# Bytes
# --------------------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, no training, no unknown tokens, exact round trip."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        """``text`` -> list of ints in [0, 256), one per UTF-8 byte."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Ids) -> str:
        """Ids -> text; a byte sequence cut mid-character (e.g. by sampling) decodes to U+FFFD."""
        arr = _flat_ids(ids, self.vocab_size)
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def spec(self) -> dict[str, Any]:
        return {"kind": "byte"}

    def save(self, directory: Path) -> list[str]:
        return []  # nothing to write: the spec is the whole tokenizer

    @classmethod
    def from_spec(cls, spec: dict[str, Any], directory: Path) -> ByteTokenizer:
        return cls()

    def __repr__(self) -> str:
        return "ByteTokenizer()"


# --------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------

# The named special tokens Hugging Face hands a template (``special_tokens_map``).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _check_messages(messages: Any) -> list[dict[str, str]]:
    """``messages`` as a list of plain {"role": str, "content": str} dicts, or a one-line
    ValueError naming the first bad message."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"messages={messages!r:.80} is invalid: give a non-empty list of {{'role', 'content'}} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} is {m!r:.80}: each message must be a dict with str 'role' and 'content'")
        out.append({str(k): v for k, v in m.items()})
    return out


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    """The template compiled in a Jinja environment like ``transformers``' (sandboxed: templates
    come from model hubs and are untrusted code)."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("a chat template needs jinja2 (torch depends on it): pip install 'jinja2>=3.1'") from None

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        # Jinja's own tojson escapes HTML characters, which would change the prompt text.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not parse (line {e.lineno}: {e.message})") from None


@dataclass(frozen=True)
class ChatTemplate:
    """A chat model's Jinja template and the special-token strings it may read.

    template: the Jinja source. special_tokens: {"bos_token": "<s>", "eos_token": "</s>", ...},
    passed to the template as variables (Hugging Face's ``special_tokens_map``).
    """

    template: str
    special_tokens: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """One-line ValueErrors naming the bad field."""
        if not isinstance(self.template, str) or not self.template.strip():
            raise ValueError(f"ChatTemplate.template={self.template!r:.60} is invalid: must be a non-empty string")
        tokens = self.special_tokens
        if not isinstance(tokens, Mapping) or not all(
            k in SPECIAL_TOKEN_NAMES and isinstance(v, str) for k, v in tokens.items()
        ):
            raise ValueError(
                f"ChatTemplate.special_tokens={tokens!r:.80} is invalid: must map names in "
                f"{SPECIAL_TOKEN_NAMES} to strings"
            )
        object.__setattr__(self, "special_tokens", dict(tokens))

    def spec(self) -> dict[str, Any]:
        """JSON description (kept in a tokenizer's ``spec()``); ``from_spec`` reads it back."""
        return {"template": self.template, "special_tokens": dict(self.special_tokens)}

    @classmethod
    def from_spec(cls, spec: Any) -> ChatTemplate:
        """The template of a ``spec()``; a one-line ValueError when it is not one."""
        if not isinstance(spec, Mapping) or "template" not in spec:
            raise ValueError(f"chat template spec {spec!r:.80} is invalid: must be a dict with a 'template'")
        return cls(spec["template"], spec.get("special_tokens") or {})

    def render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages`` ([{"role": "user", "content": "..."}, ...]); with
        ``add_generation_prompt`` the template's opening of the assistant's turn follows.

        Raises ValueError (one line) for bad messages or a template that raises on them.
        """
        import jinja2

        compiled = _compile(self.template)
        try:
            return compiled.render(
                messages=_check_messages(messages),
                tools=None,
                documents=None,
                add_generation_prompt=bool(add_generation_prompt),
                **self.special_tokens,
            )
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"the chat template refused the messages: {' '.join(str(e).split())}") from None


# --------------------------------------------------------------------------------------------
# Hugging Face tokenizers
# --------------------------------------------------------------------------------------------


def _import_tokenizers() -> Any:
    # Imported here, not at the top: ``tokenizers`` is an optional dependency (the ``hf`` extra).
    try:
        import tokenizers
    except ImportError:
        raise ImportError(f"a tokenizer.json needs the `tokenizers` package: {_HF_INSTALL_HINT}") from None
    return tokenizers


class HFTokenizer:
    """Any Hugging Face ``tokenizers`` tokenizer.json (BPE, WordPiece, Unigram...).

    Texts are encoded without the post-processor's special tokens (no BOS/CLS glued to every
    document of a corpus) and decoded with special tokens kept, so what was sampled is what is
    shown. The exact bytes of the tokenizer.json are kept: their sha256 is the identity, and
    ``save`` writes them back unchanged, so a tokenizer reloaded from a checkpoint has the same
    ``name`` (and reuses the same token cache) as the file it came from.

    ``chat_template``: a chat model's template (``ChatTemplate``), or None.
    It changes no id, so it is not part of ``name``; ``spec()`` carries it.
    """

    def __init__(self, tokenizer_json: bytes, source: str = HF_FILENAME, chat_template: ChatTemplate | None = None):
        tokenizers = _import_tokenizers()
        try:
            self._tok = tokenizers.Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as e:  # tokenizers raises its own exception type, sometimes over several lines
            why = " ".join(str(e).split()) or type(e).__name__
            raise ValueError(f"{source} is not a Hugging Face tokenizer.json ({why})") from None
        self._json = tokenizer_json
        self.chat_template = chat_template
        self.sha256 = hashlib.sha256(tokenizer_json).hexdigest()
        self.name = f"hf-{self.sha256[:16]}"
        # Not get_vocab_size(): ids of added tokens need not be contiguous; the embedding must hold the largest.
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        """Read a tokenizer.json file."""
        path = Path(path).expanduser()
        return cls(path.read_bytes(), source=str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Ids) -> str:
        arr = _flat_ids(ids, self.vocab_size)
        return self._tok.decode(arr.tolist(), skip_special_tokens=False)

    def spec(self) -> dict[str, Any]:
        spec = {"kind": "hf", "file": HF_FILENAME, "sha256": self.sha256, "vocab_size": self.vocab_size}
        if self.chat_template is not None:
            spec["chat_template"] = self.chat_template.spec()
        return spec

    def save(self, directory: Path) -> list[str]:
        (Path(directory) / HF_FILENAME).write_bytes(self._json)
        return [HF_FILENAME]

    @classmethod
    def from_spec(cls, spec: dict[str, Any], directory: Path) -> HFTokenizer:
        path = Path(directory) / spec["file"]
        if not path.is_file():
            raise ValueError(f"{path} is missing: the tokenizer recorded in {directory} cannot be loaded")
        tok = cls.from_file(path)
        if tok.sha256 != spec["sha256"]:
            raise ValueError(f"{path} does not match its recorded sha256 (corrupted or replaced)")
        if spec.get("chat_template") is not None:
            tok.chat_template = ChatTemplate.from_spec(spec["chat_template"])
        return tok

    def __repr__(self) -> str:
        return f"HFTokenizer(name={self.name!r}, vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------------------------
# Finding a tokenizer
# --------------------------------------------------------------------------------------------

# spec["kind"] -> constructor; a new kind of tokenizer registers here and nowhere else.
_FROM_SPEC: dict[str, Callable[[dict[str, Any], Path], Tokenizer]] = {
    "byte": ByteTokenizer.from_spec,
    "hf": HFTokenizer.from_spec,
}


def tokenizer_from_spec(spec: dict[str, Any], directory: str | Path) -> Tokenizer:
    """Rebuild a tokenizer from its ``spec()`` and the folder its ``save()`` wrote into."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in _FROM_SPEC:
        raise ValueError(f"tokenizer kind={kind!r} is unknown; known kinds: {', '.join(_FROM_SPEC)}")
    return _FROM_SPEC[kind](spec, Path(directory))


def load_tokenizer(spec: str | None) -> Tokenizer:
    """A tokenizer named on a command line or in a config.

    Args:
        spec: None or "byte" for UTF-8 bytes; otherwise a tokenizer.json file or a directory
            holding one (a Hugging Face model folder, a modlm checkpoint).
    Raises:
        ValueError: anything else (one line, naming the value), or a file that is not a tokenizer.json.
        ImportError: a tokenizer.json while the optional ``tokenizers`` package is missing.
    """
    if spec is None or spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / HF_FILENAME
    if not path.is_file():
        raise ValueError(f"tokenizer={spec!r} is neither 'byte' nor a {HF_FILENAME} file or a directory holding one")
    return HFTokenizer.from_file(path)


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------


class StreamDecoder:
    """Incremental detokenization: the text each new token completes, ready to print.

    A token can end mid-character (one byte of a 3-byte character, a byte-level BPE piece), and
    some decoders change how a token reads depending on what precedes it (a word-initial space).
    So each step decodes a short window that starts a few tokens before the unprinted ones, and
    prints the part beyond the window's already-printed text once it no longer ends in U+FFFD.
    This is the prefix/read-offset scheme of Hugging Face text-generation-inference; the window
    keeps each step O(window) instead of re-decoding everything.

    Args:
        tokenizer: decodes the ids.
        context: ids that precede the stream (the prompt); they are never printed but give the
            first generated tokens their left context.
        context_tokens: how many tokens of already-printed text each window keeps.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = (), context_tokens: int = 5):
        self._tok = tokenizer
        self._ids = [int(t) for t in context]
        self._context_tokens = context_tokens
        self._prefix = max(0, len(self._ids) - context_tokens)  # window start
        self._read = len(self._ids)  # ids before this are printed

    def _pending(self) -> tuple[str, str]:
        """(decoded printed part of the window, decoded whole window)."""
        printed = self._tok.decode(self._ids[self._prefix : self._read])
        return printed, self._tok.decode(self._ids[self._prefix :])

    def push(self, token: int) -> str:
        """Add one token; returns the text it completes ('' while a character is still partial)."""
        self._ids.append(int(token))
        printed, text = self._pending()
        if len(text) <= len(printed) or text.endswith("\ufffd"):
            return ""
        self._read = len(self._ids)
        self._prefix = max(0, self._read - self._context_tokens)
        return text[len(printed) :]

    def flush(self) -> str:
        """The text of tokens still held back (an incomplete character decodes to U+FFFD)."""
        printed, text = self._pending()
        self._read = len(self._ids)
        self._prefix = max(0, self._read - self._context_tokens)
        return text[len(printed) :]
