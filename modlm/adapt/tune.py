"""Tuning the routers of an adapted model, and ``modlm adapt`` end to end (checkpoint in and out).

The loop is made of the trainer's pieces: AdamW over the optimizer groups read off the parameter
roles (``modlm.training.optim.param_groups``: only what ``adapt_model`` left trainable), the
per-group gradient clipping (``clip_gradients``, off by default), random windows drawn by
``modlm.training.batching.get_batch`` from a seeded generator, and ``save_checkpoint``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from modlm.adapt.config import AdaptConfig
from modlm.adapt.distill import original_logits, training_loss
from modlm.adapt.guards import CollapseGuard, heldout_report, heldout_windows
from modlm.adapt.layers import remove_least_influential
from modlm.adapt.routers import adapt_model
from modlm.inference.calibrate import calibrate_thresholds
from modlm.model.transformer import MoDTransformer
from modlm.training.batching import get_batch
from modlm.training.optim import clip_gradients, clip_groups, param_groups

__all__ = ["adapt_checkpoint", "tune_routers"]


def _as_stream(tokens: np.ndarray | torch.Tensor) -> np.ndarray:
    """A 1-D token stream as numpy (a memmap stays one: it is read lazily)."""
    return tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else tokens


def _training_batch(tokens: np.ndarray, cfg: AdaptConfig, gen: torch.Generator, device: torch.device):
    """``batch_size`` random (x_BT, y_BT) windows of ``seq_len`` + 1 tokens.

    NOTE: drawn from all but the last token, so windows start in [0, N - T - 2]: the way
    adaptation has always sampled, so a seed draws the windows (and makes the adapted models) it
    always did; all N tokens would shift every draw by the one start more.
    """
    if len(tokens) < cfg.seq_len + 2:
        raise ValueError(
            f"the text sample has {len(tokens)} tokens, too few for a training window of "
            f"seq_len+1={cfg.seq_len + 1} tokens (at least {cfg.seq_len + 2})"
        )
    return get_batch(tokens[:-1], cfg.batch_size, cfg.seq_len, gen, device)


def _record(step: int, out, parts: dict[str, float], original_loss: float | None, routers: list, t0: float):
    """One logged record: the step's losses (the original's LM loss on the batch when measured),
    the predictors' accuracy, the training capacity."""
    rec = {
        "step": step,
        "lm_loss": float(out.lm_loss.detach()),
        "aux_loss": float(out.aux_loss.detach()),
        **parts,
    }
    if original_loss is not None:
        rec["orig_lm_loss"] = original_loss
    rec["s"] = round(time.perf_counter() - t0, 1)
    accs = [v for k, v in out.router_stats().items() if k.endswith("/pred_acc")]
    if accs:
        rec["pred_acc"] = sum(accs) / len(accs)
    rec["capacity"] = round(routers[0].capacity, 4)
    return rec


def _advice(model: MoDTransformer, cfg: AdaptConfig) -> str:
    """What to change after a collapse, with the values this run used."""
    n = len(model.config.routed_layers)
    return (
        f"Lower --lr (now {cfg.lr:g}), raise --capacity (now {cfg.capacity:g}), route fewer --layers "
        f"(now {n}), or try --method remove-layers."
    )


def _step_losses(model: MoDTransformer, x_BT, y_BT, cfg: AdaptConfig, guard: CollapseGuard):
    """One forward: the adapted model's output, the loss to minimise, its logged parts and the
    original's LM loss on the batch (None when neither the loss nor the guard needs the original)."""
    original_BTV = original_loss = None
    if cfg.loss != "lm" or guard.active:
        original_BTV = original_logits(model, x_BT)  # (B, T, V), no gradients
        original_loss = float(F.cross_entropy(original_BTV.flatten(0, 1), y_BT.reshape(-1), ignore_index=-1))
    out = model(x_BT, y_BT)
    loss, parts = training_loss(out, original_BTV, cfg.loss)
    return out, loss, parts, original_loss


def _train(
    model: MoDTransformer,
    tokens: np.ndarray,
    cfg: AdaptConfig,
    gen: torch.Generator,
    log: Callable[[dict[str, Any]], None] | None,
    log_every: int,
) -> list[dict[str, Any]]:
    """``cfg.steps`` AdamW steps on the trainable (routing) parameters under top-k routing, the
    training capacity annealed from 1 to ``cfg.capacity`` over the first ``cfg.anneal`` of them;
    ``CollapseGuard`` watches the LM loss against the original's (``AdaptationCollapsed``)."""
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.0), lr=cfg.lr)
    groups = clip_groups(model)
    device = next(model.parameters()).device
    routers = [model.blocks[i].router for i in model.config.routed_layers]
    if cfg.router == "gate":  # its compute term (modlm.routing.gate)
        for r in routers:
            r.compute_weight = cfg.compute_weight
    guard = CollapseGuard(model.config.vocab_size, cfg.max_loss_rise, _advice(model, cfg))
    history: list[dict[str, Any]] = []
    model.train()
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        ramp = min(1.0, (step - 1) / (cfg.anneal * cfg.steps)) if cfg.anneal > 0 else 1.0
        for r in routers:  # the training capacity; the config keeps the target
            r.capacity = 1.0 - ramp * (1.0 - cfg.capacity)
        x_BT, y_BT = _training_batch(tokens, cfg, gen, device)
        out, loss, parts, original_loss = _step_losses(model, x_BT, y_BT, cfg, guard)
        if original_loss is not None:
            guard.check(step, float(out.lm_loss.detach()), original_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            clip_gradients(groups, cfg.grad_clip)
        opt.step()
        if step % log_every == 0 or step == cfg.steps:
            history.append(_record(step, out, parts, original_loss, routers, t0))
            if log is not None:
                log(history[-1])
    for r in routers:
        r.capacity = cfg.capacity
        if cfg.router == "gate":
            r.compute_weight = 0.0  # the term is for training only
    model.eval()
    return history


def tune_routers(
    model: MoDTransformer,
    tokens: np.ndarray | torch.Tensor,
    cfg: AdaptConfig,
    log: Callable[[dict[str, Any]], None] | None = None,
    log_every: int = 10,
) -> list[dict[str, Any]]:
    """Train the routing parameters of ``model`` on ``tokens`` (a 1-D id stream), then calibrate.

    Each step draws ``batch_size`` random windows and minimises ``cfg.loss`` (the KL to the
    original's next-token distribution on the batch, the LM loss, or both:
    ``modlm.adapt.distill.training_loss``) plus the routers' aux losses under top-k routing at
    the capacity. Only parameters with ``requires_grad`` (the routing roles, after
    ``adapt_model``) receive gradients; an A-MoD model's LM loss and KL reach none of them, so its
    backward runs through its predictors only. ``CollapseGuard`` stops a run whose LM loss runs
    far above the original's (``AdaptationCollapsed``, before anything is calibrated). Then the
    thresholds are calibrated to the capacity on ``calib_tokens`` tokens of random windows.
    Returns the logged records ({step, lm_loss, aux_loss, [kl], [orig_lm_loss], s, [pred_acc],
    capacity} every ``log_every`` steps).
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    tokens = _as_stream(tokens)
    history: list[dict[str, Any]] = []
    if cfg.steps and any(p.requires_grad for p in model.parameters()):
        history = _train(model, tokens, cfg, gen, log, log_every)
    n_rows = max(1, math.ceil(cfg.calib_tokens / cfg.seq_len))
    calib_BT, _ = get_batch(tokens, n_rows, cfg.seq_len, gen, next(model.parameters()).device)
    calibrate_thresholds(model, calib_BT, cfg.capacity)
    return history


def adapt_checkpoint(
    src: str | Path,
    out: str | Path,
    cfg: AdaptConfig,
    data: str | None = None,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """``modlm adapt``: read a dense checkpoint, adapt it by ``cfg.method`` on the training split
    of ``data`` (None: the bundled enwiki sample) in the model's own tokens, measure the adapted
    and original models' held-out perplexities (``heldout_report``, on the validation split) and
    save the adapted model with its tokenizer and those figures to ``out``. Returns ``out``.

    A collapsed router tuning raises ``AdaptationCollapsed`` and writes nothing."""
    from modlm.training.checkpoint import load_model, load_tokenizer_from_checkpoint, save_checkpoint
    from modlm.training.corpus import prepare_corpus

    dense = load_model(src)
    tok = load_tokenizer_from_checkpoint(src)
    if dense.config.routed_layers:
        raise ValueError(f"model {dense.config.name!r} is already routed: adapt a dense (converted) model")
    adapt = _prepare(dense, cfg, log)  # before reading the text: a bad setting fails at once
    corpus = prepare_corpus(data, cache_dir=cache_dir, tokenizer=tok)
    source = corpus.meta.get("source", data or "enwiki")
    log(f"# text sample: {len(corpus.train):,} training and {len(corpus.val):,} held-out tokens ({source})")
    # Before the work, so a text too short to evaluate on fails at once.
    windows = heldout_windows(corpus.val, min(cfg.seq_len, dense.config.max_seq_len), cfg.eval_tokens)
    model, settings, extra = adapt(corpus.train)
    report = heldout_report(dense, model, windows)
    log(
        f"# held-out perplexity as decoding (causal routing, {report['eval_tokens']:,} validation tokens never "
        f"seen in adaptation): adapted {report['ppl_adapted']:.2f} vs original {report['ppl_original']:.2f} "
        f"(x{report['ppl_adapted'] / report['ppl_original']:.2f}); block compute kept {report['compute_kept']:.3f}"
    )
    save_checkpoint(
        out,
        model,
        model.config,
        train_config={"adapt": asdict(cfg) | settings, "source": str(src), "eval": report},
        extra_state=extra,
        tokenizer=tok,
    )
    return Path(out)


def _prepare(dense: MoDTransformer, cfg: AdaptConfig, log: Callable[[str], None]):
    """Check ``cfg`` against ``dense`` and say what will be done; returns ``run(train)``, which
    does it on a training stream and returns (model, resolved settings, extra state)."""
    if cfg.method == "remove-layers":
        n_drop = cfg.layers_to_drop(dense.config.n_layers)
        return lambda train: _remove_layers(dense, train, n_drop, cfg, log)
    model = adapt_model(dense, cfg.router, cfg.capacity, cfg.layers)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(
        f"# adapt by router tuning: router={cfg.router} capacity={cfg.capacity:g} "
        f"layers={list(model.config.routed_layers)} loss={cfg.loss} seq_len={cfg.seq_len} batch={cfg.batch_size} "
        f"steps={cfg.steps} lr={cfg.lr:g} max_loss_rise={cfg.max_loss_rise:g}; {n_train:,} trainable parameters, "
        "the base frozen"
    )
    return lambda train: _tune(model, train, cfg, log)


def _tune(model: MoDTransformer, train: np.ndarray, cfg: AdaptConfig, log: Callable[[str], None]):
    """``--method tune-routers`` on ``model`` (``adapt_model``'s): the routers tuned and calibrated.
    Returns the model, the resolved settings and the training history."""

    def show(rec: dict[str, Any]) -> None:
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))

    history = tune_routers(model, train, cfg, log=show)
    return model, {"layers": list(model.config.routed_layers)}, {"adapt_history": history}


def _remove_layers(dense: MoDTransformer, train: np.ndarray, n_drop: int, cfg: AdaptConfig, log):
    """``--method remove-layers``: ``dense`` without its ``n_drop`` least influential blocks,
    ranked on ``calib_tokens`` tokens of seeded training windows. Returns the model, the resolved
    settings (the layers removed, the influence) and no extra state."""
    gen = torch.Generator().manual_seed(cfg.seed)
    n_rows = max(1, math.ceil(cfg.calib_tokens / cfg.seq_len))
    calib_BT, _ = _calibration_batch(train, n_rows, min(cfg.seq_len, dense.config.max_seq_len), gen, dense)
    model, drop, influence = remove_least_influential(dense, calib_BT, n_drop)
    log(
        f"# adapt by layer removal: {dense.config.n_layers} -> {model.config.n_layers} layers, removed {list(drop)} "
        f"(lowest block influence on {calib_BT.numel():,} tokens; the first and last layer kept)"
    )
    return model, {"removed": list(drop), "block_influence": influence}, {}


def _calibration_batch(tokens: np.ndarray, n_rows: int, seq_len: int, gen: torch.Generator, model: MoDTransformer):
    """``n_rows`` seeded windows of ``seq_len`` tokens (fewer if the sample is short), on ``model``'s device."""
    device = next(model.parameters()).device
    T = min(seq_len, len(tokens) - 1)
    if T < 1:
        raise ValueError(f"the text sample has {len(tokens)} tokens, too few to rank the layers on")
    return get_batch(tokens, n_rows, T, gen, device)
