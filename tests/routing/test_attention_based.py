"""A-MoD routing: scores equal the attention a slow reference computes, top-k of them is what the
block processes, capacity 1.0 is the dense model, cached decoding equals recomputation under the
predictor rule, and it trains from scratch."""

import math

import pytest
import torch

from modlm import ModelConfig, MoDTransformer
from modlm.inference.calibrate import calibrate_thresholds
from modlm.inference.generate import generate
from modlm.model.block import route_mask
from modlm.routing.attention_based import received_attention
from modlm.routing.ops import select_topk


def _reference(q_BHTE, k_BGTE, valid_BT):
    """Loop over rows, heads, queries: softmax over the visible keys, mean over heads, column sum
    over real queries divided by the real queries that can see the key."""
    B, H, T, E = q_BHTE.shape
    G = k_BGTE.shape[1]
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        p = torch.zeros(T, T, dtype=torch.float64)
        for h in range(H):
            k = k_BGTE[b, h // (H // G)].double()
            for t in range(T):
                keys = [j for j in range(t + 1) if valid_BT[b, j] or j == t]
                s = torch.stack([q_BHTE[b, h, t].double() @ k[j] / math.sqrt(E) for j in keys])
                p[t, keys] += torch.softmax(s, 0) / H
        for j in range(T):
            viewers = [t for t in range(j, T) if valid_BT[b, t]]
            if valid_BT[b, j]:
                out[b, j] = sum(p[t, j] for t in viewers) / len(viewers)
    return out


@pytest.mark.parametrize("padded", [False, True])
def test_received_attention_equals_a_slow_reference(padded):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    valid = torch.ones(2, 7, dtype=torch.bool)
    if padded:
        valid[1, :3] = False  # left padding
    got = received_attention(q, k, valid if padded else None)
    torch.testing.assert_close(got.double(), _reference(q, k, valid), rtol=1e-5, atol=1e-6)
    # a probability per viewer: in [0, 1]; a token seen only by itself scores its self-attention
    assert (got >= 0).all() and (got <= 1 + 1e-6).all()


def _model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-amod", max_seq_len=160, **kw)
    return MoDTransformer(cfg).double().eval()


def test_routes_are_topk_of_the_previous_blocks_received_attention():
    model = _model(capacity=0.25)
    x = torch.randint(0, 256, (2, 32))
    seen = {}

    def grab(module, args, kwargs):
        record = kwargs.get("record")
        if record is None:
            return None

        def spy(q_BHTE, k_BGTE):
            seen[module.layer_idx + 1] = received_attention(q_BHTE, k_BGTE)
            record(q_BHTE, k_BGTE)

        return args, dict(kwargs, record=spy)

    for i in (0, 2):  # the blocks before the routed blocks 1 and 3
        model.blocks[i].attn.register_forward_pre_hook(grab, with_kwargs=True)
    out = model(x)
    for layer in (1, 3):
        assert torch.equal(out.routes[layer].idx_BK, select_topk(seen[layer], 8))
        assert out.routes[layer].weight_BK is None  # x + f(x)
    # recorded only when routing by top-k: causal routing never computes the probabilities
    seen.clear()
    model(x, routing="causal")
    assert seen == {}


def test_capacity_one_equals_the_dense_model():
    model = _model(capacity=1.0)
    dense = MoDTransformer(model.config.dense_twin()).double().eval()
    dense.load_state_dict(model.state_dict(), strict=False)
    x = torch.randint(0, 256, (3, 40))
    torch.testing.assert_close(model(x).logits, dense(x).logits, rtol=0, atol=1e-12)


def _mixed_decisions(model):
    with torch.no_grad():
        for i in model.config.routed_layers:
            model.blocks[i].router.predictor.fc2.weight.mul_(50.0)
    calibrate_thresholds(model, torch.randint(0, 256, (4, 96), generator=torch.Generator().manual_seed(9)), 0.5)
    return model


def test_cached_decoding_equals_recomputation_under_the_predictor_rule():
    model = _mixed_decisions(_model(n_kv_heads=2))
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 17, 30)]
    cached = generate(model, prompts, 40, seed=0, return_logits=True, return_cache=True)
    full = generate(model, prompts, 40, seed=0, use_cache=False, return_logits=True)
    assert cached.tokens == full.tokens
    torch.testing.assert_close(cached.logits, full.logits, rtol=1e-6, atol=1e-6)
    fracs = []
    for b, p in enumerate(prompts):
        seq = torch.tensor([p + cached.tokens[b][:-1]])
        out = model(seq, routing="causal")
        torch.testing.assert_close(cached.logits[b], out.logits[0, len(p) - 1 :].float(), rtol=1e-6, atol=1e-6)
        for layer in model.config.routed_layers:
            sel = route_mask(out.routes[layer], seq.shape[1])[0]
            assert int(cached.cache.layer_lengths(layer)[b]) == int(sel.sum())
            fracs.append(float(sel.float().mean()))
    assert 0.1 < sum(fracs) / len(fracs) < 0.9  # the predictor's decisions were really mixed


def test_topk_prefill_routes_the_prompt_as_the_uncached_topk_forward():
    model = _model(capacity=0.5)
    prompt = torch.randint(0, 256, (1, 24)).tolist()
    res = generate(model, prompt, 1, temperature=0, prefill_routing="topk", return_logits=True, return_cache=True)
    out = model(torch.tensor(prompt))
    torch.testing.assert_close(res.logits[0, 0], out.logits[0, -1].float(), rtol=1e-6, atol=1e-6)
    for layer in model.config.routed_layers:
        assert int(res.cache.layer_lengths(layer)[0]) == 12


def test_routing_layer_zero_is_refused_in_one_line():
    with pytest.raises(ValueError, match="layer 0 has none"):
        ModelConfig.from_name("tiny-amod", route_start=0, route_every=2)


def test_amod_trains_from_scratch_and_its_predictor_learns_the_topk_decisions():
    torch.manual_seed(0)
    model = MoDTransformer(ModelConfig.from_name("tiny-amod", capacity=0.5))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 64, (8, 33), generator=g)  # a small vocabulary: learnable quickly
    first = None
    for _ in range(40):
        out = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        stats = out.router_stats()
        first = first or (out.lm_loss.item(), stats["L1/pred_bce"])
    assert out.lm_loss.item() < first[0] - 0.5
    assert stats["L1/pred_bce"] < first[1]
    # nothing but the predictor carries routing parameters: A-MoD scores are parameter-free
    router_params = [n for n, _ in model.named_parameters() if ".router." in n]
    assert router_params and all(".router.predictor." in n for n in router_params)
