"""Where a decode step's time goes: MoD and its dense twin, block by block.

Builds the same pair of models as ``bench_decode.py`` (random-init preset calibrated to
``--target-fraction``, or ``--ckpt``), decodes in lock-step, and times every block call of a
decode step with wall-clock wrappers (their own cost, ~1 us per call, is included):

- dense blocks (both models), per call;
- routed blocks, split by how many of the B rows routed into them this step: none (the block
  costs only its causal decision), some (gather, compute those rows, scatter), all;
  within the routed calls, the causal decision, attention and MLP;
- the rest of the step (embedding, final norm, LM head, sampling).

It then states the per-step cost model: step = sum over blocks + rest, and what the MoD step
would cost if skipping were free. Use it to see whether a speed-up is bounded by the routed
blocks' weights (a block runs whenever any row routes into it) or by per-call overhead.

    python benchmarks/profile_decode.py --batch-size 1
    python benchmarks/profile_decode.py --batch-size 16 --steps 96

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch

from modlm.bench import check_minimums
from modlm.bench import decode as bd  # same models, data and calibration as the benchmark
from modlm.errors import ArgumentParser
from modlm.inference.calibrate import calibrate_thresholds
from modlm.inference.generate import DecodeSession
from modlm.kernels import fewrow as kernels
from modlm.spec.kinds import block_spec


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="base")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=128, help="timed decode steps per model")
    p.add_argument("--target-fraction", type=float, default=0.125)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--kernels",
        default="native",
        choices=["native", "torch"],
        help="few-row linear products: modlm.kernels.fewrow' native CPU kernel or torch's F.linear",
    )
    args = p.parse_args(argv)
    check_minimums(
        p,
        [
            ("--batch-size", args.batch_size, 1),
            ("--steps", args.steps, 2),
            ("--prompt-len", args.prompt_len, 1),
            ("--threads", args.threads, 0),
        ],
    )
    if not 0.0 <= args.target_fraction <= 1.0:
        p.error(f"--target-fraction={args.target_fraction} is invalid: must be in [0, 1]")
    return args


class Timer:
    """Accumulates wall-clock seconds and call counts under string keys."""

    def __init__(self):
        self.s = collections.defaultdict(float)
        self.n = collections.Counter()
        self.on = False
        self.rows_routed = 0  # rows that ran a routed block, summed over calls

    def wrap(self, obj, attr: str, key, classify=None):
        fn = getattr(obj, attr)

        def timed(*a, **k):
            if not self.on:
                return fn(*a, **k)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            dt = time.perf_counter() - t0
            name = key if classify is None else classify(out)
            self.s[name] += dt
            self.n[name] += 1
            return out

        setattr(obj, attr, timed)


def routed_kind(timer: Timer, B: int):
    def classify(out):
        b = int(out[1].valid_BK.sum())  # rows routed in this step (a host read, outside the timed call)
        timer.rows_routed += b
        return "routed: no row" if b == 0 else "routed: all rows" if b == B else "routed: some rows"

    return classify


def instrument(timer: Timer, name: str, session, B: int) -> None:
    model = session.model
    for kind, blk in zip(model.config.layer_types, model.blocks):
        if block_spec(kind).routed:
            timer.wrap(blk, "forward", (name, "routed"), routed_kind(timer, B))
            timer.wrap(blk.attn, "forward", (name, "  attention (routed rows)"))
            timer.wrap(blk.mlp, "forward", (name, "  MLP (routed rows)"))
        else:
            timer.wrap(blk, "forward", (name, "dense block"))
    if model.config.routed_layers:
        timer.wrap(session.policy, "flags", (name, "  decision"))  # the causal decisions (modlm.inference.decode)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kernels.set_enabled(args.kernels == "native")
    bargs = bd.parse_args(
        [
            "--preset",
            args.preset,
            "--prompt-len",
            str(args.prompt_len),
            "--new-tokens",
            str(args.steps + 2),
            "--seed",
            str(args.seed),
        ]
        + (["--ckpt", args.ckpt] if args.ckpt else [])
    )
    cfg, mod, dense = bd.build_models(bargs, torch.device("cpu"), torch.float32)
    B = args.batch_size
    pool, _ = bd.token_pool(bargs, cfg, 32 + B, args.prompt_len + args.steps)
    calibrate_thresholds(mod, pool[:32], args.target_fraction)
    prompts = pool[32 : 32 + B, : args.prompt_len]

    timer = Timer()
    sessions = {
        "mod": DecodeSession(mod, prompts, args.steps + 2, seed=args.seed),
        "dense": DecodeSession(dense, prompts, args.steps + 2, seed=args.seed),
    }
    for name, session in sessions.items():
        instrument(timer, name, session, B)
    for s in sessions.values():
        s.step()  # warm-up step, untimed
    step_s = dict.fromkeys(sessions, 0.0)
    timer.on = True
    for i in range(args.steps):
        for name in sessions if i % 2 == 0 else reversed(list(sessions)):
            t0 = time.perf_counter()
            sessions[name].step()
            step_s[name] += time.perf_counter() - t0
    timer.on = False

    # Routed-call buckets are keyed by kind only: attribute them to the MoD model.
    rows = []
    per_step = {}
    for key in sorted(timer.s, key=str):
        model, part = key if isinstance(key, tuple) else ("mod", key)
        ms_step = 1e3 * timer.s[key] / args.steps
        us_call = 1e6 * timer.s[key] / timer.n[key]
        rows.append((model, part, timer.n[key] / args.steps, us_call, ms_step))
        per_step[f"{model}/{part.strip()}"] = {
            "calls_per_step": timer.n[key] / args.steps,
            "us_per_call": us_call,
            "ms_per_step": ms_step,
        }
    step_ms = {k: 1e3 * v / args.steps for k, v in step_s.items()}
    blocks_ms = {m: sum(r[4] for r in rows if r[0] == m and not r[1].startswith("  ")) for m in step_ms}
    rest_ms = {m: step_ms[m] - blocks_ms[m] for m in step_ms}
    skip = per_step.get("mod/routed: no row", {"ms_per_step": 0.0})["ms_per_step"]
    routed_fraction = timer.rows_routed / (len(cfg.routed_layers) * B * args.steps)

    print(
        f"modlm profile_decode: torch {torch.__version__}, cpu, {torch.get_num_threads()} thread(s); "
        f"linear kernels: {kernels.describe()}; "
        f"{args.preset if not args.ckpt else args.ckpt}, batch {B}, prompt {args.prompt_len}, {args.steps} steps, "
        f"routed blocks calibrated to {args.target_fraction}, routing {routed_fraction:.3f} of these tokens"
    )
    print(f"{'model':6s} {'part':28s} {'calls/step':>10s} {'us/call':>9s} {'ms/step':>8s}")
    print("-" * 66)
    for model, part, calls, us, ms in rows:
        print(f"{model:6s} {part:28s} {calls:10.2f} {us:9.1f} {ms:8.3f}")
    for m in ("mod", "dense"):
        print(f"{m:6s} {'rest of step':28s} {'':10s} {'':9s} {rest_ms[m]:8.3f}")
    print("-" * 66)
    print(
        f"step: MoD {step_ms['mod']:.2f} ms, dense {step_ms['dense']:.2f} ms, speedup "
        f"{step_ms['dense'] / step_ms['mod']:.2f}x; with free skips (no-row calls cost 0): "
        f"{step_ms['dense'] / (step_ms['mod'] - skip):.2f}x"
    )
    result = {
        "bench": "profile_decode",
        "batch": B,
        "routed_fraction": routed_fraction,
        "step_ms": step_ms,
        "rest_ms": rest_ms,
        "speedup": step_ms["dense"] / step_ms["mod"],
        "speedup_free_skips": step_ms["dense"] / (step_ms["mod"] - skip),
        "parts": per_step,
        "threads": torch.get_num_threads(),
        "native_kernels": kernels.enabled(),
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
