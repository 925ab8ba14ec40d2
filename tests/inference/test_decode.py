"""The decode policy: host-side decisions equal the router's own causal decisions."""

import pytest
import torch

from modlm import ModelConfig
from modlm.inference.decode import HostDecisions
from modlm.routing.base import build_router


@pytest.mark.parametrize(
    "router_name,causal_routing",
    [("learned", "predictor"), ("learned", "aux_loss"), ("token_choice", "predictor"), ("random", "predictor")],
)
def test_host_flags_equal_the_routers_causal_decision(router_name, causal_routing):
    cfg = ModelConfig.from_name("tiny", router=router_name, causal_routing=causal_routing)
    torch.manual_seed(5)
    router = build_router(cfg).eval()
    policy = HostDecisions(router_name)
    with torch.no_grad():
        if router_name != "random":
            router.weight.normal_()
            router.threshold.fill_(0.1)
        x = torch.randn(64, 1, cfg.d_model)
        torch.manual_seed(1)
        sel, _ = router.decide(x)
        torch.manual_seed(1)  # the random router draws: same draws on both paths
        flags = policy.flags(3, router, x)
    assert flags == sel.view(-1).tolist()
    assert 0 < sum(flags) < len(flags), router_name  # a mixed batch, or the check is empty


def test_plan_names_the_routed_rows_and_their_weights():
    cfg = ModelConfig.from_name("tiny")
    torch.manual_seed(0)
    router = build_router(cfg).eval()
    policy = HostDecisions("learned")
    with torch.no_grad():
        router.weight.normal_()
        x = torch.randn(8, 1, cfg.d_model)
        flags = policy.flags(1, router, x)
        plan = policy.plan(1, router, x, None)
        rows = [i for i, f in enumerate(flags) if f]
        assert 0 < len(rows) < 8
        assert plan.rows == rows and plan.n_rows == len(rows) and plan.rows_host.tolist() == rows
        torch.testing.assert_close(plan.weight_b1, router.token_weights(x[rows]))
        assert plan.route.valid_BK.view(-1).tolist() == flags
        # a mask that hides every routed row skips the block
        none = policy.plan(1, router, x, torch.zeros(8, 1, dtype=torch.bool))
        assert none.n_rows == 0 and not none.route.valid_BK.any()


def test_plan_rejects_more_than_one_token_per_row():
    cfg = ModelConfig.from_name("tiny")
    with torch.no_grad(), pytest.raises(ValueError, match=r"one new token per row, got shape \(2, 3, 64\)"):
        HostDecisions("learned").plan(1, build_router(cfg), torch.randn(2, 3, cfg.d_model), None)
