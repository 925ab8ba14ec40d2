"""Sampling and the decode loop.

Decoding routes causally (Raposo et al. 2024, §3.5): each new token's route through each routed
block is decided by the causal signal (the predictor, or the aux-loss router with
sigmoid(r) > 0.5), never by top-k over tokens that do not exist yet.

The prompt (prefill) uses the same causal rule by default, so prefill + decode equals one full
forward under that rule. ``prefill_routing="topk"`` routes the known prompt by expert-choice
top-k instead: closer to how the model was trained on whole sequences, but the prompt's
routes then differ from what a causal forward over the same text would choose.

This module knows nothing about tokenization: prompts and outputs are token ids.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from modlm.cache import RoutedKVCache
from modlm.model import MoDTransformer, route_mask

PREFILL_ROUTING = ("causal", "topk")


@dataclass
class GenerationResult:
    """tokens: the new tokens of each row (stop token included, nothing after it).
    routing: per row, per new token, the routed blocks it went through (only with trace=True).
    seconds: wall-clock of prefill and of the decode loop.
    """

    tokens: list[list[int]]
    routing: list[list[list[int]]] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    routed_layers: tuple[int, ...] = ()

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def _validate(model: MoDTransformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
              top_k: int | None, top_p: float | None, prefill_routing: str) -> None:
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    V, ctx = model.config.vocab_size, model.config.max_seq_len
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token")
        if len(p) + max_new_tokens > ctx:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                             f"the model's context max_seq_len={ctx}")
        bad = [t for t in p if not 0 <= int(t) < V]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {V})")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if prefill_routing not in PREFILL_ROUTING:
        raise ValueError(f"prefill_routing={prefill_routing!r} must be one of {PREFILL_ROUTING}")


def sample_next(logits_BV: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from the last-position logits (B, V) -> (B,). Temperature 0 is greedy."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits = logits_BV.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p (the first always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _left_pad(prompts: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """idx_BT left-padded with 0, token_mask_BT, pos_BT (0 at each row's first real token)."""
    T = max(len(p) for p in prompts)
    B = len(prompts)
    idx = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        idx[b, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[b, T - len(p):] = True
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    return idx.to(device), mask.to(device), pos.to(device)


@torch.no_grad()
def generate(model: MoDTransformer, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, stop_tokens: Sequence[int] = (), use_cache: bool = True,
             prefill_routing: str = "causal", stream: Callable[[int, int], None] | None = None,
             trace: bool = False, return_logits: bool = False) -> GenerationResult:
    """Sample continuations of a batch of prompts (ragged lengths are left-padded).

    Args:
        prompts: token-id lists (ragged) or a (B, T) tensor.
        max_new_tokens: tokens to generate per row (fewer if a stop token comes).
        temperature: 0 = greedy; top_k / top_p: the usual filters.
        seed: seeds the sampler's own generator (same seed, same text).
        stop_tokens: a row ends after emitting any of these.
        use_cache: the routed KV cache (fast); False recomputes the whole sequence per token.
        prefill_routing: "causal" (default; prefill+decode equals a full causal forward) or "topk".
        stream: called as stream(row, token) for each new token as it is chosen.
        trace: record which routed blocks each new token went through.
        return_logits: keep each step's logits in ``result.logits`` (B, steps, V) for testing.
    """
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    _validate(model, prompts, max_new_tokens, temperature, top_k, top_p, prefill_routing)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    stops = torch.tensor(sorted(set(int(s) for s in stop_tokens)), dtype=torch.long, device=device)

    idx_BT, mask_BT, pos_BT = _left_pad(prompts, device)
    B, T0 = idx_BT.shape
    routed = model.config.routed_layers
    out_tokens: list[list[int]] = [[] for _ in range(B)]
    routing: list[list[list[int]]] = [[] for _ in range(B)]
    step_logits: list[torch.Tensor] = []
    done_B = torch.zeros(B, dtype=torch.bool, device=device)

    t0 = time.perf_counter()
    cache = None
    if use_cache:
        cfg = model.config
        cache = RoutedKVCache(cfg.n_layers, B, cfg.n_kv_heads, cfg.head_dim, capacity=T0 + max_new_tokens,
                              device=device, dtype=next(model.parameters()).dtype)
        out = model(idx_BT, routing=prefill_routing, cache=cache, pos_BT=pos_BT, token_mask_BT=mask_BT)
    else:
        out = model(idx_BT, routing=prefill_routing, pos_BT=pos_BT, token_mask_BT=mask_BT)
    prefill_s = time.perf_counter() - t0
    logits_BV = out.logits[:, -1]

    t1 = time.perf_counter()
    seq_idx, seq_mask, seq_pos = idx_BT, mask_BT, pos_BT
    next_pos_B = pos_BT[:, -1] + 1
    for step in range(max_new_tokens):
        if return_logits:
            step_logits.append(logits_BV.float().cpu())
        tok_B = sample_next(logits_BV, temperature, top_k, top_p, gen)
        tok_list = tok_B.tolist()  # one host sync per step: needed to stream and to stop
        for b in range(B):
            if not done_B[b]:
                out_tokens[b].append(tok_list[b])
                if stream is not None:
                    stream(b, tok_list[b])
        if stops.numel():
            done_B |= torch.isin(tok_B, stops)
        if step == max_new_tokens - 1 or bool(done_B.all()):
            break
        new_BT = tok_B.unsqueeze(1)
        new_pos_BT = next_pos_B.unsqueeze(1)
        if use_cache:
            out = model(new_BT, routing="causal", cache=cache, pos_BT=new_pos_BT)
            logits_BV = out.logits[:, -1]
        else:
            seq_idx = torch.cat([seq_idx, new_BT], 1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(new_BT, dtype=torch.bool)], 1)
            seq_pos = torch.cat([seq_pos, new_pos_BT], 1)
            out = model(seq_idx, routing="causal", pos_BT=seq_pos, token_mask_BT=seq_mask)
            logits_BV = out.logits[:, -1]
        if trace:
            masks = {i: route_mask(r, new_BT.shape[1] if use_cache else seq_idx.shape[1])[:, -1] for i, r in
                     out.routes.items()}
            for b in range(B):
                if len(routing[b]) < len(out_tokens[b]):
                    routing[b].append([i for i in routed if bool(masks[i][b])])
        next_pos_B = next_pos_B + 1
    decode_s = time.perf_counter() - t1
    if was_training:
        model.train()
    res = GenerationResult(out_tokens, routing if trace else [], prefill_s, decode_s, routed)
    if return_logits:
        res.logits = torch.stack(step_logits, 1)  # (B, steps, V)
    return res
