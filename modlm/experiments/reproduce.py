"""`modlm reproduce`: the MoD paper's claims (Raposo et al. 2024, arXiv 2404.02258) at small scale.

    modlm reproduce --scale default --results-dir results/reproduce --report-dir docs/results

One resumable sweep (``modlm.experiments.sweep``) trains every run the claims need
(``modlm.experiments.scales``), a routing analysis reads back a few trained models
(``modlm.experiments.analysis``), and ``REPORT.md`` with its PNG plots is generated from the
results alone (``modlm.experiments.report``; ``--report-only`` regenerates it). The claims and
their verdicts are ``modlm.experiments.claims``.

Experiments (all at equal training FLOPs within a comparison):

1. isoFLOP: for each budget, dense vs MoD (12.5%, every other block) on a shape ladder that
   extends itself until each optimum is bracketed, the best shapes repeated over seeds, each
   family at its own learning rate (``modlm.experiments.study``).
2. Variants of one shape at one budget: capacity 12.5/25/50/95%, routing every block,
   random routing (12.5% and 50%), token-choice routing, aux-loss causal routing, and the
   dense model of the same shape.
3. Causal routing: predictor / aux-loss accuracy per layer over training (from the training
   logs) and the validation loss with causal routing instead of top-k.
4. Routing analysis of trained MoD models: a routing heatmap over a text sample, the number
   of routed blocks each token uses and its correlation with the entropy of the prediction.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modlm.experiments.analysis import run_analysis
from modlm.experiments.isoflop import (
    SETTINGS_FLAGS,
    PlannedRun,
    SweepSettings,
    add_settings_args,
    apply_threads,
    format_budget,
    resolve_jobs,
    settings_from_args,
    train_tokens,
)
from modlm.experiments.report import CLAIMS_FILE, write_report
from modlm.experiments.results import PLAN_FILE, RUNS_FILE, read_results, write_plan
from modlm.experiments.scales import SCALES, Scale, plan_reproduction, plan_variants
from modlm.experiments.study import run_study

# ---------------------------------------------------------------------------------------------
# Time estimate (measured on this machine)
# ---------------------------------------------------------------------------------------------


def measure_flops_per_second(run: PlannedRun, settings: SweepSettings, steps: int = 4) -> tuple[float, float]:
    """Training speed of ``run``'s model here: (FLOP/s of wall-clock, FLOP per CPU-second of this
    process), over a few AdamW steps on random tokens after one warm-up step.

    On a shared CPU the wall-clock rate is what we get now; the CPU-time rate is (nearly) what
    one thread gets on a free core.
    """
    import torch

    from modlm.model.transformer import MoDTransformer

    device = torch.device(
        "cuda"
        if settings.device == "auto" and torch.cuda.is_available()
        else ("cpu" if settings.device == "auto" else settings.device)
    )
    torch.manual_seed(0)
    model = MoDTransformer(run.model_config()).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (settings.batch_size, settings.seq_len), device=device)
    use_bf16 = device.type == "cuda" and settings.dtype in ("auto", "bf16") and torch.cuda.is_bf16_supported()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model(x, x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    flops = steps * run.flops_per_step
    return flops / wall, flops / max(cpu, 1e-9) if device.type == "cpu" else flops / wall


def estimate_seconds(
    runs: Sequence[PlannedRun], settings: SweepSettings, probes: int = 3, jobs: int = 1
) -> dict[str, Any]:
    """Wall-clock estimate of a plan with ``jobs`` runs at once: speed measured on a few of its
    models, interpolated in log(FLOPs per step) for the others; evaluation (forward only, top-k
    and causal) and set-up per run (~2 s; ~8 s for a worker process) added. ``seconds``: one run at a time at the speed
    measured now; ``seconds_free``: ``jobs`` at a time at the CPU-time rate, i.e. with a free core
    for every job's thread."""
    jobs = resolve_jobs(jobs)
    by_cost = sorted({(r.flops_per_step, r.family): r for r in runs}.values(), key=lambda r: r.flops_per_step)
    picks = [by_cost[round(i * (len(by_cost) - 1) / max(1, probes - 1))] for i in range(probes)] if by_cost else []
    picks = list({r.run_id: r for r in picks}.values())
    measured = sorted((r.flops_per_step, *measure_flops_per_second(r, settings)) for r in picks)

    def rate(fps: float, col: int) -> float:
        pts = [(m[0], m[col]) for m in measured]
        if len(pts) == 1 or fps <= pts[0][0]:
            return pts[0][1]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if x0 <= fps <= x1:
                t = (math.log(fps) - math.log(x0)) / max(1e-12, math.log(x1) - math.log(x0))
                return y0 + t * (y1 - y0)
        return pts[-1][1]

    # NOTE: the probes time bare steps; a real run also draws batches, logs and checkpoints, which
    # cost ~10% more here (measured on two default-scale runs), so we add that.
    overhead = 1.1
    now = free = 0.0
    for r in runs:
        flops = r.train_flops + _eval_flops(r, settings)
        now += overhead * flops / rate(r.flops_per_step, 1) + 2.0
        free += overhead * flops / rate(r.flops_per_step, 2) + (2.0 if jobs == 1 else 8.0)  # + a process start
    return {
        "seconds": now,
        "seconds_free": free / jobs,
        "probes": [{"flops_per_step": f, "flops_per_s": w, "flops_per_cpu_s": c} for f, w, c in measured],
    }


def _eval_flops(run: PlannedRun, settings: SweepSettings) -> float:
    """Forward FLOPs of a run's validations (top-k, and causal for a routed model)."""
    evals = settings.evals_per_run * settings.eval_batches * settings.batch_size * settings.seq_len
    return evals * run.forward_flops_per_token * (2 if run.overrides.get("router") != "none" else 1)


def assumed_seconds(
    runs: Sequence[PlannedRun], settings: SweepSettings, flops_per_s: float, step_s: float, per_run_s: float = 3.0
) -> float:
    """Wall-clock seconds of a plan at an assumed sustained rate (one run at a time): FLOPs /
    ``flops_per_s`` plus ``step_s`` per step (kernel launches, optimizer, data) plus ``per_run_s``
    per run (set-up, checkpoints). For a device that is not here to measure."""
    return sum((r.train_flops + _eval_flops(r, settings)) / flops_per_s + r.steps * step_s + per_run_s for r in runs)


# ---------------------------------------------------------------------------------------------
# Driver and CLI
# ---------------------------------------------------------------------------------------------


def run_reproduction(
    scale: Scale | str,
    results_dir: str | Path,
    report_dir: str | Path | None = None,
    settings: SweepSettings | None = None,
    command: str | None = None,
    progress: bool = True,
    report_only: bool = False,
    jobs: int = 1,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train what is missing (resumable), analyse routing, write the report. Returns a summary dict."""
    scale = SCALES[scale] if isinstance(scale, str) else scale
    settings = settings or scale.settings
    results = Path(results_dir)
    report = Path(report_dir) if report_dir is not None else results / "report"
    command = command or f"modlm reproduce --scale {scale.name} --results-dir {results} --report-dir {report}"
    complete = True
    if not report_only:
        study = run_study(
            scale.design(settings.seed),
            results,
            settings,
            progress=progress,
            jobs=jobs,
            threads=threads,
            extra=lambda lrs: plan_variants(scale, settings, lrs),
        )
        complete = study.complete
        if not complete:
            return {"complete": False, "results_dir": str(results)}
        run_analysis(results, scale, settings, study.runs)
    else:
        if not read_results(results):
            # A report of no runs would say "0 of N claims hold", which reads like a result.
            raise ValueError(
                f"nothing to report: {results} has no finished runs (no {RUNS_FILE} there); "
                "train them first (the same command without --report-only)"
            )
        if not (results / PLAN_FILE).exists():  # the report reads the runs' tags from the plan
            write_plan(results, plan_reproduction(scale, settings), settings)
    path = write_report(results, report, scale, command, settings)
    claims = json.loads((report / CLAIMS_FILE).read_text())
    return {
        "complete": complete,
        "report": str(path),
        "results_dir": str(results),
        "noise": claims["noise"],
        "budgets": claims["budgets"],
        "holds": {c["claim"]: c["holds"] for c in claims["claims"]},
    }


def add_reproduce_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of `modlm reproduce`."""
    parser.add_argument(
        "--scale",
        choices=sorted(SCALES),
        default="default",
        help="tiny (seconds; tests), quick (~25 min on a free 2-core CPU), default (~1 h on a free 2-core CPU), "
        "gpu (~8 min on one H100/H200; bring --data)",
    )
    parser.add_argument("--results-dir", default=None, help="runs and results (default: results/reproduce-SCALE)")
    parser.add_argument("--report-dir", default=None, help="REPORT.md and plots (default: RESULTS_DIR/report)")
    parser.add_argument("--report-only", action="store_true", help="regenerate the report from existing results")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan and a run-time estimate measured on this machine, then exit",
    )
    add_settings_args(parser)
    return parser


def _command_line(args: argparse.Namespace, results: Path, report: Path) -> str:
    parts = ["modlm", "reproduce", "--scale", args.scale, "--results-dir", str(results), "--report-dir", str(report)]
    for name in (*SETTINGS_FLAGS, "threads", "jobs"):
        v = getattr(args, name, None)
        if v is not None:
            parts += [f"--{name.replace('_', '-')}", str(v)]
    return " ".join(shlex.quote(p) for p in parts)


def _print_dry_run(runs: Sequence[PlannedRun], settings: SweepSettings, jobs: int, threads: int, scale: Scale) -> None:
    """The plan, run by run, and the time it would take here (measured now; or, for a scale whose
    device is not here, at the scale's assumed speed); one JSON line last."""
    for r in runs:
        print(
            f"  {r.run_id:<52} {r.steps:>6} steps  {r.train_flops:.4g} FLOPs  {r.params:>10,} params  "
            f"{','.join(r.tags)}"
        )
    print(
        "  (the expected plan: the study adds one run of its budget for every rung an isoFLOP curve needs "
        "to be bracketed, and one lr trial where a best lr is an end of those tried)"
    )
    import torch

    if scale.assumed_flops_per_s is not None and not torch.cuda.is_available():
        secs = assumed_seconds(runs, settings, scale.assumed_flops_per_s, scale.assumed_step_s)
        print(
            f"  no GPU here, so not measured: at an assumed {scale.assumed_flops_per_s:.3g} FLOP/s and "
            f"{1e3 * scale.assumed_step_s:g} ms per step, {secs / 60:.1f} min on one GPU "
            "(run --dry-run on the GPU to measure)"
        )
        print(json.dumps({"runs": len(runs), "train_flops": sum(r.train_flops for r in runs), "seconds_assumed": secs}))
        return
    est = estimate_seconds(runs, settings, jobs=jobs)
    per_flop = est["seconds_free"] * jobs / max(1, sum(r.train_flops for r in runs))  # one core
    extension = ", ".join(f"{per_flop * b / 60:.1f} min at {format_budget(b)}" for b in scale.budgets)
    probes = ", ".join(
        f"{p['flops_per_s'] / 1e9:.1f} GFLOP/s wall, {p['flops_per_cpu_s'] / 1e9:.1f} GFLOP per "
        f"CPU-second at {p['flops_per_step']:.3g} FLOPs/step"
        for p in est["probes"]
    )
    print(f"  measured with {threads} thread(s): {probes}")
    print(
        f"  estimate: {est['seconds'] / 60:.0f} min one run at a time at the speed measured now; "
        f"{est['seconds_free'] / 60:.0f} min with --jobs {jobs} on {jobs * threads} free core(s); "
        f"each extension adds about {extension} of one core"
    )
    print(json.dumps({"runs": len(runs), "train_flops": sum(r.train_flops for r in runs), **est}))


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Reproduce the MoD paper's claims at small scale: train (resumable), analyse, write REPORT.md + plots."""
    scale = SCALES[args.scale]
    settings = settings_from_args(args, scale.settings)
    threads = apply_threads(args.threads)
    jobs = resolve_jobs(args.jobs, scale.jobs)
    results = Path(args.results_dir or f"results/reproduce-{scale.name}")
    report = Path(args.report_dir) if args.report_dir else results / "report"
    command = _command_line(args, results, report)
    runs = plan_reproduction(scale, settings)
    print(f"modlm reproduce: scale {scale.name} ({scale.description})")
    print(f"  {len(runs)} runs, {sum(r.train_flops for r in runs):.3g} training FLOPs -> {results}; report -> {report}")
    print("  settings: " + json.dumps(dataclasses.asdict(settings)))
    n_train = train_tokens(settings)
    if n_train:
        worst = max(r.steps * settings.batch_size * settings.seq_len for r in runs) / n_train
        if worst > 4:
            print(
                f"  WARNING: the training split has {n_train:,} tokens; the longest run sees it {worst:.0f} times. "
                f"Pass --data with a larger corpus for meaningful numbers at this scale."
            )
    sys.stdout.flush()
    if args.dry_run:
        _print_dry_run(runs, settings, jobs, threads, scale)
        return 0
    summary = run_reproduction(
        scale,
        results,
        report,
        settings,
        command,
        progress=args.progress,
        report_only=args.report_only,
        jobs=jobs,
        threads=threads,
    )
    if not summary["complete"]:
        print(f"modlm reproduce: interrupted; run the same command again to continue ({results})")
        return 130
    print(f"report: {summary['report']}")
    print(json.dumps(summary))
    return 0
