"""Chat templates: a conversation -> the prompt text a chat model was tuned on.

An instruct model ships a Jinja template (Hugging Face: ``tokenizer_config.json["chat_template"]``
or a ``chat_template.jinja`` file; GGUF: the ``tokenizer.chat_template`` key) that lays out a
list of ``{"role", "content"}`` messages with the model's special tokens. ``ChatTemplate`` keeps
that template together with the special-token strings it may read (``bos_token``, ``eos_token``
...) and renders it as ``transformers``' ``apply_chat_template`` does: a sandboxed Jinja
environment with ``trim_blocks`` and ``lstrip_blocks``, loop controls, ``raise_exception``,
``strftime_now`` and a ``tojson`` that does not escape HTML, given ``messages``, ``tools=None``,
``documents=None``, ``add_generation_prompt`` and the special tokens.

The template is tokenization (text in, text out, written for one tokenizer's special tokens), so
it travels with the tokenizer: ``HFTokenizer.chat_template``, saved in the tokenizer's ``spec()``
inside a checkpoint's config.json.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["ChatTemplate", "apply_chat_template", "check_messages"]

# The named special tokens Hugging Face hands a template (``special_tokens_map``).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def check_messages(messages: Any) -> list[dict[str, str]]:
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
        raise ImportError("a chat template needs jinja2: pip install 'jinja2>=3.1' (transformers brings it)") from None

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
                messages=check_messages(messages),
                tools=None,
                documents=None,
                add_generation_prompt=bool(add_generation_prompt),
                **self.special_tokens,
            )
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"the chat template refused the messages: {' '.join(str(e).split())}") from None


def apply_chat_template(
    source: Any, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
) -> str:
    """The prompt text of a conversation under a model's chat template.

    Args:
        source: a checkpoint directory (or run directory), or a tokenizer with a ``chat_template``
            (``modlm.training.checkpoint.load_tokenizer_from_checkpoint``'s).
        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...].
        add_generation_prompt: append the opening of the assistant's reply (what to decode from).
    Returns:
        text to encode with the same tokenizer (its special tokens are written out as text).
    Raises:
        ValueError (one line): no chat template (naming the checkpoint), bad messages.
    """
    if isinstance(source, (str, os.PathLike)):
        from modlm.training.checkpoint import load_tokenizer_from_checkpoint

        where, tokenizer = str(Path(source)), load_tokenizer_from_checkpoint(source)
    else:
        where, tokenizer = f"tokenizer {getattr(source, 'name', type(source).__name__)}", source
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        raise ValueError(
            f"{where} has no chat template: convert a chat model whose tokenizer_config.json or GGUF carries one"
        )
    return template.render(messages, add_generation_prompt=add_generation_prompt)
