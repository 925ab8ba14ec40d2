"""The block contract, and the two block kinds behind it: dense and MoD-routed.

Axis legend: B batch, T sequence length, K tokens routed into a block, D model width,
b rows computed in a decode step.

Every block kind has one signature::

    x_BTD, aux = block(x_BTD, ctx)

``ctx`` (a ``BlockContext``, built once per forward by the model) carries the phase and what
every layer may need: positions and rotary tables, the token mask, the KV cache, routes to
replay and, when decoding, the decode policy. ``aux`` is None or an object with ``aux_loss``
(a weighted scalar to add to the loss) and ``stats`` (detached scalars); a routed block returns
its ``RouterOutput``. The phase is given by the caller, never inferred from shapes:

- ``Phase.TRAIN``: whole known sequences and no cache (training, evaluation, scoring).
- ``Phase.PREFILL``: a prompt entering the cache.
- ``Phase.DECODE``: one new token per row, routed causally; the decode policy
  (``modlm.inference.decode``: its ``DecodePolicy`` protocol and ``RowPlan`` answer) decides
  which rows a routed block computes, the block only computes them.

A new kind is a new class here (or in its own module) plus a ``modlm.spec.kinds`` entry.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn

from modlm.config import ModelConfig
from modlm.model.attention import Attention
from modlm.model.layers import MLP, RMSNorm, Rotary
from modlm.routing.base import RouterOutput, build_router
from modlm.routing.ops import gather_tokens, received_attention, scatter_add_weighted

if TYPE_CHECKING:  # the decode policy's contract lives with the policy, a floor above the model
    from modlm.inference.decode import DecodePolicy, RowPlan


class Phase(str, enum.Enum):
    TRAIN = "train"
    PREFILL = "prefill"
    DECODE = "decode"


PHASES = tuple(p.value for p in Phase)


@dataclass
class BlockContext:
    """What every block of one forward call is told.

    phase: see the module docstring. routing: how routed blocks route whole sequences in
    TRAIN and PREFILL ("topk" or "causal"). pos_BT: every token's true position; cos/sin: the
    rotary tables at ``pos_BT`` ((T, E/2) when shared by all rows, else (B, T, E/2)).
    token_mask_BT: real tokens of a left-padded batch (padding is never routed or attended to).
    attn_mask: the padding mask of dense attention without a cache. cache: the model's KV cache
    (``modlm.inference.cache.ModelCache``) in PREFILL and DECODE. replay: per-layer routes to
    reuse instead of asking the routers. decode: the decode policy (DECODE only).
    targets_BT: the next-token targets when the caller gave them (per-layer exit losses).
    head: the model's shared final norm + LM head, h -> logits (early-exit gates and losses).
    exit_active_BT / exit_rows: which tokens have not exited, handed from one early-exit block
    to the next within this forward call (``modlm.model.early_exit``): the tokens of whole
    sequences routed causally (None: all), or the rows still running in DECODE (None: all).
    record_attention: layers that must record the attention their tokens receive (the blocks
    before A-MoD routed blocks, when those route by top-k); each writes its (B, T) statistic
    (``modlm.routing.attention_based.received_attention``) to ``received_attention[layer]``,
    where the next block's router reads it.
    """

    phase: Phase
    routing: str
    rotary: Rotary
    pos_BT: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    token_mask_BT: torch.Tensor | None = None
    attn_mask: torch.Tensor | None = None
    cache: Any = None
    replay: dict[int, RouterOutput] | None = None
    decode: DecodePolicy | None = None
    targets_BT: torch.Tensor | None = None
    head: Callable[[torch.Tensor], torch.Tensor] | None = None
    exit_active_BT: torch.Tensor | None = None
    exit_rows: list[int] | None = None
    record_attention: frozenset[int] = frozenset()
    received_attention: dict[int, torch.Tensor] = field(default_factory=dict)


class DenseBlock(nn.Module):
    """Pre-norm transformer block: x + f(x), f = attention then SwiGLU MLP (each pre-normed)."""

    kind: ClassVar[str] = "dense"
    attention_class: ClassVar[type[Attention]] = Attention  # a kind may extend attention (same parameters)

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = self.attention_class(config, layer_idx)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def ffn(self, h_BTD: torch.Tensor, routing: str, valid_BT: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        """The feed-forward of the normed stream, and its aux output (None for the dense MLP).

        A kind with another feed-forward (an MoE) overrides this; ``routing`` says whether it may
        use batch-dependent rules (``"topk"``: training) or must stay per-token (``"causal"``).
        """
        return self.mlp(h_BTD), None

    def update(
        self,
        x_BTD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache=None,
        attn_mask: torch.Tensor | None = None,
        routing: str = "causal",
        valid_BT: torch.Tensor | None = None,
        record=None,
    ) -> tuple[torch.Tensor, Any]:
        """f(x), the block's update of the residual stream, over whatever tokens it is given,
        and the feed-forward's aux output (None for a dense MLP). ``record``: see
        ``Attention.forward`` (A-MoD's received attention)."""
        a_BTD = self.attn(self.attn_norm(x_BTD), cos, sin, attn_mask=attn_mask, cache=cache, record=record)
        m_BTD, aux = self.ffn(self.mlp_norm(x_BTD + a_BTD), routing, valid_BT)
        return a_BTD + m_BTD, aux

    def forward(self, x_BTD: torch.Tensor, ctx: BlockContext) -> tuple[torch.Tensor, Any]:
        cache = None if ctx.cache is None else ctx.cache.view(valid=ctx.token_mask_BT)
        record = None
        if self.layer_idx in ctx.record_attention:

            def record(q_BHTE, k_BGTE):
                ctx.received_attention[self.layer_idx] = received_attention(q_BHTE, k_BGTE, ctx.token_mask_BT)

        f_BTD, aux = self.update(
            x_BTD,
            ctx.cos,
            ctx.sin,
            cache=cache,
            attn_mask=ctx.attn_mask,
            routing=ctx.routing,
            valid_BT=ctx.token_mask_BT,
            record=record,
        )
        return x_BTD + f_BTD, aux


class RoutedBlock(DenseBlock):
    """A block behind a Mixture-of-Depths router.

    select -> gather (B, K, D) -> f on the K tokens only -> x + r * f scattered back.
    Shapes are static under top-k (K = round(capacity * T)); nothing loops over the batch.
    It subclasses ``DenseBlock`` so its parameters keep the dense names (``blocks.{i}.attn...``):
    a dense checkpoint loads into a MoD model, only the router is new.
    """

    kind: ClassVar[str] = "routed"

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.router = build_router(config)

    def forward(self, x_BTD: torch.Tensor, ctx: BlockContext) -> tuple[torch.Tensor, RouterOutput]:
        """Returns the new residual stream and the router's output (indices, weights, losses)."""
        if ctx.phase is Phase.DECODE:
            plan = ctx.decode.plan(self.layer_idx, self.router, x_BTD, ctx.token_mask_BT)
            x_B1D, ffn_aux = self.compute_rows(x_BTD, ctx, plan)
            return x_B1D, with_ffn_aux(plan.route, ffn_aux)
        route = ctx.replay.get(self.layer_idx) if ctx.replay is not None else None
        if route is None:
            received_BT = ctx.received_attention.get(self.layer_idx - 1)
            route = self.router(x_BTD, ctx.routing, ctx.token_mask_BT, received_BT=received_BT)
        x_BTD, ffn_aux = self.run_route(x_BTD, ctx, route)
        return x_BTD, with_ffn_aux(route, ffn_aux)

    def run_route(self, x_BTD: torch.Tensor, ctx: BlockContext, route: RouterOutput) -> tuple[torch.Tensor, Any]:
        """Gather the routed tokens, compute f on them only, scatter x + w·f back (TRAIN, PREFILL)."""
        idx_BK, valid_BK = route.idx_BK, route.valid_BK
        pos_BK = torch.gather(ctx.pos_BT, 1, idx_BK)  # true positions of the routed tokens, for RoPE
        cos, sin = ctx.rotary(pos_BK)
        x_BKD = gather_tokens(x_BTD, idx_BK)
        # Padded slots (causal routing) sit after every real one, so the causal mask already
        # hides them from real queries; their own outputs are dropped below.
        cache = None if ctx.cache is None else ctx.cache.view(valid=valid_BK)
        record = None
        if self.layer_idx in ctx.record_attention:

            def record(q_BHKE, k_BGKE):
                # Only the K routed tokens are keys here; a token that skipped the block receives 0.
                recv_BK = received_attention(q_BHKE, k_BGKE, valid_BK)
                recv_BT = recv_BK.new_zeros(x_BTD.shape[:2])
                ctx.received_attention[self.layer_idx] = recv_BT.scatter_add_(1, idx_BK, recv_BK)

        f_BKD, ffn_aux = self.update(
            x_BKD, cos, sin, cache=cache, routing=ctx.routing, valid_BT=valid_BK, record=record
        )
        return combine_route(x_BTD, route, f_BKD), ffn_aux

    def compute_rows(self, x_B1D: torch.Tensor, ctx: BlockContext, plan: RowPlan) -> tuple[torch.Tensor, Any]:
        """One new token per row: compute exactly the rows the plan names, x + w·f(x) for them.

        Computing every row and masking would save nothing. When every row runs (always the
        case at batch size 1 when the block runs) nothing is gathered and the cache hands back
        views; a skipped block costs nothing here. Returns the new stream and the feed-forward's
        aux output (None when nothing ran or the MLP is dense).
        """
        if plan.n_rows == 0:
            return x_B1D, None
        if plan.rows is None:
            cos, sin = ctx.rotary(ctx.pos_BT)
            f_B1D, aux = self.update(x_B1D, cos, sin, cache=ctx.cache.view())
            if plan.weight_b1 is not None:
                f_B1D = f_B1D * plan.weight_b1.unsqueeze(-1).to(f_B1D.dtype)
            return x_B1D + f_B1D.to(x_B1D.dtype), aux
        x_b1D = plan.x_b1D if plan.x_b1D is not None else x_B1D.index_select(0, plan.rows_dev)
        cos, sin = ctx.rotary(ctx.pos_BT.index_select(0, plan.rows_dev))
        f_b1D, aux = self.update(x_b1D, cos, sin, cache=ctx.cache.view(rows=plan.rows_host))
        if plan.weight_b1 is not None:
            f_b1D = f_b1D * plan.weight_b1.unsqueeze(-1).to(f_b1D.dtype)
        return x_B1D.index_add(0, plan.rows_dev, f_b1D.to(x_B1D.dtype)), aux


def combine_route(x_BTD: torch.Tensor, route: RouterOutput, f_BKD: torch.Tensor) -> torch.Tensor:
    """x + w·f scattered back to the routed tokens (Raposo et al. 2024, eq. 1); padded slots of a
    causal route (``valid_BK`` False) add nothing. Every other token leaves unchanged."""
    weight_BK = route.weight_BK
    if route.valid_BK is not None:
        f_BKD = f_BKD.masked_fill(~route.valid_BK.unsqueeze(-1), 0.0)
        if weight_BK is not None:
            weight_BK = weight_BK.masked_fill(~route.valid_BK, 0.0)
    return scatter_add_weighted(x_BTD, route.idx_BK, f_BKD, weight_BK)


def with_ffn_aux(route: RouterOutput, ffn_aux: Any) -> RouterOutput:
    """The route with a feed-forward's aux output folded in (losses summed, stats merged), so a
    routed block still reports one RouterOutput."""
    if ffn_aux is None:
        return route
    return route._replace(aux_loss=route.aux_loss + ffn_aux.aux_loss, stats={**route.stats, **ffn_aux.stats})


def route_mask(route: RouterOutput, seq_len: int) -> torch.Tensor:
    """Which tokens (B, T) a route processed (padding slots excluded)."""
    ones = torch.ones_like(route.idx_BK, dtype=torch.int32)
    hits = ones if route.valid_BK is None else route.valid_BK.to(torch.int32)
    counts = torch.zeros(route.idx_BK.shape[0], seq_len, dtype=torch.int32, device=route.idx_BK.device)
    return counts.scatter_add_(1, route.idx_BK, hits) > 0
