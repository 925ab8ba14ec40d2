"""Early exit (the baseline Raposo et al. 2024 contrast MoD with), LayerSkip/CALM style.

Axis legend: B batch, T sequence length, K tokens still running a layer, D model width, V vocabulary.

Top-k routing (``routing="topk"``: training on whole known sequences): every token runs every layer; the model's
one final norm + LM head (``BlockContext.head``, shared, as in LayerSkip) is applied to each
layer's output and a weighted cross-entropy is added to the loss. The exit after layer j
(0-based, j < L-1) has weight ``exit_loss_weight · (j+1) / L`` (rising with depth, like
LayerSkip's scale; no curriculum); the last layer's exit is the LM loss itself (weight 1).
Block j+1 computes the exit loss of its input, so an ``"exit"`` block at index i > 0 owns the
exit after layer i-1.

Inference (``routing="causal"``, and every decode step): at the input of block i > 0 a token
still running computes the shared head's softmax and its confidence, top-1 minus top-2
probability (CALM); if it exceeds the block's ``exit_threshold`` buffer the token exits and
runs no later layer. Its state is then final: the model's head on it gives the very logits its
gate saw. How later tokens see an exited token in the layers it skipped: they do not. Nothing
is stored there (as in MoD and D-LLM), so the ``"exit"`` kind uses the ragged cache and a later
token attends, in each layer, only to the tokens that ran it. (CALM instead copies the state up
and computes the skipped layers' keys and values, which costs those projections.) The threshold
is one value for all layers, calibrated to a target FLOP fraction by
``modlm.inference.calibrate.calibrate_exit_threshold``; 1.0 (the default) never exits.

The decode path evaluates the head only for rows still running (that is what
``modlm.flops.causal_forward_flops`` counts); the whole-sequence causal path evaluates it for every
token, as a reference.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from modlm.config import ModelConfig
from modlm.model.block import BlockContext, DenseBlock, Phase, RoutedBlock
from modlm.routing.base import RouterOutput, causal_output

__all__ = ["EarlyExitBlock", "ExitLoss", "exit_confidence"]


class ExitLoss(NamedTuple):
    """The aux output of an exit block in training: the weighted exit loss and its raw value."""

    aux_loss: torch.Tensor
    stats: dict[str, torch.Tensor]


def exit_confidence(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 softmax probability over the last axis, in fp32 (CALM's softmax confidence)."""
    top2 = torch.topk(torch.softmax(logits.float(), dim=-1), 2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


class EarlyExitBlock(RoutedBlock):
    """A dense block that tokens which exited earlier skip (see the module docstring).

    It reuses ``RoutedBlock``'s gather / compute / scatter for the running tokens (unit weight),
    with the exit rule in place of a router: it builds no MoD router.
    """

    kind: ClassVar[str] = "exit"

    def __init__(self, config: ModelConfig, layer_idx: int):
        DenseBlock.__init__(self, config, layer_idx)
        self.loss_weight = config.exit_loss_weight * layer_idx / config.n_layers
        # Persistent: a calibrated model saves and loads with its threshold.
        self.register_buffer("exit_threshold", torch.tensor(1.0))

    def forward(self, x_BTD: torch.Tensor, ctx: BlockContext) -> tuple[torch.Tensor, Any]:
        if self.layer_idx == 0:  # no exit before the first layer
            return DenseBlock.forward(self, x_BTD, ctx)
        if ctx.phase is Phase.DECODE:
            return self._decode(x_BTD, ctx)
        # Exits are causal per-token decisions; top-k routing (whole known sequences) has no
        # per-token rule, so every token runs, and in training this input's exit loss is added.
        if ctx.routing == "topk":
            out_BTD, _ = DenseBlock.forward(self, x_BTD, ctx)
            return out_BTD, self._exit_loss(x_BTD, ctx) if ctx.phase is Phase.TRAIN else None
        conf_BT = exit_confidence(ctx.head(x_BTD))
        run_BT = conf_BT <= self.exit_threshold
        if ctx.exit_active_BT is not None:
            run_BT = run_BT & ctx.exit_active_BT
        ctx.exit_active_BT = run_BT
        route = causal_output(run_BT, None, ctx.token_mask_BT, x_BTD.new_zeros((), dtype=torch.float32))
        out_BTD, _ = self.run_route(x_BTD, ctx, route)
        return out_BTD, route

    def _exit_loss(self, x_BTD: torch.Tensor, ctx: BlockContext) -> ExitLoss | None:
        if ctx.targets_BT is None or self.loss_weight == 0:
            return None
        logits_BTV = ctx.head(x_BTD)
        ce = F.cross_entropy(
            logits_BTV.float().view(-1, logits_BTV.size(-1)), ctx.targets_BT.reshape(-1), ignore_index=-1
        )
        return ExitLoss(self.loss_weight * ce, {"exit_loss": ce.detach()})

    def _decode(self, x_B1D: torch.Tensor, ctx: BlockContext) -> tuple[torch.Tensor, RouterOutput]:
        """One new token per row: the decode policy lets the rows still running evaluate the
        gate; the block computes the rows that stay, the rest skip."""
        rows = ctx.exit_rows if ctx.exit_rows is not None else list(range(x_B1D.shape[0]))

        def gate(x_b1D: torch.Tensor) -> torch.Tensor:
            return exit_confidence(ctx.head(x_b1D))

        plan = ctx.decode.plan_exit(gate, float(self.exit_threshold), x_B1D, rows)
        ctx.exit_rows = plan.rows if plan.rows is not None else rows
        out_B1D, _ = self.compute_rows(x_B1D, ctx, plan)
        return out_B1D, plan.route
