"""Decoding: the routed KV cache path equals full recomputation, and generate() behaves."""

import pytest
import torch

from modlm import ModelConfig, MoDTransformer
from modlm.inference.calibrate import calibrate_thresholds
from modlm.inference.generate import DecodeSession, generate
from modlm.model.block import route_mask
from modlm.routing.ops import capacity_k

N_NEW = 64
PROMPT_LENS = (5, 17, 30)


def _prompts(seed=0, lens=PROMPT_LENS, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


def _mod_model(causal_routing, **kw):
    """A double-precision tiny MoD model whose causal decisions route about half the tokens."""
    torch.manual_seed(0)
    model = MoDTransformer(ModelConfig.from_name("tiny", causal_routing=causal_routing, max_seq_len=160, **kw))
    model = model.double().eval()
    with torch.no_grad():
        for blk in (model.blocks[i] for i in model.config.routed_layers):
            if blk.router.predictor is not None:
                blk.router.predictor.fc2.weight.mul_(50.0)
                blk.router.predictor.fc2.bias.zero_()
    # Put each threshold at the median of its causal logits, so decisions are mixed (not all 0/1).
    calibrate_thresholds(model, torch.randint(0, 256, (4, 96), generator=torch.Generator().manual_seed(9)), 0.5)
    return model


@pytest.mark.parametrize("causal_routing", ["predictor", "aux_loss"])
def test_cached_decoding_equals_recomputation_and_full_causal_forward(causal_routing):
    model = _mod_model(causal_routing)
    prompts = _prompts()
    # Sampling (same seed on both paths) gives varied text, hence varied routing decisions.
    cached = generate(model, prompts, N_NEW, seed=0, return_logits=True, return_cache=True, trace=True)
    full = generate(model, prompts, N_NEW, seed=0, use_cache=False, return_logits=True)
    assert cached.tokens == full.tokens
    assert all(len(t) == N_NEW for t in cached.tokens)
    torch.testing.assert_close(cached.logits, full.logits, rtol=1e-6, atol=1e-6)

    cache, routed = cached.cache, model.config.routed_layers
    routed_BL = {layer: [] for layer in routed}
    for b, p in enumerate(prompts):
        # every new token but the last was fed back: the sequence the cache has seen
        seq = torch.tensor([p + cached.tokens[b][:-1]])
        T = seq.shape[1]
        out = model(seq, routing="causal")
        torch.testing.assert_close(cached.logits[b], out.logits[0, len(p) - 1 :].float(), rtol=1e-6, atol=1e-6)
        for layer in range(model.config.n_layers):
            held = int(cache.layer_lengths(layer)[b])
            if layer in routed:
                sel = route_mask(out.routes[layer], T)[0]
                assert held == int(sel.sum()), (layer, b)
                routed_BL[layer].append(sel.float().mean().item())
                # the trace names the routed blocks each fed-back token went through
                assert [layer in r for r in cached.routing[b]] == sel[len(p) :].tolist()
            else:
                assert held == T, (layer, b)  # dense layers hold every real token
    # decisions were really mixed: every routed layer takes some tokens and skips others, and
    # rows route different numbers of tokens (a ragged cache)
    for layer, fr in routed_BL.items():
        assert 0.1 < sum(fr) / len(fr) < 0.9 and len(set(fr)) > 1, (layer, fr)

    # a row alone (batch of one: a routed block runs on all rows or none) decodes as in the batch
    greedy_alone = generate(model, [prompts[1]], N_NEW, temperature=0, return_logits=True)
    greedy_batch = generate(model, prompts, N_NEW, temperature=0, return_logits=True)
    assert greedy_alone.tokens[0] == greedy_batch.tokens[1]
    torch.testing.assert_close(greedy_alone.logits[0], greedy_batch.logits[1], rtol=1e-6, atol=1e-6)


def test_gqa_mod_model_cached_equals_uncached():
    model = _mod_model("predictor", n_kv_heads=2)
    prompts = _prompts(seed=1, lens=(3, 11))
    a = generate(model, prompts, 24, temperature=0, return_logits=True)
    b = generate(model, prompts, 24, temperature=0, use_cache=False, return_logits=True)
    assert a.tokens == b.tokens
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-6, atol=1e-6)


def test_dense_model_cached_equals_uncached():
    torch.manual_seed(0)
    model = MoDTransformer(ModelConfig.from_name("tiny", router="none")).double()
    prompts = _prompts(lens=(4, 19))
    a = generate(model, prompts, 32, temperature=0, return_logits=True, return_cache=True)
    b = generate(model, prompts, 32, temperature=0, use_cache=False, return_logits=True)
    assert a.tokens == b.tokens
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-6, atol=1e-6)
    for layer in range(model.config.n_layers):
        assert a.cache.layer_lengths(layer).tolist() == [4 + 31, 19 + 31]


def _tiny(**kw):
    torch.manual_seed(0)
    return MoDTransformer(ModelConfig.from_name("tiny", **kw))


def _reference_decode(model, prompt, n_new, pick):
    """Decoding by recomputation, without ``generate``: the whole sequence routed causally per
    token, the next token ``pick(last-position logits (1, V))``."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n_new):
            seq.append(int(pick(model(torch.tensor([seq]), routing="causal").logits[:, -1])))
    return seq[len(prompt) :]


def _reference_sampler(temperature, top_k=None, top_p=None, seed=0):
    """Temperature, top-k and top-p written out on sorted probabilities, drawing like ``generate``
    (one ``torch.multinomial`` per step from a generator seeded with ``seed``)."""
    gen = torch.Generator().manual_seed(seed)

    def pick(logits_1V):
        probs, order = (logits_1V.float() / temperature).softmax(-1).sort(descending=True)
        keep = torch.ones_like(probs, dtype=torch.bool)
        if top_k is not None:
            keep[:, top_k:] = False
        if top_p is not None:
            keep &= probs.cumsum(-1) - probs < top_p  # the mass before a token is below top_p
        kept = torch.where(keep, probs, torch.zeros_like(probs))
        kept_V = torch.zeros_like(kept).scatter(-1, order, kept)
        return torch.multinomial(kept_V / kept_V.sum(), 1, generator=gen)[0, 0]

    return pick


def test_greedy_continuation_is_the_argmax_of_recomputed_logits():
    model = _mod_model("predictor")
    prompts = _prompts(lens=(5, 12))
    res = generate(model, prompts, 24, temperature=0, trace=True)
    for b, p in enumerate(prompts):
        assert res.tokens[b] == _reference_decode(model, p, 24, lambda logits: logits.argmax(-1))


@pytest.mark.parametrize(
    "options", [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=0.9, top_p=0.8)]
)
def test_sampled_tokens_equal_a_reference_sampler(options):
    model = _mod_model("predictor")
    prompt = _prompts(lens=(7,))[0]
    res = generate(model, [prompt], 24, seed=11, **options)
    assert res.tokens[0] == _reference_decode(model, prompt, 24, _reference_sampler(seed=11, **options))
    if "top_k" in options:  # every token is among the 5 most likely at its step
        logits = generate(model, [prompt], 24, seed=11, return_logits=True, **options).logits[0]
        top5 = logits.topk(5, dim=-1).indices
        assert all(t in top5[i].tolist() for i, t in enumerate(res.tokens[0]))


def test_the_trace_names_the_routes_the_model_reports():
    model = _mod_model("predictor")
    prompts = _prompts(lens=(6, 14))
    res = generate(model, prompts, 20, seed=3, trace=True)
    for b, p in enumerate(prompts):
        seq = torch.tensor([p + res.tokens[b][:-1]])  # the last token is never fed back
        routes = model(seq, routing="causal").routes
        masks = {i: route_mask(routes[i], seq.shape[1])[0, len(p) :] for i in model.config.routed_layers}
        assert res.routing[b] == [[i for i in model.config.routed_layers if masks[i][t]] for t in range(19)]
        # routed blocks per token: as many as the model's routes hold for that position
        assert [len(r) for r in res.routing[b]] == sum(m.long() for m in masks.values()).tolist()


def test_greedy_is_deterministic_and_seeds_control_sampling():
    model = _tiny()
    prompts = _prompts(lens=(6, 9))
    g1 = generate(model, prompts, 20, temperature=0, seed=1)
    g2 = generate(model, prompts, 20, temperature=0, seed=2)
    assert g1.tokens == g2.tokens
    s1 = generate(model, prompts, 20, temperature=1.0, seed=7)
    s2 = generate(model, prompts, 20, temperature=1.0, seed=7)
    s3 = generate(model, prompts, 20, temperature=1.0, seed=8)
    assert s1.tokens == s2.tokens
    assert s1.tokens != s3.tokens  # a near-uniform 256-way sampler: equal 40 tokens is ~impossible
    # filters keep sampling in range and reproducible
    f1 = generate(model, prompts, 10, temperature=0.8, top_k=5, top_p=0.9, seed=3)
    f2 = generate(model, prompts, 10, temperature=0.8, top_k=5, top_p=0.9, seed=3)
    assert f1.tokens == f2.tokens
    # the model is left in the mode it was in
    model.train()
    generate(model, prompts, 2, temperature=0)
    assert model.training


def test_top_k_one_is_greedy():
    model = _tiny()
    prompts = _prompts(lens=(8,))
    assert generate(model, prompts, 12, top_k=1, seed=0).tokens == generate(model, prompts, 12, temperature=0).tokens


def test_stop_tokens_end_a_row():
    model = _tiny()
    prompts = _prompts(lens=(6, 9, 4))
    ref = generate(model, prompts, 24, temperature=0).tokens
    stop = ref[0][3]
    got = generate(model, prompts, 24, temperature=0, stop_tokens=[stop], stream=None)
    for r, g in zip(ref, got.tokens):
        expect = r[: r.index(stop) + 1] if stop in r else r
        assert g == expect
    assert got.tokens[0][-1] == stop and len(got.tokens[0]) <= 4
    # every row stopping ends the loop; stream sees exactly the kept tokens
    seen = {0: [], 1: [], 2: []}
    all_stop = generate(
        model, prompts, 24, temperature=0, stop_tokens=[r[0] for r in ref], stream=lambda b, t: seen[b].append(t)
    )
    assert all_stop.tokens == [[r[0]] for r in ref]
    assert [seen[b] for b in range(3)] == all_stop.tokens


def test_prefill_topk_routes_the_prompt_by_topk():
    model = _tiny(capacity=0.25).double().eval()
    # causal thresholds at the median: decoding then routes some fed-back tokens in and skips others
    calibrate_thresholds(model, torch.randint(0, 256, (4, 96), generator=torch.Generator().manual_seed(9)), 0.5)
    prompts = _prompts(lens=(8, 21, 13))
    # one new token: nothing is fed back, so the cache holds exactly the prompt's routes
    res = generate(model, prompts, 1, temperature=0, prefill_routing="topk", return_logits=True, return_cache=True)
    for layer in model.config.routed_layers:
        assert res.cache.layer_lengths(layer).tolist() == [capacity_k(0.25, len(p)) for p in prompts]
    for b, p in enumerate(prompts):  # each row as if alone, routed by top-k over its real tokens
        ref = model(torch.tensor([p]), routing="topk").logits[0, -1]
        torch.testing.assert_close(res.logits[b, 0], ref.float(), rtol=1e-6, atol=1e-6)
    # and decoding continues causally from there: greedy tokens are the argmax of the logits each
    # step saw, the first is the one-token run's, and each routed cache grows by exactly the fed-back
    # tokens the trace says went through that block
    long = generate(
        model, prompts, 16, temperature=0, prefill_routing="topk", return_cache=True, return_logits=True, trace=True
    )
    assert [t[0] for t in long.tokens] == [t[0] for t in res.tokens]
    assert long.logits.argmax(-1).tolist() == long.tokens
    for layer in model.config.routed_layers:
        grown = (long.cache.layer_lengths(layer) - res.cache.layer_lengths(layer)).tolist()
        assert grown == [sum(layer in r for r in row) for row in long.routing], layer
        assert all(len(row) == 15 for row in long.routing)
    assert 0 < sum(len(r) for row in long.routing for r in row) < 15 * 3 * len(model.config.routed_layers)


def test_decode_session_steps_equal_generate():
    model = _tiny()
    prompts = _prompts(lens=(6, 9))
    ref = generate(model, prompts, 10, seed=4, return_logits=True)
    session = DecodeSession(model, prompts, 10, seed=4, return_logits=True)
    steps = 0
    while session.step():
        steps += 1
    assert steps == 9 and not session.step()  # the 10th token is chosen but never fed back
    res = session.result()
    assert res.tokens == ref.tokens
    torch.testing.assert_close(res.logits, ref.logits)


def test_tensor_prompts_decode_as_their_lists_with_a_random_router():
    model = _tiny(router="random")
    batch = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(5))
    res = generate(model, batch, 5, seed=0)
    assert res.tokens == generate(model, batch.tolist(), 5, seed=0).tokens
    assert [len(t) for t in res.tokens] == [5, 5]
    one = generate(model, batch[1], 3, seed=0)
    assert one.tokens == generate(model, [batch[1].tolist()], 3, seed=0).tokens and len(one.tokens[0]) == 3


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(prompts=[]), "prompts is empty"),
        (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
        (dict(prompts=[[1] * 100], max_new_tokens=29), "129 > the model's context max_seq_len=128"),
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(max_new_tokens=2.5), "max_new_tokens=2.5"),
        (dict(temperature=-0.5), "temperature=-0.5"),
        (dict(temperature=float("nan")), "temperature=nan"),
        (dict(top_k=0), "top_k=0"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(prompts=[[1, 256]]), "token id 256"),
        (dict(prompts=[[-1, 3]]), "token id -1"),
        (dict(prompts=[[1, 2.5]]), "prompt 0 has 2.5 (float)"),
        (dict(prefill_routing="random"), "prefill_routing='random'"),
    ],
)
def test_bad_inputs_are_one_line_value_errors_naming_the_value(kwargs, fragment):
    model = _tiny()
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError) as e:
        generate(model, **args)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg, msg


def test_top_level_generate_and_a_generation_config_give_the_same_text():
    import modlm
    from modlm.inference.generate import GenerationConfig

    model = MoDTransformer(ModelConfig.from_name("tiny"))
    prompts = [[5, 6, 7], [8, 9]]
    a = modlm.generate(model, prompts, 12, temperature=0.9, top_k=20, seed=3)
    b = generate(model, prompts, config=GenerationConfig(max_new_tokens=12, temperature=0.9, top_k=20, seed=3))
    assert a.tokens == b.tokens and all(len(t) == 12 for t in a.tokens)
    with pytest.raises(ValueError, match="unknown generation option"):
        generate(model, prompts, 4, temprature=0.5)


def test_token_choice_router_decodes_through_the_generic_path_and_matches_recomputation():
    # TokenChoiceRouter's decisions threshold r itself and its weights are sigmoid(r); cached
    # decoding must still equal full recomputation.
    torch.manual_seed(0)
    model = MoDTransformer(ModelConfig.from_name("tiny", router="token_choice", max_seq_len=160)).double().eval()
    calibrate_thresholds(model, torch.randint(0, 256, (4, 96), generator=torch.Generator().manual_seed(9)), 0.5)
    prompts = _prompts()
    cached = generate(model, prompts, 32, seed=0, return_logits=True, trace=True)
    full = generate(model, prompts, 32, seed=0, use_cache=False, return_logits=True)
    assert cached.tokens == full.tokens
    torch.testing.assert_close(cached.logits, full.logits, rtol=1e-6, atol=1e-6)
    used = [layer for row in cached.routing for tok in row for layer in tok]
    assert 0 < len(used) < sum(len(row) for row in cached.routing) * len(model.config.routed_layers)
    # the trace is what a full causal forward of the fed-back sequence routes
    for b, p in enumerate(prompts):
        seq = torch.tensor([p + cached.tokens[b][:-1]])
        routes = model(seq, routing="causal").routes
        masks = {i: route_mask(routes[i], seq.shape[1])[0, len(p) :].tolist() for i in model.config.routed_layers}
        assert cached.routing[b] == [[i for i in masks if masks[i][t]] for t in range(len(cached.routing[b]))]


def _first_stop(row, stops):
    """``row`` up to and including its first token in ``stops``."""
    hits = [i for i, t in enumerate(row) if t in stops]
    return row[: hits[0] + 1] if hits else row


def _varied(**kw):
    """A tiny model with weights large enough that its greedy text varies (a fresh init repeats
    one token), so a chosen token first comes at a known step."""
    model = _tiny(**kw)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


def _eos_at_step(ref_row, step):
    """A token of ``ref_row`` whose first occurrence is at index ``step`` or later (the first such)."""
    return next(t for i, t in enumerate(ref_row) if i >= step and t not in ref_row[:i])


def test_generation_stops_at_the_models_eos_unless_ignored():
    prompts = _prompts(lens=(6, 9, 4))
    ref = generate(_varied(), prompts, 24, temperature=0).tokens
    eos = _eos_at_step(ref[0], 2)
    model = _varied(extra={"eos_token_id": eos})  # same seed: the same weights, now with a recorded eos
    got = generate(model, prompts, 24, temperature=0)
    assert got.tokens == [_first_stop(r, {eos}) for r in ref]
    assert got.tokens[0][-1] == eos and len(got.tokens[0]) == ref[0].index(eos) + 1 <= 24
    assert generate(model, prompts, 24, temperature=0, ignore_eos=True).tokens == ref
    # explicit stop tokens still end rows beside the eos
    stop = ref[1][1]
    both = generate(model, prompts, 24, temperature=0, stop_tokens=[stop]).tokens
    assert both == [_first_stop(r, {eos, stop}) for r in ref]


def test_a_list_of_eos_ids_stops_rows_at_different_steps():
    prompts = _prompts(lens=(6, 9, 4))
    ref = generate(_varied(), prompts, 24, temperature=0).tokens
    eos = [_eos_at_step(ref[0], 2), _eos_at_step(ref[1], 6)]
    model = _varied(extra={"eos_token_id": eos})  # Hugging Face configs may list several
    expect = [_first_stop(r, set(eos)) for r in ref]
    assert len({len(r) for r in expect}) > 1  # the rows really end at different steps
    seen = {0: [], 1: [], 2: []}
    got = generate(model, prompts, 24, temperature=0, stream=lambda b, t: seen[b].append(t))
    assert got.tokens == expect and [seen[b] for b in range(3)] == expect
    session = DecodeSession(model, prompts, 24, temperature=0)
    steps = 1
    while session.step():
        steps += 1
    assert session.result().tokens == expect and steps == max(len(r) for r in expect)


@pytest.mark.parametrize(
    "extra, options, fragment",
    [
        ({"eos_token_id": "</s>"}, {}, "ModelConfig.extra['eos_token_id']='</s>'"),
        ({"eos_token_id": [1, 256]}, {}, "ModelConfig.extra['eos_token_id']=[1, 256]"),
        ({"eos_token_id": True}, {}, "ModelConfig.extra['eos_token_id']=True"),
        ({}, {"ignore_eos": "yes"}, "GenerationConfig.ignore_eos='yes'"),
    ],
)
def test_a_bad_eos_or_ignore_eos_is_one_line_naming_the_value(extra, options, fragment):
    model = _varied(extra=extra)
    with pytest.raises(ValueError) as e:
        generate(model, [[1, 2, 3]], 4, **options)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert model.training  # refused before the model was touched


def test_a_bad_recorded_eos_decodes_with_ignore_eos():
    model = _varied(extra={"eos_token_id": "</s>"})
    assert (
        generate(model, [[1, 2, 3]], 4, temperature=0, ignore_eos=True).tokens
        == generate(_varied(), [[1, 2, 3]], 4, temperature=0).tokens
    )
