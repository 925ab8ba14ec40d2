"""isoFLOP sweeps: plan runs that each spend a training-FLOP budget (`modlm isoflop` runs a study of them).

    modlm isoflop --budgets 1e12,4e12 --family dense --family mod --results-dir results/iso

The plan: for every budget, every family (dense, MoD, MoD variants) and every model shape of a
grid (depth x width), ``steps = round(budget / train_flops_per_step)`` so the run spends the
budget to within half a step (the planner keeps only runs within 1% of it, i.e. >= 50 steps).
FLOPs are ``modlm.flops.train_flops`` (forward + backward, routed blocks at capacity,
evaluation not counted).

A run can also carry its own seed (a repeat) and learning rate (a trial), both part of its id.
Which runs a study needs (the shapes that bracket each optimum, the seed repeats, the learning
rates) is decided round by round by ``modlm.experiments.study``; training a plan (resumable,
optionally several runs at once) is ``modlm.experiments.sweep``; the folder it fills is
``modlm.experiments.results``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modlm.config import ModelConfig
from modlm.spec.fields import parse_assignments
from modlm.validation import is_int, is_number, require

BUDGET_TOLERANCE = 0.01  # a run's FLOPs are within 1% of its budget

# Families: ModelConfig overrides on top of a shape. "mod" is the paper's best setting (§4.1):
# capacity 12.5%, every other block routed, learned expert-choice routing; causal routing by
# the stop-gradient predictor (§3.5), which leaves the LM objective untouched.
FAMILIES: dict[str, dict[str, Any]] = {
    "dense": {"router": "none"},
    "mod": {"router": "learned", "capacity": 0.125, "route_every": 2, "route_start": 1, "causal_routing": "predictor"},
    "mod-random": {"router": "random", "capacity": 0.125, "route_every": 2, "route_start": 1},
    # Token choice (modlm.routing.token_choice); aux_loss_weight is its balancing-loss weight there.
    "mod-tc": {"router": "token_choice", "capacity": 0.125, "route_every": 2, "route_start": 1, "aux_loss_weight": 1.0},
    # MoE and MoDE (modlm.model.moe_blocks): 4 experts of the dense MLP's size, top-1 token choice, so a
    # plain MoE costs what the dense model does; integrated MoDE adds no-op experts (give
    # n_noop_experts) under capacity factor 1, which caps the real experts' share at E/(E+no-ops).
    "moe": {"router": "none", "block_kind": "moe", "n_experts": 4, "moe_top_k": 1},
    "mode-integrated": {
        "router": "none",
        "block_kind": "mode-integrated",
        "n_experts": 4,
        "moe_top_k": 1,
        "n_noop_experts": 4,
        "moe_capacity_factor": 1.0,
    },
    "mode-staged": {
        "router": "learned",
        "capacity": 0.125,
        "route_every": 2,
        "route_start": 1,
        "causal_routing": "predictor",
        "block_kind": "moe",
        "routed_kind": "mode-staged",
        "n_experts": 4,
        "moe_top_k": 1,
    },
    # Early exit (modlm.model.early_exit): LayerSkip-style exit losses at every layer.
    "early-exit": {"router": "none", "block_kind": "exit"},
    # "mod" whose skipped tokens keep their keys and values (modlm.model.keys_kept, FlexiDepth's rule).
    "keys-kept": {
        "router": "learned",
        "capacity": 0.125,
        "route_every": 2,
        "route_start": 1,
        "causal_routing": "predictor",
        "routed_kind": "keys-kept",
    },
}


# ---------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A model size: width and depth (heads follow from ``SweepSettings.head_dim``)."""

    d_model: int
    n_layers: int

    @property
    def name(self) -> str:
        return f"d{self.d_model}L{self.n_layers}"

    @classmethod
    def parse(cls, text: str) -> Shape:
        """'128x4' (width x depth) -> Shape(128, 4)."""
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
        if not m:
            raise ValueError(f"shape {text!r} is invalid: expected WIDTHxDEPTH, e.g. 128x4")
        return cls(int(m.group(1)), int(m.group(2)))


def parse_shapes(text: str) -> tuple[Shape, ...]:
    """'64x2,128x4' -> (Shape(64, 2), Shape(128, 4)): a grid of shapes."""
    return tuple(Shape.parse(s) for s in text.split(",") if s.strip())


@dataclass(frozen=True)
class Family:
    """A named set of ModelConfig overrides: ``mod``, or ``mod:capacity=0.25,route_every=1``."""

    label: str
    overrides: tuple[tuple[str, Any], ...]

    @property
    def model_overrides(self) -> dict[str, Any]:
        return dict(self.overrides)

    @property
    def slug(self) -> str:
        """The label made safe for a folder name."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label.replace("=", "")).strip("_")

    @classmethod
    def parse(cls, spec: str) -> Family:
        base, _, rest = spec.partition(":")
        base = base.strip()
        if base not in FAMILIES:
            raise ValueError(
                f"family {spec!r} is invalid: the base must be one of {sorted(FAMILIES)} "
                f"(optionally ':KEY=VALUE,...' ModelConfig overrides)"
            )
        over = dict(FAMILIES[base])
        known = {f.name for f in dataclasses.fields(ModelConfig)} - {"name", "d_model", "n_layers", "n_heads"}
        items = [s.strip() for s in rest.split(",") if s.strip()]
        given = parse_assignments(items, flag=f"family {spec!r}:", into=ModelConfig)
        for key, value in given.items():
            if key not in known:
                raise ValueError(
                    f"family {spec!r} is invalid: {key!r} must be a ModelConfig field other than "
                    f"the shape's ({', '.join(sorted(known))})"
                )
            over[key] = value.strip() if isinstance(value, str) else value
        return cls(spec.strip(), tuple(sorted(over.items())))


def _require(cond: bool, name: str, value: Any, allowed: str) -> None:
    require(cond, "SweepSettings", name, value, allowed)


@dataclass(frozen=True)
class SweepSettings:
    """Training settings shared by every run of a sweep (the budget fixes each run's steps)."""

    seq_len: int = 256  # a routed block at 12.5% processes 32 tokens of each sequence
    batch_size: int = 8
    head_dim: int = 32
    predictor_hidden: int = 32
    lr: float = 2e-3
    # Weights drawn with std init_gain / sqrt(d_model) (None: the model's own init_std, 0.02 at
    # every width). 0.55 gives GPT-2's 0.02 at d=768; at the widths of a CPU ladder (16-192) a
    # fixed 0.02 is 3-10x too small, and the runs sit on the unigram plateau (~3.1 nats per byte)
    # for a random 100-250 of their few hundred steps: that, not the data order, made the seed
    # spread (0.06 nats). ``modlm.experiments.isoflop.model_overrides`` applies it.
    init_gain: float | None = 0.55
    # torch.compile each run's model (TrainConfig.compile). Off by default: on the default
    # scale's CPU runs the compiled step was 1.15x faster but compiling took ~36 s per run, more
    # than it saves on runs of 20-170 s. How a run is executed, not what it trains: a results
    # folder trained without it resumes with it (``modlm.experiments.sweep``).
    compile: bool = False
    min_lr_ratio: float = 0.1  # cosine from lr down to lr * min_lr_ratio
    warmup_frac: float = 0.05  # of each run's steps (at least 10 steps, at most 200)
    weight_decay: float = 0.1
    min_steps: int = 50  # fewer steps: round() misses the budget by > 1%, and models barely train
    max_steps: int = 3000  # more steps: a model too small to be interesting at this budget
    eval_batches: int = 32  # final validation: eval_batches * batch_size windows of seq_len
    evals_per_run: int = 1  # validations per run (the last at the end)
    ckpts_per_run: int = 5  # checkpoints per run (resume granularity)
    log_points: int = 40  # training-loss records per run (the loss-vs-FLOPs curves)
    seed: int = 0  # the base seed (init and data order); repeats use others (``PlannedRun.seed``)
    split_seed: int = 0  # the train/val document split: one validation set for every run and seed
    data: str | None = None
    cache_dir: str | None = None
    # "byte" (UTF-8 bytes), "bpe:N" (a byte-level BPE of N ids learned on the training split,
    # ``modlm.training.bpe``) or a Hugging Face tokenizer.json.
    tokenizer: str = "byte"
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        for name in (
            "seq_len",
            "batch_size",
            "head_dim",
            "predictor_hidden",
            "min_steps",
            "max_steps",
            "eval_batches",
            "evals_per_run",
            "ckpts_per_run",
            "log_points",
        ):
            v = getattr(self, name)
            _require(is_int(v) and v >= 1, name, v, "must be an int >= 1")
        _require(self.head_dim % 2 == 0, "head_dim", self.head_dim, "must be even (RoPE)")
        _require(
            self.min_steps >= 50,
            "min_steps",
            self.min_steps,
            f"must be >= 50, or rounding the step count can miss the budget by more than {BUDGET_TOLERANCE:.0%}",
        )
        _require(
            self.max_steps >= self.min_steps, "max_steps", self.max_steps, f"must be >= min_steps={self.min_steps}"
        )
        _require(is_number(self.lr) and self.lr > 0, "lr", self.lr, "must be a finite number > 0")
        _require(isinstance(self.compile, bool), "compile", self.compile, "must be true or false")
        _require(
            self.init_gain is None or (is_number(self.init_gain) and self.init_gain > 0),
            "init_gain",
            self.init_gain,
            "must be a number > 0 (init std = init_gain / sqrt(d_model)) or None",
        )
        _require(
            is_number(self.min_lr_ratio) and 0 < self.min_lr_ratio <= 1,
            "min_lr_ratio",
            self.min_lr_ratio,
            "must be in (0, 1]",
        )
        _require(
            is_number(self.warmup_frac) and 0 <= self.warmup_frac < 1,
            "warmup_frac",
            self.warmup_frac,
            "must be in [0, 1)",
        )
        _require(
            is_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0"
        )
        _require(is_int(self.split_seed) and self.split_seed >= 0, "split_seed", self.split_seed, "must be an int >= 0")
        _require(
            isinstance(self.tokenizer, str) and self.tokenizer != "",
            "tokenizer",
            self.tokenizer,
            "must be 'byte', 'bpe:N' or a tokenizer.json path",
        )
        if self.tokenizer.startswith("bpe:"):
            from modlm.training.bpe import parse_bpe_spec

            parse_bpe_spec(self.tokenizer)  # one line naming a bad vocabulary size

    def vocab_size(self) -> int | None:
        """The model's vocabulary for this tokenizer (None: the preset's 256 bytes). For 'bpe:N'
        it is N before the tokenizer is trained, so plans and FLOPs need no training."""
        if self.tokenizer == "byte":
            return None
        if self.tokenizer.startswith("bpe:"):
            return int(self.tokenizer[4:])
        from modlm.training.tokenizers import load_tokenizer

        return load_tokenizer(self.tokenizer).vocab_size

    def tokenizer_path(self) -> str | None:
        """What TrainConfig.tokenizer gets: None for bytes, else a tokenizer.json (a 'bpe:N'
        tokenizer is trained on first use and cached beside the data)."""
        if self.tokenizer == "byte":
            return None
        if self.tokenizer.startswith("bpe:"):
            return _bpe_path(self.data, self.cache_dir, self.split_seed, int(self.tokenizer[4:]))
        return self.tokenizer

    def tokenizer_label(self) -> str:
        """'bytes (vocabulary 256)' or 'BPE (vocabulary N, learned on the training split)'."""
        if self.tokenizer == "byte":
            return "UTF-8 bytes (vocabulary 256)"
        if self.tokenizer.startswith("bpe:"):
            return f"byte-level BPE (vocabulary {self.tokenizer[4:]}, learned on the training split)"
        return f"{self.tokenizer} (vocabulary {self.vocab_size()})"

    def replace(self, **changes: Any) -> SweepSettings:
        return dataclasses.replace(self, **changes)


_BPE_PATHS: dict[tuple, str] = {}


def _bpe_path(data: str | None, cache_dir: str | None, split_seed: int, vocab: int) -> str:
    """``modlm.training.bpe.bpe_tokenizer``, looked up once per process (it fingerprints the corpus)."""
    key = (data, cache_dir, split_seed, vocab)
    if key not in _BPE_PATHS:
        from modlm.training.bpe import bpe_tokenizer

        _BPE_PATHS[key] = str(bpe_tokenizer(data, vocab, cache_dir=cache_dir, split_seed=split_seed))
    return _BPE_PATHS[key]


def model_overrides(shape: Shape, family: Family, settings: SweepSettings) -> dict[str, Any]:
    """ModelConfig overrides (on the ``tiny`` preset) for one shape of one family."""
    # A width below head_dim is one head of that width (the small end of a CPU ladder).
    if shape.d_model >= settings.head_dim and shape.d_model % settings.head_dim:
        raise ValueError(
            f"shape {shape.name}: d_model={shape.d_model} must be a multiple of head_dim={settings.head_dim} "
            f"(or below it: one head)"
        )
    if shape.d_model % 2:
        raise ValueError(f"shape {shape.name}: d_model={shape.d_model} must be even (RoPE)")
    over = {
        "d_model": shape.d_model,
        "n_layers": shape.n_layers,
        "n_heads": max(1, shape.d_model // settings.head_dim),
        "max_seq_len": settings.seq_len,
        "predictor_hidden": settings.predictor_hidden,
    }
    if settings.init_gain is not None:
        over["init_std"] = round(settings.init_gain / math.sqrt(shape.d_model), 6)
    vocab = settings.vocab_size()
    if vocab is not None:
        over["vocab_size"] = vocab
    over.update(family.model_overrides)
    if over.get("route_start", 0) >= shape.n_layers:
        over["route_start"] = shape.n_layers - 1
    return over


def format_budget(budget: float) -> str:
    """1.5e12 -> '1.5e12' (compact, stable: used in run ids)."""
    mant, exp = f"{budget:.3e}".split("e")
    return f"{float(mant):g}e{int(exp)}"


@dataclass(frozen=True)
class PlannedRun:
    """One training run of a sweep: its model, its step count and the FLOPs it will spend."""

    run_id: str
    budget: float
    family: str
    shape: Shape
    overrides: dict[str, Any]
    steps: int
    flops_per_step: int
    params: int
    non_embedding_params: int
    forward_flops_per_token: float
    seed: int = 0
    tags: tuple[str, ...] = ()
    lr: float | None = None  # peak learning rate; None: the sweep's ``SweepSettings.lr``

    @property
    def train_flops(self) -> int:
        return self.steps * self.flops_per_step

    @property
    def core_params(self) -> int:
        """Parameters of the transformer without routers and predictors (the dense twin's): the
        model's size when comparing dense and MoD shapes."""
        from modlm.flops import param_count

        return param_count(self.model_config().dense_twin())

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_name("tiny", **self.overrides)

    def train_config(self, settings: SweepSettings, out_dir: str | Path):
        """The TrainConfig of this run: cosine over exactly ``steps`` steps, checkpoints for resume."""
        from modlm.training.config import TrainConfig

        warmup = min(200, max(10, round(settings.warmup_frac * self.steps)), self.steps)
        lr = settings.lr if self.lr is None else self.lr
        return TrainConfig(
            model="tiny",
            model_overrides=dict(self.overrides),
            data=settings.data,
            cache_dir=settings.cache_dir,
            tokenizer=settings.tokenizer_path(),
            out_dir=str(out_dir),
            batch_size=settings.batch_size,
            seq_len=settings.seq_len,
            max_steps=self.steps,
            lr=lr,
            min_lr=lr * settings.min_lr_ratio,
            warmup_steps=warmup,
            weight_decay=settings.weight_decay,
            eval_interval=max(1, math.ceil(self.steps / settings.evals_per_run)),
            eval_batches=settings.eval_batches,
            ckpt_interval=max(1, math.ceil(self.steps / settings.ckpts_per_run)),
            log_interval=max(1, self.steps // settings.log_points),
            seed=self.seed,
            split_seed=settings.split_seed,
            compile=settings.compile,
            device=settings.device,
            dtype=settings.dtype,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlannedRun:
        """Inverse of ``as_dict``."""
        return cls(
            run_id=d["run_id"],
            budget=d["budget"],
            family=d["family"],
            shape=Shape(**d["shape"]),
            overrides=dict(d["overrides"]),
            steps=d["steps"],
            flops_per_step=d["flops_per_step"],
            params=d["params"],
            non_embedding_params=d["non_embedding_params"],
            forward_flops_per_token=d["forward_flops_per_token"],
            seed=d["seed"],
            tags=tuple(d["tags"]),
            lr=d.get("lr"),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "budget": self.budget,
            "family": self.family,
            "shape": {"d_model": self.shape.d_model, "n_layers": self.shape.n_layers},
            "overrides": self.overrides,
            "steps": self.steps,
            "flops_per_step": self.flops_per_step,
            "train_flops": self.train_flops,
            "params": self.params,
            "non_embedding_params": self.non_embedding_params,
            "core_params": self.core_params,
            "forward_flops_per_token": self.forward_flops_per_token,
            "seed": self.seed,
            "tags": list(self.tags),
            "lr": self.lr,
        }


def plan_run(
    budget: float,
    family: Family | str,
    shape: Shape,
    settings: SweepSettings,
    tags: Iterable[str] = (),
    seed: int | None = None,
    lr: float | None = None,
    max_steps: int | None = None,
) -> PlannedRun:
    """The run of ``shape`` in ``family`` that spends ``budget`` training FLOPs (to within 1%).

    ``seed`` (None: ``settings.seed``) and ``lr`` (None: ``settings.lr``) make repeats and
    learning-rate trials; a seed other than the base one and an explicit lr are part of the run
    id. ``max_steps`` (None: ``settings.max_steps``) bounds the step count.

    Raises ValueError when no step count in [min_steps, max_steps] lands within 1% of the budget.
    """
    from modlm.flops import flops, param_count

    fam = Family.parse(family) if isinstance(family, str) else family
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget={budget!r} is invalid: must be a positive number of FLOPs")
    over = model_overrides(shape, fam, settings)
    cfg = ModelConfig.from_name("tiny", **over)
    rep = flops(cfg, settings.seq_len)
    fps = settings.batch_size * rep.train
    steps = round(budget / fps)
    top = settings.max_steps if max_steps is None else max_steps
    if not settings.min_steps <= steps <= top:
        raise ValueError(
            f"{fam.label} {shape.name} at {format_budget(budget)} FLOPs needs {steps} steps of "
            f"{fps:.3g} FLOPs: outside [min_steps={settings.min_steps}, max_steps={top}]"
        )
    if abs(steps * fps - budget) > BUDGET_TOLERANCE * budget:  # cannot happen for steps >= 50; kept as a guard
        raise ValueError(f"{fam.label} {shape.name}: {steps} steps miss the budget {budget:.3g} by more than 1%")
    run_id = f"B{format_budget(budget)}-{fam.slug}-{shape.name}"
    if lr is not None:
        run_id += f"-lr{lr:g}"
    seed = settings.seed if seed is None else seed
    if seed != settings.seed:
        run_id += f"-s{seed}"
    return PlannedRun(
        run_id=run_id,
        budget=float(budget),
        family=fam.label,
        shape=shape,
        overrides=over,
        steps=steps,
        flops_per_step=fps,
        params=param_count(cfg),
        non_embedding_params=param_count(cfg, True),
        forward_flops_per_token=rep.forward_per_token,
        seed=seed,
        tags=tuple(tags),
        lr=None if lr is None else float(lr),
    )


def plan_sweep(
    budgets: Sequence[float],
    families: Sequence[Family | str],
    shapes: Sequence[Shape],
    settings: SweepSettings,
    tags: Iterable[str] = ("isoflop",),
) -> list[PlannedRun]:
    """Every (budget, family, shape) whose step count lies in [min_steps, max_steps].

    Shapes that would train for too few or too many steps at a budget are left out of that
    budget's grid (a note says so when none is left for a budget and family).
    """
    runs: list[PlannedRun] = []
    for budget in budgets:
        for family in families:
            kept = []
            for shape in shapes:
                try:
                    kept.append(plan_run(budget, family, shape, settings, tags=tags))
                except ValueError as e:
                    if "outside [min_steps" not in str(e):
                        raise
            if not kept:
                label = family if isinstance(family, str) else family.label
                raise ValueError(
                    f"no shape of the grid trains {label} for between {settings.min_steps} and "
                    f"{settings.max_steps} steps at {format_budget(budget)} FLOPs; add shapes or "
                    f"change the budget"
                )
            runs.extend(kept)
    return merge_plans(runs)


def merge_plans(*plans: Iterable[PlannedRun]) -> list[PlannedRun]:
    """Concatenate plans; a run planned twice (same run_id) is kept once with the union of its tags."""
    merged: dict[str, PlannedRun] = {}
    for plan in plans:
        for run in plan:
            if run.run_id in merged:
                old = merged[run.run_id]
                if (old.overrides, old.steps, old.seed, old.lr) != (run.overrides, run.steps, run.seed, run.lr):
                    raise ValueError(f"run {run.run_id} is planned twice with different settings")
                tags = tuple(dict.fromkeys(old.tags + run.tags))
                merged[run.run_id] = dataclasses.replace(old, tags=tags)
            else:
                merged[run.run_id] = run
    return list(merged.values())


def train_tokens(settings: SweepSettings) -> int:
    """Size of the training split (tokens) that every run of ``settings`` draws from; 0 if the
    corpus cannot be read. For the epochs a run makes over its data."""
    try:
        from modlm.training.corpus import prepare_corpus  # cached after the first call
        from modlm.training.tokenizers import load_tokenizer

        tok = load_tokenizer(settings.tokenizer_path())
        return len(
            prepare_corpus(settings.data, cache_dir=settings.cache_dir, seed=settings.split_seed, tokenizer=tok).train
        )
    except (OSError, ValueError):
        return 0


# ---------------------------------------------------------------------------------------------
# Results of a sweep
# ---------------------------------------------------------------------------------------------


def isoflop_curves(records: Sequence[dict[str, Any]]) -> dict[tuple[float, str], list[dict[str, Any]]]:
    """The measured runs of every isoFLOP curve: {(budget, family): records with a val loss}, in
    record order. Callers choose the records (e.g. only those tagged "isoflop")."""
    curves: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for r in records:
        if r.get("val_loss") is not None:
            curves.setdefault((r["budget"], r["family"]), []).append(r)
    return curves


def isoflop_optima(records: Sequence[dict[str, Any]]) -> dict[tuple[float, str], dict[str, Any]]:
    """The isoFLOP-optimal record (lowest final val loss; the first of equals) of every (budget, family)."""
    return {key: min(recs, key=lambda r: r["val_loss"]) for key, recs in isoflop_curves(records).items()}


# ---------------------------------------------------------------------------------------------
# Command line (wired into modlm.cli as `modlm isoflop`)
# ---------------------------------------------------------------------------------------------

DEFAULT_SHAPES = "64x2,64x4,96x4,128x4,128x6,160x6,192x6,192x8"
# The flags of add_settings_args that are SweepSettings fields (dest names).
SETTINGS_FLAGS = (
    "seq_len",
    "batch_size",
    "lr",
    "init_gain",
    "compile",
    "head_dim",
    "min_steps",
    "max_steps",
    "eval_batches",
    "seed",
    "split_seed",
    "data",
    "cache_dir",
    "tokenizer",
    "device",
    "dtype",
)


def parse_floats(text: str) -> list[float]:
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 1e12,4e12") from None
    if not vals or any(not (math.isfinite(v) and v > 0) for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: budgets must be positive numbers of FLOPs")
    return vals


def add_settings_args(parser: argparse.ArgumentParser) -> None:
    """Flags for SweepSettings (shared by `modlm isoflop` and `modlm reproduce`)."""
    d = SweepSettings()
    g = parser.add_argument_group("training of each run")
    g.add_argument("--seq-len", type=int, default=None, help=f"tokens per sequence (default: {d.seq_len})")
    g.add_argument("--batch-size", type=int, default=None, help=f"sequences per step (default: {d.batch_size})")
    g.add_argument("--lr", type=float, default=None, help=f"peak learning rate, cosine to lr/10 (default: {d.lr})")
    g.add_argument(
        "--compile",
        action="store_const",
        const=True,
        default=None,
        help="torch.compile each run's model (pays off for runs of several minutes: on the default scale's CPU "
        "runs a compiled step is ~1.15x faster, after ~36 s of compiling)",
    )
    g.add_argument(
        "--init-gain",
        type=float,
        default=None,
        help=f"weights drawn with std INIT_GAIN / sqrt(width) (default: the scale's; isoflop: {d.init_gain:g}, "
        "GPT-2's 0.02 at width 768)",
    )
    g.add_argument(
        "--head-dim", type=int, default=None, help=f"head size; heads = width / head size (default: {d.head_dim})"
    )
    g.add_argument(
        "--min-steps", type=int, default=None, help=f"leave out runs with fewer steps (default: {d.min_steps})"
    )
    g.add_argument(
        "--max-steps", type=int, default=None, help=f"leave out runs with more steps (default: {d.max_steps})"
    )
    g.add_argument(
        "--eval-batches",
        type=int,
        default=None,
        help=f"validation batches at the end of a run (default: {d.eval_batches})",
    )
    g.add_argument(
        "--seed", type=int, default=None, help=f"base seed of init and data order of every run (default: {d.seed})"
    )
    g.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help=f"seed of the train/val document split, the same for every run (default: {d.split_seed})",
    )
    g.add_argument(
        "--data", default=None, help="'enwiki' (default: the bundled Wikipedia sample), a text file or a folder"
    )
    g.add_argument("--cache-dir", default=None, help="token cache root (default: $MODLM_CACHE or ~/.cache/modlm)")
    g.add_argument(
        "--tokenizer",
        default=None,
        metavar="byte|bpe:N|PATH",
        help="byte (UTF-8 bytes), bpe:N (a byte-level BPE of N ids, e.g. bpe:4096, learned on the training "
        "split and cached beside the data) or a tokenizer.json (default: the scale's; isoflop: byte)",
    )
    g.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: auto)")
    g.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default=None, help="autocast dtype (default: auto)")
    # Threads per run, the one policy of every command: a second core does more as a second run (--jobs).
    from modlm.devices import add_threads_arg  # here: it imports torch, and this module does not

    add_threads_arg(g)
    g.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs trained at once, each in its own process (default: 1 for isoflop, the scale's for "
        "reproduce: 2 for the default scale, made for a free 2-core CPU)",
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def settings_from_args(args: argparse.Namespace, base: SweepSettings | None = None) -> SweepSettings:
    """``base`` (default: SweepSettings()) with the settings flags given on the command line."""
    base = base or SweepSettings()
    changes = {n: getattr(args, n) for n in SETTINGS_FLAGS if getattr(args, n, None) is not None}
    return base.replace(**changes)


def resolve_jobs(jobs: int | None, default: int = 1) -> int:
    """``--jobs`` (None: ``default``), refusing a count below one with a line naming it."""
    jobs = default if jobs is None else jobs
    if not is_int(jobs) or jobs < 1:
        raise ValueError(f"--jobs={jobs!r} is invalid: must be an int >= 1 (runs trained at once)")
    return jobs


def apply_threads(threads: int) -> int:
    """Set torch's CPU threads for the runs trained in this process (``modlm.devices.set_threads``:
    0 is torch's default); returns the count now in use, which worker processes get too."""
    import torch

    from modlm.devices import set_threads

    set_threads(threads)
    return torch.get_num_threads()
