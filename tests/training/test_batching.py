"""Batching and metrics: window shapes and shifts, resumable draws, non-overlapping eval, bits per byte."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from modlm.training.batching import bits_per_byte, get_batch, iter_eval_batches


def test_get_batch_shapes_shift_and_reproducibility() -> None:
    data = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(data, batch_size=4, seq_len=16, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y, x + 1)  # data is a ramp, so each window is contiguous
    x2, _ = get_batch(data, 4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)

    # Resuming from a saved generator state replays the same batches.
    g = torch.Generator().manual_seed(1)
    get_batch(data, 4, 16, g)
    state = g.get_state()
    nxt, _ = get_batch(data, 4, 16, g)
    g.set_state(state)
    assert torch.equal(get_batch(data, 4, 16, g)[0], nxt)


def test_get_batch_covers_both_ends_and_rejects_short_data() -> None:
    data = np.arange(10, dtype=np.uint8)
    x, y = get_batch(data, 500, 9, torch.Generator().manual_seed(0))
    assert x[:, 0].min() == 0 and y[:, -1].max() == 9  # exact fit: the only window is the whole array
    with pytest.raises(ValueError, match=r"10 tokens.*11"):
        get_batch(data, 2, 10, torch.Generator())


def test_iter_eval_batches_are_deterministic_and_non_overlapping() -> None:
    data = np.arange(101, dtype=np.uint8)
    batches = list(iter_eval_batches(data, batch_size=3, seq_len=10))
    assert [b[0].shape[0] for b in batches] == [3, 3, 3, 1]  # 10 windows
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert torch.equal(ys, xs + 1)
    assert torch.equal(xs[:, 0], torch.arange(0, 100, 10))  # each target used exactly once
    capped = list(iter_eval_batches(data, batch_size=2, seq_len=10, max_batches=2))
    starts = torch.cat([x[:, 0] for x, _ in capped])
    assert len(starts) == 4 and starts[0] == 0 and starts[-1] == 90  # spread over the split
    assert len(set(starts.tolist())) == 4
    assert all(torch.equal(a[0], b[0]) for a, b in zip(capped, iter_eval_batches(data, 2, 10, 2)))
    with pytest.raises(ValueError, match="101 tokens"):
        next(iter_eval_batches(data, 2, 200))


def test_bits_per_byte() -> None:
    assert bits_per_byte(math.log(2)) == pytest.approx(1.0)
    assert bits_per_byte(math.log(256)) == pytest.approx(8.0)
    assert bits_per_byte(2.0, tokens_per_byte=0.25) == pytest.approx(0.5 / math.log(2))
    with pytest.raises(ValueError, match="0"):
        bits_per_byte(1.0, tokens_per_byte=0)


def test_memmap_windows_match_array(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    np.arange(300, dtype=np.uint16).tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    x, _ = get_batch(mm, 2, 8, torch.Generator().manual_seed(5))
    x_arr, _ = get_batch(np.asarray(mm), 2, 8, torch.Generator().manual_seed(5))
    assert torch.equal(x, x_arr)
    assert os.path.getsize(path) == 600
