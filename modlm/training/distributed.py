"""Data parallelism, applied from outside the single-device model.

The process group is started from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``); a world of one never touches ``torch.distributed``. ``wrap_model`` puts the
model behind a parallel strategy picked from ``STRATEGIES``: the training step calls
``WrappedModel.module`` and enters ``WrappedModel.no_sync()`` on accumulation micro-steps whose
gradients must not be synchronised yet. A new strategy (FSDP2's ``fully_shard`` per block) is a
new entry there and a rule in ``strategy_for``; nothing in the model or the loop changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

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
    finally:
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


def param_digest(model: nn.Module) -> int:
    """A 63-bit hash of every parameter's bytes: equal on two ranks iff the weights are identical."""
    h = hashlib.sha256()
    # Parameters only: buffers such as the predictors' running statistics of r are updated from
    # each rank's own batch after DDP broadcast them (as BatchNorm's are) and may differ at the end.
    for _, p in sorted(model.named_parameters()):
        h.update(p.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
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
    """

    module: nn.Module
    no_sync: Callable[[], contextlib.AbstractContextManager]
    strategy: str


def _single(model: nn.Module, info: DistInfo, device: torch.device) -> WrappedModel:
    return WrappedModel(model, contextlib.nullcontext, "none")


def _ddp(model: nn.Module, info: DistInfo, device: torch.device) -> WrappedModel:
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Every parameter gets a gradient in top-k training (the router through r * f, the predictor
    # through its own loss), so no unused-parameter search; the only buffers are constants.
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    return WrappedModel(ddp, ddp.no_sync, "ddp")


STRATEGIES: dict[str, Callable[[nn.Module, DistInfo, torch.device], WrappedModel]] = {
    "none": _single,
    "ddp": _ddp,
}


def strategy_for(info: DistInfo) -> str:
    """The strategy a run gets: DDP for a world of more than one, else none."""
    return "ddp" if info.enabled else "none"


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device, strategy: str | None = None) -> WrappedModel:
    """Apply a parallel strategy (default ``strategy_for(info)``) to a model already on ``device``."""
    strategy = strategy or strategy_for(info)
    if strategy not in STRATEGIES:
        raise ValueError(f"parallel strategy {strategy!r} is unknown; known: {', '.join(STRATEGIES)}")
    return STRATEGIES[strategy](model, info, device)


def compile_wrapped(wrapped: WrappedModel) -> WrappedModel:
    """The same wrapper with its forward under ``torch.compile`` (no_sync still reaches the wrapper)."""
    return replace(wrapped, module=torch.compile(wrapped.module))
