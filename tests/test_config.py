import json

import pytest

from modlm.config import PRESETS, ModelConfig, preset_names


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_validates(name):
    cfg = ModelConfig.from_name(name)
    assert cfg.name == name
    if name.endswith("-dense"):
        assert cfg.router == "none" and cfg.routed_layers == ()
        assert set(cfg.layer_types) == {"dense"}
    elif cfg.router == "none":  # MoE, integrated MoDE, early exit: one kind in every layer
        assert cfg.routed_layers == () and set(cfg.layer_types) == {cfg.block_kind} != {"dense"}
    else:
        assert cfg.routed_layers == tuple(range(1, cfg.n_layers, 2))  # every other block, from the second


@pytest.mark.parametrize(
    "field,value,fragment",
    [
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
    ],
)
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


def test_replace_recomputes_derived_fields_unless_given():
    # The bug this guards: replace() kept d_mlp=704 and n_kv_heads=8 of the 256-wide model.
    cfg = ModelConfig(d_model=256).replace(d_model=512, n_heads=16)
    assert cfg == ModelConfig(d_model=512, n_heads=16)
    assert cfg.d_mlp == 1408 and cfg.n_kv_heads == 16
    # Given values stay given: an explicit d_mlp survives a change of width.
    pinned = ModelConfig(d_model=256, d_mlp=512).replace(d_model=512, n_heads=16)
    assert pinned.d_mlp == 512 and pinned.n_kv_heads == 16
    # layer_types follows route_every when derived...
    assert ModelConfig.from_name("tiny").replace(route_every=1, route_start=0).routed_layers == (0, 1, 2, 3)
    # ...and a config read back from JSON behaves as the one written.
    back = ModelConfig.from_dict(json.loads(json.dumps(ModelConfig(d_model=256).to_dict())))
    assert back.replace(d_model=512, n_heads=16) == ModelConfig(d_model=512, n_heads=16)


def test_a_checkpoint_config_without_derived_entries_keeps_its_values():
    d = ModelConfig.from_name("tiny").to_dict()
    d.pop("derived")
    d.pop("layer_types")  # written before layer_types existed
    cfg = ModelConfig.from_dict(d)
    assert cfg.d_mlp == 192 and cfg.layer_types == ("dense", "routed", "dense", "routed")


def test_layer_types_explicit_and_validated():
    cfg = ModelConfig.from_name("tiny", layer_types=["routed", "dense", "routed", "routed"])
    assert cfg.layer_types == ("routed", "dense", "routed", "routed") and cfg.routed_layers == (0, 2, 3)
    assert cfg.dense_twin().layer_types == ("dense",) * 4 and cfg.dense_twin().routed_layers == ()
    assert ModelConfig.from_name("tiny-dense").layer_types == ("dense",) * 4
    for bad, fragment in [(["dense"] * 3, "layer_types"), (["dense", "banana", "dense", "dense"], "layer_types")]:
        with pytest.raises(ValueError, match=fragment) as e:
            ModelConfig.from_name("tiny", layer_types=bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="router='none'"):
        ModelConfig.from_name("tiny", router="none", layer_types=["dense", "routed", "dense", "dense"])


def test_config_module_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, modlm, modlm.config, modlm.flops, modlm.spec.routers, modlm.spec.kinds, modlm.spec.roles; "
        "modlm.config.ModelConfig.from_name('small').replace(d_model=128); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_parse_assignments_reads_values_by_declared_type():
    from modlm.spec.fields import parse_assignments

    items = ["tie_embeddings=False", "d_model=64", "rope_base=5e3", "n_kv_heads=null", "layer_types=dense, routed"]
    assert parse_assignments(items, into=ModelConfig) == {
        "tie_embeddings": False,
        "d_model": 64,
        "rope_base": 5000.0,
        "n_kv_heads": None,
        "layer_types": ("dense", "routed"),
    }
    assert parse_assignments(["router=none", 'router="random"'], into=ModelConfig) == {"router": "random"}
    # Without a target the values are JSON where they parse, else strings (as always).
    assert parse_assignments(["a=1", "b=x", "c=false"]) == {"a": 1, "b": "x", "c": False}
    with pytest.raises(ValueError, match=r"^--flag d_model='1\.5' is invalid: ModelConfig\.d_model must be an int$"):
        parse_assignments(["d_model=1.5"], "--flag", into=ModelConfig)
    with pytest.raises(ValueError, match=r"has no field 'wings'; known: name, vocab_size, d_model"):
        parse_assignments(["wings=2"], into=ModelConfig)


def test_field_flags_read_by_type_and_say_a_parse_error_in_one_line(capsys):
    from dataclasses import dataclass

    from modlm.errors import ArgumentParser
    from modlm.spec.fields import add_field_flags, flag, flag_values

    def read_pair(text: str) -> tuple[int, int]:
        a, sep, b = text.partition(",")
        if not sep:
            raise ValueError(f"--pair {text!r} is invalid: give two ints, e.g. 1,2")
        return int(a), int(b)

    @dataclass
    class Opts:
        steps: int = flag(3, None, "steps")
        fast: bool = flag(False, None, "go fast")
        pair: tuple[int, int] | None = flag(None, None, "two ints", shown="none", type=read_pair)
        hidden: int = 7  # no flag

    p = ArgumentParser(prog="x")
    add_field_flags(Opts, p)
    args = p.parse_args(["--steps", "5", "--fast", "--pair", "1,2"])
    assert Opts(**flag_values(Opts, args)) == Opts(steps=5, fast=True, pair=(1, 2))
    assert "(default: 3)" in p.format_help() and "(default: none)" in p.format_help()
    assert "--hidden" not in p.format_help()
    with pytest.raises(SystemExit):
        p.parse_args(["--pair", "12"])
    assert "--pair '12' is invalid: give two ints" in capsys.readouterr().err  # the parser's own message
