"""Where a run's metrics go besides ``metrics.jsonl``: TensorBoard (``--log tensorboard``).

A sink receives every event ``MetricsWriter.log`` writes, so TensorBoard shows exactly the
numbers of the JSONL file: each numeric field of an event is a scalar named ``{event}/{field}``
(nested dicts flattened with ``/``: the per-block router statistics are
``train/router/L1/routed_frac``, ``train/router/L1/pred_acc``, ...), at the event's ``step``.
Besides the scalars, each evaluation adds a routing heatmap image (``routing_heatmap``).

TensorBoard is an optional extra (``pip install 'modlm[tb]'``); without it ``--log tensorboard``
is a one-line error naming the extra, raised before any training.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from modlm.model.eval_mode import eval_mode
from modlm.model.transformer import route_mask

TB_DIR = "tensorboard"
HEATMAP_TAG = "eval/routing"
# Events whose numbers are scalars (start, checkpoint and end describe the run, not a curve).
SCALAR_EVENTS = ("train", "eval")


def flatten_scalars(fields: dict[str, Any], prefix: str) -> dict[str, float]:
    """``{"loss": 1.0, "router": {"L1/routed_frac": 0.1}}`` -> ``{prefix/loss: 1.0,
    prefix/router/L1/routed_frac: 0.1}``: every finite number (not bool, not ``step``)."""
    out: dict[str, float] = {}
    for key, value in fields.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            out.update(flatten_scalars(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            if math.isfinite(value):
                out[name] = float(value)
    return out


def require_tensorboard():
    """``torch.utils.tensorboard.SummaryWriter``, or a one-line ValueError naming the extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(
            "--log tensorboard needs the tensorboard package: pip install 'modlm[tb]' (or pip install tensorboard)"
        ) from None
    return SummaryWriter


class TensorBoardSink:
    """Writes the scalars of train/eval events and the routing heatmaps to ``OUT_DIR/tensorboard``.

    ``purge_step``: a resumed run's first step; TensorBoard hides what an interrupted invocation
    wrote from that step on (metrics.jsonl drops those lines too), so no curve doubles back.
    """

    def __init__(self, out_dir: str | Path, purge_step: int | None = None):
        self.log_dir = Path(out_dir) / TB_DIR
        self.writer = require_tensorboard()(log_dir=str(self.log_dir), purge_step=purge_step)

    def log(self, event: str, fields: dict[str, Any]) -> None:
        if event not in SCALAR_EVENTS or "step" not in fields:
            return
        for name, value in flatten_scalars(fields, event).items():
            self.writer.add_scalar(name, value, global_step=fields["step"])
        self.writer.flush()

    def image(self, tag: str, image_CHW: torch.Tensor, step: int) -> None:
        self.writer.add_image(tag, image_CHW, global_step=step, dataformats="CHW")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@torch.no_grad()
def routing_heatmap(model: torch.nn.Module, idx_1T: torch.Tensor, cell: int = 4) -> torch.Tensor | None:
    """Which tokens of one sequence each routed block processes, as an RGB uint8 image (3, H, W).

    Top rows: top-k routing (training), one row per routed block, in order; then a grey line;
    then causal routing (each token by its own predictor logit, as decoding routes), same order.
    A white cell is a processed token, black one that skipped the block; each token is one
    column, each cell ``cell`` pixels square. None for a dense model (nothing is routed).
    """
    rows = []
    with eval_mode(model):
        for routing in ("topk", "causal"):
            out = model(idx_1T, routing=routing)
            rows.append([route_mask(out.routes[i], idx_1T.shape[1])[0] for i in sorted(out.routes)])
    if not rows[0]:
        return None
    T = idx_1T.shape[1]
    grey = torch.full((T,), 0.5)
    grid_RT = torch.stack([*(r.float().cpu() for r in rows[0]), grey, *(r.float().cpu() for r in rows[1])])
    pixels_HW = grid_RT.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    return (pixels_HW * 255).to(torch.uint8).unsqueeze(0).expand(3, -1, -1).contiguous()
