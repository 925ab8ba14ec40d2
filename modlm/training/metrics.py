"""``metrics.jsonl``: one JSON object per event (start, train, eval, checkpoint, end), and its
repair before a resume."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """metrics.jsonl writer: one JSON object per line, flushed at once. ``path=None`` writes nothing
    (every rank but 0). Each event also goes to the ``sinks`` (``modlm.training.loggers``: an
    object with ``log(event, fields)`` and ``close()``), so they see the very same numbers."""

    def __init__(self, path: Path | None, sinks: list | tuple = ()):
        self.path = path
        self.f = open(path, "a", encoding="utf-8") if path is not None else None
        self.sinks = list(sinks)

    def log(self, event: str, **fields: Any) -> None:
        if self.f is None:
            return
        self.f.write(json.dumps({"event": event, **fields}) + "\n")
        self.f.flush()
        for sink in self.sinks:
            sink.log(event, fields)

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def truncate_metrics(path: Path, max_step: int | None) -> int:
    """Keep the metrics.jsonl records with ``step <= max_step`` (None keeps none); returns how many.

    After a crash, the records written after the checkpoint being resumed would otherwise be
    repeated by the resumed run; a line cut mid-write by the crash is dropped too.
    """
    if not path.exists():
        return 0
    kept = []
    if max_step is not None:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("step", 0) <= max_step:
                kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return len(kept)
