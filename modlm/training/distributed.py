"""Data parallelism, applied from outside the single-device model.

The process group is started from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``); a world of one never touches ``torch.distributed``. ``wrap_model`` puts the
model behind a parallel strategy picked from ``STRATEGIES``: the training step calls
``WrappedModel.module`` and enters ``WrappedModel.no_sync()`` on accumulation micro-steps whose
gradients must not be synchronised yet. A new strategy is a new entry there; nothing in the
model or the loop changes.

- ``none``: the model itself (a world of one).
- ``ddp``: ``DistributedDataParallel``: every rank holds all weights, gradients are all-reduced.
- ``fsdp``: FSDP2, ``torch.distributed.fsdp.fully_shard`` on every block, then on the root
  (embedding, final norm, head): each rank holds 1/world of every weight, gradient and AdamW
  moment; a block's weights are all-gathered just before it runs and freed after. On CUDA with
  bf16 a ``MixedPrecisionPolicy`` gathers bf16 weights and reduces gradients in fp32. Its
  checkpoints are gathered to the usual single-file safetensors format on rank 0
  (``WrappedModel.gather_state``), so a run can resume under any strategy and world size.

``apply_activation_checkpointing`` recomputes each block's update f(x) in the backward pass
instead of keeping its activations (``torch.utils.checkpoint``), also from outside the model.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    """Process-group facts; world_size 1 means no torch.distributed at all."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_info_from_env() -> DistInfo:
    """The facts torchrun exports (a plain ``python`` process: rank 0 of a world of 1)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


@contextlib.contextmanager
def process_group(info: DistInfo, device: torch.device) -> Iterator[DistInfo]:
    """Start the process group for a world of more than one (nccl on CUDA, gloo on CPU), yield
    the facts as the group reports them, and destroy it on the way out, whatever happens."""
    if not info.enabled:
        yield info
        return
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield replace(info, rank=dist.get_rank(), world_size=dist.get_world_size())
        dist.barrier()  # a normal exit: no rank tears its connections down while a peer still uses them
    finally:
        # Free what still refers to the group (an FSDP model's hooks form reference cycles) while
        # the interpreter is alive; left to finalization, gloo's worker threads release their work
        # objects without the GIL and abort the process (a SIGABRT after a finished run).
        gc.collect()
        dist.destroy_process_group()


def comm_device(device: torch.device) -> torch.device:
    """Where collective tensors live: the GPU for nccl, the CPU for gloo."""
    return device if device.type == "cuda" else torch.device("cpu")


def barrier(info: DistInfo) -> None:
    """Wait for every rank (a no-op in a world of one)."""
    if info.enabled:
        dist.barrier()


def all_gather(t: torch.Tensor, info: DistInfo, device: torch.device) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape on all ranks), in rank order, on the CPU."""
    if not info.enabled:
        return [t]
    t = t.to(device)
    parts = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(parts, t)
    return [p.cpu() for p in parts]


def all_reduce_mean_(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average ``t`` over the ranks, in place; returns it."""
    if info.enabled:
        dist.all_reduce(t)
        t /= info.world_size
    return t


def all_reduce_max(value: int, info: DistInfo, device: torch.device) -> int:
    """The largest ``value`` of any rank: how ranks agree on a decision one of them made alone."""
    if not info.enabled:
        return value
    flag = torch.tensor([value], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2-sharded parameter or gradient)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor, else ``t`` itself (for checks every rank makes on
    what it holds, then agrees on with ``all_reduce_max``)."""
    return t.to_local() if is_sharded(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded tensor (a collective: every rank must call it), else ``t``."""
    return t.full_tensor() if is_sharded(t) else t


def param_digest(model: nn.Module) -> int:
    """A 63-bit hash of every parameter's bytes: equal on two ranks iff the weights are identical.

    Sharded (FSDP) parameters are gathered first, so every rank must call it."""
    h = hashlib.sha256()
    # Parameters only: buffers such as the predictors' running statistics of r are updated from
    # each rank's own batch after DDP broadcast them (as BatchNorm's are) and may differ at the end.
    for _, p in sorted(model.named_parameters()):
        full = full_tensor(p.detach())
        h.update(full.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


# --------------------------------------------------------------------------------------------
# Parallel strategies
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrappedModel:
    """The model as the training step runs it.

    module: what the step calls for its forward (the model itself, or a parallel wrapper around
        it); the wrapped model's parameters are the ones the optimizer holds.
    no_sync: a context for accumulation micro-steps that must not synchronise gradients yet
        (the last micro-step of an optimizer step runs outside it).
    strategy: the ``STRATEGIES`` key that built it.
    gather_state: ``gather_state(optimizer) -> (model_state, optimizer_state)``, the full
        (unsharded) state dicts for a checkpoint, or ``(None, None)``: the model's and the
        optimizer's own ``state_dict()`` are already full. A collective under FSDP (every rank
        calls it; rank 0 receives the tensors).
    load_optimizer: ``load_optimizer(optimizer, state_dict)`` loads a full, index-keyed
        ``optimizer.state_dict()`` (as a checkpoint holds it), sharding it where needed.
    sharded: the weights are split over the ranks, so every forward (evaluation too) must run
        on every rank.
    """

    module: nn.Module
    no_sync: Callable[[], contextlib.AbstractContextManager]
    strategy: str
    gather_state: Callable[[torch.optim.Optimizer], tuple[dict | None, dict | None]] = field(
        default=lambda optimizer: (None, None)
    )
    load_optimizer: Callable[[torch.optim.Optimizer, dict], None] = field(
        default=lambda optimizer, state_dict: optimizer.load_state_dict(state_dict)
    )
    sharded: bool = False


def _single(model: nn.Module, info: DistInfo, device: torch.device, dtype: str) -> WrappedModel:
    return WrappedModel(model, contextlib.nullcontext, "none")


def _ddp(model: nn.Module, info: DistInfo, device: torch.device, dtype: str) -> WrappedModel:
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Every parameter gets a gradient in top-k training (the router through r * f, the predictor
    # through its own loss), so no unused-parameter search; the only buffers are constants.
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    return WrappedModel(ddp, ddp.no_sync, "ddp")


def _fsdp(model: nn.Module, info: DistInfo, device: torch.device, dtype: str) -> WrappedModel:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {}
    if device.type == "cuda" and dtype == "bf16":
        # Gather bf16 weights for the matmuls, reduce gradients in fp32 (their sum over ranks
        # loses bits in bf16); the fp32 master weights and AdamW state stay sharded.
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # NOTE: fully_shard cannot shard 0-dim parameters (the causal predictor's r_gain, r_bias).
    # They stay whole on every rank, outside FSDP, and their gradients are averaged over the
    # ranks as soon as they are accumulated (``_average_grad_over_ranks``).
    scalars = {p for p in model.parameters() if p.dim() == 0}
    for p in scalars:
        p.register_post_accumulate_grad_hook(functools.partial(_average_grad_over_ranks, info=info))
    # Per block first, so each block's weights are gathered (and freed) on their own; the root
    # call then takes what is left: the embedding (tied to the head), the final norm and the head.
    for block in model.blocks:
        fully_shard(block, ignored_params=scalars & set(block.parameters()), **kwargs)
    fully_shard(model, ignored_params=scalars, **kwargs)

    @contextlib.contextmanager
    def no_sync() -> Iterator[None]:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return WrappedModel(
        model,
        no_sync,
        "fsdp",
        gather_state=functools.partial(_fsdp_gather_state, model),
        load_optimizer=functools.partial(_fsdp_load_optimizer, model),
        sharded=True,
    )


def _average_grad_over_ranks(p: torch.Tensor, info: DistInfo) -> None:
    """Average ``p.grad`` over the ranks, in place. Run after every accumulation into it, which is
    still right under gradient accumulation: averaging (ranks' common part + this micro-step's
    local part) leaves the common part and averages the local one. Every rank runs the same
    backward graph (shapes are static under top-k), so the collectives line up."""
    all_reduce_mean_(p.grad, info)


def _fsdp_gather_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full model and optimizer state dicts on rank 0's CPU (empty elsewhere), the optimizer's
    keyed by parameter index as ``optimizer.state_dict()`` is in a world of one."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    by_name = get_optimizer_state_dict(model, optimizer, options=opts)
    names = _param_names(model, optimizer)
    index = {name: i for i, name in enumerate(names)}
    state = {index[name]: value for name, value in by_name.get("state", {}).items()}
    groups, start = [], 0
    for group, saved in zip(optimizer.param_groups, by_name.get("param_groups", optimizer.param_groups)):
        n = len(group["params"])
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": list(range(start, start + n))})
        start += n
    return model_sd, {"state": state, "param_groups": groups}


def _fsdp_load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Shard a full, index-keyed optimizer state (every rank holds it) onto this rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    by_name = {
        "state": {names[i]: value for i, value in state_dict["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state_dict["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters by name, in its index order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


STRATEGIES: dict[str, Callable[[nn.Module, DistInfo, torch.device, str], WrappedModel]] = {
    "none": _single,
    "ddp": _ddp,
    "fsdp": _fsdp,
}


def strategy_for(info: DistInfo, requested: str = "auto") -> str:
    """The strategy a run gets: ``requested`` ("auto": DDP), in a world of more than one; in a
    world of one always none (there is nothing to synchronise or shard, and no process group)."""
    if not info.enabled:
        return "none"
    if requested == "none":
        raise ValueError(
            f"TrainConfig.parallel='none' is invalid under torchrun (world size {info.world_size}): the ranks would "
            "train unsynchronised copies; use ddp, fsdp or auto"
        )
    return "ddp" if requested == "auto" else requested


def wrap_model(
    model: nn.Module, info: DistInfo, device: torch.device, strategy: str | None = None, dtype: str = "fp32"
) -> WrappedModel:
    """Apply a parallel strategy (default ``strategy_for(info)``) to a model already on ``device``;
    ``dtype`` ("fp32" | "bf16") picks FSDP's mixed-precision policy on CUDA. Build the optimizer
    after this: FSDP replaces the parameters with sharded ones."""
    strategy = strategy or strategy_for(info)
    if strategy not in STRATEGIES:
        raise ValueError(f"parallel strategy {strategy!r} is unknown; known: {', '.join(STRATEGIES)}")
    return STRATEGIES[strategy](model, info, device, dtype)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every block's update f(x) (attention + MLP) in the backward pass instead of
    storing its activations.

    Applied from outside, on each block instance's ``update`` (its class and parameter names are
    untouched, so checkpoints and parameter roles do not see it), with non-reentrant
    ``torch.utils.checkpoint``. Only f is recomputed, never the routing: a router's decision
    and its side effects (the predictor's running statistics of r) happen once per step, as
    without checkpointing, and f's activations are nearly all of a block's. Costs about one
    more forward of f; the numbers are the same.
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        block.update = functools.partial(checkpoint, block.update, use_reentrant=False)


def compile_wrapped(wrapped: WrappedModel) -> WrappedModel:
    """The same wrapper with its forward under ``torch.compile`` (no_sync still reaches the wrapper).

    Sharded (FSDP): each block is compiled in place instead (``nn.Module.compile``, names kept),
    as torchtitan does: dynamo leaves FSDP's gather and free hooks around each block eager
    (``torch._dynamo.config.skip_fsdp_hooks``) and compiles the block's math between them."""
    if wrapped.sharded:
        for block in wrapped.module.blocks:
            block.compile()
        return wrapped
    return replace(wrapped, module=torch.compile(wrapped.module))
