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

Caches: ``MoDForCausalLM`` takes no ``transformers`` cache. ``generate`` recomputes the whole
sequence each step (O(T^2) per sequence; its generation config says ``use_cache=False``, and
``use_cache=True`` changes nothing), routing causally (``routing="causal"``), so a routed model
chooses exactly the routes of modlm's own cached causal decoding (``modlm.generate``), token for
token. A routed block's KV cache is ragged (each row holds only the tokens that went through it,
at their true positions), which ``transformers``' per-layer caches do not model; for fast
decoding use ``modlm.generate``. A cache object passed in is refused rather than decoded wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

try:
    import transformers
except ImportError as e:  # an optional extra
    raise ImportError("modlm.interop.hf needs transformers: pip install 'modlm[hf]'") from e
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from modlm.config import ModelConfig
from modlm.model.layers import Rotary
from modlm.model.transformer import MoDTransformer
from modlm.spec.routers import check_routing

__all__ = ["MODEL_TYPE", "MoDCausalLMOutput", "MoDConfig", "MoDForCausalLM", "register"]

MODEL_TYPE = "modlm"
# transformers 5 declares tied weights as {target: source}; 4.x as a list of targets.
_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
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

    loss = lm_loss + aux_loss when ``labels`` are given; logits (B, T, V); past_key_values
    is always None (see the module docstring on caches).
    """

    aux_loss: torch.FloatTensor | None = None


class MoDForCausalLM(PreTrainedModel, GenerationMixin):
    """A ``MoDTransformer`` (as ``.model``) behind ``transformers``' model API and ``generate``."""

    config_class = MoDConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["DenseBlock", "RoutedBlock"]
    _tied_weights_keys = _TIED if _TRANSFORMERS_5 else list(_TIED)

    def __init__(self, config: MoDConfig, model: MoDTransformer | None = None):
        super().__init__(config)
        if model is not None and model.config != config.model_config:
            raise ValueError(
                f"model.config={model.config.name!r} does not match config.modlm; pass MoDConfig(model.config)"
            )
        self.model = model if model is not None else MoDTransformer(config.model_config)
        self.post_init()
        # No transformers cache (module docstring): generate recomputes the sequence each step.
        if self.generation_config is not None:
            self.generation_config.use_cache = False

    @classmethod
    def from_modlm(cls, model: MoDTransformer) -> MoDForCausalLM:
        """Wrap an existing modlm model; its parameters are shared, not copied."""
        return cls(MoDConfig(model.config), model=model)

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
        # generate must not build a DynamicCache for a model that cannot fill it.
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
        **kwargs: Any,
    ) -> MoDCausalLMOutput:
        """Logits (B, T, V) and, with ``labels`` (B, T; unshifted, -100 ignored), the loss.

        Args:
            input_ids: token ids (B, T).
            attention_mask: (B, T), 1 for real tokens; left or right padding is never routed or
                attended to, and positions count real tokens only.
            routing: "topk" (expert-choice over the sequence, as in training) or "causal" (each
                token routes by the causal signal, as when decoding; ``generate`` uses it).
            kwargs: ``transformers``' bookkeeping (``return_dict``, ``use_cache``...); a cache
                object or ``inputs_embeds`` is refused.
        """
        for key in ("past_key_values", "cache", "inputs_embeds"):
            if kwargs.get(key) is not None:
                raise ValueError(
                    f"MoDForCausalLM takes no {key}: it recomputes the whole sequence each call "
                    "(modlm.generate decodes with the routed KV cache)"
                )
        check_routing(routing)
        max_len = self.model.config.max_seq_len
        if input_ids.shape[1] > max_len:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_seq_len={max_len}")
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

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        routing: str = "causal",
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The whole sequence every step, routed causally (no cache: see the module docstring)."""
        for key in ("past_key_values", "cache"):
            if kwargs.get(key) is not None:
                raise ValueError(f"MoDForCausalLM.generate takes no {key}: it recomputes the sequence each step")
        return {"input_ids": input_ids, "attention_mask": attention_mask, "routing": routing}


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know ``model_type="modlm"`` (idempotent)."""
    AutoConfig.register(MODEL_TYPE, MoDConfig, exist_ok=True)
    AutoModelForCausalLM.register(MoDConfig, MoDForCausalLM, exist_ok=True)
