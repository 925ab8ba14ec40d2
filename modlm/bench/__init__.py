"""Benchmarks: MoD against its dense twin, measured side by side in one process.

Each benchmark prints a readable table and, as its last line, one JSON object. Run them as
``modlm bench NAME [options]`` or ``python benchmarks/bench_NAME.py [options]`` from a
checkout; ``benchmarks/README.md`` explains the method and records the figures.
"""

# name -> (module under modlm.bench, one line for `modlm bench --help`)
BENCHMARKS = {
    "train": ("train", "training-step time and FLOPs, MoD vs dense twin"),
    "decode": ("decode", "decode tokens/s at batch 1 and 16, MoD vs dense twin"),
    "profile-decode": ("profile_decode", "where a decode step's time goes, block by block"),
    "kernels": ("kernels", "few-row linear products: torch vs modlm's native kernel"),
    "moe": ("moe", "training-step time and FLOPs, MoE and integrated MoDE vs dense twin"),
    "adapt": ("adapt", "converted + adapted pretrained model: parity, decode vs Hugging Face generate"),
}


def environment(device=None) -> dict:
    """The JSON fields every benchmark reports about where it ran: device, nproc, torch, python."""
    import os
    import platform

    import torch

    out = {}
    if device is not None:
        out["device"] = str(device) if device.type != "cuda" else torch.cuda.get_device_name(device)
    out.update(nproc=os.cpu_count(), torch=torch.__version__, python=platform.python_version())
    return out


def check_minimums(parser, limits) -> None:
    """``parser.error`` naming the first flag below its minimum: ``[(flag, value, minimum), ...]``.

    A list value (``--batch-sizes 1 0``) is checked element by element. One line, e.g.
    ``--prompt-len=0 is invalid: must be >= 1``, never the list of every limit.
    """
    for flag, value, minimum in limits:
        if value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v < minimum:
                each = "each value " if isinstance(value, (list, tuple)) else ""
                parser.error(f"{flag}={v} is invalid: {each}must be >= {minimum}")
