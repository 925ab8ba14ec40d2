"""isoFLOP sweeps: plan runs that each spend a training-FLOP budget, run them resumably, record results.

    modlm isoflop --budgets 1e12,4e12 --family dense --family mod --results-dir results/iso

The plan: for every budget, every family (dense, MoD, MoD variants) and every model shape of a
grid (depth x width), ``steps = round(budget / train_flops_per_step)`` so the run spends the
budget to within half a step (the planner keeps only runs within 1% of it, i.e. >= 50 steps).
FLOPs are ``modlm.flops.train_flops`` (forward + backward, routed blocks at capacity,
evaluation not counted).

The results folder::

    results_dir/plan.json           the planned runs (rewritten on every start)
    results_dir/runs.jsonl          one line per FINISHED run, appended atomically
    results_dir/runs/<run_id>/      each run's out_dir: metrics.jsonl, train.log, checkpoints/

Resume: a restarted sweep skips the runs already in runs.jsonl and continues the others from
their own checkpoints (``modlm.training.trainer.train(..., resume=True)``, which is exact). A run killed
mid-way therefore loses at most 1/``ckpts_per_run`` of its steps. Ctrl-C (or SIGTERM) stops the
running runs at a step boundary with a checkpoint, and the sweep exits; run the same command
again to go on.

Parallel runs: ``jobs > 1`` trains that many runs at once, each in its own process with
``threads`` torch threads (default 1). Tiny models use a second core better as a second run
than as a second thread. A per-run lock file keeps two processes off one run's checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from modlm.config import ModelConfig, parse_assignments

RUNS_FILE = "runs.jsonl"
PLAN_FILE = "plan.json"
RUNS_DIR = "runs"
BUDGET_TOLERANCE = 0.01  # a run's FLOPs are within 1% of its budget

# Families: ModelConfig overrides on top of a shape. "mod" is the paper's best setting (§4.1):
# capacity 12.5%, every other block routed, learned expert-choice routing; causal routing by
# the stop-gradient predictor (§3.5), which leaves the LM objective untouched.
FAMILIES: dict[str, dict[str, Any]] = {
    "dense": {"router": "none"},
    "mod": {"router": "learned", "capacity": 0.125, "route_every": 2, "route_start": 1, "causal_routing": "predictor"},
    "mod-random": {"router": "random", "capacity": 0.125, "route_every": 2, "route_start": 1},
    # Token choice (modlm.routing.token_choice); aux_loss_weight is its balancing-loss weight there.
    "mod-tc": {"router": "token_choice", "capacity": 0.125, "route_every": 2, "route_start": 1, "aux_loss_weight": 1.0},
}


# ---------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A model size: width and depth (heads follow from ``SweepSettings.head_dim``)."""

    d_model: int
    n_layers: int

    @property
    def name(self) -> str:
        return f"d{self.d_model}L{self.n_layers}"

    @classmethod
    def parse(cls, text: str) -> "Shape":
        """'128x4' (width x depth) -> Shape(128, 4)."""
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
        if not m:
            raise ValueError(f"shape {text!r} is invalid: expected WIDTHxDEPTH, e.g. 128x4")
        return cls(int(m.group(1)), int(m.group(2)))


@dataclass(frozen=True)
class Family:
    """A named set of ModelConfig overrides: ``mod``, or ``mod:capacity=0.25,route_every=1``."""

    label: str
    overrides: tuple[tuple[str, Any], ...]

    @property
    def model_overrides(self) -> dict[str, Any]:
        return dict(self.overrides)

    @property
    def slug(self) -> str:
        """The label made safe for a folder name."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label.replace("=", "")).strip("_")

    @classmethod
    def parse(cls, spec: str) -> "Family":
        base, _, rest = spec.partition(":")
        base = base.strip()
        if base not in FAMILIES:
            raise ValueError(f"family {spec!r} is invalid: the base must be one of {sorted(FAMILIES)} "
                             f"(optionally ':KEY=VALUE,...' ModelConfig overrides)")
        over = dict(FAMILIES[base])
        known = {f.name for f in dataclasses.fields(ModelConfig)} - {"name", "d_model", "n_layers", "n_heads"}
        items = [s.strip() for s in rest.split(",") if s.strip()]
        given = parse_assignments(items, flag=f"family {spec!r}:")
        for key, value in given.items():
            if key not in known:
                raise ValueError(f"family {spec!r} is invalid: {key!r} must be a ModelConfig field other than "
                                 f"the shape's ({', '.join(sorted(known))})")
            over[key] = value.strip() if isinstance(value, str) else value
        return cls(spec.strip(), tuple(sorted(over.items())))


@dataclass(frozen=True)
class SweepSettings:
    """Training settings shared by every run of a sweep (the budget fixes each run's steps)."""

    seq_len: int = 128
    batch_size: int = 16
    head_dim: int = 32
    predictor_hidden: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine from lr down to lr * min_lr_ratio
    warmup_frac: float = 0.05  # of each run's steps (at least 10 steps, at most 200)
    weight_decay: float = 0.1
    min_steps: int = 50  # fewer steps: round() misses the budget by > 1%, and models barely train
    max_steps: int = 3000  # more steps: a model too small to be interesting at this budget
    eval_batches: int = 32  # final validation: eval_batches * batch_size windows of seq_len
    evals_per_run: int = 1  # validations per run (the last at the end)
    ckpts_per_run: int = 5  # checkpoints per run (resume granularity)
    log_points: int = 40  # training-loss records per run (the loss-vs-FLOPs curves)
    seed: int = 0
    data: str | None = None
    cache_dir: str | None = None
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "head_dim", "predictor_hidden", "min_steps", "max_steps", "eval_batches",
                     "evals_per_run", "ckpts_per_run", "log_points"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"SweepSettings.{name}={v!r} is invalid: must be an int >= 1")
        if self.head_dim % 2:
            raise ValueError(f"SweepSettings.head_dim={self.head_dim} is invalid: must be even (RoPE)")
        if self.min_steps < 50:
            raise ValueError(f"SweepSettings.min_steps={self.min_steps} is invalid: must be >= 50, or rounding the "
                             f"step count can miss the budget by more than {BUDGET_TOLERANCE:.0%}")
        if self.max_steps < self.min_steps:
            raise ValueError(f"SweepSettings.max_steps={self.max_steps} is invalid: must be >= min_steps={self.min_steps}")
        if not 0 < self.min_lr_ratio <= 1 or not 0 <= self.warmup_frac < 1 or not self.lr > 0:
            raise ValueError(f"SweepSettings: lr={self.lr} must be > 0, min_lr_ratio={self.min_lr_ratio} in (0, 1], "
                             f"warmup_frac={self.warmup_frac} in [0, 1)")

    def replace(self, **changes: Any) -> "SweepSettings":
        return dataclasses.replace(self, **changes)


def model_overrides(shape: Shape, family: Family, settings: SweepSettings) -> dict[str, Any]:
    """ModelConfig overrides (on the ``tiny`` preset) for one shape of one family."""
    if shape.d_model % settings.head_dim:
        raise ValueError(f"shape {shape.name}: d_model={shape.d_model} must be a multiple of head_dim={settings.head_dim}")
    over = {"d_model": shape.d_model, "n_layers": shape.n_layers, "n_heads": shape.d_model // settings.head_dim,
            "max_seq_len": settings.seq_len, "predictor_hidden": settings.predictor_hidden}
    over.update(family.model_overrides)
    if over.get("route_start", 0) >= shape.n_layers:
        over["route_start"] = shape.n_layers - 1
    return over


def format_budget(budget: float) -> str:
    """1.5e12 -> '1.5e12' (compact, stable: used in run ids)."""
    mant, exp = f"{budget:.3e}".split("e")
    return f"{float(mant):g}e{int(exp)}"


@dataclass(frozen=True)
class PlannedRun:
    """One training run of a sweep: its model, its step count and the FLOPs it will spend."""

    run_id: str
    budget: float
    family: str
    shape: Shape
    overrides: dict[str, Any]
    steps: int
    flops_per_step: int
    params: int
    non_embedding_params: int
    forward_flops_per_token: float
    seed: int = 0
    tags: tuple[str, ...] = ()

    @property
    def train_flops(self) -> int:
        return self.steps * self.flops_per_step

    @property
    def core_params(self) -> int:
        """Parameters of the transformer without routers and predictors (the dense twin's): the
        model's size when comparing dense and MoD shapes."""
        from modlm.flops import param_count

        return param_count(self.model_config().dense_twin())

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_name("tiny", **self.overrides)

    def train_config(self, settings: SweepSettings, out_dir: str | Path):
        """The TrainConfig of this run: cosine over exactly ``steps`` steps, checkpoints for resume."""
        from modlm.training.config import TrainConfig

        warmup = min(200, max(10, round(settings.warmup_frac * self.steps)), self.steps)
        return TrainConfig(
            model="tiny", model_overrides=dict(self.overrides), data=settings.data, cache_dir=settings.cache_dir,
            out_dir=str(out_dir), batch_size=settings.batch_size, seq_len=settings.seq_len, max_steps=self.steps,
            lr=settings.lr, min_lr=settings.lr * settings.min_lr_ratio, warmup_steps=warmup,
            weight_decay=settings.weight_decay, eval_interval=max(1, math.ceil(self.steps / settings.evals_per_run)),
            eval_batches=settings.eval_batches, ckpt_interval=max(1, math.ceil(self.steps / settings.ckpts_per_run)),
            log_interval=max(1, self.steps // settings.log_points), seed=self.seed, device=settings.device,
            dtype=settings.dtype)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PlannedRun":
        """Inverse of ``as_dict``."""
        return cls(run_id=d["run_id"], budget=d["budget"], family=d["family"], shape=Shape(**d["shape"]),
                   overrides=dict(d["overrides"]), steps=d["steps"], flops_per_step=d["flops_per_step"],
                   params=d["params"], non_embedding_params=d["non_embedding_params"],
                   forward_flops_per_token=d["forward_flops_per_token"], seed=d["seed"], tags=tuple(d["tags"]))

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "budget": self.budget, "family": self.family,
                "shape": {"d_model": self.shape.d_model, "n_layers": self.shape.n_layers}, "overrides": self.overrides,
                "steps": self.steps, "flops_per_step": self.flops_per_step, "train_flops": self.train_flops,
                "params": self.params, "non_embedding_params": self.non_embedding_params,
                "core_params": self.core_params,
                "forward_flops_per_token": self.forward_flops_per_token, "seed": self.seed, "tags": list(self.tags)}


def plan_run(budget: float, family: Family | str, shape: Shape, settings: SweepSettings, seed: int | None = None,
             tags: Iterable[str] = ()) -> PlannedRun:
    """The run of ``shape`` in ``family`` that spends ``budget`` training FLOPs (to within 1%).

    Raises ValueError when no step count in [min_steps, max_steps] lands within 1% of the budget.
    """
    from modlm.flops import flops, param_count

    fam = Family.parse(family) if isinstance(family, str) else family
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget={budget!r} is invalid: must be a positive number of FLOPs")
    over = model_overrides(shape, fam, settings)
    cfg = ModelConfig.from_name("tiny", **over)
    rep = flops(cfg, settings.seq_len)
    fps = settings.batch_size * rep.train
    steps = round(budget / fps)
    if not settings.min_steps <= steps <= settings.max_steps:
        raise ValueError(f"{fam.label} {shape.name} at {format_budget(budget)} FLOPs needs {steps} steps of "
                         f"{fps:.3g} FLOPs: outside [min_steps={settings.min_steps}, max_steps={settings.max_steps}]")
    if abs(steps * fps - budget) > BUDGET_TOLERANCE * budget:  # cannot happen for steps >= 50; kept as a guard
        raise ValueError(f"{fam.label} {shape.name}: {steps} steps miss the budget {budget:.3g} by more than 1%")
    seed = settings.seed if seed is None else seed
    run_id = f"B{format_budget(budget)}-{fam.slug}-{shape.name}" + (f"-s{seed}" if seed != settings.seed else "")
    return PlannedRun(run_id=run_id, budget=float(budget), family=fam.label, shape=shape, overrides=over, steps=steps,
                      flops_per_step=fps, params=param_count(cfg), non_embedding_params=param_count(cfg, True),
                      forward_flops_per_token=rep.forward_per_token, seed=seed, tags=tuple(tags))


def plan_sweep(budgets: Sequence[float], families: Sequence[Family | str], shapes: Sequence[Shape],
               settings: SweepSettings, tags: Iterable[str] = ("isoflop",)) -> list[PlannedRun]:
    """Every (budget, family, shape) whose step count lies in [min_steps, max_steps].

    Shapes that would train for too few or too many steps at a budget are left out of that
    budget's grid (a note says so when none is left for a budget and family).
    """
    runs: list[PlannedRun] = []
    for budget in budgets:
        for family in families:
            kept = []
            for shape in shapes:
                try:
                    kept.append(plan_run(budget, family, shape, settings, tags=tags))
                except ValueError as e:
                    if "outside [min_steps" not in str(e):
                        raise
            if not kept:
                label = family if isinstance(family, str) else family.label
                raise ValueError(f"no shape of the grid trains {label} for between {settings.min_steps} and "
                                 f"{settings.max_steps} steps at {format_budget(budget)} FLOPs; add shapes or "
                                 f"change the budget")
            runs.extend(kept)
    return merge_plans(runs)


def merge_plans(*plans: Iterable[PlannedRun]) -> list[PlannedRun]:
    """Concatenate plans; a run planned twice (same run_id) is kept once with the union of its tags."""
    merged: dict[str, PlannedRun] = {}
    for plan in plans:
        for run in plan:
            if run.run_id in merged:
                old = merged[run.run_id]
                if old.overrides != run.overrides or old.steps != run.steps:
                    raise ValueError(f"run {run.run_id} is planned twice with different settings")
                tags = tuple(dict.fromkeys(old.tags + run.tags))
                merged[run.run_id] = dataclasses.replace(old, tags=tags)
            else:
                merged[run.run_id] = run
    return list(merged.values())


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def read_results(results_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Finished runs of a results folder: {run_id: record}. A line cut short by a crash is ignored."""
    path = Path(results_dir) / RUNS_FILE
    out: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "run_id" in rec:
            out[rec["run_id"]] = rec
    return out


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


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _curves(run_dir: Path) -> dict[str, Any]:
    """Training-loss curve, evaluations and per-layer router statistics from metrics.jsonl."""
    train_pts, evals = [], []
    router: dict[str, list[float]] = {}
    router_steps: list[int] = []
    for rec in _read_metrics(run_dir):
        if rec.get("event") == "train":
            train_pts.append([rec["step"], rec["lm_loss"]])
            stats = rec.get("router") or {}
            keep = {k: v for k, v in stats.items() if k.split("/")[-1] in
                    ("pred_acc", "pred_recall", "aux_acc", "chosen_frac", "routed_frac", "dropped_frac", "empty_slot_frac")}
            if keep:
                router_steps.append(rec["step"])
                for k, v in keep.items():
                    router.setdefault(k, []).append(v)
        elif rec.get("event") == "eval":
            evals.append([rec["step"], rec.get("val_loss"), rec.get("val_loss_causal")])
    # A resumed run logs its steps after the checkpoint again: keep the last record of each step.
    train_pts = sorted({s: [s, v] for s, v in train_pts}.values())
    evals = sorted({e[0]: e for e in evals}.values())
    return {"train_curve": train_pts, "evals": evals,
            "router_curve": {"step": router_steps, **router} if router_steps else {}}


def _record(run: PlannedRun, cfg, summary: dict[str, Any], run_dir: Path, results_dir: Path) -> dict[str, Any]:
    rec = run.as_dict()
    rec.update({
        "out_dir": str(run_dir.relative_to(results_dir)),
        "train": {k: v for k, v in cfg.to_dict().items() if k != "out_dir"},
        "val_loss": summary.get("val_loss"), "val_bpb": summary.get("val_bpb"),
        "val_loss_causal": summary.get("val_loss_causal"), "val_bpb_causal": summary.get("val_bpb_causal"),
        "causal_routed_frac": summary.get("causal_routed_frac"), "train_loss": summary.get("train_loss"),
        "elapsed_s": summary.get("elapsed_s"), "tokens_seen": summary.get("tokens_seen"),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    rec.update(_curves(run_dir))
    return rec


class _Progress:
    """One tqdm bar over the sweep's FLOPs, advanced within runs by polling their metrics.jsonl.

    The ETA is (FLOPs left) / (FLOP rate so far): runs of one budget cost about the same time.
    """

    def __init__(self, total_flops: float, done_flops: float, enabled: bool, n_runs: int, n_done: int):
        from tqdm import tqdm

        self.scale = 1e12
        self.done = done_flops
        self.n_runs, self.n_done = n_runs, n_done
        self.active: dict[str, tuple[PlannedRun, Path]] = {}
        self.bar = tqdm(total=total_flops / self.scale, initial=done_flops / self.scale, disable=not enabled,
                        unit="TFLOP", dynamic_ncols=True, desc="sweep",
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.3g}/{total:.3g} TFLOP "
                                   "[{elapsed}<{remaining}] {postfix}")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not self.bar.disable:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(2.0):
            with self._lock:
                running = sum(min(_last_step(d / "metrics.jsonl") or 0, r.steps) * r.flops_per_step
                              for r, d in self.active.values())
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


def _last_step(path: Path) -> int | None:
    """Step of the last record of a metrics.jsonl (reads only its tail)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode("utf-8", errors="ignore").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("event") in ("train", "checkpoint", "eval", "end"):
            return int(rec.get("step", 0))
    return None


@dataclass
class SweepResult:
    """What ``run_sweep`` returns: the records of every finished planned run, in plan order."""

    records: list[dict[str, Any]]
    complete: bool
    ran: list[str] = field(default_factory=list)  # run ids trained (or finished) by this call


SUMMARY_FILE = "summary.json"
LOCK_FILE = "run.lock"


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


JOB_FILE = "job.json"


def _child_main(job_path: str) -> None:
    """Entry point of a worker process (``jobs > 1``): ``python -c`` runs this on one job file."""
    job = json.loads(Path(job_path).read_text())
    if job.get("threads") is not None:
        import torch

        torch.set_num_threads(job["threads"])
    train_run(PlannedRun.from_dict(job["run"]), SweepSettings(**job["settings"]), job["run_dir"])


def run_sweep(runs: Sequence[PlannedRun], results_dir: str | Path, settings: SweepSettings, progress: bool = True,
              jobs: int = 1, threads: int | None = None,
              on_record: Callable[[dict[str, Any]], None] | None = None) -> SweepResult:
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
    tmp = results / (PLAN_FILE + ".tmp")
    tmp.write_text(json.dumps({"settings": dataclasses.asdict(settings), "runs": [r.as_dict() for r in runs]}, indent=1))
    os.replace(tmp, results / PLAN_FILE)

    finished = read_results(results)
    for run in runs:
        rec = finished.get(run.run_id)
        if rec is not None:
            want = {k: v for k, v in run.train_config(settings, "x").to_dict().items() if k != "out_dir"}
            if rec.get("train") != want:
                diff = sorted(k for k in set(want) | set(rec.get("train", {})) if want.get(k) != rec.get("train", {}).get(k))
                raise ValueError(f"{results / RUNS_FILE} holds run {run.run_id} trained with other settings "
                                 f"(differs in {diff}); use another --results-dir")
    todo = [r for r in runs if r.run_id not in finished]
    done_flops = sum(r.train_flops for r in runs if r.run_id in finished)
    bar = _Progress(sum(r.train_flops for r in runs), done_flops, progress, len(runs), len(runs) - len(todo))
    if len(todo) < len(runs):
        bar.write(f"isoflop: {len(runs) - len(todo)} of {len(runs)} runs already finished in {results}; "
                  f"{len(todo)} to go")
    ran: list[str] = []

    def settle(run: PlannedRun, summary: dict[str, Any]) -> bool:
        """Record a run that reached its last step; False (and a note) if it stopped early."""
        run_dir = results / RUNS_DIR / run.run_id
        if summary["step"] < run.steps:
            bar.finish_run(run, finished=False)
            bar.write(f"isoflop: {run.run_id} stopped at step {summary['step']}/{run.steps} "
                      f"({summary['stop_reason']}); run the same command again to continue")
            return False
        rec = _record(run, run.train_config(settings, run_dir), summary, run_dir, results)
        append_result(results, rec)
        ran.append(run.run_id)
        finished[run.run_id] = rec
        bar.finish_run(run)
        bar.write(f"isoflop: {run.run_id}: {run.steps} steps, {run.train_flops:.3g} FLOPs, "
                  f"{run.params:,} params -> val loss {rec['val_loss']:.4f} ({rec['val_bpb']:.3f} bpb), "
                  f"{rec['elapsed_s']:.0f}s")
        if on_record is not None:
            on_record(rec)
        return True

    try:
        if jobs == 1:
            complete = True
            for run in todo:
                run_dir = results / RUNS_DIR / run.run_id
                bar.watch(run, run_dir)
                if not settle(run, train_run(run, settings, run_dir)):
                    complete = False
                    break
        else:
            complete = _run_parallel(todo, results, settings, jobs, 1 if threads is None else threads, bar, settle)
    finally:
        bar.close()
    return SweepResult([finished[r.run_id] for r in runs if r.run_id in finished], complete, ran)


def _run_parallel(todo: Sequence[PlannedRun], results: Path, settings: SweepSettings, jobs: int, threads: int,
                  bar: _Progress, settle: Callable[[PlannedRun, dict[str, Any]], bool]) -> bool:
    """Up to ``jobs`` worker processes, one per run (``python -c``, so no ``__main__`` guard is
    needed anywhere). Ctrl-C reaches the workers too (same process group): each stops at a step
    boundary with a checkpoint; we wait for them, record nothing unfinished, and return False."""
    import subprocess

    queue = list(todo)
    active: dict[str, tuple[subprocess.Popen, PlannedRun, Any]] = {}
    complete = True

    def start_next() -> None:
        run = queue.pop(0)
        run_dir = results / RUNS_DIR / run.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / SUMMARY_FILE).unlink(missing_ok=True)
        job = run_dir / JOB_FILE
        job.write_text(json.dumps({"run": run.as_dict(), "settings": dataclasses.asdict(settings),
                                   "run_dir": str(run_dir), "threads": threads}))
        log = open(run_dir / "worker.log", "ab")
        code = f"from modlm.experiments.isoflop import _child_main; _child_main({str(job)!r})"
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
        active[run.run_id] = (proc, run, log)
        bar.watch(run, run_dir)

    def reap(block: bool) -> None:
        nonlocal complete
        for rid, (proc, run, log) in list(active.items()):
            if block:
                proc.wait()
            if proc.poll() is None:
                continue
            del active[rid]
            log.close()
            path = results / RUNS_DIR / rid / SUMMARY_FILE
            if proc.returncode != 0 or not path.exists():
                bar.finish_run(run, finished=False)
                complete = False
                tail = (results / RUNS_DIR / rid / "worker.log").read_text(errors="replace").strip().splitlines()[-3:]
                bar.write(f"isoflop: {rid} failed (exit code {proc.returncode}): {' | '.join(tail)}")
                continue
            if not settle(run, json.loads(path.read_text())):
                complete = False

    def on_term(signum, frame):  # SIGTERM stops the sweep as Ctrl-C does (train() treats both alike)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
    try:
        while queue or active:
            while queue and complete and len(active) < jobs:
                start_next()
            reap(block=False)
            if not complete:
                queue.clear()  # a run failed or was stopped: let the running ones finish, start nothing new
            if active:
                time.sleep(0.2)
    except KeyboardInterrupt:
        complete = False
        queue.clear()
        bar.write(f"isoflop: interrupted; waiting for {len(active)} running run(s) to checkpoint")
        for proc, _, _ in active.values():
            if proc.poll() is None:
                # SIGTERM, not a second SIGINT: train() stops at a step boundary either way, but a second
                # SIGINT (if the terminal's reached the worker too) would interrupt it mid-checkpoint.
                proc.send_signal(signal.SIGTERM)
        reap(block=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return complete


# ---------------------------------------------------------------------------------------------
# Command line (wired into modlm.cli as `modlm isoflop`)
# ---------------------------------------------------------------------------------------------

DEFAULT_SHAPES = "64x2,64x4,96x4,128x4,128x6,160x6,192x6,192x8"


def _floats(text: str) -> list[float]:
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 1e12,4e12") from None
    if not vals or any(not (math.isfinite(v) and v > 0) for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: budgets must be positive numbers of FLOPs")
    return vals


def add_settings_args(parser: argparse.ArgumentParser, defaults: SweepSettings | None = None) -> None:
    """Flags for SweepSettings (shared by `modlm isoflop` and `modlm reproduce`)."""
    d = defaults or SweepSettings()
    g = parser.add_argument_group("training of each run")
    g.add_argument("--seq-len", type=int, default=None, help=f"tokens per sequence (default: {d.seq_len})")
    g.add_argument("--batch-size", type=int, default=None, help=f"sequences per step (default: {d.batch_size})")
    g.add_argument("--lr", type=float, default=None, help=f"peak learning rate, cosine to lr/10 (default: {d.lr})")
    g.add_argument("--head-dim", type=int, default=None, help=f"head size; heads = width / head size (default: {d.head_dim})")
    g.add_argument("--min-steps", type=int, default=None, help=f"leave out runs with fewer steps (default: {d.min_steps})")
    g.add_argument("--max-steps", type=int, default=None, help=f"leave out runs with more steps (default: {d.max_steps})")
    g.add_argument("--eval-batches", type=int, default=None, help=f"validation batches at the end of a run (default: {d.eval_batches})")
    g.add_argument("--seed", type=int, default=None, help=f"seed of every run (default: {d.seed})")
    g.add_argument("--data", default=None, help="'enwiki' (default: the bundled Wikipedia sample), a text file or a folder")
    g.add_argument("--cache-dir", default=None, help="token cache root (default: $MODLM_CACHE or ~/.cache/modlm)")
    g.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: auto)")
    g.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default=None, help="autocast dtype (default: auto)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per run (default 1: these models gain little from a second thread, and on "
                        "a busy CPU a second thread can make a run 10x slower; use --jobs to use more cores)")
    g.add_argument("--jobs", type=int, default=None,
                   help="runs trained at once, each in its own process (default: 1 for isoflop, the scale's for "
                        "reproduce: 2 for the default scale, made for a free 2-core CPU)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def settings_from_args(args: argparse.Namespace, base: SweepSettings | None = None) -> SweepSettings:
    base = base or SweepSettings()
    names = ("seq_len", "batch_size", "lr", "head_dim", "min_steps", "max_steps", "eval_batches", "seed", "data",
             "cache_dir", "device", "dtype")
    changes = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return base.replace(**changes)


def apply_threads(threads: int | None) -> int:
    """Set torch's CPU threads for runs trained in this process (None: 1, see --threads); returns it."""
    threads = 1 if threads is None else threads
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"--threads={threads!r} is invalid: must be an int >= 1")
    import torch

    torch.set_num_threads(threads)
    return threads


def add_isoflop_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of `modlm isoflop`."""
    parser.add_argument("--budgets", type=_floats, required=True, metavar="B1,B2,...",
                        help="training-FLOP budgets, one isoFLOP curve each, e.g. 1e12,4e12")
    parser.add_argument("--family", action="append", default=None, metavar="NAME[:KEY=VALUE,...]",
                        help=f"model family (repeatable; default: dense and mod): one of {', '.join(sorted(FAMILIES))}, "
                             "optionally with ModelConfig overrides, e.g. mod:capacity=0.25,route_every=1")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, metavar="WxL,...",
                        help="the grid of widths x depths (default: %(default)s)")
    parser.add_argument("--results-dir", default="results/isoflop", help="runs.jsonl, plots and run folders (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots at the end")
    add_settings_args(parser)
    return parser


def cmd_isoflop(args: argparse.Namespace) -> int:
    """isoFLOP sweep: for each budget, a grid of model sizes trained for exactly that many FLOPs,
    dense and MoD side by side; resumable; results in RESULTS_DIR/runs.jsonl and PNG plots."""
    settings = settings_from_args(args)
    threads = apply_threads(args.threads)
    families = [Family.parse(f) for f in (args.family or ["dense", "mod"])]
    shapes = [Shape.parse(s) for s in args.shapes.split(",") if s.strip()]
    runs = plan_sweep(args.budgets, families, shapes, settings)
    print(f"modlm isoflop: {len(runs)} runs, {sum(r.train_flops for r in runs):.3g} training FLOPs in all -> "
          f"{args.results_dir}")
    print("  settings: " + json.dumps(dataclasses.asdict(settings)))
    for r in runs:
        print(f"  {r.run_id:<40} {r.steps:>6} steps x {r.flops_per_step:.3g} = {r.train_flops:.4g} FLOPs "
              f"({r.train_flops / r.budget - 1:+.2%}), {r.params:,} params")
    sys.stdout.flush()
    if args.dry_run:
        return 0
    result = run_sweep(runs, args.results_dir, settings, progress=args.progress, jobs=args.jobs or 1, threads=threads)
    if not result.complete:
        return 130
    if args.plots:
        from modlm.experiments.plots import plot_isoflop, plot_loss_vs_flops

        out = Path(args.results_dir)
        plot_isoflop(result.records, out / "isoflop.png")
        plot_loss_vs_flops(result.records, out / "loss_vs_flops.png")
        print(f"plots: {out / 'isoflop.png'}, {out / 'loss_vs_flops.png'}")
    summary = summarize_isoflop(result.records)
    print(json.dumps({"results": str(Path(args.results_dir) / RUNS_FILE), "optimal": summary}))
    return 0


def summarize_isoflop(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The isoFLOP-optimal run (lowest final val loss) of every (budget, family)."""
    best: dict[tuple[float, str], dict[str, Any]] = {}
    for r in records:
        if r.get("val_loss") is None:
            continue
        key = (r["budget"], r["family"])
        if key not in best or r["val_loss"] < best[key]["val_loss"]:
            best[key] = r
    return [{"budget": b, "family": f, "run_id": r["run_id"], "val_loss": r["val_loss"], "val_bpb": r["val_bpb"],
             "params": r["params"]} for (b, f), r in sorted(best.items())]
