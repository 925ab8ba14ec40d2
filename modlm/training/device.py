"""Where a run computes and in which precision: ``TrainConfig.device`` / ``dtype`` resolved against
the machine, and the autocast context of a forward."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch device of ``TrainConfig.device`` (auto | cpu | cuda | cuda:N).

    "cuda" under torchrun means this process's GPU, ``cuda:{local_rank}``; a CUDA device is made
    the current one, so collectives and ``fused`` AdamW land on it.
    """
    if name == "auto":
        resolved = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        resolved = name
    if resolved.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"TrainConfig.device={name!r} is invalid: CUDA is not available here (use cpu or auto)")
        if resolved == "cuda":
            resolved = f"cuda:{local_rank}"
        device = torch.device(resolved)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``TrainConfig.dtype`` on ``device``: auto is bf16 on a CUDA device that supports it, else fp32."""
    if dtype == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"TrainConfig.dtype='bf16' is invalid: {torch.cuda.get_device_name(device)} has no bf16 support (use fp32)"
        )
    return dtype


def autocast(device: torch.device, dtype: str):
    """bf16 autocast over fp32 weights, or no context at all for fp32."""
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
