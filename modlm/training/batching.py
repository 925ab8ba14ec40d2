"""Batching and metrics: random training windows, fixed evaluation windows, bits per byte.

``get_batch()`` draws random ``(x, y)`` training windows from a token stream with a caller-owned
``torch.Generator`` so a run can be resumed bit-for-bit; ``iter_eval_batches()`` walks fixed,
non-overlapping windows for evaluation; ``bits_per_byte()`` makes losses of different tokenizers
comparable.

Shape suffixes: B = batch size, T = sequence length, N = number of tokens in a split.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["bits_per_byte", "get_batch", "iter_eval_batches"]


def _check_length(data: np.ndarray, seq_len: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if len(data) < seq_len + 1:
        raise ValueError(f"data has {len(data)} tokens, fewer than seq_len + 1 = {seq_len + 1}")


def _to_device(windows: np.ndarray, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) token windows -> int64 (x_BT, y_BT) on ``device``, y shifted left by one."""
    w = torch.from_numpy(windows.astype(np.int64))
    if torch.device(device).type == "cuda":
        # Pinned memory lets the host->device copy overlap with compute.
        w = w.pin_memory().to(device, non_blocking=True)
    else:
        w = w.to(device)
    return w[:, :-1], w[:, 1:]


def get_batch(
    data: np.ndarray,
    batch_size: int,
    seq_len: int,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random training windows.

    Args:
        data: token stream, shape (N,), any integer dtype (a memmap is read lazily).
        batch_size: B.
        seq_len: T.
        generator: CPU generator the window offsets are drawn from; saving and restoring its state
            makes the batch sequence resumable.
        device: where the returned tensors live.
    Returns:
        (x_BT, y_BT) int64 tensors with y[:, t] == x[:, t + 1] within the same window.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_length(data, seq_len)
    # Offsets in [0, N - T - 1] so that every window of T + 1 tokens fits.
    starts_B = torch.randint(0, len(data) - seq_len, (batch_size,), generator=generator).numpy()
    idx_BT1 = starts_B[:, None] + np.arange(seq_len + 1)[None, :]
    return _to_device(np.asarray(data[idx_BT1]), device)


def iter_eval_batches(
    data: np.ndarray,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic, non-overlapping evaluation windows.

    Window k predicts tokens [k*T + 1, k*T + T] of ``data`` (shape (N,)), so each token is a target
    at most once. When ``max_batches`` caps the count, the windows used are spread evenly over the
    whole split instead of taking its beginning, so the estimate covers many documents.

    Yields:
        (x_BT, y_BT) int64 tensors; the last batch may have fewer than ``batch_size`` rows.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    _check_length(data, seq_len)
    n_windows = (len(data) - 1) // seq_len
    wanted = n_windows if max_batches is None else min(n_windows, max_batches * batch_size)
    # Distinct window indices, evenly spaced; distinct multiples of T never overlap.
    windows = np.unique(np.linspace(0, n_windows - 1, wanted).round().astype(np.int64))
    offsets = np.arange(seq_len + 1)[None, :]
    for b in range(0, len(windows), batch_size):
        starts_B = windows[b : b + batch_size] * seq_len
        yield _to_device(np.asarray(data[starts_B[:, None] + offsets]), device)


def bits_per_byte(loss_nats_per_token: float, tokens_per_byte: float = 1.0) -> float:
    """Cross-entropy in nats per token -> bits per UTF-8 byte (tokenizer-independent).

    For the byte tokenizer ``tokens_per_byte`` is 1 and this is ``loss / ln 2``.
    """
    if tokens_per_byte <= 0:
        raise ValueError(f"tokens_per_byte must be > 0, got {tokens_per_byte}")
    return loss_nats_per_token * tokens_per_byte / math.log(2)
