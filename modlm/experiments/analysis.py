"""Routing analysis of trained MoD models: which tokens the routed blocks process, and why.

Reads a few trained checkpoints back: a routing heatmap over a text sample (paper Fig. 1), the
number of routed blocks each token uses ("depth") and its correlation with the entropy of the
model's next-token prediction (paper Fig. 5). ``run_analysis`` writes ``analysis.json`` next to
``runs.jsonl``; the claims and the report read it from there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modlm.experiments.isoflop import PlannedRun, SweepSettings
from modlm.experiments.results import RUNS_DIR, read_results
from modlm.experiments.scales import VARIANT_BY_KEY, Scale

ANALYSIS_FILE = "analysis.json"


def _ranks(values: Sequence[float]) -> list[float]:
    """Average ranks (ties share their mean rank), for Spearman's rho."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0
        i = j + 1
    return ranks


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson's correlation coefficient; nan for fewer than 2 points or a constant series."""
    n = len(xs)
    if n < 2:
        return math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's on average ranks (ties share their mean rank)."""
    return pearson(_ranks(xs), _ranks(ys))


def _token_text(tokenizer, tok: int) -> str:
    """A token's text for the heatmap (through the run's own tokenizer); a middle dot for text
    that does not print (control bytes, a piece of a multi-byte character)."""
    text = tokenizer.decode([tok])
    shows = (text.isprintable() and "\ufffd" not in text) or text in ("\t", "\n")
    return text if text and shows else "\u00b7"


def analyze_run(
    run_dir: str | Path, title: str, val_tokens, settings: SweepSettings, n_sequences: int, heatmap_tokens: int
) -> dict[str, Any]:
    """Routing of a trained MoD model on validation text (top-k routing, as in training).

    Returns the heatmap of one text sample (which routed block processed which token) and, over
    ``n_sequences`` windows, the share of tokens by number of routed blocks used ("depth") and
    Pearson / Spearman correlations of depth with the entropy of the model's next-token
    prediction at that token.
    """
    import numpy as np
    import torch

    from modlm.model.block import route_mask
    from modlm.training.batching import iter_eval_batches
    from modlm.training.checkpoint import load_model, load_tokenizer_from_checkpoint

    model = load_model(run_dir, device="cpu")
    tokenizer = load_tokenizer_from_checkpoint(run_dir)
    cfg = model.config
    T = settings.seq_len
    layers = list(cfg.routed_layers)
    depth_all: list[float] = []
    ent_all: list[float] = []
    with torch.no_grad():
        batches = iter_eval_batches(val_tokens, settings.batch_size, T, math.ceil(n_sequences / settings.batch_size))
        for x_BT, _ in batches:
            out = model(x_BT, routing="topk")
            used_BT = torch.zeros_like(x_BT, dtype=torch.int64)
            for i in layers:
                used_BT += route_mask(out.routes[i], T).long()
            logp_BTV = torch.log_softmax(out.logits.float(), dim=-1)
            ent_BT = -(logp_BTV.exp() * logp_BTV).sum(-1)
            depth_all += used_BT.flatten().tolist()
            ent_all += ent_BT.flatten().tolist()
        # Heatmap sample: a window that starts a paragraph, so the text reads naturally.
        val = np.asarray(val_tokens)
        sep = tokenizer.encode("\n\n")  # the paragraph break in this tokenizer's ids (bytes: 10, 10)
        hit = np.ones(len(val) - len(sep), dtype=bool)
        for j, tok in enumerate(sep):
            hit &= val[j : len(val) - len(sep) + j] == tok
        starts = np.flatnonzero(hit)
        start = int(starts[min(len(starts) - 1, 3)] + len(sep)) if len(starts) else 0
        start = min(start, len(val) - T - 1)
        x_1T = torch.as_tensor(val[start : start + T].astype("int64")).unsqueeze(0)
        out = model(x_1T, routing="topk")
        mask = [route_mask(out.routes[i], T)[0, :heatmap_tokens].int().tolist() for i in layers]
    n = len(layers)
    counts = [sum(1 for d in depth_all if d == k) for k in range(n + 1)]
    ent_by_depth = []
    for k in range(n + 1):
        vals = [e for d, e in zip(depth_all, ent_all) if d == k]
        ent_by_depth.append(sum(vals) / len(vals) if vals else None)
    return {
        "title": title,
        "run_dir": str(run_dir),
        "n_routed": n,
        "layers": layers,
        "capacity": cfg.capacity,
        "n_tokens": len(depth_all),
        "depth_values": list(range(n + 1)),
        "depth_share": [c / max(1, len(depth_all)) for c in counts],
        "entropy_by_depth": ent_by_depth,
        "mean_depth": sum(depth_all) / max(1, len(depth_all)),
        "pearson": pearson(depth_all, ent_all),
        "spearman": spearman(depth_all, ent_all),
        "heatmap": {
            "title": f"{title}: routed blocks x tokens (dark = processed)",
            "tokens": [_token_text(tokenizer, t) for t in x_1T[0, :heatmap_tokens].tolist()],
            "layers": layers,
            "mask": mask,
        },
    }


def run_analysis(
    results_dir: str | Path, scale: Scale, settings: SweepSettings, runs: Sequence[PlannedRun]
) -> dict[str, Any]:
    """Analyse the trained reference MoD and every-block MoD models, and MoD against early exit at
    equal inference FLOPs; writes analysis.json."""
    from modlm.training.corpus import prepare_corpus
    from modlm.training.tokenizers import load_tokenizer

    results = Path(results_dir)
    tokenizer = load_tokenizer(settings.tokenizer_path())  # the runs' own, so the ids are theirs
    corpus = prepare_corpus(settings.data, cache_dir=settings.cache_dir, seed=settings.split_seed, tokenizer=tokenizer)
    finished = read_results(results)
    out: dict[str, Any] = {"models": []}
    for key in ("mod", "every-block"):
        run = next((r for r in runs if f"variant:{key}" in r.tags), None)
        if run is None or run.run_id not in finished:
            continue
        title = f"{VARIANT_BY_KEY[key].label} ({run.shape.name})"
        a = analyze_run(
            results / RUNS_DIR / run.run_id, title, corpus.val, settings, scale.analysis_sequences, scale.heatmap_tokens
        )
        a.update(run_id=run.run_id, variant=key)
        out["models"].append(a)
    early = analyze_early_exit(results, runs, settings, corpus.val, scale.analysis_sequences)
    if early is not None:
        out["early_exit"] = early
    (results / ANALYSIS_FILE).write_text(json.dumps(out, indent=1))
    return out


def analyze_early_exit(
    results_dir: str | Path, runs: Sequence[PlannedRun], settings: SweepSettings, val_tokens, n_sequences: int
) -> dict[str, Any] | None:
    """MoD vs early exit at equal inference FLOPs (claims section 8); None unless both ran.

    On ``n_sequences`` validation windows (at least 2): the MoD model's causal routing (as when
    decoding) is measured, its FLOP fraction of the dense twin's forward counted from the tokens
    each routed block took (``modlm.flops.causal_forward_flops``); the early-exit model's
    threshold is calibrated to that fraction on the first half of the windows and both causal
    losses are measured on the second half.
    """
    import torch

    from modlm.inference.calibrate import (
        calibrate_exit_threshold,
        causal_flop_fraction,
        exit_flop_fraction,
        set_exit_threshold,
    )
    from modlm.inference.evaluation import evaluate_lm, window_batches
    from modlm.training.batching import iter_eval_batches
    from modlm.training.checkpoint import load_model

    results = Path(results_dir)
    finished = read_results(results)
    found = {}
    for key in ("mod", "early-exit"):
        run = next((r for r in runs if f"variant:{key}" in r.tags), None)
        if run is None or run.run_id not in finished:
            return None
        found[key] = run
    T = settings.seq_len
    n_batches = math.ceil(max(2, n_sequences) / settings.batch_size)
    windows = torch.cat(
        [torch.cat([x, y[:, -1:]], 1) for x, y in iter_eval_batches(val_tokens, settings.batch_size, T, n_batches)]
    )
    half = max(1, windows.shape[0] // 2)
    calib, evals = windows[:half, :-1], windows[half:]
    mod = load_model(results / RUNS_DIR / found["mod"].run_id, device="cpu").eval()
    ee = load_model(results / RUNS_DIR / found["early-exit"].run_id, device="cpu").eval()
    mod_frac = causal_flop_fraction(mod, evals[:, :-1])

    def val_loss(model) -> float:
        return evaluate_lm(model, window_batches(model, evals), routing="causal").loss

    set_exit_threshold(ee, 1.0)  # no exits: the early-exit model at full depth
    full_loss, full_frac = val_loss(ee), exit_flop_fraction(ee, evals[:, :-1])
    threshold = calibrate_exit_threshold(ee, calib, mod_frac)
    return {
        "mod_run_id": found["mod"].run_id,
        "early_exit_run_id": found["early-exit"].run_id,
        "n_sequences": int(evals.shape[0]),
        "mod_flop_fraction": mod_frac,
        "mod_val_loss": val_loss(mod),
        "threshold": threshold,
        "early_exit_flop_fraction": exit_flop_fraction(ee, evals[:, :-1]),
        "early_exit_val_loss": val_loss(ee),
        "early_exit_full_val_loss": full_loss,
        "early_exit_full_flop_fraction": full_frac,
    }
