"""Self-speculative decoding: a cheap draft made of the model's own blocks proposes gamma tokens,
the full model checks them in one forward, and the output is exactly the full model's.

Axis legend: B batch rows, T tokens of one forward, V vocabulary, L layers, g drafted tokens
(gamma of this step), P tokens of the draft's catch-up forward.

Lossless by construction (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv
2302.01318): greedy decoding keeps a drafted token only where it is the full model's argmax, so
the text equals plain greedy decoding token for token; sampling keeps drafted token x with
probability min(1, p(x)/q(x)) and on a rejection samples from norm(max(0, p - q)), which draws
every token from the full model's (filtered) distribution p. Sampling gives the same
distribution as ``generate``, not the same text for a seed (the generator is consumed
differently).

One step, per row (``_Speculation.step``):

1. Draft: the draft (``LayerSkipDraft``: the model with some blocks removed, sharing weights)
   reads the row's pending tokens and proposes d_1..d_g, one decode step each.
2. Verify: the full model reads [last, d_1..d_g] at their true positions in one multi-token
   PREFILL over its cache, routing causally. Causal routing decides each token from that token
   alone, so the g + 1 tokens take exactly the routes that g + 1 decode steps would give them
   (up to floating-point rounding of a batched matmul: a near-tie can flip, as between batch
   sizes in plain decoding).
3. Accept n of the g drafted tokens per row (rows differ), then one more token from the full
   model's logits at the first rejection (or after d_g when all were kept).
4. Roll back both caches per row (``ModelCache.truncate``): the verifier keeps last, d_1..d_n;
   the draft keeps what it read up to d_n. A routed (ragged) layer stored only the tokens its
   router picked, so its kept slot count per row is read from the verify forward's routes.

Costs: the draft has its own cache (its keys differ from the full model's: its residual stream
skips blocks), sized like the kept layers' share of the full cache; a draft that had all g tokens
accepted reads d_g at the start of the next step, in a short PREFILL with the new token.
Contiguous (dense) layers cannot shorten one row alone: rows that accept fewer tokens than the
longest keep empty holes, masked from everyone (see ``ContiguousLayerCache.truncate``); at
batch 1 there are none.

Measured (``small`` preset, random init, batch 1, one CPU thread, 16-token prompt, 64 greedy
tokens, gamma 4): plain 410-434 tok/s; draft keeping blocks (0, 2, 5, 7) 348-388 tok/s
(0.85-0.9x), keeping (0, 7) 492-522 tok/s (1.2x); acceptance 1.0 in both, 13 verify steps for 63
tokens. NOTE: that acceptance is an artifact of random weights (small residual updates barely move
the argmax, so any draft agrees); a trained model's draft disagrees more and the figures above
are an upper bound for these drafts. At this size a step's host overhead, not the weights, sets
the cost, so a draft of half the blocks does not pay.

Not supported: early-exit blocks (their ragged cache has no routes to roll back by), and the
``use_cache=False`` / trace / return_logits / return_cache options of ``generate``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from modlm.inference.cache import ModelCache
from modlm.inference.decode import HostDecisions
from modlm.inference.generate import (
    GenerationConfig,
    GenerationResult,
    _left_pad,
    eos_tokens,
    sample_next,
    sampling_probs,
    validate_prompts,
)
from modlm.model.block import BlockContext, Phase, route_mask
from modlm.model.eval_mode import eval_mode
from modlm.model.transformer import MoDTransformer
from modlm.spec.kinds import block_spec

__all__ = ["LayerSkipDraft", "SpeculativeResult", "accept_draft", "speculative_generate"]

# generate options speculative decoding does not implement (their defaults are accepted)
_UNSUPPORTED = ("use_cache", "trace", "return_logits", "return_cache")


class LayerSkipDraft:
    """A draft model: ``model`` with only the blocks ``keep`` (shared weights, no copy).

    Args:
        model: the full model. keep: indices of the blocks the draft runs, in order.

    The draft reads and writes its own ``ModelCache`` (``new_cache``); the layers it skips stay
    empty there.
    """

    def __init__(self, model: MoDTransformer, keep: Sequence[int]):
        L = model.config.n_layers
        keep = tuple(sorted(set(int(i) for i in keep)))
        if not keep or any(not 0 <= i < L for i in keep):
            raise ValueError(f"draft layers {list(keep)} must be a non-empty subset of the {L} blocks [0, {L})")
        self.model, self.keep = model, keep

    @classmethod
    def skipping(cls, model: MoDTransformer, skip: Sequence[int]) -> LayerSkipDraft:
        """The model without the blocks ``skip``."""
        L = model.config.n_layers
        bad = [i for i in skip if not 0 <= i < L]
        if bad:
            raise ValueError(f"draft skip layers {bad} are outside the model's {L} blocks [0, {L})")
        return cls(model, [i for i in range(L) if i not in set(skip)])

    @classmethod
    def keeping(cls, model: MoDTransformer, fraction: float) -> LayerSkipDraft:
        """``round(fraction * L)`` blocks (at least 1), evenly spaced, the first and last included."""
        L = model.config.n_layers
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"draft keep fraction {fraction} must be in (0, 1]")
        n = max(1, round(fraction * L))
        keep = [0] if n == 1 else [round(i * (L - 1) / (n - 1)) for i in range(n)]
        return cls(model, keep)

    def new_cache(self, batch_size: int, capacity: int, device, dtype) -> ModelCache:
        """The draft's cache: full capacity for the kept layers, one slot for the others."""
        cache = ModelCache.for_config(self.model.config, batch_size, capacity=1, device=device, dtype=dtype)
        for i in self.keep:
            cache.layers[i].grow(capacity)
        return cache

    def logits(
        self,
        idx_BT: torch.Tensor,
        cache: ModelCache,
        pos_BT: torch.Tensor,
        phase: Phase,
        token_mask_BT: torch.Tensor | None = None,
        decode: HostDecisions | None = None,
    ) -> torch.Tensor:
        """The draft's last-position logits (B, V): the kept blocks over the cache, routing causally."""
        m = self.model
        cos, sin = m.rotary(pos_BT)
        ctx = BlockContext(
            phase=phase,
            routing="causal",
            rotary=m.rotary,
            pos_BT=pos_BT,
            cos=cos,
            sin=sin,
            token_mask_BT=token_mask_BT,
            cache=cache,
            decode=decode,
            head=m.head,
        )
        x_BTD = m.tok_emb(idx_BT)
        for i in self.keep:
            x_BTD, _ = m.blocks[i](x_BTD, ctx)
        return m.head(x_BTD[:, -1:])[:, 0]


def accept_draft(
    p_TV: torch.Tensor, q_gV: torch.Tensor, draft_g: Sequence[int], generator: torch.Generator | None = None
) -> tuple[int, int]:
    """The accept/reject rule of speculative sampling for one row (Leviathan et al. 2023, §2.3).

    Args:
        p_TV: the full model's distributions at the g + 1 verified positions (T = g + 1).
        q_gV: the draft's distributions the g drafted tokens were sampled from.
        draft_g: the drafted tokens.

    Returns:
        (n, token): the first n drafted tokens are kept (each with probability
        min(1, p(x)/q(x)), in order), then ``token`` is drawn from norm(max(0, p - q)) at the
        first rejection, or from p after the last drafted token when all g are kept. The kept
        tokens and ``token`` together are distributed exactly as sampling from p one by one.
    """
    g = len(draft_g)
    if g:
        x_g = torch.as_tensor(list(draft_g), device=p_TV.device)
        ar = torch.arange(g, device=p_TV.device)
        p_x, q_x = p_TV[ar, x_g], q_gV[ar, x_g]
        u_g = torch.rand(g, generator=generator, device=p_TV.device)
        rejected = (u_g * q_x > p_x).tolist()  # accept iff u < p/q (q(x) > 0: x was drawn from q)
        n = rejected.index(True) if True in rejected else g
    else:
        n = 0
    if n == g:
        dist = p_TV[g]
    else:
        residual = (p_TV[n] - q_gV[n]).clamp(min=0)
        total = float(residual.sum())
        dist = residual / total if total > 0 else p_TV[n]  # p == q: a rejection has probability 0
    return n, int(torch.multinomial(dist, 1, generator=generator))


@dataclass
class SpeculativeResult(GenerationResult):
    """A ``GenerationResult`` with acceptance statistics, per row, per step the row took part in:
    drafted (g of the step) and accepted (how many of them were kept)."""

    drafted: list[list[int]] = field(default_factory=list)
    accepted: list[list[int]] = field(default_factory=list)

    @property
    def acceptance(self) -> float:
        """alpha: kept drafted tokens over drafted tokens (0 when nothing was drafted)."""
        d = sum(map(sum, self.drafted))
        return sum(map(sum, self.accepted)) / d if d else 0.0

    @property
    def steps(self) -> int:
        """Verify forwards of the longest row."""
        return max(map(len, self.drafted), default=0)


def speculative_generate(
    model: MoDTransformer,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int | None = None,
    *,
    draft: LayerSkipDraft,
    gamma: int = 4,
    config: GenerationConfig | None = None,
    stream: Callable[[int, int], None] | None = None,
    **options: Any,
) -> SpeculativeResult:
    """``generate`` with self-speculative decoding: the same output (greedy: the same tokens;
    sampling: the same distribution), fewer full-model forwards when the draft agrees.

    Args:
        draft: the draft (``LayerSkipDraft.skipping(model, [...])`` or ``.keeping(model, 0.5)``).
        gamma: tokens drafted per step (>= 1).
        prompts, max_new_tokens, config, stream, **options: as ``generate`` (temperature, top_k,
            top_p, seed, stop_tokens, ignore_eos, prefill_routing).

    Returns a ``SpeculativeResult``: the tokens, timings and acceptance per row and step.
    """
    cfg = GenerationConfig.resolve(config, max_new_tokens, options)
    _check(model, draft, gamma, cfg)
    spec = _Speculation(model, prompts, draft, gamma, cfg, stream)
    try:
        while spec.step():
            pass
    finally:
        spec.close()
    return spec.result()


def _check(model: MoDTransformer, draft: LayerSkipDraft, gamma: int, cfg: GenerationConfig) -> None:
    """One-line ValueErrors for what speculative decoding cannot do."""
    if not isinstance(draft, LayerSkipDraft) or draft.model is not model:
        raise ValueError("draft must be a LayerSkipDraft of the same model (LayerSkipDraft.skipping(model, ...))")
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma={gamma!r} must be an int >= 1 (tokens drafted per step)")
    defaults = GenerationConfig()
    for name in _UNSUPPORTED:
        if getattr(cfg, name) != getattr(defaults, name):
            raise ValueError(f"{name}={getattr(cfg, name)!r} is not supported by speculative decoding")
    exits = [k for k in model.config.layer_types if block_spec(k).exit_gate]
    if exits:
        raise ValueError(f"speculative decoding does not support early-exit blocks (layer kinds {sorted(set(exits))})")


class _Speculation:
    """The state of one speculative decode: both caches and, per row, the host-side bookkeeping.

    Per row b: ``last[b]`` the newest token (chosen, read by neither model yet) at position
    ``pos[b]``; ``pending[b]`` committed tokens the draft has not read yet (they precede last).
    """

    @torch.inference_mode()
    def __init__(self, model, prompts, draft, gamma, cfg, stream):
        prompts = validate_prompts(model, prompts, cfg.max_new_tokens)
        self.model, self.draft, self.gamma, self.cfg, self.stream = model, draft, gamma, cfg, stream
        self.stops = {int(s) for s in cfg.stop_tokens} | set(() if cfg.ignore_eos else eos_tokens(model.config))
        self._mode = contextlib.ExitStack()
        self._mode.enter_context(eval_mode(model))
        param = next(model.parameters())
        self.device = param.device
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        self.layouts = [block_spec(k).cache_layout for k in model.config.layer_types]
        self.policy = HostDecisions(model.config.router)

        t0 = time.perf_counter()
        idx_BT, mask_BT, pos_BT = _left_pad(prompts, self.device)
        B, T0 = idx_BT.shape
        self.B = B
        cap = T0 + cfg.max_new_tokens + gamma + 1
        self.cache = ModelCache.for_config(model.config, B, capacity=cap, device=self.device, dtype=param.dtype)
        self.draft_cache = draft.new_cache(B, cap, self.device, param.dtype)
        out = model(
            idx_BT,
            routing=cfg.prefill_routing,
            cache=self.cache,
            pos_BT=pos_BT,
            token_mask_BT=mask_BT,
            phase=Phase.PREFILL,
        )
        draft.logits(idx_BT, self.draft_cache, pos_BT, Phase.PREFILL, token_mask_BT=mask_BT)
        first = sample_next(out.logits[:, -1], cfg.temperature, cfg.top_k, cfg.top_p, self.gen).tolist()
        self.prefill_s = time.perf_counter() - t0
        self.decode_s = 0.0
        self.out: list[list[int]] = [[] for _ in range(B)]
        self.done = [False] * B
        self.drafted: list[list[int]] = [[] for _ in range(B)]
        self.accepted: list[list[int]] = [[] for _ in range(B)]
        self.last = first
        self.pos = (pos_BT[:, -1] + 1).tolist()
        self.pending: list[list[int]] = [[] for _ in range(B)]
        self._emit([[t] for t in first])

    def _emit(self, tokens_B: list[list[int]]) -> None:
        """Append each row's new tokens, stopping a row at a stop token or at max_new_tokens."""
        for b, toks in enumerate(tokens_B):
            for t in toks:
                if self.done[b]:
                    break
                self.out[b].append(t)
                if self.stream is not None:
                    self.stream(b, t)
                if t in self.stops or len(self.out[b]) == self.cfg.max_new_tokens:
                    self.done[b] = True

    @torch.inference_mode()
    def step(self) -> bool:
        """One draft + verify + accept step for every row. False once every row is done."""
        if all(self.done):
            return False
        t0 = time.perf_counter()
        active = [b for b in range(self.B) if not self.done[b]]
        # Every kept token of an active row must fit its budget: g + 1 new tokens at most.
        g = max(0, min(self.gamma, min(self.cfg.max_new_tokens - len(self.out[b]) for b in active) - 1))
        if g > 0:
            d_Bg, q_BgV, snaps = self._draft(g)
        else:  # nothing to draft: a plain step; the draft reads last later
            d_Bg, q_BgV, snaps = torch.zeros(self.B, 0, dtype=torch.long, device=self.device), None, []
            for b in range(self.B):
                self.pending[b].append(self.last[b])
        logits_BTV, counts = self._verify(d_Bg)
        drafts = d_Bg.tolist()
        n_B, new_B = self._accept(logits_BTV, q_BgV, drafts)
        self._rollback(counts, snaps, n_B, g)
        for b in active:
            self.drafted[b].append(g)
            self.accepted[b].append(n_B[b])
        self._emit([drafts[b][: n_B[b]] + [new_B[b]] for b in range(self.B)])
        for b in range(self.B):
            if g > 0:
                self.pending[b] = [drafts[b][g - 1]] if n_B[b] == g else []
            self.pos[b] += n_B[b] + 1
            self.last[b] = new_B[b]
        self.decode_s += time.perf_counter() - t0
        return not all(self.done)

    def _positions(self, start_B: list[int], T: int) -> torch.Tensor:
        """(B, T) positions from each row's start; clamped to the context for finished rows only
        (an active row always fits, and a finished row's output is discarded)."""
        pos = torch.tensor(start_B)[:, None] + torch.arange(T)
        return pos.clamp(0, self.model.config.max_seq_len - 1).to(self.device)

    def _draft(self, g: int) -> tuple[torch.Tensor, torch.Tensor | None, list[list[list[int]]]]:
        """Draft d_1..d_g per row: (B, g) tokens, the (B, g, V) distributions they came from
        (None when greedy), and the draft cache's slot lengths before reading each d_k (k < g)."""
        cfg, dc = self.cfg, self.draft_cache
        P = 1 + max(map(len, self.pending))
        idx = torch.zeros(self.B, P, dtype=torch.long)
        mask = torch.zeros(self.B, P, dtype=torch.bool)
        for b in range(self.B):
            row = self.pending[b] + [self.last[b]]
            idx[b, P - len(row) :] = torch.tensor(row)
            mask[b, P - len(row) :] = True
        pos = self._positions([p - P + 1 for p in self.pos], P)
        if P == 1:
            q_BV = self.draft.logits(idx.to(self.device), dc, pos, Phase.DECODE, decode=self.policy)
        else:  # catch-up: tokens the draft has not read, left-padded
            q_BV = self.draft.logits(idx.to(self.device), dc, pos, Phase.PREFILL, token_mask_BT=mask.to(self.device))
        toks, dists, snaps = [], [], []
        for k in range(g):
            if k > 0:
                snaps.append([list(layer.lengths) for layer in dc.layers])
                pos = self._positions([p + k for p in self.pos], 1)
                q_BV = self.draft.logits(toks[-1][:, None], dc, pos, Phase.DECODE, decode=self.policy)
            if cfg.temperature == 0:
                toks.append(q_BV.argmax(-1))
            else:
                dists.append(sampling_probs(q_BV, cfg.temperature, cfg.top_k, cfg.top_p))
                toks.append(torch.multinomial(dists[-1], 1, generator=self.gen).squeeze(-1))
        return torch.stack(toks, 1), torch.stack(dists, 1) if dists else None, snaps

    def _verify(self, d_Bg: torch.Tensor) -> tuple[torch.Tensor, list[list[list[int]]]]:
        """The full model over [last, d_1..d_g] in one causal PREFILL: logits (B, g+1, V), and per
        layer and row the slot count to keep for each number of kept chunk tokens (index j: the
        first j tokens kept)."""
        T = d_Bg.shape[1] + 1
        before = [list(layer.lengths) for layer in self.cache.layers]
        idx_BT = torch.cat([torch.tensor(self.last, device=self.device)[:, None], d_Bg], 1)
        out = self.model(
            idx_BT, routing="causal", cache=self.cache, pos_BT=self._positions(self.pos, T), phase=Phase.PREFILL
        )
        # A contiguous layer stored one slot per chunk token; a ragged (routed) one stored its
        # routed tokens first, in order, then padding: keep as many slots as kept tokens it routed.
        stored = {i: route_mask(out.routes[i], T).long().cumsum(1).tolist() for i in out.routes}
        counts = []
        for i, L0 in enumerate(before):
            if self.layouts[i] == "ragged":
                counts.append([[L0[b]] + [L0[b] + c for c in stored[i][b]] for b in range(self.B)])
            else:
                counts.append([[L0[b] + j for j in range(T + 1)] for b in range(self.B)])
        return out.logits, counts

    def _accept(
        self, logits_BTV: torch.Tensor, q_BgV: torch.Tensor | None, drafts: list[list[int]]
    ) -> tuple[list[int], list[int]]:
        """Per row: how many drafted tokens are kept, and the full model's next token."""
        cfg = self.cfg
        if cfg.temperature == 0:
            target = logits_BTV.argmax(-1).tolist()
            n_B = []
            for d, t in zip(drafts, target):
                n = 0
                while n < len(d) and d[n] == t[n]:
                    n += 1
                n_B.append(n)
            return n_B, [t[n] for t, n in zip(target, n_B)]
        p_BTV = sampling_probs(logits_BTV, cfg.temperature, cfg.top_k, cfg.top_p)
        g = len(drafts[0])
        picks = [accept_draft(p_BTV[b], q_BgV[b] if g else p_BTV[b, :0], drafts[b], self.gen) for b in range(self.B)]
        return [n for n, _ in picks], [t for _, t in picks]

    def _rollback(self, counts, snaps, n_B: list[int], g: int) -> None:
        """Forget rejected tokens: the verifier keeps last, d_1..d_n; the draft keeps what it read
        up to d_n (all of it when n >= g - 1; d_g, never read, becomes pending)."""
        self.cache.truncate([[c[b][n_B[b] + 1] for b in range(self.B)] for c in counts])
        if g == 0:
            return
        now = [list(layer.lengths) for layer in self.draft_cache.layers]
        keep = [[snaps[n_B[b]][i][b] if n_B[b] + 1 < g else now[i][b] for b in range(self.B)] for i in range(len(now))]
        self.draft_cache.truncate(keep)

    def close(self) -> None:
        """Restore the model's training mode (idempotent)."""
        self._mode.close()

    def result(self) -> SpeculativeResult:
        return SpeculativeResult(
            self.out,
            prefill_s=self.prefill_s,
            decode_s=self.decode_s,
            routed_layers=self.model.config.routed_layers,
            drafted=self.drafted,
            accepted=self.accepted,
        )
