"""Running a sweep: an interrupted sweep (a process killed mid-run) continues where it stopped,
parallel workers record what a sequential sweep does, and changed settings are refused."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modlm.experiments.isoflop import Shape, SweepSettings, plan_sweep
from modlm.experiments.results import RUNS_FILE, read_results
from modlm.experiments.sweep import run_sweep

REPO = Path(__file__).resolve().parents[2]


def _tiny_sweep(tmp_path: Path, make_corpus):
    settings = SweepSettings(
        seq_len=16,
        batch_size=2,
        head_dim=8,
        predictor_hidden=4,
        min_steps=50,
        max_steps=200,
        eval_batches=1,
        ckpts_per_run=6,
        log_points=5,
        data=make_corpus(seed=0, paragraphs=300, words=60),
        cache_dir=str(tmp_path / "cache"),
        device="cpu",
        dtype="fp32",
    )
    runs = plan_sweep([2.5e8], ["dense", "mod"], [Shape(16, 2)], settings)
    return settings, runs


_CHILD = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
from modlm.experiments.isoflop import Shape, SweepSettings, plan_sweep
from modlm.experiments.sweep import run_sweep
settings = SweepSettings(**{settings!r})
runs = plan_sweep([2.5e8], ["dense", "mod"], [Shape(16, 2)], settings)
run_sweep(runs, {results!r}, settings, progress=False)
"""


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_interrupted_sweep_continues_where_it_stopped(tmp_path, make_corpus):
    settings, runs = _tiny_sweep(tmp_path, make_corpus)
    assert len(runs) == 2 and all(r.steps >= 50 for r in runs)
    results = tmp_path / "results"
    first, second = runs
    code = _CHILD.format(repo=str(REPO), settings=dataclasses.asdict(settings), results=str(results))
    env = dict(os.environ, MODLM_TRAIN_STEP_DELAY_S="0.03")  # slow the child down so it can be caught mid-run
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = results / "runs" / second.run_id / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    try:
        # Kill (SIGKILL: no clean-up) once the first run is recorded and the second has a checkpoint.
        while time.monotonic() < deadline and child.poll() is None:
            if len(read_results(results)) == 1 and ckpt.exists():
                break
            time.sleep(0.05)
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    assert set(read_results(results)) == {first.run_id}
    before = read_results(results)[first.run_id]

    res = run_sweep(runs, results, settings, progress=False)
    assert res.complete and res.ran == [second.run_id]  # the finished run is not trained again
    done = read_results(results)
    assert set(done) == {first.run_id, second.run_id}
    assert done[first.run_id] == before
    lines = (results / RUNS_FILE).read_text().splitlines()
    assert len(lines) == 2  # one line per run, appended only when it finished
    starts = [e for e in _events(results / "runs" / second.run_id) if e["event"] == "start"]
    assert starts[-1]["resumed"] and starts[-1]["step"] > 0  # continued from its checkpoint, not from scratch
    assert len([e for e in _events(results / "runs" / first.run_id) if e["event"] == "start"]) == 1
    rec = done[second.run_id]
    assert rec["steps"] == second.steps and rec["val_loss"] is not None and rec["train_curve"][-1][0] == second.steps
    # a third call has nothing to do
    assert run_sweep(runs, results, settings, progress=False).ran == []


@pytest.mark.slow
def test_parallel_workers_record_what_a_sequential_sweep_does(tmp_path, make_corpus):
    # jobs=2 trains each run in a worker process (python -c ..._child_main): same seeds, one
    # thread each, so the same losses as training them one after another in this process.
    settings, runs = _tiny_sweep(tmp_path, make_corpus)
    one = run_sweep(runs, tmp_path / "one", settings, progress=False, jobs=1)
    two = run_sweep(runs, tmp_path / "two", settings, progress=False, jobs=2, threads=1)
    assert one.complete and two.complete and sorted(two.ran) == sorted(r.run_id for r in runs)
    for a, b in zip(one.records, two.records):
        assert a["run_id"] == b["run_id"]
        assert (a["val_loss"], a["train_curve"], a["train"]) == (b["val_loss"], b["train_curve"], b["train"])
    assert read_results(tmp_path / "two").keys() == {r.run_id for r in runs}


def test_changed_settings_are_refused(tmp_path, make_corpus):
    settings, runs = _tiny_sweep(tmp_path, make_corpus)
    runs = runs[:1]
    run_sweep(runs, tmp_path / "r", settings, progress=False)
    other = settings.replace(lr=settings.lr / 2)
    with pytest.raises(ValueError, match="other settings"):
        run_sweep(plan_sweep([2.5e8], ["dense"], [Shape(16, 2)], other), tmp_path / "r", other, progress=False)
    # compiling is how a run executes, not what it trains: an eager folder resumes compiled, nothing retrained
    compiled = settings.replace(compile=True)
    again = plan_sweep([2.5e8], ["dense", "mod"], [Shape(16, 2)], compiled)[:1]
    assert again[0].train_config(compiled, "x").compile is True
    res = run_sweep(again, tmp_path / "r", compiled, progress=False)
    assert res.complete and res.ran == [] and [r["run_id"] for r in res.records] == [runs[0].run_id]
