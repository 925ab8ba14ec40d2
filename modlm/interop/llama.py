"""Hugging Face Llama-architecture models -> dense modlm models and checkpoints.

One table (``LLAMA_WEIGHTS``) maps every Hugging Face weight name to its modlm name, with the
fusing rules; one function (``llama_model_config``) maps config.json to a ``ModelConfig``. The
rest reads a source (a directory of config.json + safetensors, or a GGUF file through
``transformers``) and writes a checkpoint with the model's tokenizer, its chat template
(``modlm.training.tokenizers.ChatTemplate``, kept in the tokenizer's spec) and its end-of-sequence
ids (``ModelConfig.extra["eos_token_id"]``, where decoding stops).

Why no weight needs permuting: Hugging Face Llama checkpoints already use the rotate-half RoPE
layout (dims i and i + E/2 form a pair), which is modlm's (``modlm.model.layers.apply_rotary``),
with the same frequencies base^(-2i/E). ``transformers`` undoes llama.cpp's interleaved q/k
layout when it reads a GGUF file, so those arrive in the same layout.

The converted model is dense (``router="none"``); its blocks keep the names a routed block
uses, so its weights also load into a MoD config of the same shape (only routers are new).

Only the GGUF path imports ``transformers`` (``pip install 'modlm[gguf]'``); reading a
directory of safetensors needs nothing beyond modlm's own dependencies.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from modlm.config import ModelConfig
from modlm.model.transformer import MoDTransformer
from modlm.training.checkpoint import save_checkpoint
from modlm.training.tokenizers import HF_FILENAME, SPECIAL_TOKEN_NAMES, ChatTemplate, HFTokenizer
from modlm.validation import is_int

__all__ = [
    "LLAMA_WEIGHTS",
    "MAX_SEQ_LEN_CAP",
    "LlamaSource",
    "convert_llama",
    "from_hf_llama",
    "llama_model_config",
    "load_llama",
    "map_llama_weights",
    "read_llama_config",
]

# Hugging Face name -> (modlm name, part). ``{i}`` is the layer index. ``part`` None copies the
# tensor as it is; an int k puts it k-th in the fused modlm weight, whose rows are the parts
# stacked in order of k: ``attn.qkv`` is q rows, then k rows, then v rows (``Attention.forward``
# splits it as [H*E, G*E, G*E]); ``mlp.gate_up`` is gate rows, then up rows (``MLP.forward``
# chunks it in two: gate first).
LLAMA_WEIGHTS: dict[str, tuple[str, int | None]] = {
    "model.embed_tokens.weight": ("tok_emb.weight", None),
    "model.layers.{i}.input_layernorm.weight": ("blocks.{i}.attn_norm.weight", None),
    "model.layers.{i}.self_attn.q_proj.weight": ("blocks.{i}.attn.qkv.weight", 0),
    "model.layers.{i}.self_attn.k_proj.weight": ("blocks.{i}.attn.qkv.weight", 1),
    "model.layers.{i}.self_attn.v_proj.weight": ("blocks.{i}.attn.qkv.weight", 2),
    "model.layers.{i}.self_attn.o_proj.weight": ("blocks.{i}.attn.proj.weight", None),
    "model.layers.{i}.post_attention_layernorm.weight": ("blocks.{i}.mlp_norm.weight", None),
    "model.layers.{i}.mlp.gate_proj.weight": ("blocks.{i}.mlp.gate_up.weight", 0),
    "model.layers.{i}.mlp.up_proj.weight": ("blocks.{i}.mlp.gate_up.weight", 1),
    "model.layers.{i}.mlp.down_proj.weight": ("blocks.{i}.mlp.down.weight", None),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("lm_head.weight", None),
}
# Buffers some older checkpoints stored; modlm recomputes them from rope_base.
IGNORED_WEIGHTS = ("model.layers.{i}.self_attn.rotary_emb.inv_freq",)

# Default max_seq_len of a converted model: the rotary tables (cos and sin, max_seq_len x E/2
# each) are allocated for the whole context, and commands that default to the full context
# (calibration, ``modlm flops``) would run at it; models that declare 128k positions mostly
# reach them only through RoPE scaling, which modlm does not implement. Raise it with
# ``max_seq_len=`` up to the model's max_position_embeddings.
MAX_SEQ_LEN_CAP = 8192

# config.json keys a Llama config may leave out, with ``transformers.LlamaConfig``'s defaults.
_LLAMA_DEFAULTS: dict[str, Any] = {
    "num_key_value_heads": None,  # None: as many as attention heads
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "head_dim": None,
    "rope_theta": 10000.0,
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# Settings modlm's dense block implements exactly; any other value would convert silently wrong.
_MUST_EQUAL = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


def _pattern(name: str) -> re.Pattern:
    return re.compile(re.escape(name).replace(re.escape("{i}"), r"(\d+)") + r"\Z")


_TABLE = [(_pattern(hf), modlm, part) for hf, (modlm, part) in LLAMA_WEIGHTS.items()]
_IGNORED = [_pattern(hf) for hf in IGNORED_WEIGHTS]
# modlm name pattern -> the Hugging Face names it is made of (several for a fused weight).
_SOURCES: dict[str, list[str]] = {}
for _hf, (_modlm, _) in LLAMA_WEIGHTS.items():
    _SOURCES.setdefault(_modlm, []).append(_hf)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def _rope_theta(hf: Mapping[str, Any]) -> Any:
    """RoPE base from either config layout: ``rope_parameters`` (transformers >= 5) or
    ``rope_theta`` + ``rope_scaling`` (older); any scaling type but plain RoPE is refused."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    if not isinstance(params, Mapping) or not isinstance(scaling, Mapping):
        raise ValueError(f"rope_parameters={params!r} / rope_scaling={scaling!r} are not mappings")
    if params and "rope_type" not in params and "rope_theta" not in params:
        raise ValueError(f"rope_parameters={dict(params)!r}: per-layer RoPE settings are not implemented by modlm")
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(
            f"rope scaling rope_type={rope_type!r} is not implemented by modlm (only plain RoPE, 'default'): "
            "the converted model would compute different positions"
        )
    return params.get("rope_theta", hf.get("rope_theta", _LLAMA_DEFAULTS["rope_theta"]))


def _check_llama(hf: Mapping[str, Any]) -> None:
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    if model_type != "llama" and not (model_type is None and "LlamaForCausalLM" in architectures):
        raise ValueError(
            f"model_type={model_type!r} (architectures={architectures}) is not a Llama-architecture model; "
            "modlm converts model_type='llama' (LlamaForCausalLM)"
        )
    for key in _REQUIRED:
        if hf.get(key) is None:
            raise ValueError(f"the Llama config has no {key!r}: cannot size the model")
    for key, want in _MUST_EQUAL.items():
        got = hf.get(key, _LLAMA_DEFAULTS[key])
        if got != want:
            raise ValueError(f"{key}={got!r} is not supported: modlm's dense block implements {key}={want!r} only")
    head_dim = hf.get("head_dim", _LLAMA_DEFAULTS["head_dim"])
    if head_dim is not None and head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        raise ValueError(
            f"head_dim={head_dim} with num_attention_heads={hf['num_attention_heads']} does not span "
            f"hidden_size={hf['hidden_size']}: modlm's head size is d_model / n_heads"
        )


def llama_model_config(
    hf: Mapping[str, Any], *, max_seq_len: int | None = None, name: str = "llama", extra: dict | None = None
) -> ModelConfig:
    """The dense ``ModelConfig`` of a Hugging Face Llama config.

    Args:
        hf: the config as a dict (config.json, or ``LlamaConfig.to_dict()``); keys it omits take
            ``LlamaConfig``'s defaults.
        max_seq_len: the context to allocate; default min(max_position_embeddings,
            ``MAX_SEQ_LEN_CAP``), at most max_position_embeddings.
        name: the config's name. extra: notes for ``ModelConfig.extra``.
    Raises:
        ValueError (one line, naming the value): not a Llama model, a RoPE scaling type,
        activation, bias or head size that modlm does not implement, a bad max_seq_len.
    """
    _check_llama(hf)
    theta = _rope_theta(hf)
    positions = hf.get("max_position_embeddings", _LLAMA_DEFAULTS["max_position_embeddings"])
    if not is_int(positions) or positions < 2:
        raise ValueError(f"max_position_embeddings={positions!r} is invalid: must be an int >= 2")
    if max_seq_len is None:
        max_seq_len = min(positions, MAX_SEQ_LEN_CAP)
    elif is_int(max_seq_len) and max_seq_len > positions:
        raise ValueError(
            f"max_seq_len={max_seq_len} exceeds the model's max_position_embeddings={positions} (positions it never saw)"
        )
    n_kv = hf.get("num_key_value_heads", _LLAMA_DEFAULTS["num_key_value_heads"])
    # Values pass through unconverted: ModelConfig names the field of any bad one.
    return ModelConfig(
        name=name,
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf["num_attention_heads"] if n_kv is None else n_kv,
        d_mlp=hf["intermediate_size"],
        max_seq_len=max_seq_len,
        rope_base=theta,
        norm_eps=hf.get("rms_norm_eps", _LLAMA_DEFAULTS["rms_norm_eps"]),
        tie_embeddings=hf.get("tie_word_embeddings", _LLAMA_DEFAULTS["tie_word_embeddings"]),
        router="none",
        # ModelConfig's default route_start=1 must name a block; a 1-layer model has only block 0.
        route_start=0 if hf["num_hidden_layers"] == 1 else 1,
        extra=dict(extra or {}),
    )


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def map_llama_weights(hf_state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face Llama tensors -> modlm state-dict entries, by ``LLAMA_WEIGHTS``.

    With tied embeddings a stored ``lm_head.weight`` is skipped: the embedding is the head, as
    when ``transformers`` loads the model.
    Raises ValueError naming a tensor that is not in the table or a fused part that is missing.
    """
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    fused_pattern: dict[str, str] = {}
    for name, tensor in hf_state.items():
        if any(p.match(name) for p in _IGNORED):
            continue
        hit = next(((m, modlm, part) for pat, modlm, part in _TABLE if (m := pat.match(name))), None)
        if hit is None:
            raise ValueError(
                f"weight {name!r} is not in the Llama conversion table (modlm.interop.llama.LLAMA_WEIGHTS)"
            )
        m, modlm, part = hit
        layer = m.group(1) if m.groups() else None
        if layer is not None and int(layer) >= config.n_layers:
            raise ValueError(f"weight {name!r} names layer {layer}, but the config has n_layers={config.n_layers}")
        target = modlm.replace("{i}", layer) if layer is not None else modlm
        if target == "lm_head.weight" and config.tie_embeddings:
            continue
        if part is None:
            out[target] = tensor
        else:
            parts.setdefault(target, {})[part] = tensor
            fused_pattern[target] = modlm
    for target, got in parts.items():
        n = len(_SOURCES[fused_pattern[target]])
        missing = [k for k in range(n) if k not in got]
        if missing:
            want = [_SOURCES[fused_pattern[target]][k] for k in missing]
            raise ValueError(
                f"{target} is fused from {n} tensors, but {want} (layer {target.split('.')[1]}) are missing"
            )
        out[target] = torch.cat([got[k] for k in range(n)], dim=0)
    return out


def _build(config: ModelConfig, hf_state: Mapping[str, torch.Tensor]) -> MoDTransformer:
    """A float32 modlm model holding the mapped weights; every modlm weight must be given."""
    weights = map_llama_weights(hf_state, config)
    # Construction draws an init from the global RNG that the weights then replace; a caller's
    # RNG stream is left as it was.
    with torch.random.fork_rng(devices=[]):
        model = MoDTransformer(config)
    expected = {k for k in model.state_dict() if not (config.tie_embeddings and k == "lm_head.weight")}
    missing = sorted(expected - set(weights))
    if missing:
        generic = [re.sub(r"blocks\.\d+\.", "blocks.{i}.", k) for k in missing]
        hf_names = [" + ".join(_SOURCES.get(g, [g])) for g in generic]
        raise ValueError(f"the source lacks {hf_names[:3]} (modlm {missing[:3]}{', ...' if len(missing) > 3 else ''})")
    own = model.state_dict()
    for key, tensor in weights.items():
        want = own[key].shape
        if tuple(tensor.shape) != tuple(want):
            raise ValueError(f"{key} has shape {tuple(tensor.shape)} in the source, but the config gives {tuple(want)}")
    model.load_state_dict(weights, strict=False)
    return model.eval()


def from_hf_llama(hf_model: torch.nn.Module, *, max_seq_len: int | None = None) -> MoDTransformer:
    """The dense modlm model of a ``transformers`` ``LlamaForCausalLM`` (weights copied, float32).

    Args:
        hf_model: a ``LlamaForCausalLM`` (anything with a Llama ``config`` and its state dict).
        max_seq_len: see ``llama_model_config``.
    """
    hf = hf_model.config.to_dict()
    name = Path(str(hf.get("_name_or_path") or "llama")).name or "llama"
    generation = getattr(hf_model, "generation_config", None)
    notes = _notes(hf, "transformers", generation.to_dict() if generation is not None else None)
    config = llama_model_config(hf, max_seq_len=max_seq_len, name=name, extra=notes)
    return _build(config, {k: v.detach() for k, v in hf_model.state_dict().items()})


def _notes(hf: Mapping[str, Any], source: str, generation: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ``ModelConfig.extra`` keeps of the source: where it came from and its special ids.

    ``eos_token_id`` (an int or a list: decoding stops at any of them) joins the ids of
    generation_config.json, which ``transformers`` decodes with, to config.json's: chat models
    often list their end-of-turn token only there.
    """
    notes: dict[str, Any] = {"converted_from": source, "hf_model_type": hf.get("model_type")}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hf.get(key) is not None:
            notes[key] = hf[key]
    eos = [
        t
        for value in ((generation or {}).get("eos_token_id"), hf.get("eos_token_id"))
        for t in (value if isinstance(value, list) else [value])
        if t is not None
    ]
    eos = list(dict.fromkeys(eos))  # generation_config's first, each id once
    if eos:
        notes["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return notes


# --------------------------------------------------------------------------------------------
# Sources on disk
# --------------------------------------------------------------------------------------------


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "reading a GGUF file needs transformers, gguf and accelerate: pip install 'modlm[gguf]'"
        ) from None
    return transformers


class LlamaSource:
    """A Llama model on disk: a Hugging Face model directory (config.json + safetensors, one
    file or shards listed by model.safetensors.index.json) or a ``.gguf`` file.

    Opening it reads the config and finds the weight files, so a bad source fails (one line,
    naming the path or value) before any tensor is read.
    """

    def __init__(self, src: str | Path):
        path = Path(src).expanduser()
        self.gguf_file: str | None = None
        if path.is_file() and path.suffix == ".gguf":
            self.directory, self.gguf_file = path.parent, path.name
        elif path.is_file():
            raise ValueError(f"{path} is a file but not a .gguf file: give a model directory or a GGUF file")
        elif not path.is_dir():
            raise ValueError(
                f"{path} does not exist: give a model directory (config.json + safetensors) or a GGUF file"
            )
        elif not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json: not a Hugging Face model directory")
        else:
            self.directory = path
        self.path = path
        self.name = Path(self.gguf_file).stem if self.gguf_file else path.name
        self.hf_config = self._read_config()
        _check_llama(self.hf_config)  # what the config says is refused before weights are looked for
        _rope_theta(self.hf_config)
        self.weight_files = [] if self.gguf_file else self._find_weight_files()
        # A GGUF file's eos ids come with its config (transformers reads tokenizer.ggml.eos_token_id).
        self.generation_config = {} if self.gguf_file else self._read_json("generation_config.json", optional=True)

    def _read_config(self) -> dict[str, Any]:
        if self.gguf_file is not None:
            return _transformers().AutoConfig.from_pretrained(self.directory, gguf_file=self.gguf_file).to_dict()
        return self._read_json("config.json")

    def _read_json(self, name: str, optional: bool = False) -> dict[str, Any]:
        """A JSON object of the model directory ({} for a missing optional file)."""
        path = self.directory / name
        if optional and not path.is_file():
            return {}
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not readable JSON ({type(e).__name__})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path} is not a JSON object")
        return obj

    def _find_weight_files(self) -> list[str]:
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise ValueError(
                f"{self.directory} has no *.safetensors weights (pickled .bin weights are not read: loading them can run code)"
            )
        missing = [f for f in files if not (self.directory / f).is_file()]
        if missing:
            raise ValueError(f"{self.directory} lacks the weight file(s) {missing} that its index lists")
        return files

    def model_config(self, max_seq_len: int | None = None) -> ModelConfig:
        """The dense ``ModelConfig`` (see ``llama_model_config``)."""
        source = str(self.path)
        extra = _notes(self.hf_config, source, self.generation_config)
        return llama_model_config(self.hf_config, max_seq_len=max_seq_len, name=self.name, extra=extra)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor under its Hugging Face name (a GGUF file's dequantized by ``transformers``)."""
        if self.gguf_file is not None:
            hf_model = _transformers().AutoModelForCausalLM.from_pretrained(self.directory, gguf_file=self.gguf_file)
            return {k: v.detach() for k, v in hf_model.state_dict().items()}
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for f in self.weight_files:
            state.update(load_file(str(self.directory / f)))
        return state

    def tokenizer(self, override: str | Path | None = None) -> HFTokenizer:
        """The tokenizer to ship: ``override`` (a tokenizer.json or a folder holding one), the
        directory's tokenizer.json, or the one ``transformers`` rebuilds from the GGUF metadata."""
        if override is not None:
            path = Path(override).expanduser()
            path = path / HF_FILENAME if path.is_dir() else path
            if not path.is_file():
                raise ValueError(f"tokenizer={str(override)!r} is not a {HF_FILENAME} file or a directory holding one")
        elif self.gguf_file is None:
            path = self.directory / HF_FILENAME
            if not path.is_file():
                raise ValueError(
                    f"{self.directory} has no {HF_FILENAME}: pass tokenizer= (--tokenizer) a tokenizer.json"
                )
        else:
            return self._gguf_tokenizer()
        # The source's chat template stays with a replacement tokenizer: it is the model's chat format.
        tok = HFTokenizer.from_file(path)
        tok.chat_template = self._directory_chat_template() if self.gguf_file is None else self._gguf_chat_template()
        return tok

    def _directory_chat_template(self) -> ChatTemplate | None:
        """The chat template of a model directory: chat_template.jinja, else tokenizer_config.json's
        ``chat_template`` (a string, or a list of named templates of which "default" is used), with
        the special-token strings of tokenizer_config.json; None when there is none."""
        config = self._read_json("tokenizer_config.json", optional=True)
        jinja = self.directory / "chat_template.jinja"
        template = jinja.read_text(encoding="utf-8") if jinja.is_file() else config.get("chat_template")
        return _chat_template(template, config, str(self.directory))

    def _gguf_tokenizer(self) -> HFTokenizer:
        """The tokenizer ``transformers`` rebuilds from the GGUF metadata, with its chat template."""
        tok = _transformers().AutoTokenizer.from_pretrained(self.directory, gguf_file=self.gguf_file)
        backend = getattr(tok, "backend_tokenizer", None)  # a fast tokenizer's is a tokenizer.json
        if backend is None:
            raise ValueError(f"{self.path}: transformers gave no fast tokenizer to save as {HF_FILENAME}")
        chat = _chat_template(tok.chat_template, tok.special_tokens_map, str(self.path))
        return HFTokenizer(backend.to_str().encode("utf-8"), source=str(self.path), chat_template=chat)

    def _gguf_chat_template(self) -> ChatTemplate | None:
        """The GGUF file's ``tokenizer.chat_template`` (read through ``transformers``' tokenizer)."""
        return self._gguf_tokenizer().chat_template


def _chat_template(template: Any, special: Mapping[str, Any], where: str) -> ChatTemplate | None:
    """A ``ChatTemplate`` from a source's template (None, a string, or Hugging Face's named
    templates as a list of {"name", "template"} or a dict) and its special tokens, whose values
    may be strings or added-token dicts ({"content": ...})."""
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
    if isinstance(template, Mapping):
        if "default" not in template:
            raise ValueError(f"{where}: the chat templates {sorted(map(str, template))} include no 'default' one")
        template = template["default"]
    if template is None:
        return None
    if not isinstance(template, str):
        raise ValueError(f"{where}: chat_template={template!r:.60} is not a string")
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = special.get(name)
        value = value.get("content") if isinstance(value, Mapping) else value
        if isinstance(value, str):
            tokens[name] = value
    return ChatTemplate(template, tokens)


def read_llama_config(src: str | Path, *, max_seq_len: int | None = None) -> ModelConfig:
    """The dense ``ModelConfig`` of a source (a model directory or a GGUF file); reads no weights."""
    return LlamaSource(src).model_config(max_seq_len)


def load_llama(src: str | Path, *, max_seq_len: int | None = None) -> MoDTransformer:
    """The dense modlm model (float32) of a source: a model directory of safetensors or a GGUF file."""
    source = LlamaSource(src)
    return _build(source.model_config(max_seq_len), source.state_dict())


def convert_llama(
    src: str | Path,
    out: str | Path,
    *,
    max_seq_len: int | None = None,
    tokenizer: str | Path | None = None,
    on_start: Callable[[ModelConfig, HFTokenizer], None] | None = None,
    before_save: Callable[[MoDTransformer], None] | None = None,
) -> Path:
    """Convert a Llama-architecture model into a dense modlm checkpoint with its tokenizer.

    Args:
        src: a Hugging Face model directory (config.json + safetensors, one file or sharded) or
            a ``.gguf`` file (dequantized to float32 by ``transformers``: ``pip install 'modlm[gguf]'``).
        out: the checkpoint directory to write (``modlm.training.checkpoint.save_checkpoint``).
        max_seq_len: see ``llama_model_config``.
        tokenizer: a tokenizer.json to ship instead of the source's own.
        on_start: called with the resolved config and tokenizer once the source has passed every
            check and before its weights are read (the CLI prints them).
        before_save: called with the built model before it is saved, to change it in place
            (``modlm.interop.gguf_quant.convert_gguf_int4`` swaps in the file's 4-bit layers).
    Returns:
        ``out``; ``modlm.load_model(out)`` gives the model back, ``modlm generate --ckpt out`` samples.
    Raises:
        ValueError (one line): see ``LlamaSource`` and ``llama_model_config``.
    """
    source = LlamaSource(src)
    config = source.model_config(max_seq_len)
    tok = source.tokenizer(tokenizer)
    if on_start is not None:
        on_start(config, tok)
    model = _build(config, source.state_dict())
    if before_save is not None:
        before_save(model)
    return save_checkpoint(out, model, config, tokenizer=tok)
