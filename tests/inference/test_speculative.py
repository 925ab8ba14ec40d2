"""Self-speculative decoding: the output is the full model's (greedy token for token, sampling in
distribution), rejected drafts are rolled back from both caches, and a verify step is a multi-token
causal step of the cache."""

import pytest
import torch

from modlm.config import ModelConfig
from modlm.inference.cache import ModelCache
from modlm.inference.calibrate import calibrate_thresholds
from modlm.inference.generate import generate
from modlm.inference.speculative import LayerSkipDraft, accept_draft, speculative_generate
from modlm.model.block import Phase, route_mask
from modlm.model.transformer import MoDTransformer

PROMPTS = [[5, 17, 3, 99, 42, 7], [11, 2], [250, 1, 8, 64, 33, 21, 9, 4, 120, 77]]


def _model(name):
    """A double-precision tiny model whose blocks matter (so a draft without some is often
    wrong) and, when routed, whose causal decisions route about half the tokens."""
    torch.manual_seed(0)
    model = MoDTransformer(ModelConfig.from_name(name, max_seq_len=160)).double().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("proj.weight", "down.weight")):
                p.mul_(8.0)  # residual updates that move the argmax
        for blk in (model.blocks[i] for i in model.config.routed_layers):
            blk.router.predictor.fc2.weight.mul_(50.0)
            blk.router.predictor.fc2.bias.zero_()
    if model.config.routed_layers:
        calibrate_thresholds(model, torch.randint(0, 256, (4, 96), generator=torch.Generator().manual_seed(9)), 0.5)
    return model


@pytest.mark.parametrize("name", ["tiny-dense", "tiny"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_speculative_equals_plain_greedy(name, batch):
    model = _model(name)
    prompts = PROMPTS[:batch]
    plain = generate(model, prompts, 40, temperature=0, ignore_eos=True)
    draft = LayerSkipDraft.skipping(model, [2])
    spec = speculative_generate(model, prompts, 40, draft=draft, gamma=4, temperature=0, ignore_eos=True)
    assert spec.tokens == plain.tokens
    # the draft was wrong sometimes and right sometimes: both the rollback and the keep paths ran
    assert 0.0 < spec.acceptance < 1.0, spec.accepted
    assert any(n < g for d, a in zip(spec.drafted, spec.accepted) for n, g in zip(a, d))
    # per row and step: kept <= drafted; every row emits its kept drafts + one token per step
    for d, a, toks in zip(spec.drafted, spec.accepted, spec.tokens):
        assert all(0 <= n <= g <= 4 for n, g in zip(a, d))
        assert 1 + sum(n + 1 for n in a) >= len(toks)
    assert spec.steps < 40  # fewer full-model forwards than plain decoding


def test_greedy_with_stop_tokens_and_gammas_equals_plain():
    model = _model("tiny")
    plain = generate(model, PROMPTS, 30, temperature=0, ignore_eos=True)
    stop = plain.tokens[0][9]
    plain_stop = generate(model, PROMPTS, 30, temperature=0, stop_tokens=[stop])
    for gamma in (1, 3, 7):
        draft = LayerSkipDraft.keeping(model, 0.5)
        spec = speculative_generate(model, PROMPTS, 30, draft=draft, gamma=gamma, temperature=0, stop_tokens=[stop])
        assert spec.tokens == plain_stop.tokens, gamma


def _real_kv(cache, layer, b):
    """Row b's stored keys and values of a layer, real slots only, in order."""
    lay = cache.layers[layer]
    ok = lay.slot_ok[b, : lay.max_len]
    return lay.k[b, :, : lay.max_len][:, ok], lay.v[b, :, : lay.max_len][:, ok]


@pytest.mark.parametrize("name", ["tiny-dense", "tiny"])
def test_a_multi_token_step_then_rollback_equals_the_cache_of_the_kept_tokens(name):
    """Prefill of k more tokens over a filled cache equals a causal forward over prompt + k, and
    truncating per row to j tokens equals the cache built from the first j only."""
    model = _model(name)
    g = torch.Generator().manual_seed(3)
    prompt, more = torch.randint(0, 256, (3, 12), generator=g), torch.randint(0, 256, (3, 6), generator=g)
    pos = torch.arange(18).expand(3, 18)

    def cached(n_more):
        cache = ModelCache.for_config(model.config, 3, capacity=4, dtype=torch.float64)
        model(prompt, routing="causal", cache=cache, pos_BT=pos[:, :12], phase=Phase.PREFILL)
        before = [list(lay.lengths) for lay in cache.layers]
        if n_more == 0:
            return cache, before, None
        out = model(more[:, :n_more], routing="causal", cache=cache, pos_BT=pos[:, 12 : 12 + n_more], phase="prefill")
        return cache, before, out

    cache, before, out = cached(6)
    full = model(torch.cat([prompt, more], 1), routing="causal")
    torch.testing.assert_close(out.logits, full.logits[:, 12:], rtol=1e-9, atol=1e-9)
    # keep j_b of the 6 new tokens per row: slots from the routes, as speculative decoding does
    keep = [2, 6, 0]
    lengths = []
    for i, L0 in enumerate(before):
        if i in out.routes:
            sel = route_mask(out.routes[i], 6)
            lengths.append([L0[b] + int(sel[b, : keep[b]].sum()) for b in range(3)])
        else:
            lengths.append([L0[b] + keep[b] for b in range(3)])
    cache.truncate(lengths)
    for b in range(3):
        ref, _, _ = cached(keep[b])
        for layer in range(model.config.n_layers):
            assert int(cache.layer_lengths(layer)[b]) == int(ref.layer_lengths(layer)[b]), (layer, b)
            k, v = _real_kv(cache, layer, b)
            k_ref, v_ref = _real_kv(ref, layer, b)
            torch.testing.assert_close(k, k_ref, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(v, v_ref, rtol=1e-9, atol=1e-9)
    if model.config.routed_layers:  # the routed layers really held different counts per row
        assert len({int(n) for n in cache.layer_lengths(model.config.routed_layers[0])}) > 1
    # decoding on after the rollback sees exactly the kept tokens (holes and all)
    nxt = torch.tensor([[7], [8], [9]])
    after = model(nxt, routing="causal", cache=cache, pos_BT=torch.tensor([[14], [18], [12]]), phase="prefill")
    for b in range(3):
        seq = torch.cat([prompt[b], more[b, : keep[b]], nxt[b]])[None]
        torch.testing.assert_close(
            after.logits[b, -1], model(seq, routing="causal").logits[0, -1], rtol=1e-6, atol=1e-6
        )


def test_accept_reject_rule_reproduces_the_target_distribution():
    """8 tokens, fixed p and q, 20,000 draws: the first emitted token is distributed as p
    (total variation < 0.02; its standard error here is about 0.01)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.30, 0.02, 0.15, 0.05, 0.20, 0.08, 0.10, 0.10], dtype=torch.float64)
    q = torch.tensor([0.05, 0.30, 0.15, 0.20, 0.05, 0.05, 0.10, 0.10], dtype=torch.float64)
    p_TV, q_gV = torch.stack([p, p]), q[None]
    counts = torch.zeros(8, dtype=torch.float64)
    n_acc = 0
    N = 20_000
    for _ in range(N):
        x = int(torch.multinomial(q, 1, generator=gen))
        n, tok = accept_draft(p_TV, q_gV, [x], gen)
        counts[x if n == 1 else tok] += 1
        n_acc += n
    tv = 0.5 * (counts / N - p).abs().sum().item()
    assert tv < 0.02, tv
    # acceptance rate is sum_x min(p, q) (Leviathan et al. 2023, Theorem 3.5)
    assert abs(n_acc / N - torch.minimum(p, q).sum().item()) < 0.02


def test_sampling_runs_in_budget_and_draft_choices():
    model = _model("tiny")
    for draft in (LayerSkipDraft.keeping(model, 0.5), LayerSkipDraft(model, [0, 3])):
        res = speculative_generate(model, PROMPTS, 25, draft=draft, gamma=3, seed=1, top_k=20, ignore_eos=True)
        assert [len(t) for t in res.tokens] == [25, 25, 25]
        assert all(0 <= t < 256 for row in res.tokens for t in row)
    assert LayerSkipDraft.keeping(model, 0.5).keep == (0, 3)
    assert LayerSkipDraft.skipping(model, [1, 2]).keep == (0, 3)


def test_bad_arguments_are_refused():
    model = _model("tiny")
    draft = LayerSkipDraft(model, [0])
    with pytest.raises(ValueError, match="gamma=0"):
        speculative_generate(model, PROMPTS, 4, draft=draft, gamma=0)
    with pytest.raises(ValueError, match="trace=True"):
        speculative_generate(model, PROMPTS, 4, draft=draft, trace=True)
    with pytest.raises(ValueError, match="same model"):
        speculative_generate(model, PROMPTS, 4, draft=LayerSkipDraft(_model("tiny-dense"), [0]))
    with pytest.raises(ValueError, match=r"\[7\]"):
        LayerSkipDraft.skipping(model, [7])
    with pytest.raises(ValueError, match="non-empty"):
        LayerSkipDraft(model, [])
    with pytest.raises(ValueError, match="fraction 0"):
        LayerSkipDraft.keeping(model, 0)
    with pytest.raises(ValueError, match="truncate lengths"):
        ModelCache(["ragged"], 2, 2, 4).truncate([[1, 0]])


def test_cli_speculative_prints_what_plain_greedy_prints(tmp_path, capsys):
    from modlm.cli import main
    from modlm.training.checkpoint import save_checkpoint

    model = _model("tiny").float()
    save_checkpoint(tmp_path / "ckpt", model, model.config)
    base = ["generate", "--ckpt", str(tmp_path / "ckpt"), "--prompt", "Hello", "--max-new-tokens", "20"]
    base += ["--temperature", "0", "--ignore-eos"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main(base + ["--speculative", "--draft-skip", "2", "--gamma", "3"]) == 0
    cap = capsys.readouterr()
    assert cap.out == plain and "acceptance" in cap.err and "draft layers=[0, 1, 3]" in cap.err
    assert main(base + ["--draft-keep", "0.5"]) == 2
    assert "--draft-keep=0.5 needs --speculative" in capsys.readouterr().err
    assert main(base + ["--speculative", "--gamma", "0"]) == 2
    assert "--gamma=0" in capsys.readouterr().err
