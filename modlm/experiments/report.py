"""REPORT.md, its PNG plots and claims.json of a reproduction, generated from the results folder alone.

Every number in the report is computed from ``runs.jsonl`` and ``analysis.json`` (through
``modlm.experiments.claims``); nothing is typed in by hand except what the paper says.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modlm.config import ModelConfig
from modlm.experiments.analysis import ANALYSIS_FILE
from modlm.experiments.claims import (
    NOT_BRACKETED,
    S1,
    S2,
    S5,
    S6,
    VERDICT_SIGMAS,
    Claim,
    build_claims,
    format_params,
    isoflop_runs,
    noise_summary,
    variant_record,
)
from modlm.experiments.curves import curve_optima, lr_choices
from modlm.experiments.isoflop import SweepSettings, format_budget, train_tokens
from modlm.experiments.results import PLAN_FILE, read_results
from modlm.experiments.scales import VARIANT_BY_KEY, VARIANTS, Scale
from modlm.experiments.study import MAX_RETRAINS, read_study

REPORT_FILE = "REPORT.md"
CLAIMS_FILE = "claims.json"

CAPTIONS = {
    "isoflop": "isoFLOP curves: final validation loss (mean over seeds; bars: min-max) vs parameters, one curve "
    "per budget, dense and MoD; stars mark the fitted optima (open: not bracketed).",
    "loss_vs_flops": "Training loss vs training FLOPs for every isoFLOP run (thin) and the optimal runs (bold); "
    "markers are final validation losses.",
    "variants": "Variants of one shape at equal training FLOPs; dashed line: the same shape dense; grey band: "
    "the best variant +- noise.",
    "router_accuracy": "Causal routing accuracy per routed block over training: predictor (left) and aux-loss "
    "router logit (right), against top-k membership.",
    "heatmap": "Routing decisions over a validation text sample (paper Fig. 1): rows are routed blocks, "
    "columns tokens (bytes; \u2423 space, \u21b5 newline); dark = processed by the block.",
    "depth_entropy": "Share of tokens by the number of routed blocks that processed them (bars) and the mean "
    "entropy of the model's next-byte prediction at those tokens (line).",
}
FIGURES_OF_SECTION = {
    S1: ["isoflop", "loss_vs_flops"],
    S2: ["variants"],
    S5: ["router_accuracy"],
    S6: ["heatmap", "depth_entropy"],
}


def write_report(
    results_dir: str | Path, report_dir: str | Path, scale: Scale, command: str, settings: SweepSettings | None = None
) -> Path:
    """REPORT.md + PNG plots + claims.json in ``report_dir``, from ``results_dir`` alone."""
    results = Path(results_dir)
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = settings or scale.settings
    records = tagged_records(results)
    analysis = None
    if (results / ANALYSIS_FILE).exists():
        analysis = json.loads((results / ANALYSIS_FILE).read_text())
    claims, noise = build_claims(records, analysis, scale.budgets)
    figs = _plot(records, analysis, noise, scale, out, settings)
    md = _render(records, claims, noise, figs, scale, settings, command, results)
    path = out / REPORT_FILE
    path.write_text(md, encoding="utf-8")
    lrs = {f: c.best for f, c in lr_choices(records).items()}
    doc = {
        "budgets": [float(b) for b in scale.budgets],
        "noise": noise_summary(records),
        "lrs": lrs,
        "tokenizer": settings.tokenizer,
        "seq_len": settings.seq_len,
        "claims": [c.as_dict() for c in claims],
    }
    (out / CLAIMS_FILE).write_text(json.dumps(doc, indent=1))
    return path


def tagged_records(results: Path) -> list[dict[str, Any]]:
    """The finished runs, each with the tags of the current plan (a run shared by two experiments
    may have been recorded by a plan that knew only one of them)."""
    try:
        plan = json.loads((results / PLAN_FILE).read_text())
        tags = {r["run_id"]: r.get("tags", []) for r in plan.get("runs", [])}
    except (OSError, json.JSONDecodeError):
        tags = {}
    return [dict(rec, tags=tags.get(rid, rec.get("tags", []))) for rid, rec in read_results(results).items()]


def _plot(
    records: list[dict[str, Any]],
    analysis: dict[str, Any] | None,
    noise: float | None,
    scale: Scale,
    out: Path,
    settings: SweepSettings,
) -> dict[str, str]:
    """Every figure the results allow, written to ``out``: {figure key: PNG file name}."""
    from modlm.experiments.plots import (
        plot_depth_entropy,
        plot_isoflop,
        plot_loss_vs_flops,
        plot_router_accuracy,
        plot_routing_heatmap,
        plot_variants,
    )

    figs: dict[str, str] = {}
    iso = isoflop_runs(records)
    if iso:
        unit = "nats/byte" if settings.tokenizer == "byte" else "nats/token"
        figs["isoflop"] = plot_isoflop(iso, out / "isoflop.png", ylabel=unit).name
        if any(r.get("train_curve") for r in iso):
            figs["loss_vs_flops"] = plot_loss_vs_flops(iso, out / "loss_vs_flops.png").name
    vrows = []
    for v in VARIANTS:
        r = variant_record(records, v.key)
        if r is not None and v.key != "dense":
            group = "random" if v.key.startswith("random") else "token choice" if v.key == "token-choice" else "mod"
            vrows.append({"label": v.label, "val_loss": r["val_loss"], "group": group})
    dense_v = variant_record(records, "dense")
    if vrows:
        figs["variants"] = plot_variants(
            vrows,
            out / "variants.png",
            reference=dense_v["val_loss"] if dense_v else None,
            noise=noise,
            title=f"{scale.variant_shape.name} at {format_budget(scale.variant_budget)} training FLOPs",
        ).name
    curves = {}
    for key in ("mod", "aux-loss"):
        r = variant_record(records, key)
        if r is not None and r.get("router_curve"):
            curves[VARIANT_BY_KEY[key].label] = r["router_curve"]
    if curves:
        figs["router_accuracy"] = plot_router_accuracy(curves, out / "router_accuracy.png").name
    models = (analysis or {}).get("models") or []
    if models:
        figs["heatmap"] = plot_routing_heatmap([a["heatmap"] for a in models], out / "routing_heatmap.png").name
        figs["depth_entropy"] = plot_depth_entropy(models, out / "depth_entropy.png").name
    return figs


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _render(
    records: list[dict[str, Any]],
    claims: list[Claim],
    noise: float | None,
    figs: dict[str, str],
    scale: Scale,
    settings: SweepSettings,
    command: str,
    results: Path,
) -> str:
    """The text of REPORT.md: how it was made, the setup, a summary table, one section per part
    of the paper, our disagreements and every run."""
    L = _introduction(records, command, scale, settings, results)
    L += _setup(records, noise, scale, settings, results)
    n_yes = sum(c.holds == "yes" for c in claims)
    L.append(f"## Summary: {n_yes} of {len(claims)} claims hold at this scale\n")
    L.append(
        _md_table(["section", "claim", "holds?"], [(c.section.split(". ", 1)[0], c.claim, c.holds) for c in claims])
    )
    L.append("")
    for sec in dict.fromkeys(c.section for c in claims):
        L += _section(sec, [c for c in claims if c.section == sec], records, figs, results)
    L += _disagreements(claims)
    L += _all_runs(records, settings)
    return "\n".join(L)


def _introduction(
    records: list[dict[str, Any]], command: str, scale: Scale, settings: SweepSettings, results: Path
) -> list[str]:
    import torch

    total_s = sum(r.get("elapsed_s") or 0 for r in records)
    total_flops = sum(r["train_flops"] for r in records)
    return [
        "# Mixture-of-Depths at small scale: the paper's claims, checked\n",
        f"Generated by `{command}` on {_dt.date.today().isoformat()} "
        f"({platform.machine()}, torch {torch.__version__}, {settings.device} device setting). "
        f"{len(records)} training runs, {total_flops:.3g} training FLOPs, {total_s / 60:.0f} min of training "
        f"(sum over runs). Scale `{scale.name}`: {scale.description}.\n",
        "Paper: Raposo et al. 2024, *Mixture-of-Depths: Dynamically allocating compute in transformer-based "
        "language models*, arXiv 2404.02258. Figure numbers refer to its v1; values marked (approx.) are read "
        "off plots. Every number under **ours** is computed from this run's results "
        f"(`{results / 'runs.jsonl'}`, `{results / ANALYSIS_FILE}`).\n",
    ]


def _stability_line(results: Path) -> str:
    """The runs the study retrained at a lower lr because they blew up (study.json's 'retrained')."""
    redone = (read_study(results) or {}).get("retrained") or []
    rule = (
        f"- Stability: a run whose training or auxiliary loss rose above ln(vocabulary) after warmup (worse than "
        f"a uniform guess) is retrained at half its lr, up to {MAX_RETRAINS} times, and only the retrain counts"
    )
    if not redone:
        return rule + "; no run needed it."
    items = "; ".join(f"{d['run_id']} ({d['why']}) at lr {d['retrain_lr']:g}" for d in redone)
    return rule + f". Retrained here: {items}."


def _setup(
    records: list[dict[str, Any]], noise: float | None, scale: Scale, settings: SweepSettings, results: Path
) -> list[str]:
    ns = noise_summary(records)
    noise_txt = (
        f"sigma = {noise:.4f} nats, the pooled standard deviation of the final validation loss over "
        f"{ns['n_seeds']}+ seeds of the same run (each seed changes the init and the data order; the "
        "train/val split is fixed)"
        if noise is not None
        else "not measured (no run was repeated with other seeds)"
    )
    lrs = lr_choices(records)
    if lrs:
        lr_txt = "; ".join(
            f"{f} {c.best:g}{'' if c.bracketed else ' (an end of those tried)'}" for f, c in sorted(lrs.items())
        )
        lr_line = (
            f"- Learning rate per family, from a sweep at {format_budget(next(iter(lrs.values())).budget)} FLOPs on "
            f"{next(iter(lrs.values())).shape}: {lr_txt}. Every run of a family trains at its lr; MoD variants "
            "at MoD's (table in section 1)."
        )
    else:
        lr_line = f"- Learning rate: {settings.lr:g} for every run (no sweep)."
    unit = "nats per byte" if settings.tokenizer == "byte" else "nats per token (bits per byte in the tables)"
    note = scale.tokenizer_note if settings.tokenizer == scale.settings.tokenizer else ""  # not for --tokenizer
    tokens = settings.batch_size * settings.seq_len
    return [
        "## Setup\n",
        f"- Data: the bundled enwiki sample ({'default' if settings.data in (None, 'enwiki') else settings.data}), "
        f"{settings.tokenizer_label()}, whole documents held out for validation (split seed "
        f"{settings.split_seed}, the same for every run); loss in {unit}. {note}".rstrip(),
        f"- Training: AdamW, warmup {settings.warmup_frac:.0%} of steps, cosine to {settings.min_lr_ratio:g} x lr "
        f"over each run, batch {settings.batch_size} sequences x {settings.seq_len} tokens = {tokens:,} tokens per "
        f"step for every run (so a larger model trains for fewer steps), weight decay {settings.weight_decay:g}, "
        + (
            f"weights drawn with std {settings.init_gain:g} / sqrt(width) ({_init_range(scale, settings)}; "
            "0.02 at width 768, as GPT-2). "
            if settings.init_gain is not None
            else f"weights drawn with std {ModelConfig.init_std:g} at every width. "
        )
        + "The number of steps of each run is round(budget / FLOPs per step), so each run spends its budget to "
        "within 1%. " + ("Each run's model is torch.compiled." if settings.compile else scale.compile_note),
        lr_line,
        "- FLOPs: `modlm.flops` (matmuls only, attention as the full square, routed blocks at their capacity, "
        "router and predictor included, training = forward + backward; checked against "
        "`torch.utils.flop_counter` in `tests/test_flops.py`). Evaluation FLOPs are not counted.",
        f"- isoFLOP budgets {', '.join(format_budget(b) for b in scale.budgets)}, on the shape ladder "
        f"{', '.join(s.name for s in scale.shapes)} (dWLn = width W x depth L, head size {settings.head_dim}), "
        f"runs of {settings.min_steps}-{settings.max_steps} steps. Each curve starts with {scale.window} shapes "
        f"around ~{scale.tokens_per_param:g} tokens per parameter and is extended a shape at a time (up to "
        f"{scale.max_extensions}) until its best shape has a measured smaller and larger neighbour; the "
        f"optimum is the vertex of the parabola (loss vs log parameters) through those three, each the mean "
        f"over seeds {', '.join(str(s) for s in scale.seeds)}. MoD = learned expert-choice routing, capacity "
        "12.5%, every other block, causal predictor (the paper's best setting).",
        f"- Variants: shape {scale.variant_shape.name} at {format_budget(scale.variant_budget)} FLOPs, one seed.",
        _stability_line(results),
        "- Final validation loss: "
        f"{settings.eval_batches * settings.batch_size} windows of {settings.seq_len} tokens spread over the "
        "validation split, top-k routing unless stated.",
        f"- Noise: {noise_txt}. **holds?** is *yes* when our difference has the paper's sign and exceeds "
        f"{VERDICT_SIGMAS:g} sigma, *no* when it has the opposite sign beyond that, *within noise* otherwise; "
        f"*{NOT_BRACKETED}* when an isoFLOP optimum could not be bracketed (no verdict).\n",
    ]


def _init_range(scale: Scale, settings: SweepSettings) -> str:
    """'0.040-0.14 on this ladder': the init std at the ladder's widest and narrowest shapes."""
    widths = [sh.d_model for sh in scale.shapes]
    hi, lo = (settings.init_gain / math.sqrt(w) for w in (min(widths), max(widths)))
    return f"{lo:.2g}-{hi:.2g} on this ladder"


def _section(
    sec: str, rows: list[Claim], records: list[dict[str, Any]], figs: dict[str, str], results: Path
) -> list[str]:
    """One part of the paper: its claim table, its figures and, for isoFLOP and variants, the runs."""
    L = [f"## {sec}\n"]
    L.append(_md_table(["claim", "paper", "ours", "holds?"], [(c.claim, c.paper, c.ours, c.holds) for c in rows]))
    L.append("")
    for key in FIGURES_OF_SECTION.get(sec, []):
        if key in figs:
            L.append(f"![{key}]({figs[key]})\n")
            L.append(f"*{CAPTIONS[key]}*\n")
    if sec == S1:
        L.extend(_lr_table(records))
        L.append(_isoflop_table(records))
        L.extend(_bracket_notes(records, results))
    if sec == S2:
        L.append(_variant_table(records))
    return L


def _disagreements(claims: list[Claim]) -> list[str]:
    L = ["## Where ours disagrees with the paper, and why we think it does\n"]
    off = [c for c in claims if c.holds not in ("yes", "n/a", NOT_BRACKETED)]
    if not off:
        L.append("Every claim we could test holds at this scale.\n")
    for c in off:
        L.append(f"- **{c.claim}** — ours: {c.holds}. {c.why_not}")
    undecided = [c for c in claims if c.holds == NOT_BRACKETED]
    if undecided:
        L.append(
            "\nNo verdict (an isoFLOP optimum is not bracketed, see section 1): "
            + "; ".join(c.claim for c in undecided)
            + "."
        )
    missing = [c for c in claims if c.holds == "n/a"]
    if missing:
        L.append("\nNot run (the sweep is incomplete): " + "; ".join(c.claim for c in missing) + ".")
    L.append(
        "\nThese explanations are hypotheses about scale, not measurements; the `--scale gpu` setting "
        "(with a larger corpus) is the way to test them.\n"
    )
    return L


def _all_runs(records: list[dict[str, Any]], settings: SweepSettings) -> list[str]:
    rows = []
    n_train = train_tokens(settings)
    for r in sorted(records, key=lambda r: (r["budget"], r["family"], r["params"])):
        epochs = (r.get("tokens_seen") or 0) / max(1, n_train)
        rows.append(
            (
                r["run_id"],
                r["family"],
                format_params(r["params"]),
                r["steps"],
                r.get("seed", 0),
                f"{r.get('train', {}).get('lr', float('nan')):g}",
                f"{r['train_flops']:.3g}",
                f"{r['val_loss']:.4f}",
                f"{r['val_bpb']:.3f}",
                f"{r['val_loss_causal']:.4f}" if r.get("val_loss_causal") is not None else "",
                f"{epochs:.2f}",
                f"{(r.get('elapsed_s') or 0):.0f}",
            )
        )
    return [
        "## All runs\n",
        _md_table(
            [
                "run",
                "family",
                "params",
                "steps",
                "seed",
                "lr",
                "train FLOPs",
                "val loss",
                "val bpb",
                "val loss (causal)",
                "epochs",
                "seconds",
            ],
            rows,
        ),
        "",
    ]


def _bracket_notes(records: list[dict[str, Any]], results: Path) -> list[str]:
    """One line per isoFLOP curve whose optimum is not bracketed, with the limit the study hit."""
    why = {(c["budget"], c["family"]): c.get("why", "") for c in (read_study(results) or {}).get("curves", [])}
    notes = []
    for (b, fam), o in sorted(curve_optima(isoflop_runs(records)).items()):
        if not o.bracketed:
            reason = why.get((b, fam)) or "the best shape is an end of the measured curve"
            notes.append(
                f"- Not bracketed: the {fam} optimum at {format_budget(b)} FLOPs ({o.shape}): {reason}. "
                "No verdict is drawn at this budget."
            )
    return notes + ([""] if notes else [])


def _lr_table(records: list[dict[str, Any]]) -> list[str]:
    """The learning-rate sweep: final validation loss per lr and family, the chosen one marked."""
    choices = lr_choices(records)
    if not choices:
        return []
    rows = []
    for fam, c in sorted(choices.items()):
        cells = ", ".join(f"{lr:g}: {loss:.4f}" + (" (best)" if lr == c.best else "") for lr, loss in c.losses.items())
        rows.append((fam, f"{c.shape} at {format_budget(c.budget)}", cells, "yes" if c.bracketed else "no"))
    return [
        "Learning-rate sweep (each family then trains at its best lr):\n",
        _md_table(["family", "run", "lr: val loss", "best lr bracketed?"], rows),
        "",
    ]


def _isoflop_table(records: list[dict[str, Any]]) -> str:
    """Every shape of every curve: mean loss over its seeds, their spread, and the optimum."""
    rows = []
    for (b, fam), o in sorted(curve_optima(isoflop_runs(records)).items()):
        for p in o.points:
            r = p.records[0]
            spread = f"{min(p.losses):.4f}-{max(p.losses):.4f}" if len(p.losses) > 1 else ""
            rows.append(
                (
                    format_budget(b),
                    fam,
                    p.shape + (" (best)" if p is o.best else ""),
                    format_params(p.params),
                    r["steps"],
                    f"{r.get('lr') or r.get('train', {}).get('lr', float('nan')):g}",
                    f"{p.forward_flops_per_token:.3g}",
                    f"{p.loss:.4f}",
                    len(p.losses),
                    spread,
                )
            )
        rows.append(
            (
                format_budget(b),
                fam,
                "**optimum**" + ("" if o.bracketed else " (NOT bracketed)"),
                format_params(o.params),
                "",
                "",
                "",
                f"{o.loss:.4f}",
                "",
                "fit through the best and its neighbours" if o.bracketed else "the best measured shape",
            )
        )
    return (
        _md_table(
            [
                "budget",
                "family",
                "shape",
                "params",
                "steps",
                "lr",
                "fwd FLOPs/token",
                "val loss (mean)",
                "seeds",
                "range",
            ],
            rows,
        )
        + "\n"
    )


def _variant_table(records: list[dict[str, Any]]) -> str:
    rows = []
    for v in VARIANTS:
        r = variant_record(records, v.key)
        if r is None:
            continue
        rows.append(
            (
                v.label,
                r["steps"],
                f"{r['lr']:g}" if r.get("lr") is not None else "",
                f"{r['forward_flops_per_token']:.3g}",
                f"{r['val_loss']:.4f}",
                f"{r['val_loss_causal']:.4f}" if r.get("val_loss_causal") is not None else "",
                f"{r['causal_routed_frac']:.3f}" if r.get("causal_routed_frac") is not None else "",
            )
        )
    return (
        _md_table(
            [
                "variant",
                "steps",
                "lr",
                "fwd FLOPs/token",
                "val loss (top-k)",
                "val loss (causal)",
                "causal routed fraction",
            ],
            rows,
        )
        + "\n"
    )
