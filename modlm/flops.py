"""FLOP accounting for dense and Mixture-of-Depths configs.

Convention (stated once, used everywhere; ``tests/test_flops.py`` checks it against
``torch.utils.flop_counter.FlopCounterMode`` on real forward and forward+backward passes):

- A matmul of (m x k) by (k x n) costs 2·m·k·n FLOPs. Element-wise ops, norms, softmax, RoPE,
  the loss, gathers and scatters cost nothing; neither does the embedding lookup (nor its
  backward, a scatter-add). This is PyTorch's counter's convention.
- Attention scores and values: 4·S²·D per block for S tokens attending to S tokens, the full
  square, NOT halved for the causal mask. PyTorch's counter counts SDPA that way (and the math
  kernel does compute the masked half). ``flops(..., causal_attention=True)`` counts only the
  S(S+1)/2 visible pairs instead, for kernels that skip masked tiles.
- A routed block with K = capacity_k(capacity, T) of T tokens runs at its capacity: 2·K·P_block
  for its matmuls and 4·K²·D for attention among the K tokens. Causal (thresholded) routing at
  decode time processes a data-dependent number of tokens and is not what this counts.
- Routers: the score r = w·x costs 2·T·D per routed block (learned and token-choice routers;
  the random router is free). The causal predictor (paper §3.5) is an MLP over every token:
  2·T·(D·h + h) forward.
- A-MoD (``router="attention"``): the block before each routed block recomputes its attention
  probabilities to score tokens by the attention they receive (fused attention does not return
  them): one more QK^T, 2·S²·D for its S tokens (S = T for a dense block, K for a routed one),
  forward only (the scores choose indices; nothing backpropagates through them). Counted in
  ``routers`` and kept apart as ``received_attention``. Its causal predictor counts as below.
- LM head: 2·T·D·V (tied or not).
- Training = forward + backward. Backward costs twice the forward for every matmul (the input
  gradient and the weight gradient), EXCEPT the predictor: its input is detached, so its first
  layer computes no input gradient, and its backward is 2·T·(D·h + 2h) instead of 2·forward.
  So training is a little under 3x forward for a model with a predictor, exactly 3x otherwise.

Block kinds beyond dense / routed (``modlm.spec.kinds``), each counted layer by layer:

- MoE feed-forward (``"moe"``, ``"mode-staged"``, ``"mode-integrated"``): the router 2·n·D·X
  (X = real + no-op experts) over the n tokens reaching it, plus 2·s·3·D·F for the s expert
  assignments real experts compute (no-op experts are free), plus a shared expert's 2·n·3·D·F.
  s depends on the data; given ``expert_tokens`` (per layer and sequence: the ``expert_tokens``
  stat of a forward divided by the batch size) the count is exact. Without it s is nominal:
  k·n·E/X·min(1, c), the balanced load the balance loss drives towards, capped by the
  capacity factor c (an upper bound when the load is uneven and c < 1; exact for a plain MoE
  without dropping). The MoE router's input is not detached: backward 2x, as for any matmul.
- Skipping that keeps keys (``"keys-kept"``): the key/value projections run over all T tokens,
  2·T·D·2·G·E; the query and output projections and the MLP over the K routed ones; attention
  is K queries over T keys, 4·K·T·D (``causal_attention=True``: 2·K·(T+1)·D, the visible pairs
  of queries spread evenly over the sequence, exact at K = T). The router as for ``"routed"``.
- Early exit (``"exit"``): in training every token runs every layer and each exit block
  (index > 0) applies the LM head to its input for the exit loss: 2·T·D·V per exit block
  (``exit_heads``). Inference with exits is data-dependent: ``causal_forward_flops`` counts it
  from the tokens each layer ran.

Known difference from ``FlopCounterMode`` (exact, and tested): it has no formula for
``aten.mv``, so it counts the router score r = w·x (a matrix-vector product) as 0 in the
forward and the backward. We count it (2·T·D forward, 4·T·D backward) because the work is real;
it is ~0.1% of a routed model's FLOPs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from modlm.config import ModelConfig
from modlm.spec.capacity import capacity_k
from modlm.spec.kinds import block_spec
from modlm.spec.routers import NO_ROUTER, router_spec


def _scores_tokens(config: ModelConfig) -> bool:
    """The router computes a learned score r = w·x over every token (its registry spec says so)."""
    return config.router != NO_ROUTER and router_spec(config.router).scores_tokens


def block_params(config: ModelConfig) -> int:
    """Matmul parameters of one transformer block (attention + SwiGLU MLP, no norms)."""
    D, E = config.d_model, config.head_dim
    qkv = D * (config.n_heads + 2 * config.n_kv_heads) * E
    proj = D * D
    mlp = 3 * D * config.d_mlp
    return qkv + proj + mlp


def attention_flops(config: ModelConfig, tokens: int, causal: bool = False) -> int:
    """Forward FLOPs of scores (QK^T) and values (AV) for ``tokens`` tokens attending among themselves.

    Query heads x head size = d_model, so grouped-query attention costs the same here (keys and
    values are repeated to every query head before the product).
    """
    pairs2 = tokens * (tokens + 1) if causal else 2 * tokens * tokens  # 2 x (attended pairs)
    return 2 * pairs2 * config.n_heads * config.head_dim


def query_attention_flops(config: ModelConfig, queries: float, keys: int, causal: bool = False) -> float:
    """Forward FLOPs of scores and values for ``queries`` tokens attending over ``keys`` tokens
    of one sequence (a ``"keys-kept"`` layer: its routed tokens over every token's key).

    ``causal``: count the visible pairs of queries spread evenly over the sequence, each seeing
    (keys + 1) / 2 keys on average (exact when every token is a query)."""
    pairs2 = queries * (keys + 1) if causal else 2 * queries * keys  # 2 x (attended pairs)
    return 2 * pairs2 * config.n_heads * config.head_dim


def kv_params(config: ModelConfig) -> int:
    """Matmul parameters of one block's key and value projections."""
    return config.d_model * 2 * config.n_kv_heads * config.head_dim


def n_all_experts(config: ModelConfig, kind: str) -> int:
    """X, the experts a layer of this kind routes among (real + its no-op experts)."""
    return config.n_experts + (config.n_noop_experts if block_spec(kind).noop_experts else 0)


def nominal_expert_tokens(config: ModelConfig, kind: str, tokens: float) -> float:
    """Expert assignments real experts compute for ``tokens`` tokens: k·n·E/X·min(1, c)."""
    c = 1.0 if config.moe_capacity_factor is None else min(1.0, config.moe_capacity_factor)
    return config.moe_top_k * tokens * config.n_experts / n_all_experts(config, kind) * c


def layer_flops(
    config: ModelConfig,
    layer_idx: int,
    seq_len: int,
    tokens: float | None = None,
    expert_tokens: float | None = None,
    causal_attention: bool = False,
) -> tuple[float, float]:
    """(block FLOPs, attention part) of one layer's forward over one sequence of ``seq_len``.

    ``tokens``: tokens the layer processes (default: T, or the capacity for a routed kind).
    ``expert_tokens``: real-expert assignments of an MoE layer (default: nominal). Router,
    predictor and exit-head FLOPs are not included (see ``flops``).
    """
    kind = config.layer_types[layer_idx]
    spec = block_spec(kind)
    n = tokens if tokens is not None else capacity_k(config.capacity, seq_len) if spec.routed else seq_len
    if spec.keeps_keys:  # keys and values of every token, the rest of the block for the n routed
        attn = query_attention_flops(config, n, seq_len, causal_attention)
        kv = kv_params(config)
        return 2 * seq_len * kv + 2 * n * (block_params(config) - kv) + attn, attn
    attn = attention_flops(config, n, causal_attention)
    if not spec.moe:
        return 2 * n * block_params(config) + attn, attn
    D = config.d_model
    mlp = 3 * D * config.d_mlp
    s = nominal_expert_tokens(config, kind, n) if expert_tokens is None else expert_tokens
    out = 2 * n * (block_params(config) - mlp) + attn  # attention projections
    out += 2 * s * mlp + 2 * n * D * n_all_experts(config, kind)  # experts at their tokens + MoE router
    if config.moe_shared_expert:
        out += 2 * n * mlp
    return out, attn


def moe_router_flops(config: ModelConfig, layer_idx: int, tokens: float) -> float:
    """Forward FLOPs of an MoE layer's router over ``tokens`` tokens (0 for a dense MLP)."""
    kind = config.layer_types[layer_idx]
    return 2 * tokens * config.d_model * n_all_experts(config, kind) if block_spec(kind).moe else 0


def router_score_flops(config: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs of one routed block's score r = w·x over T tokens (0 for the random router)."""
    return 2 * seq_len * config.d_model if _scores_tokens(config) else 0


def predictor_flops(config: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs of one routed block's causal predictor over T tokens (0 without one)."""
    if not config.uses_predictor:
        return 0
    h = config.predictor_hidden
    return 2 * seq_len * (config.d_model * h + h)


def predictor_backward_flops(config: ModelConfig, seq_len: int) -> int:
    """Backward FLOPs of one predictor: fc1 weight grad only (its input is detached), fc2 both grads."""
    if not config.uses_predictor:
        return 0
    h = config.predictor_hidden
    return 2 * seq_len * (config.d_model * h + 2 * h)


def received_attention_flops(config: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs of recomputing attention scores for A-MoD over a whole model, one sequence.

    Each routed block whose router ``needs_received_attention`` reads the block before it, which
    recomputes QK^T over its own tokens (T, or K if it is routed itself): 2·S²·H·E = 2·S²·D.
    """
    if config.router == NO_ROUTER or not router_spec(config.router).needs_received_attention:
        return 0
    k = capacity_k(config.capacity, seq_len)
    routed = set(config.routed_layers)
    sizes = [k if i - 1 in routed else seq_len for i in config.routed_layers]
    return sum(2 * s * s * config.n_heads * config.head_dim for s in sizes)


def router_flops(config: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs of a routed block's router (+ predictor) over all T tokens."""
    return router_score_flops(config, seq_len) + predictor_flops(config, seq_len)


@dataclass(frozen=True)
class FlopReport:
    """Forward FLOPs per sequence, by part, and the backward and training FLOPs they imply.

    ``routers`` includes ``predictors`` (the forward FLOPs of the causal predictors), which are
    kept apart because their backward is not 2x their forward (see the module docstring).
    ``attention`` is the part of ``dense_blocks + routed_blocks`` spent on scores and values.
    ``received_attention`` (A-MoD's recomputed scores) is part of ``routers`` and has no backward.
    """

    seq_len: int
    dense_blocks: int
    routed_blocks: int
    routers: int
    lm_head: int
    predictors: int = 0
    predictors_backward: int = 0
    attention: int = 0
    exit_heads: int = 0
    received_attention: int = 0

    @property
    def forward(self) -> int:
        return self.dense_blocks + self.routed_blocks + self.routers + self.lm_head + self.exit_heads

    @property
    def backward(self) -> int:
        return 2 * (self.forward - self.predictors - self.received_attention) + self.predictors_backward

    @property
    def train(self) -> int:
        """Forward + backward FLOPs of one sequence."""
        return self.forward + self.backward

    @property
    def forward_per_token(self) -> float:
        return self.forward / self.seq_len

    @property
    def train_per_token(self) -> float:
        return self.train / self.seq_len

    def as_dict(self) -> dict[str, float]:
        return {
            "seq_len": self.seq_len,
            "forward": self.forward,
            "backward": self.backward,
            "train": self.train,
            "dense_blocks": self.dense_blocks,
            "routed_blocks": self.routed_blocks,
            "routers": self.routers,
            "predictors": self.predictors,
            "lm_head": self.lm_head,
            "exit_heads": self.exit_heads,
            "attention": self.attention,
            "received_attention": self.received_attention,
            "forward_per_token": self.forward_per_token,
            "train_per_token": self.train_per_token,
        }


def flops(
    config: ModelConfig,
    seq_len: int | None = None,
    causal_attention: bool = False,
    expert_tokens: Mapping[int, float] | None = None,
) -> FlopReport:
    """FLOPs of one sequence of length ``seq_len`` (default: max_seq_len), routed blocks at capacity.

    ``causal_attention=True`` counts only the attended (lower-triangle) pairs of attention.
    ``expert_tokens``: {layer: real-expert assignments per sequence} of MoE layers, measured
    (exact); layers not named use the nominal count (see the module docstring).
    """
    T = config.max_seq_len if seq_len is None else seq_len
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ValueError(f"seq_len={T!r} is invalid: must be a positive int")
    if T > config.max_seq_len:
        # The model cannot run such a sequence: its rotary table and masks stop at max_seq_len.
        raise ValueError(
            f"seq_len={T} is invalid: must be <= the model's max_seq_len={config.max_seq_len} "
            "(count a longer context with a config that has it: --model-arg max_seq_len=N)"
        )
    expert_tokens = expert_tokens or {}
    parts = {"dense": 0, "routed": 0, "routers": 0, "attention": 0, "exit": 0}
    k = capacity_k(config.capacity, T)
    for i, kind in enumerate(config.layer_types):
        spec = block_spec(kind)
        n = k if spec.routed else T
        blk, attn = layer_flops(config, i, T, n, expert_tokens.get(i), causal_attention)
        router = moe_router_flops(config, i, n)
        parts["routed" if spec.routed else "dense"] += blk - router
        parts["routers"] += router + (router_flops(config, T) if spec.routed else 0)
        parts["attention"] += attn
        if spec.exit_gate and i > 0 and config.exit_loss_weight > 0:
            parts["exit"] += 2 * T * config.d_model * config.vocab_size
    n_routed = len(config.routed_layers)
    return FlopReport(
        seq_len=T,
        dense_blocks=parts["dense"],
        routed_blocks=parts["routed"],
        routers=parts["routers"] + received_attention_flops(config, T),
        lm_head=2 * T * config.d_model * config.vocab_size,
        predictors=n_routed * predictor_flops(config, T),
        predictors_backward=n_routed * predictor_backward_flops(config, T),
        attention=parts["attention"],
        exit_heads=parts["exit"],
        received_attention=received_attention_flops(config, T),
    )


def causal_forward_flops(
    config: ModelConfig,
    layer_tokens: Mapping[int, Sequence[int]],
    seq_len: int,
    expert_tokens: Mapping[int, float] | None = None,
) -> float:
    """Forward FLOPs per sequence of a causal (inference) pass, from the tokens each layer ran.

    ``layer_tokens``: {layer: tokens processed in each row} for the layers that process a
    data-dependent number (causally routed, or after early exits); other layers process T
    (or, if routed and not named, their capacity). Each row is one sequence of ``seq_len``
    tokens; its routed attention runs among the tokens it kept. Routers and predictors score
    all T tokens; an exit gate evaluates the LM head for the tokens still running at its input
    (those that ran the previous layer); the final head runs over all T. Averaged over rows.
    """
    rows = max((len(v) for v in layer_tokens.values()), default=1)
    D, V = config.d_model, config.vocab_size
    expert_tokens = expert_tokens or {}
    total = 0.0
    for b in range(rows):
        prev = seq_len
        for i, kind in enumerate(config.layer_types):
            spec = block_spec(kind)
            n = layer_tokens[i][b] if i in layer_tokens else None
            blk, _ = layer_flops(config, i, seq_len, n, expert_tokens.get(i))
            total += blk + (router_flops(config, seq_len) if spec.routed else 0)
            if spec.exit_gate and i > 0:
                total += 2 * prev * D * V
            prev = seq_len if n is None else n
        total += 2 * seq_len * D * V
    return total / rows


def train_flops(config: ModelConfig, seq_len: int | None = None, batch_size: int = 1) -> int:
    """Training (forward + backward) FLOPs of one step on ``batch_size`` sequences."""
    return batch_size * flops(config, seq_len).train


def param_count(config: ModelConfig, exclude_embeddings: bool = False) -> int:
    """Parameters of ``MoDTransformer(config)`` without building it (equals ``model.num_params()``)."""
    D, V = config.d_model, config.vocab_size
    n_routed = len(config.routed_layers)
    per_block = block_params(config) + 2 * D  # matmuls + two RMSNorm gains
    n = config.n_layers * per_block + D  # + the final norm
    mlp = 3 * D * config.d_mlp
    for kind in config.layer_types:
        if block_spec(kind).moe:  # E experts (+ a shared one) instead of one MLP, and the MoE router
            n += (config.n_experts - 1 + int(config.moe_shared_expert)) * mlp + D * n_all_experts(config, kind)
    if _scores_tokens(config):
        n += n_routed * D  # router vector w
    if config.uses_predictor:
        h = config.predictor_hidden
        n += n_routed * (D * h + h + h + 1 + 2)  # fc1, fc2, r_gain and r_bias
    if not config.tie_embeddings:
        n += V * D  # the LM head
    return n if exclude_embeddings else n + V * D


def format_flops(n: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}FLOP"
    return f"{n:.3g} FLOP"
