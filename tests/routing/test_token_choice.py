"""Token-choice routing: capped selection against a slow reference, causality, balancing."""

import pytest
import torch

from modlm import ModelConfig, MoDTransformer
from modlm.routing.token_choice import TokenChoiceRouter, capped_selection


def _reference(scores_BT, chosen_BT, k):
    """Loop version: the (at most k) highest-scoring chosen positions of each row, ascending."""
    rows = []
    for s, c in zip(scores_BT.tolist(), chosen_BT.tolist()):
        cand = sorted((i for i in range(len(s)) if c[i]), key=lambda i: (-s[i], i))[:k]
        rows.append(sorted(cand))
    return rows


@pytest.mark.parametrize("k", [1, 3, 8, 16])
def test_capped_selection_matches_reference(k):
    g = torch.Generator().manual_seed(k)
    scores = torch.randn(6, 16, generator=g).round(decimals=1)  # ties happen
    chosen = torch.rand(6, 16, generator=g) < torch.tensor([0.0, 0.1, 0.3, 0.6, 0.9, 1.0]).unsqueeze(1)
    idx, valid = capped_selection(scores, chosen, k)
    assert idx.shape == valid.shape == (6, k)
    for b, want in enumerate(_reference(scores, chosen, k)):
        n = len(want)
        assert idx[b, :n].tolist() == want and valid[b, :n].all()
        assert not valid[b, n:].any() and (idx[b, n:] == 15).all()  # padding after every real slot


def test_router_caps_at_capacity_and_weights_by_gate():
    cfg = ModelConfig.from_name("tiny", router="token_choice", capacity=0.25)
    router = TokenChoiceRouter(cfg)
    torch.nn.init.normal_(router.weight, 0, 1)
    x = torch.randn(3, 32, cfg.d_model)
    out = router(x, "topk")
    r = x @ router.weight
    assert out.idx_BK.shape == (3, 8)  # K = capacity * T slots: static shapes, exact FLOPs
    assert torch.equal(out.valid_BK, torch.gather(r > 0, 1, out.idx_BK) & out.valid_BK)
    torch.testing.assert_close(out.weight_BK, torch.sigmoid(torch.gather(r, 1, out.idx_BK)))
    # the balance loss: the squared gap between each row's asking fraction and the capacity
    asking_B = (r > 0).float().mean(1)
    torch.testing.assert_close(out.aux_loss, cfg.aux_loss_weight * (asking_B - 0.25).pow(2).mean())
    assert out.aux_loss.item() > 0 and out.aux_loss.requires_grad


def test_causal_routing_of_a_token_choice_model_is_causal():
    torch.manual_seed(0)
    model = MoDTransformer(ModelConfig.from_name("tiny", router="token_choice")).eval()
    with torch.no_grad():
        for b in model.blocks:
            if hasattr(b, "router"):
                torch.nn.init.normal_(b.router.weight, 0, 1)  # some tokens ask, some do not
        x = torch.randint(0, 256, (2, 40))
        y = x.clone()
        y[:, 25:] = torch.randint(0, 256, (2, 15))  # change only the future
        a, b = model(x, routing="causal"), model(y, routing="causal")
    torch.testing.assert_close(a.logits[:, :25], b.logits[:, :25])
    assert 0 < a.router_stats()["L1/routed_frac"] < 1


def test_balancing_loss_lowers_gates_of_an_oversubscribed_router():
    cfg = ModelConfig.from_name("tiny", router="token_choice", capacity=0.125, aux_loss_weight=1.0)
    router = TokenChoiceRouter(cfg)
    x = torch.randn(4, 64, cfg.d_model)
    with torch.no_grad():
        router.weight.copy_(x.mean((0, 1)) / x.mean((0, 1)).norm() * 0.5)  # most tokens ask
    before = router(x, "topk")
    assert before.stats["chosen_frac"] > 0.3
    before.aux_loss.backward()
    with torch.no_grad():
        router.weight -= 1.0 * router.weight.grad
    assert torch.sigmoid(x @ router.weight).mean() < torch.sigmoid(x @ (router.weight + router.weight.grad)).mean()
