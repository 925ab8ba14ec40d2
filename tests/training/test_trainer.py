"""Training loop: metrics and checkpoints of a run, exact resume (in-process and after SIGKILL),
and DDP under torchrun on CPU."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modlm.training.checkpoint import load_checkpoint, read_checkpoint_config
from modlm.training.config import TrainConfig
from modlm.training.trainer import STEP_DELAY_ENV, main, train

SUBPROCESS_TIMEOUT = 240  # generous: a busy 2-core CI box runs these several times slower


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A folder of 8 small text documents (about 28 KB): enough for seq_len 32 batches."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = (
        "the of and to in a is that for it as was with be by on not he this are or his from at "
        "which but have an they you were her she there one all we their routing depth mixture"
    ).split()
    for i in range(8):
        paras = [" ".join(rng.choice(words) for _ in range(60)).capitalize() + "." for _ in range(10)]
        (root / f"doc{i}.txt").write_text("\n\n".join(paras))
    return root


def _cfg(corpus: Path, out_dir: Path, **kw) -> TrainConfig:
    base = dict(
        model="tiny",
        data=str(corpus),
        cache_dir=str(out_dir.parent / "cache"),
        out_dir=str(out_dir),
        batch_size=2,
        seq_len=32,
        max_steps=6,
        warmup_steps=2,
        lr=3e-3,
        min_lr=3e-4,
        eval_interval=3,
        eval_batches=2,
        ckpt_interval=3,
        log_interval=2,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


def _events(out_dir: Path, kind: str | None = None) -> list[dict]:
    recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if kind is None or r["event"] == kind]


def _final_files(out_dir: Path) -> dict[str, bytes]:
    ck = out_dir / "checkpoints" / "latest"
    return {f: (ck / f).read_bytes() for f in ("model.safetensors", "optimizer.safetensors", "rng.safetensors")}


def _assert_same_weights(a: Path, b: Path) -> None:
    wa = load_file(str(a / "checkpoints" / "latest" / "model.safetensors"))
    wb = load_file(str(b / "checkpoints" / "latest" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"
    assert _final_files(a) == _final_files(b)  # optimizer and RNG state too, byte for byte


# --------------------------------------------------------------------------------------------
# In-process training
# --------------------------------------------------------------------------------------------


def test_train_writes_metrics_and_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    summary = train(_cfg(corpus, out), progress=False)
    printed = capsys.readouterr().out
    assert "FLOPs/step" in printed and "params" in printed and "causal routing" in printed
    assert summary["step"] == 6 and summary["stop_reason"] == "max_steps"
    assert summary["tokens_seen"] == 6 * 2 * 32
    for key in ("val_loss", "val_bpb", "val_loss_causal", "val_bpb_causal", "train_loss"):
        assert math.isfinite(summary[key]), key
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / math.log(2))

    events = _events(out)
    assert events[0]["event"] == "start" and events[-1]["event"] == "end"
    assert [e["step"] for e in events if e["event"] == "train"] == [2, 4, 6]
    assert [e["step"] for e in events if e["event"] == "eval"] == [3, 6]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [3, 6]
    train_ev = _events(out, "train")[-1]
    assert {"loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s"} <= set(train_ev)
    assert any(k.endswith("/pred_acc") for k in train_ev["router"])
    assert 0 < _events(out, "eval")[-1]["causal_routed_frac"] <= 1

    model, mcfg, state = load_checkpoint(out)
    assert state["step"] == 6 and mcfg.name == "tiny" and state["train"]["max_steps"] == 6
    assert set(state["rng"]) == {"rank0.torch.cpu", "rank0.generator.data"}

    # Never silently overwrite a run; resuming a finished run trains nothing more.
    with pytest.raises(FileExistsError, match="--resume"):
        train(_cfg(corpus, out), progress=False)
    again = train(_cfg(corpus, out), resume=True, progress=False)
    assert again["step"] == 6 and again["val_loss"] == summary["val_loss"]
    assert len(_events(out, "train")) == 3


def test_stop_on_time_budget_then_resume_is_bit_exact(corpus, tmp_path):
    """Learned router + grad accumulation: stopping (max_time_s) and resuming == one straight run."""
    kw = dict(max_steps=8, grad_accum=2, ckpt_interval=4, log_interval=2, eval_interval=4)
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(_cfg(corpus, straight, **kw), progress=False)
    first = train(_cfg(corpus, split, max_time_s=1e-6, **kw), progress=False)
    assert first["stop_reason"] == "max_time" and first["step"] == 1
    assert read_checkpoint_config(split)["step"] == 1
    second = train(_cfg(corpus, split, **kw), resume=True, progress=False)
    assert second["step"] == 8 and second["resumed_from"] == 1
    _assert_same_weights(straight, split)


# --------------------------------------------------------------------------------------------
# Subprocesses: SIGKILL + resume, torchrun DDP
# --------------------------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _cli_args(corpus: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
        "--model",
        "tiny",
        "--data",
        str(corpus),
        "--cache-dir",
        str(out_dir.parent / "cache"),
        "--out-dir",
        str(out_dir),
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--lr",
        "3e-3",
        "--min-lr",
        "3e-4",
        "--warmup-steps",
        "2",
        "--eval-batches",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def _train_events(out_dir: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in _events(out_dir, "train")]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(corpus, tmp_path):
    """Random router (draws from the global torch RNG) + grad accumulation: a `python -m modlm.training`
    process SIGKILLed between checkpoints, then `--resume`d, ends bit-identical to a straight run."""
    flags = dict(router="random", grad_accum=2, max_steps=12, ckpt_interval=4, log_interval=2, eval_interval=6)
    args = [a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    victim = subprocess.Popen(
        [sys.executable, "-m", "modlm.training.trainer", *_cli_args(corpus, killed, *args)],
        env=_env(**{STEP_DELAY_ENV: "0.15"}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Kill between checkpoints: after the step-6 log line, i.e. past the step-4 checkpoint.
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while time.monotonic() < deadline and victim.poll() is None:
            if (killed / "metrics.jsonl").exists() and any(s >= 6 for s, _ in _safe_train_events(killed)):
                break
            time.sleep(0.02)
        assert victim.poll() is None, "the run finished or died before it could be killed"
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    ckpt_step = read_checkpoint_config(killed)["step"]
    assert 4 <= ckpt_step < 12
    assert any(s > ckpt_step for s, _ in _train_events(killed))  # lines the resume must drop

    # The resume and the reference run go through the same entry point in this process (one
    # thread, like the subprocess): two interpreter starts fewer on a slow CI box.
    assert main(_cli_args(corpus, killed, *args, "--resume")) == 0
    assert main(_cli_args(corpus, straight, *args)) == 0
    _assert_same_weights(straight, killed)
    assert _train_events(killed) == _train_events(straight)  # no duplicated lines, same losses
    assert [(e["step"], e["resumed"]) for e in _events(killed, "start")] == [(0, False), (ckpt_step, True)]


def _safe_train_events(out_dir: Path) -> list[tuple[int, float]]:
    try:
        return _train_events(out_dir)
    except (json.JSONDecodeError, OSError):  # a line being written right now
        return []


@pytest.mark.slow
def test_torchrun_ddp_two_processes_on_cpu(corpus, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        "-m",
        "modlm.training.trainer",
        *_cli_args(
            corpus,
            out,
            "--grad-accum",
            "2",
            "--max-steps",
            "4",
            "--ckpt-interval",
            "2",
            "--log-interval",
            "2",
            "--eval-interval",
            "4",
        ),
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "parameters identical on all 2 ranks" in proc.stdout
    end = _events(out, "end")
    assert len(end) == 1  # only rank 0 writes
    assert end[0]["ddp_params_in_sync"] is True and end[0]["world_size"] == 2
    assert end[0]["tokens_seen"] == 4 * 2 * 2 * 2 * 32  # steps x batch x accum x ranks x seq_len
    assert [e["step"] for e in _events(out, "train")] == [2, 4]

    model, _, state = load_checkpoint(out)
    assert state["step"] == 4 and state["extra"]["world_size"] == 2
    assert {"rank0.generator.data", "rank1.generator.data", "rank0.torch.cpu", "rank1.torch.cpu"} == set(state["rng"])
    # Each rank drew its own batches.
    assert not torch.equal(state["rng"]["rank0.generator.data"], state["rng"]["rank1.generator.data"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_training_with_a_hugging_face_tokenizer_end_to_end(corpus, tmp_path, bpe_tokenizer_file, capsys):
    from modlm.cli import main as cli_main
    from modlm.training.checkpoint import load_model, load_tokenizer_from_checkpoint
    from modlm.training.tokenizers import load_tokenizer

    tok = load_tokenizer(str(bpe_tokenizer_file))
    cfg = _cfg(corpus, tmp_path / "bpe", tokenizer=str(bpe_tokenizer_file), max_steps=3)
    assert cfg.model_config().vocab_size == tok.vocab_size  # the vocabulary follows the tokenizer
    summary = train(cfg, progress=False)
    assert summary["step"] == 3 and math.isfinite(summary["val_loss"])
    ckpt = tmp_path / "bpe" / "checkpoints" / "latest"
    assert load_model(ckpt).config.vocab_size == tok.vocab_size
    assert load_tokenizer_from_checkpoint(ckpt).name == tok.name  # the checkpoint carries its tokenizer
    capsys.readouterr()
    assert (
        cli_main(
            [
                "generate",
                "--ckpt",
                str(tmp_path / "bpe"),
                "--prompt",
                "the depth",
                "--max-new-tokens",
                "5",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("the depth")
    with pytest.raises(ValueError, match="tokenizer"):
        _cfg(corpus, tmp_path / "x", tokenizer=str(tmp_path / "missing.json"))
