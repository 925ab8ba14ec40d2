"""What `modlm reproduce` trains: the variants of one shape, the scales, and the plan of a scale.

A plan holds the isoFLOP grid of every budget (dense and MoD) and the variants of one shape at
one budget (experiments 1 and 2 of ``modlm.experiments.reproduce``); the other experiments read
these runs back. A run both need is planned once, with both tags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from modlm.experiments.isoflop import (
    DEFAULT_SHAPES,
    PlannedRun,
    Shape,
    SweepSettings,
    merge_plans,
    parse_shapes,
    plan_run,
    plan_sweep,
)


@dataclass(frozen=True)
class Variant:
    """One model of the variant comparison: a key (used in tags), a family spec and a label."""

    key: str
    family: str
    label: str


VARIANTS: tuple[Variant, ...] = (
    Variant("dense", "dense", "dense, same shape"),
    Variant("mod", "mod", "MoD 12.5%, every other block (reference)"),
    Variant("cap0.25", "mod:capacity=0.25", "MoD 25%, every other block"),
    Variant("cap0.5", "mod:capacity=0.5", "MoD 50%, every other block"),
    Variant("cap0.95", "mod:capacity=0.95", "MoD 95%, every other block"),
    Variant("every-block", "mod:route_every=1,route_start=0", "MoD 12.5%, every block"),
    Variant("random", "mod-random", "random routing 12.5%, every other block"),
    Variant("random0.5", "mod-random:capacity=0.5", "random routing 50%, every other block"),
    Variant("token-choice", "mod-tc", "token choice 12.5% (+ balancing loss), every other block"),
    Variant("aux-loss", "mod:causal_routing=aux_loss", "MoD 12.5%, aux-loss causal routing"),
    # A-MoD (arXiv 2412.20875) from scratch: routing by the attention received in the previous
    # block, no router parameters; at the same training FLOPs as "mod" (its recomputed attention
    # scores are counted, so it gets slightly fewer steps).
    Variant("amod", "mod:router=attention", "A-MoD 12.5% (attention-based routing), every other block"),
)
VARIANT_BY_KEY = {v.key: v for v in VARIANTS}


@dataclass(frozen=True)
class Scale:
    """Everything that sizes a reproduction."""

    name: str
    description: str
    budgets: tuple[float, ...]  # isoFLOP budgets (training FLOPs per run)
    shapes: tuple[Shape, ...]  # the isoFLOP grid (widths x depths)
    variant_budget: float
    variant_shape: Shape
    settings: SweepSettings
    analysis_sequences: int = 64  # validation sequences for the routing analysis
    heatmap_tokens: int = 96  # tokens shown in the routing heatmap
    jobs: int = 1  # runs trained at once by default (one process each)


# About an hour on a free 2-core CPU with its 2 jobs (`--dry-run` measures and prints the
# estimate for the machine it runs on): 47 runs, 2.4e14 training FLOPs. Its grid is the
# `modlm isoflop` default.
_DEFAULT = Scale(
    name="default",
    description="about an hour on a free 2-core CPU (2 runs at once); models of 0.1M-3.6M "
    "parameters, byte-level enwiki",
    budgets=(1.2e12, 3.6e12, 1.08e13),
    shapes=parse_shapes(DEFAULT_SHAPES),
    variant_budget=3.6e12,
    variant_shape=Shape(128, 4),
    settings=SweepSettings(
        seq_len=128,
        batch_size=16,
        head_dim=32,
        predictor_hidden=32,
        min_steps=60,
        max_steps=3000,
        eval_batches=32,
        lr=2e-3,
    ),
    jobs=2,
)

SCALES: dict[str, Scale] = {
    # Seconds: for tests and for trying the pipeline. The numbers mean nothing.
    "tiny": Scale(
        name="tiny",
        description="pipeline check in seconds; models of 10^4 parameters, numbers meaningless",
        budgets=(6e8, 9e8),
        shapes=parse_shapes("16x2,16x4"),
        variant_budget=6e8,
        variant_shape=Shape(16, 2),
        settings=SweepSettings(
            seq_len=32,
            batch_size=4,
            head_dim=8,
            predictor_hidden=8,
            min_steps=50,
            max_steps=600,
            eval_batches=2,
            ckpts_per_run=2,
            log_points=10,
            lr=3e-3,
        ),
        analysis_sequences=8,
        heatmap_tokens=32,
    ),
    "default": _DEFAULT,
    # The default's grid, variants and settings at its two smaller budgets: ~0.44 of its FLOPs,
    # about 25 minutes on a free 2-core CPU. Runs are shared with "default" when they use the
    # same --results-dir, so a quick study can later be extended to the full one.
    "quick": dataclasses.replace(
        _DEFAULT,
        name="quick",
        description="about 25 minutes on a free 2-core CPU (2 runs at once): the default grid "
        "at its two smaller budgets",
        budgets=_DEFAULT.budgets[:2],
    ),
    # A GPU: bigger models and sequences, bf16. NOTE: the bundled corpus is 2.7M bytes; at these
    # budgets it is repeated many times. Pass --data with a larger corpus for meaningful numbers.
    "gpu": Scale(
        name="gpu",
        description="one GPU, a few hours; models of 2M-60M parameters (use --data with a large corpus)",
        budgets=(1e15, 4e15, 1.6e16),
        shapes=parse_shapes("128x4,192x6,256x6,256x8,384x8,512x8,512x12,768x12"),
        variant_budget=4e15,
        variant_shape=Shape(256, 8),
        settings=SweepSettings(
            seq_len=512,
            batch_size=32,
            head_dim=64,
            predictor_hidden=64,
            min_steps=200,
            max_steps=20000,
            eval_batches=64,
            lr=1.5e-3,
            dtype="auto",
        ),
        analysis_sequences=128,
    ),
}


def plan_reproduction(scale: Scale, settings: SweepSettings | None = None) -> list[PlannedRun]:
    """Every run the claims need; a run shared by two experiments is trained once (tags merged)."""
    s = settings or scale.settings
    iso = plan_sweep(scale.budgets, ["dense", "mod"], scale.shapes, s, tags=("isoflop",))
    variants = [
        plan_run(scale.variant_budget, v.family, scale.variant_shape, s, tags=(f"variant:{v.key}",)) for v in VARIANTS
    ]
    return merge_plans(iso, variants)
