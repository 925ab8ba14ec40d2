"""The adaptive isoFLOP study: per family a learning rate, per budget and family a bracketed optimum, seed noise.

    modlm isoflop --budgets 3e11,1e12,3e12 --lrs 1.5e-3,3e-3,6e-3 --seeds 0,1,2 --results-dir results/iso

A fixed grid cannot say where an isoFLOP optimum is: if the best run is the grid's smallest
(or largest) model, the optimum may lie beyond it. So the study plans, trains, inspects and
extends, in rounds (each round one resumable ``modlm.experiments.sweep.run_sweep`` over the
whole plan so far):

1. **Learning rate** (if ``StudyDesign.lrs``): at ``lr_budget`` each family trains
   ``lr_shape`` at every lr of the list; while a family's best lr is an end of what it tried,
   the next value beyond it (same ratio) is added, up to ``max_extensions``. Each family then
   trains at its own best lr (variants at their family's).
2. **Bracketing**: per budget and family, ``window`` consecutive rungs of the shape ``ladder``
   (shapes ordered by parameters, growing in width and depth in turn) centred on the rung whose
   run sees about ``tokens_per_param`` tokens per parameter. While the best rung is an end of
   the measured window, the next rung beyond it is added. A curve whose best rung has a
   measured smaller and larger neighbour is *bracketed*; one whose next rung does not exist,
   cannot spend the budget within [min_steps, max_steps], or would exceed ``max_extensions``,
   is *unbracketable* and reported as such (``study.json``), never as a verdict.
3. **Seeds**: on a bracketed curve the best rung and its two neighbours are repeated with every
   seed of ``seeds`` (each seed changes the init and the data order; the train/val split and so
   the validation set stay fixed: ``SweepSettings.split_seed``). Curves are then judged on the
   mean loss over seeds, so the best rung may move, and the rounds go on until nothing changes.

The optimum of a bracketed curve is the vertex of the parabola (loss vs log parameters) through
the best rung and its two neighbours; the noise is the pooled standard deviation over seeds
(``modlm.experiments.curves``, which reads the curves back). Every decision is a function of the
finished runs, so a restarted study replays the rounds (nothing is retrained) and continues
where it stopped. `modlm reproduce` runs a scale's study (``modlm.experiments.scales``) with the
variant runs; `modlm isoflop` (here) runs one from flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modlm.experiments.curves import (
    ISOFLOP_TAG,
    LR_TAG,
    SEED_TAG,
    UNSTABLE_TAG,
    Record,
    instability,
    lr_choices,
    summarize_isoflop,
)
from modlm.experiments.isoflop import (
    DEFAULT_SHAPES,
    FAMILIES,
    Family,
    PlannedRun,
    Shape,
    SweepSettings,
    add_settings_args,
    apply_threads,
    format_budget,
    merge_plans,
    parse_floats,
    parse_shapes,
    plan_run,
    resolve_jobs,
    settings_from_args,
)
from modlm.experiments.results import RUNS_FILE, run_curves

STUDY_FILE = "study.json"
MAX_RETRAINS = 2  # halvings of the lr for a run that blew up; after that it stays, flagged


@dataclass(frozen=True)
class StudyDesign:
    """What sizes an isoFLOP study (see the module docstring for how each part is used)."""

    budgets: tuple[float, ...]
    ladder: tuple[Shape, ...]  # ordered by parameters
    families: tuple[str, ...] = ("dense", "mod")
    window: int = 3  # rungs trained first on every curve
    tokens_per_param: float = 20.0  # where the first window is centred (Chinchilla's rule of thumb)
    seeds: tuple[int, ...] = (0, 1, 2)  # the first is the base seed of every run
    lrs: tuple[float, ...] = ()  # ascending; empty: no sweep, every family at SweepSettings.lr
    lr_budget: float | None = None  # default: the middle budget
    lr_shape: Shape | None = None  # default: the dense curve's first centre at lr_budget
    max_extensions: int = 4  # rungs (or lrs) added beyond the first window per curve

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, allowed: str) -> ValueError:
            return ValueError(f"StudyDesign.{name}={value!r} is invalid: {allowed}")

        if not self.budgets or any(not (isinstance(b, (int, float)) and b > 0) for b in self.budgets):
            raise bad("budgets", self.budgets, "must be positive numbers of FLOPs")
        if len(self.ladder) < 3:
            raise bad("ladder", [s.name for s in self.ladder], "needs at least 3 shapes to bracket an optimum")
        if not isinstance(self.window, int) or not 3 <= self.window <= len(self.ladder):
            raise bad(
                "window", self.window, f"must be an int in [3, {len(self.ladder)}] (a best rung and 2 neighbours)"
            )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise bad("seeds", self.seeds, "must be distinct seeds, at least one")
        if list(self.lrs) != sorted(set(self.lrs)) or any(lr <= 0 for lr in self.lrs) or len(self.lrs) == 2:
            raise bad("lrs", self.lrs, "must be ascending, positive and distinct: none, one, or >= 3 values")
        for fam in self.families:
            Family.parse(fam)  # one line naming a bad family
        if not isinstance(self.max_extensions, int) or self.max_extensions < 0:
            raise bad("max_extensions", self.max_extensions, "must be an int >= 0")

    @property
    def lr_at(self) -> float:
        return self.lr_budget if self.lr_budget is not None else sorted(self.budgets)[len(self.budgets) // 2]


# ---------------------------------------------------------------------------------------------
# Decisions (pure: tested on synthetic curves)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CurveDecision:
    """What a curve needs next. ``state``: 'bracketed' | 'extend' | 'unbracketable'; ``best``:
    the rung with the lowest mean loss; ``add``: a rung to train (for 'extend'); ``why``: for
    'unbracketable', the limit that was hit."""

    state: str
    best: int | None
    add: int | None = None
    why: str = ""


def decide_curve(
    measured: dict[int, Sequence[float]],
    why_not: Callable[[int], str | None],
    n_rungs: int,
    extensions_left: int,
    names: Callable[[int], str] = str,
) -> CurveDecision:
    """The next step of one isoFLOP curve from its measured rungs ({rung: losses over seeds}).

    ``why_not(rung)`` is None when that rung can be trained at this budget, else the reason it
    cannot; ``n_rungs`` is the ladder's length; ``extensions_left`` how many rungs may still be
    added. The best rung (lowest mean loss) is bracketed when a measured rung lies on each side
    of it; otherwise the next rung beyond it is wanted, if the limits allow.
    """
    means = {i: sum(v) / len(v) for i, v in measured.items() if v}
    if not means:
        return CurveDecision("unbracketable", None, why="no rung of the ladder can be trained at this budget")
    best = min(sorted(means), key=means.__getitem__)
    lo, hi = min(means), max(means)
    if lo < best < hi:
        return CurveDecision("bracketed", best)
    want, side, end = (lo - 1, "smaller", "smallest") if best == lo else (hi + 1, "larger", "largest")
    if not 0 <= want < n_rungs:
        return CurveDecision("unbracketable", best, why=f"the best shape {names(best)} is the ladder's {end}")
    reason = why_not(want)
    if reason is not None:
        return CurveDecision("unbracketable", best, why=f"the next {side} shape cannot be trained: {reason}")
    if extensions_left <= 0:
        return CurveDecision("unbracketable", best, why=f"the limit of extensions is reached ({names(want)} is next)")
    return CurveDecision("extend", best, add=want)


def family_lr(family: str, lrs: dict[str, float], default: float) -> float:
    """The lr a family trains at: its own best, else (a variant) its base family's, dense for
    'dense', 'mod' for every routed variant; ``default`` when none was swept."""
    if family in lrs:
        return lrs[family]
    base = family.partition(":")[0]
    key = "dense" if base == "dense" else "mod"
    return lrs.get(key, default)


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------


def _try_plan(budget: float, family: str, shape: Shape, settings: SweepSettings, **kw) -> PlannedRun | str:
    """The planned run, or why it cannot be planned (a step count outside [min_steps, max_steps])."""
    try:
        return plan_run(budget, family, shape, settings, **kw)
    except ValueError as e:
        if "outside [min_steps" not in str(e):
            raise
        return str(e).split(": ", 1)[-1] if ": " in str(e) else str(e)


def check_ladder(design: StudyDesign, settings: SweepSettings) -> None:
    """Refuse a ladder whose shapes are not in increasing order of parameters (dense model): a
    curve's neighbours are its ladder neighbours, so the order must be the size order."""
    from modlm.config import ModelConfig
    from modlm.experiments.isoflop import model_overrides
    from modlm.flops import param_count

    fam = Family.parse("dense")
    sizes = [param_count(ModelConfig.from_name("tiny", **model_overrides(s, fam, settings))) for s in design.ladder]
    for (a, na), (b, nb) in zip(zip(design.ladder, sizes), zip(design.ladder[1:], sizes[1:])):
        if nb <= na:
            raise ValueError(
                f"shape ladder {','.join(s.name for s in design.ladder)} is invalid: {b.name} ({nb:,} parameters) "
                f"must be larger than {a.name} before it ({na:,}); order the shapes by size"
            )


def first_window(design: StudyDesign, budget: float, family: str, settings: SweepSettings) -> list[int]:
    """The rungs trained first on a curve: ``window`` consecutive trainable rungs centred on the
    one closest (in log) to ``tokens_per_param`` tokens per non-embedding parameter."""
    ok = []
    for i, shape in enumerate(design.ladder):
        run = _try_plan(budget, family, shape, settings)
        if isinstance(run, PlannedRun):
            tokens = run.steps * settings.batch_size * settings.seq_len
            # Non-embedding parameters: with a BPE vocabulary the tables dwarf small models.
            ok.append((i, abs(math.log(tokens / run.non_embedding_params / design.tokens_per_param))))
    if not ok:
        return []
    idx = [i for i, _ in ok]
    centre = idx.index(min(ok, key=lambda t: t[1])[0])
    start = min(max(0, centre - design.window // 2), max(0, len(idx) - design.window))
    return idx[start : start + design.window]


def lr_runs(design: StudyDesign, settings: SweepSettings, lrs: Sequence[float]) -> list[PlannedRun]:
    """The learning-rate trials of every family at ``lr_budget``."""
    shape = design.lr_shape
    if shape is None:
        window = first_window(design, design.lr_at, design.families[0], settings)
        if not window:
            raise ValueError(f"no shape of the ladder can be trained at lr_budget={format_budget(design.lr_at)}")
        shape = design.ladder[window[len(window) // 2]]
    return [
        plan_run(design.lr_at, fam, shape, settings, tags=(LR_TAG,), lr=lr) for fam in design.families for lr in lrs
    ]


def expected_plan(
    design: StudyDesign, settings: SweepSettings, extra: Callable[[dict[str, float]], list[PlannedRun]] | None = None
) -> list[PlannedRun]:
    """The runs the study makes if no curve needs an extension and no lr an extra value: the lr
    sweep, every curve's first window and its seeds (the middle rung best). For plans and ETAs;
    each extension adds one run of its budget."""
    check_ladder(design, settings)
    lrs = {f: design.lrs[len(design.lrs) // 2] for f in design.families} if design.lrs else {}
    runs = lr_runs(design, settings, design.lrs) if design.lrs else []
    for b in design.budgets:
        for fam in design.families:
            lr = lrs.get(fam)
            window = first_window(design, b, fam, settings)
            mid = len(window) // 2
            for k, i in enumerate(window):
                seeds = design.seeds if abs(k - mid) <= 1 else design.seeds[:1]
                for s in seeds:
                    runs.append(_grid_run(design, b, fam, i, settings, lr, s))
    if extra is not None:
        runs += extra(lrs)
    return merge_plans(runs)


def _grid_run(
    design: StudyDesign, budget: float, family: str, rung: int, settings: SweepSettings, lr: float | None, seed: int
) -> PlannedRun:
    tags = (ISOFLOP_TAG,) if seed == design.seeds[0] else (ISOFLOP_TAG, SEED_TAG)
    return plan_run(budget, family, design.ladder[rung], settings, tags=tags, lr=lr, seed=seed)


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


@dataclass
class StudyResult:
    """What ``run_study`` returns: the plan it trained, the finished records, the chosen lrs and
    each curve's final state ({"budget", "family", "state", "best", "why"})."""

    complete: bool
    runs: list[PlannedRun]
    records: list[Record]
    lrs: dict[str, float]
    curves: list[dict[str, Any]]
    rounds: int


class _Study:
    """One study while it runs: the plan so far, the finished records (tagged by the plan), the
    rounds, the learning-rate choices, each curve's state and the retrains of unstable runs.
    Every decision is a function of the finished records, so a restart replays it."""

    def __init__(self, design: StudyDesign, results: Path, settings: SweepSettings, sweep_kw: dict, log) -> None:
        self.design, self.results, self.settings, self.sweep_kw, self.log = design, results, settings, sweep_kw, log
        self.plan: list[PlannedRun] = []
        self.records: dict[str, Record] = {}
        self.rounds = 0
        self.curves: dict[tuple[float, str], dict[str, Any]] = {}
        self.retrains: dict[str, PlannedRun] = {}  # unstable run id -> its retrain
        self.depth: dict[str, int] = {}  # run id -> how many halvings of the lr made it
        self.retrained: list[dict[str, Any]] = []  # study.json's "retrained"
        self.names = {i: sh.name for i, sh in enumerate(design.ladder)}
        self.rung_of = {sh.name: i for i, sh in enumerate(design.ladder)}

    def train(self, new: list[PlannedRun]) -> bool:
        """Add ``new`` to the plan and train what is missing (one resumable sweep); False if incomplete."""
        from modlm.experiments.sweep import run_sweep

        self.plan = merge_plans(self.plan, new)
        self.rounds += 1
        self.log(f"study: round {self.rounds}: {len(new)} run(s) added, {len(self.plan)} in the plan")
        res = run_sweep(self.plan, self.results, self.settings, **self.sweep_kw)
        tags = {r.run_id: list(r.tags) for r in self.plan}
        self.records = {rec["run_id"]: dict(rec, tags=tags[rec["run_id"]]) for rec in res.records}
        return res.complete

    def result(self, complete: bool, lrs: dict[str, float], states: list[dict[str, Any]]) -> StudyResult:
        return StudyResult(complete, self.plan, list(self.records.values()), lrs, states, self.rounds)

    # 1. Learning rate per family.
    def choose_lrs(self) -> dict[str, float] | None:
        """Each family's best lr at ``lr_budget`` (extended past an end of the list); None if a
        round could not finish; {} without an lr sweep."""
        design, lrs = self.design, {}
        if not design.lrs:
            return lrs
        tried = {f: list(design.lrs) for f in design.families}
        ratio = design.lrs[1] / design.lrs[0] if len(design.lrs) > 1 else 2.0
        new = lr_runs(design, self.settings, design.lrs)
        while new:
            if not self.train(new):
                return None
            new = []
            choices = lr_choices(list(self.records.values()))
            for fam in design.families:
                c = choices[fam]
                lrs[fam] = c.best
                if c.bracketed or len(c.losses) < 3 or len(tried[fam]) - len(design.lrs) >= design.max_extensions:
                    continue
                nxt = c.best * ratio if c.best == max(c.losses) else c.best / ratio
                tried[fam].append(nxt)
                self.log(f"study: {fam} lr {c.best:g} is the best of {sorted(c.losses)}: trying {nxt:g}")
                new += [r for r in lr_runs(design, self.settings, [nxt]) if r.family == fam]
        self.log("study: learning rates " + ", ".join(f"{f} {lr:g}" for f, lr in lrs.items()))
        return lrs

    # 2 + 3. Bracketing and seeds.
    def curve_step(self, budget: float, fam: str, lr: float | None) -> list[PlannedRun]:
        """What one curve needs next (its first window, an extension, or its seeds); records its state."""
        design, settings, names = self.design, self.settings, self.names
        measured: dict[int, dict[int, float]] = {}
        for r in self.plan:
            rec = self.records.get(r.run_id)
            if rec is None or ISOFLOP_TAG not in r.tags or r.budget != budget or r.family != fam:
                continue
            measured.setdefault(self.rung_of[r.shape.name], {})[r.seed] = rec["val_loss"]

        def grid(rung: int, seed: int) -> PlannedRun:
            return self.resolve(_grid_run(design, budget, fam, rung, settings, lr, seed))

        window = first_window(design, budget, fam, settings)
        if not measured:
            why = "" if window else "no shape of the ladder trains for min_steps..max_steps at this budget"
            self.curves[(budget, fam)] = {"state": "planned" if window else "unbracketable", "best": None, "why": why}
            return [grid(i, design.seeds[0]) for i in window]

        def why_not(i: int) -> str | None:
            run = _try_plan(budget, fam, design.ladder[i], settings, lr=lr)
            return run if isinstance(run, str) else None

        d = decide_curve(
            {i: list(v.values()) for i, v in measured.items()},
            why_not,
            len(design.ladder),
            design.max_extensions - (len(measured) - len(window)),
            names.__getitem__,
        )
        self.curves[(budget, fam)] = {"state": d.state, "best": names.get(d.best), "why": d.why}
        if d.state == "extend":
            self.log(
                f"study: {format_budget(budget)} {fam}: best {names[d.best]} is an end of the curve; "
                f"adding {names[d.add]}"
            )
            return [grid(d.add, design.seeds[0])]
        if d.state == "bracketed":
            return [
                grid(i, s)
                for i in (d.best - 1, d.best, d.best + 1)
                for s in design.seeds
                if s not in measured.get(i, {})
            ]
        return []

    # 4. Stability: a run that blew up (``modlm.experiments.curves.instability``) is retrained
    # at half its lr, up to MAX_RETRAINS times; the unstable run keeps only UNSTABLE_TAG, so no
    # curve, seed group or variant reads it, and every later plan of it resolves to the retrain.
    def resolve(self, run: PlannedRun) -> PlannedRun:
        while run.run_id in self.retrains:
            run = self.retrains[run.run_id]
        return run

    def retrain_unstable(self) -> list[PlannedRun]:
        out, settings = [], self.settings
        for i, r in enumerate(self.plan):
            rec = self.records.get(r.run_id)
            if rec is None or LR_TAG in r.tags or UNSTABLE_TAG in r.tags or r.run_id in self.retrains:
                continue
            if "aux_curve" not in rec:  # recorded before runs.jsonl carried it
                rec = {**rec, **run_curves(self.results / rec["out_dir"])}
            why = instability(rec, r.model_config().vocab_size, r.train_config(settings, "x").warmup_steps)
            if why is None or self.depth.get(r.run_id, 0) >= MAX_RETRAINS:
                continue
            lr = (settings.lr if r.lr is None else r.lr) / 2
            redo = plan_run(r.budget, r.family, r.shape, settings, tags=r.tags, seed=r.seed, lr=lr, max_steps=2**62)
            self.retrains[r.run_id], self.depth[redo.run_id] = redo, self.depth.get(r.run_id, 0) + 1
            self.plan[i] = dataclasses.replace(r, tags=(UNSTABLE_TAG,))
            self.retrained.append(
                {"run_id": r.run_id, "lr": r.lr, "why": why, "retrain": redo.run_id, "retrain_lr": lr}
            )
            self.log(f"study: {r.run_id} is unstable ({why}): retraining at lr {lr:g}")
            out.append(redo)
        return out

    def write(self, lrs: dict[str, float]) -> list[dict[str, Any]]:
        """study.json: the lrs, each curve's final state, the retrains; returns the states."""
        states = [{"budget": b, "family": f, **c} for (b, f), c in sorted(self.curves.items())]
        doc = {"lrs": lrs, "curves": states, "retrained": self.retrained, "rounds": self.rounds, "runs": len(self.plan)}
        (self.results / STUDY_FILE).write_text(json.dumps(doc, indent=1))
        for c in states:
            if c["state"] == "unbracketable":
                self.log(f"study: {format_budget(c['budget'])} {c['family']}: NOT bracketed ({c['why']})")
        return states


def run_study(
    design: StudyDesign,
    results_dir: str | Path,
    settings: SweepSettings,
    progress: bool = True,
    jobs: int = 1,
    threads: int | None = None,
    extra: Callable[[dict[str, float]], list[PlannedRun]] | None = None,
    log: Callable[[str], None] = print,
) -> StudyResult:
    """Train the study in rounds until every curve is bracketed (and its seeds trained) or
    unbracketable, and every unstable run retrained; resumable (see the module docstring).
    ``extra(lrs)`` plans further runs (e.g. variants) once the learning rates are known; they
    train with the first grid round. Writes ``study.json`` (the lrs, each curve's state and the
    retrains) next to ``runs.jsonl``."""
    check_ladder(design, settings)
    study = _Study(design, Path(results_dir), settings, dict(progress=progress, jobs=jobs, threads=threads), log)
    lrs = study.choose_lrs()
    if lrs is None:
        return study.result(False, {}, [])
    new = extra(lrs) if extra is not None else []
    while True:
        new += study.retrain_unstable()
        for b in design.budgets:
            for fam in design.families:
                new += study.curve_step(b, fam, lrs.get(fam))
        if not new:
            break
        if not study.train(new):
            return study.result(False, {}, [])
        new = []
    return study.result(True, lrs, study.write(lrs))


def read_study(results_dir: str | Path) -> dict[str, Any] | None:
    """``study.json`` of a results folder (None if the study has not finished a round there)."""
    try:
        return json.loads((Path(results_dir) / STUDY_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------------------------------------
# `modlm isoflop`
# ---------------------------------------------------------------------------------------------


def _parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of seeds, e.g. 0,1,2") from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: seeds must be ints >= 0")
    return seeds


def add_isoflop_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of `modlm isoflop`."""
    parser.add_argument(
        "--budgets",
        type=parse_floats,
        required=True,
        metavar="B1,B2,...",
        help="training-FLOP budgets, one isoFLOP curve per family each, e.g. 1e12,4e12",
    )
    parser.add_argument(
        "--family",
        action="append",
        default=None,
        metavar="NAME[:KEY=VALUE,...]",
        help=f"model family (repeatable; default: dense and mod): one of {', '.join(sorted(FAMILIES))}, "
        "optionally with ModelConfig overrides, e.g. mod:capacity=0.25,route_every=1",
    )
    parser.add_argument(
        "--shapes",
        default=DEFAULT_SHAPES,
        metavar="WxL,...",
        help="the shape ladder, ordered by parameters: each curve starts on --window of them and grows "
        "a shape at a time until its best has a smaller and a larger neighbour (default: %(default)s)",
    )
    parser.add_argument(
        "--window", type=int, default=3, help="shapes trained first on every curve (default: %(default)s)"
    )
    parser.add_argument(
        "--max-extensions",
        type=int,
        default=4,
        help="shapes (or lrs) a curve (or lr sweep) may add beyond its first ones; beyond that it is "
        "reported as not bracketed (default: %(default)s)",
    )
    parser.add_argument(
        "--seeds",
        type=_parse_seeds,
        default=None,
        metavar="S1,S2,...",
        help="seeds (init and data order) of the repeats of each curve's best shape and its two "
        "neighbours; the first is every run's seed; one seed: no repeats, no noise (default: --seed, "
        "--seed + 1, --seed + 2)",
    )
    parser.add_argument(
        "--lrs",
        type=parse_floats,
        default=None,
        metavar="LR1,LR2,LR3",
        help="learning rates tried per family at the middle budget (>= 3, ascending); each family then "
        "trains at its best (default: no sweep, --lr for every run)",
    )
    parser.add_argument(
        "--results-dir", default="results/isoflop", help="runs.jsonl, plots and run folders (default: %(default)s)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the expected plan and exit")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots at the end")
    add_settings_args(parser)
    return parser


def cmd_isoflop(args: argparse.Namespace) -> int:
    """isoFLOP study: for each budget, dense and MoD models trained for exactly that many FLOPs on
    a shape ladder that extends itself until each optimum is bracketed, the best shapes repeated
    over seeds, optionally a learning rate per family; resumable; results in RESULTS_DIR/runs.jsonl,
    study.json and PNG plots."""
    settings = settings_from_args(args)
    threads = apply_threads(args.threads)
    jobs = resolve_jobs(args.jobs)
    design = StudyDesign(
        budgets=tuple(args.budgets),
        ladder=parse_shapes(args.shapes),
        families=tuple(Family.parse(f).label for f in (args.family or ["dense", "mod"])),
        window=args.window,
        seeds=args.seeds or tuple(settings.seed + i for i in range(3)),
        lrs=tuple(args.lrs or ()),
        max_extensions=args.max_extensions,
    )
    settings = settings.replace(seed=design.seeds[0])
    runs = expected_plan(design, settings)
    print(
        f"modlm isoflop: {len(runs)} runs expected (more where a curve needs extending), "
        f"{sum(r.train_flops for r in runs):.3g} training FLOPs -> {args.results_dir}"
    )
    print("  settings: " + json.dumps(dataclasses.asdict(settings)))
    for r in runs:
        print(
            f"  {r.run_id:<48} {r.steps:>6} steps x {r.flops_per_step:.3g} = {r.train_flops:.4g} FLOPs "
            f"({r.train_flops / r.budget - 1:+.2%}), {r.params:,} params  {','.join(r.tags)}"
        )
    sys.stdout.flush()
    if args.dry_run:
        return 0
    result = run_study(design, args.results_dir, settings, progress=args.progress, jobs=jobs, threads=threads)
    if not result.complete:
        return 130
    if args.plots:
        from modlm.experiments.plots import plot_isoflop, plot_loss_vs_flops

        out = Path(args.results_dir)
        plot_isoflop(result.records, out / "isoflop.png")
        plot_loss_vs_flops(result.records, out / "loss_vs_flops.png")
        print(f"plots: {out / 'isoflop.png'}, {out / 'loss_vs_flops.png'}")
    summary = summarize_isoflop(result.records)
    print(json.dumps({"results": str(Path(args.results_dir) / RUNS_FILE), "lrs": result.lrs, "optimal": summary}))
    return 0
