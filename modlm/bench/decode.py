"""Decode speed of a Mixture-of-Depths model against its dense twin (cached, causal routing).

Both models live in one process and share every weight but the routers (the dense twin is
``cfg.dense_twin()`` loaded from the MoD state dict). For each batch size and repeat, both decode
the same fresh prompts in lock-step through ``modlm.inference.generate.DecodeSession``: one step of MoD,
one of dense, then dense, MoD, ... so load changes on a shared machine hit both alike.

    tokens/s = new tokens / summed wall clock of the decode steps (prefill excluded)
    speedup  = median over repeats of (MoD tokens/s / dense tokens/s)

The MoD model is a checkpoint (``--ckpt DIR``, thresholds as saved unless ``--target-fraction``
is given) or a random-init preset whose routed blocks are calibrated with
``modlm.inference.calibrate.calibrate_thresholds`` to route ``--target-fraction`` (default 12.5%) of the
tokens. The routed fraction is printed per layer on the calibration sample, on a held-out
sample, and for the tokens actually decoded.

Host syncs: each decode step copies one routing decision (B causal logits, compared with the
threshold on the host) per routed block, plus the sampled tokens once; the per-call cost of such a copy is measured in isolation
and reported per step and as a share of the MoD step.

Ideal speedups: ``ideal_speedup_flops`` counts matmul FLOPs per decoded token (attention over the
cached context included); ``ideal_speedup_bytes`` counts the memory the blocks read per step
(weights + cached keys/values), which is what bounds small-batch decoding on a CPU: a routed
block's weights are read whenever at least one row of the batch routes into it (probability
1 - (1 - f)^B, 88% for B=16 and f=12.5%), so at batch 16 MoD saves mostly attention traffic.

    python benchmarks/bench_decode.py                       # base preset, B=1 and 16, CPU fp32
    python benchmarks/bench_decode.py --ckpt runs/mod/checkpoints/latest

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
from dataclasses import dataclass

import torch

from modlm.bench import add_common_args, bench_parser, environment, parse_bench_args
from modlm.config import ModelConfig
from modlm.devices import THREADS_DEFAULT, parse_device, set_threads
from modlm.inference.calibrate import calibrate_thresholds, measure_routed_fraction
from modlm.inference.generate import DecodeSession
from modlm.kernels import fewrow as kernels
from modlm.model.transformer import MoDTransformer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    add_common_args(
        p,
        preset_help="ModelConfig preset for a random-init model",
        threads=THREADS_DEFAULT,
        warmup=1,
        warmup_help="untimed runs per batch size first",
        kernels=True,
        seed_help="seed of the weights, prompts and sampling",
    )
    p.add_argument("--ckpt", default=None, help="checkpoint directory of a trained MoD model (instead of --preset)")
    p.add_argument(
        "--causal-routing",
        default=None,
        choices=["predictor", "aux_loss", "both"],
        help="override the preset's causal routing (random init only)",
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="batch sizes timed, one by one")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens decoded per row")
    p.add_argument(
        "--repeats", type=int, default=5, help="timed runs per batch size, fresh prompts each (median reported)"
    )
    p.add_argument(
        "--target-fraction",
        type=float,
        default=None,
        help="calibrate routed blocks to this fraction (default 0.125 for random init; "
        "a checkpoint keeps its thresholds unless given)",
    )
    p.add_argument("--calib-rows", type=int, default=32, help="calibration sample: rows of prompt+new tokens")
    p.add_argument(
        "--data",
        default=None,
        choices=["random", "enwiki"],
        help="prompts/calibration text (default: random tokens for random init, enwiki for --ckpt)",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights and KV cache dtype")
    p.add_argument("--no-sync-probe", action="store_true", help="skip the host-sync measurement")
    args = parse_bench_args(
        p, argv, {"--batch-sizes": 1, "--prompt-len": 1, "--new-tokens": 2, "--repeats": 1, "--calib-rows": 1}
    )
    if args.target_fraction is not None and not 0.0 <= args.target_fraction <= 1.0:
        p.error(f"--target-fraction={args.target_fraction} is invalid: must be in [0, 1]")
    return args


# --------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------


def build_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    if args.ckpt is not None:
        from modlm.training.checkpoint import load_model

        mod = load_model(args.ckpt, device="cpu")
        cfg = mod.config
        if cfg.router == "none":
            raise ValueError(f"--ckpt {args.ckpt} is a dense model: pass a MoD checkpoint")
    else:
        overrides = {} if args.causal_routing is None else {"causal_routing": args.causal_routing}
        cfg = ModelConfig.from_name(args.preset, **overrides)
        if cfg.router == "none":
            raise ValueError(f"--preset {args.preset!r} is dense: pass a routed preset (its twin is built here)")
        torch.manual_seed(args.seed)
        mod = MoDTransformer(cfg)
    need = args.prompt_len + args.new_tokens
    if need > cfg.max_seq_len:
        raise ValueError(f"--prompt-len + --new-tokens = {need} exceeds the model's max_seq_len={cfg.max_seq_len}")
    dense = MoDTransformer(cfg.dense_twin())
    missing, _ = dense.load_state_dict(mod.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"dense twin is missing weights {missing[:3]}...")  # a bug, not bad input
    mod = mod.to(device=device, dtype=dtype).eval()
    dense = dense.to(device=device, dtype=dtype).eval()
    return cfg, mod, dense


def token_pool(args: argparse.Namespace, cfg: ModelConfig, rows: int, length: int) -> tuple[torch.Tensor, str]:
    """(rows, length) token windows: random ids, or enwiki validation text."""
    kind = args.data or ("enwiki" if args.ckpt else "random")
    g = torch.Generator().manual_seed(args.seed + 1)
    if kind == "enwiki":
        try:
            from modlm.training.checkpoint import load_tokenizer_from_checkpoint
            from modlm.training.corpus import prepare_corpus

            # A checkpoint's model reads ids of its own tokenizer; a preset's random model, bytes.
            tokenizer = load_tokenizer_from_checkpoint(args.ckpt) if args.ckpt else None
            val = torch.from_numpy(prepare_corpus(tokenizer=tokenizer).val.astype("int64"))
            if val.numel() > length + 1 and int(val.max()) < cfg.vocab_size:
                starts = torch.randint(0, val.numel() - length, (rows,), generator=g)
                return torch.stack([val[s : s + length] for s in starts.tolist()]), "enwiki validation text"
            note = "validation split too short or vocabulary mismatch"
        except Exception as e:  # noqa: BLE001 - fall back, and say so
            note = f"{type(e).__name__}: {e}"
        print(f"note: enwiki text unavailable ({note}); using random tokens", file=sys.stderr)
    return torch.randint(0, cfg.vocab_size, (rows, length), generator=g), "uniform random token ids"


# --------------------------------------------------------------------------------------------
# Ideal speedups
# --------------------------------------------------------------------------------------------


def block_params(cfg: ModelConfig) -> int:
    D, E = cfg.d_model, cfg.head_dim
    return D * (cfg.n_heads + 2 * cfg.n_kv_heads) * E + D * D + 3 * D * cfg.d_mlp


def decode_flops_per_token(cfg: ModelConfig, frac: dict[int, float], prompt_len: int, new_tokens: int) -> float:
    """Matmul FLOPs per decoded token, averaged over the decode (attention over the cached context).

    A routed block with routed fraction f runs for a fraction f of the tokens, over a cache that
    holds about f of the context; its router (and predictor) runs for every token.
    """
    P, D = block_params(cfg), cfg.d_model
    S_mean = prompt_len + (new_tokens - 1) / 2  # mean context length seen by a decoded token
    total = 2.0 * D * cfg.vocab_size
    for i in range(cfg.n_layers):
        if i in frac:
            f = frac[i]
            total += f * (2 * P + 4 * f * S_mean * D) + 2 * D
            if cfg.uses_predictor:
                total += 2 * (D * cfg.predictor_hidden + cfg.predictor_hidden)
        else:
            total += 2 * P + 4 * S_mean * D
    return total


def bytes_per_step(
    cfg: ModelConfig, frac: dict[int, float], batch: int, prompt_len: int, new_tokens: int, elem_bytes: int
) -> float:
    """Memory traffic of the blocks per decode step: weights plus the cached keys/values read.

    A routed block's weights are streamed whenever at least one of the ``batch`` rows routes
    into it (probability 1 - (1 - f)^B); its rows read a cache holding about f of the context.
    """
    W = block_params(cfg) * elem_bytes
    kv_token = 2 * cfg.n_kv_heads * cfg.head_dim * elem_bytes
    S_mean = prompt_len + (new_tokens - 1) / 2
    total = 0.0
    for i in range(cfg.n_layers):
        if i in frac:
            f = frac[i]
            total += (1.0 - (1.0 - f) ** batch) * W + batch * f * (f * S_mean) * kv_token
        else:
            total += W + batch * S_mean * kv_token
    return total


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_pair(models: dict, prompts: torch.Tensor, args, seed: int, first: str, device: torch.device):
    """Decode the same prompts with every model, alternating models step by step (the first
    one alternates too), so load changes hit all alike. Returns ({name: tokens/s}, MoD decode
    routed fraction per layer, from its cache)."""
    sessions = {
        name: DecodeSession(
            m, prompts, args.new_tokens, temperature=args.temperature, seed=seed, return_cache=True, ignore_eos=True
        )
        for name, m in models.items()
    }
    mod_cache = sessions["mod"].cache
    routed = list(models["mod"].config.routed_layers)
    prefill_len = {i: mod_cache.layer_lengths(i).sum().item() for i in routed}
    elapsed = dict.fromkeys(models, 0.0)
    live = list(sessions)
    order = [first] + [n for n in sessions if n != first]
    i = 0
    while live:
        for name in order if i % 2 == 0 else order[::-1]:
            if name not in live:
                continue
            sync(device)
            t0 = time.perf_counter()
            more = sessions[name].step()
            sync(device)
            elapsed[name] += time.perf_counter() - t0
            if not more:
                live.remove(name)
        i += 1
    B = prompts.shape[0]
    tps = {name: B * args.new_tokens / elapsed[name] for name in models}
    fed = B * (args.new_tokens - 1)  # the last new token is never fed back
    frac = {i: (mod_cache.layer_lengths(i).sum().item() - prefill_len[i]) / fed for i in routed}
    for sess in sessions.values():
        sess.close()
    return tps, frac


def count_device_syncs(mod, batch: int, device: torch.device, steps: int = 8) -> float | None:
    """Host synchronisations per decode step, counted on CUDA: ``torch.cuda.set_sync_debug_mode``
    warns at every operation that makes the host wait for the device, over ``steps`` decode steps
    of a fresh session (prefill excluded). None on any other device."""
    if device.type != "cuda":
        return None
    import warnings

    prompts = torch.randint(0, mod.config.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(0))
    session = DecodeSession(mod, prompts.to(device), steps + 1, temperature=0.0, seed=0, ignore_eos=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    session.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        session.close()
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def sync_probe(mod, batch: int, device: torch.device, step_s: float) -> dict:
    """Cost of the host copies a decode step makes: the routing decision of each routed block
    (B fp32 logits, ``tolist`` as in ``modlm.inference.decode.HostDecisions``) and the sampled tokens.

    The per-call time is measured in isolation (median of 5 x 200 calls); on an accelerator a
    copy in a real step also waits for the queued kernels, which this does not include.
    """
    logits = torch.randn(batch, device=device)
    n_calls = 200
    per_call = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n_calls):
            logits.tolist()
        per_call.append((time.perf_counter() - t0) / n_calls)
    call_s = statistics.median(per_call)
    n_sync = len(mod.config.routed_layers) + 1
    measured = count_device_syncs(mod, batch, device)
    return {
        "batch": batch,
        "syncs_per_step": n_sync,
        # Counted by CUDA's sync debug mode over real decode steps (None off CUDA: the host is
        # the device there, a copy waits for nothing).
        "measured_syncs_per_step": measured,
        "syncs_per_token": (measured if measured is not None else n_sync) / batch,
        "us_per_call": call_s * 1e6,
        "us_per_step": n_sync * call_s * 1e6,
        "share_of_step": n_sync * call_s / step_s,
    }


@dataclass
class Routing:
    """The data of a run and the MoD model's routing before timing: prompts, calibration
    target (None: the checkpoint's thresholds), thresholds and routed fractions per layer on the
    calibration and the held-out samples."""

    prompts_pool: torch.Tensor  # (rows, prompt_len): each run's prompts, taken in turn
    data_desc: str
    calib_shape: tuple[int, ...]
    target: float | None
    thresholds: dict[int, float]
    frac_calib: dict[int, float]
    frac_held: dict[int, float]


def setup_device(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Apply --threads and --kernels; return --device and --dtype."""
    set_threads(args.threads)
    kernels.set_enabled(args.kernels == "native")
    return parse_device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]


def calibrate(args: argparse.Namespace, cfg: ModelConfig, mod, device: torch.device) -> Routing:
    """Draw the calibration, held-out and prompt samples; calibrate the routed blocks of ``mod``
    to the target fraction (a random-init model: 0.125 unless --target-fraction)."""
    routed = list(cfg.routed_layers)
    T = args.prompt_len + args.new_tokens
    n_prompts = max(args.batch_sizes) * (args.repeats + args.warmup)
    pool, data_desc = token_pool(args, cfg, args.calib_rows * 2 + n_prompts, T)
    calib, heldout = pool[: args.calib_rows].to(device), pool[args.calib_rows : 2 * args.calib_rows].to(device)
    prompts_pool = pool[2 * args.calib_rows :, : args.prompt_len].to(device)

    target = args.target_fraction if (args.target_fraction is not None or args.ckpt) else 0.125
    thresholds = (
        calibrate_thresholds(mod, calib, target)
        if target is not None
        else {i: float(mod.blocks[i].router.threshold) for i in routed}
    )
    frac_calib = measure_routed_fraction(mod, calib)
    frac_held = measure_routed_fraction(mod, heldout)
    return Routing(prompts_pool, data_desc, tuple(calib.shape), target, thresholds, frac_calib, frac_held)


def print_setup(args: argparse.Namespace, cfg: ModelConfig, device: torch.device, routing: Routing) -> None:
    """Where it ran, the model, the data, and the routing per layer before timing."""
    threads = torch.get_num_threads() if device.type == "cpu" else None
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    print(
        f"modlm bench_decode: torch {torch.__version__}, python {platform.python_version()}, device {device} "
        f"({dev_name}), dtype {args.dtype}"
        + (f", {threads} threads (nproc {os.cpu_count()})" if threads else "")
        + f", linear kernels: {kernels.describe()}"
    )
    src = f"checkpoint {args.ckpt}" if args.ckpt else f"preset {args.preset} (random init, seed {args.seed})"
    print(
        f"model   {src}: d={cfg.d_model} layers={cfg.n_layers} heads={cfg.n_heads} vocab={cfg.vocab_size} "
        f"routed blocks={list(cfg.routed_layers)} causal_routing={cfg.causal_routing}"
    )
    print(
        f"data    {routing.data_desc}; prompt {args.prompt_len} + {args.new_tokens} new tokens, temperature "
        f"{args.temperature}; {args.repeats} repeats (+{args.warmup} warm-up), models interleaved step by step"
    )
    target = routing.target
    how = (
        f"calibrated to {target:.3f} on {routing.calib_shape} tokens" if target is not None else "checkpoint thresholds"
    )
    print(f"routing {how}")
    print(f"        {'layer':>5} {'threshold':>10} {'calib':>7} {'held-out':>9}")
    for i in cfg.routed_layers:
        print(
            f"        {i:>5} {routing.thresholds[i]:>10.4f} {routing.frac_calib[i]:>7.3f} {routing.frac_held[i]:>9.3f}"
        )


def time_batches(args: argparse.Namespace, models: dict, prompts_pool: torch.Tensor, device: torch.device) -> dict:
    """{batch size: tokens/s of each model (median and runs), MoD/dense ratios and their median,
    the MoD decode routed fraction per layer}, over --warmup + --repeats runs of fresh prompts."""
    routed = list(models["mod"].config.routed_layers)
    results: dict[int, dict] = {}
    for B in args.batch_sizes:
        runs = {"mod": [], "dense": []}
        fracs = []
        for r in range(args.warmup + args.repeats):
            prompts = prompts_pool[r * B : (r + 1) * B]
            tps, frac = timed_pair(models, prompts, args, args.seed + r, "mod" if r % 2 == 0 else "dense", device)
            if r >= args.warmup:
                for name in models:
                    runs[name].append(tps[name])
                fracs.append(frac)
        ratios = [m / d for m, d in zip(runs["mod"], runs["dense"])]
        results[B] = {
            "mod": statistics.median(runs["mod"]),
            "dense": statistics.median(runs["dense"]),
            "mod_runs": runs["mod"],
            "dense_runs": runs["dense"],
            "ratios": ratios,
            "speedup": statistics.median(ratios),
            "frac": {i: sum(f[i] for f in fracs) / len(fracs) for i in routed},
        }
    return results


def add_ideal_speedups(args: argparse.Namespace, cfg: ModelConfig, results: dict, dtype: torch.dtype) -> None:
    """Each batch size's ideal speed-ups at its decode routed fractions: by FLOPs per token
    (``ideal_flops``) and by bytes read per step (``ideal_bytes``)."""
    P, N = args.prompt_len, args.new_tokens
    flops_dense = decode_flops_per_token(cfg, {}, P, N)
    elem = torch.tensor([], dtype=dtype).element_size()
    for B, r in results.items():
        f_dec = r["frac"]
        r["ideal_flops"] = flops_dense / decode_flops_per_token(cfg, f_dec, P, N)
        r["ideal_bytes"] = bytes_per_step(cfg, {}, B, P, N, elem) / bytes_per_step(cfg, f_dec, B, P, N, elem)


def print_results(results: dict, probes: list[dict]) -> None:
    """The table per batch size, the decode routed fraction per layer, the host-sync costs."""
    print()
    hdr = (
        f"{'batch':>5} {'MoD tok/s':>10} {'dense tok/s':>12} {'speedup':>8} {'routed (decode)':>16} "
        f"{'ideal FLOPs':>12} {'ideal bytes':>12}"
    )
    print(hdr)
    print("-" * len(hdr))
    for B, r in results.items():
        mean_f = sum(r["frac"].values()) / len(r["frac"])
        print(
            f"{B:>5} {r['mod']:>10.1f} {r['dense']:>12.1f} {r['speedup']:>7.2f}x {mean_f:>16.3f} "
            f"{r['ideal_flops']:>11.2f}x {r['ideal_bytes']:>11.2f}x"
        )
    print()
    for B, r in results.items():
        print(
            f"batch {B:>2}: decode routed fraction per layer "
            + ", ".join(f"L{i}={f:.3f}" for i, f in r["frac"].items())
        )
    for p in probes:
        print(
            f"host sync (batch {p['batch']}): {p['syncs_per_step']} per step (one per routed block + the "
            f"sampled tokens), {p['us_per_call']:.1f} us each in isolation = {p['us_per_step']:.1f} us/step = "
            f"{100 * p['share_of_step']:.2f}% of a MoD decode step"
            + (
                f"; counted on the device: {p['measured_syncs_per_step']:.1f} per step"
                if p["measured_syncs_per_step"] is not None
                else ""
            )
            + f"; {p['syncs_per_token']:.2f} per decoded token"
        )


def result_json(
    args: argparse.Namespace, cfg: ModelConfig, device: torch.device, routing: Routing, results: dict, probes: list
) -> dict:
    """The JSON object printed last (per batch size keyed by its string)."""
    routed, frac_held, target = list(cfg.routed_layers), routing.frac_held, routing.target
    nominal = {i: (target if target is not None else frac_held[i]) for i in routed}
    flops_dense = decode_flops_per_token(cfg, {}, args.prompt_len, args.new_tokens)
    return {
        "bench": "decode",
        "speedup_b1": results[1]["speedup"] if 1 in results else None,
        "speedup_b16": results[16]["speedup"] if 16 in results else None,
        "routed_fraction": sum(frac_held.values()) / len(frac_held),
        "routed_fraction_per_layer": {str(i): f for i, f in frac_held.items()},
        "routed_fraction_decode": {str(B): sum(r["frac"].values()) / len(r["frac"]) for B, r in results.items()},
        "target_fraction": target,
        "tokens_per_s": {str(B): {"mod": r["mod"], "dense": r["dense"]} for B, r in results.items()},
        "runs_tokens_per_s": {str(B): {"mod": r["mod_runs"], "dense": r["dense_runs"]} for B, r in results.items()},
        "speedup": {str(B): r["speedup"] for B, r in results.items()},
        "speedup_runs": {str(B): r["ratios"] for B, r in results.items()},
        "ideal_speedup_flops": {str(B): r["ideal_flops"] for B, r in results.items()},
        "ideal_speedup_flops_nominal": flops_dense
        / decode_flops_per_token(cfg, nominal, args.prompt_len, args.new_tokens),
        "ideal_speedup_bytes": {str(B): r["ideal_bytes"] for B, r in results.items()},
        "host_sync": probes,
        "host_sync_us_per_step": {str(p["batch"]): p["us_per_step"] for p in probes},
        "host_syncs_per_token": {str(p["batch"]): p["syncs_per_token"] for p in probes},
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "temperature": args.temperature,
        "data": routing.data_desc,
        "model": args.ckpt or args.preset,
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "routed_layers": routed,
        "causal_routing": cfg.causal_routing,
        "dtype": args.dtype,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "native_kernels": kernels.enabled() and device.type == "cpu",
        **environment(device),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark: a table for people, then the JSON object (returned too) as the last line."""
    args = parse_args(argv)
    device, dtype = setup_device(args)
    cfg, mod, dense = build_models(args, device, dtype)
    routing = calibrate(args, cfg, mod, device)
    print_setup(args, cfg, device, routing)
    results = time_batches(args, {"mod": mod, "dense": dense}, routing.prompts_pool, device)
    probes = [] if args.no_sync_probe else [sync_probe(mod, B, device, B / results[B]["mod"]) for B in args.batch_sizes]
    add_ideal_speedups(args, cfg, results, dtype)
    print_results(results, probes)
    result = result_json(args, cfg, device, routing, results, probes)
    print(json.dumps(result))
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
