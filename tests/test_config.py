import json

import pytest

from modlm.config import PRESETS, ModelConfig, preset_names


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_validates(name):
    cfg = ModelConfig.from_name(name)
    assert cfg.name == name
    if name.endswith("-dense"):
        assert cfg.router == "none" and cfg.routed_layers == ()
    else:
        assert cfg.routed_layers == tuple(range(1, cfg.n_layers, 2))  # every other block, from the second


@pytest.mark.parametrize("field,value,fragment", [
    ("capacity", 0.0, "capacity=0.0"),
    ("capacity", 1.5, "capacity=1.5"),
    ("router", "banana", "router='banana'"),
    ("causal_routing", "oracle", "causal_routing='oracle'"),
    ("n_heads", 7, "n_heads=7"),
    ("n_kv_heads", 3, "n_kv_heads=3"),
    ("route_every", 0, "route_every=0"),
    ("route_start", 99, "route_start=99"),
    ("d_model", -1, "d_model=-1"),
    ("aux_loss_weight", -0.1, "aux_loss_weight=-0.1"),
])
def test_bad_values_give_one_line_error_naming_field_and_value(field, value, fragment):
    with pytest.raises(ValueError) as e:
        ModelConfig.from_name("tiny", **{field: value})
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        ModelConfig.from_name("huge")
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({"d_model": 64, "wings": 2})


def test_json_round_trip(tmp_path):
    cfg = ModelConfig.from_name("tiny", capacity=0.25, causal_routing="both")
    cfg.to_json(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path) == cfg
    (tmp_path / "wrapped.json").write_text(json.dumps({"model": cfg.to_dict()}))
    assert ModelConfig.from_json(tmp_path / "wrapped.json") == cfg


def test_dense_twin_and_routed_layers():
    cfg = ModelConfig.from_name("small")
    twin = cfg.dense_twin()
    assert twin.router == "none" and twin.d_model == cfg.d_model and twin.n_layers == cfg.n_layers
    assert ModelConfig.from_name("tiny", route_every=1, route_start=0).routed_layers == (0, 1, 2, 3)
    assert set(PRESETS) >= {"tiny", "small"}
