"""ModelCache: per-layer caches; routed layers hold, per row, only the tokens they processed."""

import pytest
import torch
import torch.nn.functional as F

from modlm.inference.cache import ModelCache

G, E = 2, 4


def _kv(b, K, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, G, K, E, generator=g), torch.randn(b, G, K, E, generator=g)


def test_all_rows_append_returns_views_and_causal_mask():
    c = ModelCache(["ragged"] * 2, batch_size=3, n_kv_heads=G, head_dim=E, capacity=8)
    k, v = _kv(3, 5, 0)
    k_all, v_all, mask = c.update(k, v, 1)
    assert k_all.shape == (3, G, 5, E) and mask.shape == (3, 1, 5, 5)
    assert torch.equal(k_all, k) and torch.equal(v_all, v)
    assert k_all.data_ptr() == c.layers[1].k.data_ptr()  # a view of the buffer, no copy
    assert torch.equal(mask[:, 0], torch.ones(5, 5, dtype=torch.bool).tril().expand(3, 5, 5))
    # one more token per row: it sees every real slot, including its own
    k1, v1 = _kv(3, 1, 1)
    k_all, v_all, mask = c.update(k1, v1, 1)
    assert torch.equal(k_all, torch.cat([k, k1], 2)) and mask.shape == (3, 1, 1, 6) and bool(mask.all())
    assert c.layer_lengths(1).tolist() == [6, 6, 6] and c.layer_lengths(0).tolist() == [0, 0, 0]


def test_row_subset_updates_are_ragged_and_match_a_reference():
    B = 4
    c = ModelCache(["ragged"] * 1, batch_size=B, n_kv_heads=G, head_dim=E, capacity=2)
    ref_k = [[] for _ in range(B)]
    ref_v = [[] for _ in range(B)]
    g = torch.Generator().manual_seed(0)
    for step in range(12):
        rows = torch.nonzero(torch.rand(B, generator=g) < 0.5).squeeze(1)
        if step == 0:
            rows = torch.arange(B)  # start uniform, then go ragged
        k, v = _kv(len(rows), 1, 100 + step)
        k_all, v_all, mask = c.update(k, v, 0, rows=rows)
        for j, r in enumerate(rows.tolist()):
            ref_k[r].append(k[j, :, 0])
            ref_v[r].append(v[j, :, 0])
        if len(rows) == 0:
            assert k_all.shape[0] == 0 and mask.shape[0] == 0
            continue
        S = max(len(ref_k[r]) for r in rows.tolist())
        assert k_all.shape == (len(rows), G, S, E) and mask.shape == (len(rows), 1, 1, S)
        for j, r in enumerate(rows.tolist()):
            n = len(ref_k[r])
            assert torch.equal(k_all[j, :, :n], torch.stack(ref_k[r], 1))
            assert torch.equal(v_all[j, :, :n], torch.stack(ref_v[r], 1))
            # the new token sees exactly its row's n stored tokens (its own included)
            assert mask[j, 0, 0].tolist() == [True] * n + [False] * (S - n)
    assert c.layer_lengths(0).tolist() == [len(r) for r in ref_k]
    assert len(set(c.layer_lengths(0).tolist())) > 1  # really ragged
    # an all-rows update on ragged rows appends at each row's own end
    k, v = _kv(B, 1, 999)
    k_all, _, mask = c.update(k, v, 0)
    for r in range(B):
        n = len(ref_k[r])
        assert torch.equal(k_all[r, :, n], k[r, :, 0])
        assert mask[r, 0, 0, : n + 1].all() and not mask[r, 0, 0, n + 1 :].any()


def test_growth_by_doubling_keeps_contents():
    c = ModelCache(["ragged"] * 1, batch_size=2, n_kv_heads=G, head_dim=E, capacity=2)
    ks = []
    caps = []
    for t in range(9):
        k, v = _kv(2, 1, t)
        ks.append(k)
        k_all, _, _ = c.update(k, v, 0)
        caps.append(c.layers[0].capacity)
        assert torch.equal(k_all, torch.cat(ks, 2))
    assert caps == [2, 2, 4, 4, 8, 8, 8, 8, 16]
    # a big chunk grows straight to what it needs
    k, v = _kv(2, 40, 50)
    c.update(k, v, 0)
    assert c.layers[0].capacity == 49 and c.layer_lengths(0).tolist() == [49, 49]
    # row subsets grow too, and keep the other rows' contents
    for t in range(3):
        k, v = _kv(1, 1, 60 + t)
        c.update(k, v, 0, rows=torch.tensor([1]))
    assert c.layers[0].capacity == 98 and c.layer_lengths(0).tolist() == [49, 52]
    assert torch.equal(c.layers[0].k[0, :, :9], torch.cat(ks, 2)[0])


def test_padding_slots_are_seen_by_no_one_but_themselves():
    c = ModelCache(["ragged"] * 1, batch_size=2, n_kv_heads=G, head_dim=E, capacity=4)
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])  # row 0 left-padded
    k, v = _kv(2, 4, 0)
    _, _, mask = c.update(k, v, 0, valid_bK=valid)
    m0 = mask[0, 0]
    assert m0[0].tolist() == [True, False, False, False]  # a pad token sees only itself
    assert m0[1].tolist() == [False, True, False, False]
    assert m0[2].tolist() == [False, False, True, False]  # real tokens never see padding
    assert m0[3].tolist() == [False, False, True, True]
    assert torch.equal(mask[1, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    assert c.layer_lengths(0).tolist() == [2, 4]  # real tokens only
    assert c.slot_lengths(0).tolist() == [4, 4]  # padding takes slots
    k1, v1 = _kv(2, 1, 1)
    _, _, mask = c.update(k1, v1, 0)
    assert mask[0, 0, 0].tolist() == [False, False, True, True, True]
    assert mask[1, 0, 0].tolist() == [True] * 5
    # a padded query row still has a visible slot (itself), so SDPA gives no NaN
    k_all, v_all, mask = c.update(*_kv(2, 4, 2), 0, valid_bK=valid)
    out = F.scaled_dot_product_attention(torch.randn(2, G, 4, E), k_all, v_all, attn_mask=mask)
    assert torch.isfinite(out).all()


def test_cached_attention_equals_full_causal_attention():
    # Prefill in a chunk, then one token at a time, some steps skipping a row: each row's
    # attention outputs equal full causal attention over that row's own token sequence.
    B, T = 3, 10
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, G, T, E, generator=g)
    k = torch.randn(B, G, T, E, generator=g)
    v = torch.randn(B, G, T, E, generator=g)
    takes = torch.rand(B, T, generator=g) < 0.6
    takes[:, :4] = True  # the prefill chunk goes to every row
    c = ModelCache(["ragged"] * 1, batch_size=B, n_kv_heads=G, head_dim=E, capacity=3)
    got = {b: [] for b in range(B)}
    k_all, v_all, mask = c.update(k[:, :, :4], v[:, :, :4], 0)
    y = F.scaled_dot_product_attention(q[:, :, :4], k_all, v_all, attn_mask=mask)
    for b in range(B):
        got[b].append(y[b, :, :4])
    for t in range(4, T):
        rows = torch.nonzero(takes[:, t]).squeeze(1)
        if len(rows) == 0:
            continue
        k_all, v_all, mask = c.update(k[rows, :, t : t + 1], v[rows, :, t : t + 1], 0, rows=rows)
        y = F.scaled_dot_product_attention(q[rows, :, t : t + 1], k_all, v_all, attn_mask=mask)
        for j, b in enumerate(rows.tolist()):
            got[b].append(y[j])
    for b in range(B):
        sel = takes[b].nonzero().squeeze(1)
        ref = F.scaled_dot_product_attention(
            q[b : b + 1, :, sel], k[b : b + 1, :, sel], v[b : b + 1, :, sel], is_causal=True
        )[0]
        torch.testing.assert_close(torch.cat(got[b], 1), ref, rtol=1e-5, atol=1e-6)
    assert c.layer_lengths(0).tolist() == takes.sum(1).tolist()


def test_dtype_and_bad_arguments():
    c = ModelCache(["ragged"] * 1, batch_size=1, n_kv_heads=G, head_dim=E, dtype=torch.float64)
    k, v = _kv(1, 2, 0)
    k_all, _, _ = c.update(k, v, 0)
    assert k_all.dtype == torch.float64
    with pytest.raises(ValueError, match="capacity=0"):
        ModelCache(["ragged"], 1, G, E, capacity=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        ModelCache(["ragged"], 0, G, E)


def test_for_config_builds_one_layout_per_layer_kind():
    from modlm.config import ModelConfig

    cfg = ModelConfig.from_name("tiny")  # dense, routed, dense, routed
    c = ModelCache.for_config(cfg, batch_size=2, capacity=4)
    assert [type(layer).__name__ for layer in c.layers] == ["ContiguousLayerCache", "RaggedLayerCache"] * 2
    dense = ModelCache.for_config(cfg.dense_twin(), batch_size=2)
    assert {type(layer).__name__ for layer in dense.layers} == {"ContiguousLayerCache"}


def test_contiguous_layer_refuses_row_subsets():
    c = ModelCache(["contiguous"], batch_size=2, n_kv_heads=G, head_dim=E)
    k, v = _kv(1, 1, 0)
    with pytest.raises(ValueError, match="rows must be None"):
        c.update(k, v, 0, rows=torch.tensor([1]))


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="unknown"):
        ModelCache(["sparse"], batch_size=1, n_kv_heads=G, head_dim=E)


@pytest.mark.parametrize("layout", ["contiguous", "ragged"])
def test_truncate_per_row_equals_a_cache_of_the_kept_tokens(layout):
    """Rollback: appending 5 tokens then keeping j_b per row leaves, per row, exactly the real
    slots of a cache that got only those j_b (contiguous rows keep holes, seen by no one)."""
    B, keep = 3, [2, 5, 0]
    k0, v0 = _kv(B, 4, 0)
    k1, v1 = _kv(B, 5, 1)
    c = ModelCache([layout], batch_size=B, n_kv_heads=G, head_dim=E, capacity=4)
    c.update(k0, v0, 0)
    c.update(k1, v1, 0)
    c.truncate([[4 + j for j in keep]])
    assert c.layer_lengths(0).tolist() == [4 + j for j in keep]
    lay = c.layers[0]
    for b, j in enumerate(keep):
        ok = lay.slot_ok[b, : lay.max_len]
        assert torch.equal(lay.k[b, :, : lay.max_len][:, ok], torch.cat([k0[b], k1[b, :, :j]], 1))
        assert torch.equal(lay.v[b, :, : lay.max_len][:, ok], torch.cat([v0[b], v1[b, :, :j]], 1))
    # the next token of each row sees its kept tokens and itself, nothing rolled back
    k2, v2 = _kv(B, 1, 2)
    _, _, mask = c.update(k2, v2, 0)
    assert mask[:, 0, -1].sum(-1).tolist() == [4 + j + 1 for j in keep]
    if layout == "ragged":  # each row continues right after its kept slots
        assert c.slot_lengths(0).tolist() == [4 + j + 1 for j in keep]
