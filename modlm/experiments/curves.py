"""isoFLOP curves read back from run records: one point per shape (seeds averaged), the optimum
fitted through a bracketed best shape, the seed noise, and the learning-rate sweep.

Pure functions of run records (``runs.jsonl`` lines with their plan's tags), shared by the study
that decides what to train next (``modlm.experiments.study``), the claims and the plots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from modlm.experiments.isoflop import Shape

ISOFLOP_TAG = "isoflop"  # a run on an isoFLOP curve (any seed)
SEED_TAG = "seed"  # a repeat with another seed
LR_TAG = "lr"  # a learning-rate trial
UNSTABLE_TAG = "unstable"  # a run that blew up and was retrained at a lower lr (read by nothing else)

Record = dict[str, Any]


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


def instability(record: Record, vocab_size: int, warmup_steps: int) -> str | None:
    """Why a finished run is unstable, or None: its validation loss is not finite, or after warmup
    a logged training loss (LM, or the auxiliary losses: router BCE, predictor, MoE balance) rose
    above ln(vocab_size), a uniform guess over the vocabulary, i.e. worse than knowing nothing.

    A blow-up, not a bad result: a learned router's logit r (a processed token becomes
    x + r·f(x)) can run away to thousands at a learning rate a small dense model takes in its
    stride, while the LM loss stays bounded (seen at lr 0.024 routing every block).
    """
    val = record.get("val_loss")
    if val is None or not math.isfinite(val):
        return f"validation loss {val}"
    bound = math.log(vocab_size)
    for name, key in (("training loss", "train_curve"), ("auxiliary loss", "aux_curve")):
        for step, value in record.get(key) or []:
            if step > warmup_steps and not (math.isfinite(value) and value <= bound):
                return f"{name} {value:.3g} > ln {vocab_size} = {bound:.2f} at step {step}"
    return None


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


def summarize_isoflop(records: Sequence[Record]) -> list[dict[str, Any]]:
    """The optimum of every (budget, family) curve, as claims.json writes one (``CurveOptimum``)."""
    return [{"budget": b, "family": f, **o.as_dict()} for (b, f), o in sorted(curve_optima(records).items())]


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
