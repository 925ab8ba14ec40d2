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

import contextlib
import dataclasses
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from modlm.inference.cache import ModelCache
from modlm.inference.decode import HostDecisions
from modlm.model.block import Phase, route_mask
from modlm.model.eval_mode import eval_mode
from modlm.model.inputs import check_token_ids
from modlm.model.transformer import MoDTransformer
from modlm.spec.routers import ROUTINGS
from modlm.validation import is_int, is_number, require

# Prompts become Python ints before decoding, so any integer dtype will do.
_PROMPT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@dataclass
class GenerationConfig:
    """How to sample: every option of ``generate`` and ``DecodeSession`` in one validated place.

    max_new_tokens: tokens to generate per row (fewer if a stop token comes).
    temperature: 0 = greedy; top_k / top_p: the usual filters (None: off).
    seed: seeds the sampler's own generator (same seed, same text; None: a random seed).
    stop_tokens: a row ends after emitting any of these.
    ignore_eos: False (default): the model's end-of-sequence token(s), ``config.extra["eos_token_id"]``
        (recorded by ``modlm convert``; an int or a list), also end a row. True: they do not
        (fixed-length decoding, as benchmarks need). A model that records none decodes as before.
    use_cache: the routed KV cache (fast); False recomputes the whole sequence per token
        (causal routing throughout, also for the prompt after the first step).
    prefill_routing: "causal" (default; prefill+decode equals a full causal forward) or "topk".
    trace: record which routed blocks each new token went through when it was fed back
        (every new token but the last, which is never fed).
    return_logits: keep each step's logits in ``result.logits`` (B, steps, V) for testing.
    return_cache: keep the ``ModelCache`` in ``result.cache`` (None without a cache). It
        holds the prompt and every fed new token (all but the last), left padding included.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_tokens: Sequence[int] = ()
    ignore_eos: bool = False
    use_cache: bool = True
    prefill_routing: str = "causal"
    trace: bool = False
    return_logits: bool = False
    return_cache: bool = False

    def __post_init__(self) -> None:
        """One-line ValueErrors that name the field and the offending value."""

        def check(cond: bool, name: str, allowed: str) -> None:
            require(cond, "GenerationConfig", name, getattr(self, name), allowed)

        check(is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", "must be an int >= 1")
        check(is_number(self.temperature) and self.temperature >= 0, "temperature", "must be a number >= 0 (0: greedy)")
        check(self.top_k is None or (is_int(self.top_k) and self.top_k >= 1), "top_k", "must be an int >= 1 or None")
        check(
            self.top_p is None or (is_number(self.top_p) and 0.0 < self.top_p <= 1.0),
            "top_p",
            "must be in (0, 1] or None",
        )
        check(
            self.seed is None or (is_int(self.seed) and 0 <= self.seed < 2**63),
            "seed",
            "must be an int in [0, 2**63) or None",
        )
        check(self.prefill_routing in ROUTINGS, "prefill_routing", f"must be one of {ROUTINGS}")
        check(
            hasattr(self.stop_tokens, "__iter__")
            and not isinstance(self.stop_tokens, (str, bytes))
            and all(is_int(t) for t in self.stop_tokens),
            "stop_tokens",
            "must be a list of token ids (ints)",
        )
        for name in ("ignore_eos", "use_cache", "trace", "return_logits", "return_cache"):
            check(isinstance(getattr(self, name), bool), name, "must be True or False")

    @classmethod
    def resolve(
        cls, config: GenerationConfig | None, max_new_tokens: int | None, options: dict[str, Any]
    ) -> GenerationConfig:
        """``config`` with ``max_new_tokens`` and keyword ``options`` applied on top."""
        if max_new_tokens is not None:
            options = dict(options, max_new_tokens=max_new_tokens)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown generation option(s) {unknown}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(config or cls(), **options)


@dataclass
class GenerationResult:
    """tokens: the new tokens of each row (stop token included, nothing after it).
    routing: per row, per fed-back new token, the routed blocks it went through (trace=True).
    prefill_s, decode_s: wall-clock of prefill and of the decode loop.
    logits: (B, steps, V) float32 logits each new token was sampled from (return_logits=True).
    cache: the ModelCache after decoding (return_cache=True and use_cache=True).
    """

    tokens: list[list[int]]
    routing: list[list[list[int]]] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    routed_layers: tuple[int, ...] = ()
    logits: torch.Tensor | None = None
    cache: ModelCache | None = None

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def _token_id(t: Any) -> int | None:
    """``t`` as an int if it is an integer (Python, NumPy or a one-element integer tensor), else None.

    Floats are refused even when whole (1.0): an id is an integer, and a float tensor of ids is
    usually a bug upstream. So are bools: ``True`` is an int to Python, never a token.
    """
    if isinstance(t, bool) or type(t).__name__ == "bool_":
        return None
    if isinstance(t, torch.Tensor) and t.dtype == torch.bool:
        return None
    try:
        return operator.index(t)
    except TypeError:
        return None


def eos_tokens(model_config: Any) -> tuple[int, ...]:
    """The end-of-sequence ids a model records in ``config.extra["eos_token_id"]``: () when it
    records none; Hugging Face configs hold an int or a list of ints, so both are read.

    Raises a one-line ValueError naming the value when it is neither (or an id is outside the
    vocabulary): decoding would otherwise run past the model's end without a word.
    """
    value = model_config.extra.get("eos_token_id")
    if value is None:
        return ()
    ids = [value] if not isinstance(value, (list, tuple)) else list(value)
    V = model_config.vocab_size
    if not all(is_int(t) and 0 <= t < V for t in ids):
        raise ValueError(
            f"ModelConfig.extra['eos_token_id']={value!r} is invalid: must be a token id in [0, {V}) or a "
            "list of them (ignore_eos=True decodes without it)"
        )
    return tuple(ids)


def validate_prompts(model: MoDTransformer, prompts: Any, max_new_tokens: int) -> list[list[int]]:
    """The prompts as lists of ints, or a one-line ValueError naming the offending prompt or token.

    ``prompts``: token-id lists (ragged), a (B, T) tensor or one (T,) tensor. Each prompt plus
    ``max_new_tokens`` must fit the model's context.
    """
    V, ctx = model.config.vocab_size, model.config.max_seq_len
    if isinstance(prompts, torch.Tensor):
        check_token_ids(prompts, V, "prompts", dims=(1, 2), dtypes=_PROMPT_DTYPES)
        prompts = [prompts.tolist()] if prompts.dim() == 1 else prompts.tolist()
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
        raise ValueError(
            f"prompts is a {type(prompts).__name__}: give a list of token-id lists or a (B, T) tensor of token ids"
        )
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            check_token_ids(p, V, f"prompt {i}", dims=(1,), dtypes=_PROMPT_DTYPES)
            p = p.tolist()
        if isinstance(p, (str, bytes)) or not hasattr(p, "__len__") or not hasattr(p, "__iter__"):
            hint = " (one prompt of ids is [[1, 2, 3]], not [1, 2, 3])" if _token_id(p) is not None else ""
            raise ValueError(f"prompt {i} is {p!r}: each prompt must be a sequence of token ids{hint}")
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token")
        if len(p) + max_new_tokens > ctx:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{len(p) + max_new_tokens} > the model's context max_seq_len={ctx}"
            )
        ids = []
        for t in p:
            v = _token_id(t)
            if v is None:
                raise ValueError(f"prompt {i} has {t!r} ({type(t).__name__}): token ids must be ints")
            if not 0 <= v < V:
                raise ValueError(f"prompt {i} has token id {v} outside the vocabulary [0, {V})")
            ids.append(v)
        out.append(ids)
    return out


def sample_next(
    logits_BV: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row from the last-position logits (B, V) -> (B,). Temperature 0 is greedy."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs = sampling_probs(logits_BV, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampling_probs(
    logits_xV: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The fp32 distribution ``sample_next`` draws from (temperature > 0), over the last axis of
    logits of any leading shape (..., V): temperature, then the top-k and top-p filters."""
    logits = logits_xV.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p (the first always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def _left_pad(prompts: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """idx_BT left-padded with 0, token_mask_BT, pos_BT (0 at each row's first real token)."""
    T = max(len(p) for p in prompts)
    B = len(prompts)
    idx = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        idx[b, T - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[b, T - len(p) :] = True
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    return idx.to(device), mask.to(device), pos.to(device)


def generate(
    model: MoDTransformer,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int | None = None,
    *,
    config: GenerationConfig | None = None,
    stream: Callable[[int, int], None] | None = None,
    **options: Any,
) -> GenerationResult:
    """Sample continuations of a batch of prompts (ragged lengths are left-padded).

    Args:
        prompts: token-id lists (ragged), a (B, T) tensor, or one (T,) tensor.
        max_new_tokens, **options: ``GenerationConfig`` fields (temperature, top_k, top_p, seed,
            stop_tokens, ignore_eos, use_cache, prefill_routing, trace, return_logits, return_cache),
            applied on top of ``config``.
        stream: called as stream(row, token) for each new token as it is chosen.

    Runs under ``torch.inference_mode``. Per step there is one host sync for the sampled tokens
    (to stream and to stop), plus one per routed block for its routing decision (see
    ``modlm.inference.decode``).
    """
    session = DecodeSession(model, prompts, max_new_tokens, config=config, stream=stream, **options)
    try:
        while session.step():
            pass
        return session.result()
    finally:
        session.close()


class DecodeSession:
    """``generate`` one step at a time: prefill at construction, ``step()`` per new token.

    For callers that drive decoding themselves (streaming servers, benchmarks that interleave
    two models step by step). Arguments are those of ``generate``. The model is put in eval mode
    until ``close()`` (called by ``result()``) restores its mode.

        session = DecodeSession(model, prompts, 32, temperature=0)
        while session.step():
            ...
        result = session.result()
    """

    @torch.inference_mode()
    def __init__(
        self,
        model: MoDTransformer,
        prompts: Sequence[Sequence[int]] | torch.Tensor,
        max_new_tokens: int | None = None,
        *,
        config: GenerationConfig | None = None,
        stream: Callable[[int, int], None] | None = None,
        **options: Any,
    ):
        cfg = self.config = GenerationConfig.resolve(config, max_new_tokens, options)
        prompts = validate_prompts(model, prompts, cfg.max_new_tokens)
        # The model's eos ends a row like an explicit stop token: one set, read once per token.
        self.stops = {int(s) for s in cfg.stop_tokens} | set(() if cfg.ignore_eos else eos_tokens(model.config))
        self.model, self.max_new_tokens = model, cfg.max_new_tokens
        self.temperature, self.top_k, self.top_p = cfg.temperature, cfg.top_k, cfg.top_p
        self.use_cache, self.stream, self.trace = cfg.use_cache, stream, cfg.trace
        self.return_logits, self.return_cache = cfg.return_logits, cfg.return_cache
        # Eval mode until close() (the session outlives this call, so the context is held open).
        self._mode = contextlib.ExitStack()
        self._mode.enter_context(eval_mode(model))
        device = next(model.parameters()).device
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        prefill_routing = cfg.prefill_routing

        idx_BT, mask_BT, pos_BT = _left_pad(prompts, device)
        B, T0 = idx_BT.shape
        self.B = B
        self.routed = model.config.routed_layers
        self.out_tokens: list[list[int]] = [[] for _ in range(B)]
        self.routing: list[list[list[int]]] = [[] for _ in range(B)]
        self.step_logits: list[torch.Tensor] = []
        self.done = [False] * B
        self.n_done = 0
        self.n_steps = 0
        self.finished = False

        t0 = time.perf_counter()
        self.cache = None
        if self.use_cache:
            self.cache = ModelCache.for_config(
                model.config, B, capacity=T0 + self.max_new_tokens, device=device, dtype=next(model.parameters()).dtype
            )
            self.policy = HostDecisions(model.config.router)
            out = model(
                idx_BT,
                routing=prefill_routing,
                cache=self.cache,
                pos_BT=pos_BT,
                token_mask_BT=mask_BT,
                phase=Phase.PREFILL,
            )
        else:
            out = model(idx_BT, routing=prefill_routing, pos_BT=pos_BT, token_mask_BT=mask_BT)
        self.logits_BV = out.logits[:, -1]
        self.prefill_s = time.perf_counter() - t0
        self.decode_s = 0.0
        self.seq_idx, self.seq_mask, self.seq_pos = idx_BT, mask_BT, pos_BT
        self.pos_B1 = pos_BT[:, -1:] + 1

    @torch.inference_mode()
    def step(self) -> bool:
        """Choose one token per row (and feed it back unless decoding ends). False once finished."""
        if self.finished:
            return False
        t0 = time.perf_counter()
        B, model = self.B, self.model
        if self.return_logits:
            self.step_logits.append(self.logits_BV.float().cpu())
        tok_B = sample_next(self.logits_BV, self.temperature, self.top_k, self.top_p, self.gen)
        tok_list = tok_B.tolist()  # one host sync per step: needed to stream and to stop
        for b, tok in enumerate(tok_list):
            if not self.done[b]:
                self.out_tokens[b].append(tok)
                if self.stream is not None:
                    self.stream(b, tok)
                if tok in self.stops:
                    self.done[b] = True
                    self.n_done += 1
        self.n_steps += 1
        if self.n_steps == self.max_new_tokens or self.n_done == B:
            self.finished = True
            self.decode_s += time.perf_counter() - t0
            return False
        new_B1 = tok_B.unsqueeze(1)
        if self.use_cache:
            out = model(
                new_B1, routing="causal", cache=self.cache, pos_BT=self.pos_B1, phase=Phase.DECODE, decode=self.policy
            )
        else:
            self.seq_idx = torch.cat([self.seq_idx, new_B1], 1)
            self.seq_mask = torch.cat([self.seq_mask, torch.ones_like(new_B1, dtype=torch.bool)], 1)
            self.seq_pos = torch.cat([self.seq_pos, self.pos_B1], 1)
            out = model(self.seq_idx, routing="causal", pos_BT=self.seq_pos, token_mask_BT=self.seq_mask)
        self.logits_BV = out.logits[:, -1]
        if self.trace:
            T_out = 1 if self.use_cache else self.seq_idx.shape[1]
            masks = {i: route_mask(r, T_out)[:, -1].tolist() for i, r in out.routes.items()}
            for b in range(B):
                if len(self.routing[b]) < len(self.out_tokens[b]):
                    self.routing[b].append([i for i in self.routed if masks[i][b]])
        self.pos_B1 = self.pos_B1 + 1
        self.decode_s += time.perf_counter() - t0
        return True

    def close(self) -> None:
        """Restore the model's training mode (idempotent)."""
        self._mode.close()

    def result(self) -> GenerationResult:
        """What was generated so far (normally called once ``step()`` returned False)."""
        self.close()
        res = GenerationResult(
            self.out_tokens, self.routing if self.trace else [], self.prefill_s, self.decode_s, self.routed
        )
        if self.return_logits:
            res.logits = torch.stack(self.step_logits, 1)  # (B, steps, V)
        if self.return_cache:
            res.cache = self.cache
        return res
