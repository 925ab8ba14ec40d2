"""Run files: ``--config run.toml`` under the flags, the resolved ``OUT_DIR/run.toml`` every run
writes and ``--resume`` reads back, and one-line errors naming the key."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pytest

from modlm.spec.fields import field_types
from modlm.training.checkpoint import read_checkpoint_config
from modlm.training.config import TrainConfig, add_train_args, train_config_from_args
from modlm.training.runfile import RESOLVED_FILE, read_run_file, to_toml
from modlm.training.trainer import main


def _parse(*argv: str) -> TrainConfig:
    return train_config_from_args(add_train_args(argparse.ArgumentParser()).parse_args(list(argv)))


def _write(tmp_path: Path, text: str, name: str = "run.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


RUN = """
model = "tiny"
seq_len = 32
batch_size = 2
lr = 2e-3
compile = false
parallel = "none"

[model_overrides]
capacity = 0.25
layer_types = ["dense", "routed", "dense", "routed"]
"""


def test_the_file_sets_what_it_names_and_given_flags_win(tmp_path):
    path = _write(tmp_path, RUN)
    cfg = _parse("--config", path)
    assert (cfg.model, cfg.seq_len, cfg.batch_size, cfg.lr, cfg.parallel) == ("tiny", 32, 2, 2e-3, "none")
    assert cfg.model_overrides == {"capacity": 0.25, "layer_types": ["dense", "routed", "dense", "routed"]}
    assert cfg.max_steps == TrainConfig().max_steps  # not in the file: the default
    # A flag given on the command line beats the file, even when it equals the default.
    cfg = _parse(
        "--config", path, "--lr", "1e-3", "--capacity", "0.5", "--model-arg", "d_model=32", "--model-arg", "n_heads=2"
    )
    assert cfg.lr == 1e-3 and cfg.seq_len == 32
    assert cfg.model_overrides["capacity"] == 0.5 and cfg.model_overrides["d_model"] == 32
    assert cfg.model_overrides["layer_types"] == ["dense", "routed", "dense", "routed"]


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("lrr = 1e-3\n", "unknown key 'lrr'"),
        ('lr = "fast"\n', "lr = 'fast' is invalid: must be a finite number"),
        ("max_steps = 1.5\n", "max_steps = 1.5 is invalid: must be an int"),
        ("[model_overrides]\nwidth = 3\n", "unknown key model_overrides.'width'"),
        ('[model_overrides]\ncapacity = "half"\n', "model_overrides.capacity = 'half' is invalid"),
        ("lr = \n", "is not valid TOML"),
    ],
)
def test_unknown_keys_and_bad_values_are_one_line_naming_the_key(tmp_path, text, fragment, capsys):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError) as err:
        _parse("--config", path)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert main(["--config", path]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0]


def test_ranges_are_checked_by_the_config_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"^TrainConfig\.batch_size=0 is invalid"):
        _parse("--config", _write(tmp_path, 'model = "tiny"\nseq_len = 32\nbatch_size = 0\n'))
    with pytest.raises(ValueError, match="no such file"):
        _parse("--config", str(tmp_path / "missing.toml"))


def test_the_resolved_file_reads_back_to_the_same_config(tmp_path):
    cfg = TrainConfig(
        model="tiny",
        seq_len=64,
        data='odd "name"\\dir',
        model_overrides={"capacity": 0.25, "n_kv_heads": None, "layer_types": ("dense", "routed") * 2},
        max_time_s=30.0,
    )
    path = _write(tmp_path, to_toml(cfg))
    back = read_run_file(path, field_types(TrainConfig))
    assert "max_time_s" not in back  # this invocation's budget, not a setting of the run
    again = _parse("--config", path)
    assert again.data == cfg.data and again.max_time_s is None
    assert again.model_config() == cfg.model_config()
    assert {**again.to_dict(), "max_time_s": 30.0, "model_overrides": {}} == {**cfg.to_dict(), "model_overrides": {}}


def test_resume_reads_the_run_directory_resolved_file(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    words = "the of and to in a is that for it as was with be by on routing depth".split()
    for i in range(4):
        (corpus / f"d{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(3000)))
    out = tmp_path / "run"
    run = RUN.replace(
        'parallel = "none"',
        f'parallel = "none"\nmax_steps = 4\nwarmup_steps = 1\n'
        f'eval_batches = 1\neval_interval = 4\nckpt_interval = 2\nlog_interval = 2\ndevice = "cpu"\n'
        f'data = "{corpus}"\ncache_dir = "{tmp_path / "cache"}"\nout_dir = "{out}"',
    )
    path = _write(tmp_path, run)
    assert main(["--config", path, "--max-time-s", "1e-6", "--no-progress"]) == 0
    assert read_checkpoint_config(out)["step"] == 1
    resolved = read_run_file(out / RESOLVED_FILE, field_types(TrainConfig))
    assert resolved["model"] == "tiny" and resolved["model_overrides"]["capacity"] == 0.25
    assert "max_time_s" not in resolved
    # Only the directory and --resume: the model, sizes and schedule come from OUT_DIR/run.toml.
    assert main(["--out-dir", str(out), "--resume", "--no-progress"]) == 0
    manifest = read_checkpoint_config(out)
    assert manifest["step"] == 4 and manifest["train"]["seq_len"] == 32 and manifest["train"]["lr"] == 2e-3
    assert manifest["model"]["capacity"] == 0.25
