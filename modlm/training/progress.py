"""What a training run prints: the banner, the progress bar or its plain lines, the ETA, the
evaluation, stop and last lines. The trainer decides what happened; this module says it.

Only rank 0 prints. A tqdm bar is shown only where a person watches (stdout and stderr are
terminals): written to a file or a pipe its carriage returns pile up and the evaluation lines
glue onto them, so one plain line per log event is printed instead.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

from modlm.config import ModelConfig
from modlm.flops import flops as flop_report
from modlm.flops import format_flops

__all__ = [
    "ETA_AFTER_STEPS",
    "Console",
    "duration",
    "eta_line",
    "eval_line",
    "plan_line",
    "progress_legend",
    "router_summary",
    "train_postfix",
]

# The pace (and so the ETA) is measured over this invocation's steps 2..ETA_AFTER_STEPS: the first
# step also pays for allocation and warm-up.
ETA_AFTER_STEPS = 3


class Console:
    """Rank 0's console: lines, and the progress bar while the steps run.

    Args:
        main: whether this process is rank 0 (the others print nothing).
        progress: allow a tqdm bar (it is shown only when stdout and stderr are terminals).
    """

    def __init__(self, main: bool, progress: bool):
        self.main, self.progress = main, progress
        self.bar: tqdm | None = None

    def say(self, msg: str) -> None:
        """A line on rank 0's console (above the progress bar when there is one)."""
        if self.main:
            (tqdm.write if self.bar is not None else print)(msg)
            sys.stdout.flush()

    @contextlib.contextmanager
    def steps(self, total: int, initial: int) -> Iterator[None]:
        """The progress bar of steps ``initial..total`` while the block runs (when one is shown)."""
        interactive = sys.stdout.isatty() and sys.stderr.isatty()
        if self.progress and self.main and interactive:
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="train")
        try:
            yield
        finally:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    def advance(self) -> None:
        """One more step done."""
        if self.bar is not None:
            self.bar.update(1)

    def train(self, step: int, max_steps: int, post: dict[str, str], lr: float, eta_s: float | None) -> None:
        """A log event: the bar's postfix, or (no bar) one line with the learning rate and the ETA."""
        if self.bar is not None:
            self.bar.set_postfix(post, refresh=False)
        elif self.main:
            print(
                f"step {step}/{max_steps} "
                + " ".join(f"{k} {v}" for k, v in post.items())
                + f" lr {lr:.3g}"
                + (f" eta {duration(eta_s)}" if eta_s is not None else ""),
                flush=True,
            )


def banner(
    console: Console,
    cfg,
    mcfg: ModelConfig,
    *,
    params: tuple[int, int],
    step_flops: int,
    dense_flops: int,
    seqs_per_step: int,
    data: str,
    resuming: str | None,
    plan: str,
) -> None:
    """What is trained, on what, for how long (the plan; an ETA follows after a few steps), what
    the progress line shows, and the resolved configs.

    Args:
        cfg: the run's TrainConfig.
        params: (all parameters, non-embedding parameters).
        data: the data line's text after "data " (source, token counts, device, dtype, world size).
        resuming: the checkpoint resumed and its step, or None on a fresh run.
        plan: ``plan_line``'s text.
    """
    rep = flop_report(mcfg, cfg.seq_len)
    say = console.say
    say(
        f"modlm train: {mcfg.name} (router={mcfg.router}, capacity={mcfg.capacity}, routed blocks "
        f"{list(mcfg.routed_layers)}) | params {params[0]:,} (non-embedding {params[1]:,})"
    )
    say(
        f"  FLOPs/step {format_flops(step_flops)} = {seqs_per_step} seq x {cfg.seq_len} tok x "
        f"{format_flops(rep.train_per_token)}/token; dense twin {format_flops(dense_flops)} "
        f"(x{step_flops / dense_flops:.3f})"
    )
    say(f"  data {data}")
    if resuming is not None:
        say(f"  resuming from {resuming}")
    say("  " + plan)
    say("  " + progress_legend(mcfg))
    say("  train config: " + json.dumps(cfg.to_dict()))
    say("  model config: " + json.dumps(mcfg.to_dict()))


def plan_line(cfg, start_step: int, tokens_per_step: int) -> str:
    """Steps, tokens and time this invocation plans (the ETA comes once the pace is measured)."""
    todo = cfg.max_steps - start_step
    if todo <= 0:
        return f"plan: nothing to train, the run is at its max_steps={cfg.max_steps} (--more-steps N trains it further)"
    line = (
        f"plan: steps {start_step} -> {cfg.max_steps}: {todo:,} steps x {tokens_per_step:,} tokens "
        f"= {todo * tokens_per_step:,} tokens"
    )
    if cfg.max_time_s is not None:
        line += f", or fewer if --max-time-s {cfg.max_time_s:g} runs out first"
    if todo > ETA_AFTER_STEPS:
        line += f"; an ETA follows step {start_step + ETA_AFTER_STEPS}"
    return line


def eta_line(cfg, step: int, sec_per_step: float, t0: float) -> str:
    """The pace and the time to ``cfg.max_steps``, and whether the time budget (counted from the
    invocation's start ``t0``, a ``time.monotonic()``) stops the run first."""
    todo = cfg.max_steps - step
    line = (
        f"pace: {sec_per_step:.3g} s/step; {todo:,} more step{'s' * (todo != 1)}, about {duration(todo * sec_per_step)}"
    )
    if cfg.max_time_s is not None:
        left = max(0.0, cfg.max_time_s - (time.monotonic() - t0))
        if left < todo * sec_per_step:
            reach = step + int(left / sec_per_step)
            line += f"; --max-time-s {cfg.max_time_s:g} stops it first, in {duration(left)} near step {reach}"
    return line


def train_postfix(loss: float, lm_loss: float, tokens_per_s: float, stats: dict[str, float], routed: bool) -> dict:
    """The numbers of a progress line: the LM loss alone (the routers' losses, the total minus it,
    never reach the LM), the routers' loss when there are routed blocks, throughput, and one
    router accuracy (``router_summary``)."""
    post = {"loss": f"{lm_loss:.4f}"}
    if routed:
        post["router_loss"] = f"{loss - lm_loss:.3f}"
    post["tok/s"] = f"{tokens_per_s:,.0f}"
    summary_stat = router_summary(stats)
    if summary_stat is not None:
        post[summary_stat[0]] = f"{summary_stat[1]:.3f}"
    return post


def eval_line(step: int, topk: dict[str, Any], causal: dict[str, Any]) -> str:
    """An evaluation's line: validation loss and bits per byte under top-k and causal routing."""
    frac = f", routed {causal['routed_frac']:.3f}" if "routed_frac" in causal else ""
    return (
        f"step {step}: val loss {topk['loss']:.4f} ({topk['bpb']:.3f} bpb) | causal routing "
        f"{causal['loss']:.4f} ({causal['bpb']:.3f} bpb{frac})"
    )


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h12m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_legend(mcfg: ModelConfig) -> str:
    """What the progress line's numbers are (its ``router_loss`` is the total minus the LM loss)."""
    line = "progress: loss = the LM's cross-entropy (nats/token, as val loss)"
    if not mcfg.routed_layers:
        return line
    terms = []
    if mcfg.uses_predictor:
        terms.append(
            f"the causal predictor's BCE (weight {mcfg.predictor_loss_weight:g}; it trains only the predictor)"
        )
    if mcfg.uses_aux_loss:
        terms.append(f"the router logit's BCE (weight {mcfg.aux_loss_weight:g})")
    what = " + ".join(terms) if terms else f"the {mcfg.router} router's auxiliary loss, if any"
    line += f"; router_loss = {what}, summed over the {len(mcfg.routed_layers)} routed blocks"
    if mcfg.uses_predictor:
        line += "; pred_acc = how often the predictor agrees with top-k (decoding routes by it)"
    elif mcfg.uses_aux_loss:
        line += "; aux_acc = how often sigmoid(router logit) agrees with top-k (decoding routes by it)"
    return line


def router_summary(stats: dict[str, float]) -> tuple[str, float] | None:
    """One number for the progress bar: mean causal-predictor accuracy, else aux-router accuracy."""
    for key in ("pred_acc", "aux_acc"):
        vals = [v for k, v in stats.items() if k.endswith("/" + key)]
        if vals:
            return key, sum(vals) / len(vals)
    return None
