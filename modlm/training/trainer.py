"""Training loop: AdamW, warmup + cosine, grad accumulation, eval (top-k and causal routing),
metrics.jsonl (and TensorBoard), atomic checkpoints, exact resume, DDP or FSDP2 under
``torchrun``, ``torch.compile``, activation checkpointing, TOML run files.

    python -m modlm.training --model tiny --data path/to/texts --max-steps 200 --out-dir runs/tiny
    torchrun --nproc_per_node=2 -m modlm.training --model tiny --max-steps 200   # CPU: gloo
    torchrun --nproc_per_node=2 -m modlm.training --config run.toml --parallel fsdp

Resume is exact: a checkpoint holds the weights, the optimizer state, the step (the schedule is a
pure function of it and of the step its stretch began at, see ``--more-steps``) and every RNG the loop draws from (the data generator of each rank and the
global torch RNG the random router uses), so a run killed after a checkpoint and resumed with
``--resume`` ends with the same weights, bit for bit on CPU, as a run never interrupted.
Evaluation runs under a forked RNG and never shifts the training random streams.

A run is a ``Trainer``: ``setup`` (data, model, optimizer, parallel wrapper), ``resume`` (the
checkpoint's optimizer and RNG state), then ``run`` repeats ``step`` and, at their intervals,
``log``, ``evaluate`` and ``save``. The pieces it is made of live beside it: ``config``
(TrainConfig, schedule, flags), ``optim`` (groups and clipping by parameter role),
``distributed`` (process group, parallel strategies), ``device``, ``evaluation``, ``metrics``,
``signals``, ``lock`` (one run per run directory).

What it refuses, each in one line: a run directory another run holds (``RunDirLockedError``) or
that cannot be made, an existing run without ``--resume`` (``RunExistsError``), a run whose loss
or weights stop being finite (``DivergedError``, before any checkpoint of them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from modlm.config import ModelConfig
from modlm.devices import autocast, parse_device, resolve_dtype, use_threads
from modlm.errors import EXPECTED, ArgumentParser, report
from modlm.flops import train_flops
from modlm.model.transformer import ModelOutput, MoDTransformer
from modlm.training import evaluation
from modlm.training.batching import get_batch
from modlm.training.checkpoint import (
    RUN_CHECKPOINT,
    capture_rng_state,
    find_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from modlm.training.config import TrainConfig, add_train_args, lr_at, stream_seed, train_config_from_args
from modlm.training.corpus import prepare_corpus
from modlm.training.distributed import (
    DistInfo,
    all_gather,
    all_reduce_max,
    all_reduce_mean_,
    apply_activation_checkpointing,
    barrier,
    comm_device,
    compile_wrapped,
    dist_info_from_env,
    local_tensor,
    param_digest,
    process_group,
    strategy_for,
    wrap_model,
)
from modlm.training.lock import RunDirLock, RunDirLockedError
from modlm.training.loggers import HEATMAP_TAG, TensorBoardSink, require_tensorboard, routing_heatmap
from modlm.training.metrics import METRICS_FILE, MetricsWriter, truncate_metrics
from modlm.training.optim import apply_hyperparameters, build_optimizer, clip_gradients, clip_groups, set_lr
from modlm.training.progress import ETA_AFTER_STEPS, Console, banner, eta_line, eval_line, plan_line, train_postfix
from modlm.training.runfile import write_resolved
from modlm.training.signals import StopSignal
from modlm.training.tokenizers import load_tokenizer

# Test hook: seconds to sleep after every optimizer step, so a test can kill a tiny run mid-way.
# Sleeping changes no numerics.
STEP_DELAY_ENV = "MODLM_TRAIN_STEP_DELAY_S"
# Settings a resume may change without the note that the run will differ from an uninterrupted
# one: where and how often it writes, its time budget, compile, the device and its threads.
_QUIET_ON_RESUME = (
    "out_dir",
    "max_time_s",
    "eval_interval",
    "ckpt_interval",
    "log_interval",
    "compile",
    "device",
    "eval_batches",
    "more_steps",
    "activation_checkpointing",
    "log",
    "threads",
)
# How ranks agree on a stop: the largest code wins, so a signal on any rank beats the time budget.
_STOP_CODES = {None: 0, "max_time": 1, "signal": 2}
_STOP_REASONS = {code: reason for reason, code in _STOP_CODES.items()}


class RunExistsError(FileExistsError, ValueError):
    """``out_dir`` already holds a run and resuming was not asked for. Also a ValueError (the
    wrong ``--out-dir`` for a new run), so every command-line handler reports it in one line."""


class DivergedError(FloatingPointError, ValueError):
    """The loss or the weights stopped being finite. Also a ValueError (the settings, ``--lr``
    first, do not suit this run), so every command-line handler reports it in one line."""


class StepResult(NamedTuple):
    """What one optimizer step leaves for ``Trainer.log``."""

    lr: float
    grad_norm: torch.Tensor | None  # the LM group's norm before clipping; None with clipping off
    out: ModelOutput  # the last micro-batch's (its router statistics are logged)


class Trainer:
    """One training run of ``cfg`` on this process's rank; ``run()`` does it all.

    Args:
        cfg: the run.
        info: process-group facts (``modlm.training.distributed.process_group``).
        device: where this rank computes (``modlm.devices.parse_device``).
        resume: continue from ``cfg.out_dir``'s checkpoint (a fresh start when there is none);
            without it (and without ``cfg.more_steps``, which implies it) an existing checkpoint
            is an error.
        progress: a tqdm bar on rank 0 when stdout and stderr are terminals; otherwise (and
            with ``progress=False``) one plain line per log event.
        t0: ``time.monotonic()`` at the start of this invocation (the time budget counts from it).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        info: DistInfo,
        device: torch.device,
        resume: bool = False,
        progress: bool = True,
        t0: float | None = None,
    ):
        self.cfg, self.info, self.device = cfg, info, device
        # --more-steps continues a run, so it implies resuming.
        self.resume_requested = resume or cfg.more_steps is not None
        self.t0 = time.monotonic() if t0 is None else t0
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_path = self.out_dir / RUN_CHECKPOINT
        self.comm_device = comm_device(device)
        self.tensorboard: TensorBoardSink | None = None  # rank 0 with --log tensorboard (``setup``)
        self.console = Console(info.main, progress)
        self.metrics = MetricsWriter(None)
        self.state: dict[str, Any] | None = None  # the checkpoint being resumed, if any
        self.ckpt_dir: Path | None = None
        self.start_step, self.extra = 0, {}
        self.schedule_start = 0  # the step this stretch's warmup + cosine starts from (``lr_at``)
        self.pace: tuple[int, float] | None = None  # (step, perf_counter) the pace is measured from
        self.sec_per_step: float | None = None

    def say(self, msg: str) -> None:
        """A line on rank 0's console (``modlm.training.progress.Console``)."""
        self.console.say(msg)

    # ----------------------------------------------------------------------------------------
    # Set-up
    # ----------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Data, model (fresh, or the checkpoint's weights when resuming), optimizer, this rank's
        random streams and the parallel wrapper. The checkpoint's optimizer and RNG state wait
        for ``resume``."""
        cfg, device = self.cfg, self.device
        self.dtype = resolve_dtype(cfg.dtype, device)
        if cfg.log == "tensorboard":  # before any data is read: a missing extra is one line now
            require_tensorboard()
        self.corpus = self._load_data()
        self.model, self.mcfg = self._load_model()
        if self.mcfg.vocab_size < self.corpus.tokenizer.vocab_size:
            raise ValueError(
                f"ModelConfig.vocab_size={self.mcfg.vocab_size} is invalid: the {self.corpus.tokenizer.name} "
                f"tokenizer needs >= {self.corpus.tokenizer.vocab_size}"
            )
        self.model.to(device)
        self.model.train()
        # Parallelism from outside the model, in torchtitan's order: activation checkpointing,
        # then the strategy; the optimizer after it (FSDP replaces the parameters with shards).
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        self.strategy = strategy_for(self.info, cfg.parallel)
        self.wrapped = wrap_model(self.model, self.info, device, self.strategy, self.dtype)
        self.optimizer = build_optimizer(self.model, cfg)
        self.clip_groups = clip_groups(self.model)
        self.data_gen = torch.Generator()
        self.data_gen.manual_seed(stream_seed(cfg.seed, self.info.rank, "data"))
        torch.manual_seed(stream_seed(cfg.seed, self.info.rank, "torch"))
        self.cuda_dev = device if device.type == "cuda" else None
        # Top-k evaluation runs the training graph without gradients, so it compiles (one more
        # graph); causal evaluation stays eager: its token counts per row are data-dependent
        # (``mask_to_padded_indices`` reads K on the host), which would break the graph per block.
        self.eval_model: torch.nn.Module = self.model
        if cfg.compile:
            self.wrapped = compile_wrapped(self.wrapped)
            # Sharded, the blocks are compiled in place already (``compile_wrapped``).
            self.eval_model = self.model if self.wrapped.sharded else torch.compile(self.model)

    def _load_data(self):
        """The token cache: rank 0 builds it, the others read it once it is complete."""
        cfg, info = self.cfg, self.info
        self.tokenizer = load_tokenizer(cfg.tokenizer)

        def prepare():
            return prepare_corpus(
                cfg.data,
                cache_dir=cfg.cache_dir,
                val_fraction=cfg.val_fraction,
                seed=cfg.seed if cfg.split_seed is None else cfg.split_seed,
                tokenizer=self.tokenizer,
            )

        if info.main:
            corpus = prepare()
        barrier(info)
        if not info.main:
            corpus = prepare()
        for split in ("train", "val"):
            n = len(getattr(corpus, split))
            if n < cfg.seq_len + 1:
                raise ValueError(
                    f"TrainConfig.seq_len={cfg.seq_len} is invalid: the {split} split of "
                    f"{cfg.data or 'enwiki'} has only {n} tokens (need seq_len + 1)"
                )
        return corpus

    def _find_existing_run(self) -> None:
        """The run directory's checkpoint, if any (``self.ckpt_dir``), checked before any data is
        read: without ``resume`` an existing checkpoint is an error, never overwritten."""
        self.ckpt_dir = None
        try:
            self.ckpt_dir = find_checkpoint(self.ckpt_path)
        except FileNotFoundError:
            return
        if not self.resume_requested:
            raise RunExistsError(
                f"{self.out_dir} already holds a run ({self.ckpt_dir}); pass --resume to continue it, "
                "--more-steps N to train it further once finished, or pick another --out-dir"
            )

    def _load_model(self) -> tuple[MoDTransformer, ModelConfig]:
        """The checkpoint's model when resuming one (its state kept in ``self.state``), else a
        fresh one initialised from ``cfg.seed``."""
        cfg = self.cfg
        mcfg = cfg.model_config()
        if self.ckpt_dir is None:
            torch.manual_seed(cfg.seed)  # same init on every rank (DDP would broadcast rank 0's anyway)
            return MoDTransformer(mcfg), mcfg
        model, ckpt_mcfg, self.state = load_checkpoint(self.ckpt_dir, device="cpu")
        if ckpt_mcfg != mcfg:
            diff = [
                f.name for f in dataclasses.fields(ModelConfig) if getattr(ckpt_mcfg, f.name) != getattr(mcfg, f.name)
            ]
            self.say(f"note: resuming the checkpoint's model; the requested one differs in {diff}")
        if cfg.seq_len > ckpt_mcfg.max_seq_len:
            raise ValueError(
                f"TrainConfig.seq_len={cfg.seq_len} is invalid: the checkpoint's model has "
                f"max_seq_len={ckpt_mcfg.max_seq_len}"
            )
        return model, ckpt_mcfg

    def resume(self) -> None:
        """Load the checkpoint's optimizer state, step and random streams (a no-op on a fresh run).

        The current config's hyperparameters win over the saved ones (``--more-steps`` sets the
        steps: ``_plan_stretch``). A checkpoint written with another world size has no streams for
        this rank: they are reseeded from the step, with a note that the continuation matches no
        single run.
        """
        state, info = self.state, self.info
        if state is None:
            return
        self.start_step, self.extra = state["step"], state["extra"]
        self.schedule_start = int(self.extra.get("schedule_start", 0))
        new_stretch = self._plan_stretch()
        cfg = self.cfg
        opt_state = state["optimizer"]
        if opt_state is None:
            raise ValueError(f"{self.ckpt_dir} has no optimizer state; it cannot be resumed (load_model it instead)")
        names = {id(p): n for n, p in self.model.named_parameters()}
        expected = [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        if opt_state["param_names"] != expected:
            raise ValueError(
                f"{self.ckpt_dir}/optimizer.json orders parameters differently from this model; cannot resume"
            )
        self.wrapped.load_optimizer(self.optimizer, opt_state["state_dict"])
        apply_hyperparameters(self.optimizer, cfg)
        prefix = f"rank{info.rank}."
        local_rng = {k[len(prefix) :]: v for k, v in state["rng"].items() if k.startswith(prefix)}
        if self.extra.get("world_size", 1) == info.world_size and local_rng:
            restore_rng_state(local_rng, {"data": self.data_gen}, self.cuda_dev)
            restore_rank_buffers(self.model, local_rng)
        else:
            self.say(
                f"note: checkpoint was written with world_size={self.extra.get('world_size')}, now {info.world_size}; "
                "random streams are reseeded (the continuation is not bit-identical to any single run)"
            )
            self.data_gen.manual_seed(stream_seed(cfg.seed, info.rank, f"data@{self.start_step}"))
            torch.manual_seed(stream_seed(cfg.seed, info.rank, f"torch@{self.start_step}"))
        if info.main:
            quiet = (*_QUIET_ON_RESUME, "max_steps", "warmup_steps") if new_stretch else _QUIET_ON_RESUME
            changed = [k for k, v in cfg.to_dict().items() if (state["train"] or {}).get(k, v) != v and k not in quiet]
            if changed:
                self.say(
                    f"note: resuming with changed settings {changed}; the run will differ from an uninterrupted one"
                )

    def _plan_stretch(self) -> bool:
        """With ``--more-steps N``, the steps this invocation trains; True when it starts a new stretch.

        A run that has reached the ``max_steps`` its checkpoint planned gets a new stretch of N
        steps, ``[step, step + N)``, with its own schedule: a warmup of ``min(warmup_steps, N)``
        steps back up to ``lr``, then a cosine down to ``min_lr`` (``lr_at`` from
        ``schedule_start``). A run stopped before its planned end first finishes that plan, with the
        schedule it had, so stopping and resuming changes nothing (N is not added then).
        """
        cfg, step = self.cfg, self.start_step
        if cfg.more_steps is None:
            return False
        saved = self.state.get("train") or {}
        planned_end = int(saved.get("max_steps", cfg.max_steps))
        if step < planned_end:
            warmup = int(saved.get("warmup_steps", cfg.warmup_steps))
            self.cfg = dataclasses.replace(cfg, max_steps=planned_end, warmup_steps=warmup)
            self.say(
                f"note: the run stopped at step {step} of its planned {planned_end}; finishing those first "
                f"(--more-steps {cfg.more_steps} adds steps to a finished run)"
            )
            return False
        n = cfg.more_steps
        self.schedule_start = step
        self.cfg = dataclasses.replace(cfg, max_steps=step + n, warmup_steps=min(cfg.warmup_steps, n))
        self.say(
            f"note: continuing the finished run (step {step}) for {n} more steps: warmup {self.cfg.warmup_steps} "
            f"steps to lr {cfg.lr:g}, then a cosine to min_lr {cfg.min_lr:g} at step {step + n}"
        )
        return True

    def _begin(self) -> None:
        """Counters (carried over from the checkpoint), the metrics file, the header lines and the
        "start" event."""
        cfg, info, mcfg = self.cfg, self.info, self.mcfg
        resumed = self.state is not None
        self.seqs_per_step = cfg.batch_size * cfg.grad_accum * info.world_size
        self.tokens_per_step = self.seqs_per_step * cfg.seq_len
        self.step_flops = train_flops(mcfg, cfg.seq_len, self.seqs_per_step)
        dense_flops = train_flops(mcfg.dense_twin(), cfg.seq_len, self.seqs_per_step)
        self.n_params = self.model.num_params()
        self.step_delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
        self.elapsed_before = float(self.extra.get("elapsed_s", 0.0))
        self.tokens_seen = int(self.extra.get("tokens_seen", 0))
        self.last_eval: dict[str, Any] = dict(self.extra.get("last_eval") or {})
        self.last_train: dict[str, Any] = dict(self.extra.get("last_train") or {})
        self.global_step = self.start_step
        self.stop_reason = "max_steps"
        self.saved_step = self.start_step if resumed else -1
        self.evaluated_step = int(self.last_eval.get("step", -1))
        self.loss_sum = torch.zeros((), device=self.device)
        self.lm_sum = torch.zeros((), device=self.device)
        self.interval_steps, self.t_interval = 0, time.perf_counter()
        if not info.main:
            return
        truncate_metrics(self.out_dir / METRICS_FILE, self.start_step if resumed else None)
        if cfg.log == "tensorboard":
            self.tensorboard = TensorBoardSink(self.out_dir, purge_step=self.start_step + 1 if resumed else None)
        self.metrics = MetricsWriter(self.out_dir / METRICS_FILE, [self.tensorboard] if self.tensorboard else [])
        write_resolved(cfg, self.out_dir)  # what `--resume` reads back (modlm.training.runfile)
        self._print_banner(dense_flops)
        self.metrics.log(
            "start",
            step=self.start_step,
            resumed=resumed,
            train=cfg.to_dict(),
            model=mcfg.to_dict(),
            params=self.n_params,
            flops_per_step=self.step_flops,
            dense_flops_per_step=dense_flops,
            tokens_per_step=self.tokens_per_step,
            schedule_start=self.schedule_start,
            world_size=info.world_size,
            parallel=self.strategy,
            device=str(self.device),
            dtype=self.dtype,
        )

    def _print_banner(self, dense_flops: int) -> None:
        """The run's banner (``modlm.training.progress.banner``)."""
        corpus = self.corpus
        banner(
            self.console,
            self.cfg,
            self.mcfg,
            params=(self.n_params, self.model.num_params(True)),
            step_flops=self.step_flops,
            dense_flops=dense_flops,
            seqs_per_step=self.seqs_per_step,
            data=f"{corpus.meta.get('source')}: {len(corpus.train):,} train / {len(corpus.val):,} val tokens | "
            f"device {self.device}, dtype {self.dtype}, world size {self.info.world_size}",
            resuming=f"step {self.start_step} ({self.ckpt_dir})" if self.state is not None else None,
            plan=plan_line(self.cfg, self.start_step, self.tokens_per_step),
        )

    def elapsed(self) -> float:
        """Training seconds of the whole run, earlier invocations included."""
        return self.elapsed_before + time.monotonic() - self.t0

    # ----------------------------------------------------------------------------------------
    # The work of one step, one log line, one evaluation, one checkpoint
    # ----------------------------------------------------------------------------------------

    def step(self) -> StepResult:
        """One optimizer step at the schedule's learning rate: ``grad_accum`` micro-batches,
        gradients clipped per clip group (``modlm.training.optim.clip_gradients``)."""
        cfg = self.cfg
        lr = lr_at(self.global_step, cfg, self.schedule_start)
        set_lr(self.optimizer, lr)
        for micro in range(cfg.grad_accum):
            x_BT, y_BT = get_batch(self.corpus.train, cfg.batch_size, cfg.seq_len, self.data_gen, self.device)
            # Gradients are all-reduced only on the last micro-step of the accumulation.
            sync = self.wrapped.no_sync() if micro < cfg.grad_accum - 1 else contextlib.nullcontext()
            with sync:
                with autocast(self.device, self.dtype):
                    out = self.wrapped.module(x_BT, y_BT)
                (out.loss / cfg.grad_accum).backward()
            self.loss_sum += out.loss.detach()
            self.lm_sum += out.lm_loss.detach()
        grad_norm = clip_gradients(self.clip_groups, cfg.grad_clip) if cfg.grad_clip > 0 else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self.interval_steps += 1
        self.tokens_seen += self.tokens_per_step
        return StepResult(lr, grad_norm, out)

    def log(self, result: StepResult) -> None:
        """The "train" event of the steps since the last one: losses averaged over the interval and
        the ranks, throughput, router statistics; a console line or the progress bar's postfix."""
        cfg, step = self.cfg, self.global_step
        sums = torch.stack([self.loss_sum, self.lm_sum]) / (self.interval_steps * cfg.grad_accum)
        loss, lm_loss = all_reduce_mean_(sums, self.info).tolist()
        if not math.isfinite(loss):
            raise self._diverged(f"the training loss is {loss} at step {step}")
        dt = time.perf_counter() - self.t_interval
        tok_s = self.interval_steps * self.tokens_per_step / max(dt, 1e-9)
        stats = result.out.router_stats()
        self.last_train = {
            "step": step,
            "loss": loss,
            "lm_loss": lm_loss,
            "aux_loss": loss - lm_loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm.item() if result.grad_norm is not None else None,
            "tokens_per_s": tok_s,
            "flops_per_s": self.step_flops * self.interval_steps / max(dt, 1e-9),
            "tokens": self.tokens_seen,
            "elapsed_s": self.elapsed(),
        }
        self.metrics.log("train", **self.last_train, router=stats)
        post = train_postfix(loss, lm_loss, tok_s, stats, bool(self.mcfg.routed_layers))
        self.console.train(step, cfg.max_steps, post, result.lr, self._eta_s())
        self.loss_sum.zero_()
        self.lm_sum.zero_()
        self.interval_steps, self.t_interval = 0, time.perf_counter()

    def _diverged(self, what: str) -> DivergedError:
        """The one-line error of a run whose loss or weights stopped being finite."""
        cfg = self.cfg
        kept = f"; the checkpoint of step {self.saved_step} is the last one" if self.saved_step >= 0 else ""
        return DivergedError(
            f"training diverged: {what}; lower --lr (now {cfg.lr:g}) or raise --warmup-steps "
            f"(now {cfg.warmup_steps}){kept}"
        )

    def _check_finite(self) -> None:
        """Refuse to checkpoint a diverged model: the losses of the steps since the last log line and
        every parameter must be finite (ranks agree, so none waits alone in a collective)."""
        # Each rank checks the shard it holds (all of it, but under FSDP).
        checks = [torch.isfinite(self.loss_sum)] + [
            torch.isfinite(local_tensor(p)).all() for p in self.model.parameters()
        ]
        finite = bool(torch.stack(checks).all())
        if all_reduce_max(int(not finite), self.info, self.comm_device):
            raise self._diverged(f"the loss or the weights are not finite at step {self.global_step}")

    def evaluate(self) -> None:
        """Validation loss under top-k and under causal routing (rank 0 evaluates, the others
        only note the step; with sharded weights every rank runs the same batches, rank 0
        reports), as an "eval" event and a console line."""
        self.evaluated_step = step = self.global_step
        if not (self.info.main or self.wrapped.sharded):
            return
        val, tpb = self.corpus.val, self.corpus.tokens_per_byte
        topk = evaluation.evaluate(self.eval_model, val, self.cfg, self.device, self.dtype, tpb, "topk")
        causal = (
            topk
            if self.mcfg.router == "none"
            else evaluation.evaluate(self.model, val, self.cfg, self.device, self.dtype, tpb, "causal")
        )
        heatmap = None
        if self.cfg.log == "tensorboard":  # every rank decides alike: a sharded forward needs them all
            x_1T = torch.tensor(val[: self.cfg.seq_len], dtype=torch.long, device=self.device).unsqueeze(0)  # a copy
            with autocast(self.device, self.dtype):
                heatmap = routing_heatmap(self.model, x_1T)
        if not self.info.main:
            return
        self.last_eval = {
            "step": step,
            "val_loss": topk["loss"],
            "val_bpb": topk["bpb"],
            "val_loss_causal": causal["loss"],
            "val_bpb_causal": causal["bpb"],
        }
        if "routed_frac" in causal:
            self.last_eval["causal_routed_frac"] = causal["routed_frac"]
        self.metrics.log("eval", **self.last_eval, tokens=topk["tokens"])
        if heatmap is not None and self.tensorboard is not None:
            self.tensorboard.image(HEATMAP_TAG, heatmap, step)
        self.say(eval_line(step, topk, causal))

    def save(self) -> None:
        """Checkpoint this step (never a diverged one): every rank's random streams are gathered,
        rank 0 writes."""
        self._check_finite()
        self.saved_step = self.global_step
        local = capture_rng_state({"data": self.data_gen}, self.cuda_dev)
        if self.info.enabled:  # each replica's own running statistics, for an exact resume
            local.update(capture_rank_buffers(self.model))
        rng: dict[str, Any] = {}
        for key in sorted(local):  # same keys on every rank
            parts = all_gather(local[key], self.info, self.comm_device)
            rng.update({f"rank{r}.{key}": t for r, t in enumerate(parts)})
        model_state, optimizer_state = self.wrapped.gather_state(self.optimizer)  # a collective under FSDP
        if not self.info.main:
            return
        extra_state = {
            "world_size": self.info.world_size,
            "schedule_start": self.schedule_start,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed(),
            "last_eval": self.last_eval,
            "last_train": self.last_train,
        }
        path = save_checkpoint(
            self.ckpt_path,
            self.model,
            self.mcfg,
            self.cfg.to_dict(),
            self.optimizer,
            self.global_step,
            extra_state,
            rng,
            tokenizer=self.tokenizer,
            model_state=model_state,
            optimizer_state=optimizer_state,
        )
        self.metrics.log("checkpoint", step=self.global_step, path=str(path))

    def _agreed_stop(self, stop_signal: StopSignal) -> str | None:
        """Why to stop after this step (a signal, the time budget), or None. Ranks agree on it, or
        one would wait forever in an all-reduce; across ranks any signal reads "signal"."""
        cfg = self.cfg
        reason = stop_signal.reason or (
            "max_time" if cfg.max_time_s is not None and time.monotonic() - self.t0 >= cfg.max_time_s else None
        )
        if self.info.enabled:
            code = all_reduce_max(_STOP_CODES.get(reason, _STOP_CODES["signal"]), self.info, self.comm_device)
            reason = _STOP_REASONS[code]
        return reason

    # ----------------------------------------------------------------------------------------
    # The loop
    # ----------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Hold the run directory, set up, resume, train to ``max_steps`` (or a stop signal, or the
        time budget) and end with an evaluation and a checkpoint of the last step; returns the
        summary."""
        with self._hold_run_dir():
            try:
                self._find_existing_run()
                self.setup()
                self.resume()
                self._begin()
                self._loop()
                # A run stopped early still ends with an evaluation and a checkpoint of its last step.
                if self.evaluated_step != self.global_step:
                    self.evaluate()
                if self.saved_step != self.global_step:
                    self.save()
                return self._finish()
            finally:
                self.metrics.close()
                if self.tensorboard is not None:  # closed by metrics too, unless set-up failed before it
                    self.tensorboard.close()

    def _hold_run_dir(self) -> contextlib.AbstractContextManager:
        """Rank 0 takes the run directory's lock (``modlm.training.lock``); every rank learns
        whether it could, so a refused DDP run stops on all ranks with one line."""
        lock, error = None, None
        if self.info.main:
            try:
                lock = RunDirLock(self.out_dir, say=self.say).acquire()
            except ValueError as e:
                error = e
        if all_reduce_max(int(error is not None), self.info, self.comm_device) and error is None:
            raise RunDirLockedError(f"{self.out_dir}: rank 0 could not take the run directory")
        if error is not None:
            raise error
        return lock if lock is not None else contextlib.nullcontext()

    def _loop(self) -> None:
        """The steps, with their log lines, evaluations and checkpoints at their intervals, until
        ``max_steps``, a stop signal or the time budget."""
        cfg = self.cfg
        with self.console.steps(cfg.max_steps, self.start_step), StopSignal() as stop_signal:
            while self.global_step < cfg.max_steps:
                result = self.step()
                self.console.advance()
                if self.step_delay:
                    time.sleep(self.step_delay)
                step = self.global_step
                if step % cfg.log_interval == 0 or step == cfg.max_steps:
                    self.log(result)
                if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                    self.evaluate()
                reason = self._agreed_stop(stop_signal)
                if step % cfg.ckpt_interval == 0 or step == cfg.max_steps or reason is not None:
                    self.save()
                self._measure_pace()
                if reason is not None:
                    self.stop_reason = reason
                    self.say(f"stopping at step {step}/{cfg.max_steps}: {reason}")
                    break

    def _measure_pace(self) -> None:
        """Seconds per step, from the end of this invocation's first step; after
        ``ETA_AFTER_STEPS`` steps, one line with the ETA (the log lines keep it up to date)."""
        done = self.global_step - self.start_step
        if done in (1, ETA_AFTER_STEPS) and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the steps queued so far are done, not only launched
        now = time.perf_counter()
        if self.pace is None:
            self.pace = (self.global_step, now)
            return
        since_step, since = self.pace
        self.sec_per_step = (now - since) / (self.global_step - since_step)
        if done == ETA_AFTER_STEPS and self.global_step < self.cfg.max_steps:
            self.say(eta_line(self.cfg, self.global_step, self.sec_per_step, self.t0))

    def _eta_s(self) -> float | None:
        """Seconds until this invocation ends (its max_steps or its time budget), once measured."""
        if self.sec_per_step is None:
            return None
        eta = (self.cfg.max_steps - self.global_step) * self.sec_per_step
        if self.cfg.max_time_s is not None:
            eta = min(eta, max(0.0, self.cfg.max_time_s - (time.monotonic() - self.t0)))
        return eta

    def _finish(self) -> dict[str, Any]:
        """The replicas' agreement check (DDP), the summary, its "end" event and the last line."""
        info, step = self.info, self.global_step
        in_sync = None
        if info.enabled:
            digests = all_gather(torch.tensor([param_digest(self.model)], dtype=torch.int64), info, self.comm_device)
            in_sync = len({int(d.item()) for d in digests}) == 1
            self.say(
                f"{self.strategy.upper()} check: parameters {'identical' if in_sync else 'DIFFER'} on all "
                f"{info.world_size} ranks "
                f"(digests {[hex(int(d.item())) for d in digests]})"
            )
        last_train, last_eval = self.last_train, self.last_eval
        summary = {
            "step": step,
            "max_steps": self.cfg.max_steps,
            "schedule_start": self.schedule_start,
            "stop_reason": self.stop_reason,
            "resumed_from": self.start_step if self.state is not None else None,
            "train_loss": last_train.get("lm_loss"),
            "train_aux_loss": last_train.get("aux_loss"),
            "val_loss": last_eval.get("val_loss"),
            "val_bpb": last_eval.get("val_bpb"),
            "val_loss_causal": last_eval.get("val_loss_causal"),
            "val_bpb_causal": last_eval.get("val_bpb_causal"),
            "causal_routed_frac": last_eval.get("causal_routed_frac"),
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed(),
            "tokens_per_s": (step - self.start_step) * self.tokens_per_step / max(time.monotonic() - self.t0, 1e-9),
            "params": self.n_params,
            "flops_per_step": self.step_flops,
            "world_size": info.world_size,
            "parallel": self.strategy,
            "rank": info.rank,
            "ddp_params_in_sync": in_sync,
            "out_dir": str(self.out_dir),
            "checkpoint": str(self.ckpt_path),
        }
        if info.main:
            self.metrics.log("end", **summary)
            self.metrics.close()
            self.say(
                f"done: step {step}, {self.stop_reason}; val loss {summary['val_loss']}, causal "
                f"{summary['val_loss_causal']}; checkpoint {self.ckpt_path}"
            )
        return summary


# Per-rank copies of the model's buffers ride in the checkpoint's per-rank state as raw bytes
# (``rank{r}.buffer.{name}``): the predictors' running statistics of r are updated from each
# rank's own batches, so the state dict (rank 0's) alone would resume rank 1 with rank 0's.
_BUFFER_PREFIX = "buffer."


def capture_rank_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's persistent buffers as flat uint8 CPU tensors (same shapes on every rank)."""
    sd_keys = set(model.state_dict().keys())
    return {
        _BUFFER_PREFIX + name: b.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).clone()
        for name, b in model.named_buffers()
        if name in sd_keys
    }


def restore_rank_buffers(model: torch.nn.Module, local_state: dict[str, torch.Tensor]) -> None:
    """Inverse of ``capture_rank_buffers`` (checkpoints without them keep the state dict's)."""
    for name, b in model.named_buffers():
        raw = local_state.get(_BUFFER_PREFIX + name)
        if raw is not None:
            b.copy_(raw.view(b.dtype).reshape(b.shape))


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train (or, with ``resume``, continue) the run in ``cfg.out_dir``; returns a summary dict.

    Writes ``out_dir/metrics.jsonl`` (events: start, train, eval, checkpoint, end) and the
    checkpoint ``out_dir/checkpoints/latest`` every ``ckpt_interval`` steps and at the end.
    ``resume`` continues from that checkpoint (a fresh start when there is none); without it an
    existing checkpoint is an error (``RunExistsError``, a FileExistsError), so a finished run is never overwritten by
    accident, and ``cfg.more_steps`` trains a finished run further. While it runs, the run holds
    ``out_dir/.lock``: a second run on the same directory raises ``RunDirLockedError`` naming it.
    A loss or weights that stop being finite raise ``DivergedError`` (a FloatingPointError naming --lr) before any
    checkpoint of them is written.
    Under ``torchrun`` (WORLD_SIZE > 1) the same loop runs data-parallel; only rank 0 writes.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train() takes a TrainConfig, got {type(cfg).__name__}")
    t0 = time.monotonic()
    info = dist_info_from_env()
    device = parse_device(cfg.device, "TrainConfig.device", local_rank=info.local_rank)
    with process_group(info, device) as info:
        return Trainer(cfg, info, device, resume=resume, progress=progress, t0=t0).run()


def train_command(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """``train`` as the commands run it: with ``cfg.threads`` torch CPU threads (the one policy of
    ``modlm.devices.use_threads``; 0: torch's default), restored after. Under torchrun every
    process runs this, so each gets that many. ``train`` itself leaves the process's threads
    alone: a caller that trains many runs (``modlm.experiments.sweep``) sets them once."""
    with use_threads(cfg.threads):
        return train(cfg, resume=resume, progress=progress)


def main(argv: list[str] | None = None) -> int:
    """``python -m modlm.training``: parse flags, train, print the summary as JSON (rank 0)."""
    parser = ArgumentParser(prog="python -m modlm.training", description="Train a Mixture-of-Depths LM.")
    add_train_args(parser)
    args = parser.parse_args(argv)
    try:
        summary = train_command(train_config_from_args(args), resume=args.resume, progress=args.progress)
    except (*EXPECTED, KeyboardInterrupt) as e:
        # A bad value, or bad input found at run time (device, data, an existing or busy run, a
        # diverging learning rate): one line, not a traceback (MODLM_DEBUG=1 shows it).
        return report(e, parser.prog)
    if summary["rank"] == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
