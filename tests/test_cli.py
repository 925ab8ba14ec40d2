"""The CLI: thin, explains itself, and fails with one line naming the bad value."""

import json

import pytest

from modlm.cli import main


def _err_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("modlm: error: ")
    return err[0]


def test_flops_reports_mod_and_dense(capsys):
    assert main(["flops", "--model", "small", "--seq-len", "256"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    doc = json.loads(out[-1])
    assert 0.4 < doc["flop_ratio"] < 0.7  # 12.5% every other block: ~0.56 of the blocks
    assert doc["model"]["forward"] < doc["dense"]["forward"]


@pytest.mark.parametrize("argv,fragment", [
    (["train", "--batch-size", "0"], "batch_size=0"),
    (["train", "--capacity", "1.5"], "capacity=1.5"),
    (["train", "--model-arg", "d_model"], "d_model"),
    (["train", "--model", "giant"], "giant"),
    (["generate", "--ckpt", "/nonexistent/ckpt", "--prompt", "hi"], "/nonexistent/ckpt"),
    (["generate", "--ckpt", "/nonexistent/ckpt"], "--prompt"),
    (["flops", "--model-arg", "capacity=0"], "capacity=0"),
])
def test_bad_arguments_give_one_line_errors(capsys, argv, fragment):
    assert main(argv) == 2
    assert fragment in _err_line(capsys)


def test_help_explains_itself(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for word in ("train", "generate", "flops", "examples"):
        assert word in out
