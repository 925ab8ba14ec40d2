"""FLOP accounting for dense and Mixture-of-Depths configs.

Convention (stated once, used everywhere):
- A matmul of (m x k) by (k x n) costs 2·m·k·n FLOPs; element-wise ops, norms, softmax and RoPE
  are not counted (as in ``torch.utils.flop_counter.FlopCounterMode``).
- Attention scores and values cost 4·S²·D per block for S tokens attending to S tokens: the
  full square, NOT halved for the causal mask (SDPA kernels are counted that way by PyTorch's
  counter; halve it yourself for a kernel that skips masked tiles).
- A routed block with K = round(capacity·T) of T tokens: 2·K·P_block for its matmuls,
  4·K²·D attention, plus the router 2·T·D and, if present, the predictor
  2·T·(D·h + h) (its MLP over every token).
- The LM head costs 2·T·D·V; the embedding lookup costs nothing.
- Training ≈ 3× forward (backward costs two matmuls per forward matmul).
"""

from __future__ import annotations

from dataclasses import dataclass

from modlm.config import ModelConfig
from modlm.dispatch import capacity_k


def block_params(config: ModelConfig) -> int:
    """Matmul parameters of one transformer block (attention + SwiGLU MLP, no norms)."""
    D, E = config.d_model, config.head_dim
    qkv = D * (config.n_heads + 2 * config.n_kv_heads) * E
    proj = D * D
    mlp = 3 * D * config.d_mlp
    return qkv + proj + mlp


def block_flops(config: ModelConfig, tokens: int) -> int:
    """Forward FLOPs of one block over ``tokens`` tokens attending among themselves."""
    return 2 * tokens * block_params(config) + 4 * tokens * tokens * config.d_model


def router_flops(config: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs of a routed block's router (+ predictor) over all T tokens."""
    if config.router != "learned":
        return 0
    f = 2 * seq_len * config.d_model
    if config.uses_predictor:
        h = config.predictor_hidden
        f += 2 * seq_len * (config.d_model * h + h)
    return f


@dataclass(frozen=True)
class FlopReport:
    """Forward FLOPs per sequence, by part, and training FLOPs per token."""

    seq_len: int
    dense_blocks: int
    routed_blocks: int
    routers: int
    lm_head: int

    @property
    def forward(self) -> int:
        return self.dense_blocks + self.routed_blocks + self.routers + self.lm_head

    @property
    def train(self) -> int:
        return 3 * self.forward

    @property
    def forward_per_token(self) -> float:
        return self.forward / self.seq_len

    @property
    def train_per_token(self) -> float:
        return self.train / self.seq_len

    def as_dict(self) -> dict[str, float]:
        return {"seq_len": self.seq_len, "forward": self.forward, "train": self.train,
                "dense_blocks": self.dense_blocks, "routed_blocks": self.routed_blocks,
                "routers": self.routers, "lm_head": self.lm_head,
                "forward_per_token": self.forward_per_token, "train_per_token": self.train_per_token}


def flops(config: ModelConfig, seq_len: int | None = None) -> FlopReport:
    """Forward FLOPs of one sequence of length ``seq_len`` (default: max_seq_len)."""
    T = config.max_seq_len if seq_len is None else seq_len
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"seq_len={T!r} must be a positive int")
    routed = set(config.routed_layers)
    k = capacity_k(config.capacity, T)
    n_routed = len(routed)
    n_dense = config.n_layers - n_routed
    return FlopReport(
        seq_len=T,
        dense_blocks=n_dense * block_flops(config, T),
        routed_blocks=n_routed * block_flops(config, k),
        routers=n_routed * router_flops(config, T),
        lm_head=2 * T * config.d_model * config.vocab_size,
    )


def forward_flops(config: ModelConfig, seq_len: int | None = None, batch_size: int = 1) -> int:
    return batch_size * flops(config, seq_len).forward


def train_flops(config: ModelConfig, seq_len: int | None = None, batch_size: int = 1) -> int:
    """Training (forward + backward) FLOPs of one step on ``batch_size`` sequences."""
    return batch_size * flops(config, seq_len).train


def format_flops(n: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}FLOP"
    return f"{n:.3g} FLOP"
