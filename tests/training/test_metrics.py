"""metrics.jsonl: the records a resume must not repeat are dropped, cut lines too."""

from __future__ import annotations

import json

from modlm.training.metrics import MetricsWriter, truncate_metrics


def test_truncate_metrics_drops_records_past_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"event": "start", "step": 0},
        {"event": "train", "step": 2},
        {"event": "checkpoint", "step": 4},
        {"event": "train", "step": 6},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"event": "train", "st')  # cut by a crash
    assert truncate_metrics(path, 4) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 2, 4]
    assert truncate_metrics(path, None) == 0 and path.read_text() == ""


def test_metrics_writer_appends_one_json_object_per_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"event": "start", "step": 0}) + "\n")
    writer = MetricsWriter(path)
    writer.log("train", step=2, loss=1.5)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"event": "start", "step": 0},
        {"event": "train", "step": 2, "loss": 1.5},
    ]
    writer.close()
    MetricsWriter(None).log("train", step=4)  # every rank but 0: writes nothing, anywhere
