"""A conversation -> the prompt text a chat model was tuned on, from a checkpoint or a tokenizer.

An instruct model ships a Jinja template (Hugging Face: ``tokenizer_config.json["chat_template"]``
or a ``chat_template.jinja`` file; GGUF: the ``tokenizer.chat_template`` key) that lays out a
list of ``{"role", "content"}`` messages with the model's special tokens. ``modlm convert`` keeps
it as the tokenizer's ``modlm.training.tokenizers.ChatTemplate`` (in the tokenizer's ``spec()``,
inside the checkpoint's config.json); ``apply_chat_template`` renders it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from modlm.training.checkpoint import load_tokenizer_from_checkpoint

__all__ = ["apply_chat_template"]


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
        where, tokenizer = str(Path(source)), load_tokenizer_from_checkpoint(source)
    else:
        where, tokenizer = f"tokenizer {getattr(source, 'name', type(source).__name__)}", source
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        raise ValueError(
            f"{where} has no chat template: convert a chat model whose tokenizer_config.json or GGUF carries one"
        )
    return template.render(messages, add_generation_prompt=add_generation_prompt)
