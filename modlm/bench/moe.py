"""Training-step wall clock of MoE and integrated MoDE against their dense twin, side by side.

Three models of one shape (``--preset``, default ``base``: d=512, 8 layers) live in one process,
see the same batch and are stepped in rotation (MoE, MoDE, dense; then starting from the next
one), so drift and noisy neighbours hit all alike; the step time is the median over ``--steps``:

- **MoE**: every block's MLP an MoE of ``--experts`` SwiGLU experts (each the dense MLP's size),
  token-choice top-``--top-k``, no dropping (``--capacity-factor`` to drop).
- **MoDE**: integrated MoDE, the same experts plus ``--noop-experts`` no-op experts (default as
  many as real ones), attention on every token.
- **dense**: the dense twin (``cfg.dense_twin()``).

Timed per step: ``zero_grad`` + forward (LM loss + MoE aux losses) + ``backward``. FLOPs are
``modlm.flops.train_flops`` with each MoE layer's experts at the assignments they really
computed in the timed steps (the ``expert_tokens`` statistic, averaged), so a routed model is
charged for exactly the work it did. ``overhead = time ratio / FLOP ratio`` against dense: 1.0
means the MoE machinery (router, sort, gather, per-expert matmuls, scatter-add) costs nothing
beyond its FLOPs.

    modlm bench moe --threads 1            # CPU; the last line is one JSON object
    modlm bench moe --device cuda --batch-size 8 --seq-len 2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from modlm.bench import add_common_args, bench_parser, environment, parse_bench_args
from modlm.bench.train import DTYPES, Stepper, fmt_time
from modlm.config import ModelConfig
from modlm.devices import THREADS_DEFAULT, parse_device, set_threads
from modlm.flops import flops, format_flops, train_flops


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    add_common_args(
        p,
        preset_help="the shape (a ModelConfig preset; its routing is ignored)",
        threads=THREADS_DEFAULT,
        warmup=1,
        seed_help="seed for weights and the batch",
    )
    p.add_argument("--experts", type=int, default=8, help="real experts per MoE layer")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (1 or 2)")
    p.add_argument("--noop-experts", type=int, default=None, help="no-op experts of MoDE (default: --experts)")
    p.add_argument("--capacity-factor", type=float, default=None, help="expert capacity factor (default: no drop)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model (median reported)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="fp32, or bf16 autocast")
    minimums = {"--experts": 1, "--top-k": 1, "--noop-experts": 1, "--batch-size": 1, "--seq-len": 2, "--steps": 1}
    return parse_bench_args(p, argv, minimums)


def build_configs(args: argparse.Namespace) -> dict[str, ModelConfig]:
    """{"moe", "mode", "dense"} configs of one shape (one-line ValueErrors from ModelConfig)."""
    shape = ModelConfig.from_name(args.preset, router="none")
    if args.seq_len > shape.max_seq_len:
        shape = shape.replace(max_seq_len=args.seq_len)
    moe_fields = dict(n_experts=args.experts, moe_top_k=args.top_k, moe_capacity_factor=args.capacity_factor)
    noop = args.experts if args.noop_experts is None else args.noop_experts
    return {
        "moe": shape.replace(name=f"{args.preset}-moe", block_kind="moe", **moe_fields),
        "mode": shape.replace(
            name=f"{args.preset}-mode-integrated", block_kind="mode-integrated", n_noop_experts=noop, **moe_fields
        ),
        "dense": shape.dense_twin(),
    }


class MoEStepper(Stepper):
    """A ``Stepper`` that also keeps each timed step's per-layer statistics (expert tokens, no-op share)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.stats: list[dict[str, float]] = []

    def step(self, idx_BT: torch.Tensor, tgt_BT: torch.Tensor, record: bool) -> float:
        self._sync()
        t0, c0 = time.perf_counter(), time.process_time()
        self.model.zero_grad(set_to_none=True)
        with self.autocast:
            out = self.model(idx_BT, tgt_BT)
        out.loss.backward()
        self._sync()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if record:
            self.times.append(dt)
            self.cpu_times.append(dc)
            self.stats.append(out.router_stats())  # after the timed region: one host sync
        return dt

    def mean_stat(self, name: str, per: float = 1.0) -> dict[int, float]:
        """{layer: mean over the timed steps of stat ``name``} / ``per``."""
        keys = [k for k in (self.stats[0] if self.stats else {}) if k.endswith(f"/{name}")]
        return {int(k[1:].split("/")[0]): statistics.mean(st[k] for st in self.stats) / per for k in keys}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    device = parse_device(args.device)
    dtype = DTYPES[args.dtype]
    cfgs = build_configs(args)
    B, T = args.batch_size, args.seq_len
    steppers = {name: MoEStepper(cfg, device, dtype, False, args.seed) for name, cfg in cfgs.items()}
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, cfgs["dense"].vocab_size, (B, T + 1), generator=g).to(device)
    idx_BT, tgt_BT = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    order = list(steppers.values())
    for i in range(args.warmup + args.steps):
        for s in order[i % 3 :] + order[: i % 3]:  # rotate who goes first
            s.step(idx_BT, tgt_BT, i >= args.warmup)

    dense_s = steppers["dense"].median
    dense_f = train_flops(cfgs["dense"], T, B)
    result: dict = {"bench": "moe_train_step", "timed": "zero_grad + forward + backward"}
    threads = torch.get_num_threads() if device.type == "cpu" else None
    print(f"modlm bench moe: torch {torch.__version__}, device {device}, dtype {args.dtype}, threads {threads}")
    print(
        f"shape   preset={args.preset} B={B} T={T} d={cfgs['dense'].d_model} layers={cfgs['dense'].n_layers} "
        f"experts={args.experts} top-{args.top_k} no-op={cfgs['mode'].n_noop_experts} "
        f"capacity_factor={args.capacity_factor}"
    )
    print(f"timed   zero_grad + forward + backward; median of {args.steps} rotated steps after {args.warmup} warm-up\n")
    hdr = f"{'model':<7}{'params':>10}{'step (median)':>15}{'train FLOPs':>16}{'time/dense':>12}{'FLOPs/dense':>13}{'overhead':>10}"
    print(hdr)
    print("-" * len(hdr))
    for name in ("moe", "mode", "dense"):
        s = steppers[name]
        # experts at the assignments they computed: the per-sequence mean of the timed steps
        f = B * flops(cfgs[name], T, expert_tokens=s.mean_stat("expert_tokens", per=B)).train
        time_ratio, flop_ratio = s.median / dense_s, f / dense_f
        print(
            f"{name:<7}{s.model.num_params() / 1e6:>9.2f}M{fmt_time(s.median):>15}{format_flops(f):>16}"
            f"{time_ratio:>12.3f}{flop_ratio:>13.3f}{time_ratio / flop_ratio:>10.3f}"
        )
        result[f"{name}_step_s"] = s.median
        result[f"{name}_step_times_s"] = s.times
        if name != "dense":
            result[f"{name}_flop_ratio"] = flop_ratio
            result[f"{name}_time_ratio"] = time_ratio
            result[f"{name}_overhead"] = time_ratio / flop_ratio
            result[f"{name}_paired_overhead"] = (
                statistics.median(a / b for a, b in zip(s.times, steppers["dense"].times)) / flop_ratio
            )
    noop = list(steppers["mode"].mean_stat("noop_frac").values())
    if noop:
        result["mode_noop_frac"] = statistics.mean(noop)
        print(f"\nMoDE: {result['mode_noop_frac']:.3f} of the assignments chose a no-op expert (mean over layers)")
    result.update(
        preset=args.preset,
        batch_size=B,
        seq_len=T,
        experts=args.experts,
        top_k=args.top_k,
        noop_experts=cfgs["mode"].n_noop_experts,
        capacity_factor=args.capacity_factor,
        steps=args.steps,
        warmup=args.warmup,
        dtype=args.dtype,
        threads=threads,
        **environment(device),
    )
    print(json.dumps(result))
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
