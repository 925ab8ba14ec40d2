"""Training-step wall clock of a Mixture-of-Depths model against its dense twin.

Both models are built from the same config (the dense one is ``cfg.dense_twin()``: identical
shapes, no routers), live in one process, see the same batch, and are stepped alternately
(MoD, dense, dense, MoD, ...) so that clock drift, thermal state and noisy neighbours hit both
alike. The reported step time is the median over ``--steps`` timed steps after ``--warmup``.

What is timed, per step: ``zero_grad(set_to_none=True)`` + forward (LM loss + router aux
losses) + ``loss.backward()``, and with ``--optimizer`` also an ``AdamW.step()``. Data creation
is outside the timed region. On CUDA the region is bracketed by ``torch.cuda.synchronize()``
and TF32 matmuls are allowed (so ``--dtype fp32`` there means fp32 storage, TF32 tensor cores).
``--dtype bf16`` is mixed precision: fp32 weights under ``torch.autocast(bfloat16)``; the
router scores and the predictor stay fp32 by design (modlm.routing).

FLOPs come from ``modlm.flops.train_flops`` (forward + backward, backward = 2 x forward per
matmul except the detached predictor input; attention counted as the full T x T square, not
halved for the causal mask; element-wise ops, gathers and scatters count nothing). ``overhead = time_ratio / flop_ratio``: 1.0
means MoD converts its FLOP savings into wall-clock savings one for one.

    python benchmarks/bench_train.py                         # base preset, B=8, T=512, CPU fp32
    python benchmarks/bench_train.py --device cuda --dtype bf16 --seq-len 2048
    python benchmarks/bench_train.py --compile --threads 1  # + torch.compile'd twins, matmul rate

With ``--compile`` four steppers are interleaved (MoD and dense, eager and ``torch.compile``d;
the compiled ones compile during their first warm-up step, so ``--warmup`` is at least 1), and
the headline fields (``mod_step_s``, ``overhead``, ...) are the compiled pair's; the eager pair's
carry an ``eager_`` prefix, and ``compile_speedup_{mod,dense}`` = eager step / compiled step.
``matmul_gflops`` is a plain fp32 ``torch.mm`` at the step's largest GEMM shape (the largest
linear layer over all B*T tokens), same threads, timed between the steps of the same run;
``{mod,dense}_frac_of_matmul`` = counted FLOPs per second of the compiled step / it: how close
the step runs to what this machine's matmul does.

The last line printed is one JSON object (for scripts); everything above it is for people.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from modlm.bench import add_common_args, bench_parser, environment, parse_bench_args
from modlm.config import ModelConfig
from modlm.devices import THREADS_DEFAULT, parse_device, set_threads
from modlm.flops import flops, format_flops, train_flops
from modlm.model.transformer import MoDTransformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    add_common_args(p, threads=THREADS_DEFAULT, warmup=3, seed_help="seed for weights and the batch")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (raises max_seq_len if needed)")
    p.add_argument("--capacity", type=float, default=None, help="override the preset's routed capacity")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (median reported)")
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=sorted(DTYPES),
        help="fp32, or bf16 autocast over fp32 weights (mixed precision training)",
    )
    p.add_argument("--optimizer", action="store_true", help="include an AdamW step in the timed region")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also step torch.compile'd twins (inductor); report compile speed-ups and the fraction of a plain "
        "fp32 matmul's rate the compiled steps reach",
    )
    return parse_bench_args(p, argv, {"--batch-size": 1, "--seq-len": 2, "--steps": 1})


def build_configs(args: argparse.Namespace) -> tuple[ModelConfig, ModelConfig]:
    overrides = {}
    if args.capacity is not None:
        overrides["capacity"] = args.capacity
    cfg = ModelConfig.from_name(args.preset, **overrides)
    if cfg.router == "none":
        raise ValueError(f"--preset {args.preset!r} is dense: pass a routed preset (its twin is built here)")
    if args.seq_len > cfg.max_seq_len:
        cfg = cfg.replace(max_seq_len=args.seq_len)
    return cfg, cfg.dense_twin()


class Stepper:
    """One model + its (optional) optimizer; ``step()`` runs one timed training step."""

    def __init__(
        self,
        cfg: ModelConfig,
        device: torch.device,
        dtype: torch.dtype,
        optimizer: bool,
        seed: int,
        compile: bool = False,
    ):
        torch.manual_seed(seed)
        self.model = MoDTransformer(cfg).to(device).train()
        # The same weights either way (same seed); compiled, the forward and its backward run
        # as inductor kernels around the library GEMMs.
        self.forward = torch.compile(self.model) if compile else self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4) if optimizer else None
        self.device = device
        self.autocast = (
            torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        )
        self.times: list[float] = []  # wall-clock seconds per timed step
        self.cpu_times: list[float] = []  # process CPU seconds per timed step (all threads)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, idx_BT: torch.Tensor, tgt_BT: torch.Tensor, record: bool) -> float:
        self._sync()
        t0, c0 = time.perf_counter(), time.process_time()
        self.model.zero_grad(set_to_none=True)
        with self.autocast:
            loss = self.forward(idx_BT, tgt_BT).loss
        loss.backward()
        if self.opt is not None:
            self.opt.step()
        self._sync()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if record:
            self.times.append(dt)
            self.cpu_times.append(dc)
        return dt

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_times)


def largest_gemm(model: torch.nn.Module, n_tokens: int) -> tuple[int, int, int]:
    """(M, K, N) of the step's largest matrix product: the linear layer with the most weights,
    applied to all ``n_tokens`` tokens of the batch (a dense block's MLP, or the LM head)."""
    linear = max((m for m in model.modules() if isinstance(m, torch.nn.Linear)), key=lambda m: m.weight.numel())
    return n_tokens, linear.in_features, linear.out_features


class MatmulTimer:
    """A plain fp32 ``torch.mm`` of shape (M, K) @ (K, N): the rate this machine's GEMM reaches
    at the step's largest shape, with the same threads, timed in the same run as the steps."""

    def __init__(self, shape: tuple[int, int, int], device: torch.device, reps: int = 3):
        M, K, N = shape
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(M, K, generator=g).to(device)
        self.b = torch.randn(K, N, generator=g).to(device)
        self.shape, self.device, self.reps = shape, device, reps
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def measure(self, record: bool) -> None:
        for _ in range(self.reps):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0, c0 = time.perf_counter(), time.process_time()
            torch.mm(self.a, self.b)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if record:
                self.times.append(time.perf_counter() - t0)
                self.cpu_times.append(time.process_time() - c0)

    def _rate(self, times: list[float]) -> float:
        M, K, N = self.shape
        return 2 * M * K * N / statistics.median(times) / 1e9

    @property
    def gflops(self) -> float:
        return self._rate(self.times)

    @property
    def cpu_gflops(self) -> float:
        """From process CPU time: steadier than wall time when neighbours share the cores."""
        return self._rate(self.cpu_times)


def compile_figures(
    eager_mod, eager_dense, mod, dense, matmul, mod_f: int, dense_f: int, flop_ratio: float, cpu: bool = False
) -> dict:
    """The ``--compile`` fields (empty without it): speed-ups over eager, the eager pair's
    figures, and the compiled steps' counted FLOP/s as a fraction of the plain matmul's. With
    ``cpu`` (a CPU run) the same figures from process CPU time too (``cpu_`` prefix): on a
    shared machine a neighbour's time is not counted there."""
    if matmul is None:
        return {}
    gflops = matmul.gflops
    eager_ratio = eager_mod.median / eager_dense.median
    by_cpu = {}
    if cpu:
        cpu_gflops = matmul.cpu_gflops
        by_cpu = {
            "cpu_compile_speedup_mod": eager_mod.cpu_median / mod.cpu_median,
            "cpu_compile_speedup_dense": eager_dense.cpu_median / dense.cpu_median,
            "cpu_matmul_gflops": cpu_gflops,
            "cpu_mod_frac_of_matmul": mod_f / mod.cpu_median / 1e9 / cpu_gflops,
            "cpu_dense_frac_of_matmul": dense_f / dense.cpu_median / 1e9 / cpu_gflops,
            "cpu_eager_overhead": eager_mod.cpu_median / eager_dense.cpu_median / flop_ratio,
        }
    return {
        **by_cpu,
        "compile_speedup_mod": eager_mod.median / mod.median,
        "compile_speedup_dense": eager_dense.median / dense.median,
        "matmul_gflops": gflops,
        "matmul_shape": list(matmul.shape),
        "mod_frac_of_matmul": mod_f / mod.median / 1e9 / gflops,
        "dense_frac_of_matmul": dense_f / dense.median / 1e9 / gflops,
        "eager_mod_step_s": eager_mod.median,
        "eager_dense_step_s": eager_dense.median,
        "eager_time_ratio": eager_ratio,
        "eager_overhead": eager_ratio / flop_ratio,
        "eager_mod_step_times_s": eager_mod.times,
        "eager_dense_step_times_s": eager_dense.times,
        "matmul_times_s": matmul.times,
    }


def fmt_time(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.2f} s"


@dataclass
class TrainRun:
    """The steppers of one run: the headline pair (``mod``, ``dense``: compiled with --compile),
    and with --compile the eager pair and the plain matmul timed between the steps."""

    args: argparse.Namespace
    device: torch.device
    mod_cfg: ModelConfig
    dense_cfg: ModelConfig
    mod: Stepper
    dense: Stepper
    eager_mod: Stepper | None = None
    eager_dense: Stepper | None = None
    matmul: MatmulTimer | None = None

    @property
    def steppers(self) -> list[Stepper]:
        """Every stepper, in the order a round starts from (then rotated)."""
        pairs = [self.eager_mod, self.eager_dense] if self.args.compile else []
        return pairs + [self.mod, self.dense]

    @property
    def warmup(self) -> int:
        # The compiled steppers compile during their first step: never time it.
        return max(self.args.warmup, 1) if self.args.compile else self.args.warmup


def setup_device(args: argparse.Namespace) -> torch.device:
    """Apply --threads and return --device (TF32 matmuls allowed on CUDA)."""
    set_threads(args.threads)
    device = parse_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def build_run(args: argparse.Namespace, device: torch.device) -> TrainRun:
    """The MoD and dense steppers (eager, or compiled + eager with --compile), same seed."""
    mod_cfg, dense_cfg = build_configs(args)
    dtype = DTYPES[args.dtype]

    def stepper(cfg: ModelConfig, compile: bool) -> Stepper:
        return Stepper(cfg, device, dtype, args.optimizer, args.seed, compile=compile)

    run = TrainRun(args, device, mod_cfg, dense_cfg, stepper(mod_cfg, False), stepper(dense_cfg, False))
    if args.compile:
        run.eager_mod, run.eager_dense = run.mod, run.dense
        run.mod, run.dense = stepper(mod_cfg, True), stepper(dense_cfg, True)
        run.matmul = MatmulTimer(largest_gemm(run.dense.model, args.batch_size * args.seq_len), device)
    return run


def time_steps(run: TrainRun) -> None:
    """Step every model ``warmup + steps`` times on one batch, interleaved."""
    args, B, T = run.args, run.args.batch_size, run.args.seq_len
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, run.mod_cfg.vocab_size, (B, T + 1), generator=g).to(run.device)
    idx_BT, tgt_BT = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    steppers = run.steppers
    # Interleave, rotating who goes first, so no model always runs on a warmer cache; the plain
    # matmul is timed in every round too, so it sees the same machine load as the steps.
    for i in range(run.warmup + args.steps):
        record = i >= run.warmup
        for s in steppers[i % len(steppers) :] + steppers[: i % len(steppers)]:
            s.step(idx_BT, tgt_BT, record)
        if run.matmul is not None:
            run.matmul.measure(record)


def step_figures(run: TrainRun) -> dict:
    """The headline pair's FLOPs and ratios (time, FLOPs, overhead, per-pair, CPU time)."""
    B, T, mod, dense = run.args.batch_size, run.args.seq_len, run.mod, run.dense
    mod_f, dense_f = train_flops(run.mod_cfg, T, B), train_flops(run.dense_cfg, T, B)
    time_ratio, flop_ratio = mod.median / dense.median, mod_f / dense_f
    cpu = run.device.type == "cpu"
    return {
        "mod_f": mod_f,
        "dense_f": dense_f,
        "time_ratio": time_ratio,
        "flop_ratio": flop_ratio,
        "overhead": time_ratio / flop_ratio,
        # Step i of MoD and step i of dense ran back to back: their ratio cancels slow drifts in
        # machine load, so its median is a second, often steadier, estimate of the time ratio.
        "paired_ratio": statistics.median(m / d for m, d in zip(mod.times, dense.times)),
        # Secondary: the FLOP ratio if attention counted only the visible (causal) half, as a kernel
        # that skips masked tiles does (PyTorch's CPU flash kernel and the CUDA flash kernel do).
        "causal_ratio": flops(run.mod_cfg, T, causal_attention=True).train
        / flops(run.dense_cfg, T, causal_attention=True).train,
        "threads": torch.get_num_threads() if cpu else None,
        # CPU only: process CPU seconds per step. Time a neighbour steals from us is not ours, so with
        # --threads 1 this ratio is the steadiest estimate on a shared machine. With several threads it
        # also counts OpenMP workers spinning at barriers, so prefer wall time there.
        "cpu_ratio": mod.cpu_median / dense.cpu_median if cpu else None,
        "timed": "zero_grad + forward + backward" + (" + AdamW.step" if run.args.optimizer else ""),
    }


def print_header(run: TrainRun, fig: dict) -> None:
    """Where it ran, the model, the routing and what was timed."""
    args, cfg, device, threads = run.args, run.mod_cfg, run.device, fig["threads"]
    B, T = args.batch_size, args.seq_len
    print(
        f"modlm bench_train: torch {torch.__version__}, python {platform.python_version()}, "
        f"device {device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
        f"dtype {args.dtype}" + (f", {threads} threads (nproc {os.cpu_count()})" if threads else "")
    )
    print(
        f"config  preset={args.preset} B={B} T={T} d={cfg.d_model} layers={cfg.n_layers} "
        f"heads={cfg.n_heads} vocab={cfg.vocab_size} d_mlp={cfg.d_mlp}"
    )
    print(
        f"routing capacity={cfg.capacity} (k={cfg.capacity_tokens(T)} of {T}) routed blocks={list(cfg.routed_layers)} "
        f"causal_routing={cfg.causal_routing}"
    )
    print(f"timed   {fig['timed']}; median of {args.steps} interleaved steps after {run.warmup} warm-up")
    print()


def print_table(run: TrainRun, fig: dict) -> None:
    """One row per stepper: parameters, step times, tokens/s, counted FLOPs and FLOP/s."""
    B, T, mod_f, dense_f = run.args.batch_size, run.args.seq_len, fig["mod_f"], fig["dense_f"]
    rows = [("MoD", run.mod, mod_f), ("dense", run.dense, dense_f)]
    if run.args.compile:  # the compiled pair first (the headline figures), then the eager one
        rows = [
            ("MoD c", run.mod, mod_f),
            ("dense c", run.dense, dense_f),
            ("MoD", run.eager_mod, mod_f),
            ("dense", run.eager_dense, dense_f),
        ]
    hdr = (
        f"{'model':<7}{'params':>10}{'step (median)':>15}{'min':>11}{'max':>11}{'CPU s/step':>12}"
        f"{'tokens/s':>11}{'train FLOPs':>16}{'FLOP/s':>14}"
    )
    print(hdr)
    print("-" * len(hdr))
    for name, s, f in rows:
        print(
            f"{name:<7}{s.model.num_params() / 1e6:>9.2f}M{fmt_time(s.median):>15}{fmt_time(min(s.times)):>11}"
            f"{fmt_time(max(s.times)):>11}{fmt_time(s.cpu_median) if fig['cpu_ratio'] else '-':>12}"
            f"{B * T / s.median:>11.0f}{format_flops(f):>16}"
            f"{f / s.median / 1e12:>10.3f} TF/s"
        )
    print()


def print_compiled(compiled: dict, matmul: MatmulTimer | None) -> None:
    """The --compile lines: speed-ups over eager and the fraction of the matmul's rate reached."""
    if not compiled:
        return
    M, K, N = matmul.shape
    print(
        f"compiled:    speed-up MoD {compiled['compile_speedup_mod']:.2f}x, dense "
        f"{compiled['compile_speedup_dense']:.2f}x (eager step / compiled step; 'c' rows are compiled)"
    )
    print(
        f"             fp32 matmul ({M}x{K} @ {K}x{N}) {compiled['matmul_gflops']:.1f} GFLOP/s; the compiled steps "
        f"reach MoD {compiled['mod_frac_of_matmul']:.2f}, dense {compiled['dense_frac_of_matmul']:.2f} of it; "
        f"eager overhead {compiled['eager_overhead']:.3f}"
    )
    if "cpu_matmul_gflops" in compiled:
        print(
            f"  by CPU time: speed-up MoD {compiled['cpu_compile_speedup_mod']:.2f}x, dense "
            f"{compiled['cpu_compile_speedup_dense']:.2f}x; matmul {compiled['cpu_matmul_gflops']:.1f} GFLOP/s; "
            f"MoD {compiled['cpu_mod_frac_of_matmul']:.2f}, dense {compiled['cpu_dense_frac_of_matmul']:.2f} of "
            f"it; eager overhead {compiled['cpu_eager_overhead']:.3f}"
        )


def print_ratios(fig: dict) -> None:
    """MoD / dense: time, FLOPs, overhead, and the secondary estimates of the time ratio."""
    time_ratio, flop_ratio, paired, cpu_ratio = (
        fig["time_ratio"],
        fig["flop_ratio"],
        fig["paired_ratio"],
        fig["cpu_ratio"],
    )
    print(
        f"MoD / dense: time {time_ratio:.3f}   FLOPs {flop_ratio:.3f}   overhead (time/FLOPs) {fig['overhead']:.3f}   "
        f"speed-up {1 / time_ratio:.2f}x"
    )
    print(f"             median of per-pair time ratios {paired:.3f} (overhead {paired / flop_ratio:.3f})")
    if cpu_ratio is not None:
        print(f"             CPU-time ratio {cpu_ratio:.3f} (overhead {cpu_ratio / flop_ratio:.3f})")
    causal = fig["causal_ratio"]
    print(f"             FLOPs with causal-half attention {causal:.3f} (overhead {time_ratio / causal:.3f})")


def result_json(run: TrainRun, fig: dict, compiled: dict) -> dict:
    """The JSON object printed last (every figure, the raw step times, the setup)."""
    args, cfg, mod, dense, cpu_ratio = run.args, run.mod_cfg, run.mod, run.dense, fig["cpu_ratio"]
    B, T, flop_ratio = args.batch_size, args.seq_len, fig["flop_ratio"]
    return {
        "bench": "train_step",
        "timed": fig["timed"],
        "optimizer": args.optimizer,
        "mod_step_s": mod.median,
        "dense_step_s": dense.median,
        "time_ratio": fig["time_ratio"],
        "flop_ratio": flop_ratio,
        "overhead": fig["overhead"],
        "paired_time_ratio": fig["paired_ratio"],
        "paired_overhead": fig["paired_ratio"] / flop_ratio,
        "flop_ratio_causal_attention": fig["causal_ratio"],
        "mod_step_min_s": min(mod.times),
        "dense_step_min_s": min(dense.times),
        "cpu_time_ratio": cpu_ratio,
        "cpu_overhead": cpu_ratio / flop_ratio if cpu_ratio else None,
        "mod_cpu_s": mod.cpu_median if cpu_ratio else None,
        "dense_cpu_s": dense.cpu_median if cpu_ratio else None,
        "mod_train_flops": fig["mod_f"],
        "dense_train_flops": fig["dense_f"],
        "mod_tokens_per_s": B * T / mod.median,
        "dense_tokens_per_s": B * T / dense.median,
        "mod_step_times_s": mod.times,
        "dense_step_times_s": dense.times,
        "preset": args.preset,
        "batch_size": B,
        "seq_len": T,
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "vocab_size": cfg.vocab_size,
        "capacity": cfg.capacity,
        "k": cfg.capacity_tokens(T),
        "routed_layers": list(cfg.routed_layers),
        "causal_routing": cfg.causal_routing,
        "steps": args.steps,
        "warmup": run.warmup,
        "dtype": args.dtype,
        "tf32": run.device.type == "cuda",
        "threads": fig["threads"],
        "compile": args.compile,
        **compiled,
        **environment(run.device),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark: a table for people, then the JSON object (returned too) as the last line."""
    args = parse_args(argv)
    run = build_run(args, setup_device(args))
    time_steps(run)
    fig = step_figures(run)
    compiled = compile_figures(
        run.eager_mod,
        run.eager_dense,
        run.mod,
        run.dense,
        run.matmul,
        fig["mod_f"],
        fig["dense_f"],
        fig["flop_ratio"],
        cpu=run.device.type == "cpu",
    )
    print_header(run, fig)
    print_table(run, fig)
    print_compiled(compiled, run.matmul)
    print_ratios(fig)
    result = result_json(run, fig, compiled)
    print(json.dumps(result))
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
