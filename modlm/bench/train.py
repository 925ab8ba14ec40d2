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

import torch

from modlm.bench import check_minimums, environment
from modlm.config import ModelConfig
from modlm.devices import parse_device
from modlm.errors import ArgumentParser
from modlm.flops import flops, format_flops, train_flops
from modlm.model.transformer import MoDTransformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="base", help="ModelConfig preset (see modlm.config.PRESETS)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (raises max_seq_len if needed)")
    p.add_argument("--capacity", type=float, default=None, help="override the preset's routed capacity")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=sorted(DTYPES),
        help="fp32, or bf16 autocast over fp32 weights (mixed precision training)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    p.add_argument("--optimizer", action="store_true", help="include an AdamW step in the timed region")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and the batch")
    args = p.parse_args(argv)
    check_minimums(
        p,
        [
            ("--batch-size", args.batch_size, 1),
            ("--seq-len", args.seq_len, 2),
            ("--steps", args.steps, 1),
            ("--warmup", args.warmup, 0),
            ("--threads", args.threads, 1),
        ],
    )
    return args


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

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, optimizer: bool, seed: int):
        torch.manual_seed(seed)
        self.model = MoDTransformer(cfg).to(device).train()
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
            loss = self.model(idx_BT, tgt_BT).loss
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


def fmt_time(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.2f} s"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = parse_device(args.device)
    dtype = DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    mod_cfg, dense_cfg = build_configs(args)
    B, T = args.batch_size, args.seq_len
    k = mod_cfg.capacity_tokens(T)
    mod = Stepper(mod_cfg, device, dtype, args.optimizer, args.seed)
    dense = Stepper(dense_cfg, device, dtype, args.optimizer, args.seed)

    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, mod_cfg.vocab_size, (B, T + 1), generator=g).to(device)
    idx_BT, tgt_BT = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    # Interleave, alternating who goes first, so neither model always runs on a warmer cache.
    for i in range(args.warmup + args.steps):
        record = i >= args.warmup
        pair = (mod, dense) if i % 2 == 0 else (dense, mod)
        for s in pair:
            s.step(idx_BT, tgt_BT, record)

    mod_s, dense_s = mod.median, dense.median
    mod_f, dense_f = train_flops(mod_cfg, T, B), train_flops(dense_cfg, T, B)
    time_ratio, flop_ratio = mod_s / dense_s, mod_f / dense_f
    overhead = time_ratio / flop_ratio
    # Step i of MoD and step i of dense ran back to back: their ratio cancels slow drifts in
    # machine load, so its median is a second, often steadier, estimate of the time ratio.
    paired_ratio = statistics.median(m / d for m, d in zip(mod.times, dense.times))
    # Secondary: the FLOP ratio if attention counted only the visible (causal) half, as a kernel
    # that skips masked tiles does (PyTorch's CPU flash kernel and the CUDA flash kernel do).
    try:
        causal_ratio = flops(mod_cfg, T, causal_attention=True).train / flops(dense_cfg, T, causal_attention=True).train
    except TypeError:  # an older modlm.flops without the option
        causal_ratio = None
    threads = torch.get_num_threads() if device.type == "cpu" else None
    # CPU only: process CPU seconds per step. Time a neighbour steals from us is not ours, so with
    # --threads 1 this ratio is the steadiest estimate on a shared machine. With several threads it
    # also counts OpenMP workers spinning at barriers, so prefer wall time there.
    cpu_ratio = mod.cpu_median / dense.cpu_median if device.type == "cpu" else None
    timed = "zero_grad + forward + backward" + (" + AdamW.step" if args.optimizer else "")

    print(
        f"modlm bench_train: torch {torch.__version__}, python {platform.python_version()}, "
        f"device {device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
        f"dtype {args.dtype}" + (f", {threads} threads (nproc {os.cpu_count()})" if threads else "")
    )
    print(
        f"config  preset={args.preset} B={B} T={T} d={mod_cfg.d_model} layers={mod_cfg.n_layers} "
        f"heads={mod_cfg.n_heads} vocab={mod_cfg.vocab_size} d_mlp={mod_cfg.d_mlp}"
    )
    print(
        f"routing capacity={mod_cfg.capacity} (k={k} of {T}) routed blocks={list(mod_cfg.routed_layers)} "
        f"causal_routing={mod_cfg.causal_routing}"
    )
    print(f"timed   {timed}; median of {args.steps} interleaved steps after {args.warmup} warm-up")
    print()
    rows = [("MoD", mod, mod_f), ("dense", dense, dense_f)]
    hdr = (
        f"{'model':<7}{'params':>10}{'step (median)':>15}{'min':>11}{'max':>11}{'CPU s/step':>12}"
        f"{'tokens/s':>11}{'train FLOPs':>16}{'FLOP/s':>14}"
    )
    print(hdr)
    print("-" * len(hdr))
    for name, s, f in rows:
        print(
            f"{name:<7}{s.model.num_params() / 1e6:>9.2f}M{fmt_time(s.median):>15}{fmt_time(min(s.times)):>11}"
            f"{fmt_time(max(s.times)):>11}{fmt_time(s.cpu_median) if cpu_ratio else '-':>12}"
            f"{B * T / s.median:>11.0f}{format_flops(f):>16}"
            f"{f / s.median / 1e12:>10.3f} TF/s"
        )
    print()
    print(
        f"MoD / dense: time {time_ratio:.3f}   FLOPs {flop_ratio:.3f}   overhead (time/FLOPs) {overhead:.3f}   "
        f"speed-up {1 / time_ratio:.2f}x"
    )
    print(f"             median of per-pair time ratios {paired_ratio:.3f} (overhead {paired_ratio / flop_ratio:.3f})")
    if cpu_ratio is not None:
        print(f"             CPU-time ratio {cpu_ratio:.3f} (overhead {cpu_ratio / flop_ratio:.3f})")
    if causal_ratio is not None:
        print(
            f"             FLOPs with causal-half attention {causal_ratio:.3f} (overhead {time_ratio / causal_ratio:.3f})"
        )

    result = {
        "bench": "train_step",
        "timed": timed,
        "optimizer": args.optimizer,
        "mod_step_s": mod_s,
        "dense_step_s": dense_s,
        "time_ratio": time_ratio,
        "flop_ratio": flop_ratio,
        "overhead": overhead,
        "paired_time_ratio": paired_ratio,
        "paired_overhead": paired_ratio / flop_ratio,
        "flop_ratio_causal_attention": causal_ratio,
        "mod_step_min_s": min(mod.times),
        "dense_step_min_s": min(dense.times),
        "cpu_time_ratio": cpu_ratio,
        "cpu_overhead": cpu_ratio / flop_ratio if cpu_ratio else None,
        "mod_cpu_s": mod.cpu_median if cpu_ratio else None,
        "dense_cpu_s": dense.cpu_median if cpu_ratio else None,
        "mod_train_flops": mod_f,
        "dense_train_flops": dense_f,
        "mod_tokens_per_s": B * T / mod_s,
        "dense_tokens_per_s": B * T / dense_s,
        "mod_step_times_s": mod.times,
        "dense_step_times_s": dense.times,
        "preset": args.preset,
        "batch_size": B,
        "seq_len": T,
        "d_model": mod_cfg.d_model,
        "n_layers": mod_cfg.n_layers,
        "n_heads": mod_cfg.n_heads,
        "vocab_size": mod_cfg.vocab_size,
        "capacity": mod_cfg.capacity,
        "k": k,
        "routed_layers": list(mod_cfg.routed_layers),
        "causal_routing": mod_cfg.causal_routing,
        "steps": args.steps,
        "warmup": args.warmup,
        "dtype": args.dtype,
        "tf32": device.type == "cuda",
        "threads": threads,
        **environment(device),
    }
    print(json.dumps(result))
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
