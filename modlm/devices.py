"""The ``--device``, ``--dtype`` and ``--threads`` of every command that runs a model.

``parse_device`` is the one device resolver (every command's ``--device`` and
``TrainConfig.device``): a name becomes a ``torch.device`` or a one-line ValueError naming the
flag and the value: a name torch does not know, or a device this machine does not have (torch
itself would answer with an AssertionError or a RuntimeError listing twenty device types).
``resolve_dtype`` / ``autocast``: the precision of a forward on that device.

``add_threads_arg`` / ``use_threads`` are the one ``--threads`` policy of every command: default
1 thread, 0 for torch's default (one per core). Small models on a CPU gain little from a second
thread, and on a CPU another job shares, OpenMP threads waiting on each other made training 1.6x
slower with 2 threads than with 1 (1.45 vs 0.89 s/step) and few-row decoding 50-100x slower.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch

__all__ = [
    "DEVICE_HELP",
    "THREADS_DEFAULT",
    "add_threads_arg",
    "autocast",
    "parse_device",
    "resolve_dtype",
    "set_threads",
    "use_threads",
]

# The one default of every command's --threads (see the module docstring for why 1).
THREADS_DEFAULT = 1

DEVICE_HELP = "auto | cpu | cuda | cuda:N | mps"


def parse_device(name: str, flag: str = "--device", local_rank: int | None = None) -> torch.device:
    """``name`` as a device of this machine; "auto" is CUDA when available, else the CPU.

    ``flag`` names the setting in the error (``--device``, or ``TrainConfig.device``).
    ``local_rank``: a training process (``torchrun`` gives each its rank on the node). Then a bare
    "cuda" (and "auto" on a CUDA machine) means this process's GPU, ``cuda:{local_rank}``, and a
    CUDA device is made the current one, so collectives and ``fused`` AdamW land on it.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        if local_rank is None:
            return torch.device(name)
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{flag}={name!r} is invalid: must be one of {DEVICE_HELP}") from None
    if device.type == "cuda":
        device = _cuda_device(device, name, flag, local_rank)
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{flag}={name!r} is invalid: MPS is not available here (use cpu or auto)")
    elif device.type != "cpu":
        raise ValueError(f"{flag}={name!r} is invalid: must be one of {DEVICE_HELP}")
    return device


def _cuda_device(device: torch.device, name: str, flag: str, local_rank: int | None) -> torch.device:
    """A CUDA ``device`` checked against this machine; for a training process (``local_rank``
    given), made its own GPU and the current device."""
    if not torch.cuda.is_available():
        raise ValueError(f"{flag}={name!r} is invalid: CUDA is not available here (use cpu or auto)")
    n = torch.cuda.device_count()
    if device.index is not None and device.index >= n:
        raise ValueError(f"{flag}={name!r} is invalid: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    if local_rank is not None:
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def resolve_dtype(dtype: str, device: torch.device, flag: str = "TrainConfig.dtype") -> str:
    """``dtype`` (auto | fp32 | bf16) on ``device``: auto is bf16 on a CUDA device that supports
    it, else fp32; bf16 on a CUDA device without it is a ValueError naming ``flag``."""
    if dtype == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"{flag}='bf16' is invalid: {torch.cuda.get_device_name(device)} has no bf16 support (use fp32)"
        )
    return dtype


def autocast(device: torch.device, dtype: str):
    """bf16 autocast over fp32 weights, or no context at all for fp32."""
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def add_threads_arg(parser: argparse.ArgumentParser, default: int = THREADS_DEFAULT) -> None:
    """Add the common ``--threads N`` flag (default 1; 0: torch's default, one per core)."""
    parser.add_argument(
        "--threads",
        type=int,
        default=default,
        metavar="N",
        help="torch CPU threads (default: %(default)s; 0: torch's default, one per core). One thread is "
        "the safe choice on a shared or busy CPU: OpenMP threads waiting on each other can make a step "
        "several times slower",
    )


def set_threads(n: int, flag: str = "--threads") -> int:
    """``torch.set_num_threads(n)`` (0: leave torch's default); returns the previous count.

    A negative ``n`` is a one-line ValueError naming ``flag`` and the value."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{flag}={n!r} is invalid: must be >= 1 (or 0 for torch's default, one per core)")
    previous = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    return previous


@contextlib.contextmanager
def use_threads(n: int, flag: str = "--threads") -> Iterator[int]:
    """Run a block with ``n`` torch CPU threads (``set_threads``), restoring the previous count after."""
    previous = set_threads(n, flag)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
