"""Model configuration: one validated dataclass, presets by name.

No torch import here, so ``modlm --help`` and config validation stay instant. Router names come
from the router registry (``modlm.spec.routers``) and layer kinds from the block registry
(``modlm.spec.kinds``), both torch-free.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modlm.spec.capacity import capacity_k
from modlm.spec.fields import dataclass_from_dict
from modlm.spec.kinds import block_kinds, block_spec
from modlm.spec.routers import NO_ROUTER, router_names, router_spec
from modlm.validation import is_int, is_number, require

CAUSAL_ROUTING = ("aux_loss", "predictor", "both")
MAX_SEQ_LEN = 1 << 20
# Fields computed from others when not given. ``replace`` recomputes them unless the change
# names them, so a copy with another d_model never keeps the old model's d_mlp.
DERIVED_FIELDS = ("n_kv_heads", "d_mlp", "layer_types")


def _require(cond: bool, name: str, value: Any, allowed: str) -> None:
    require(cond, "ModelConfig", name, value, allowed)


@dataclass
class ModelConfig:
    """Architecture and routing of a Mixture-of-Depths decoder.

    A routed block (MoD, Raposo et al. 2024, §3) processes only the top-k tokens of each
    sequence, k = max(1, round(capacity * T)); the other tokens pass on the residual stream.
    ``router="none"`` gives the dense transformer with identical parameters minus routers.

    ``layer_types`` names each layer's block kind (``modlm.spec.kinds``: "dense", "routed",
    "moe", "mode-staged", "mode-integrated", "exit", "keys-kept"); left unset it is derived from ``router``,
    ``route_every`` and ``route_start``: routed positions get ``routed_kind``, the others
    ``block_kind``. Derived fields (``DERIVED_FIELDS``) are recomputed by ``replace`` unless the
    change names them. The ``n_experts`` / ``moe_*`` fields shape MoE feed-forwards
    (``modlm.model.moe``), ``n_noop_experts`` integrated MoDE's no-op experts, and
    ``exit_loss_weight`` the early-exit losses (``modlm.model.early_exit``).
    """

    name: str = "custom"
    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: same as n_heads (MHA); fewer: grouped-query attention
    d_mlp: int | None = None  # None: SwiGLU hidden size ~ 8/3 d_model rounded up to 64
    max_seq_len: int = 512
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    # --- routing ---
    router: str = "learned"  # a registered router (learned, random, token_choice, attention, tuned, gate) | none
    capacity: float = 0.125  # fraction of each sequence a routed block processes
    route_every: int = 2  # a routed block every `route_every` blocks...
    route_start: int = 1  # ...starting at this block index (the paper routes every other block)
    causal_routing: str = "predictor"  # how decoding routes: aux_loss | predictor | both
    aux_loss_weight: float = 0.01  # weight of the router BCE (aux_loss / both)
    predictor_loss_weight: float = 1.0  # weight of the predictor BCE (its input is detached)
    predictor_hidden: int = 64
    n_sink: int = 4  # gate router: the first n_sink real tokens of a sequence are always processed
    layer_types: tuple[str, ...] | None = None  # None: from router / route_every / route_start

    # --- block kinds, Mixture-of-Experts and early exit (modlm.spec.kinds, modlm.model.moe) ---
    block_kind: str = "dense"  # kind of the layers no MoD router wraps (when layer_types is derived)
    routed_kind: str = "routed"  # kind of the routed layers (when layer_types is derived)
    n_experts: int = 8  # real SwiGLU experts of an MoE feed-forward (each of hidden size d_mlp)
    moe_top_k: int = 2  # experts per token (token choice), 1 or 2
    moe_capacity_factor: float | None = None  # None: no drop; c: each expert takes <= c*k*N/experts
    n_noop_experts: int = 0  # no-op (residual) experts: mode-integrated layers only
    moe_shared_expert: bool = False  # a dense SwiGLU every token also goes through
    moe_balance_weight: float = 0.01  # Switch/megablocks load-balancing loss weight
    moe_z_weight: float = 0.001  # ST-MoE router z-loss weight
    exit_loss_weight: float = 0.2  # early exit: layer l's exit loss weight is this * (l+1)/n_layers

    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried with checkpoints
    # Which DERIVED_FIELDS were computed rather than given (not part of equality).
    _derived: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # In order: each step's checks may rely on the fields the steps before it validated.
        self._check_shape()
        self._check_numbers()
        self._check_routing()
        self._check_kinds_and_experts()
        self._resolve_layer_types()
        self._check_noop_experts()

    def _check_shape(self) -> None:
        """The sizes (vocabulary, width, depth, heads, MLP, context), deriving n_kv_heads and d_mlp."""
        _require(isinstance(self.name, str), "name", self.name, "must be a string")
        _require(
            is_int(self.vocab_size) and self.vocab_size > 0, "vocab_size", self.vocab_size, "must be a positive int"
        )
        _require(is_int(self.d_model) and self.d_model > 0, "d_model", self.d_model, "must be a positive int")
        _require(is_int(self.n_layers) and self.n_layers > 0, "n_layers", self.n_layers, "must be a positive int")
        _require(is_int(self.n_heads) and self.n_heads > 0, "n_heads", self.n_heads, "must be a positive int")
        # Derived values need the fields above to be valid first.
        derived = {n for n in DERIVED_FIELDS if getattr(self, n) is None}
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_mlp is None:
            self.d_mlp = 64 * ((int(8 * self.d_model / 3) + 63) // 64)
        self._derived = frozenset(derived)
        _require(self.d_model % self.n_heads == 0, "n_heads", self.n_heads, f"must divide d_model={self.d_model}")
        _require(
            (self.d_model // self.n_heads) % 2 == 0,
            "n_heads",
            self.n_heads,
            f"head size d_model/n_heads={self.d_model / self.n_heads:g} must be even for RoPE",
        )
        _require(
            is_int(self.n_kv_heads) and 0 < self.n_kv_heads <= self.n_heads and self.n_heads % self.n_kv_heads == 0,
            "n_kv_heads",
            self.n_kv_heads,
            f"must be a positive divisor of n_heads={self.n_heads}",
        )
        _require(is_int(self.d_mlp) and self.d_mlp > 0, "d_mlp", self.d_mlp, "must be a positive int")
        _require(
            is_int(self.max_seq_len) and 1 < self.max_seq_len <= MAX_SEQ_LEN,
            "max_seq_len",
            self.max_seq_len,
            f"must be an int in (1, {MAX_SEQ_LEN}] (the rotary tables are allocated for all of it)",
        )

    def _check_numbers(self) -> None:
        """The flags and scalars: tied embeddings, extra, RoPE base, norm epsilon, init std."""
        _require(isinstance(self.tie_embeddings, bool), "tie_embeddings", self.tie_embeddings, "must be true or false")
        _require(isinstance(self.extra, dict), "extra", self.extra, "must be a dict")
        _require(is_number(self.rope_base) and self.rope_base > 1, "rope_base", self.rope_base, "must be > 1")
        _require(is_number(self.norm_eps) and self.norm_eps > 0, "norm_eps", self.norm_eps, "must be > 0")
        _require(is_number(self.init_std) and self.init_std > 0, "init_std", self.init_std, "must be > 0")

    def _check_routing(self) -> None:
        """The router, capacity, where routing starts and repeats, and the routers' losses."""
        routers = (*router_names(), NO_ROUTER)
        _require(self.router in routers, "router", self.router, f"must be one of {routers}")
        _require(
            is_number(self.capacity) and 0.0 < self.capacity <= 1.0,
            "capacity",
            self.capacity,
            "must be in (0, 1]; 0.125 routes 12.5% of each sequence through a routed block",
        )
        _require(
            is_int(self.route_every) and self.route_every >= 1,
            "route_every",
            self.route_every,
            "must be an int >= 1 (1 routes every block, 2 every other block)",
        )
        _require(
            is_int(self.route_start) and 0 <= self.route_start < self.n_layers,
            "route_start",
            self.route_start,
            f"must be a block index in [0, {self.n_layers - 1}]",
        )
        _require(
            self.causal_routing in CAUSAL_ROUTING,
            "causal_routing",
            self.causal_routing,
            f"must be one of {CAUSAL_ROUTING}",
        )
        _require(
            is_number(self.aux_loss_weight) and self.aux_loss_weight >= 0,
            "aux_loss_weight",
            self.aux_loss_weight,
            "must be >= 0",
        )
        _require(
            is_number(self.predictor_loss_weight) and self.predictor_loss_weight >= 0,
            "predictor_loss_weight",
            self.predictor_loss_weight,
            "must be >= 0",
        )
        _require(
            is_int(self.predictor_hidden) and self.predictor_hidden > 0,
            "predictor_hidden",
            self.predictor_hidden,
            "must be a positive int",
        )
        _require(is_int(self.n_sink) and self.n_sink >= 0, "n_sink", self.n_sink, "must be an int >= 0")

    def _resolve_layer_types(self) -> None:
        """Each layer's block kind (None: the routed kind every ``route_every`` blocks from
        ``route_start``), checked against the router."""
        if self.layer_types is None:
            routed = (
                set() if self.router == NO_ROUTER else set(range(self.route_start, self.n_layers, self.route_every))
            )
            self.layer_types = tuple(self.routed_kind if i in routed else self.block_kind for i in range(self.n_layers))
        _require(
            isinstance(self.layer_types, (list, tuple))
            and len(self.layer_types) == self.n_layers
            and all(t in block_kinds() for t in self.layer_types),
            "layer_types",
            self.layer_types,
            f"must list one of {block_kinds()} for each of the n_layers={self.n_layers} layers",
        )
        self.layer_types = tuple(self.layer_types)
        _require(
            self.router == NO_ROUTER
            or not router_spec(self.router).needs_received_attention
            or not any(block_spec(t).routed for t in self.layer_types[:1]),
            "layer_types",
            self.layer_types,
            f"routes layer 0, but router={self.router!r} scores tokens by the previous block's attention "
            "(layer 0 has none): route from layer 1 on",
        )
        _require(
            self.router != NO_ROUTER or not any(block_spec(t).routed for t in self.layer_types),
            "layer_types",
            self.layer_types,
            "has routed layers but router='none' (give a router, or only dense layers)",
        )

    def _check_noop_experts(self) -> None:
        """No-op experts exactly where integrated MoDE layers are."""
        noop_kinds = [t for t in self.layer_types if block_spec(t).noop_experts]
        _require(
            self.n_noop_experts == 0 or bool(noop_kinds),
            "n_noop_experts",
            self.n_noop_experts,
            "must be 0 unless some layer is 'mode-integrated' (only integrated MoDE has no-op experts)",
        )
        _require(
            self.n_noop_experts > 0 or not noop_kinds,
            "n_noop_experts",
            self.n_noop_experts,
            "must be >= 1 for 'mode-integrated' layers (their MLP router picks among real and no-op experts)",
        )

    def _check_kinds_and_experts(self) -> None:
        """Block-kind fields and the MoE / early-exit fields (ranges; cross-checks come later)."""
        unrouted = tuple(k for k in block_kinds() if not block_spec(k).routed)
        routed = tuple(k for k in block_kinds() if block_spec(k).routed)
        _require(self.block_kind in unrouted, "block_kind", self.block_kind, f"must be one of {unrouted}")
        _require(self.routed_kind in routed, "routed_kind", self.routed_kind, f"must be one of {routed}")
        _require(is_int(self.n_experts) and self.n_experts >= 1, "n_experts", self.n_experts, "must be an int >= 1")
        _require(
            is_int(self.n_noop_experts) and self.n_noop_experts >= 0,
            "n_noop_experts",
            self.n_noop_experts,
            "must be an int >= 0",
        )
        total = self.n_experts + self.n_noop_experts if is_int(self.n_noop_experts) else self.n_experts
        _require(
            is_int(self.moe_top_k) and self.moe_top_k in (1, 2) and self.moe_top_k <= total,
            "moe_top_k",
            self.moe_top_k,
            f"must be 1 or 2 and <= n_experts + n_noop_experts = {total}",
        )
        _require(
            self.moe_capacity_factor is None or (is_number(self.moe_capacity_factor) and self.moe_capacity_factor > 0),
            "moe_capacity_factor",
            self.moe_capacity_factor,
            "must be > 0 (1.0: each expert takes its balanced share) or None (no token dropping)",
        )
        _require(
            isinstance(self.moe_shared_expert, bool),
            "moe_shared_expert",
            self.moe_shared_expert,
            "must be true or false",
        )
        for name in ("moe_balance_weight", "moe_z_weight", "exit_loss_weight"):
            value = getattr(self, name)
            _require(is_number(value) and value >= 0, name, value, "must be a number >= 0")

    # --- derived ---
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def routed_layers(self) -> tuple[int, ...]:
        """Indices of the blocks that route (empty for a dense model)."""
        return tuple(i for i, t in enumerate(self.layer_types) if block_spec(t).routed)

    @property
    def uses_predictor(self) -> bool:
        """Routed blocks carry a causal predictor MLP (the router's registry spec decides)."""
        return self.router != NO_ROUTER and router_spec(self.router).predictor(self)

    @property
    def uses_aux_loss(self) -> bool:
        """The router trains an auxiliary BCE on its own logit (the router's registry spec decides)."""
        return self.router != NO_ROUTER and router_spec(self.router).aux_loss(self)

    def capacity_tokens(self, seq_len: int) -> int:
        """k = max(1, round(capacity * T)): exactly k tokens per sequence in a routed block."""
        return capacity_k(self.capacity, seq_len)

    # --- construction ---
    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with some fields changed; derived fields not named in ``changes``
        are recomputed from the new values."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        for name in self._derived:
            d[name] = None
        d.update(changes)
        return type(self)(**d)

    def dense_twin(self) -> ModelConfig:
        """The same transformer with no routing (the isoshape dense baseline)."""
        name = self.name if self.name.endswith("-dense") else f"{self.name}-dense"
        plain = dict(router=NO_ROUTER, name=name, block_kind="dense", routed_kind="routed", n_noop_experts=0)
        if "layer_types" in self._derived:
            return self.replace(**plain)
        return self.replace(**plain, layer_types=tuple(block_spec(t).dense_kind for t in self.layer_types))

    def to_dict(self) -> dict[str, Any]:
        """Every field with its value, plus ``"derived"``: the fields that were computed (a
        config read back with ``from_dict`` keeps the values and recomputes those on ``replace``)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d["layer_types"] = list(self.layer_types)
        d["extra"] = dict(self.extra)
        d["derived"] = sorted(self._derived)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        derived = d.pop("derived", [])
        cfg = dataclass_from_dict(cls, d)
        bad = sorted(set(derived) - set(DERIVED_FIELDS)) if isinstance(derived, list) else derived
        if bad:
            raise ValueError(f"ModelConfig.derived={derived!r} is invalid: entries must be among {DERIVED_FIELDS}")
        cfg._derived = frozenset(derived) | cfg._derived
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        d = json.loads(p.read_text())
        return cls.from_dict(d.get("model", d))

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """A preset by name (see ``PRESETS``); ``<name>-dense`` gives its dense twin."""
        dense = name.endswith("-dense")
        base = name[: -len("-dense")] if dense else name
        if base not in PRESETS:
            names = sorted(PRESETS) + sorted(f"{n}-dense" for n in PRESETS)
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(names)}")
        d = dict(PRESETS[base], name=name)
        if dense:
            d.update(router="none", block_kind="dense", routed_kind="routed", n_noop_experts=0)
        d.update(overrides)
        return cls(**d)


# Presets. `tiny` is for tests (a forward in milliseconds); `small` is the `make run` default,
# sized to learn visibly in a few CPU minutes; `base` matches the CPU training benchmark
# (d=512, 8 layers); `gpt2-small` is a GPU-sized reference shape.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=64, n_layers=4, n_heads=4, max_seq_len=128, predictor_hidden=16),
    "small": dict(d_model=256, n_layers=8, n_heads=8, max_seq_len=256),
    "base": dict(d_model=512, n_layers=8, n_heads=8, max_seq_len=2048),
    "gpt2-small": dict(d_model=768, n_layers=12, n_heads=12, max_seq_len=2048, vocab_size=50304),
    # A-MoD (parameter-free routing by received attention) trained from scratch.
    "tiny-amod": dict(d_model=64, n_layers=4, n_heads=4, max_seq_len=128, predictor_hidden=16, router="attention"),
}


# MoE, MoDE, early-exit and keys-kept presets (``modlm.model.moe_blocks``, ``modlm.model.early_exit``,
# ``modlm.model.keys_kept``): the shapes above with another block kind. MoE: every layer, top-2
# token choice. Staged MoDE: MoD routing every other block (capacity 12.5%) around MoE blocks.
# Integrated MoDE: as many no-op experts as real ones, so about half the assignments ride the
# residual. Early exit: every layer may exit. Keys kept: MoD's learned routing every other block
# (12.5%), skipped tokens keeping their keys and values.
_KIND_VARIANTS: dict[str, dict[str, Any]] = {
    "moe": dict(router="none", block_kind="moe"),
    "mode-staged": dict(router="learned", block_kind="moe", routed_kind="mode-staged"),
    "mode-integrated": dict(router="none", block_kind="mode-integrated"),
    "early-exit": dict(router="none", block_kind="exit"),
    "keys-kept": dict(router="learned", routed_kind="keys-kept"),
}
for _shape, _experts in (("tiny", 4), ("small", 8)):
    for _variant, _fields in _KIND_VARIANTS.items():
        _extra = dict(n_experts=_experts) if _variant not in ("early-exit", "keys-kept") else {}
        if _variant == "mode-integrated":
            _extra["n_noop_experts"] = _experts
        PRESETS[f"{_shape}-{_variant}"] = dict(PRESETS[_shape], **_fields, **_extra)


def preset_names() -> list[str]:
    return sorted(PRESETS) + sorted(f"{n}-dense" for n in PRESETS)
