"""``--log tensorboard``: the event file holds the scalars of metrics.jsonl, read back with
TensorBoard's own EventAccumulator, and a routing heatmap per evaluation; without the package it
is one line naming the extra."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from modlm.config import ModelConfig
from modlm.model.transformer import MoDTransformer
from modlm.training.config import TrainConfig
from modlm.training.loggers import HEATMAP_TAG, TB_DIR, flatten_scalars, routing_heatmap
from modlm.training.trainer import train


def _corpus(root: Path) -> Path:
    root.mkdir()
    words = "the of and to in a is that for it as was with be by on not routing depth mixture".split()
    for i in range(4):
        text = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(2000))
        (root / f"doc{i}.txt").write_text(text)
    return root


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(
        model="tiny",
        data=str(_corpus(tmp_path / "corpus")),
        cache_dir=str(tmp_path / "cache"),
        out_dir=str(tmp_path / "run"),
        batch_size=2,
        seq_len=32,
        max_steps=4,
        warmup_steps=1,
        eval_interval=2,
        eval_batches=1,
        ckpt_interval=4,
        log_interval=2,
        device="cpu",
        log="tensorboard",
    )
    base.update(kw)
    return TrainConfig(**base)


def test_flatten_scalars_keeps_every_number_of_an_event():
    fields = {"step": 3, "loss": 1.5, "ok": True, "router": {"L1/routed_frac": 0.125}, "none": None, "n": 7}
    assert flatten_scalars(fields, "train") == {"train/loss": 1.5, "train/router/L1/routed_frac": 0.125, "train/n": 7.0}


def test_tensorboard_holds_the_jsonl_scalars_and_a_routing_heatmap_per_evaluation(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path)
    train(cfg, progress=False)
    acc = EventAccumulator(str(Path(cfg.out_dir) / TB_DIR), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    records = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    expected: dict[str, list[tuple[int, float]]] = {}
    for rec in records:
        if rec["event"] in ("train", "eval"):
            for name, value in flatten_scalars(rec, rec["event"]).items():
                expected.setdefault(name, []).append((rec["step"], value))
    # What the issue names: losses, lr, tokens/s, per-block routed fraction, predictor accuracy.
    for name in ("train/lm_loss", "train/aux_loss", "train/lr", "train/tokens_per_s", "eval/val_loss"):
        assert name in expected
    assert {"train/router/L1/routed_frac", "train/router/L3/pred_acc"} <= set(expected)
    tags = set(acc.Tags()["scalars"])
    assert tags == set(expected) - {"event"}
    for name, points in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(name)]
        assert [s for s, _ in got] == [s for s, _ in points], name
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), name  # float32 in the file
    images = acc.Images(HEATMAP_TAG)
    assert [im.step for im in images] == [2, 4]
    # Two routed blocks under top-k, a separator, two under causal routing; 4 px per cell.
    assert (images[0].height, images[0].width) == (5 * 4, cfg.seq_len * 4)


def test_routing_heatmap_marks_exactly_the_routed_tokens():
    torch.manual_seed(0)
    model = MoDTransformer(ModelConfig.from_name("tiny"))
    x_1T = torch.randint(0, 256, (1, 32))
    img = routing_heatmap(model, x_1T, cell=1)
    assert img.shape == (3, 5, 32) and img.dtype == torch.uint8 and model.training
    k = ModelConfig.from_name("tiny").capacity_tokens(32)
    assert ((img[0, :2] == 255).sum(1) == k).all()  # top-k: k white cells per routed block
    assert (img[0, 2] == 127).all()  # the separator
    dense = MoDTransformer(ModelConfig.from_name("tiny-dense"))
    assert routing_heatmap(dense, x_1T) is None


def test_without_tensorboard_it_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ValueError, match=r"pip install 'modlm\[tb\]'"):
        train(_cfg(tmp_path), progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
