"""modlm models behind ``transformers``' Auto classes, no remote code.

    >>> from modlm.interop import hf
    >>> hf.register()                                  # once per process; idempotent
    >>> wrapped = hf.MoDForCausalLM.from_modlm(model)  # a MoDTransformer, weights shared
    >>> wrapped.save_pretrained("out/")
    >>> again = AutoModelForCausalLM.from_pretrained("out/")
    >>> again.generate(ids, max_new_tokens=20, do_sample=False)

``MoDConfig`` carries a ``ModelConfig`` (its ``to_dict`` under the key ``"modlm"``);
``MoDForCausalLM`` wraps a ``MoDTransformer`` as ``.model`` and adapts its forward to
``transformers``' conventions (``labels`` unshifted with -100 ignored, a 2D ``attention_mask``).

Caches: ``generate`` decodes with modlm's own KV cache behind ``transformers``' ``Cache`` type
(``MoDCache``, in ``modlm.interop.hf_cache``; ``use_cache=True``, the default). The first forward
prefills the prompt (left padding from ``attention_mask``, routed causally); each later one feeds
one new token per row (phase "decode", routed blocks computing only the rows their causal
decision routes in), so greedy tokens equal ``modlm.generate``'s and the cache holds what its
cache holds: a routed layer's rows only the tokens that went through it. ``use_cache=False``
recomputes the whole sequence each step. A cache of another kind (a ``DynamicCache``) is
refused; so are beam search and assisted decoding, which reorder or crop a cache.

``save_pretrained`` also writes the tokenizer given to ``from_modlm`` (``from_checkpoint`` takes
the checkpoint's) when it is a Hugging Face one, and the generation config carries the model's
bos/eos/pad ids (``ModelConfig.extra``), so ``generate`` stops at eos as ``modlm.generate`` does.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

try:  # an optional extra
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        GenerationMixin,
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerFast,
    )
except ImportError as e:
    raise ImportError("modlm.interop.hf needs transformers: pip install 'modlm[hf]'") from e
from transformers.modeling_outputs import CausalLMOutputWithPast

from modlm.config import ModelConfig
from modlm.interop.hf_cache import MoDCache
from modlm.model.block import Phase
from modlm.model.layers import Rotary
from modlm.model.transformer import MoDTransformer
from modlm.spec.routers import check_routing
from modlm.training.checkpoint import load_model, load_tokenizer_from_checkpoint
from modlm.training.tokenizers import HFTokenizer, Tokenizer

__all__ = ["MODEL_TYPE", "MoDCache", "MoDCausalLMOutput", "MoDConfig", "MoDForCausalLM", "register", "save_tokenizer"]

MODEL_TYPE = "modlm"
# The output field generate reads the cache from: "cache" in recent transformers, "past_key_values" before.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_TIED = {"model.lm_head.weight": "model.tok_emb.weight"}
# Mirrors of ModelConfig fields under transformers' standard names (read by its utilities).
_MIRRORS = {
    "vocab_size": "vocab_size",
    "hidden_size": "d_model",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "max_position_embeddings": "max_seq_len",
    "tie_word_embeddings": "tie_embeddings",
}

# Special token ids modlm records in ModelConfig.extra (a converted model's) and transformers reads.
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


class MoDConfig(PretrainedConfig):
    """A ``PretrainedConfig`` holding a modlm ``ModelConfig`` as ``modlm`` (its ``to_dict()``).

    The ``ModelConfig`` is the source of truth: the standard names (``hidden_size``,
    ``num_hidden_layers``...) mirror it and are recomputed from it, never read back.
    """

    model_type = MODEL_TYPE

    def __init__(self, modlm: dict[str, Any] | ModelConfig | None = None, **kwargs: Any):
        if isinstance(modlm, ModelConfig):
            model_config = modlm
        else:
            model_config = ModelConfig.from_dict(modlm) if modlm is not None else ModelConfig()
        for key in _MIRRORS:
            kwargs.pop(key, None)
        for key in _TOKEN_IDS:  # a converted model's special ids (config.extra), for generate's defaults
            if kwargs.get(key) is None and model_config.extra.get(key) is not None:
                kwargs[key] = model_config.extra[key]
        self.modlm = model_config.to_dict()
        super().__init__(tie_word_embeddings=model_config.tie_embeddings, **kwargs)
        for key, field in _MIRRORS.items():
            setattr(self, key, getattr(model_config, field))

    @property
    def model_config(self) -> ModelConfig:
        """The modlm ``ModelConfig`` (validated)."""
        return ModelConfig.from_dict(self.modlm)


@dataclass
class MoDCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the routers' auxiliary loss (already inside ``loss``).

    loss = lm_loss + aux_loss when ``labels`` are given; logits (B, T, V); the ``MoDCache``
    when one was used (see the module docstring on caches).
    """

    aux_loss: torch.FloatTensor | None = None


class MoDForCausalLM(PreTrainedModel, GenerationMixin):
    """A ``MoDTransformer`` (as ``.model``) behind ``transformers``' model API and ``generate``."""

    config_class = MoDConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["DenseBlock", "RoutedBlock"]
    _tied_weights_keys = _TIED  # transformers 5: {target: source}

    def __init__(self, config: MoDConfig, model: MoDTransformer | None = None, tokenizer: Tokenizer | None = None):
        super().__init__(config)
        if model is not None and model.config != config.model_config:
            raise ValueError(
                f"model.config={model.config.name!r} does not match config.modlm; pass MoDConfig(model.config)"
            )
        self.model = model if model is not None else MoDTransformer(config.model_config)
        self.modlm_tokenizer = tokenizer  # written by save_pretrained (see save_tokenizer)
        self.post_init()

    @classmethod
    def from_modlm(cls, model: MoDTransformer, tokenizer: Tokenizer | None = None) -> MoDForCausalLM:
        """Wrap an existing modlm model; its parameters are shared, not copied.

        ``tokenizer``: the model's modlm tokenizer, which ``save_pretrained`` writes beside it.
        """
        return cls(MoDConfig(model.config), model=model, tokenizer=tokenizer)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> MoDForCausalLM:
        """Wrap a modlm checkpoint (or run directory): its model, in eval mode, and its tokenizer."""
        return cls.from_modlm(load_model(path), load_tokenizer_from_checkpoint(path))

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """``transformers``' ``save_pretrained`` (config, weights, generation config with the
        special ids), plus the tokenizer when the wrapper has one (``save_tokenizer``)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.modlm_tokenizer is not None:
            save_tokenizer(self.modlm_tokenizer, save_directory, self.config.model_config)

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        """Only the rotary tables: parameters come from ``MoDTransformer.init_weights`` or a checkpoint.

        NOTE: ``from_pretrained`` (transformers >= 5) builds the model on the meta device and
        materialises non-persistent buffers empty, expecting this method to fill them; the
        rotary cos/sin tables are such buffers. transformers' generic init must not touch the
        parameters: it would overwrite a wrapped model's weights.
        """
        if isinstance(module, Rotary):
            cfg = self.config.model_config
            fresh = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
            module.cos.copy_(fresh.cos)
            module.sin.copy_(fresh.sin)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate must not build a DynamicCache: forward builds the MoDCache it needs (use_cache=True).
        return False

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.tok_emb

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.tok_emb = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        routing: str = "topk",
        cache: MoDCache | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> MoDCausalLMOutput:
        """Logits (B, T, V) and, with ``labels`` (B, T; unshifted, -100 ignored), the loss.

        Args:
            input_ids: token ids (B, T): the whole sequence, or with a ``cache`` the positions
                after those it holds.
            attention_mask: (B, T), 1 for real tokens; left or right padding is never routed or
                attended to, and positions count real tokens only. With a cache: the whole
                sequence's mask (cached positions included), as ``generate`` passes it.
            routing: "topk" (expert-choice over the sequence, as in training) or "causal" (each
                token routes by the causal signal, as when decoding; ``generate`` uses it).
                Tokens decoded into a non-empty cache always route causally.
            cache: a ``MoDCache`` (``past_key_values`` is read as the same): empty, it is
                prefilled with the sequence; holding one, each new token is decoded into it.
                Runs under ``torch.inference_mode`` (no gradients; ``labels`` are refused).
            use_cache: True without a cache builds a fresh ``MoDCache`` (returned as ``cache``).
            kwargs: ``transformers``' bookkeeping (``return_dict``...); ``inputs_embeds`` and a
                cache of another kind are refused.
        """
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("MoDForCausalLM takes no inputs_embeds: give input_ids")
        cache = cache if cache is not None else kwargs.get("past_key_values")
        if cache is not None and not isinstance(cache, MoDCache):
            raise ValueError(
                f"MoDForCausalLM takes a MoDCache, not a {type(cache).__name__}: a routed layer's ragged KV cache "
                "has no transformers equivalent (pass none; generate builds one)"
            )
        check_routing(routing)
        if cache is None and use_cache and labels is None:
            cache = MoDCache(self.model.config)
        seen = 0 if cache is None else cache.get_seq_length()
        max_len = self.model.config.max_seq_len
        if seen + input_ids.shape[1] > max_len:
            raise ValueError(f"sequence length {seen + input_ids.shape[1]} exceeds max_seq_len={max_len}")
        if cache is not None:
            if labels is not None:
                raise ValueError("MoDForCausalLM takes no labels with a cache: the loss needs the whole sequence")
            # NOTE: decoding tracks no gradients (as modlm.generate): the logits and the cache's
            # tensors are inference tensors, and the per-step autograd bookkeeping is skipped.
            with torch.inference_mode():
                logits = self._cached_forward(input_ids, attention_mask, routing, cache)
            return MoDCausalLMOutput(logits=logits, **{_CACHE_FIELD: cache})
        mask_BT = pos_BT = None
        if attention_mask is not None:
            mask_BT = attention_mask.bool()
            pos_BT = (mask_BT.long().cumsum(1) - 1).clamp(min=0)  # true positions under left padding
        targets_BT = None
        if labels is not None:
            # transformers' labels are the inputs (shifted inside the model); modlm's targets are the
            # next tokens with -1 ignored.
            targets_BT = torch.full_like(labels, -1)
            targets_BT[:, :-1] = labels[:, 1:].masked_fill(labels[:, 1:] == -100, -1)
        out = self.model(input_ids, targets_BT, routing=routing, pos_BT=pos_BT, token_mask_BT=mask_BT)
        return MoDCausalLMOutput(loss=out.loss, logits=out.logits, aux_loss=out.aux_loss)

    def _cached_forward(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, routing: str, cache: MoDCache
    ) -> torch.Tensor:
        """Logits (B, T, V): an empty cache is prefilled, a filled one decodes each new token in turn.

        As ``modlm.generate`` does: the prompt enters with its padding mask and true positions
        (phase "prefill"); each later token is one forward of one token per row (phase "decode",
        routed blocks computing only the rows whose causal decision routes them in).
        """
        B, T = input_ids.shape
        seen = cache.get_seq_length()
        if attention_mask is not None and attention_mask.shape != (B, seen + T):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; with a cache holding {seen} positions "
                f"and {T} new ones it must be ({B}, {seen + T})"
            )
        if seen == 0:
            mask_BT = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            pos_BT = (mask_BT.long().cumsum(1) - 1).clamp(min=0)  # true positions under left padding
            param = next(self.model.parameters())
            model_cache = cache.start(B, T, param.device, param.dtype)
            out = self.model(
                input_ids, routing=routing, cache=model_cache, pos_BT=pos_BT, token_mask_BT=mask_BT, phase=Phase.PREFILL
            )
            cache.advance(T, pos_BT[:, -1:] + 1)
            return out.logits
        if cache.batch_size != B:
            raise ValueError(f"input_ids has {B} rows; the cache holds {cache.batch_size}")
        if attention_mask is not None and not bool(attention_mask[:, seen:].all()):
            raise ValueError(
                "attention_mask masks a token after the prompt: with a cache only the prompt may be padded"
            )
        logits = []
        for t in range(T):
            out = self.model(
                input_ids[:, t : t + 1],
                routing="causal",
                cache=cache.model_cache,
                pos_BT=cache.next_pos_B1,
                phase=Phase.DECODE,
                decode=cache.policy,
            )
            cache.advance(1, cache.next_pos_B1 + 1)
            logits.append(out.logits)
        return logits[0] if T == 1 else torch.cat(logits, 1)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: MoDCache | None = None,
        use_cache: bool | None = None,
        routing: str = "causal",
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The positions the cache does not hold yet (all of them without a cache), routed causally.

        ``generate`` keeps ``input_ids`` and ``attention_mask`` whole; the cache says how many
        positions it holds, so the first call prefills the prompt and each later one feeds the
        one new token per row.
        """
        cache = cache if cache is not None else kwargs.get("past_key_values")
        inputs: dict[str, Any] = {"attention_mask": attention_mask, "routing": routing, "use_cache": use_cache}
        if cache is not None:
            input_ids = input_ids[:, cache.get_seq_length() :] if isinstance(cache, MoDCache) else input_ids
            inputs["cache"] = cache
        inputs["input_ids"] = input_ids
        return inputs


def save_tokenizer(tokenizer: Tokenizer, directory: str | os.PathLike, config: ModelConfig) -> bool:
    """Write a modlm tokenizer where ``AutoTokenizer.from_pretrained(directory)`` loads it; False if none.

    A Hugging Face tokenizer (``HFTokenizer``) is written as a ``PreTrainedTokenizerFast``
    (tokenizer.json, tokenizer_config.json) with the config's bos/eos/pad ids as its special
    tokens and its chat template. modlm encodes without the post-processor's special tokens:
    ``encode(text, add_special_tokens=False)`` gives modlm's ids. The byte tokenizer has no
    ``transformers`` class (its ids are UTF-8 bytes): nothing is written, with a warning.
    """
    if not isinstance(tokenizer, HFTokenizer):
        warnings.warn(
            f"{tokenizer!r} has no transformers equivalent: no tokenizer written to {directory}", stacklevel=2
        )
        return False
    directory = Path(directory)
    (file,) = tokenizer.save(directory)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(directory / file))
    specials = {}
    for key in _TOKEN_IDS:
        ids = config.extra.get(key)
        ids = ids[0] if isinstance(ids, (list, tuple)) and ids else ids  # a list of eos ids: the first is the token
        if ids is not None:
            specials[key.removesuffix("_id")] = fast.convert_ids_to_tokens(int(ids))
    fast.add_special_tokens(specials)
    if tokenizer.chat_template is not None:
        fast.chat_template = tokenizer.chat_template.template
    fast.save_pretrained(directory)
    return True


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know ``model_type="modlm"`` (idempotent)."""
    AutoConfig.register(MODEL_TYPE, MoDConfig, exist_ok=True)
    AutoModelForCausalLM.register(MoDConfig, MoDForCausalLM, exist_ok=True)
