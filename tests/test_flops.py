"""modlm.flops against PyTorch's own FLOP counter, on real forward and forward+backward passes."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from modlm import ModelConfig, MoDTransformer
from modlm.flops import flops, layer_flops, param_count, router_score_flops, train_flops

B, T = 2, 64
CONFIGS = {
    "dense": dict(router="none"),
    "mod-predictor": dict(router="learned", causal_routing="predictor"),
    "mod-aux": dict(router="learned", causal_routing="aux_loss"),
    "mod-both-every-block": dict(router="learned", causal_routing="both", route_every=1, route_start=0, capacity=0.5),
    "mod-random": dict(router="random"),
    "mod-token-choice": dict(router="token_choice", aux_loss_weight=1.0),
    "mod-gqa-untied": dict(router="learned", n_heads=4, n_kv_heads=2, tie_embeddings=False, capacity=0.25),
    "mod-tuned": dict(router="tuned", capacity=0.5),
    # A-MoD: the recomputed attention scores of the providing blocks (dense ones here) ...
    "amod": dict(router="attention"),
    # ... and of routed ones (every block from 1 on is routed, so blocks 1 and 2 provide at K tokens).
    "amod-gqa-every-block": dict(router="attention", route_every=1, route_start=1, n_kv_heads=2, capacity=0.5),
}


def _count(cfg: ModelConfig, backward: bool) -> int:
    """FLOPs PyTorch counts for one batch; the math SDPA kernel, so attention shows as bmm's.

    NOTE: on CPU the fused SDPA op has no flop formula in FlopCounterMode (it would count 0);
    the math backend decomposes it into counted matmuls over the full (masked) square.
    """
    torch.manual_seed(0)
    model = MoDTransformer(cfg)
    x = torch.randint(0, cfg.vocab_size, (B, T))
    y = torch.randint(0, cfg.vocab_size, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(x, y)
        if backward:
            out.loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_and_training_flops_match_pytorch_counter(name):
    cfg = ModelConfig.from_name("tiny", **CONFIGS[name])
    rep = flops(cfg, T)
    # PyTorch's counter has no formula for aten.mv: the router score r = w·x counts 0 there,
    # forward and backward. Everything else must agree exactly.
    score = len(cfg.routed_layers) * router_score_flops(cfg, T)
    fwd, trn = _count(cfg, backward=False), _count(cfg, backward=True)
    assert fwd == B * (rep.forward - score)
    assert trn == B * (rep.train - 3 * score)
    assert trn == train_flops(cfg, T, B) - 3 * B * score
    # The criterion, on the totals as they are.
    assert abs(B * rep.forward - fwd) / fwd < 0.02
    assert abs(B * rep.train - trn) / trn < 0.02


def test_training_is_three_forwards_except_the_detached_predictor():
    aux = flops(ModelConfig.from_name("tiny", causal_routing="aux_loss"), T)
    assert aux.train == 3 * aux.forward
    pred = flops(ModelConfig.from_name("tiny", causal_routing="predictor"), T)
    assert pred.predictors > 0 and pred.train < 3 * pred.forward
    # the predictor's first layer has no input gradient: one matmul less per forward matmul
    h, D, n = 16, 64, len(ModelConfig.from_name("tiny").routed_layers)
    assert 3 * pred.forward - pred.train == n * 2 * T * D * h


def test_routed_blocks_cost_their_capacity_and_causal_halving_is_optional():
    cfg = ModelConfig.from_name("tiny", capacity=0.125, router="random")
    dense = flops(cfg.dense_twin(), 128)
    mod = flops(cfg, 128)
    # 2 of 4 blocks routed at 16/128 tokens: their matmuls fall to 1/8 and attention to 1/64
    per_block = dense.dense_blocks // 4
    assert mod.dense_blocks == 2 * per_block
    assert mod.routed_blocks < 2 * per_block / 8
    half = flops(cfg.dense_twin(), 128, causal_attention=True)
    assert half.attention == dense.attention * 129 // 256  # S(S+1)/2 of S^2 pairs
    assert half.forward - half.attention == dense.forward - dense.attention


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_param_count_matches_the_model(name):
    cfg = ModelConfig.from_name("tiny", **CONFIGS[name])
    model = MoDTransformer(cfg)
    assert param_count(cfg) == model.num_params()
    assert param_count(cfg, exclude_embeddings=True) == model.num_params(exclude_embeddings=True)


# MoE, MoDE and early exit: expert FLOPs at the real (measured) expert token counts.
NEW_KINDS = {
    "moe-top2": dict(router="none", block_kind="moe", n_experts=4, moe_top_k=2),
    "moe-top1-shared": dict(router="none", block_kind="moe", n_experts=3, moe_top_k=1, moe_shared_expert=True),
    "moe-capacity": dict(router="none", block_kind="moe", n_experts=4, moe_top_k=2, moe_capacity_factor=0.5),
    "mode-staged": dict(router="learned", block_kind="moe", routed_kind="mode-staged", n_experts=4),
    "mode-integrated": dict(router="none", block_kind="mode-integrated", n_experts=2, n_noop_experts=2),
    "early-exit": dict(router="none", block_kind="exit"),
    "keys-kept": dict(router="learned", routed_kind="keys-kept"),
    "keys-kept-gqa-every-block": dict(
        router="learned", routed_kind="keys-kept", n_kv_heads=2, route_every=1, route_start=0, capacity=0.25
    ),
}


def _count_with_experts(cfg: ModelConfig, backward: bool) -> tuple[int, dict[int, float]]:
    torch.manual_seed(0)
    model = MoDTransformer(cfg)
    for blk in model.blocks:  # spread the routing, so capacity drops and no-op choices happen
        if hasattr(blk.mlp, "router"):
            torch.nn.init.normal_(blk.mlp.router.weight)
    x = torch.randint(0, cfg.vocab_size, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(x, x)
        if backward:
            out.loss.backward()
    stats = out.router_stats()
    expert_tokens = {i: stats[f"L{i}/expert_tokens"] / B for i in range(cfg.n_layers) if f"L{i}/expert_tokens" in stats}
    return counter.get_total_flops(), expert_tokens


@pytest.mark.parametrize("name", sorted(NEW_KINDS))
def test_new_kind_flops_match_pytorch_counter_at_measured_expert_tokens(name):
    cfg = ModelConfig.from_name("tiny", **NEW_KINDS[name])
    fwd, experts = _count_with_experts(cfg, backward=False)
    trn, _ = _count_with_experts(cfg, backward=True)
    rep = flops(cfg, T, expert_tokens=experts)
    score = len(cfg.routed_layers) * router_score_flops(cfg, T)  # aten.mv: 0 in the counter
    assert B * (rep.forward - score) == pytest.approx(fwd, rel=1e-9)
    assert B * (rep.train - 3 * score) == pytest.approx(trn, rel=1e-9)
    assert abs(B * rep.forward - fwd) / fwd < 0.02
    if name in ("moe-capacity", "mode-integrated"):
        nominal = flops(cfg, T)
        assert rep.forward < flops(cfg.replace(moe_capacity_factor=None, n_noop_experts=0, block_kind="moe"), T).forward
        assert nominal.forward >= rep.forward * 0.9  # the nominal count is the balanced load


def test_noop_experts_and_capacity_cut_expert_flops_and_exit_heads_are_counted():
    base = ModelConfig.from_name("tiny", router="none", block_kind="moe", n_experts=4, moe_top_k=2)
    half = base.replace(moe_capacity_factor=0.5)
    integ = base.replace(block_kind="mode-integrated", n_noop_experts=4)
    mlp = 3 * base.d_model * base.d_mlp
    per_layer = 2 * T * 2 * mlp  # top-2: every token through two experts
    assert flops(base, T).dense_blocks - flops(half, T).dense_blocks == 4 * per_layer // 2
    # X = 8 experts, 4 real: half of the assignments are free; the router scores 8 experts
    assert flops(integ, T).dense_blocks == flops(half, T).dense_blocks
    assert flops(integ, T).routers - flops(base, T).routers == 4 * 2 * T * base.d_model * 4
    ee = ModelConfig.from_name("tiny-early-exit")
    assert flops(ee, T).exit_heads == 3 * 2 * T * ee.d_model * ee.vocab_size
    assert flops(ee, T).forward == flops(ee.dense_twin(), T).forward + flops(ee, T).exit_heads


@pytest.mark.parametrize("name", sorted(NEW_KINDS))
def test_new_kind_param_count_matches_the_model(name):
    cfg = ModelConfig.from_name("tiny", **NEW_KINDS[name])
    assert param_count(cfg) == MoDTransformer(cfg).num_params()


def test_causal_forward_flops_from_the_tokens_each_layer_ran():
    from modlm.flops import causal_forward_flops
    from modlm.spec.capacity import capacity_k

    mod = ModelConfig.from_name("tiny", capacity=0.25)
    k = capacity_k(0.25, T)
    at_capacity = {i: [k, k] for i in mod.routed_layers}
    assert causal_forward_flops(mod, at_capacity, T) == flops(mod, T).forward
    ee = ModelConfig.from_name("tiny-early-exit")
    D, V = ee.d_model, ee.vocab_size
    # nobody exits: the dense forward plus a gate head over every token at layers 1..3
    no_exit = causal_forward_flops(ee, {i: [T] for i in (1, 2, 3)}, T)
    assert no_exit == flops(ee.dense_twin(), T).forward + 3 * 2 * T * D * V
    # everyone exits at layer 1's gate: one block, one gate head, the final head
    all_exit = causal_forward_flops(ee, {i: [0] for i in (1, 2, 3)}, T)
    assert all_exit == flops(ee.dense_twin(), T).dense_blocks / 4 + 2 * 2 * T * D * V


def test_amod_counts_the_recomputed_attention_scores_forward_only():
    cfg = ModelConfig.from_name("tiny", router="attention", route_every=1, route_start=1, capacity=0.25)
    rep = flops(cfg, T)
    k = 16  # 0.25 * 64
    # layer 0 (dense) provides for 1 at T tokens; layers 1 and 2 (routed) provide for 2 and 3 at K
    assert rep.received_attention == 2 * cfg.d_model * (T * T + 2 * k * k)
    assert rep.backward == 2 * (rep.forward - rep.predictors - rep.received_attention) + rep.predictors_backward
    assert flops(cfg.replace(router="learned"), T).received_attention == 0


def test_keys_kept_counts_keys_and_values_for_every_token_and_the_rest_for_the_routed():
    cfg = ModelConfig.from_name("tiny-keys-kept", capacity=0.25)
    routed = flops(cfg.replace(routed_kind="routed"), T)
    kept = flops(cfg, T)
    D, k = cfg.d_model, 16
    kv = 2 * D * D  # keys and values of every head (MHA)
    # per routed block: K/V for the T - k skipped tokens too, attention over T keys instead of k
    extra = 2 * (T - k) * kv + 4 * k * (T - k) * D
    assert kept.routed_blocks - routed.routed_blocks == 2 * extra
    assert kept.routers == routed.routers
    full = cfg.replace(capacity=1.0)
    assert flops(full, T).forward - flops(full.dense_twin(), T).forward == flops(full, T).routers
    half = flops(full, T, causal_attention=True)
    assert half.attention == flops(full.dense_twin(), T, causal_attention=True).attention


def test_keys_kept_causal_forward_flops_match_pytorch_counter_at_the_tokens_routed():
    """A causal forward of one sequence: each keys-kept block's count at the tokens it routed.
    (Routers are left out: an evaluating predictor router runs folded, ``CausalPredictor.fold``.)"""
    from modlm.flops import causal_forward_flops, router_flops
    from modlm.inference.calibrate import calibrate_thresholds
    from modlm.kernels import fewrow as kernels
    from modlm.model.block import route_mask

    cfg = ModelConfig.from_name("tiny-keys-kept", n_kv_heads=2)
    torch.manual_seed(0)
    model = MoDTransformer(cfg).eval()
    calibrate_thresholds(model, torch.randint(0, 256, (2, T)), 0.4)
    x = torch.randint(0, 256, (1, T))
    prev = kernels.set_enabled(False)  # the native few-row kernel's products are invisible to the counter
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            out = model(x, routing="causal")
    finally:
        kernels.set_enabled(prev)
    tokens = {i: [int(route_mask(out.routes[i], T).sum())] for i in cfg.routed_layers}
    assert all(0 < n[0] < T for n in tokens.values())
    counts = {name: sum(c.values()) for name, c in counter.get_flop_counts().items()}
    routers = sum(counts[f"MoDTransformer.blocks.{i}.router"] for i in cfg.routed_layers)
    for i in cfg.routed_layers:
        block = counts[f"MoDTransformer.blocks.{i}"] - counts[f"MoDTransformer.blocks.{i}.router"]
        assert block == layer_flops(cfg, i, T, tokens[i][0])[0]
    no_routers = causal_forward_flops(cfg, tokens, T) - len(cfg.routed_layers) * router_flops(cfg, T)
    assert no_routers == counter.get_total_flops() - routers
