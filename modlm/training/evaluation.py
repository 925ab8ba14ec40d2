"""Validation loss of a model on held-out tokens, under top-k or causal routing."""

from __future__ import annotations

import torch
from torch import nn

from modlm.training.batching import bits_per_byte, iter_eval_batches
from modlm.training.config import TrainConfig, stream_seed
from modlm.training.device import autocast


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
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = 0
    fracs: list[float] = []
    cuda_devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(stream_seed(cfg.seed, 0, "eval"))
            for x_BT, y_BT in iter_eval_batches(data, cfg.batch_size, cfg.seq_len, cfg.eval_batches, device):
                with autocast(device, dtype):
                    out = model(x_BT, y_BT, routing=routing)
                total += out.lm_loss.double() * y_BT.numel()
                n_tokens += y_BT.numel()
                routed = [v for k, v in out.router_stats().items() if k.endswith("/routed_frac")]
                if routed:
                    fracs.append(sum(routed) / len(routed))
    finally:
        model.train(was_training)
    loss = (total / max(1, n_tokens)).item()
    result = {"loss": loss, "bpb": bits_per_byte(loss, tokens_per_byte), "tokens": n_tokens}
    if fracs:
        result["routed_frac"] = sum(fracs) / len(fracs)
    return result
