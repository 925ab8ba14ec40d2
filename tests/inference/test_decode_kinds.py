"""Cached decoding equals full recomputation for the MoE, MoDE, early-exit and keys-kept kinds.

Each test samples (a fixed seed on both paths) from ragged prompts for >= 32 new tokens and
compares the KV-cache path with recomputing the whole sequence each step under the same causal
rules, in double precision.
"""

import pytest
import torch

from modlm import ModelConfig, MoDTransformer
from modlm.inference.calibrate import calibrate_exit_threshold, calibrate_thresholds, exit_flop_fraction
from modlm.inference.generate import generate
from modlm.model.block import route_mask

N_NEW = 40
PROMPT_LENS = (4, 15, 27)


def _prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _model(preset, **kw):
    torch.manual_seed(0)
    model = MoDTransformer(ModelConfig.from_name(preset, max_seq_len=128, **kw)).double().eval()
    with torch.no_grad():
        for blk in model.blocks:  # a spread-out MLP router, so tokens really choose different experts
            if hasattr(blk.mlp, "router"):
                torch.nn.init.normal_(blk.mlp.router.weight)
    return model


def _assert_cached_equals_full(model, prompts):
    cached = generate(model, prompts, N_NEW, seed=0, return_logits=True, return_cache=True)
    full = generate(model, prompts, N_NEW, seed=0, use_cache=False, return_logits=True)
    assert cached.tokens == full.tokens and all(len(t) == N_NEW for t in cached.tokens)
    torch.testing.assert_close(cached.logits, full.logits, rtol=1e-6, atol=1e-6)
    return cached


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-mode-integrated"])
def test_moe_and_integrated_mode_cached_equals_recomputation(preset):
    # a capacity factor is a training budget: decoding and causal recomputation never drop
    model = _model(preset, moe_capacity_factor=0.5)
    cached = _assert_cached_equals_full(model, _prompts())
    for layer in range(4):  # attention always runs: every layer holds every fed token
        assert cached.cache.layer_lengths(layer).tolist() == [n + N_NEW - 1 for n in PROMPT_LENS]
    if preset == "tiny-mode-integrated":
        x = torch.randint(0, 256, (2, 64))
        stats = model(x, routing="causal").router_stats()
        assert all(0.2 < stats[f"L{i}/noop_frac"] < 0.8 for i in range(4))


def test_staged_mode_cached_equals_recomputation():
    model = _model("tiny-mode-staged")
    with torch.no_grad():
        for i in model.config.routed_layers:
            model.blocks[i].router.predictor.fc2.weight.mul_(50.0)
    calibrate_thresholds(model, torch.randint(0, 256, (4, 96), generator=torch.Generator().manual_seed(9)), 0.5)
    prompts = _prompts(1)
    cached = _assert_cached_equals_full(model, prompts)
    for layer in model.config.routed_layers:  # the MoD part really skipped some tokens (a ragged cache)
        held = cached.cache.layer_lengths(layer).tolist()
        assert all(0 < h < n + N_NEW - 1 for h, n in zip(held, PROMPT_LENS)), held


def test_early_exit_cached_equals_recomputation_and_exited_tokens_store_nothing_later():
    model = _model("tiny-early-exit")
    calib = torch.randint(0, 256, (4, 96), generator=torch.Generator().manual_seed(3))
    thr = calibrate_exit_threshold(model, calib, 0.75)
    assert exit_flop_fraction(model, calib) == pytest.approx(0.75, abs=0.05)
    prompts = _prompts(2)
    cached = _assert_cached_equals_full(model, prompts)
    # Recompute each row alone: a token runs layer l iff it was still running there; the cache of
    # layer l holds exactly those tokens, and the run set only shrinks with depth (no resuming).
    for b, p in enumerate(prompts):
        seq = torch.tensor([p + cached.tokens[b][:-1]])
        out = model(seq, routing="causal")
        T = seq.shape[1]
        prev = torch.ones(T, dtype=torch.bool)
        for layer in range(1, 4):
            ran = route_mask(out.aux[layer], T)[0]
            assert int(cached.cache.layer_lengths(layer)[b]) == int(ran.sum())
            assert not bool((ran & ~prev).any())
            prev = ran
        assert 0 < int(prev.sum()) < T  # some tokens exited before the last layer, some did not
    assert 0 < thr < 1


@pytest.mark.parametrize("prompt_lens", [PROMPT_LENS, (11,)])
def test_keys_kept_cached_equals_recomputation_and_every_token_keeps_its_keys(prompt_lens):
    """Batch 1 and a ragged left-padded batch of 3: the routed rows of each decode step run the
    block, every row appends its key and value (the contiguous cache holds every fed token)."""
    model = _model("tiny-keys-kept", n_kv_heads=2)
    with torch.no_grad():
        for i in model.config.routed_layers:
            model.blocks[i].router.predictor.fc2.weight.mul_(50.0)
            model.blocks[i].router.predictor.fc2.bias.zero_()
    calibrate_thresholds(model, torch.randint(0, 256, (4, 96), generator=torch.Generator().manual_seed(9)), 0.5)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in prompt_lens]
    cached = generate(model, prompts, N_NEW, seed=0, return_logits=True, return_cache=True, trace=True)
    full = generate(model, prompts, N_NEW, seed=0, use_cache=False, return_logits=True)
    assert cached.tokens == full.tokens and all(len(t) == N_NEW for t in cached.tokens)
    torch.testing.assert_close(cached.logits, full.logits, rtol=1e-6, atol=1e-6)
    greedy = generate(model, prompts, N_NEW, temperature=0, return_logits=True)
    assert greedy.tokens == generate(model, prompts, N_NEW, temperature=0, use_cache=False).tokens
    for layer in range(4):
        assert cached.cache.layer_lengths(layer).tolist() == [n + N_NEW - 1 for n in prompt_lens]
    used = [len(r) for row in cached.routing for r in row]  # the decode steps really skipped some rows
    assert 0.1 < sum(used) / (len(used) * len(model.config.routed_layers)) < 0.9
