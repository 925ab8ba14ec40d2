"""The Mixture-of-Depths transformer: a pre-norm decoder (RMSNorm, RoPE, SDPA, SwiGLU) in which
routed blocks process only the tokens their router picks (Raposo et al. 2024, arXiv 2404.02258).

Axis legend: B batch, T sequence length, K tokens routed into a block, D model width,
H query heads, G key/value heads, E head size, V vocabulary.

The model knows nothing about training, tokenization or sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from modlm.inference import kernels
from modlm.config import ModelConfig
from modlm.model import roles
from modlm.routing.ops import gather_tokens, scatter_add_weighted
from modlm.routing.expert_choice import RouterOutput, build_router


class Linear(nn.Linear):
    """``nn.Linear`` whose few-row fp32 products without gradients (decoding on a CPU) go to
    ``modlm.inference.kernels``; training and everything else is ``F.linear``. Same parameters and names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    param_roles = {"weight": roles.NORM}

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: under bf16 autocast the mean of squares loses too many bits.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Rotary(nn.Module):
    """Rotary position tables. Positions are explicit, so routed tokens keep their true positions."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (T_max, E/2)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin at positions ``pos`` of shape (T,) or (B, T) -> (..., T, E/2)."""
        return self.cos[pos], self.sin[pos]


def apply_rotary(x_BHTE: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dim. cos/sin: (T, E/2) or (B, T, E/2)."""
    if cos.dim() == 3:  # per-row positions (routed tokens): broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x_BHTE.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x_BHTE.dtype)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads, over whatever tokens it is given.

    In a routed block it sees only the selected tokens, in causal order at their true RoPE
    positions, so a token that skipped this block is invisible here to every later token.
    """

    param_roles = {"qkv.weight": roles.MATRIX, "proj.weight": roles.OUT_MATRIX}

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.qkv = Linear(config.d_model, (config.n_heads + 2 * config.n_kv_heads) * config.head_dim, bias=False)
        self.proj = Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        B, T, D = x_BTD.shape
        H, G, E = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x_BTD).split([H * E, G * E, G * E], dim=-1)
        q = q.view(B, T, H, E).transpose(1, 2)  # (B, H, T, E)
        k = k.view(B, T, G, E).transpose(1, 2)  # (B, G, T, E)
        v = v.view(B, T, G, E).transpose(1, 2)  # (B, G, T, E)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            # The cache returns this layer's keys/values for the whole visible history (B, G, S, E)
            # and the mask that makes each query see exactly its own causal past.
            k, v, attn_mask = cache.update(k, v, self.layer_idx)
        if G != H:
            k = k.repeat_interleave(H // G, dim=1)  # (B, H, S, E)
            v = v.repeat_interleave(H // G, dim=1)
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj(y)


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    param_roles = {"gate_up.weight": roles.MATRIX, "down.weight": roles.OUT_MATRIX}

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up = Linear(config.d_model, 2 * config.d_mlp, bias=False)
        self.down = Linear(config.d_mlp, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block written as its update: ``forward(x)`` returns f(x), and the
    caller adds it to the residual stream (dense: x + f(x); routed: x + r * f(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        a_BTD = self.attn(self.attn_norm(x_BTD), cos, sin, attn_mask=attn_mask, cache=cache)
        m_BTD = self.mlp(self.mlp_norm(x_BTD + a_BTD))
        return a_BTD + m_BTD


class RoutedBlock(Block):
    """A block behind a Mixture-of-Depths router.

    select -> gather (B, K, D) -> f on the K tokens only -> x + r * f scattered back.
    Shapes are static under top-k (K = round(capacity * T)); nothing loops over the batch.
    It subclasses ``Block`` so its parameters keep the dense names (``blocks.{i}.attn...``):
    a dense checkpoint loads into a MoD model, only the router is new.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.router = build_router(config)
        self._decode_const: tuple | None = None  # ((B, device), constant tensors) for decode steps

    def forward(self, x_BTD: torch.Tensor, rotary: Rotary, pos_BT: torch.Tensor, mode: str = "topk",
                route: RouterOutput | None = None, cache=None,
                token_mask_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterOutput]:
        """Returns the new residual stream and the router's output (indices, weights, losses).

        Args:
            pos_BT: true position of every token (RoPE), (B, T).
            mode: "topk" or "causal" routing (see modlm.routing).
            route: replay this routing instead of asking the router.
            cache: a RoutedKVCache; only the routed tokens' keys/values enter it.
            token_mask_BT: real tokens (left padding is never routed).
        """
        if cache is not None and x_BTD.shape[1] == 1 and route is None:
            return self._decode_step(x_BTD, rotary, pos_BT, cache, token_mask_BT)
        route = self.router(x_BTD, mode, token_mask_BT) if route is None else route
        idx_BK, valid_BK, weight_BK = route.idx_BK, route.valid_BK, route.weight_BK
        pos_BK = torch.gather(pos_BT, 1, idx_BK)  # true positions of the routed tokens, for RoPE
        cos, sin = rotary(pos_BK)
        x_BKD = gather_tokens(x_BTD, idx_BK)
        # Padded slots (causal routing) sit after every real one, so the causal mask already
        # hides them from real queries; their own outputs are dropped below.
        f_BKD = super().forward(x_BKD, cos, sin, cache=None if cache is None else cache.view(valid=valid_BK))
        if valid_BK is not None:
            f_BKD = f_BKD.masked_fill(~valid_BK.unsqueeze(-1), 0.0)
            if weight_BK is not None:
                weight_BK = weight_BK.masked_fill(~valid_BK, 0.0)
        return scatter_add_weighted(x_BTD, idx_BK, f_BKD, weight_BK), route

    def _decode_step(self, x_B1D: torch.Tensor, rotary: Rotary, pos_B1: torch.Tensor, cache,
                     token_mask_B1: torch.Tensor | None) -> tuple[torch.Tensor, RouterOutput]:
        """One new token per row: compute only the rows whose token routes into this block.

        Computing every row and masking would save nothing; gathering the routed rows makes a
        skipped row cost only its causal decision (``decide_on_host`` where the router has it).
        When every row routes (always the case at batch size 1 when the block runs) nothing is
        gathered and the cache hands back views.
        NOTE: the decision is copied to the host (B logits or booleans) once per routed block and
        step: a sync on an accelerator, the price of a data-dependent batch size. The cache's positions
        and slicing are then host arithmetic, with no further sync.
        """
        on_host = hasattr(self.router, "decide_on_host")
        if on_host:
            flags = self.router.decide_on_host(x_B1D)  # the decision on the host (the one sync)
            if token_mask_B1 is not None:
                flags = [f and m for f, m in zip(flags, token_mask_B1.view(-1).tolist())]
            sel_B1 = r_B1 = None  # r is computed below, for the rows that run only
        else:
            sel_B1, r_B1 = self.router.causal_decision(x_B1D)
            if token_mask_B1 is not None:
                sel_B1 = sel_B1 & token_mask_B1
            flags = sel_B1.view(-1).tolist()  # the decision on the host (the one sync)
        b, B = sum(flags), len(flags)
        # A skipped block costs only the lines above and below, so the RouterOutput reuses
        # constant tensors (no row / every row routed) and carries no statistics.
        idx_B1, zero, none_B1, all_B1 = self._decode_constants(B, x_B1D.device)
        if sel_B1 is None:
            sel_B1 = none_B1 if b == 0 else all_B1 if b == B else \
                torch.tensor(flags, dtype=torch.bool).view(B, 1).to(x_B1D.device)
        if b == 0:
            return x_B1D, RouterOutput(idx_B1, sel_B1, r_B1, zero, {})
        if b == B:
            if on_host:
                r_B1 = self.router.scores(x_B1D)
            cos, sin = rotary(pos_B1)
            f_B1D = super().forward(x_B1D, cos, sin, cache=cache.view())
            if r_B1 is not None:
                f_B1D = f_B1D * r_B1.unsqueeze(-1).to(f_B1D.dtype)
            return x_B1D + f_B1D.to(x_B1D.dtype), RouterOutput(idx_B1, sel_B1, r_B1, zero, {})
        rows_b = torch.tensor([i for i, f in enumerate(flags) if f])  # host indices of the routed rows
        rows_d = rows_b.to(x_B1D.device)
        x_b1D = x_B1D.index_select(0, rows_d)
        if on_host:  # r of the routed rows only; the route reports it for every row
            r_b1 = self.router.scores(x_b1D)
            r_B1 = torch.zeros(B, 1, dtype=r_b1.dtype, device=r_b1.device).index_copy_(0, rows_d, r_b1)
        else:
            r_b1 = None if r_B1 is None else r_B1.index_select(0, rows_d)
        route = RouterOutput(idx_B1, sel_B1, r_B1, zero, {})
        cos, sin = rotary(pos_B1.index_select(0, rows_d))
        f_b1D = super().forward(x_b1D, cos, sin, cache=cache.view(rows=rows_b))
        if r_b1 is not None:
            f_b1D = f_b1D * r_b1.unsqueeze(-1).to(f_b1D.dtype)
        return x_B1D.index_add(0, rows_d, f_b1D.to(x_B1D.dtype)), route

    def _decode_constants(self, B: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(idx_B1 zeros, fp32 zero, all-False sel_B1, all-True sel_B1) for decode-step
        RouterOutputs, built once per (B, device). Read-only: callers must not modify them."""
        if self._decode_const is None or self._decode_const[0] != (B, device):
            self._decode_const = ((B, device), (torch.zeros(B, 1, dtype=torch.long, device=device),
                                                torch.zeros((), dtype=torch.float32, device=device),
                                                torch.zeros(B, 1, dtype=torch.bool, device=device),
                                                torch.ones(B, 1, dtype=torch.bool, device=device)))
        return self._decode_const[1]


def route_mask(route: RouterOutput, seq_len: int) -> torch.Tensor:
    """Which tokens (B, T) a route processed (padding slots excluded)."""
    ones = torch.ones_like(route.idx_BK, dtype=torch.int32)
    hits = ones if route.valid_BK is None else route.valid_BK.to(torch.int32)
    counts = torch.zeros(route.idx_BK.shape[0], seq_len, dtype=torch.int32, device=route.idx_BK.device)
    return counts.scatter_add_(1, route.idx_BK, hits) > 0


@dataclass
class ModelOutput:
    """Everything a forward pass returns (no state is stashed on the module).

    logits: (B, T, V). loss = lm_loss + aux_loss when targets are given, else None.
    routes: one RouterOutput per routed block, in order (indices, weights, stats).
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    routes: dict[int, RouterOutput] = field(default_factory=dict)

    def router_stats(self) -> dict[str, float]:
        """Per-block statistics as plain floats, keyed ``L{layer}/{name}`` (one host sync)."""
        flat = {f"L{i}/{k}": v for i, r in self.routes.items() for k, v in r.stats.items()}
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
        self.blocks = nn.ModuleList(
            RoutedBlock(config, i) if config.is_routed(i) else Block(config, i) for i in range(config.n_layers)
        )
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

        Each row is a ``modlm.model.roles`` role, declared by the module owning the parameter.

        NOTE: the router is initialised so r = w·x is O(1) once the residual stream is O(1):
        an r near 0 would multiply the routed block's update (x + r·f) and its gradients
        towards zero, and the block would barely learn.
        """
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        init = {"normal": lambda p: nn.init.normal_(p, 0.0, std),
                "scaled_normal": lambda p: nn.init.normal_(p, 0.0, out_std),
                "router": lambda p: nn.init.normal_(p, 0.0, 1.0 / math.sqrt(self.config.d_model)),
                "ones": nn.init.ones_, "zeros": nn.init.zeros_, "module": lambda p: None}
        params = list(roles.named_parameters_with_roles(self))
        # The embedding (and an untied head) first, then the rest in order: the RNG draws stay
        # those of every earlier version, so a seed gives the same model as before.
        first = [t for t in params if t[2] in (roles.EMBEDDING, roles.LM_HEAD)]
        rest = [t for t in params if t[2] not in (roles.EMBEDDING, roles.LM_HEAD)]
        for _, p, role in first + rest:
            init[role.init](p)

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, **kwargs):
        """Sample continuations with causal routing and the routed KV cache.

        A thin convenience over ``modlm.inference.generate.generate`` (see it for every option: stop
        tokens, streaming, prefill routing, routing trace). ``idx``: a (B, T) tensor or lists of
        token ids. Returns a ``GenerationResult``.
        """
        from modlm.inference.generate import generate

        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                        **kwargs)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if exclude_embeddings else n

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None, routing: str = "topk",
                routes: dict[int, RouterOutput] | None = None, cache=None, pos_BT: torch.Tensor | None = None,
                token_mask_BT: torch.Tensor | None = None) -> ModelOutput:
        """Run the model.

        Args:
            idx_BT: token ids (B, T), T <= config.max_seq_len.
            targets_BT: next-token ids (B, T); -1 is ignored. Gives ``loss``.
            routing: "topk" (expert-choice over each sequence; training) or "causal" (each token
                routes by the causal signal, as when decoding).
            routes: replay these per-layer routes instead of asking the routers.
            cache: a ``modlm.inference.cache.RoutedKVCache`` to read and extend (prefill and decoding).
            pos_BT: positions of the tokens (default 0..T-1); needed with a cache.
            token_mask_BT: real tokens of a left-padded batch (padding is never routed and never
                attended to).
        """
        B, T = idx_BT.shape
        if pos_BT is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
            pos_T = torch.arange(T, device=idx_BT.device)
            cos, sin = self.rotary(pos_T)  # (T, E/2), shared by every row
            pos_BT = pos_T.expand(B, T)
        else:
            cos, sin = self.rotary(pos_BT)  # (B, T, E/2): per-row positions (left padding, decoding)
        dense_cache = None if cache is None else cache.view(valid=token_mask_BT)
        pad_mask = None
        if cache is None and token_mask_BT is not None and not bool(token_mask_BT.all()):
            # Left padding without a cache: dense blocks must not attend to pad tokens (a token
            # always sees itself, so no softmax row is empty).
            causal_TT = torch.ones(T, T, dtype=torch.bool, device=idx_BT.device).tril()
            pad_mask = (causal_TT & token_mask_BT[:, None, :]) | torch.eye(T, dtype=torch.bool, device=idx_BT.device)
            pad_mask = pad_mask.unsqueeze(1)  # (B, 1, T, T)
        x_BTD = self.tok_emb(idx_BT)
        out_routes: dict[int, RouterOutput] = {}
        for i, block in enumerate(self.blocks):
            if isinstance(block, RoutedBlock):
                replay = routes.get(i) if routes is not None else None
                x_BTD, out_routes[i] = block(x_BTD, self.rotary, pos_BT, routing, route=replay, cache=cache,
                                             token_mask_BT=token_mask_BT)
            else:
                x_BTD = x_BTD + block(x_BTD, cos, sin, cache=dense_cache, attn_mask=pad_mask)
        logits_BTV = self.lm_head(self.norm(x_BTD))
        out = ModelOutput(logits=logits_BTV, routes=out_routes)
        if targets_BT is not None:
            out.lm_loss = F.cross_entropy(logits_BTV.float().view(-1, logits_BTV.size(-1)), targets_BT.reshape(-1),
                                          ignore_index=-1)
            aux = [r.aux_loss for r in out_routes.values()]
            out.aux_loss = torch.stack(aux).sum() if aux else out.lm_loss.new_zeros(())
            out.loss = out.lm_loss + out.aux_loss
        return out
