"""Adapting a pretrained (converted) model to Mixture-of-Depths: ``modlm adapt``.

Take a dense checkpoint (``modlm convert`` output), put routers on chosen layers, freeze every
pretrained weight, train only the routing machinery on a text sample at the target capacity,
then calibrate the causal thresholds so decoding routes that capacity. Two routers:

- ``tuned`` (``modlm.routing.tuned``): a zero-initialised score w·x̂ trained through the LM loss
  (straight-through unit weights, so processed tokens compute exactly what the original block
  computes); decodes by thresholding the score.
- ``attention`` (A-MoD, ``modlm.routing.attention_based``): parameter-free top-k of the attention
  received in the previous block; only its stop-gradient decode predictor trains, by BCE on the
  top-k decisions, so nothing backpropagates through the frozen model at all.

Keep-all start: both routers decide causally by thresholding a logit, and every threshold starts
at -inf, so the adapted model, before tuning, processes every token in every layer and computes
exactly what the original does (``x + f(x)``, unit weights). Tuning trains with top-k at the
target capacity; calibration (``modlm.inference.calibrate``) then sets each threshold at the
quantile that routes the capacity on the sample, layer by layer.

Default sizing (SmolLM2-135M, 30 layers, one thread: ~2.2 s a step on a quiet CPU, ~5.4 s on the
shared one the study ran on, so ~10-20 min in all with the calibration): route the later half of the
layers but the last (14..28), sequences of 256 tokens, batch 1, 200 steps, lr 2e-3, the capacity annealed from 1 over the first half. Routing the
later layers follows Router-Tuning (arXiv 2410.13184): early layers build the representation
every later layer reads; the last layer feeds the head directly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modlm.config import ModelConfig
from modlm.inference.calibrate import calibrate_thresholds, set_thresholds
from modlm.model.transformer import MoDTransformer
from modlm.spec import roles
from modlm.validation import is_int, is_number, require

__all__ = [
    "ADAPT_ROUTERS",
    "AdaptConfig",
    "adapt_checkpoint",
    "adapt_model",
    "adapted_config",
    "default_layers",
    "block_influence",
    "least_influential_layers",
    "parse_layers",
    "remove_layers",
    "tune_routers",
]

ADAPT_ROUTERS = ("tuned", "attention")


def default_layers(n_layers: int) -> tuple[int, ...]:
    """The later half of the layers but the last (and never layer 0): 14..28 of 30."""
    start = max(1, n_layers - 1 - n_layers // 2)
    return tuple(range(start, max(start, n_layers - 1)))


def parse_layers(text: str) -> tuple[int, ...]:
    """ "14-28" or "3,5,7" or "10-12,20" -> sorted unique layer indices (one-line ValueError)."""
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            a, b = (int(lo), int(hi)) if sep else (int(part), int(part))
        except ValueError:
            raise ValueError(f"--layers {text!r} is invalid: give indices and ranges, e.g. 14-28 or 3,5,7") from None
        if a > b:
            raise ValueError(f"--layers {text!r} is invalid: range {part!r} runs backwards")
        out.update(range(a, b + 1))
    return tuple(sorted(out))


@dataclass
class AdaptConfig:
    """What ``modlm adapt`` does (see the module docstring for the defaults' reasons).

    router: "tuned" or "attention". capacity: fraction of the tokens a routed layer processes.
    layers: the layers to route (None: ``default_layers``). seq_len, batch_size, steps, lr:
    the tuning run. calib_tokens: tokens of the sample the thresholds are calibrated on.
    anneal: fraction of the steps over which the training capacity falls linearly from 1.0 to
    ``capacity`` (keep-all start in training too: the first steps see nearly the original model,
    instead of a zero-initialised top-k that keeps the first k tokens of every window). None:
    0.5 for ``tuned``, 0 for ``attention`` (its predictor learns the target capacity's decisions).
    """

    router: str = "tuned"
    capacity: float = 0.5
    layers: tuple[int, ...] | None = None
    seq_len: int = 256
    batch_size: int = 1
    steps: int = 200
    lr: float = 2e-3
    calib_tokens: int = 1024
    anneal: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        def check(cond: bool, name: str, allowed: str) -> None:
            require(cond, "AdaptConfig", name, getattr(self, name), allowed)

        check(self.router in ADAPT_ROUTERS, "router", f"must be one of {ADAPT_ROUTERS}")
        check(is_number(self.capacity) and 0 < self.capacity <= 1, "capacity", "must be in (0, 1]")
        check(is_int(self.seq_len) and self.seq_len >= 2, "seq_len", "must be an int >= 2")
        check(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "must be an int >= 1")
        check(is_int(self.steps) and self.steps >= 0, "steps", "must be an int >= 0")
        check(is_number(self.lr) and self.lr > 0, "lr", "must be > 0")
        check(is_int(self.calib_tokens) and self.calib_tokens >= 1, "calib_tokens", "must be an int >= 1")
        if self.anneal is None:
            self.anneal = 0.5 if self.router == "tuned" else 0.0
        check(is_number(self.anneal) and 0 <= self.anneal <= 1, "anneal", "must be in [0, 1]")
        check(is_int(self.seed), "seed", "must be an int")
        if self.layers is not None:
            self.layers = tuple(self.layers)
            check(len(self.layers) > 0 and all(is_int(i) for i in self.layers), "layers", "must name some layers")


def adapted_config(base: ModelConfig, router: str, capacity: float, layers: tuple[int, ...] | None) -> ModelConfig:
    """``base`` with ``layers`` routed by ``router`` at ``capacity`` (the other layers dense)."""
    layers = default_layers(base.n_layers) if layers is None else tuple(layers)
    bad = [i for i in layers if not 0 <= i < base.n_layers]
    if bad:
        raise ValueError(f"layers {bad} are not layers of {base.name!r}: it has layers 0..{base.n_layers - 1}")
    kinds = tuple("routed" if i in layers else "dense" for i in range(base.n_layers))
    return base.replace(
        router=router, capacity=float(capacity), layer_types=kinds, name=f"{base.name}-{router}-c{capacity:g}"
    )


def adapt_model(
    dense: MoDTransformer, router: str = "tuned", capacity: float = 0.5, layers: tuple[int, ...] | None = None
) -> MoDTransformer:
    """A MoD copy of ``dense`` with routers on ``layers``: base weights copied and frozen, only the
    routing parameters trainable, thresholds at -inf (it computes what ``dense`` does)."""
    if dense.config.routed_layers:
        raise ValueError(f"model {dense.config.name!r} is already routed: adapt a dense (converted) model")
    config = adapted_config(dense.config, router, capacity, layers)
    with torch.random.fork_rng(devices=[]):  # the new routers' init must not move the caller's RNG
        model = MoDTransformer(config)
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(".router." in k for k in missing), (missing, unexpected)
    param = next(dense.parameters())
    model = model.to(device=param.device, dtype=param.dtype)
    set_thresholds(model, float("-inf"))  # keep-all start
    roles.freeze_all_but(model, routing=True)
    return model.eval()


@torch.no_grad()
def block_influence(model: MoDTransformer, tokens_BT: torch.Tensor) -> dict[int, float]:
    """Block influence of each layer (ShortGPT, arXiv 2403.03853): 1 - cos(x_in, x_out), the mean
    over tokens of how much a block turns the residual stream. Low: the block changes little."""
    found: dict[int, float] = {}
    hooks = []
    for i, blk in enumerate(model.blocks):

        def hook(module, args, output, i=i):
            x_in, x_out = args[0].float(), output[0].float()
            found[i] = float(1.0 - torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1).mean())

        hooks.append(blk.register_forward_hook(hook))
    try:
        model(tokens_BT)
    finally:
        for h in hooks:
            h.remove()
    return found


def least_influential_layers(influence: dict[int, float], n: int, spaced: bool = True) -> tuple[int, ...]:
    """The ``n`` layers of lowest block influence, never the first or the last; ``spaced``: no two
    adjacent (so each routed layer follows a dense one, whose attention A-MoD reads)."""
    last = max(influence)
    chosen: list[int] = []
    for i in sorted((i for i in influence if 0 < i < last), key=lambda i: influence[i]):
        if spaced and (i - 1 in chosen or i + 1 in chosen):
            continue
        chosen.append(i)
        if len(chosen) == n:
            break
    if len(chosen) < n:
        raise ValueError(f"only {len(chosen)} layers can be chosen (n={n} asked) from {len(influence)} layers")
    return tuple(sorted(chosen))


def remove_layers(dense: MoDTransformer, drop: tuple[int, ...]) -> MoDTransformer:
    """``dense`` without the layers in ``drop`` (the simplest baseline at equal compute): the
    remaining blocks keep their weights and order."""
    keep = [i for i in range(dense.config.n_layers) if i not in set(drop)]
    if not keep or dense.config.routed_layers:
        raise ValueError(
            f"cannot remove layers {sorted(drop)} of {dense.config.name!r}: give a dense model and keep one"
        )
    config = dense.config.replace(
        n_layers=len(keep), layer_types=None, route_start=0, name=f"{dense.config.name}-minus{len(drop)}"
    )
    with torch.random.fork_rng(devices=[]):
        model = MoDTransformer(config)
    state = {}
    for k, v in dense.state_dict().items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            if i in keep:
                state[k.replace(f"blocks.{i}.", f"blocks.{keep.index(i)}.", 1)] = v
        else:
            state[k] = v
    model.load_state_dict(state)
    param = next(dense.parameters())
    return model.to(device=param.device, dtype=param.dtype).eval()


def _windows(tokens: np.ndarray | torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random windows of ``length`` tokens, (n, length) int64."""
    N = len(tokens)
    if N < length + 1:
        raise ValueError(f"the text sample has {N} tokens, fewer than one window of seq_len+1={length + 1}")
    starts = torch.randint(0, N - length, (n,), generator=gen).tolist()
    return torch.stack([torch.as_tensor(np.asarray(tokens[s : s + length]).astype(np.int64)) for s in starts])


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
    none of them, so its backward runs through its predictors only. Returns the logged records.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    history: list[dict[str, Any]] = []
    device = next(model.parameters()).device
    if cfg.steps and params:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        model.train()
        t0 = time.perf_counter()
        routers = [model.blocks[i].router for i in model.config.routed_layers]
        for step in range(1, cfg.steps + 1):
            ramp = min(1.0, (step - 1) / (cfg.anneal * cfg.steps)) if cfg.anneal > 0 else 1.0
            for r in routers:  # the training capacity; the config keeps the target
                r.capacity = 1.0 - ramp * (1.0 - cfg.capacity)
            w = _windows(tokens, cfg.batch_size, cfg.seq_len + 1, gen).to(device)
            out = model(w[:, :-1], w[:, 1:])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            if step % log_every == 0 or step == cfg.steps:
                stats = out.router_stats()
                rec = {
                    "step": step,
                    "lm_loss": float(out.lm_loss.detach()),
                    "aux_loss": float(out.aux_loss.detach()),
                    "s": round(time.perf_counter() - t0, 1),
                }
                accs = [v for k, v in stats.items() if k.endswith("/pred_acc")]
                if accs:
                    rec["pred_acc"] = sum(accs) / len(accs)
                rec["capacity"] = round(routers[0].capacity, 4)
                history.append(rec)
                if log is not None:
                    log(rec)
        for r in routers:
            r.capacity = cfg.capacity
        model.eval()
    n_rows = max(1, math.ceil(cfg.calib_tokens / cfg.seq_len))
    calib = _windows(tokens, n_rows, cfg.seq_len, gen).to(device)
    calibrate_thresholds(model, calib, cfg.capacity)
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
