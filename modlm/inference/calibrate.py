"""The inference-time compute knob: thresholds on the causal routing signal.

When decoding, a routed block takes a token iff its causal logit (the predictor's, or the
aux-loss router's r) exceeds the block's ``router.threshold`` buffer (0 by default, i.e.
probability 0.5). Raising a threshold routes fewer tokens: less compute, usually a higher loss.
``calibrate_thresholds`` picks, layer by layer, the threshold that routes a target fraction of
the tokens of a calibration sample; ``sweep_knob`` reports speed against quality over several
fractions.

The threshold is a persistent buffer, so a calibrated model saves and loads with it.

Calibration goes in layer order: the input of a routed block depends on which tokens the
earlier routed blocks processed, hence on their thresholds, so block l is calibrated on the
stream produced with blocks < l already calibrated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from modlm.flops import causal_forward_flops, flops
from modlm.inference.evaluation import evaluate_lm, window_batches
from modlm.inference.generate import generate
from modlm.model.block import route_mask
from modlm.model.eval_mode import eval_mode
from modlm.model.inputs import check_token_ids
from modlm.model.transformer import MoDTransformer
from modlm.spec.kinds import block_spec
from modlm.spec.routers import router_spec
from modlm.validation import is_number

__all__ = [
    "calibratable_blocks",
    "calibrate_exit_threshold",
    "calibrate_thresholds",
    "causal_flop_fraction",
    "exit_blocks",
    "exit_flop_fraction",
    "get_thresholds",
    "measure_routed_fraction",
    "set_exit_threshold",
    "set_thresholds",
    "sweep_knob",
]


def _thresholded_blocks(model: MoDTransformer) -> dict:
    """Routed blocks, if their router thresholds a causal logit (learned, token-choice); error otherwise."""
    blocks = {i: model.blocks[i] for i in model.config.routed_layers}
    if blocks and not router_spec(model.config.router).thresholded:
        raise ValueError(f"router {model.config.router!r} has no causal threshold to calibrate")
    return blocks


def calibratable_blocks(model: MoDTransformer) -> dict:
    """{layer: routed block} of the blocks ``calibrate_thresholds`` sets; a one-line ValueError when
    the router has no causal threshold or the model no routed block (calibrating would silently do
    nothing)."""
    blocks = _thresholded_blocks(model)
    if not blocks:
        raise ValueError(
            f"model {model.config.name!r} has no routed blocks (router={model.config.router!r}): nothing to calibrate"
        )
    return blocks


def _check_tokens(model: MoDTransformer, tokens_BT: torch.Tensor, name: str = "tokens_BT") -> torch.Tensor:
    """``tokens_BT`` on the model's device, or a one-line ValueError (off the hot path: the range is always read)."""
    check_token_ids(tokens_BT, model.config.vocab_size, name, check_range=True)
    if tokens_BT.shape[1] > model.config.max_seq_len:
        raise ValueError(
            f"{name} has {tokens_BT.shape[1]} tokens per row, more than max_seq_len={model.config.max_seq_len}"
        )
    return tokens_BT.to(next(model.parameters()).device)


def _threshold_for_fraction(logits_N: torch.Tensor, fraction: float) -> float:
    """A threshold t with round(fraction * N) of the logits strictly above it.

    t sits midway between the k-th and (k+1)-th largest logits, so the same decision holds for
    logits a little off the sample (the calibration generalises, rather than sitting on a value).
    """
    v = torch.sort(logits_N.double().flatten(), descending=True).values
    N = v.numel()
    k = min(N, max(0, round(fraction * N)))
    if k == 0:
        return float(v[0]) + 1.0  # nothing is above the largest logit (+ margin)
    if k == N:
        return float(v[-1]) - 1.0
    return float(0.5 * (v[k - 1] + v[k]))


def get_thresholds(model: MoDTransformer) -> dict[int, float]:
    """Current threshold of every routed block."""
    return {i: float(b.router.threshold) for i, b in _thresholded_blocks(model).items()}


def set_thresholds(model: MoDTransformer, thresholds: Mapping[int, float] | float) -> None:
    """Set routed blocks' ``router.threshold``: one value for all, or a {layer: value} dict."""
    blocks = _thresholded_blocks(model)
    if not isinstance(thresholds, Mapping):
        thresholds = {i: float(thresholds) for i in blocks}
    for i, t in thresholds.items():
        if i not in blocks:
            raise ValueError(f"layer {i} is not a routed layer; routed layers: {sorted(blocks)}")
        t = float(t)
        if t != t:  # NaN would route nothing and hide a bug
            raise ValueError(f"threshold for layer {i} is NaN")
        blocks[i].router.threshold.fill_(t)


@torch.no_grad()
def calibrate_thresholds(model: MoDTransformer, tokens_BT: torch.Tensor, target_fraction: float) -> dict[int, float]:
    """Set each routed block's threshold so causal routing takes ~``target_fraction`` of the tokens.

    Layer by layer, in order: run a causal forward (earlier blocks already calibrated), collect
    the causal logits at block l's input over every token of ``tokens_BT``, and put block l's
    threshold at their (1 - target_fraction) quantile. Returns {layer: threshold}.
    """
    if not is_number(target_fraction) or not 0.0 <= target_fraction <= 1.0:
        raise ValueError(f"target_fraction={target_fraction!r} is invalid: must be a number in [0, 1]")
    blocks = calibratable_blocks(model)
    tokens_BT = _check_tokens(model, tokens_BT)
    captured: dict[int, torch.Tensor] = {}
    with eval_mode(model):
        for i, blk in blocks.items():

            def grab(module, args, kwargs, i=i):
                x = args[0] if args else kwargs["x_BTD"]
                captured[i] = module.router.causal_logits(x)  # as the causal decision computes it

            handle = blk.register_forward_pre_hook(grab, with_kwargs=True)
            try:
                model(tokens_BT, routing="causal")
            finally:
                handle.remove()
            blk.router.threshold.fill_(_threshold_for_fraction(captured.pop(i), float(target_fraction)))
    return get_thresholds(model)


@torch.no_grad()
def measure_routed_fraction(model: MoDTransformer, tokens_BT: torch.Tensor) -> dict[int, float]:
    """Fraction of the tokens each routed block processes under causal routing: {layer: fraction}."""
    tokens_BT = _check_tokens(model, tokens_BT)
    with eval_mode(model):
        out = model(tokens_BT, routing="causal")
    T = tokens_BT.shape[1]
    return {i: float(route_mask(r, T).float().mean()) for i, r in out.routes.items()}


@torch.no_grad()
def sweep_knob(
    model: MoDTransformer,
    val_tokens: torch.Tensor,
    fractions: Sequence[float],
    calib_tokens: torch.Tensor | None = None,
    prompt_len: int = 64,
    new_tokens: int = 64,
    batch_size: int = 1,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Speed against quality over target routed fractions.

    For each fraction: calibrate the thresholds on ``calib_tokens`` (default: the inputs of
    ``val_tokens``), measure the routed fraction and the causal-routing loss on ``val_tokens``
    ((B, T+1) windows: inputs and their next tokens), and time cached decoding of
    ``new_tokens`` tokens after a ``prompt_len`` prompt cut from ``val_tokens`` (``batch_size``
    rows, temperature 1, fixed seed). The model's thresholds are restored afterwards.

    Returns one dict per fraction: fraction, routed_fraction (mean over routed blocks, on the
    validation inputs), routed_fraction_per_layer, val_loss (nats/token), decode_tokens_per_s,
    thresholds.
    """

    if not isinstance(val_tokens, torch.Tensor) or val_tokens.dim() != 2 or val_tokens.shape[1] < 2:
        raise ValueError("val_tokens must be a (B, T+1) tensor of token windows with T >= 1")
    inputs = _check_tokens(model, val_tokens[:, :-1])
    windows = val_tokens.to(inputs.device)
    calib = inputs if calib_tokens is None else calib_tokens
    if prompt_len < 1 or prompt_len > inputs.shape[1]:
        raise ValueError(f"prompt_len={prompt_len} must be in [1, {inputs.shape[1]}] (the val window length)")
    rows = torch.arange(batch_size) % inputs.shape[0]
    prompts = inputs[rows.to(inputs.device), :prompt_len]
    saved = get_thresholds(model)
    results = []
    try:
        for f in fractions:
            th = calibrate_thresholds(model, calib, f)
            per_layer = measure_routed_fraction(model, inputs)
            loss = evaluate_lm(model, window_batches(model, windows), routing="causal").loss
            res = generate(model, prompts, new_tokens, temperature=1.0, seed=seed, ignore_eos=True)
            results.append(
                {
                    "fraction": float(f),
                    "routed_fraction": sum(per_layer.values()) / max(1, len(per_layer)),
                    "routed_fraction_per_layer": per_layer,
                    "val_loss": loss,
                    "decode_tokens_per_s": res.new_tokens / max(res.decode_s, 1e-9),
                    "thresholds": th,
                }
            )
    finally:
        set_thresholds(model, saved)
    return results


# --- early exit (modlm.model.early_exit): one confidence threshold, calibrated to a FLOP fraction ---


def exit_blocks(model: MoDTransformer) -> dict:
    """{layer: block} of the blocks with an exit gate (``BlockSpec.exit_gate``, index > 0); a
    one-line ValueError when there are none."""
    blocks = {
        i: model.blocks[i] for i, kind in enumerate(model.config.layer_types) if block_spec(kind).exit_gate and i > 0
    }
    if not blocks:
        raise ValueError(f"model {model.config.name!r} has no early-exit layers: no exit threshold to calibrate")
    return blocks


def set_exit_threshold(model: MoDTransformer, threshold: float) -> None:
    """Set every exit gate's confidence threshold (a token exits when top1 - top2 > threshold)."""
    if not is_number(threshold):
        raise ValueError(f"exit threshold={threshold!r} is invalid: must be a finite number")
    for blk in exit_blocks(model).values():
        blk.exit_threshold.fill_(float(threshold))


@torch.no_grad()
def causal_flop_fraction(model: MoDTransformer, tokens_BT: torch.Tensor) -> float:
    """Inference FLOPs per token of a causal pass over ``tokens_BT``, as a fraction of the dense
    twin's forward (``modlm.flops.causal_forward_flops``: the tokens each routed or exit-gated
    layer really ran, the exit gates' head evaluations for the tokens still running, the final
    head). The FLOP-exact counterpart of ``modlm.inference.evaluation.block_compute_fraction``."""
    tokens_BT = _check_tokens(model, tokens_BT)
    with eval_mode(model):
        out = model(tokens_BT, routing="causal")
    T = tokens_BT.shape[1]
    layers = set(model.config.routed_layers) | {
        i for i, kind in enumerate(model.config.layer_types) if block_spec(kind).exit_gate and i > 0
    }
    layer_tokens = {i: route_mask(out.aux[i], T).sum(1).tolist() for i in sorted(layers)}
    return causal_forward_flops(model.config, layer_tokens, T) / flops(model.config.dense_twin(), T).forward


def exit_flop_fraction(model: MoDTransformer, tokens_BT: torch.Tensor) -> float:
    """``causal_flop_fraction`` of a model with exit gates (a one-line ValueError without any)."""
    exit_blocks(model)
    return causal_flop_fraction(model, tokens_BT)


@torch.no_grad()
def calibrate_exit_threshold(
    model: MoDTransformer, tokens_BT: torch.Tensor, target_flop_fraction: float, steps: int = 24
) -> float:
    """The exit threshold whose inference FLOPs on ``tokens_BT`` come closest to
    ``target_flop_fraction`` of the dense twin's forward (bisection: fewer exits as the
    threshold rises). Sets it on the model and returns it. A target below what exiting after
    the first layer costs gives threshold 0 (every token exits as early as it can)."""
    if not is_number(target_flop_fraction) or target_flop_fraction <= 0:
        raise ValueError(f"target_flop_fraction={target_flop_fraction!r} is invalid: must be a number > 0")
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        set_exit_threshold(model, mid)
        if exit_flop_fraction(model, tokens_BT) > target_flop_fraction:
            hi = mid
        else:
            lo = mid
    set_exit_threshold(model, lo)
    return lo
