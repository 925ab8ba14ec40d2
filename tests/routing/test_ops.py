import pytest
import torch

from modlm.routing.ops import (
    gather_tokens,
    mask_to_padded_indices,
    router_scores,
    scatter_add_weighted,
    select_topk,
    topk_mask,
)
from modlm.spec.capacity import capacity_k


def test_capacity_k_rounds_and_never_zero():
    assert capacity_k(0.125, 512) == 64
    assert capacity_k(0.125, 1) == 1  # int(0.125 * 1) would be 0
    assert capacity_k(0.125, 4) == 1  # 0.5 rounds half up
    assert capacity_k(0.5, 3) == 2
    assert capacity_k(1.0, 7) == 7
    with pytest.raises(ValueError, match="seq_len=0"):
        capacity_k(0.5, 0)


def test_select_topk_matches_reference_and_is_sorted():
    scores = torch.randn(5, 40)
    idx = select_topk(scores, 7)
    assert idx.shape == (5, 7)
    assert torch.all(idx[:, 1:] > idx[:, :-1]), "indices must be ascending (causal order)"
    ref = torch.sort(torch.topk(scores, 7, dim=-1).indices, dim=-1).values
    assert torch.equal(idx, ref)


def test_select_topk_ties_go_to_earlier_positions():
    scores = torch.zeros(2, 10)
    scores[1, 9] = 1.0
    idx = select_topk(scores, 3)
    assert idx.tolist() == [[0, 1, 2], [0, 1, 9]]


def test_select_topk_exactly_k_and_bad_k():
    s = torch.randn(3, 16)
    for k in (1, 5, 16):
        idx = select_topk(s, k)
        assert idx.shape == (3, k)
        assert topk_mask(idx, 16).sum(1).tolist() == [k] * 3
    with pytest.raises(ValueError, match="k=0"):
        select_topk(s, 0)


def test_gather_matches_loop_reference():
    x = torch.randn(3, 10, 4)
    idx = torch.tensor([[0, 3, 9], [1, 2, 3], [5, 6, 8]])
    out = gather_tokens(x, idx)
    ref = torch.stack([x[b, idx[b]] for b in range(3)])
    assert torch.equal(out, ref)


def test_weighted_scatter_matches_reference_and_leaves_others_untouched():
    x = torch.randn(2, 8, 3)
    idx = torch.tensor([[1, 4], [0, 7]])
    f = torch.randn(2, 2, 3)
    w = torch.randn(2, 2)
    out = scatter_add_weighted(x, idx, f, w)
    ref = x.clone()
    for b in range(2):
        for j in range(2):
            ref[b, idx[b, j]] = x[b, idx[b, j]] + w[b, j] * f[b, j]
    torch.testing.assert_close(out, ref)
    untouched = ~topk_mask(idx, 8)
    assert torch.equal(out[untouched], x[untouched])  # bit-for-bit
    assert torch.equal(scatter_add_weighted(x, idx, f, None), scatter_add_weighted(x, idx, f, torch.ones(2, 2)))


def test_mask_to_padded_indices():
    mask = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    idx, valid = mask_to_padded_indices(mask)
    assert idx.shape == (3, 3)
    assert valid.tolist() == [[True, True, True], [False, False, False], [True, False, False]]
    assert idx[0].tolist() == [1, 3, 4]
    assert idx[2, 0].item() == 0
    assert torch.all((idx >= 0) & (idx < 5))


def test_router_scores_are_fp32_even_under_autocast():
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    w = torch.randn(16)
    ref = x.float() @ w
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router_scores(x, w)
    assert r.dtype == torch.float32 and r.shape == (2, 5)
    torch.testing.assert_close(r, ref)
    torch.testing.assert_close(router_scores(x, w), ref)


def test_select_route_is_top_k_without_a_mask_and_per_row_top_k_with_one():
    from modlm.routing.ops import select_route, select_topk_masked

    torch.manual_seed(0)
    s = torch.randn(3, 16)
    idx, valid, frac = select_route(s, 0.25, None)
    assert valid is None and torch.equal(idx, select_topk(s, capacity_k(0.25, 16)))
    assert frac.item() == 4 / 16
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[1, :6] = False  # left padding
    idx, valid, frac = select_route(s, 0.25, mask)
    ref_idx, ref_valid = select_topk_masked(s, mask, 0.25)
    assert torch.equal(idx, ref_idx) and torch.equal(valid, ref_valid)
    assert frac.item() == pytest.approx(valid.sum().item() / mask.sum().item())
