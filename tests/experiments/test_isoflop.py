"""isoFLOP planning: every planned run spends its budget to within 1%; families and shapes parse."""

import pytest

from modlm.experiments.isoflop import DEFAULT_SHAPES, Family, Shape, SweepSettings, parse_shapes, plan_run, plan_sweep
from modlm.flops import train_flops


@pytest.mark.parametrize("budget", [1e12, 2.7e12, 5e12, 1.3e13])
def test_planner_hits_each_budget_within_one_percent(budget):
    settings = SweepSettings()
    families = ["dense", "mod", "mod-random", "mod-tc", "mod:capacity=0.5,route_every=1,route_start=0"]
    shapes = parse_shapes(DEFAULT_SHAPES)
    runs = plan_sweep([budget], families, shapes, settings)
    assert {r.family for r in runs} == set(families)  # every family has a grid at this budget
    for r in runs:
        # the FLOPs come from modlm.flops for exactly the model the run trains
        cfg = r.model_config()
        assert r.flops_per_step == train_flops(cfg, settings.seq_len, settings.batch_size)
        assert settings.min_steps <= r.steps <= settings.max_steps
        assert abs(r.train_flops - budget) <= 0.01 * budget, (r.run_id, r.train_flops / budget)
        tc = r.train_config(settings, "/tmp/x")
        assert tc.max_steps == r.steps and tc.model_config() == cfg
    # shapes outside [min_steps, max_steps] are left out of the grid, not squeezed in
    n_all = len(shapes) * len(families)
    assert len(runs) <= n_all


def test_planner_refuses_budgets_it_cannot_hit():
    settings = SweepSettings()
    with pytest.raises(ValueError, match="outside \\[min_steps"):
        plan_run(1e9, "dense", Shape(192, 8), settings)  # < 1 step
    with pytest.raises(ValueError, match="no shape of the grid"):
        plan_sweep([1e9], ["dense"], [Shape(192, 8)], settings)
    with pytest.raises(ValueError, match="min_steps"):
        SweepSettings(min_steps=10)  # rounding could miss the budget by > 1%


def test_family_specs():
    fam = Family.parse("mod:capacity=0.25,route_every=1")
    assert fam.model_overrides["capacity"] == 0.25 and fam.model_overrides["router"] == "learned"
    assert "=" not in fam.slug and ":" not in fam.slug
    for bad in ("banana", "mod:capacity", "mod:d_model=64", "mod:nonsense=1"):
        with pytest.raises(ValueError, match="family"):
            Family.parse(bad)


@pytest.mark.parametrize(
    "family", ["moe", "mode-integrated:n_noop_experts=12", "mode-staged", "early-exit", "keys-kept"]
)
def test_new_kind_families_plan_runs_at_their_budget(family):
    settings = SweepSettings()
    run = plan_run(3.6e12, family, Shape(128, 4), settings)
    cfg = run.model_config()
    assert abs(run.train_flops - 3.6e12) <= 0.01 * 3.6e12
    assert run.flops_per_step == train_flops(cfg, settings.seq_len, settings.batch_size)
    assert set(cfg.layer_types) != {"dense"}


def test_init_gain_scales_the_init_std_with_width():
    """init_gain / sqrt(width) reaches the built model's weights; None keeps the model's 0.02."""
    import math

    import torch

    from modlm.model.transformer import MoDTransformer

    plain = plan_run(1e12, "dense", Shape(32, 2), SweepSettings(head_dim=16, init_gain=None))
    assert "init_std" not in plain.overrides and plain.model_config().init_std == 0.02
    scaled = SweepSettings(head_dim=16)  # the default gain, 0.55
    for width in (16, 64):
        run = plan_run(3e11, "mod", Shape(width, 2), scaled, max_steps=10**6)
        cfg = run.model_config()
        assert cfg.init_std == pytest.approx(0.55 / math.sqrt(width), rel=1e-4)
        torch.manual_seed(0)
        emb = MoDTransformer(cfg).tok_emb.weight
        assert emb.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    with pytest.raises(ValueError, match="init_gain"):
        SweepSettings(init_gain=0.0)


def test_a_width_below_the_head_size_is_one_head():
    settings = SweepSettings(head_dim=16)
    for width, heads in ((8, 1), (12, 1), (16, 1), (48, 3)):
        assert plan_run(3e11, "mod", Shape(width, 2), settings).overrides["n_heads"] == heads
    with pytest.raises(ValueError, match="multiple of head_dim"):
        plan_run(3e11, "dense", Shape(24, 2), settings)
    with pytest.raises(ValueError, match="even"):
        plan_run(3e11, "dense", Shape(7, 2), settings)
