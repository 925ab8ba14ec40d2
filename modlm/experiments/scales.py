"""What `modlm reproduce` trains: the variants of one shape, the scales, and the plan of a scale.

A scale holds the isoFLOP study of every budget (dense and MoD: an adaptive, bracketed sweep
over a shape ladder with seeds and a learning rate per family, ``modlm.experiments.study``) and
the variants of one shape at one budget (experiments 1 and 2 of ``modlm.experiments.reproduce``);
the other experiments read these runs back. A run both need is planned once, with both tags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from modlm.experiments.isoflop import (
    PlannedRun,
    Shape,
    SweepSettings,
    parse_shapes,
    plan_run,
)
from modlm.experiments.study import StudyDesign, expected_plan, family_lr


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
    # MoE and MoDE (claims section 7): MLP FLOP fractions 0.5 and 0.25 by expert capacity (MoE,
    # tokens dropped) or by no-op experts (integrated MoDE: E/(E+no-ops) of the assignments real).
    Variant("moe", "moe", "MoE 4 experts top-1, no drop"),
    Variant("moe-c0.5", "moe:moe_capacity_factor=0.5", "MoE, capacity factor 0.5 (dropping)"),
    Variant("moe-c0.25", "moe:moe_capacity_factor=0.25", "MoE, capacity factor 0.25 (dropping)"),
    Variant("mode-c0.5", "mode-integrated:n_noop_experts=4", "integrated MoDE, 4 real + 4 no-op experts"),
    Variant("mode-c0.25", "mode-integrated:n_noop_experts=12", "integrated MoDE, 4 real + 12 no-op experts"),
    Variant("mode-staged", "mode-staged", "staged MoDE: MoD 12.5% every other block around MoE blocks"),
    # Early exit (claims section 8): calibrated after training to the MoD model's FLOP fraction.
    Variant("early-exit", "early-exit", "early exit (LayerSkip-style exit losses)"),
    # A-MoD (arXiv 2412.20875) from scratch: routing by the attention received in the previous
    # block, no router parameters; at the same training FLOPs as "mod" (its recomputed attention
    # scores are counted, so it gets slightly fewer steps).
    Variant("amod", "mod:router=attention", "A-MoD 12.5% (attention-based routing), every other block"),
    # Skipping that keeps keys (claims section 10): "mod" whose skipped tokens still write their
    # keys and values (FlexiDepth's rule, meant for pretrained models); at the same training FLOPs
    # it pays for those projections and for attention over every key with fewer steps.
    Variant("keys-kept", "keys-kept", "MoD 12.5%, skipped tokens keep keys/values, every other block"),
)
VARIANT_BY_KEY = {v.key: v for v in VARIANTS}


# Shape ladders: each rung has ~1.2-1.6x the parameters of the one before, growing in width and
# depth in turn, so a curve can be extended by one rung on either side.
# Widths below the head size are one head of that width.
LADDER_CPU = "8x2,12x2,16x2,16x3,32x2,32x3,48x3,48x4,64x3,64x4,80x4,96x4,112x5,128x6,160x6,192x6"
LADDER_GPU = "64x4,96x4,128x4,128x6,160x6,192x6,256x6,256x8,320x8,384x8,448x8,512x8,512x10"


@dataclass(frozen=True)
class Scale:
    """Everything that sizes a reproduction."""

    name: str
    description: str
    budgets: tuple[float, ...]  # isoFLOP budgets (training FLOPs per run)
    shapes: tuple[Shape, ...]  # the isoFLOP shape ladder (widths x depths, ordered by parameters)
    variant_budget: float
    variant_shape: Shape
    settings: SweepSettings
    analysis_sequences: int = 64  # validation sequences for the routing analysis
    heatmap_tokens: int = 96  # tokens shown in the routing heatmap
    jobs: int = 1  # runs trained at once by default (one process each)
    # The isoFLOP study (modlm.experiments.study.StudyDesign): seeds of the repeats, the
    # learning rates tried per family (at the middle budget, on the first window's middle shape).
    seeds: tuple[int, ...] = (0, 1, 2)
    lrs: tuple[float, ...] = ()
    window: int = 3
    tokens_per_param: float = 20.0
    max_extensions: int = 4
    # Sustained training FLOP/s and per-step overhead assumed for a `--dry-run` estimate on a
    # machine without the scale's device (a CPU box planning the gpu scale); None: measure here.
    assumed_flops_per_s: float | None = None
    assumed_step_s: float = 0.0
    tokenizer_note: str = ""  # why this scale uses its tokenizer (shown in the report)
    compile_note: str = ""  # why this scale does (not) torch.compile its runs (shown in the report)

    def design(self, base_seed: int = 0) -> StudyDesign:
        """The isoFLOP study of this scale; its seeds counted from ``base_seed`` (``--seed``)."""
        return StudyDesign(
            budgets=self.budgets,
            ladder=self.shapes,
            window=self.window,
            tokens_per_param=self.tokens_per_param,
            seeds=tuple(base_seed + s for s in self.seeds),
            lrs=self.lrs,
            max_extensions=self.max_extensions,
        )


# About an hour on a free 2-core CPU with its 2 jobs. `--dry-run` measures and prints the
# estimate for the machine it runs on: 60 min for the expected 76 runs, 9.9e13 FLOPs. Measured
# (2026-12-02, the committed docs/results): 50 min for 85 runs (the lr sweep went up twice,
# 3 curves grew a rung), then 3 min to retrain the 2 variants that blew up at lr 0.024 (one of
# them twice); each extension adds 0.3-3 min, and the study's rounds leave a core idle while
# the last run of a round finishes. Byte tokens: see tokenizer_note.
# Sequences of 256 bytes: a routed block at 12.5% processes 32 tokens of each.
_DEFAULT = Scale(
    name="default",
    description="about an hour on a free 2-core CPU (2 runs at once); byte-level enwiki, 256-byte "
    "sequences, models of 6K-2.7M parameters on a bracketing shape ladder, 3 seeds",
    budgets=(3e11, 1e12, 3e12),
    shapes=parse_shapes(LADDER_CPU),
    variant_budget=1e12,
    variant_shape=Shape(48, 4),  # near the curves' optima at 1e12, with 2 routed blocks
    settings=SweepSettings(
        seq_len=256,
        batch_size=8,
        head_dim=16,
        predictor_hidden=32,
        min_steps=60,
        # 4000, not 3000: at 3e12 the dense curve's best shape (d32L3) needs its smaller
        # neighbour (d32L2, 3322 steps) to be bracketed.
        max_steps=4000,
        eval_batches=32,
        lr=6e-3,
        init_gain=0.55,
    ),
    jobs=2,
    lrs=(3e-3, 6e-3, 1.2e-2),
    tokenizer_note="Bytes rather than BPE, as closer to the paper's setting where it matters for MoD: at these "
    "widths (16-192) a 4-8k BPE vocabulary would put 20-84% of every model's forward FLOPs in the unembedding, "
    "which no router can skip (bytes: 1-14%), while the paper's models spend nearly all of theirs in the blocks "
    "MoD routes around; it would also cut the 2.7 MB corpus to ~0.75M tokens, repeated by the larger runs. "
    "256-byte sequences give a routed block at 12.5% 32 tokens of each.",
    compile_note="No torch.compile (`--compile` turns it on): measured on d32L3 MoD at 1e12 FLOPs, a compiled "
    "step was 1.15x faster, but compiling took ~36 s per run, more than it saves on these runs of 20-170 s.",
    # Where each curve's first window is centred. Chinchilla's ~20 tokens per parameter is too
    # few for these tiny models: in a check at 3e11 FLOPs (one seed) the best dense run saw ~100
    # tokens per non-embedding parameter and the best MoD run ~35, both at the small end of a
    # window centred on 20. Extensions correct a wrong guess; a good one saves their rounds.
    tokens_per_param=60.0,
)

SCALES: dict[str, Scale] = {
    # Seconds: for tests and for trying the pipeline. The numbers mean nothing.
    "tiny": Scale(
        name="tiny",
        description="pipeline check in seconds; models of 10^4 parameters, numbers meaningless",
        budgets=(8e8,),
        shapes=parse_shapes("8x2,16x2,16x3,16x4,24x4"),
        # 9e8, not 8e8: the early-exit variant's per-layer LM heads (V=256 at d=16) make its steps
        # so costly that a smaller budget would buy it fewer than min_steps.
        variant_budget=9e8,
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
            init_gain=0.55,
        ),
        analysis_sequences=8,
        heatmap_tokens=32,
        lrs=(3e-3, 6e-3, 1.2e-2),
        max_extensions=1,
    ),
    "default": _DEFAULT,
    # The default's ladder, variants and settings at its two smaller budgets (3e11 and 1e12, so
    # the same lr sweep at 1e12): about 25 minutes on a free 2-core CPU (`--dry-run`: 23 min for
    # its expected plan). Runs are shared with "default" when they use the same --results-dir,
    # so a quick study can later be extended to the full one.
    "quick": dataclasses.replace(
        _DEFAULT,
        name="quick",
        description="about 25 minutes on a free 2-core CPU (2 runs at once): the default study "
        "at its two smaller budgets",
        budgets=_DEFAULT.budgets[:2],
    ),
    # One H100/H200, bf16, at most 8 minutes (no GPU was available to measure it: its `--dry-run`
    # estimate on a machine without one assumes 2e14 sustained FLOP/s, ~20% of an H100's dense
    # bf16 peak, plus 4 ms per step of kernel launches; a `--dry-run` on the GPU measures).
    # One budget of 1e15 fits: its curves, seeds and lr sweep are ~20 runs of ~15 s, the variants
    # (at 3e14) 17 of ~5 s, with room for 2 extensions per curve and lr. BPE tokens
    # (4096, learned on the training split): at widths of 128-512 the unembedding is a smaller
    # share of the FLOPs than on the CPU ladder. NOTE: the bundled corpus is 2.7M bytes (~0.75M
    # BPE tokens); these runs repeat it. Pass --data with a larger corpus for meaningful numbers.
    "gpu": Scale(
        name="gpu",
        description="one H100/H200 (bf16), about 8 minutes; BPE-4096 enwiki, 512-token sequences, models "
        "of 1-30M parameters on a bracketing shape ladder, 3 seeds (use --data with a large corpus)",
        budgets=(1e15,),
        shapes=parse_shapes(LADDER_GPU),
        variant_budget=3e14,  # the variants (MoD, MoE, MoDE, early exit...) compare at one shape; 3e14 keeps 8 minutes
        variant_shape=Shape(128, 6),
        settings=SweepSettings(
            seq_len=512,
            batch_size=128,  # 64K tokens per step: fewer steps, so less launch overhead per FLOP
            head_dim=32,
            predictor_hidden=64,
            min_steps=100,
            max_steps=20000,
            eval_batches=8,
            lr=2e-3,
            tokenizer="bpe:4096",
            dtype="auto",
            init_gain=0.55,
        ),
        analysis_sequences=128,
        lrs=(1e-3, 2e-3, 4e-3),
        max_extensions=2,
        assumed_flops_per_s=2e14,
        assumed_step_s=0.004,
        compile_note="No torch.compile (`--compile` turns it on): its runs are ~5-15 s each, shorter than compiling "
        "a model takes (not measured on a GPU).",
        tokenizer_note="BPE (4096, learned on the training split): subword tokens as in the paper; at widths of "
        "64-512 its unembedding is 5-36% of the forward FLOPs.",
    ),
}


def plan_variants(
    scale: Scale, settings: SweepSettings | None = None, lrs: dict[str, float] | None = None
) -> list[PlannedRun]:
    """The variants of ``scale.variant_shape`` at ``variant_budget``, each at its family's lr
    (``modlm.experiments.study.family_lr``; none swept: the settings' lr). A variant's step count
    follows from its cost per step at this one shape (routing every block at 12.5% needs ~5x the
    dense steps), so the grid's ``max_steps`` bound, meant to keep too-small models off an
    isoFLOP curve, does not apply to them."""
    s = settings or scale.settings
    return [
        plan_run(
            scale.variant_budget,
            v.family,
            scale.variant_shape,
            s,
            tags=(f"variant:{v.key}",),
            lr=family_lr(v.family, lrs, s.lr) if lrs else None,
            max_steps=2**62,
        )
        for v in VARIANTS
    ]


def plan_reproduction(scale: Scale, settings: SweepSettings | None = None) -> list[PlannedRun]:
    """Every run the claims need if no isoFLOP curve needs an extension (the study's
    ``expected_plan``): for plans and estimates. A run shared by two experiments is planned once
    (tags merged)."""
    s = settings or scale.settings
    return expected_plan(scale.design(s.seed), s, extra=lambda lrs: plan_variants(scale, s, lrs))
