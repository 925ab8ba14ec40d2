"""The learned router's causal decision: the folded (inference) form equals the plain one."""

import torch

from modlm import ModelConfig, MoDTransformer
from modlm.routing.expert_choice import LearnedRouter


def _router(dtype=torch.float64):
    cfg = ModelConfig.from_name("tiny", causal_routing="predictor")
    torch.manual_seed(3)
    router = LearnedRouter(cfg).to(dtype)
    with torch.no_grad():
        for p in router.parameters():
            p.add_(0.3 * torch.randn_like(p))
        router.predictor.r_mean.fill_(0.2)
        router.predictor.r_var.fill_(1.7)
    return router, cfg


def _plain(router, x):
    with torch.enable_grad():  # gradients on: the unfolded path, operator by operator
        return router.causal_logits(x).detach(), router.scores(x).detach()


def _folded(router, x):
    with torch.no_grad():
        return router.causal_logits(x), router.scores(x)


def test_folded_decision_equals_router_plus_predictor():
    router, cfg = _router()
    x = torch.randn(3, 17, cfg.d_model, dtype=torch.float64)
    (lp, rp), (lf, rf) = _plain(router, x), _folded(router, x)
    # The fold runs in fp32 (as the plain path does for decisions): agree to fp32 rounding.
    torch.testing.assert_close(lf, lp.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rf, rp.float(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        sel, weight = router.decide(x)
    assert torch.equal(sel, lf > router.threshold) and torch.equal(weight, rf)


def test_folded_weights_follow_every_change_of_their_sources():
    router, cfg = _router()
    x = torch.randn(2, 9, cfg.d_model, dtype=torch.float64)
    _folded(router, x)  # builds the cache

    def check():
        torch.testing.assert_close(_folded(router, x)[0], _plain(router, x)[0].float(), rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        router.predictor.fc1.weight.mul_(1.5)  # an optimizer-style in-place update
    check()
    with torch.no_grad():
        router.weight.add_(0.5)  # the router itself
    check()
    router.train()
    router.predictor.update_stats(torch.randn(4, 32, dtype=torch.float64) * 3 + 1)  # new running statistics
    router.eval()
    check()
    other, _ = _router()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.0)
    router.load_state_dict(other.state_dict())
    check()
    router.to(torch.float32)  # new tensor objects
    check()
    with torch.inference_mode():
        router.predictor.fc2.bias.add_(2.0)  # in-place even under inference mode bumps the version
    check()


def test_model_decisions_use_the_fold_without_gradients_and_agree_with_training_path():
    cfg = ModelConfig.from_name("tiny", causal_routing="predictor")
    model = MoDTransformer(cfg).double()
    idx = torch.randint(0, cfg.vocab_size, (2, 40))
    model(idx)  # running statistics of r
    model.eval()
    with torch.no_grad():
        fast = model(idx, routing="causal")
    with torch.enable_grad():
        slow = model(idx, routing="causal")
    for i in fast.routes:
        assert torch.equal(fast.routes[i].idx_BK, slow.routes[i].idx_BK)
        assert torch.equal(fast.routes[i].valid_BK, slow.routes[i].valid_BK)
    torch.testing.assert_close(fast.logits, slow.logits.detach(), rtol=1e-5, atol=1e-5)
