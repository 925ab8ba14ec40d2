"""PNG plots of isoFLOP sweeps and routing analyses (matplotlib, Agg backend; no display needed).

Every function takes plain records (dicts from ``runs.jsonl`` / ``analysis.json``) and a path,
writes one PNG and returns the path, so plots can be regenerated from a results folder alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modlm.experiments.isoflop import isoflop_optima

FAMILY_STYLE = {
    "dense": dict(color="#444444", marker="o", linestyle="--"),
    "mod": dict(color="#d62728", marker="s", linestyle="-"),
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(family: str, i: int) -> dict[str, Any]:
    if family in FAMILY_STYLE:
        return dict(FAMILY_STYLE[family])
    colors = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#ff7f0e"]
    return dict(color=colors[i % len(colors)], marker="^", linestyle="-.")


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def _budget_label(b: float) -> str:
    return f"{b:.2g} FLOPs"


def plot_isoflop(records: Sequence[dict[str, Any]], path: str | Path, ylabel: str = "nats/byte") -> Path:
    """Final validation loss vs parameters: one curve per (budget, family), one point per shape
    (the mean over its seeds; bars: their min-max), the optimum starred (the fit through a
    bracketed curve's best shape and its neighbours; an open star: not bracketed).

    Colour shade = budget (darker = more FLOPs); line style and marker = family.
    """
    from modlm.experiments.curves import curve_optima

    plt = _plt()
    recs = [r for r in records if r.get("val_loss") is not None and "isoflop" in r.get("tags", ["isoflop"])]
    recs = [dict(r, tags=["isoflop"]) for r in recs]
    optima = curve_optima(recs)
    fams = sorted({f for _, f in optima}, key=lambda f: (f != "dense", f))
    budgets = sorted({b for b, _ in optima})
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for fi, fam in enumerate(fams):
        st = _style(fam, fi)
        for bi, b in enumerate(budgets):
            opt = optima.get((b, fam))
            if opt is None:
                continue
            alpha = 0.45 + 0.55 * (bi + 1) / len(budgets)
            xs = [p.params for p in opt.points]
            ys = [p.loss for p in opt.points]
            err = [
                [y - min(p.losses) for y, p in zip(ys, opt.points)],
                [max(p.losses) - y for y, p in zip(ys, opt.points)],
            ]
            ax.errorbar(
                xs,
                ys,
                yerr=err,
                color=st["color"],
                marker=st["marker"],
                linestyle=st["linestyle"],
                alpha=alpha,
                capsize=2,
                label=f"{fam}, {_budget_label(b)}",
            )
            ax.plot(
                [opt.params],
                [opt.loss],
                marker="*",
                markersize=16,
                color=st["color"] if opt.bracketed else "white",
                alpha=alpha,
                markeredgecolor="black",
                linestyle="none",
            )
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"final validation loss ({ylabel}), mean over seeds")
    ax.set_title("isoFLOP curves (star: fitted optimum; open star: not bracketed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_loss_vs_flops(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Training loss vs training FLOPs of every isoFLOP run (thin), the isoFLOP-optimal runs bold.

    Final validation losses are the markers at the end of the bold curves.
    """
    plt = _plt()
    recs = [r for r in records if r.get("train_curve") and "isoflop" in r.get("tags", ["isoflop"])]
    fams = sorted({r["family"] for r in recs}, key=lambda f: (f != "dense", f))
    best = isoflop_optima(recs)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for fi, fam in enumerate(fams):
        st = _style(fam, fi)
        for r in recs:
            if r["family"] != fam:
                continue
            xs = [s * r["flops_per_step"] for s, _ in r["train_curve"]]
            ys = [v for _, v in r["train_curve"]]
            bold = best.get((r["budget"], fam)) is r
            ax.plot(
                xs,
                _smooth(ys),
                color=st["color"],
                linestyle=st["linestyle"],
                linewidth=2.2 if bold else 0.6,
                alpha=1.0 if bold else 0.35,
                label=f"{fam} optimal @ {_budget_label(r['budget'])}: {r['shape']['d_model']}x{r['shape']['n_layers']}"
                if bold
                else None,
            )
            if bold:
                ax.plot(
                    [r["train_flops"]],
                    [r["val_loss"]],
                    marker=st["marker"],
                    color=st["color"],
                    markersize=8,
                    markeredgecolor="black",
                )
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("training loss (nats/byte, smoothed); markers: final val loss")
    ax.set_title("loss vs training FLOPs")
    ys_all = [v for r in recs for _, v in r["train_curve"][len(r["train_curve"]) // 4 :]]
    if ys_all:
        ax.set_ylim(min(ys_all) - 0.05, sorted(ys_all)[int(0.98 * (len(ys_all) - 1))] + 0.1)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _smooth(ys: Sequence[float], k: int = 3) -> list[float]:
    out = []
    for i in range(len(ys)):
        w = ys[max(0, i - k + 1) : i + 1]
        out.append(sum(w) / len(w))
    return out


def plot_variants(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    reference: float | None = None,
    noise: float | None = None,
    title: str = "variants at equal training FLOPs",
) -> Path:
    """Horizontal bars of final validation loss, one per variant (``rows``: label, val_loss, group).

    ``reference``: a vertical line (the isoshape dense model); ``noise``: a band of +-noise around
    the best bar (the seed-to-seed difference).
    """
    plt = _plt()
    rows = list(rows)
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.4))
    groups = sorted({r.get("group", "") for r in rows}, key=[r.get("group", "") for r in rows].index)
    colors = {g: _style(g, i)["color"] for i, g in enumerate(groups)}
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, [r["val_loss"] for r in rows], color=[colors[r.get("group", "")] for r in rows], alpha=0.8)
    for y, r in zip(ys, rows):
        ax.text(r["val_loss"], y, f" {r['val_loss']:.4f}", va="center", fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels([r["label"] for r in rows], fontsize=8)
    lo = min(r["val_loss"] for r in rows)
    hi = max(r["val_loss"] for r in rows)
    if reference is not None:
        ax.axvline(reference, color="black", linestyle="--", linewidth=1, label=f"isoshape dense {reference:.4f}")
        lo, hi = min(lo, reference), max(hi, reference)
    if noise:
        ax.axvspan(lo - noise, lo + noise, color="grey", alpha=0.2, label=f"best +- seed noise ({noise:.4f})")
    span = max(hi - lo, 1e-3)
    ax.set_xlim(lo - 0.3 * span, hi + 0.35 * span)
    ax.set_xlabel("final validation loss (nats/byte), lower is better")
    ax.set_title(title)
    if reference is not None or noise:
        ax.legend(
            fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.6 / max(1, len(rows))), ncol=2, frameon=False
        )
    return _save(fig, path)


def plot_router_accuracy(curves: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Causal-routing accuracy per routed layer over training, one panel per model.

    ``curves``: {panel title: router_curve} where router_curve has 'step' and 'L{i}/pred_acc' or
    'L{i}/aux_acc' (and optionally 'L{i}/pred_recall') lists, as stored in runs.jsonl.
    """
    plt = _plt()
    n = max(1, len(curves))
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)
    for ax, (title, curve) in zip(axes[0], curves.items()):
        steps = curve.get("step", [])
        for key in sorted(k for k in curve if k.endswith(("/pred_acc", "/aux_acc"))):
            ax.plot(steps, curve[key], label=f"{key.split('/')[0]} accuracy")
        for key in sorted(k for k in curve if k.endswith("/pred_recall")):
            ax.plot(steps, curve[key], linestyle=":", label=f"{key.split('/')[0]} recall (routed tokens)")
        ax.axhline(0.97, color="grey", linestyle="--", linewidth=0.8, label="paper: ~97% early")
        ax.axhline(0.99, color="grey", linestyle="-.", linewidth=0.8, label="paper: up to 99%")
        ax.set_ylim(0.0, 1.01)
        ax.set_xlabel("training step")
        ax.set_ylabel("causal routing vs top-k membership")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_routing_heatmap(heatmaps: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Which routed blocks processed which tokens of a text sample (paper Fig. 1 style).

    ``heatmaps``: [{title, tokens: [str per token], layers: [block index], mask: [[0/1] * T] per
    routed block}]. Dark cell = the block processed the token; light = it skipped it.
    """
    plt = _plt()
    from matplotlib.colors import ListedColormap

    n = max(1, len(heatmaps))
    T = max(len(h["tokens"]) for h in heatmaps) if heatmaps else 1
    fig, axes = plt.subplots(
        n, 1, figsize=(min(24, 0.16 * T + 2), sum(0.32 * len(h["layers"]) + 1.3 for h in heatmaps)), squeeze=False
    )
    cmap = ListedColormap(["#f2f2f2", "#1f4e99"])
    for ax, h in zip(axes[:, 0], heatmaps):
        ax.imshow(h["mask"], aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(h["layers"])))
        ax.set_yticklabels([f"block {i}" for i in h["layers"]], fontsize=7)
        ax.set_xticks(range(len(h["tokens"])))
        ax.set_xticklabels([_show(t) for t in h["tokens"]], fontsize=8, family="monospace")
        ax.tick_params(axis="x", length=0)
        ax.set_title(h["title"], fontsize=9)
    return _save(fig, path)


def _show(tok: str) -> str:
    return {"\n": "\u21b5", " ": "\u2423", "\t": "\u21e5"}.get(tok, tok if tok.isprintable() else "?")


def plot_depth_entropy(analyses: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Per model: share of tokens by number of routed blocks used, and mean prediction entropy by it."""
    plt = _plt()
    n = max(1, len(analyses))
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)
    for ax, a in zip(axes[0], analyses):
        depths = a["depth_values"]
        share = a["depth_share"]
        ax.bar(depths, share, color="#9fb7d9", label="share of tokens")
        ax.set_xlabel(f"routed blocks that processed the token (of {a['n_routed']})")
        ax.set_ylabel("share of tokens")
        ax.set_xticks(depths)
        ax2 = ax.twinx()
        ent = [e if e is not None else math.nan for e in a["entropy_by_depth"]]
        ax2.plot(depths, ent, color="#d62728", marker="o", label="mean entropy of the prediction")
        ax2.set_ylabel("entropy (nats)", color="#d62728")
        ax.set_title(
            f"{a['title']}\nSpearman rho = {a['spearman']:.3f}, Pearson r = {a['pearson']:.3f} (n = {a['n_tokens']:,})",
            fontsize=8,
        )
    return _save(fig, path)
