"""The ``--device`` of the commands that run a model (``modlm generate``, the benchmarks).

One function turns the name into a ``torch.device`` or a one-line ValueError naming the flag and
the value: a name torch does not know, or a device this machine does not have (torch itself
would answer with an AssertionError or a RuntimeError listing twenty device types).
"""

from __future__ import annotations

import torch

__all__ = ["DEVICE_HELP", "parse_device"]

DEVICE_HELP = "auto | cpu | cuda | cuda:N | mps"


def parse_device(name: str, flag: str = "--device") -> torch.device:
    """``name`` as a device of this machine; "auto" is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{flag}={name!r} is invalid: must be one of {DEVICE_HELP}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag}={name!r} is invalid: CUDA is not available here (use cpu or auto)")
        n = torch.cuda.device_count()
        if device.index is not None and device.index >= n:
            raise ValueError(f"{flag}={name!r} is invalid: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{flag}={name!r} is invalid: MPS is not available here (use cpu or auto)")
    elif device.type != "cpu":
        raise ValueError(f"{flag}={name!r} is invalid: must be one of {DEVICE_HELP}")
    return device
