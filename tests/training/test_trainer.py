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
from modlm.training.config import TrainConfig, lr_at
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


@pytest.mark.slow
# torch's own inductor code still calls torch.jit.script_method; nothing of modlm's.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_training_and_evaluation_match_eager(corpus, tmp_path):
    """--compile (inductor, C++ on CPU) trains and evaluates ``tiny`` to the same losses as eager:
    every logged training loss and both validation losses within rtol 1e-4 (inductor fuses the
    element-wise work, so float32 sums round differently; seen: 1e-7). The learned router's
    top-k is static-shaped, so the compiled graph holds the routing too. A cold compile on CPU
    takes about a minute here (gcc builds each fused kernel once; later runs hit the cache)."""
    kw = dict(max_steps=3, warmup_steps=1, log_interval=1, eval_interval=3, ckpt_interval=3, eval_batches=1)
    eager = train(_cfg(corpus, tmp_path / "eager", **kw), progress=False)
    compiled = train(_cfg(corpus, tmp_path / "compiled", compile=True, **kw), progress=False)
    losses = {
        name: [(e["step"], e["loss"], e["lm_loss"]) for e in _events(tmp_path / name, "train")]
        for name in ("eager", "compiled")
    }
    assert [s for s, _, _ in losses["compiled"]] == [1, 2, 3]
    for (_, loss_c, lm_c), (_, loss_e, lm_e) in zip(losses["compiled"], losses["eager"]):
        assert loss_c == pytest.approx(loss_e, rel=1e-4) and lm_c == pytest.approx(lm_e, rel=1e-4)
    for key in ("val_loss", "val_loss_causal"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4)


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
    streams = {k for k in state["rng"] if ".buffer." not in k}
    assert {"rank0.generator.data", "rank1.generator.data", "rank0.torch.cpu", "rank1.torch.cpu"} == streams
    # Each replica's own buffers too (the predictors' running statistics follow its batches).
    assert {"rank0.buffer.blocks.1.router.predictor.r_mean", "rank1.buffer.blocks.1.router.predictor.r_mean"} <= set(
        state["rng"]
    )
    # Each rank drew its own batches.
    assert not torch.equal(state["rng"]["rank0.generator.data"], state["rng"]["rank1.generator.data"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _torchrun(corpus: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, "-m", "modlm.training.trainer", *_cli_args(corpus, out, *extra)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_torchrun_fsdp_checkpoint_resumes_to_the_weights_of_an_uninterrupted_run(corpus, tmp_path):
    """FSDP2 over 2 gloo ranks with grad accumulation and the causal predictor (whose 0-dim
    parameters stay outside FSDP, and whose running statistics differ per rank): stopped after
    step 1 (the time budget), its gathered safetensors checkpoint resumed under FSDP ends with
    the same weights, optimizer state and random streams, byte for byte, as a straight run."""
    flags = ("--parallel", "fsdp", "--grad-accum", "2", "--max-steps", "4", "--ckpt-interval", "2")
    flags += ("--log-interval", "2", "--eval-interval", "4")
    straight, split = tmp_path / "straight", tmp_path / "split"
    proc = _torchrun(corpus, straight, *flags)
    assert "FSDP check: parameters identical on all 2 ranks" in proc.stdout
    end = _events(straight, "end")[0]
    assert end["parallel"] == "fsdp" and end["world_size"] == 2 and end["ddp_params_in_sync"] is True
    _torchrun(corpus, split, *flags, "--max-time-s", "1e-6")
    assert read_checkpoint_config(split)["step"] == 1
    _torchrun(corpus, split, *flags, "--resume")
    assert read_checkpoint_config(split)["step"] == 4
    _assert_same_weights(straight, split)
    # The checkpoint is the usual single-file format: one process loads it.
    model, _, state = load_checkpoint(split)
    assert state["extra"]["world_size"] == 2 and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_torchrun_ddp_on_a_held_directory_stops_every_rank(corpus, tmp_path):
    """Only rank 0 takes the lock (the run above shows rank 1 never tries); refused, all ranks exit."""
    from modlm.training.lock import RunDirLock

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    with RunDirLock(out):
        proc = subprocess.run(
            [*cmd, "-m", "modlm.training.trainer", *_cli_args(corpus, out, "--max-steps", "2")],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT,
        )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "python -m modlm.training: error:" in line]
    assert len(errors) == 2 and all("in use by another training run" in e or "rank 0 could not" in e for e in errors)
    assert "RunDirLockedError" not in proc.stderr  # the ranks print one line each (torchrun adds its report)
    assert list(out.iterdir()) == []  # nothing written (the holder's lock file went with it)


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


# --------------------------------------------------------------------------------------------
# One run per directory, one line per mistake
# --------------------------------------------------------------------------------------------


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_second_run_on_a_held_directory_is_refused_and_writes_nothing(corpus, tmp_path, capsys):
    from modlm.training.lock import RunDirLock, RunDirLockedError

    out = tmp_path / "run"
    with RunDirLock(out):  # as a first training would hold it
        with pytest.raises(RunDirLockedError, match=f"pid {os.getpid()}"):
            train(_cfg(corpus, out, ckpt_interval=1), progress=False)
        capsys.readouterr()
        assert main(_cli_args(corpus, out, "--ckpt-interval", "1")) == 2
        line = _one_line_error(capsys)
        assert "in use by another training run" in line and str(out) in line
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no checkpoint, no metrics
    assert train(_cfg(corpus, out, max_steps=2), progress=False)["step"] == 2  # free again
    assert not (out / ".lock").exists()


def test_the_sweep_runners_lock_does_not_block_the_run(corpus, tmp_path):
    import fcntl

    from modlm.experiments.sweep import LOCK_FILE

    out = tmp_path / "run"
    out.mkdir()
    with open(out / LOCK_FILE, "w") as sweep_lock:  # what sweep.train_run holds around train()
        fcntl.flock(sweep_lock, fcntl.LOCK_EX)
        assert train(_cfg(corpus, out, max_steps=2), resume=True, progress=False)["step"] == 2


def test_an_out_dir_that_is_a_file_is_one_line_naming_it(corpus, tmp_path, capsys):
    a_file = tmp_path / "out"
    a_file.write_text("")
    with pytest.raises(ValueError, match=r"out_dir=.*out' is invalid: it is a file"):
        train(_cfg(corpus, a_file), progress=False)
    capsys.readouterr()
    assert main(_cli_args(corpus, a_file)) == 2
    assert str(a_file) in _one_line_error(capsys)


def test_running_the_same_command_twice_says_to_resume_before_reading_data(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_cli_args(corpus, out, "--max-steps", "2")) == 0
    capsys.readouterr()
    with pytest.raises(FileExistsError, match="pass --resume to continue it"):
        train(_cfg(tmp_path / "no_such_corpus", out, max_steps=2), progress=False)  # the data is never read
    assert main(_cli_args(corpus, out, "--max-steps", "2")) == 2
    assert "--resume" in _one_line_error(capsys)


def test_a_diverging_run_stops_with_one_line_naming_lr_and_saves_no_diverged_weights(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError) as err:
        train(_cfg(corpus, out, lr=1e30, min_lr=0.0, warmup_steps=0, log_interval=3, ckpt_interval=1), progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "diverged" in msg and "--lr (now 1e+30)" in msg
    step = read_checkpoint_config(out)["step"]
    model, _, _ = load_checkpoint(out)
    assert all(torch.isfinite(p).all() for p in model.parameters()), f"the step-{step} checkpoint is not finite"
    capsys.readouterr()
    assert main(_cli_args(corpus, tmp_path / "run2", "--lr", "1e30", "--warmup-steps", "0", "--max-steps", "6")) == 2
    assert "--lr" in _one_line_error(capsys)


def test_modlm_train_reports_each_mistake_in_one_line(corpus, tmp_path, capsys):
    """Through the `modlm` command's own handler (it reports ValueErrors): each error above is one."""
    from modlm.cli import main as modlm_main

    out = tmp_path / "run"
    args = ["train", *_cli_args(corpus, out, "--max-steps", "2")]
    assert modlm_main(args) == 0
    capsys.readouterr()
    assert modlm_main(args) == 2  # the same command twice
    assert "--resume" in _one_line_error(capsys)
    diverging = ["train", *_cli_args(corpus, tmp_path / "run2", "--lr", "1e30", "--warmup-steps", "0")]
    assert modlm_main([*diverging, "--max-steps", "6"]) == 2
    assert "--lr" in _one_line_error(capsys)
    assert modlm_main(["train", *_cli_args(corpus, out / "metrics.jsonl")]) == 2  # a file as --out-dir
    assert "metrics.jsonl' is invalid: it is a file" in _one_line_error(capsys)


# --------------------------------------------------------------------------------------------
# What a newcomer sees: the plan, the ETA, plain lines off a terminal, the progress legend
# --------------------------------------------------------------------------------------------


def test_off_a_terminal_progress_is_plain_lines_with_plan_eta_and_legend(corpus, tmp_path, capsys):
    train(_cfg(corpus, tmp_path / "run", max_steps=8), progress=True)  # capsys: not a terminal
    out, err = capsys.readouterr()
    assert "\r" not in out + err  # no progress bar redraws
    lines = out.splitlines()
    assert any(line.startswith("  plan: steps 0 -> 8: 8 steps x 64 tokens = 512 tokens") for line in lines)
    legend = next(line for line in lines if line.startswith("  progress:"))
    assert "router_loss = the causal predictor's BCE" in legend and "2 routed blocks" in legend
    assert sum(line.startswith("pace: ") and "5 more steps, about" in line for line in lines) == 1  # after step 3
    steps = [line for line in lines if line.startswith("step ") and "/8 loss" in line]
    assert [s.split()[1] for s in steps] == ["2/8", "4/8", "6/8", "8/8"]
    assert all(" router_loss " in s and " lr " in s for s in steps)
    assert all(" eta " in s for s in steps[1:])  # once the pace is measured
    assert not any(" aux " in line for line in lines)


# --------------------------------------------------------------------------------------------
# --more-steps: run the same command again to train further
# --------------------------------------------------------------------------------------------


def test_more_steps_continues_a_finished_run_with_a_new_warmup_and_cosine(corpus, tmp_path):
    out = tmp_path / "run"
    kw = dict(max_steps=6, warmup_steps=2, more_steps=4)
    first = train(_cfg(corpus, out, **kw), progress=False)  # a fresh run: --more-steps does nothing yet
    assert first["step"] == 6 and first["schedule_start"] == 0
    second = train(_cfg(corpus, out, **kw), progress=False)  # implies --resume
    assert (second["step"], second["resumed_from"], second["schedule_start"]) == (10, 6, 6)
    lrs = {e["step"]: e["lr"] for e in _events(out, "train")}  # the lr of each logged step's last update
    first_cfg, more_cfg = _cfg(corpus, out, max_steps=6, warmup_steps=2), _cfg(corpus, out, max_steps=10)
    assert lrs[6] == pytest.approx(lr_at(5, first_cfg))  # the end of the first cosine
    assert lrs[8] == pytest.approx(3e-3)  # step 7: warmed up again to --lr in 2 steps
    assert lrs[10] == pytest.approx(lr_at(9, more_cfg, start=6)) and lrs[10] < lrs[8]  # down the new cosine
    assert lr_at(9, more_cfg, start=6) > lr_at(10, more_cfg, start=6) == pytest.approx(3e-4)
    assert read_checkpoint_config(out)["train"]["max_steps"] == 10
    assert train(_cfg(corpus, out, **kw), progress=False)["step"] == 14  # and again


def test_more_steps_stopped_early_then_run_again_matches_an_uninterrupted_continuation(corpus, tmp_path):
    kw = dict(max_steps=4, warmup_steps=2, more_steps=4, ckpt_interval=2)
    straight, split = tmp_path / "straight", tmp_path / "split"
    for out in (straight, split):
        train(_cfg(corpus, out, **kw), progress=False)
    assert train(_cfg(corpus, straight, **kw), progress=False)["step"] == 8
    stopped = train(_cfg(corpus, split, max_time_s=1e-6, **kw), progress=False)
    assert stopped["step"] == 5 and stopped["stop_reason"] == "max_time"
    # The same command again finishes the planned stretch (to 8), it does not add 4 more to step 5.
    assert train(_cfg(corpus, split, **kw), progress=False)["step"] == 8
    _assert_same_weights(straight, split)
