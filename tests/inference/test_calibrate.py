"""The inference-time compute knob: causal-routing thresholds calibrated to a routed fraction."""

import pytest
import torch

from modlm import ModelConfig, MoDTransformer
from modlm.inference.calibrate import (
    calibrate_thresholds,
    get_thresholds,
    measure_routed_fraction,
    set_thresholds,
    sweep_knob,
)
from modlm.inference.evaluation import evaluate_lm, window_batches


def _model(**kw):
    torch.manual_seed(0)
    return MoDTransformer(ModelConfig.from_name("tiny", **kw)).eval()


def _tokens(B=8, T=128, seed=0):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("causal_routing", ["predictor", "aux_loss", "both"])
def test_calibration_hits_the_target_fraction_in_every_layer(causal_routing):
    model = _model(causal_routing=causal_routing)
    tokens = _tokens()
    th = calibrate_thresholds(model, tokens, 0.125)
    assert sorted(th) == list(model.config.routed_layers)
    measured = measure_routed_fraction(model, tokens)
    # every layer, including those whose input changed when earlier layers were calibrated
    for layer, f in measured.items():
        assert abs(f - 0.125) <= 0.03, (layer, f)


def test_extreme_fractions_and_monotonicity():
    model = _model()
    tokens = _tokens(B=4, T=64)
    calibrate_thresholds(model, tokens, 0.0)
    assert all(f == 0.0 for f in measure_routed_fraction(model, tokens).values())
    calibrate_thresholds(model, tokens, 1.0)
    assert all(f == 1.0 for f in measure_routed_fraction(model, tokens).values())
    lo = calibrate_thresholds(model, tokens, 0.1)
    hi = calibrate_thresholds(model, tokens, 0.6)
    first = model.config.routed_layers[0]  # its input does not depend on other thresholds
    assert hi[first] < lo[first]


def test_threshold_is_saved_in_the_state_dict():
    model = _model()
    tokens = _tokens()
    th = calibrate_thresholds(model, tokens, 0.125)
    sd = model.state_dict()
    for layer, t in th.items():
        assert float(sd[f"blocks.{layer}.router.threshold"]) == pytest.approx(t)
    fresh = _model()
    fresh.load_state_dict(sd)
    assert get_thresholds(fresh) == pytest.approx(th)
    assert measure_routed_fraction(fresh, tokens) == measure_routed_fraction(model, tokens)


def test_set_thresholds_and_errors():
    model = _model()
    set_thresholds(model, 0.25)
    assert set(get_thresholds(model).values()) == {0.25}
    set_thresholds(model, {1: -1.0})
    assert get_thresholds(model)[1] == -1.0 and get_thresholds(model)[3] == 0.25
    with pytest.raises(ValueError, match="layer 0 is not a routed layer"):
        set_thresholds(model, {0: 1.0})
    with pytest.raises(ValueError, match="NaN"):
        set_thresholds(model, float("nan"))
    with pytest.raises(ValueError, match="target_fraction=1.5"):
        calibrate_thresholds(model, _tokens(), 1.5)
    with pytest.raises(ValueError, match=r"token id \d+ outside the vocabulary \[0, 256\)"):
        calibrate_thresholds(model, _tokens() + 300, 0.5)
    with pytest.raises(ValueError, match="router 'random'"):
        calibrate_thresholds(_model(router="random"), _tokens(), 0.5)
    with pytest.raises(ValueError, match="no routed blocks.*nothing to calibrate"):  # never a silent no-op
        calibrate_thresholds(_model(router="none"), _tokens(), 0.5)


def test_sweep_knob_reports_speed_and_quality_and_restores_thresholds():
    model = _model()
    set_thresholds(model, 0.01)
    before = get_thresholds(model)
    val = _tokens(B=4, T=65, seed=1)
    rows = sweep_knob(model, val, [0.5, 0.125], prompt_len=16, new_tokens=8)
    assert [r["fraction"] for r in rows] == [0.5, 0.125]
    for r in rows:
        assert set(r) >= {"fraction", "routed_fraction", "val_loss", "decode_tokens_per_s"}
        assert abs(r["routed_fraction"] - r["fraction"]) <= 0.03
        assert r["decode_tokens_per_s"] > 0  # a timing: only its sign is certain
    assert rows[0]["routed_fraction"] > rows[1]["routed_fraction"]
    assert get_thresholds(model) == before
    for r in rows:  # each row's loss is the causal loss at the thresholds it reports
        set_thresholds(model, r["thresholds"])
        assert r["val_loss"] == pytest.approx(evaluate_lm(model, window_batches(model, val), routing="causal").loss)
    set_thresholds(model, before)
    with torch.no_grad():
        ref = float(model(val[:, :-1], targets_BT=val[:, 1:], routing="causal").lm_loss)
    assert evaluate_lm(model, window_batches(model, val), routing="causal").loss == pytest.approx(ref)


def test_causal_flop_fraction_counts_the_tokens_each_routed_layer_ran():
    from modlm.flops import causal_forward_flops, flops
    from modlm.inference.calibrate import causal_flop_fraction
    from modlm.model.block import route_mask

    model, x = _model(), _tokens(B=2, T=64)
    calibrate_thresholds(model, x, 0.25)
    with torch.no_grad():  # what the early-exit analysis computed by hand for a MoD model
        out = model(x, routing="causal")
    layer_tokens = {i: route_mask(r, 64).sum(1).tolist() for i, r in out.routes.items()}
    ref = causal_forward_flops(model.config, layer_tokens, 64) / flops(model.config.dense_twin(), 64).forward
    assert causal_flop_fraction(model, x) == ref < 1
