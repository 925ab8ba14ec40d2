"""The training run's one typed config, its learning-rate schedule, random-stream seeds and its
command-line flags (shared by ``python -m modlm.training`` and ``modlm train``): one flag per
field, its type, default and help declared with the field (``modlm.spec.fields.flag``), so the
two cannot drift.

No torch import: ``modlm --help`` and config validation import this module and should stay
instant (as modlm.config does).

Batch size semantics: ``batch_size`` sequences per micro-step per rank, so one optimizer step
sees ``batch_size * grad_accum * world_size`` sequences of ``seq_len`` tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

from modlm.config import ModelConfig, preset_names
from modlm.spec.fields import (
    add_field_flags,
    conforms,
    dataclass_from_dict,
    describe_type,
    field_types,
    flag,
    parse_assignments,
)
from modlm.spec.routers import NO_ROUTER, router_names
from modlm.validation import require

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16")
# modlm.training.distributed.STRATEGIES, plus "auto" (DDP under torchrun); named here so that
# validating a config imports no torch (a test keeps the two in step).
PARALLEL = ("auto", "none", "ddp", "fsdp")
# Where metrics go besides metrics.jsonl (always written): nothing else, or TensorBoard too.
LOGGERS = ("jsonl", "tensorboard")
# Counts and seeds stay below 2**63: they travel as int64 (torch, numpy) and in JSON.
MAX_INT = 2**63


def _require(cond: bool, name: str, value: Any, allowed: str) -> None:
    require(cond, "TrainConfig", name, value, allowed)


# The groups of ``add_train_args``'s help, in order; each flag-bearing field names its own.
FLAG_GROUPS = ("model", "data", "optimisation", "run")
# The default sequence length, when the model allows it (``TrainConfig.seq_len``).
DEFAULT_SEQ_LEN = 256


@dataclass
class TrainConfig:
    """Everything a training run needs besides ``resume`` and ``progress``.

    The model is a preset (``ModelConfig.from_name``; ``<preset>-dense`` for the dense twin)
    with ``model_overrides`` applied on top (any ModelConfig field, e.g. router, capacity).
    Each field but ``model_overrides`` is a flag of ``add_train_args``, its help in the field.
    """

    model: str = flag("small", "model", "preset: {presets}")
    model_overrides: dict[str, Any] = field(default_factory=dict)  # flags --router, --capacity, --model-arg
    # None / "enwiki": the bundled Wikipedia sample; else a text file or folder.
    data: str | None = flag(
        None,
        "data",
        "'enwiki' (the bundled Wikipedia sample), a folder of *.txt/*.md/*.text files (one document each) or one "
        "UTF-8 text file (cut into ~20k-character documents at blank lines, or line ends)",
        shown="enwiki",
    )
    cache_dir: str | None = flag(None, "data", "token cache root", shown="$MODLM_CACHE or ~/.cache/modlm")
    # None / "byte": UTF-8 bytes; else a Hugging Face tokenizer.json (or its folder).
    tokenizer: str | None = flag(
        None,
        "data",
        "a Hugging Face tokenizer.json (or its folder). The model's vocab_size follows it, and checkpoints carry "
        "it, so `modlm generate` decodes with it",
        shown="UTF-8 bytes",
        metavar="PATH",
    )
    val_fraction: float = flag(0.05, "data", "held-out share")
    out_dir: str = flag("runs/mod", "run", "metrics.jsonl and checkpoints/ go here")
    batch_size: int = flag(16, "optimisation", "sequences per micro-step per rank")
    # None: min(DEFAULT_SEQ_LEN, the model's max_seq_len), so every preset trains with defaults
    # only; a seq_len given is refused beyond max_seq_len.
    seq_len: int | None = flag(
        None, "optimisation", "tokens per sequence", shown=f"min({DEFAULT_SEQ_LEN}, the model's max_seq_len)"
    )
    grad_accum: int = flag(1, "optimisation", "micro-steps per optimizer step")
    max_steps: int = flag(2000, "optimisation", "optimizer steps")
    lr: float = flag(1e-3, "optimisation", "peak learning rate")
    min_lr: float = flag(1e-4, "optimisation", "learning rate at the end of the cosine")
    warmup_steps: int | None = flag(
        None, "optimisation", "linear warmup steps", shown="min(100, max_steps // 10)"
    )  # None: min(100, max_steps // 10)
    weight_decay: float = flag(0.1, "optimisation", "AdamW decay of matrices")
    beta1: float = flag(0.9, "optimisation", "AdamW beta1")
    beta2: float = flag(0.95, "optimisation", "AdamW beta2")
    grad_clip: float = flag(1.0, "optimisation", "max grad norm, 0 = off")  # 0 disables clipping
    eval_interval: int = flag(200, "run", "steps between evaluations")
    eval_batches: int = flag(20, "run", "validation batches per evaluation")
    ckpt_interval: int = flag(500, "run", "steps between checkpoints")
    log_interval: int = flag(10, "run", "steps between metric lines")
    seed: int = flag(0, "run", "seed of init, data order and random routing")
    # Seed of the train/val document split; None: ``seed``. Repeating a run with other seeds
    # (init, data order) but the same split keeps its validation set and token cache.
    split_seed: int | None = flag(None, "run", "seed of the train/val document split", shown="the --seed")
    device: str = flag("auto", "run", "auto | cpu | cuda | cuda:N")
    # auto: bf16 on CUDA with bf16 support, else fp32.
    dtype: str = flag("auto", "run", "autocast dtype; auto = bf16 on CUDA if supported", choices=DTYPES)
    # Wall-clock budget of this invocation: stop, save, exit 0.
    max_time_s: float | None = flag(None, "run", "wall-clock budget in seconds: stop, checkpoint, exit 0", shown="none")
    compile: bool = flag(
        False,
        "run",
        "torch.compile the model (inductor: C++ on CPU, Triton on CUDA) for training and top-k evaluation; the "
        "first step pays a one-off compile (about a minute on CPU). Causal-routing evaluation stays eager: its "
        "per-row token counts are data-dependent",
    )
    parallel: str = flag(
        "auto",
        "run",
        "under torchrun: ddp (every rank holds all weights) or fsdp (FSDP2 fully_shard per block, then the root: "
        "weights, gradients and AdamW state split over the ranks; bf16 gather / fp32 reduce on CUDA); auto = ddp; "
        "none is refused there (unsynchronised copies). A single process ignores it",
        choices=PARALLEL,
    )
    activation_checkpointing: bool = flag(
        False,
        "run",
        "recompute each block's attention and MLP in the backward pass instead of storing their activations (the "
        "routing runs once): less memory, about one more forward of compute; same numbers",
    )
    log: str = flag(
        "jsonl",
        "run",
        "tensorboard: also write OUT_DIR/tensorboard (the scalars of metrics.jsonl and a routing heatmap per "
        "evaluation; needs the tb extra: pip install 'modlm[tb]'). metrics.jsonl is always written",
        choices=LOGGERS,
    )
    # This invocation only (like max_time_s): continue a finished run for this many more steps
    # (a new warmup + cosine over them; ``Trainer._plan_stretch``). Implies resuming.
    more_steps: int | None = flag(
        None,
        "run",
        "implies --resume: a run that reached its max steps trains N more (a new warmup to --lr, then a cosine to "
        "--min-lr over the N steps); a run stopped early first finishes its planned steps",
        shown="none",
        metavar="N",
    )
    # torch CPU threads of each process (0: torch's default). The policy, its flag and its
    # default are modlm.devices' (THREADS_DEFAULT, not imported: it imports torch; a test keeps
    # the two in step); the commands apply it (``modlm.training.trainer.train_command``).
    threads: int = field(default=1, metadata={"group": "run", "flag": "modlm.devices.add_threads_arg"})

    def __post_init__(self) -> None:
        # Every field against its declared type first (an int is never a bool, a float is
        # finite), so the range checks only ever see values of the right kind.
        for name, declared in field_types(TrainConfig).items():
            value = getattr(self, name)
            _require(conforms(value, declared), name, value, f"must be {describe_type(declared)}")
        if self.warmup_steps is None:
            self.warmup_steps = min(100, self.max_steps // 10)
        self._check_ranges()
        mcfg = self.model_config()  # ModelConfig validates the overrides (one-line ValueError)
        if self.seq_len is None:  # the default follows the model; only a seq_len given is refused
            self.seq_len = min(DEFAULT_SEQ_LEN, mcfg.max_seq_len)
        _require(
            self.seq_len <= mcfg.max_seq_len,
            "seq_len",
            self.seq_len,
            f"must be <= the model's max_seq_len={mcfg.max_seq_len} (raise it with --model-arg max_seq_len=N)",
        )

    def _check_ranges(self) -> None:
        """Each field within its range (types are already checked): one-line ValueError naming it."""
        presets = preset_names()
        _require(self.model in presets, "model", self.model, f"must be a preset: {', '.join(presets)}")
        known = sorted({f.name for f in dataclasses.fields(ModelConfig) if f.init} - {"name"})
        unknown = sorted(set(self.model_overrides) - set(known))
        _require(not unknown, "model_overrides", unknown, f"unknown ModelConfig field(s); known: {', '.join(known)}")
        for name in ("data", "cache_dir", "tokenizer"):
            _require(getattr(self, name) != "", name, "", "must be None or a non-empty path")
        _require(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "must be in (0, 1)")
        _require(self.out_dir != "", "out_dir", self.out_dir, "must be a non-empty path")
        for name in _COUNTS:
            value = getattr(self, name)
            if value is not None:  # only seq_len may be None here: it is resolved from the model next
                _require(1 <= value < MAX_INT, name, value, "must be an int in [1, 2**63)")
        _require(
            self.more_steps is None or 1 <= self.more_steps < MAX_INT,
            "more_steps",
            self.more_steps,
            "must be None or an int in [1, 2**63)",
        )
        _require(self.lr > 0, "lr", self.lr, "must be a finite number > 0")
        _require(0 <= self.min_lr <= self.lr, "min_lr", self.min_lr, f"must be in [0, lr={self.lr}]")
        _require(
            0 <= self.warmup_steps <= self.max_steps,
            "warmup_steps",
            self.warmup_steps,
            f"must be an int in [0, max_steps={self.max_steps}]",
        )
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        _require(0 <= self.beta1 < 1, "beta1", self.beta1, "must be in [0, 1)")
        _require(0 <= self.beta2 < 1, "beta2", self.beta2, "must be in [0, 1)")
        _require(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")
        _require(0 <= self.seed < MAX_INT, "seed", self.seed, "must be an int in [0, 2**63)")
        _require(
            self.split_seed is None or 0 <= self.split_seed < MAX_INT,
            "split_seed",
            self.split_seed,
            "must be None or an int in [0, 2**63)",
        )
        _require(
            self.device in DEVICES or _is_cuda_index(self.device),
            "device",
            self.device,
            f"must be one of {DEVICES} or 'cuda:N'",
        )
        _require(self.dtype in DTYPES, "dtype", self.dtype, f"must be one of {DTYPES}")
        _require(self.parallel in PARALLEL, "parallel", self.parallel, f"must be one of {PARALLEL}")
        _require(self.log in LOGGERS, "log", self.log, f"must be one of {LOGGERS}")
        # The words of modlm.devices.set_threads, which applies it.
        _require(self.threads >= 0, "threads", self.threads, "must be >= 1 (or 0 for torch's default, one per core)")
        _require(
            self.max_time_s is None or self.max_time_s > 0,
            "max_time_s",
            self.max_time_s,
            "must be None or a number of seconds > 0",
        )

    def model_config(self) -> ModelConfig:
        """The resolved, validated ModelConfig: the preset with ``model_overrides`` applied.

        With a Hugging Face ``tokenizer`` the vocabulary follows it unless ``vocab_size`` is
        overridden (the byte presets have 256 ids)."""
        overrides = dict(self.model_overrides)
        if self.tokenizer not in (None, "byte") and "vocab_size" not in overrides:
            from modlm.training.tokenizers import load_tokenizer

            overrides["vocab_size"] = load_tokenizer(self.tokenizer).vocab_size
        return ModelConfig.from_name(self.model, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Every field, except ``more_steps`` when not given: it is an instruction to one
        invocation, not a setting of the run, so records written before it existed (a sweep's
        runs.jsonl compares them) still match."""
        d = dataclasses.asdict(self)
        if d["more_steps"] is None:
            del d["more_steps"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, d)


# The int fields that count something (steps, sequences, tokens, batches): all >= 1.
_COUNTS = (
    "batch_size",
    "seq_len",
    "grad_accum",
    "max_steps",
    "eval_interval",
    "eval_batches",
    "ckpt_interval",
    "log_interval",
)


def _is_cuda_index(device: str) -> bool:
    head, _, idx = device.partition(":")
    return head == "cuda" and idx.isdigit()


def lr_at(step: int, cfg: TrainConfig, start: int = 0) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of a schedule that begins at ``start``.

    Linear warmup to ``lr`` over ``warmup_steps`` (step ``start`` already gets lr / warmup_steps,
    never 0), then a cosine from ``lr`` at ``start + warmup_steps`` down to ``min_lr`` at
    ``max_steps``; ``min_lr`` from there on. ``start`` is 0 for a run's first stretch and the
    step a ``--more-steps`` continuation began at for a later one.
    """
    s = max(0, step - start)
    if s < cfg.warmup_steps:
        return cfg.lr * (s + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    progress = (s - cfg.warmup_steps) / (cfg.max_steps - start - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def stream_seed(seed: int, rank: int, stream: str) -> int:
    """A 63-bit seed for one random stream of one rank, decorrelated from the others."""
    digest = hashlib.sha256(f"modlm/{seed}/{rank}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --------------------------------------------------------------------------------------------
# Command line (shared with `modlm train`)
# --------------------------------------------------------------------------------------------


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the training flags, one per TrainConfig field (``modlm.spec.fields.add_field_flags``), plus --config,
    the model overrides (--router, --capacity, --model-arg), --resume and --no-progress."""
    first_new_action = len(parser._actions)
    g = parser.add_argument_group("run file")
    g.add_argument(
        "--config",
        default=None,
        metavar="RUN.TOML",
        help="read settings from a TOML run file (TrainConfig fields by name, ModelConfig overrides in a "
        "[model_overrides] table); flags given here override it. Every run writes its resolved settings to "
        "OUT_DIR/run.toml, which --resume reads back (below this file and the flags) (default: none)",
    )
    groups = {name: parser.add_argument_group(name) for name in FLAG_GROUPS}
    special = {"modlm.devices.add_threads_arg": _threads_flag}
    add_field_flags(TrainConfig, parser, groups, special, fmt={"presets": ", ".join(preset_names())})
    g = groups["model"]
    g.add_argument(
        "--router",
        choices=(*router_names(), NO_ROUTER),
        default=None,
        help="override the preset's router (none = dense) (default: the preset's)",
    )
    g.add_argument(
        "--capacity",
        type=float,
        default=None,
        help="override the fraction of tokens a routed block processes (default: the preset's)",
    )
    g.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any ModelConfig field, read by its type: d_model=128, tie_embeddings=false, "
        "n_kv_heads=none, layer_types=dense,routed,... (repeatable; default: the preset's fields)",
    )
    g = groups["run"]
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT_DIR/checkpoints/latest (fresh start if none), with the settings of OUT_DIR/run.toml "
        "under --config and the flags given (default: off)",
    )
    g.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar: one line per log event (the default when stdout or stderr is not a terminal)",
    )
    _record_given(parser, first_new_action)
    return parser


def _threads_flag(target: Any, f: dataclasses.Field) -> None:
    """The one --threads of every command (``modlm.devices`` imports torch; this module stays torch-free)."""
    from modlm.devices import add_threads_arg

    add_threads_arg(target, default=f.default)


# The Namespace attribute listing the destinations of the flags given on the command line.
GIVEN = "_given_flags"


@functools.cache
def _recording(cls: type) -> type:
    """``cls`` (an argparse Action class) that also notes its destination in ``GIVEN``: only
    flags actually given run their action, which is how a flag is told from its default."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = set(getattr(namespace, GIVEN, ()))
        given.add(self.dest)
        setattr(namespace, GIVEN, given)
        cls.__call__(self, parser, namespace, values, option_string)

    return type(f"Recorded{cls.__name__}", (cls,), {"__call__": __call__})


def _record_given(parser: argparse.ArgumentParser, first: int) -> None:
    # NOTE: ``_actions`` is argparse's list of the parser's actions (private, stable for decades);
    # re-classing the ones added here is how the run-file layering sees which flags were given.
    for action in parser._actions[first:]:
        action.__class__ = _recording(type(action))


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed ``add_train_args`` flags (raises the one-line ValueError of bad values).

    Layered (``modlm.training.runfile.layered_settings``): TrainConfig's defaults, then the run
    directory's resolved ``run.toml`` when resuming, then the ``--config`` file, then the flags
    given on the command line. A Namespace not made by ``add_train_args``'s parser (no record of
    given flags) counts every attribute as given."""
    from modlm.training.runfile import OVERRIDES_TABLE, layered_settings

    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"model_overrides"}
    recorded = getattr(args, GIVEN, None)
    given_names = set(vars(args)) if recorded is None and not hasattr(args, "config") else set(recorded or ())
    given: dict[str, Any] = {name: getattr(args, name) for name in names & given_names}
    # Each value is read by its ModelConfig field's declared type: tie_embeddings=false is False.
    overrides = parse_assignments(args.model_arg or [], "--model-arg", into=ModelConfig)
    if args.router is not None:
        overrides["router"] = args.router
    if args.capacity is not None:
        overrides["capacity"] = args.capacity
    given[OVERRIDES_TABLE] = overrides
    resume = bool(getattr(args, "resume", False)) or given.get("more_steps") is not None
    settings = layered_settings(
        given, field_types(TrainConfig), getattr(args, "config", None), resume, TrainConfig.out_dir
    )
    return TrainConfig(**settings)
