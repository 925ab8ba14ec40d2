"""Validation loss of a run on held-out tokens (``modlm.inference.evaluation.evaluate_lm`` over
the run's fixed evaluation windows), with bits per byte."""

from __future__ import annotations

import torch
from torch import nn

from modlm.inference.evaluation import evaluate_lm
from modlm.training.batching import bits_per_byte, iter_eval_batches
from modlm.training.config import TrainConfig, stream_seed


def evaluate(
    model: nn.Module,
    data,
    cfg: TrainConfig,
    device: torch.device,
    dtype: str = "fp32",
    tokens_per_byte: float = 1.0,
    routing: str = "topk",
) -> dict[str, float]:
    """Mean validation LM loss (nats/token, aux losses excluded) and bits per byte.

    ``routing="causal"`` routes each token by its own causal signal, as decoding does; top-k
    routing looks at the whole sequence, so its loss is the optimistic one. Runs under a forked,
    fixed-seed RNG: the random router gives the same estimate every time, and training's random
    streams are not advanced (resume stays exact wherever evaluations fall).

    Returns {"loss", "bpb", "tokens"} and, for a routed model, "routed_frac" (the mean share of
    tokens the routed blocks processed).
    """
    batches = iter_eval_batches(data, cfg.batch_size, cfg.seq_len, cfg.eval_batches, device)
    res = evaluate_lm(model, batches, routing=routing, dtype=dtype, seed=stream_seed(cfg.seed, 0, "eval"))
    result = {"loss": res.loss, "bpb": bits_per_byte(res.loss, tokens_per_byte), "tokens": res.tokens}
    if res.routed_frac is not None:
        result["routed_frac"] = res.routed_frac
    return result
