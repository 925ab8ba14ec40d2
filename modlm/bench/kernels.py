"""Few-row linear products: torch's F.linear against modlm's native kernel (modlm.kernels.fewrow).

Decoding multiplies a few rows by every weight matrix of a block. This times one block's four
matrices (qkv, attention output, SwiGLU gate+up, down) of a preset, for M rows, with the
weights of ``--blocks`` different blocks cycled so they come from memory, not from cache, as in a
decode step. Both kernels run in the same loop, alternating, per thread count.

    python benchmarks/bench_kernels.py
    python benchmarks/bench_kernels.py --threads 1 2 --rows 1 2 4 16 32

Prints a table (ms per block, and the ratio torch / native) and, as its last line, one JSON
object. Bandwidth is the block's fp32 weight bytes over the time: one row cannot go faster than
the machine streams memory.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

from modlm.bench import add_common_args, bench_parser, environment, parse_bench_args
from modlm.config import ModelConfig
from modlm.kernels import fewrow as kernels


def parse_args(argv=None):
    p = bench_parser(__doc__)
    # No common --threads: this benchmark sweeps a list of thread counts, each timed in turn.
    add_common_args(
        p, preset_help="ModelConfig preset whose block shapes are timed", device=False, seed_help="seed of the weights"
    )
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16, 32], help="rows per product, each timed")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU thread counts, each timed")
    p.add_argument("--blocks", type=int, default=8, help="distinct weight sets cycled (more than the caches hold)")
    p.add_argument("--iters", type=int, default=20, help="timed passes over the blocks per measurement")
    return parse_bench_args(p, argv, {"--rows": 1, "--threads": 1, "--blocks": 1, "--iters": 1})


def block_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of a block's weight matrices."""
    qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    return [(qkv, cfg.d_model), (cfg.d_model, cfg.d_model), (2 * cfg.d_mlp, cfg.d_model), (cfg.d_model, cfg.d_mlp)]


def time_block(fn, weights, inputs, iters: int) -> float:
    """Seconds per block for fn over every block's matrices (after one warm-up pass)."""
    for _ in range(2 if iters > 1 else 1):
        t0 = time.perf_counter()
        for _ in range(iters):
            for blk in weights:
                for w in blk:
                    fn(inputs[w.shape[1]], w)
        dt = time.perf_counter() - t0
    return dt / (iters * len(weights))


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = ModelConfig.from_name(args.preset)
    shapes = block_shapes(cfg)
    g = torch.Generator().manual_seed(args.seed)
    weights = [[torch.randn(o, i, generator=g) * 0.02 for o, i in shapes] for _ in range(args.blocks)]
    block_bytes = 4 * sum(o * i for o, i in shapes)
    rows_limit = kernels.MAX_ROWS
    kernels.MAX_ROWS = max(args.rows)  # time the kernel past its default range too, to show the crossover
    prev_enabled = kernels.set_enabled(True)
    prev_threads = torch.get_num_threads()
    results = []
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for M in args.rows:
                inputs = {i: torch.randn(M, i, generator=g) for _, i in shapes}
                with torch.inference_mode():
                    # Alternate the two so drifts in machine load hit both alike; keep the best of 2.
                    ts, ns = [], []
                    for _ in range(2):
                        ts.append(time_block(F.linear, weights, inputs, args.iters))
                        if kernels.available():
                            ns.append(time_block(kernels.linear, weights, inputs, args.iters))
                t_torch, t_native = min(ts), (min(ns) if ns else None)
                results.append(
                    {
                        "threads": threads,
                        "rows": M,
                        "torch_ms": 1e3 * t_torch,
                        "native_ms": None if t_native is None else 1e3 * t_native,
                        "torch_over_native": None if t_native is None else t_torch / t_native,
                        "torch_gb_s": block_bytes / t_torch / 1e9,
                        "native_gb_s": None if t_native is None else block_bytes / t_native / 1e9,
                    }
                )
    finally:
        kernels.MAX_ROWS = rows_limit
        kernels.set_enabled(prev_enabled)
        torch.set_num_threads(prev_threads)

    print(
        f"modlm bench_kernels: torch {torch.__version__}, python {platform.python_version()}, nproc {os.cpu_count()}; "
        f"native kernel {'available' if kernels.available() else 'NOT available (' + kernels.describe() + ')'}"
    )
    print(
        f"{args.preset} block: {len(shapes)} matrices {shapes}, {block_bytes / 1e6:.1f} MB fp32, "
        f"{args.blocks} blocks cycled; used by modlm for <= {rows_limit} rows"
    )
    print(
        f"{'threads':>7s} {'rows':>5s} {'torch ms':>9s} {'native ms':>10s} {'torch/native':>13s} "
        f"{'torch GB/s':>11s} {'native GB/s':>12s}"
    )
    print("-" * 73)
    for r in results:
        native = (
            f"{r['native_ms']:10.3f} {r['torch_over_native']:12.2f}x"
            if r["native_ms"] is not None
            else f"{'-':>10s} {'-':>13s}"
        )
        native_bw = f"{r['native_gb_s']:12.1f}" if r["native_gb_s"] is not None else f"{'-':>12s}"
        print(f"{r['threads']:7d} {r['rows']:5d} {r['torch_ms']:9.3f} {native} {r['torch_gb_s']:11.1f} {native_bw}")
    out = {
        "bench": "kernels",
        "preset": args.preset,
        "block_bytes": block_bytes,
        "max_rows": rows_limit,
        "available": kernels.available(),
        "results": results,
        **environment(),
    }
    print(json.dumps(out))
    sys.stdout.flush()
    return out


if __name__ == "__main__":
    main()
