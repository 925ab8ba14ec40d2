"""The adaptive isoFLOP study: per family a learning rate, per budget and family a bracketed optimum, seed noise.

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
(``seed_noise``). Every decision is a function of the finished runs, so a restarted study
replays the rounds (nothing is retrained) and continues where it stopped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modlm.experiments.isoflop import (
    Family,
    PlannedRun,
    Shape,
    SweepSettings,
    format_budget,
    merge_plans,
    plan_run,
)

STUDY_FILE = "study.json"
ISOFLOP_TAG = "isoflop"
SEED_TAG = "seed"
LR_TAG = "lr"

Record = dict[str, Any]


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


def fit_bracket(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(params, loss) at the vertex of the parabola loss(log params) through three points, the
    middle one lowest; the middle point itself if the three are (nearly) collinear."""
    (p0, y0), (p1, y1), (p2, y2) = points
    x0, x1, x2 = math.log(p0), math.log(p1), math.log(p2)
    # Lagrange form: y = a x^2 + b x + c.
    d = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / d
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / d
    if a <= 1e-12:
        return p1, y1
    xv = -b / (2 * a)
    xv = min(max(xv, x0), x2)  # a middle minimum puts it between the outer points; clamp rounding
    c = y0 - a * x0 * x0 - b * x0
    return math.exp(xv), a * xv * xv + b * xv + c


def seed_noise(groups: Sequence[Sequence[float]]) -> tuple[float | None, int]:
    """Pooled standard deviation of losses repeated over seeds: sqrt(sum of squared deviations
    from each group's mean / sum of (n - 1)), over groups of >= 2 seeds; and the smallest
    number of seeds per repeated group (0 if none is repeated)."""
    sq, dof, n_min = 0.0, 0, 0
    for g in groups:
        if len(g) < 2:
            continue
        m = sum(g) / len(g)
        sq += sum((x - m) ** 2 for x in g)
        dof += len(g) - 1
        n_min = len(g) if n_min == 0 else min(n_min, len(g))
    return (math.sqrt(sq / dof) if dof else None), n_min


# ---------------------------------------------------------------------------------------------
# Reading curves back from run records (used by the study and by the claims)
# ---------------------------------------------------------------------------------------------


@dataclass
class CurvePoint:
    """One shape of an isoFLOP curve: its losses over seeds and their mean."""

    shape: str
    params: int
    core_params: int
    forward_flops_per_token: float
    losses: list[float]
    records: list[Record] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return sum(self.losses) / len(self.losses)


@dataclass
class CurveOptimum:
    """The optimum of one (budget, family) curve. ``bracketed``: the best shape has a measured
    smaller and larger neighbour, and ``params``/``loss`` are the fit through the three; else
    they are the best measured point's."""

    budget: float
    family: str
    shape: str
    params: float
    loss: float
    bracketed: bool
    best: CurvePoint
    points: list[CurvePoint]

    def as_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "params": self.params,
            "loss": self.loss,
            "bracketed": self.bracketed,
            "measured_loss": self.best.loss,
            "n_seeds": len(self.best.losses),
        }


def curve_points(records: Sequence[Record]) -> dict[tuple[float, str], list[CurvePoint]]:
    """{(budget, family): points ordered by parameters}, one point per shape (seeds averaged),
    from the records tagged 'isoflop' with a validation loss."""
    by: dict[tuple[float, str], dict[str, CurvePoint]] = {}
    for r in records:
        if ISOFLOP_TAG not in r.get("tags", []) or r.get("val_loss") is None:
            continue
        name = Shape(**r["shape"]).name
        pts = by.setdefault((r["budget"], r["family"]), {})
        if name not in pts:
            pts[name] = CurvePoint(
                name, r["params"], r.get("core_params", r["params"]), r["forward_flops_per_token"], []
            )
        pts[name].losses.append(r["val_loss"])
        pts[name].records.append(r)
    return {k: sorted(v.values(), key=lambda p: p.params) for k, v in by.items()}


def curve_optima(records: Sequence[Record]) -> dict[tuple[float, str], CurveOptimum]:
    """The optimum of every isoFLOP curve of ``records`` (see ``CurveOptimum``)."""
    out = {}
    for (b, fam), pts in curve_points(records).items():
        i = min(range(len(pts)), key=lambda j: pts[j].loss)
        best = pts[i]
        if 0 < i < len(pts) - 1:
            params, loss = fit_bracket([(p.params, p.loss) for p in pts[i - 1 : i + 2]])
            out[(b, fam)] = CurveOptimum(b, fam, best.shape, params, loss, True, best, pts)
        else:
            out[(b, fam)] = CurveOptimum(b, fam, best.shape, float(best.params), best.loss, False, best, pts)
    return out


def isoflop_noise(records: Sequence[Record]) -> tuple[float | None, int]:
    """``seed_noise`` over the isoFLOP runs repeated with several seeds (same budget, family,
    shape and learning rate)."""
    groups: dict[tuple, list[float]] = {}
    for r in records:
        if ISOFLOP_TAG in r.get("tags", []) and r.get("val_loss") is not None:
            key = (r["budget"], r["family"], Shape(**r["shape"]).name, r.get("lr"))
            groups.setdefault(key, []).append(r["val_loss"])
    return seed_noise(list(groups.values()))


@dataclass
class LrChoice:
    """One family's learning-rate sweep: {lr: loss}, the best, and whether it is bracketed."""

    family: str
    losses: dict[float, float]
    best: float
    bracketed: bool
    shape: str
    budget: float


def lr_choices(records: Sequence[Record]) -> dict[str, LrChoice]:
    """{family: LrChoice} from the records of the learning-rate sweep (tagged 'lr')."""
    by: dict[str, list[Record]] = {}
    for r in records:
        if LR_TAG in r.get("tags", []) and r.get("val_loss") is not None and r.get("lr") is not None:
            by.setdefault(r["family"], []).append(r)
    out = {}
    for fam, recs in by.items():
        losses = {r["lr"]: r["val_loss"] for r in recs}
        best = min(sorted(losses), key=losses.__getitem__)
        bracketed = min(losses) < best < max(losses)
        out[fam] = LrChoice(
            fam, dict(sorted(losses.items())), best, bracketed, Shape(**recs[0]["shape"]).name, recs[0]["budget"]
        )
    return out


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
    unbracketable; resumable (see the module docstring). ``extra(lrs)`` plans further runs
    (e.g. variants) once the learning rates are known; they train with the first grid round.
    Writes ``study.json`` (the lrs and each curve's state) next to ``runs.jsonl``."""
    from modlm.experiments.sweep import run_sweep

    check_ladder(design, settings)
    results = Path(results_dir)
    plan: list[PlannedRun] = []
    records: dict[str, Record] = {}
    rounds = 0

    def train(new: list[PlannedRun]) -> bool:
        nonlocal plan, rounds
        plan = merge_plans(plan, new)
        rounds += 1
        log(f"study: round {rounds}: {len(new)} run(s) added, {len(plan)} in the plan")
        res = run_sweep(plan, results, settings, progress=progress, jobs=jobs, threads=threads)
        records.clear()
        tags = {r.run_id: list(r.tags) for r in plan}
        records.update({rec["run_id"]: dict(rec, tags=tags[rec["run_id"]]) for rec in res.records})
        return res.complete

    def incomplete() -> StudyResult:
        return StudyResult(False, plan, list(records.values()), {}, [], rounds)

    # 1. Learning rate per family.
    lrs: dict[str, float] = {}
    if design.lrs:
        tried = {f: list(design.lrs) for f in design.families}
        ratio = design.lrs[1] / design.lrs[0] if len(design.lrs) > 1 else 2.0
        new = lr_runs(design, settings, design.lrs)
        while new:
            if not train(new):
                return incomplete()
            new = []
            choices = lr_choices(list(records.values()))
            for fam in design.families:
                c = choices[fam]
                lrs[fam] = c.best
                if c.bracketed or len(c.losses) < 3 or len(tried[fam]) - len(design.lrs) >= design.max_extensions:
                    continue
                nxt = c.best * ratio if c.best == max(c.losses) else c.best / ratio
                tried[fam].append(nxt)
                log(f"study: {fam} lr {c.best:g} is the best of {sorted(c.losses)}: trying {nxt:g}")
                new += [r for r in lr_runs(design, settings, [nxt]) if r.family == fam]
        log("study: learning rates " + ", ".join(f"{f} {lr:g}" for f, lr in lrs.items()))

    # 2 + 3. Bracketing and seeds, round after round.
    names = {i: s.name for i, s in enumerate(design.ladder)}
    rung_of = {s.name: i for i, s in enumerate(design.ladder)}
    pending_extra = extra(lrs) if extra is not None else []
    curves: dict[tuple[float, str], dict[str, Any]] = {}
    while True:
        new: list[PlannedRun] = list(pending_extra)
        pending_extra = []
        for b in design.budgets:
            for fam in design.families:
                lr = lrs.get(fam)
                measured: dict[int, dict[int, float]] = {}
                for r in plan:
                    rec = records.get(r.run_id)
                    if rec is None or ISOFLOP_TAG not in r.tags or r.budget != b or r.family != fam:
                        continue
                    measured.setdefault(rung_of[r.shape.name], {})[r.seed] = rec["val_loss"]
                if not measured:
                    window = first_window(design, b, fam, settings)
                    new += [_grid_run(design, b, fam, i, settings, lr, design.seeds[0]) for i in window]
                    why = "" if window else "no shape of the ladder trains for min_steps..max_steps at this budget"
                    curves[(b, fam)] = {"state": "planned" if window else "unbracketable", "best": None, "why": why}
                    continue
                start = len(first_window(design, b, fam, settings))

                def why_not(i: int, b=b, fam=fam, lr=lr) -> str | None:
                    run = _try_plan(b, fam, design.ladder[i], settings, lr=lr)
                    return run if isinstance(run, str) else None

                d = decide_curve(
                    {i: list(v.values()) for i, v in measured.items()},
                    why_not,
                    len(design.ladder),
                    design.max_extensions - (len(measured) - start),
                    names.__getitem__,
                )
                curves[(b, fam)] = {"state": d.state, "best": names.get(d.best), "why": d.why}
                if d.state == "extend":
                    log(
                        f"study: {format_budget(b)} {fam}: best {names[d.best]} is an end of the curve; adding {names[d.add]}"
                    )
                    new.append(_grid_run(design, b, fam, d.add, settings, lr, design.seeds[0]))
                elif d.state == "bracketed":
                    for i in (d.best - 1, d.best, d.best + 1):
                        for s in design.seeds:
                            if s not in measured.get(i, {}):
                                new.append(_grid_run(design, b, fam, i, settings, lr, s))
        if not new:
            break
        if not train(new):
            return incomplete()
    states = [
        {"budget": b, "family": f, **c} for (b, f), c in sorted(curves.items(), key=lambda kv: (kv[0][0], kv[0][1]))
    ]
    (results / STUDY_FILE).write_text(
        json.dumps({"lrs": lrs, "curves": states, "rounds": rounds, "runs": len(plan)}, indent=1)
    )
    for c in states:
        if c["state"] == "unbracketable":
            log(f"study: {format_budget(c['budget'])} {c['family']}: NOT bracketed ({c['why']})")
    return StudyResult(True, plan, list(records.values()), lrs, states, rounds)


def read_study(results_dir: str | Path) -> dict[str, Any] | None:
    """``study.json`` of a results folder (None if the study has not finished a round there)."""
    try:
        return json.loads((Path(results_dir) / STUDY_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
