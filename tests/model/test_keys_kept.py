"""Equivalences that define skipping that keeps keys (the ``"keys-kept"`` block kind)."""

import pytest
import torch

from modlm import ModelConfig, MoDTransformer
from modlm.inference.cache import ModelCache
from modlm.inference.calibrate import calibrate_thresholds
from modlm.model.block import BlockContext, DenseBlock, Phase, RoutedBlock
from modlm.model.keys_kept import KeysKeptBlock, visible_keys_mask
from modlm.model.layers import Rotary
from modlm.routing.base import RouterOutput
from modlm.routing.ops import topk_mask


def kk(**kw):
    return ModelConfig.from_name("tiny-keys-kept", **kw)


def _rotary(cfg):
    return Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)


def _ctx(rot, B, T, route=None, routing="topk", token_mask=None):
    pos_BT = torch.arange(T).expand(B, T)
    cos, sin = rot(torch.arange(T))
    replay = None if route is None else {1: route}
    return BlockContext(Phase.TRAIN, routing, rot, pos_BT, cos, sin, token_mask_BT=token_mask, replay=replay)


def _block(cfg, cls=KeysKeptBlock):
    torch.manual_seed(1)
    blk = cls(cfg, 1)
    with torch.no_grad():  # non-trivial norms so a wrong position or token would show
        for p in blk.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return blk


def _dense_update(blk, x_BTD, rot):
    cos, sin = rot(torch.arange(x_BTD.shape[1]))
    return DenseBlock.update(blk, x_BTD, cos, sin)[0]


def test_capacity_one_unit_weight_equals_dense_block():
    cfg = kk(capacity=1.0)
    blk, rot = _block(cfg), _rotary(cfg)
    B, T = 3, 20
    x = torch.randn(B, T, cfg.d_model)
    route = RouterOutput(torch.arange(T).expand(B, T), None, None, x.new_zeros(()), {})
    y, _ = blk(x, _ctx(rot, B, T, route))
    assert torch.equal(y, x + _dense_update(blk, x, rot))  # bit-for-bit: same ops, same order
    # the split path (a causal route that happens to take every token) computes the same
    every = RouterOutput(torch.arange(T).expand(B, T), torch.ones(B, T, dtype=torch.bool), None, x.new_zeros(()), {})
    y2, _ = blk(x, _ctx(rot, B, T, every))
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)


def test_full_model_capacity_one_equals_the_dense_model_and_a_dense_checkpoint_loads():
    # A random router at capacity 1.0 takes every token with unit weight: the model is dense.
    cfg = kk(capacity=1.0, router="random")
    dense = MoDTransformer(cfg.dense_twin())
    kept = MoDTransformer(cfg)
    missing, unexpected = kept.load_state_dict(dense.state_dict(), strict=False)
    assert missing == [] and unexpected == []  # the random router has no parameters: same names
    idx = torch.randint(0, 256, (2, 48))
    assert torch.equal(kept(idx).logits, dense(idx).logits)
    learned = MoDTransformer(kk())
    missing, unexpected = learned.load_state_dict(dense.state_dict(), strict=False)
    assert unexpected == [] and missing and all(".router." in k for k in missing)  # only routers are new


def test_a_seed_gives_the_routed_kinds_weights():
    """Same parameters, same init draws: a keys-kept model and a MoD model of one seed start equal
    (the variants of ``modlm reproduce`` differ by the rule alone)."""
    torch.manual_seed(0)
    kept = MoDTransformer(kk()).state_dict()
    torch.manual_seed(0)
    mod = MoDTransformer(kk(routed_kind="routed")).state_dict()
    assert kept.keys() == mod.keys() and all(torch.equal(kept[k], mod[k]) for k in kept)


def test_skipped_tokens_unchanged_and_routed_ones_see_every_key():
    """A routed token's update is the dense block's update of that token (attention over every
    earlier token, routed or not), weighted by its router score; skipped tokens pass unchanged."""
    cfg = kk(capacity=0.25)
    blk, rot = _block(cfg), _rotary(cfg)
    B, T = 3, 32
    x = torch.randn(B, T, cfg.d_model)
    y, route = blk(x, _ctx(rot, B, T))
    sel = topk_mask(route.idx_BK, T)
    assert route.idx_BK.shape == (B, 8) and torch.equal(y[~sel], x[~sel])  # bit-for-bit
    r = blk.router.scores(x)
    ref = x + r.unsqueeze(-1) * _dense_update(blk, x, rot)
    torch.testing.assert_close(y[sel], ref[sel], rtol=1e-5, atol=1e-5)


def test_skipped_tokens_stay_visible_unlike_the_papers_rule():
    cfg = kk(capacity=0.25)
    kept, routed, rot = _block(cfg), _block(cfg, RoutedBlock), _rotary(cfg)
    routed.load_state_dict(kept.state_dict())
    B, T = 2, 32
    x = torch.randn(B, T, cfg.d_model)
    y, route = kept(x, _ctx(rot, B, T))
    sel = topk_mask(route.idx_BK, T)
    x2 = torch.where(sel.unsqueeze(-1), x, torch.randn_like(x))  # change every skipped token
    y2, _ = kept(x2, _ctx(rot, B, T, route))  # same routes
    later = sel & (torch.arange(T) > route.idx_BK[:, :1])  # routed tokens with a skipped one before them
    assert not torch.allclose(y2[later], y[later], atol=1e-4)
    r1, _ = routed(x, _ctx(rot, B, T, route))
    r2, _ = routed(x2, _ctx(rot, B, T, route))
    assert torch.equal(r1[sel], r2[sel])  # MoD's rule: skipped tokens are invisible


def test_visible_keys_mask_is_causal_hides_padding_and_always_shows_the_query():
    idx_BK = torch.tensor([[0, 2], [1, 3]])
    mask = visible_keys_mask(idx_BK, 4, None)[:, 0]
    assert mask[0].tolist() == [[True, False, False, False], [True, True, True, False]]
    pad = torch.tensor([[True] * 4, [False, True, False, True]])
    mask = visible_keys_mask(idx_BK, 4, pad)[:, 0]
    assert mask[1].tolist() == [[False, True, False, False], [False, True, False, True]]
    lone = visible_keys_mask(torch.tensor([[0]]), 2, torch.tensor([[False, True]]))[0, 0]
    assert lone.tolist() == [[True, False]]  # a padded query still sees itself (no empty softmax row)


def test_left_padded_batch_equals_each_row_alone_under_causal_routing():
    torch.manual_seed(0)
    model = MoDTransformer(kk(capacity=0.3)).eval()
    lens, T = (40, 23, 9), 40
    rows = [torch.randint(0, 256, (1, n)) for n in lens]
    idx = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.bool)
    pos = torch.zeros(3, T, dtype=torch.long)
    for b, (row, n) in enumerate(zip(rows, lens)):
        idx[b, T - n :], mask[b, T - n :], pos[b, T - n :] = row[0], True, torch.arange(n)
    calibrate_thresholds(model, torch.randint(0, 256, (4, 40)), 0.5)  # mixed causal decisions
    with torch.no_grad():
        out = model(idx, routing="causal", pos_BT=pos, token_mask_BT=mask)
        for b, (row, n) in enumerate(zip(rows, lens)):
            alone = model(row, routing="causal").logits
            torch.testing.assert_close(out.logits[b : b + 1, T - n :], alone, rtol=1e-5, atol=1e-5)
    fracs = [v for k, v in out.router_stats().items() if k.endswith("routed_frac")]
    assert any(0.0 < f < 1.0 for f in fracs), fracs


@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_prefill_through_the_cache_equals_the_whole_sequence_forward(routing):
    """Prefill stores every token's keys (the contiguous cache) and gives the training forward's logits."""
    torch.manual_seed(0)
    cfg = kk(capacity=0.25, n_kv_heads=2)
    model = MoDTransformer(cfg).double().eval()
    idx = torch.randint(0, 256, (2, 24))
    cache = ModelCache.for_config(cfg, 2, capacity=8, dtype=torch.float64)
    with torch.no_grad():
        want = model(idx, routing=routing).logits
        got = model(idx, routing=routing, cache=cache, pos_BT=torch.arange(24).expand(2, 24), phase="prefill")
    torch.testing.assert_close(got.logits, want, rtol=1e-9, atol=1e-9)
    assert all(cache.layer_lengths(i).tolist() == [24, 24] for i in range(cfg.n_layers))


def test_amod_cannot_read_the_attention_of_a_keys_kept_block():
    with pytest.raises(ValueError, match="layer 1 is 'keys-kept' and precedes routed layer 2"):
        MoDTransformer(kk(router="attention", route_every=1, route_start=1))
    MoDTransformer(kk(router="attention"))  # every other block: the providers are dense


def test_tiny_preset_trains_and_every_parameter_has_a_role():
    from modlm.spec.roles import parameter_roles

    torch.manual_seed(0)
    model = MoDTransformer(ModelConfig.from_name("tiny-keys-kept"))
    assert [type(b).__name__ for b in model.blocks] == ["DenseBlock", "KeysKeptBlock"] * 2
    parameter_roles(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(8):
        out = model(x, x)
        opt.zero_grad()
        out.loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if "blocks.1.attn" in n)
        opt.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0]
