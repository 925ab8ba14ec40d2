"""The one router registry and the block-kind registry: everything that names a router or a
layer kind reads them."""

import pytest
import torch

from modlm import ModelConfig, MoDTransformer
from modlm.flops import param_count
from modlm.routing.base import Router, build_router
from modlm.spec import routers as registry
from modlm.spec.kinds import block_kinds, block_spec
from modlm.spec.routers import ROUTINGS


@pytest.mark.parametrize("name", registry.router_names())
def test_every_registered_router_builds_and_follows_the_protocol(name):
    cfg = ModelConfig.from_name("tiny", router=name)
    router = build_router(cfg)
    assert isinstance(router, Router) and isinstance(router, registry.router_spec(name).load())
    x = torch.randn(2, 16, cfg.d_model)
    spec = registry.router_spec(name)
    # A-MoD scores by the previous block's received attention, which the model hands it.
    signal = {"received_BT": torch.rand(2, 16)} if spec.needs_received_attention else {}
    for routing in ROUTINGS:
        out = router(x, routing, **signal)
        assert out.idx_BK.shape[0] == 2 and out.aux_loss.dim() == 0 and "routed_frac" in out.stats
    sel, _ = router.decide(x)
    assert sel.shape == (2, 16) and sel.dtype == torch.bool
    if spec.thresholded:  # the calibration knob exists and is what decide() compares with
        with torch.no_grad():
            assert torch.equal(router.causal_logits(x) > router.threshold, router.decide(x)[0])
    # FLOP accounting reads the same spec: parameters counted without building match the model.
    assert param_count(cfg) == MoDTransformer(cfg).num_params()


def test_config_validation_reads_the_registry():
    with pytest.raises(ValueError, match="router='banana'"):
        ModelConfig.from_name("tiny", router="banana")
    spec = registry.RouterSpec(
        "stochastic-copy", "modlm.routing.stochastic:RandomRouter", "test only", scores_tokens=False, thresholded=False
    )
    registry.register_router(spec)
    try:
        model = MoDTransformer(ModelConfig.from_name("tiny", router="stochastic-copy"))
        assert type(model.blocks[1].router).__name__ == "RandomRouter"
        with pytest.raises(ValueError, match="already registered"):
            registry.register_router(spec)
    finally:
        registry._ROUTERS.items.pop("stochastic-copy")
    with pytest.raises(ValueError, match="router 'banana' is not registered"):
        registry.router_spec("banana")


@pytest.mark.parametrize("kind", block_kinds())
def test_every_block_kind_loads_a_class_of_that_kind(kind):
    spec = block_spec(kind)
    cls = spec.load()
    assert cls.kind == kind and spec.cache_layout in ("contiguous", "ragged")
    assert spec.dense_kind in block_kinds() and not block_spec(spec.dense_kind).routed


def test_model_blocks_follow_layer_types():
    cfg = ModelConfig.from_name("tiny", layer_types=["routed", "dense", "dense", "routed"])
    model = MoDTransformer(cfg)
    assert [b.kind for b in model.blocks] == list(cfg.layer_types)
    out = model(torch.randint(0, 256, (2, 16)))
    assert sorted(out.routes) == [0, 3]
