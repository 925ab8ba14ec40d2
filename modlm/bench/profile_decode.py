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

import collections
import json
import time

import torch

from modlm.bench import add_common_args, bench_parser, parse_bench_args
from modlm.bench import decode as bd  # same models, data and calibration as the benchmark
from modlm.devices import THREADS_DEFAULT, set_threads
from modlm.inference.calibrate import calibrate_thresholds
from modlm.inference.generate import DecodeSession
from modlm.kernels import fewrow as kernels
from modlm.spec.kinds import block_spec


def parse_args(argv=None):
    p = bench_parser(__doc__)
    add_common_args(
        p,
        preset_help="ModelConfig preset for a random-init model",
        device=False,  # CPU only: the wall-clock wrappers time host calls
        threads=THREADS_DEFAULT,
        kernels=True,
        seed_help="seed of the weights, prompts and sampling",
    )
    p.add_argument("--ckpt", default=None, help="checkpoint directory of a trained MoD model (instead of --preset)")
    p.add_argument("--batch-size", type=int, default=1, help="rows decoded together")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per row")
    p.add_argument("--steps", type=int, default=128, help="timed decode steps per model")
    p.add_argument("--target-fraction", type=float, default=0.125, help="calibrate routed blocks to this fraction")
    args = parse_bench_args(p, argv, {"--batch-size": 1, "--steps": 2, "--prompt-len": 1})
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


def build_sessions(args) -> tuple[dict[str, DecodeSession], int]:
    """The MoD model (calibrated to --target-fraction) and its dense twin, as bench decode builds
    them, each in a decode session over the same prompts; and the number of routed blocks."""
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
    sessions = {
        "mod": DecodeSession(mod, prompts, args.steps + 2, seed=args.seed, ignore_eos=True),
        "dense": DecodeSession(dense, prompts, args.steps + 2, seed=args.seed, ignore_eos=True),
    }
    return sessions, len(cfg.routed_layers)


def profile_steps(sessions: dict[str, DecodeSession], timer: Timer, steps: int) -> dict[str, float]:
    """One untimed step each, then ``steps`` steps of each model, alternating who goes first,
    with every block call timed; returns the summed step seconds per model."""
    for s in sessions.values():
        s.step()  # warm-up step, untimed
    step_s = dict.fromkeys(sessions, 0.0)
    timer.on = True
    for i in range(steps):
        for name in sessions if i % 2 == 0 else reversed(list(sessions)):
            t0 = time.perf_counter()
            sessions[name].step()
            step_s[name] += time.perf_counter() - t0
    timer.on = False
    return step_s


def parts(timer: Timer, steps: int) -> tuple[list[tuple], dict[str, dict]]:
    """The table rows (model, part, calls/step, us/call, ms/step) and the same per "model/part"."""
    # Routed-call buckets are keyed by kind only: attribute them to the MoD model.
    rows = []
    per_step = {}
    for key in sorted(timer.s, key=str):
        model, part = key if isinstance(key, tuple) else ("mod", key)
        ms_step = 1e3 * timer.s[key] / steps
        us_call = 1e6 * timer.s[key] / timer.n[key]
        rows.append((model, part, timer.n[key] / steps, us_call, ms_step))
        per_step[f"{model}/{part.strip()}"] = {
            "calls_per_step": timer.n[key] / steps,
            "us_per_call": us_call,
            "ms_per_step": ms_step,
        }
    return rows, per_step


def print_report(args, routed_fraction: float, rows: list[tuple], step_ms: dict, rest_ms: dict, skip: float) -> None:
    """The parts table, the rest of each step, and the step cost model's speed-ups."""
    print(
        f"modlm profile_decode: torch {torch.__version__}, cpu, {torch.get_num_threads()} thread(s); "
        f"linear kernels: {kernels.describe()}; "
        f"{args.preset if not args.ckpt else args.ckpt}, batch {args.batch_size}, prompt {args.prompt_len}, "
        f"{args.steps} steps, routed blocks calibrated to {args.target_fraction}, routing {routed_fraction:.3f} of "
        "these tokens"
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


def main(argv=None) -> dict:
    """Run the profile: a table for people, then the JSON object (returned too) as the last line."""
    args = parse_args(argv)
    set_threads(args.threads)
    kernels.set_enabled(args.kernels == "native")
    sessions, n_routed = build_sessions(args)
    timer = Timer()
    for name, session in sessions.items():
        instrument(timer, name, session, args.batch_size)
    step_s = profile_steps(sessions, timer, args.steps)

    rows, per_step = parts(timer, args.steps)
    step_ms = {k: 1e3 * v / args.steps for k, v in step_s.items()}
    blocks_ms = {m: sum(r[4] for r in rows if r[0] == m and not r[1].startswith("  ")) for m in step_ms}
    rest_ms = {m: step_ms[m] - blocks_ms[m] for m in step_ms}
    skip = per_step.get("mod/routed: no row", {"ms_per_step": 0.0})["ms_per_step"]
    routed_fraction = timer.rows_routed / (n_routed * args.batch_size * args.steps)
    print_report(args, routed_fraction, rows, step_ms, rest_ms, skip)
    result = {
        "bench": "profile_decode",
        "batch": args.batch_size,
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
