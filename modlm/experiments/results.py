"""The results folder of a sweep: the plan, one record per finished run, each run's metrics.

    results_dir/plan.json           the planned runs (rewritten on every start)
    results_dir/runs.jsonl          one line per FINISHED run, appended atomically
    results_dir/runs/<run_id>/      each run's out_dir: metrics.jsonl, train.log, checkpoints/

Writing and reading both go through here, so the sweep that trains (``modlm.experiments.sweep``)
and the report that reads (``modlm.experiments.report``) agree on the format.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modlm.experiments.isoflop import PlannedRun, SweepSettings

RUNS_FILE = "runs.jsonl"
PLAN_FILE = "plan.json"
RUNS_DIR = "runs"
METRICS_FILE = "metrics.jsonl"


def _parse_lines(lines: Sequence[str]) -> list[Any]:
    """The JSON values of a JSON-lines text; a line cut short by a crash is skipped."""
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def write_plan(results_dir: str | Path, runs: Sequence[PlannedRun], settings: SweepSettings) -> None:
    """plan.json: the settings and every planned run, replaced atomically (a crash leaves the old one)."""
    results = Path(results_dir)
    tmp = results / (PLAN_FILE + ".tmp")
    tmp.write_text(
        json.dumps({"settings": dataclasses.asdict(settings), "runs": [r.as_dict() for r in runs]}, indent=1)
    )
    os.replace(tmp, results / PLAN_FILE)


def read_results(results_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Finished runs of a results folder: {run_id: record}. A line cut short by a crash is ignored."""
    path = Path(results_dir) / RUNS_FILE
    if not path.exists():
        return {}
    return {
        rec["run_id"]: rec
        for rec in _parse_lines(path.read_text(encoding="utf-8").splitlines())
        if isinstance(rec, dict) and "run_id" in rec
    }


def append_result(results_dir: str | Path, record: dict[str, Any]) -> None:
    """Append one record to runs.jsonl as a single write, then fsync: a crash leaves the file
    with or without the whole line (a torn last line is ignored by ``read_results``)."""
    path = Path(results_dir) / RUNS_FILE
    data = (json.dumps(record) + "\n").encode("utf-8")
    # A previous crash may have left a torn line without its newline: start on a fresh line.
    prefix = b""
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            prefix = b"" if f.read(1) == b"\n" else b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, prefix + data)
        os.fsync(fd)
    finally:
        os.close(fd)


def last_step(run_dir: str | Path) -> int | None:
    """Step of the last record of a run's metrics.jsonl (reads only its tail: polled while training)."""
    try:
        with open(Path(run_dir) / METRICS_FILE, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode("utf-8", errors="ignore").splitlines()
    except OSError:
        return None
    for rec in reversed(_parse_lines(lines)):
        if rec.get("event") in ("train", "checkpoint", "eval", "end"):
            return int(rec.get("step", 0))
    return None


def run_curves(run_dir: Path) -> dict[str, Any]:
    """Training-loss curve, evaluations and per-layer router statistics from metrics.jsonl."""
    path = run_dir / METRICS_FILE
    events = _parse_lines(path.read_text(encoding="utf-8").splitlines()) if path.exists() else []
    train_pts, aux_pts, evals = [], [], []
    router: dict[str, list[float]] = {}
    router_steps: list[int] = []
    for rec in events:
        if rec.get("event") == "train":
            train_pts.append([rec["step"], rec["lm_loss"]])
            aux_pts.append([rec["step"], rec.get("aux_loss", 0.0)])
            stats = rec.get("router") or {}
            keep = {
                k: v
                for k, v in stats.items()
                if k.split("/")[-1]
                in (
                    "pred_acc",
                    "pred_recall",
                    "aux_acc",
                    "chosen_frac",
                    "routed_frac",
                    "dropped_frac",
                    "empty_slot_frac",
                    "noop_frac",  # integrated MoDE: the share of assignments choosing a no-op expert
                )
            }
            if keep:
                router_steps.append(rec["step"])
                for k, v in keep.items():
                    router.setdefault(k, []).append(v)
        elif rec.get("event") == "eval":
            evals.append([rec["step"], rec.get("val_loss"), rec.get("val_loss_causal")])
    # A resumed run logs its steps after the checkpoint again: keep the last record of each step.
    train_pts = sorted({s: [s, v] for s, v in train_pts}.values())
    aux_pts = sorted({s: [s, v] for s, v in aux_pts}.values())
    evals = sorted({e[0]: e for e in evals}.values())
    return {
        "train_curve": train_pts,
        # The auxiliary losses (router BCE, predictor, MoE balance): where a blow-up shows first
        # (a router logit r in the thousands leaves the LM loss bounded but the predictor's BCE not).
        "aux_curve": aux_pts,
        "evals": evals,
        "router_curve": {"step": router_steps, **router} if router_steps else {},
    }


def train_settings(cfg) -> dict[str, Any]:
    """A run's TrainConfig as recorded: every field but out_dir and threads (where a run lives and
    how many threads compute it are not how it trains; a sweep sets its threads itself)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in ("out_dir", "threads")}


def run_record(run: PlannedRun, cfg, summary: dict[str, Any], run_dir: Path, results_dir: Path) -> dict[str, Any]:
    """The runs.jsonl line of a finished run: its plan, its TrainConfig ``cfg`` (what a restarted
    sweep compares its settings against), the trainer's ``summary`` and the curves of its metrics."""
    rec = run.as_dict()
    rec.update(
        {
            "out_dir": str(run_dir.relative_to(results_dir)),
            "train": train_settings(cfg),
            "val_loss": summary.get("val_loss"),
            "val_bpb": summary.get("val_bpb"),
            "val_loss_causal": summary.get("val_loss_causal"),
            "val_bpb_causal": summary.get("val_bpb_causal"),
            "causal_routed_frac": summary.get("causal_routed_frac"),
            "train_loss": summary.get("train_loss"),
            "elapsed_s": summary.get("elapsed_s"),
            "tokens_seen": summary.get("tokens_seen"),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )
    rec.update(run_curves(run_dir))
    return rec
