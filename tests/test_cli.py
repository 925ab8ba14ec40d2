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


def test_generate_from_a_checkpoint_streams_and_traces(tmp_path, capsys):
    import torch

    from modlm import ModelConfig, MoDTransformer
    from modlm.training.checkpoint import save_checkpoint

    cfg = ModelConfig.from_name("tiny")
    torch.manual_seed(0)
    model = MoDTransformer(cfg)
    save_checkpoint(tmp_path / "ckpt", model, cfg)
    assert main(["generate", "--ckpt", str(tmp_path / "ckpt"), "--prompt", "Hello", "--max-new-tokens", "8",
                 "--temperature", "0", "--show-routing"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hello")
    assert "L1" in out and "L3" in out and "depth" in out  # the routing table
    # a prompt too long for the context: one line, nothing echoed
    assert main(["generate", "--ckpt", str(tmp_path / "ckpt"), "--prompt", "x" * 100, "--max-new-tokens", "50"]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and "max_seq_len=128" in cap.err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo two\n")
    assert main(["generate", "--ckpt", str(tmp_path / "ckpt"), "--prompts-file", str(prompts),
                 "--max-new-tokens", "4", "--temperature", "0"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [d["prompt"] for d in lines] == ["one", "two two"]
