"""AdamW groups and clip groups come from declared parameter roles: they equal the name rule the
trainer used before roles (so checkpoints it wrote still resume), refuse undeclared parameters,
leave frozen ones out, and clip the causal predictors on their own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modlm.config import ModelConfig
from modlm.model.transformer import MoDTransformer
from modlm.spec.roles import freeze_all_but
from modlm.training.config import TrainConfig
from modlm.training.optim import (
    GROUP_DECAY,
    LM_CLIP_GROUP,
    apply_hyperparameters,
    build_optimizer,
    clip_gradients,
    clip_groups,
    param_groups,
)

MODELS = [
    ("tiny", {}),
    ("tiny", {"tie_embeddings": False}),
    ("tiny-dense", {}),
    ("tiny-dense", {"tie_embeddings": False}),
    ("tiny", {"causal_routing": "both"}),
    ("tiny", {"causal_routing": "aux_loss"}),
    ("tiny", {"router": "token_choice"}),
    ("tiny", {"router": "random"}),
]


def _model(name: str, **overrides) -> MoDTransformer:
    torch.manual_seed(0)
    return MoDTransformer(ModelConfig.from_name(name, **overrides))


def _names(model: nn.Module, params) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def _name_rule_groups(model: nn.Module) -> tuple[list[str], list[str]]:
    """The groups as the trainer made them from names before roles existed (the reference)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or name == "tok_emb.weight" else decay).append(name)
    return decay, no_decay


@pytest.mark.parametrize("name,overrides", MODELS)
def test_groups_by_role_equal_the_name_rule(name, overrides):
    model = _model(name, **overrides)
    cfg = TrainConfig(model=name, seq_len=32, weight_decay=0.1, model_overrides=overrides)
    opt = build_optimizer(model, cfg)
    assert [_names(model, g["params"]) for g in opt.param_groups] == list(_name_rule_groups(model))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    # Every parameter once: a tied lm_head is the embedding, in the no-decay group.
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_never_decays_and_an_untied_head_does(tied):
    model = _model("tiny", tie_embeddings=tied)
    decay, no_decay = (_names(model, g["params"]) for g in param_groups(model, 0.1))
    assert "tok_emb.weight" in no_decay
    assert ("lm_head.weight" in decay) == (not tied) and "lm_head.weight" not in no_decay


@pytest.mark.parametrize("name,overrides", MODELS)
def test_clip_groups_equal_the_name_rule(name, overrides):
    model = _model(name, **overrides)
    groups = {k: _names(model, v) for k, v in clip_groups(model).items()}
    names = [n for n, _ in model.named_parameters()]
    predictor = [n for n in names if ".predictor." in n]
    assert groups.pop(LM_CLIP_GROUP) == [n for n in names if ".predictor." not in n]
    assert groups == ({"predictor": predictor} if predictor else {})


def test_a_parameter_without_a_declared_role_is_refused_by_name():
    model = _model("tiny")
    model.probe = nn.Linear(4, 4)  # a module that says nothing about its parameters
    cfg = TrainConfig(model="tiny", seq_len=32)
    with pytest.raises(ValueError, match=r"'probe\.weight' has no declared role"):
        build_optimizer(model, cfg)
    with pytest.raises(ValueError, match=r"'probe\.weight' has no declared role"):
        clip_groups(model)


def test_frozen_parameters_are_left_out_of_groups_and_clipping():
    model = _model("tiny")
    assert freeze_all_but(model, routing=True) > 0  # router tuning: routers and predictors train
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    opt = build_optimizer(model, TrainConfig(model="tiny", seq_len=32))
    assert [_names(model, g["params"]) for g in opt.param_groups] == list(_name_rule_groups(model))
    assert sorted(n for g in opt.param_groups for n in _names(model, g["params"])) == sorted(trainable)
    clip = clip_groups(model)
    assert sorted(n for ps in clip.values() for n in _names(model, ps)) == sorted(trainable)
    assert all(".router." in n for n in _names(model, clip[LM_CLIP_GROUP]))

    # A step moves the trainable parameters only (frozen ones have no grad and no decay).
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x_BT = torch.randint(0, 256, (2, 16))
    model(x_BT, x_BT).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in trainable), n


def test_a_frozen_embedding_leaves_the_rest_as_the_name_rule_has_it():
    model = _model("tiny-dense", tie_embeddings=False)
    model.tok_emb.weight.requires_grad_(False)
    decay, no_decay = (_names(model, g["params"]) for g in param_groups(model, 0.1))
    assert (decay, no_decay) == _name_rule_groups(model)
    assert "tok_emb.weight" not in decay + no_decay and "lm_head.weight" in decay
    clip = clip_groups(model)
    assert list(clip) == [LM_CLIP_GROUP] and "tok_emb.weight" not in _names(model, clip[LM_CLIP_GROUP])
    assert clip_gradients(clip, 1.0).item() == 0.0  # no gradients yet: nothing to clip


def test_predictors_are_clipped_apart_from_the_lm():
    model = _model("tiny")
    groups = clip_groups(model)
    for p in groups[LM_CLIP_GROUP]:
        p.grad = torch.full_like(p, 1e-5)  # total norm well under 1: untouched
    for p in groups["predictor"]:
        p.grad = torch.full_like(p, 100.0)  # a spike in the predictor's loss
    lm_before = [p.grad.clone() for p in groups[LM_CLIP_GROUP]]
    lm_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in lm_before]))

    norm = clip_gradients(groups, max_norm=1.0)
    torch.testing.assert_close(norm, lm_norm)  # the reported norm is the LM's
    for p, g in zip(groups[LM_CLIP_GROUP], lm_before):
        assert torch.equal(p.grad, g)  # the spike did not shrink the LM's step
    pred_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in groups["predictor"]]))
    torch.testing.assert_close(pred_norm, torch.tensor(1.0), rtol=1e-4, atol=1e-4)


def test_resumed_hyperparameters_follow_the_config_per_group():
    model = _model("tiny")
    opt = build_optimizer(model, TrainConfig(model="tiny", seq_len=32, weight_decay=0.1))
    apply_hyperparameters(opt, TrainConfig(model="tiny", seq_len=32, weight_decay=0.3, beta1=0.8, beta2=0.9))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3 if d else 0.0 for d in GROUP_DECAY]
    assert all(g["betas"] == (0.8, 0.9) for g in opt.param_groups)
