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

from modlm.adapt.config import AdaptConfig
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


def _record(step: int, out, routers: list, t0: float) -> dict[str, Any]:
    """One logged record: the step's losses, the predictors' accuracy, the training capacity."""
    rec = {
        "step": step,
        "lm_loss": float(out.lm_loss.detach()),
        "aux_loss": float(out.aux_loss.detach()),
        "s": round(time.perf_counter() - t0, 1),
    }
    accs = [v for k, v in out.router_stats().items() if k.endswith("/pred_acc")]
    if accs:
        rec["pred_acc"] = sum(accs) / len(accs)
    rec["capacity"] = round(routers[0].capacity, 4)
    return rec


def _train(
    model: MoDTransformer,
    tokens: np.ndarray,
    cfg: AdaptConfig,
    gen: torch.Generator,
    log: Callable[[dict[str, Any]], None] | None,
    log_every: int,
) -> list[dict[str, Any]]:
    """``cfg.steps`` AdamW steps on the trainable (routing) parameters under top-k routing, the
    training capacity annealed from 1 to ``cfg.capacity`` over the first ``cfg.anneal`` of them."""
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.0), lr=cfg.lr)
    groups = clip_groups(model)
    device = next(model.parameters()).device
    routers = [model.blocks[i].router for i in model.config.routed_layers]
    history: list[dict[str, Any]] = []
    model.train()
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        ramp = min(1.0, (step - 1) / (cfg.anneal * cfg.steps)) if cfg.anneal > 0 else 1.0
        for r in routers:  # the training capacity; the config keeps the target
            r.capacity = 1.0 - ramp * (1.0 - cfg.capacity)
        x_BT, y_BT = _training_batch(tokens, cfg, gen, device)
        out = model(x_BT, y_BT)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.grad_clip > 0:
            clip_gradients(groups, cfg.grad_clip)
        opt.step()
        if step % log_every == 0 or step == cfg.steps:
            history.append(_record(step, out, routers, t0))
            if log is not None:
                log(history[-1])
    for r in routers:
        r.capacity = cfg.capacity
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

    Each step draws ``batch_size`` random windows and minimises the LM loss plus the routers'
    aux losses under top-k routing at the capacity. Only parameters with ``requires_grad`` (the
    routing roles, after ``adapt_model``) receive gradients; an A-MoD model's LM loss reaches
    none of them, so its backward runs through its predictors only. Then the thresholds are
    calibrated to the capacity on ``calib_tokens`` tokens of random windows. Returns the logged
    records ({step, lm_loss, aux_loss, s, [pred_acc], capacity} every ``log_every`` steps).
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
    """``modlm adapt``: read a dense checkpoint, adapt it (``adapt_model`` + ``tune_routers``) on the
    training split of ``data`` (None: the bundled enwiki sample) in the model's own tokens, and
    save it with its tokenizer to ``out``. Returns ``out``."""
    from modlm.training.checkpoint import load_model, load_tokenizer_from_checkpoint, save_checkpoint
    from modlm.training.corpus import prepare_corpus

    dense = load_model(src)
    tok = load_tokenizer_from_checkpoint(src)
    model = adapt_model(dense, cfg.router, cfg.capacity, cfg.layers)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(
        f"# adapt {src} -> {out}: router={cfg.router} capacity={cfg.capacity:g} "
        f"layers={list(model.config.routed_layers)} seq_len={cfg.seq_len} batch={cfg.batch_size} "
        f"steps={cfg.steps} lr={cfg.lr:g}; {n_train:,} trainable parameters, the base frozen"
    )
    corpus = prepare_corpus(data, cache_dir=cache_dir, tokenizer=tok)
    log(f"# text sample: {len(corpus.train):,} training tokens ({corpus.meta.get('source', data or 'enwiki')})")

    def show(rec: dict[str, Any]) -> None:
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))

    history = tune_routers(model, corpus.train, cfg, log=show)
    save_checkpoint(
        out,
        model,
        model.config,
        train_config={"adapt": asdict(cfg) | {"layers": list(model.config.routed_layers)}, "source": str(src)},
        extra_state={"adapt_history": history},
        tokenizer=tok,
    )
    return Path(out)
