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

    A list value (``--batch-sizes 1 0``) is checked element by element; ``None`` (an unset
    optional flag) is skipped. One line, e.g. ``--prompt-len=0 is invalid: must be >= 1``, never
    the list of every limit.
    """
    for flag, value, minimum in limits:
        if value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v < minimum:
                each = "each value " if isinstance(value, (list, tuple)) else ""
                parser.error(f"{flag}={v} is invalid: {each}must be >= {minimum}")


# The flags add_common_args adds, with their minimums; a benchmark's own minimums override them.
COMMON_MINIMUMS = {"--warmup": 0, "--threads": 0}


def bench_parser(doc: str):
    """The argument parser of a benchmark: its module docstring's first paragraph as the
    description, one-line errors (``modlm.errors.ArgumentParser``), every default in ``--help``."""
    import argparse

    from modlm.errors import ArgumentParser

    return ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_common_args(
    parser,
    *,
    preset_help: str | None = "ModelConfig preset (see modlm.config.PRESETS)",
    device: bool = True,
    threads: int | None = None,
    warmup: int | None = None,
    warmup_help: str = "untimed steps per model first",
    kernels: bool = False,
    seed_help: str | None = "seed of the weights and the data",
) -> None:
    """Add the flags the benchmarks share: ``--preset`` (default "base"), ``--seed`` (0) unless
    their help is None (a benchmark of a given pretrained model has neither), and where asked ``--device`` (cpu), ``--threads`` (``modlm.devices.add_threads_arg`` with default
    ``threads``; 0 is torch's default), ``--warmup`` (default ``warmup``) and ``--kernels``
    (native | torch few-row products). ``parse_bench_args`` checks their minimums.

    ``threads=None`` adds no ``--threads``: a benchmark that sweeps thread counts has its own.
    """
    # modlm.devices imports torch: imported here, so that ``modlm --help`` (which reads
    # BENCHMARKS from this package) stays torch-free.
    from modlm.devices import DEVICE_HELP, add_threads_arg

    if preset_help is not None:
        parser.add_argument("--preset", default="base", help=preset_help)
    if device:
        parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    if threads is not None:
        add_threads_arg(parser, default=threads)
    if warmup is not None:
        parser.add_argument("--warmup", type=int, default=warmup, help=warmup_help)
    if kernels:
        parser.add_argument(
            "--kernels",
            default="native",
            choices=["native", "torch"],
            help="few-row linear products: modlm.kernels.fewrow's native CPU kernel where it applies (both "
            "models alike), or torch's F.linear everywhere",
        )
    if seed_help is not None:
        parser.add_argument("--seed", type=int, default=0, help=seed_help)


def parse_bench_args(parser, argv, minimums: dict[str, float]):
    """``parser.parse_args(argv)``, then ``parser.error`` naming the first flag below its minimum:
    the common flags' (``COMMON_MINIMUMS``: --warmup >= 0, --threads >= 0) and ``minimums``
    ({flag: minimum}, overriding a common one). Flags the parser lacks or left unset are skipped."""
    args = parser.parse_args(argv)
    limits = {**COMMON_MINIMUMS, **minimums}
    check_minimums(parser, [(flag, getattr(args, flag[2:].replace("-", "_"), None), m) for flag, m in limits.items()])
    return args
