"""Training loop: AdamW, warmup + cosine, grad accumulation, eval (top-k and causal routing),
metrics.jsonl, atomic checkpoints, exact resume, and DDP under ``torchrun``.

    python -m modlm.training --model tiny --data path/to/texts --max-steps 200 --out-dir runs/tiny
    torchrun --nproc_per_node=2 -m modlm.training --model tiny --max-steps 200   # CPU: gloo

Resume is exact: a checkpoint holds the weights, the optimizer state, the step (the schedule is a
pure function of it) and every RNG the loop draws from (the data generator of each rank and the
global torch RNG the random router uses), so a run killed after a checkpoint and resumed with
``--resume`` ends with the same weights, bit for bit on CPU, as a run never interrupted.
Evaluation runs under a forked RNG and never shifts the training random streams.
The run's config, schedule and flags live in ``modlm.training.config``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

# torch is imported inside functions: `python -m modlm.training --help` imports this module and
# should stay instant (as modlm.config does).
from modlm.config import ModelConfig
from modlm.training.config import TrainConfig, add_train_args, lr_at, stream_seed, train_config_from_args
from modlm.training.metrics import METRICS_FILE, MetricsWriter, truncate_metrics
from modlm.training.signals import StopSignal

if TYPE_CHECKING:
    from modlm.training.distributed import DistInfo

# Test hook: seconds to sleep after every optimizer step, so a test can kill a tiny run mid-way.
# Sleeping changes no numerics.
STEP_DELAY_ENV = "MODLM_TRAIN_STEP_DELAY_S"


# --------------------------------------------------------------------------------------------
# Runtime pieces
# --------------------------------------------------------------------------------------------


def _router_summary(stats: dict[str, float]) -> tuple[str, float] | None:
    """One number for the progress bar: mean causal-predictor accuracy, else aux-router accuracy."""
    for key in ("pred_acc", "aux_acc"):
        vals = [v for k, v in stats.items() if k.endswith("/" + key)]
        if vals:
            return key, sum(vals) / len(vals)
    return None


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train (or, with ``resume``, continue) the run in ``cfg.out_dir``; returns a summary dict.

    Writes ``out_dir/metrics.jsonl`` (events: start, train, eval, checkpoint, end) and the
    checkpoint ``out_dir/checkpoints/latest`` every ``ckpt_interval`` steps and at the end.
    ``resume`` continues from that checkpoint (a fresh start when there is none); without it an
    existing checkpoint is an error, so a finished run is never overwritten by accident.
    Under ``torchrun`` (WORLD_SIZE > 1) the same loop runs data-parallel; only rank 0 writes.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train() takes a TrainConfig, got {type(cfg).__name__}")
    from modlm.training.device import resolve_device
    from modlm.training.distributed import dist_info_from_env, process_group

    t0 = time.monotonic()
    info = dist_info_from_env()
    device = resolve_device(cfg.device, info.local_rank)
    with process_group(info, device) as info:
        return _train(cfg, resume, progress, info, device, t0)


def _train(cfg: TrainConfig, resume: bool, progress: bool, info: DistInfo, device, t0: float) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from modlm.training.checkpoint import (
        RUN_CHECKPOINT, capture_rng_state, find_checkpoint, load_checkpoint, restore_rng_state, save_checkpoint,
    )
    from modlm.training.data import get_batch, prepare_corpus
    from modlm.flops import flops as flop_report
    from modlm.flops import format_flops, train_flops
    from modlm.model.transformer import MoDTransformer
    from modlm.training.device import autocast, resolve_dtype
    from modlm.training.evaluation import evaluate
    from modlm.training.distributed import (
        all_gather, all_reduce_max, all_reduce_mean_, barrier, comm_device, compile_wrapped, param_digest, wrap_model,
    )
    from modlm.training.optim import apply_hyperparameters, build_optimizer, clip_gradients, clip_groups, set_lr

    def say(msg: str) -> None:
        if info.main:
            (tqdm.write if bar is not None and not bar.disable else print)(msg)
            sys.stdout.flush()

    bar = None
    dtype = resolve_dtype(cfg.dtype, device)
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / RUN_CHECKPOINT
    comm_dev = comm_device(device)

    # --- data: rank 0 builds the token cache, the others read it once it is complete ---
    if info.main:
        corpus = prepare_corpus(cfg.data, cache_dir=cfg.cache_dir, val_fraction=cfg.val_fraction, seed=cfg.seed)
    barrier(info)
    if not info.main:
        corpus = prepare_corpus(cfg.data, cache_dir=cfg.cache_dir, val_fraction=cfg.val_fraction, seed=cfg.seed)
    for split in ("train", "val"):
        n = len(getattr(corpus, split))
        if n < cfg.seq_len + 1:
            raise ValueError(f"TrainConfig.seq_len={cfg.seq_len} is invalid: the {split} split of {cfg.data or 'enwiki'} "
                             f"has only {n} tokens (need seq_len + 1)")

    # --- model, optimizer, RNG: fresh or from the checkpoint ---
    ckpt_dir = None
    try:
        ckpt_dir = find_checkpoint(ckpt_path)
    except FileNotFoundError:
        pass
    if ckpt_dir is not None and not resume:
        raise FileExistsError(f"{ckpt_dir} already holds a checkpoint; pass --resume to continue it or pick "
                              f"another --out-dir")
    mcfg = cfg.model_config()
    state: dict[str, Any] | None = None
    if ckpt_dir is not None:
        model, ckpt_mcfg, state = load_checkpoint(ckpt_dir, device="cpu")
        if ckpt_mcfg != mcfg:
            diff = [f.name for f in dataclasses.fields(ModelConfig) if getattr(ckpt_mcfg, f.name) != getattr(mcfg, f.name)]
            say(f"note: resuming the checkpoint's model; the requested one differs in {diff}")
        mcfg = ckpt_mcfg
        if cfg.seq_len > mcfg.max_seq_len:
            raise ValueError(f"TrainConfig.seq_len={cfg.seq_len} is invalid: the checkpoint's model has "
                             f"max_seq_len={mcfg.max_seq_len}")
    else:
        torch.manual_seed(cfg.seed)  # same init on every rank (DDP would broadcast rank 0's anyway)
        model = MoDTransformer(mcfg)
    if mcfg.vocab_size < corpus.tokenizer.vocab_size:
        raise ValueError(f"ModelConfig.vocab_size={mcfg.vocab_size} is invalid: the {corpus.tokenizer.name} tokenizer "
                         f"needs >= {corpus.tokenizer.vocab_size}")
    model.to(device)
    model.train()
    optimizer = build_optimizer(model, cfg)
    data_gen = torch.Generator()
    data_gen.manual_seed(stream_seed(cfg.seed, info.rank, "data"))
    torch.manual_seed(stream_seed(cfg.seed, info.rank, "torch"))
    cuda_dev = device if device.type == "cuda" else None
    start_step, extra = 0, {}
    if state is not None:
        start_step, extra = state["step"], state["extra"]
        opt_state = state["optimizer"]
        if opt_state is None:
            raise ValueError(f"{ckpt_dir} has no optimizer state; it cannot be resumed (load_model it instead)")
        names = {id(p): n for n, p in model.named_parameters()}
        expected = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        if opt_state["param_names"] != expected:
            raise ValueError(f"{ckpt_dir}/optimizer.json orders parameters differently from this model; cannot resume")
        optimizer.load_state_dict(opt_state["state_dict"])
        apply_hyperparameters(optimizer, cfg)
        prefix = f"rank{info.rank}."
        local_rng = {k[len(prefix):]: v for k, v in state["rng"].items() if k.startswith(prefix)}
        if extra.get("world_size", 1) == info.world_size and local_rng:
            restore_rng_state(local_rng, {"data": data_gen}, cuda_dev)
        else:
            # Different world size: this rank's streams did not exist; reseed them from the step.
            say(f"note: checkpoint was written with world_size={extra.get('world_size')}, now {info.world_size}; "
                "random streams are reseeded (the continuation is not bit-identical to any single run)")
            data_gen.manual_seed(stream_seed(cfg.seed, info.rank, f"data@{start_step}"))
            torch.manual_seed(stream_seed(cfg.seed, info.rank, f"torch@{start_step}"))
        if info.main:
            changed = [k for k, v in cfg.to_dict().items() if (state["train"] or {}).get(k, v) != v
                       and k not in ("out_dir", "max_time_s", "eval_interval", "ckpt_interval",
                                     "log_interval", "compile", "device", "eval_batches")]
            if changed:
                say(f"note: resuming with changed settings {changed}; the run will differ from an uninterrupted one")

    wrapped = wrap_model(model, info, device)  # DDP under torchrun, else the model itself
    if cfg.compile:
        wrapped = compile_wrapped(wrapped)

    # --- bookkeeping ---
    seqs_per_step = cfg.batch_size * cfg.grad_accum * info.world_size
    tokens_per_step = seqs_per_step * cfg.seq_len
    step_flops = train_flops(mcfg, cfg.seq_len, seqs_per_step)
    dense_flops = train_flops(mcfg.dense_twin(), cfg.seq_len, seqs_per_step)
    n_params = model.num_params()
    metrics = MetricsWriter(None)
    if info.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(out_dir / METRICS_FILE, start_step if state is not None else None)
        metrics = MetricsWriter(out_dir / METRICS_FILE)
        rep = flop_report(mcfg, cfg.seq_len)
        print(f"modlm train: {mcfg.name} (router={mcfg.router}, capacity={mcfg.capacity}, routed blocks "
              f"{list(mcfg.routed_layers)}) | params {n_params:,} (non-embedding {model.num_params(True):,})")
        print(f"  FLOPs/step {format_flops(step_flops)} = {seqs_per_step} seq x {cfg.seq_len} tok x "
              f"{format_flops(rep.train_per_token)}/token; dense twin {format_flops(dense_flops)} "
              f"(x{step_flops / dense_flops:.3f})")
        print(f"  data {corpus.meta.get('source')}: {len(corpus.train):,} train / {len(corpus.val):,} val tokens | "
              f"device {device}, dtype {dtype}, world size {info.world_size}")
        if state is not None:
            print(f"  resuming from step {start_step} ({ckpt_dir})")
        print("  train config: " + json.dumps(cfg.to_dict()))
        print("  model config: " + json.dumps(mcfg.to_dict()))
        sys.stdout.flush()
        metrics.log("start", step=start_step, resumed=state is not None, train=cfg.to_dict(), model=mcfg.to_dict(),
                    params=n_params, flops_per_step=step_flops, dense_flops_per_step=dense_flops,
                    tokens_per_step=tokens_per_step, world_size=info.world_size, device=str(device), dtype=dtype)

    step_delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
    elapsed_before = float(extra.get("elapsed_s", 0.0))
    tokens_seen = int(extra.get("tokens_seen", 0))
    last_eval: dict[str, Any] = dict(extra.get("last_eval") or {})
    last_train: dict[str, Any] = dict(extra.get("last_train") or {})
    step = start_step
    stop_reason = "max_steps"
    saved_step = start_step if state is not None else -1
    evaluated_step = int(last_eval.get("step", -1))

    def run_eval() -> None:
        nonlocal last_eval, evaluated_step
        evaluated_step = step
        if not info.main:
            return
        topk = evaluate(model, corpus.val, cfg, device, dtype, corpus.tokens_per_byte, "topk")
        causal = topk if mcfg.router == "none" else evaluate(model, corpus.val, cfg, device, dtype,
                                                             corpus.tokens_per_byte, "causal")
        last_eval = {"step": step, "val_loss": topk["loss"], "val_bpb": topk["bpb"],
                     "val_loss_causal": causal["loss"], "val_bpb_causal": causal["bpb"]}
        if "routed_frac" in causal:
            last_eval["causal_routed_frac"] = causal["routed_frac"]
        metrics.log("eval", **last_eval, tokens=topk["tokens"])
        frac = f", routed {causal['routed_frac']:.3f}" if "routed_frac" in causal else ""
        say(f"step {step}: val loss {topk['loss']:.4f} ({topk['bpb']:.3f} bpb) | causal routing "
            f"{causal['loss']:.4f} ({causal['bpb']:.3f} bpb{frac})")

    def run_save() -> None:
        nonlocal saved_step
        saved_step = step
        local = capture_rng_state({"data": data_gen}, cuda_dev)
        rng: dict[str, Any] = {}
        for key in sorted(local):  # same keys on every rank
            parts = all_gather(local[key], info, comm_dev)
            rng.update({f"rank{r}.{key}": t for r, t in enumerate(parts)})
        if not info.main:
            return
        extra_state = {"world_size": info.world_size, "tokens_seen": tokens_seen, "elapsed_s": elapsed(),
                       "last_eval": last_eval, "last_train": last_train}
        path = save_checkpoint(ckpt_path, model, mcfg, cfg.to_dict(), optimizer, step, extra_state, rng)
        metrics.log("checkpoint", step=step, path=str(path))

    def elapsed() -> float:
        return elapsed_before + time.monotonic() - t0

    # --- train ---
    grad_clip_groups = clip_groups(model)  # the causal predictors apart from the LM
    loss_sum = torch.zeros((), device=device)
    lm_sum = torch.zeros((), device=device)
    interval_steps, t_interval = 0, time.perf_counter()
    bar = tqdm(total=cfg.max_steps, initial=start_step, unit="step", dynamic_ncols=True,
               disable=not (progress and info.main), desc="train")
    try:
        with StopSignal() as stop_signal:
            while step < cfg.max_steps:
                lr = lr_at(step, cfg)
                set_lr(optimizer, lr)
                for micro in range(cfg.grad_accum):
                    x_BT, y_BT = get_batch(corpus.train, cfg.batch_size, cfg.seq_len, data_gen, device)
                    # Gradients are all-reduced only on the last micro-step of the accumulation.
                    sync = wrapped.no_sync() if micro < cfg.grad_accum - 1 else contextlib.nullcontext()
                    with sync:
                        with autocast(device, dtype):
                            out = wrapped.module(x_BT, y_BT)
                        (out.loss / cfg.grad_accum).backward()
                    loss_sum += out.loss.detach()
                    lm_sum += out.lm_loss.detach()
                grad_norm = clip_gradients(grad_clip_groups, cfg.grad_clip) if cfg.grad_clip > 0 else None
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                interval_steps += 1
                tokens_seen += tokens_per_step
                bar.update(1)
                if step_delay:
                    time.sleep(step_delay)

                if step % cfg.log_interval == 0 or step == cfg.max_steps:
                    sums = torch.stack([loss_sum, lm_sum]) / (interval_steps * cfg.grad_accum)
                    loss, lm_loss = all_reduce_mean_(sums, info).tolist()
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"training loss is {loss} at step {step}; lower --lr "
                                                 f"(now {cfg.lr}) or raise --warmup-steps")
                    dt = time.perf_counter() - t_interval
                    tok_s = interval_steps * tokens_per_step / max(dt, 1e-9)
                    stats = out.router_stats()
                    last_train = {"step": step, "loss": loss, "lm_loss": lm_loss, "aux_loss": loss - lm_loss,
                                  "lr": lr, "grad_norm": grad_norm.item() if grad_norm is not None else None,
                                  "tokens_per_s": tok_s, "flops_per_s": step_flops * interval_steps / max(dt, 1e-9),
                                  "tokens": tokens_seen, "elapsed_s": elapsed()}
                    metrics.log("train", **last_train, router=stats)
                    summary_stat = _router_summary(stats)
                    # The LM loss: the total adds the predictor's BCE, which never reaches the LM.
                    post = {"loss": f"{lm_loss:.4f}", "aux": f"{loss - lm_loss:.3f}", "tok/s": f"{tok_s:,.0f}"}
                    if summary_stat is not None:
                        post[summary_stat[0]] = f"{summary_stat[1]:.3f}"
                    if bar.disable and info.main:
                        print(f"step {step}/{cfg.max_steps} " + " ".join(f"{k} {v}" for k, v in post.items())
                              + f" lr {lr:.3g}", flush=True)
                    bar.set_postfix(post, refresh=False)
                    loss_sum.zero_()
                    lm_sum.zero_()
                    interval_steps, t_interval = 0, time.perf_counter()

                if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                    run_eval()

                # Stop requests are agreed on by all ranks, or one would wait forever in an all-reduce.
                reason = stop_signal.reason or ("max_time" if cfg.max_time_s is not None
                                                and time.monotonic() - t0 >= cfg.max_time_s else None)
                if info.enabled:
                    flag = all_reduce_max(0 if reason is None else (1 if reason == "max_time" else 2), info, comm_dev)
                    reason = {0: None, 1: "max_time", 2: "signal"}[flag]
                if step % cfg.ckpt_interval == 0 or step == cfg.max_steps or reason is not None:
                    run_save()
                if reason is not None:
                    stop_reason = reason
                    say(f"stopping at step {step}/{cfg.max_steps}: {reason}")
                    break
    finally:
        bar.close()

    # A run stopped early still ends with an evaluation and a checkpoint of its last step.
    if evaluated_step != step:
        run_eval()
    if saved_step != step:
        run_save()

    in_sync = None
    if info.enabled:
        digests = all_gather(torch.tensor([param_digest(model)], dtype=torch.int64), info, comm_dev)
        in_sync = len({int(d.item()) for d in digests}) == 1
        say(f"DDP check: parameters {'identical' if in_sync else 'DIFFER'} on all {info.world_size} ranks "
            f"(digests {[hex(int(d.item())) for d in digests]})")

    total_s = elapsed()
    summary = {
        "step": step, "max_steps": cfg.max_steps, "stop_reason": stop_reason, "resumed_from": start_step if state is not None else None,
        "train_loss": last_train.get("lm_loss"), "train_aux_loss": last_train.get("aux_loss"), "val_loss": last_eval.get("val_loss"), "val_bpb": last_eval.get("val_bpb"),
        "val_loss_causal": last_eval.get("val_loss_causal"), "val_bpb_causal": last_eval.get("val_bpb_causal"),
        "causal_routed_frac": last_eval.get("causal_routed_frac"), "tokens_seen": tokens_seen, "elapsed_s": total_s,
        "tokens_per_s": (step - start_step) * tokens_per_step / max(time.monotonic() - t0, 1e-9),
        "params": n_params, "flops_per_step": step_flops, "world_size": info.world_size, "rank": info.rank,
        "ddp_params_in_sync": in_sync, "out_dir": str(out_dir), "checkpoint": str(ckpt_path),
    }
    if info.main:
        metrics.log("end", **summary)
        metrics.close()
        say(f"done: step {step}, {stop_reason}; val loss {summary['val_loss']}, causal {summary['val_loss_causal']}; "
            f"checkpoint {ckpt_path}")
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m modlm.training``: parse flags, train, print the summary as JSON (rank 0)."""
    parser = argparse.ArgumentParser(prog="python -m modlm.training", description="Train a Mixture-of-Depths LM.")
    add_train_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = train_config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    try:
        summary = train(cfg, resume=args.resume, progress=args.progress)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        # Bad input found at run time (device, data, an existing run): one line, not a traceback.
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    if summary["rank"] == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
