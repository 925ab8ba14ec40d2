"""Run a planned sweep resumably: train every run not yet recorded, one after another or in parallel.

Resume: a restarted sweep skips the runs already in runs.jsonl and continues the others from
their own checkpoints (``modlm.training.trainer.train(..., resume=True)``, which is exact). A run killed
mid-way therefore loses at most 1/``ckpts_per_run`` of its steps. Ctrl-C (or SIGTERM) stops the
running runs at a step boundary with a checkpoint, and the sweep exits; run the same command
again to go on.

Parallel runs: ``jobs > 1`` trains that many runs at once, each in its own process with
``threads`` torch threads (default 1). Tiny models use a second core better as a second run
than as a second thread. A per-run lock file keeps two processes off one run's checkpoint.

The folder it writes is described in ``modlm.experiments.results``; what it trains comes from
``modlm.experiments.isoflop``'s planner, round by round from ``modlm.experiments.study`` (the
adaptive isoFLOP study, and `modlm isoflop`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modlm.experiments.isoflop import (
    PlannedRun,
    SweepSettings,
)
from modlm.experiments.results import (
    RUNS_DIR,
    RUNS_FILE,
    append_result,
    last_step,
    read_results,
    run_record,
    train_settings,
    write_plan,
)

SUMMARY_FILE = "summary.json"
LOCK_FILE = "run.lock"
JOB_FILE = "job.json"

# What a finished run reports: False if it stopped early (Ctrl-C) and is not recorded.
Settle = Callable[["PlannedRun", dict[str, Any]], bool]


@dataclass
class SweepResult:
    """What ``run_sweep`` returns: the records of every finished planned run, in plan order."""

    records: list[dict[str, Any]]
    complete: bool
    ran: list[str] = field(default_factory=list)  # run ids trained (or finished) by this call


def train_run(run: PlannedRun, settings: SweepSettings, run_dir: str | Path) -> dict[str, Any]:
    """Train (or resume) one planned run in ``run_dir``; console output goes to ``run_dir/train.log``.

    Holds an exclusive lock on ``run_dir/run.lock`` while training, so two processes never write
    one run's checkpoint (e.g. a worker orphaned by a killed sweep and the restarted sweep: the
    second waits for the first). Returns ``modlm.training.trainer.train``'s summary, also written to
    ``run_dir/summary.json``.
    """
    import fcntl

    from modlm.training.trainer import train

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = run.train_config(settings, run_dir)
    with open(run_dir / LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another process trains this run
        with open(run_dir / "train.log", "a", encoding="utf-8") as log, contextlib.redirect_stdout(log):
            summary = train(cfg, resume=True, progress=False)
    tmp = run_dir / (SUMMARY_FILE + ".tmp")
    tmp.write_text(json.dumps(summary))
    os.replace(tmp, run_dir / SUMMARY_FILE)
    return summary


def _child_main(job_path: str) -> None:
    """Entry point of a worker process (``jobs > 1``): ``python -c`` runs this on one job file."""
    job = json.loads(Path(job_path).read_text())
    if job.get("threads") is not None:
        import torch

        torch.set_num_threads(job["threads"])
    train_run(PlannedRun.from_dict(job["run"]), SweepSettings(**job["settings"]), job["run_dir"])


def _check_settings(
    runs: Sequence[PlannedRun], finished: dict[str, dict[str, Any]], settings: SweepSettings, results: Path
) -> None:
    """Refuse a results folder whose finished runs were trained with other settings than planned now."""
    for run in runs:
        rec = finished.get(run.run_id)
        if rec is not None:
            # Whether a run is compiled is how it runs, not what it trains (like where it lives).
            want = {k: v for k, v in train_settings(run.train_config(settings, "x")).items() if k != "compile"}
            got = {k: v for k, v in rec.get("train", {}).items() if k != "compile"}
            if got != want:
                diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
                raise ValueError(
                    f"{results / RUNS_FILE} holds run {run.run_id} trained with other settings "
                    f"(differs in {diff}); use another --results-dir"
                )


def run_sweep(
    runs: Sequence[PlannedRun],
    results_dir: str | Path,
    settings: SweepSettings,
    progress: bool = True,
    jobs: int = 1,
    threads: int | None = None,
) -> SweepResult:
    """Train every planned run not yet in ``results_dir/runs.jsonl``; resumable (see module docstring).

    ``jobs == 1``: runs train one after another in this process (``threads``, if given, sets
    torch's CPU threads). ``jobs > 1``: up to ``jobs`` runs train at once, each in its own
    process with ``threads`` threads (default 1). Either way a run's console output goes to
    ``runs/<run_id>/train.log``, and a run that stops early (Ctrl-C, SIGTERM) is not recorded:
    the sweep returns ``complete=False`` and the next call continues it from its checkpoint.
    """
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs={jobs!r} is invalid: must be an int >= 1")
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    write_plan(results, runs, settings)

    finished = read_results(results)
    _check_settings(runs, finished, settings, results)
    todo = [r for r in runs if r.run_id not in finished]
    done_flops = sum(r.train_flops for r in runs if r.run_id in finished)
    bar = _Progress(sum(r.train_flops for r in runs), done_flops, progress, len(runs), len(runs) - len(todo))
    if len(todo) < len(runs):
        bar.write(
            f"isoflop: {len(runs) - len(todo)} of {len(runs)} runs already finished in {results}; {len(todo)} to go"
        )
    ran: list[str] = []

    def settle(run: PlannedRun, summary: dict[str, Any]) -> bool:
        """Record a run that reached its last step; False (and a note) if it stopped early."""
        run_dir = results / RUNS_DIR / run.run_id
        if summary["step"] < run.steps:
            bar.finish_run(run, finished=False)
            bar.write(
                f"isoflop: {run.run_id} stopped at step {summary['step']}/{run.steps} "
                f"({summary['stop_reason']}); run the same command again to continue"
            )
            return False
        rec = run_record(run, run.train_config(settings, run_dir), summary, run_dir, results)
        append_result(results, rec)
        ran.append(run.run_id)
        finished[run.run_id] = rec
        bar.finish_run(run)
        bar.write(
            f"isoflop: {run.run_id}: {run.steps} steps, {run.train_flops:.3g} FLOPs, "
            f"{run.params:,} params -> val loss {rec['val_loss']:.4f} ({rec['val_bpb']:.3f} bpb), "
            f"{rec['elapsed_s']:.0f}s"
        )
        return True

    try:
        if jobs == 1:
            complete = _run_sequential(todo, results, settings, bar, settle)
        else:
            complete = _run_parallel(todo, results, settings, jobs, 1 if threads is None else threads, bar, settle)
    finally:
        bar.close()
    return SweepResult([finished[r.run_id] for r in runs if r.run_id in finished], complete, ran)


def _run_sequential(
    todo: Sequence[PlannedRun], results: Path, settings: SweepSettings, bar: _Progress, settle: Settle
) -> bool:
    """Train the runs one after another in this process; stop at the first that stops early."""
    for run in todo:
        run_dir = results / RUNS_DIR / run.run_id
        bar.watch(run, run_dir)
        if not settle(run, train_run(run, settings, run_dir)):
            return False
    return True


def _run_parallel(
    todo: Sequence[PlannedRun],
    results: Path,
    settings: SweepSettings,
    jobs: int,
    threads: int,
    bar: _Progress,
    settle: Settle,
) -> bool:
    """Up to ``jobs`` worker processes, one per run (``python -c``, so no ``__main__`` guard is
    needed anywhere). Ctrl-C reaches the workers too (same process group): each stops at a step
    boundary with a checkpoint; we wait for them, record nothing unfinished, and return False."""
    workers = _Workers(todo, results, settings, threads, bar, settle)

    def on_term(signum, frame):  # SIGTERM stops the sweep as Ctrl-C does (train() treats both alike)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
    try:
        while workers.queue or workers.active:
            while workers.queue and workers.complete and len(workers.active) < jobs:
                workers.start_next()
            workers.reap(block=False)
            if not workers.complete:
                workers.queue.clear()  # a run failed or was stopped: let the running ones finish, start nothing new
            if workers.active:
                time.sleep(0.2)
    except KeyboardInterrupt:
        workers.interrupt()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return workers.complete


class _Workers:
    """The worker processes of a parallel sweep: started one per run from ``queue``, reaped as
    they end (a run is settled from its summary.json); ``complete`` turns False at the first run
    that failed or stopped early."""

    def __init__(
        self,
        todo: Sequence[PlannedRun],
        results: Path,
        settings: SweepSettings,
        threads: int,
        bar: _Progress,
        settle: Settle,
    ):
        self.queue = list(todo)
        self.active: dict[str, tuple[subprocess.Popen, PlannedRun, Any]] = {}  # run id -> (process, run, log)
        self.complete = True
        self.results, self.settings, self.threads, self.bar, self.settle = results, settings, threads, bar, settle

    def start_next(self) -> None:
        """Start the next queued run in a worker process (its job file says what to train)."""
        run = self.queue.pop(0)
        run_dir = self.results / RUNS_DIR / run.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / SUMMARY_FILE).unlink(missing_ok=True)
        job = run_dir / JOB_FILE
        job.write_text(
            json.dumps(
                {
                    "run": run.as_dict(),
                    "settings": dataclasses.asdict(self.settings),
                    "run_dir": str(run_dir),
                    "threads": self.threads,
                }
            )
        )
        log = open(run_dir / "worker.log", "ab")
        code = f"from modlm.experiments.sweep import _child_main; _child_main({str(job)!r})"
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        self.active[run.run_id] = (proc, run, log)
        self.bar.watch(run, run_dir)

    def reap(self, block: bool) -> None:
        """Settle every worker that has ended (with ``block``, wait for each first)."""
        for rid, (proc, run, log) in list(self.active.items()):
            if block:
                proc.wait()
            if proc.poll() is None:
                continue
            del self.active[rid]
            log.close()
            path = self.results / RUNS_DIR / rid / SUMMARY_FILE
            if proc.returncode != 0 or not path.exists():
                self.bar.finish_run(run, finished=False)
                self.complete = False
                log_path = self.results / RUNS_DIR / rid / "worker.log"
                tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
                self.bar.write(f"isoflop: {rid} failed (exit code {proc.returncode}): {' | '.join(tail)}")
                continue
            if not self.settle(run, json.loads(path.read_text())):
                self.complete = False

    def interrupt(self) -> None:
        """Ctrl-C or SIGTERM: start nothing more, stop the running workers, wait for their checkpoints."""
        self.complete = False
        self.queue.clear()
        self.bar.write(f"isoflop: interrupted; waiting for {len(self.active)} running run(s) to checkpoint")
        for proc, _, _ in self.active.values():
            if proc.poll() is None:
                # SIGTERM, not a second SIGINT: train() stops at a step boundary either way, but a second
                # SIGINT (if the terminal's reached the worker too) would interrupt it mid-checkpoint.
                proc.send_signal(signal.SIGTERM)
        self.reap(block=True)


class _Progress:
    """One tqdm bar over the sweep's FLOPs, advanced within runs by polling their metrics.jsonl.

    The ETA is (FLOPs left) / (FLOP rate so far): runs of one budget cost about the same time.
    Off a terminal (a log file, a pipe) there is no bar, only the plain per-run lines: a bar's
    carriage returns would fill the file.
    """

    def __init__(self, total_flops: float, done_flops: float, enabled: bool, n_runs: int, n_done: int):
        from tqdm import tqdm

        self.scale = 1e12
        self.done = done_flops
        self.n_runs, self.n_done = n_runs, n_done
        self.active: dict[str, tuple[PlannedRun, Path]] = {}
        self.bar = tqdm(
            total=total_flops / self.scale,
            initial=done_flops / self.scale,
            disable=not (enabled and sys.stderr.isatty()),
            unit="TFLOP",
            dynamic_ncols=True,
            desc="sweep",
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.3g}/{total:.3g} TFLOP [{elapsed}<{remaining}] {postfix}",
        )
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not self.bar.disable:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(2.0):
            with self._lock:
                running = sum(min(last_step(d) or 0, r.steps) * r.flops_per_step for r, d in self.active.values())
                self.bar.n = (self.done + running) / self.scale
                self.bar.refresh()

    def write(self, msg: str) -> None:
        if self.bar.disable:
            print(msg, flush=True)
        else:
            self.bar.write(msg)

    def _postfix(self) -> None:
        names = ", ".join(self.active)
        self.bar.set_postfix_str(f"{self.n_done}/{self.n_runs} runs done; {names}", refresh=True)

    def watch(self, run: PlannedRun, run_dir: Path) -> None:
        with self._lock:
            self.active[run.run_id] = (run, run_dir)
            self._postfix()

    def finish_run(self, run: PlannedRun, finished: bool = True) -> None:
        with self._lock:
            self.active.pop(run.run_id, None)
            if finished:
                self.done += run.train_flops
                self.n_done += 1
            self.bar.n = self.done / self.scale
            self._postfix()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.bar.close()
