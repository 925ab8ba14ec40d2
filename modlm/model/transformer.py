"""The Mixture-of-Depths transformer: a pre-norm decoder (RMSNorm, RoPE, SDPA, SwiGLU) in which
routed blocks process only the tokens their router picks (Raposo et al. 2024, arXiv 2404.02258).

Axis legend: B batch, T sequence length, K tokens routed into a block, D model width,
H query heads, G key/value heads, E head size, V vocabulary.

The model knows nothing about training, tokenization or sampling; decoding policy lives in
``modlm.inference``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from modlm.config import ModelConfig
from modlm.model.block import PHASES, BlockContext, Phase, route_mask
from modlm.model.inputs import check_inputs
from modlm.model.layers import Linear, RMSNorm, Rotary
from modlm.routing.base import RouterOutput
from modlm.spec import roles
from modlm.spec.kinds import block_spec
from modlm.spec.routers import NO_ROUTER, router_spec

if TYPE_CHECKING:  # the decode policy's contract lives with the policy, a floor above the model
    from modlm.inference.decode import DecodePolicy

__all__ = ["ModelOutput", "MoDTransformer", "route_mask"]


@dataclass
class ModelOutput:
    """Everything a forward pass returns (no state is stashed on the module).

    logits: (B, T, V). loss = lm_loss + aux_loss when targets are given, else None.
    routes: one RouterOutput per routed block, in order (indices, weights, stats).
    aux: every block's aux output by layer (routed blocks: their RouterOutput).
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    routes: dict[int, RouterOutput] = field(default_factory=dict)
    aux: dict[int, Any] = field(default_factory=dict)

    def router_stats(self) -> dict[str, float]:
        """Per-block statistics (routers, MoE feed-forwards, exit gates) as plain floats, keyed
        ``L{layer}/{name}`` (one host sync)."""
        flat = {f"L{i}/{k}": v for i, a in self.aux.items() for k, v in a.stats.items()}
        if not flat:
            return {}
        values = torch.stack([v.float() for v in flat.values()]).tolist()
        return dict(zip(flat.keys(), values))


class MoDTransformer(nn.Module):
    """A decoder-only language model whose ``config.routed_layers`` are Mixture-of-Depths blocks.

    With ``config.router == "none"`` it is the dense baseline with the same parameters
    (minus routers), so MoD and dense can be compared shape for shape.
    """

    param_roles = {"tok_emb.weight": roles.EMBEDDING, "lm_head.weight": roles.LM_HEAD}

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        # One class per layer kind, found by the registry (``config.layer_types``).
        self._routed = config.routed_layers  # the config does not change under a built model
        # Blocks whose next block routes by the attention its tokens receive here (A-MoD): they
        # record it whenever routing is top-k (``BlockContext.record_attention``).
        scores_by_attention = config.router != NO_ROUTER and router_spec(config.router).needs_received_attention
        self._attention_providers = frozenset(i - 1 for i in self._routed) if scores_by_attention else frozenset()
        self.blocks = nn.ModuleList(block_spec(kind).load()(config, i) for i, kind in enumerate(config.layer_types))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.rotary = Rotary(config.head_dim, config.max_seq_len, config.rope_base)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter.

        | parameter                          | init                                   |
        |------------------------------------|----------------------------------------|
        | tok_emb (tied lm_head)             | normal(0, init_std)                    |
        | attn.qkv, mlp.gate_up              | normal(0, init_std)                    |
        | attn.proj, mlp.down (into residual)| normal(0, init_std / sqrt(2 n_layers)) |
        | RMSNorm weights                    | ones                                   |
        | router.weight (r = w·x)            | normal(0, 1 / sqrt(d_model))           |
        | predictor fc1/fc2                  | PyTorch default (kaiming-uniform)      |

        Each row is a ``modlm.spec.roles`` role, declared by the module owning the parameter.

        NOTE: the router is initialised so r = w·x is O(1) once the residual stream is O(1):
        an r near 0 would multiply the routed block's update (x + r·f) and its gradients
        towards zero, and the block would barely learn.
        """
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        init = {
            "normal": lambda p: nn.init.normal_(p, 0.0, std),
            "scaled_normal": lambda p: nn.init.normal_(p, 0.0, out_std),
            "router": lambda p: nn.init.normal_(p, 0.0, 1.0 / math.sqrt(self.config.d_model)),
            "ones": nn.init.ones_,
            "zeros": nn.init.zeros_,
            "module": lambda p: None,
        }
        params = list(roles.named_parameters_with_roles(self))
        # The embedding (and an untied head) first, then the rest in order: the RNG draws stay
        # those of every earlier version, so a seed gives the same model as before.
        first = [t for t in params if t[2] in (roles.EMBEDDING, roles.LM_HEAD)]
        rest = [t for t in params if t[2] not in (roles.EMBEDDING, roles.LM_HEAD)]
        for _, p, role in first + rest:
            init[role.init](p)

    def head(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """The final norm + LM head, h -> logits (B, T, V); early-exit gates share it."""
        return self.lm_head(self.norm(x_BTD))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if exclude_embeddings else n

    def forward(
        self,
        idx_BT: torch.Tensor,
        targets_BT: torch.Tensor | None = None,
        routing: str = "topk",
        routes: dict[int, RouterOutput] | None = None,
        cache=None,
        pos_BT: torch.Tensor | None = None,
        token_mask_BT: torch.Tensor | None = None,
        phase: Phase | str = Phase.TRAIN,
        decode: DecodePolicy | None = None,
    ) -> ModelOutput:
        """Run the model.

        Args:
            idx_BT: token ids (B, T), T <= config.max_seq_len, an int64 or int32 tensor.
            targets_BT: next-token ids (B, T), int64; -1 is ignored. Gives ``loss``.
            routing: "topk" (expert-choice over each sequence; training) or "causal" (each token
                routes by the causal signal, as when decoding). Decode steps always route causally.
            routes: replay these per-layer routes instead of asking the routers.
            cache: a ``modlm.inference.cache.ModelCache`` to read and extend (PREFILL and DECODE).
            pos_BT: positions of the tokens (default 0..T-1); needed with a cache.
            token_mask_BT: real tokens of a left-padded batch (padding is never routed and never
                attended to).
            phase: "train" (whole sequences, no cache: training and evaluation), "prefill" (a
                prompt entering ``cache``) or "decode" (one new token per row; ``decode`` says
                which rows each routed block computes). Given by the caller, never inferred.
            decode: the decode policy (``modlm.inference.decode.HostDecisions``), DECODE only.

        Raises:
            ValueError: (one line, naming the value) ids or targets of the wrong type, dtype or
                shape, or out of range (``modlm.model.inputs``; the range is checked on CPU).
        """
        check_inputs(self.config.vocab_size, idx_BT, targets_BT)
        phase = _check_phase(phase, idx_BT, cache, decode)
        pos_BT, cos, sin = self._positions(idx_BT, pos_BT)
        ctx = BlockContext(
            phase=phase,
            routing=routing,
            rotary=self.rotary,
            pos_BT=pos_BT,
            cos=cos,
            sin=sin,
            token_mask_BT=token_mask_BT,
            attn_mask=None if cache is not None else _padding_mask(token_mask_BT),
            cache=cache,
            replay=routes,
            decode=decode,
            targets_BT=targets_BT,
            head=self.head,
            # Decoding and causal routing decide per token and never read received attention.
            record_attention=self._attention_providers
            if routing == "topk" and phase is not Phase.DECODE
            else frozenset(),
        )
        x_BTD = self.tok_emb(idx_BT)
        auxes: dict[int, Any] = {}
        for i, block in enumerate(self.blocks):
            x_BTD, aux = block(x_BTD, ctx)
            if aux is not None:
                auxes[i] = aux
        out = ModelOutput(logits=self.head(x_BTD), routes={i: auxes[i] for i in self._routed if i in auxes}, aux=auxes)
        if targets_BT is not None:
            _add_losses(out, targets_BT)
        return out

    def _positions(
        self, idx_BT: torch.Tensor, pos_BT: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pos_BT, cos, sin): 0..T-1 with (T, E/2) tables shared by every row when no positions
        are given, else the rows' own positions with (B, T, E/2) tables (left padding, decoding)."""
        B, T = idx_BT.shape
        if pos_BT is not None:
            return (pos_BT, *self.rotary(pos_BT))
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
        pos_T = torch.arange(T, device=idx_BT.device)
        return (pos_T.expand(B, T), *self.rotary(pos_T))


def _padding_mask(token_mask_BT: torch.Tensor | None) -> torch.Tensor | None:
    """The (B, 1, T, T) attention mask of left padding without a cache (None: no padding).

    Dense blocks must not attend to pad tokens; a token always sees itself, so no softmax row is
    empty."""
    if token_mask_BT is None or bool(token_mask_BT.all()):
        return None
    T, device = token_mask_BT.shape[1], token_mask_BT.device
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    pad_mask = (causal_TT & token_mask_BT[:, None, :]) | torch.eye(T, dtype=torch.bool, device=device)
    return pad_mask.unsqueeze(1)  # (B, 1, T, T)


def _add_losses(out: ModelOutput, targets_BT: torch.Tensor) -> None:
    """lm_loss (cross-entropy, -1 ignored), aux_loss (every block's, summed) and their sum."""
    logits_BTV = out.logits
    out.lm_loss = F.cross_entropy(
        logits_BTV.float().view(-1, logits_BTV.size(-1)), targets_BT.reshape(-1), ignore_index=-1
    )
    aux = [a.aux_loss for a in out.aux.values()]
    out.aux_loss = torch.stack(aux).sum() if aux else out.lm_loss.new_zeros(())
    out.loss = out.lm_loss + out.aux_loss


def _check_phase(phase: Phase | str, idx_BT: torch.Tensor, cache, decode) -> Phase:
    """The phase as a ``Phase``, with one-line errors for arguments that contradict it."""
    if not isinstance(phase, Phase):  # the decode loop passes the enum: no lookup per token
        try:
            phase = Phase(phase)
        except ValueError:
            raise ValueError(f"phase={phase!r} is invalid: must be one of {PHASES}") from None
    if phase is Phase.TRAIN and cache is not None:
        raise ValueError(
            "phase='train' runs whole sequences without a cache; pass phase='prefill' or 'decode' with a cache"
        )
    if phase is not Phase.TRAIN and cache is None:
        raise ValueError(f"phase={phase.value!r} needs a cache (modlm.inference.cache.ModelCache)")
    if phase is Phase.DECODE:
        if idx_BT.dim() != 2 or idx_BT.shape[1] != 1:
            raise ValueError(f"phase='decode' takes one new token per row, got ids of shape {tuple(idx_BT.shape)}")
        if decode is None:
            raise ValueError("phase='decode' needs a decode policy (modlm.inference.decode.HostDecisions)")
    return phase
