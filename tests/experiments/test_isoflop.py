"""isoFLOP sweeps: the planner spends each budget, results are appended atomically, an
interrupted sweep (a process killed mid-run) continues where it stopped."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modlm.flops import train_flops
from modlm.experiments.isoflop import (
    DEFAULT_SHAPES, RUNS_FILE, Family, Shape, SweepSettings, append_result, plan_run, plan_sweep, read_results,
    run_sweep,
)

REPO = Path(__file__).resolve().parents[2]



def _shapes(text=DEFAULT_SHAPES):
    return [Shape.parse(s) for s in text.split(",")]


@pytest.mark.parametrize("budget", [1e12, 2.7e12, 5e12, 1.3e13])
def test_planner_hits_each_budget_within_one_percent(budget):
    settings = SweepSettings()
    families = ["dense", "mod", "mod-random", "mod-tc", "mod:capacity=0.5,route_every=1,route_start=0"]
    runs = plan_sweep([budget], families, _shapes(), settings)
    assert {r.family for r in runs} == set(families)  # every family has a grid at this budget
    for r in runs:
        # the FLOPs come from modlm.flops for exactly the model the run trains
        cfg = r.model_config()
        assert r.flops_per_step == train_flops(cfg, settings.seq_len, settings.batch_size)
        assert settings.min_steps <= r.steps <= settings.max_steps
        assert abs(r.train_flops - budget) <= 0.01 * budget, (r.run_id, r.train_flops / budget)
        tc = r.train_config(settings, "/tmp/x")
        assert tc.max_steps == r.steps and tc.model_config() == cfg
    # shapes outside [min_steps, max_steps] are left out of the grid, not squeezed in
    n_all = len(_shapes()) * len(families)
    assert len(runs) <= n_all


def test_planner_refuses_budgets_it_cannot_hit():
    settings = SweepSettings()
    with pytest.raises(ValueError, match="outside \\[min_steps"):
        plan_run(1e9, "dense", Shape(192, 8), settings)  # < 1 step
    with pytest.raises(ValueError, match="no shape of the grid"):
        plan_sweep([1e9], ["dense"], [Shape(192, 8)], settings)
    with pytest.raises(ValueError, match="min_steps"):
        SweepSettings(min_steps=10)  # rounding could miss the budget by > 1%


def test_family_specs():
    fam = Family.parse("mod:capacity=0.25,route_every=1")
    assert fam.model_overrides["capacity"] == 0.25 and fam.model_overrides["router"] == "learned"
    assert "=" not in fam.slug and ":" not in fam.slug
    for bad in ("moe", "mod:capacity", "mod:d_model=64", "mod:nonsense=1"):
        with pytest.raises(ValueError, match="family"):
            Family.parse(bad)


def test_torn_last_line_is_ignored_and_next_append_starts_a_new_line(tmp_path):
    append_result(tmp_path, {"run_id": "a", "val_loss": 1.0})
    with open(tmp_path / RUNS_FILE, "a") as f:
        f.write('{"run_id": "b", "val_lo')  # a crash mid-write
    assert set(read_results(tmp_path)) == {"a"}
    append_result(tmp_path, {"run_id": "c", "val_loss": 3.0})
    assert set(read_results(tmp_path)) == {"a", "c"}


# ------------------------------------------------------------------------------- resume
def _corpus(tmp_path: Path) -> str:
    rng = random.Random(0)
    words = ["the", "of", "depth", "router", "token", "block", "mixture", "model", "a", "is", "and", "compute"]
    paras = [" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(300)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paras))
    return str(path)


def _tiny_sweep(tmp_path: Path):
    settings = SweepSettings(seq_len=16, batch_size=2, head_dim=8, predictor_hidden=4, min_steps=50, max_steps=200,
                             eval_batches=1, ckpts_per_run=6, log_points=5, data=_corpus(tmp_path),
                             cache_dir=str(tmp_path / "cache"), device="cpu", dtype="fp32")
    runs = plan_sweep([2.5e8], ["dense", "mod"], [Shape(16, 2)], settings)
    return settings, runs


_CHILD = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
from modlm.experiments.isoflop import Shape, SweepSettings, plan_sweep, run_sweep
settings = SweepSettings(**{settings!r})
runs = plan_sweep([2.5e8], ["dense", "mod"], [Shape(16, 2)], settings)
run_sweep(runs, {results!r}, settings, progress=False)
"""


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_interrupted_sweep_continues_where_it_stopped(tmp_path):
    import dataclasses

    settings, runs = _tiny_sweep(tmp_path)
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


def test_changed_settings_are_refused(tmp_path):
    settings, runs = _tiny_sweep(tmp_path)
    runs = runs[:1]
    run_sweep(runs, tmp_path / "r", settings, progress=False)
    other = settings.replace(lr=settings.lr / 2)
    with pytest.raises(ValueError, match="other settings"):
        run_sweep(plan_sweep([2.5e8], ["dense"], [Shape(16, 2)], other), tmp_path / "r", other, progress=False)
