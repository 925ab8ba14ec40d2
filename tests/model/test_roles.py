"""Parameter roles are declared by modules; init, decay, clipping and freezing read them."""

import pytest
import torch
import torch.nn as nn

from modlm import ModelConfig, MoDTransformer
from modlm.spec import roles
from modlm.spec.routers import router_names


@pytest.mark.parametrize("router", (*router_names(), "none"))
@pytest.mark.parametrize("tied", [True, False])
def test_every_parameter_has_a_declared_role(router, tied):
    model = MoDTransformer(ModelConfig.from_name("tiny", router=router, causal_routing="both", tie_embeddings=tied))
    found = roles.parameter_roles(model)
    assert set(found) == {n for n, _ in model.named_parameters()}
    assert found["tok_emb.weight"] is roles.EMBEDDING
    assert found["blocks.0.attn.proj.weight"] is roles.OUT_MATRIX
    if not tied:
        assert found["lm_head.weight"] is roles.LM_HEAD
    # the old name rule for decay: matrices decay, vectors and the token embedding do not
    for name, p in model.named_parameters():
        assert found[name].decay == (p.dim() >= 2 and name != "tok_emb.weight"), name
        assert found[name].clip_group == ("predictor" if ".predictor." in name else "lm"), name


def test_an_undeclared_parameter_is_refused_by_name():
    model = MoDTransformer(ModelConfig.from_name("tiny"))
    model.blocks[0].extra = nn.Linear(4, 4)  # a module that says nothing about its parameters
    with pytest.raises(ValueError, match=r"parameter 'blocks\.0\.extra\.weight' has no declared role"):
        roles.parameter_roles(model)


def test_freeze_all_but_routing_keeps_only_routers_and_predictors_trainable():
    model = MoDTransformer(ModelConfig.from_name("tiny"))
    n = roles.freeze_all_but(model, routing=True)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert n == len(trainable) > 0 and all(".router." in name for name in trainable)


def test_init_follows_roles():
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny")
    model = MoDTransformer(cfg)
    assert torch.equal(model.blocks[0].attn_norm.weight, torch.ones(cfg.d_model))
    std_out = model.blocks[0].mlp.down.weight.std().item()
    std_in = model.blocks[0].mlp.gate_up.weight.std().item()
    assert std_out < std_in  # residual-stream writers are scaled down by sqrt(2 n_layers)
    assert abs(model.blocks[1].router.weight.std().item() - cfg.d_model**-0.5) < 0.05
