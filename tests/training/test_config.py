"""TrainConfig: validation with one-line errors naming the field, dict round trip, the learning-rate
schedule, random-stream seeds, and command-line flags to config."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest

from modlm.training.config import DTYPES, TrainConfig, add_train_args, lr_at, stream_seed, train_config_from_args
from modlm.training.trainer import main

# --------------------------------------------------------------------------------------------
# TrainConfig
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("model", "huge"),
        ("batch_size", 0),
        ("batch_size", 2.0),
        ("seq_len", 0),
        ("seq_len", 4096),
        ("grad_accum", 0),
        ("max_steps", 0),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("min_lr", 1.0),
        ("min_lr", -1e-4),
        ("warmup_steps", -1),
        ("warmup_steps", 10**6),
        ("weight_decay", -0.1),
        ("beta1", 1.0),
        ("beta2", -0.1),
        ("grad_clip", -1.0),
        ("eval_interval", 0),
        ("eval_batches", 0),
        ("ckpt_interval", 0),
        ("log_interval", 0),
        ("seed", -1),
        ("seed", True),
        ("device", "tpu"),
        ("device", "cuda:x"),
        ("dtype", "fp16"),
        ("max_time_s", 0),
        ("compile", "yes"),
        ("val_fraction", 1.0),
        ("out_dir", ""),
        ("model_overrides", {"d_modle": 64}),
    ],
)
def test_bad_train_config_raises_one_line_value_error(field, value):
    with pytest.raises(ValueError) as err:
        TrainConfig(**{field: value})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"TrainConfig.{field}=")


def test_model_overrides_are_validated_by_model_config():
    with pytest.raises(ValueError, match=r"ModelConfig\.capacity=2"):
        TrainConfig(model="tiny", model_overrides={"capacity": 2})
    cfg = TrainConfig(model="tiny-dense", seq_len=64, model_overrides={"d_model": 32, "n_heads": 2})
    mcfg = cfg.model_config()
    assert (mcfg.router, mcfg.d_model, mcfg.name) == ("none", 32, "tiny-dense")


def test_train_config_dict_round_trip():
    cfg = TrainConfig(model="tiny", seq_len=64, model_overrides={"router": "random"}, max_time_s=5.0)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        TrainConfig.from_dict({"bogus": 1})
    # more_steps is recorded only when given (so records older than it still compare equal).
    assert "more_steps" not in cfg.to_dict()
    extend = dataclasses.replace(cfg, more_steps=100)
    assert extend.to_dict()["more_steps"] == 100 and TrainConfig.from_dict(extend.to_dict()) == extend


# --------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------


def test_lr_schedule_warmup_peak_cosine_end():
    cfg = TrainConfig(model="tiny", seq_len=32, lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4)  # never 0: step 0 already learns
    assert lr_at(4, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)  # end of warmup
    assert lr_at(10, cfg) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(60, cfg) == pytest.approx(0.5 * (1e-3 + 1e-4))  # half-way down the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)
    decay = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert min(decay) >= 1e-4


def test_lr_schedule_without_warmup():
    cfg = TrainConfig(model="tiny", seq_len=32, lr=2e-3, min_lr=0.0, warmup_steps=0, max_steps=4)
    assert [lr_at(s, cfg) for s in range(5)] == pytest.approx(
        [2e-3 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(5)]
    )


def test_lr_schedule_of_a_later_stretch_starts_at_its_own_step():
    """A --more-steps stretch [start, max_steps) is the first stretch's schedule shifted to start."""
    first = TrainConfig(model="tiny", seq_len=32, lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    later = TrainConfig(model="tiny", seq_len=32, lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=1110)
    assert [lr_at(s, later, start=1000) for s in range(1000, 1115)] == [lr_at(s, first) for s in range(115)]
    assert lr_at(999, later, start=1000) == lr_at(1000, later, start=1000) > 0  # never below the first step's


def test_stream_seeds_are_fixed_and_distinct_per_rank_and_stream():
    seeds = {stream_seed(0, rank, stream) for rank in (0, 1) for stream in ("data", "torch", "eval")}
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)
    assert stream_seed(0, 1, "data") == stream_seed(0, 1, "data") != stream_seed(1, 1, "data")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def test_cli_flags_cover_train_config_and_parse():
    parser = add_train_args(argparse.ArgumentParser())
    dests = {a.dest for a in parser._actions}
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"model_overrides"}
    assert fields <= dests and {"resume", "progress", "router", "capacity", "model_arg"} <= dests
    args = parser.parse_args(
        [
            "--model",
            "tiny",
            "--router",
            "random",
            "--capacity",
            "0.25",
            "--model-arg",
            "d_model=32",
            "--model-arg",
            "n_heads=2",
            "--model-arg",
            "n_kv_heads=null",
            "--seq-len",
            "64",
            "--max-time-s",
            "30",
            "--compile",
            "--no-progress",
            "--resume",
            "--data",
            "x",
        ]
    )
    cfg = train_config_from_args(args)
    assert cfg.model_overrides == {
        "d_model": 32,
        "n_heads": 2,
        "n_kv_heads": None,
        "router": "random",
        "capacity": 0.25,
    }
    assert (cfg.seq_len, cfg.max_time_s, cfg.compile, cfg.data) == (64, 30.0, True, "x")
    assert args.resume and not args.progress
    defaults = train_config_from_args(add_train_args(argparse.ArgumentParser()).parse_args([]))
    assert defaults == TrainConfig()


def test_cli_rejects_bad_values_in_one_line(capsys):
    for argv, fragment in (
        (["--batch-size", "0"], "TrainConfig.batch_size=0 is invalid"),
        (["--model-arg", "no_equals_sign"], "KEY=VALUE"),
    ):
        assert main(["--model", "tiny", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("python -m modlm.training: error: ") and fragment in err[0]


def test_every_field_is_checked_against_its_declared_type():
    """Each field refuses a value of another type (a bool where an int is declared, a string where a
    number is) with one line naming it: no field can be added without the check."""
    for f in dataclasses.fields(TrainConfig):
        for wrong in (object(), [1], True if f.type != "bool" else 1):
            with pytest.raises(ValueError) as err:
                TrainConfig(**{f.name: wrong})
            msg = str(err.value)
            assert "\n" not in msg and msg.startswith(f"TrainConfig.{f.name}="), msg


@pytest.mark.parametrize(
    "field,value",
    [("lr", "1e-3"), ("lr", float("inf")), ("max_time_s", float("nan")), ("max_steps", 2**63), ("data", "")],
)
def test_numbers_are_finite_and_counts_bounded(field, value):
    with pytest.raises(ValueError, match=rf"^TrainConfig\.{field}="):
        TrainConfig(**{field: value})


def _parse(*argv: str) -> TrainConfig:
    return train_config_from_args(
        add_train_args(argparse.ArgumentParser()).parse_args(["--model", "tiny", "--seq-len", "64", *argv])
    )


@pytest.mark.parametrize("text", ["false", "False", "no", "0", "OFF"])
def test_model_arg_reads_bools_by_the_field_type(text):
    from modlm.model.transformer import MoDTransformer

    cfg = _parse("--model-arg", f"tie_embeddings={text}", "--model-arg", "d_model=64")
    assert cfg.model_overrides == {"tie_embeddings": False, "d_model": 64}
    model = MoDTransformer(cfg.model_config())
    assert model.lm_head.weight is not model.tok_emb.weight  # untied: two tensors
    assert _parse("--model-arg", "tie_embeddings=yes").model_overrides == {"tie_embeddings": True}


def test_model_arg_reads_tuples_and_none():
    cfg = _parse("--model-arg", "layer_types=dense,routed,routed,dense", "--model-arg", "d_mlp=none")
    assert cfg.model_overrides == {"layer_types": ("dense", "routed", "routed", "dense"), "d_mlp": None}
    assert cfg.model_config().routed_layers == (1, 2)


@pytest.mark.parametrize(
    "item,fragment",
    [
        ("rope_base=x", "rope_base='x'"),
        ("d_model={1,2", "d_model='{1,2'"),
        ("d_model=64.0", "d_model='64.0'"),
        ("tie_embeddings=maybe", "tie_embeddings='maybe'"),
        ("capacity=nan", "capacity='nan'"),
        ("d_modle=64", "d_modle='64'"),
    ],
)
def test_bad_model_arg_is_one_line_naming_key_and_value(item, fragment, capsys):
    with pytest.raises(ValueError) as err:
        _parse("--model-arg", item)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"--model-arg {fragment} is invalid")
    assert main(["--model", "tiny", "--model-arg", item]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and fragment in err_lines[0]


def test_flags_are_the_fields_with_their_types_defaults_and_shown_defaults():
    """Each TrainConfig field is a flag (its dest, type and default come from the field), and every
    flag's help shows its default; --threads is modlm.devices' one flag, with its default."""
    from modlm.devices import THREADS_DEFAULT

    parser = add_train_args(argparse.ArgumentParser())
    actions = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model_overrides":
            continue
        action = actions[f.name]
        assert action.option_strings == ["--" + f.name.replace("_", "-")]
        assert action.default == f.default, f.name
    assert actions["lr"].type is float and actions["seq_len"].type is int and actions["data"].type is str
    assert actions["compile"].nargs == 0 and actions["dtype"].choices == DTYPES
    assert TrainConfig.threads == THREADS_DEFAULT
    for action in parser._actions:
        if action.dest not in ("help", "progress"):  # --no-progress says when the bar shows
            assert "default" in action.help, action.dest


def test_threads_policy_words():
    with pytest.raises(ValueError, match=r"^TrainConfig\.threads=-1 is invalid: must be >= 1 \(or 0 for torch"):
        TrainConfig(model="tiny", threads=-1)
    assert TrainConfig(model="tiny", threads=0).threads == 0
