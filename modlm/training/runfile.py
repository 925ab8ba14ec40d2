"""Run files: a training run described in TOML (``modlm train --config run.toml``), and the fully
resolved configuration every run writes into its directory (``OUT_DIR/run.toml``).

A run file holds ``TrainConfig`` fields by name, and ModelConfig overrides in a
``[model_overrides]`` table::

    model = "small"
    data = "my_texts/"
    out_dir = "runs/mine"
    max_steps = 3000
    lr = 1e-3
    parallel = "fsdp"

    [model_overrides]
    capacity = 0.25
    router = "learned"

Where settings come from, lowest first: TrainConfig's defaults; when resuming (``--resume`` /
``--more-steps``), the run directory's resolved ``run.toml``; the ``--config`` file; the flags
given on the command line. So ``modlm train --out-dir runs/mine --resume`` continues a run with
the settings it was started with, and any flag still overrides them.

No torch import (``modlm --help`` stays instant). TOML has no null: a setting that is None is
left out of a written file, which reads back as the default (None for every such field).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from modlm.config import ModelConfig
from modlm.spec.fields import conforms, describe_type, field_types

RESOLVED_FILE = "run.toml"
OVERRIDES_TABLE = "model_overrides"
# Instructions to one invocation, not settings of the run: never written into the resolved
# file, so a resume does not inherit the first invocation's time budget or extension.
INVOCATION_ONLY = ("max_time_s", "more_steps")


def _tomllib():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ValueError("run files need Python >= 3.11 (tomllib) or the tomli package") from None
    return tomllib


def read_run_file(path: str | Path, declared: dict[str, Any]) -> dict[str, Any]:
    """The settings of a TOML run file, checked key by key: ``{field: value}`` plus the
    ``model_overrides`` dict. ``declared``: the type of each TrainConfig field
    (``field_types(TrainConfig)``; passed in, as ``modlm.training.config`` imports this module).
    An unreadable file, an unknown key or a value of the wrong type is a one-line ValueError
    naming the file and the key (ranges are checked by ``TrainConfig``)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config {p}: no such file")
    try:
        data = _tomllib().loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"--config {p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:  # tomllib.TOMLDecodeError is a ValueError
        raise ValueError(f"--config {p} is not valid TOML: {e}") from None
    for key, value in data.items():
        if key not in declared:
            known = ", ".join(sorted(declared))
            raise ValueError(f"{p}: unknown key {key!r}; known keys: {known}")
        if not conforms(value, declared[key]):
            raise ValueError(f"{p}: {key} = {value!r} is invalid: must be {describe_type(declared[key])}")
    overrides = data.get(OVERRIDES_TABLE, {})
    model_fields = field_types(ModelConfig)
    for key, value in overrides.items():
        if key not in model_fields or key == "name":
            known = ", ".join(sorted(set(model_fields) - {"name"}))
            raise ValueError(f"{p}: unknown key {OVERRIDES_TABLE}.{key!r}; known keys: {known}")
        if not conforms(value, model_fields[key]):
            raise ValueError(
                f"{p}: {OVERRIDES_TABLE}.{key} = {value!r} is invalid: must be {describe_type(model_fields[key])}"
            )
    return data


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        assert math.isfinite(value), value  # TrainConfig and ModelConfig refuse non-finite numbers
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's string escapes are TOML's basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to TOML")


def to_toml(cfg) -> str:
    """The resolved ``TrainConfig`` as a run file (readable by ``read_run_file``)."""
    d = cfg.to_dict()
    lines = [
        "# The fully resolved settings of this run (modlm writes it at every start). `modlm train --resume`",
        "# reads it back; `modlm train --config` accepts it. Unset (None) settings are left out.",
    ]
    overrides = d.pop("model_overrides")
    for key, value in d.items():
        if value is not None and key not in INVOCATION_ONLY:
            lines.append(f"{key} = {_toml_value(value)}")
    lines.append(f"\n[{OVERRIDES_TABLE}]")
    lines += [f"{key} = {_toml_value(value)}" for key, value in overrides.items() if value is not None]
    return "\n".join(lines) + "\n"


def write_resolved(cfg, out_dir: str | Path) -> Path:
    """Write ``OUT_DIR/run.toml`` (atomically: a reader never sees half a file)."""
    path = Path(out_dir) / RESOLVED_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(to_toml(cfg), encoding="utf-8")
    tmp.replace(path)
    return path


def layered_settings(
    given: dict[str, Any], declared: dict[str, Any], config: str | None, resume: bool, default_out_dir: str
) -> dict:
    """The TrainConfig keyword arguments, layered (lowest first): the run directory's resolved
    file when ``resume``, the ``config`` file, then ``given`` (the flags on the command line);
    what none sets is left to TrainConfig's defaults. ``model_overrides`` merge key by key in
    the same order. ``declared``: as for ``read_run_file``; the run directory is the one given,
    else the file's, else ``default_out_dir``."""
    file_settings = read_run_file(config, declared) if config else {}
    out_dir = given.get("out_dir", file_settings.get("out_dir", default_out_dir))
    resolved: dict[str, Any] = {}
    if resume and out_dir and (Path(out_dir) / RESOLVED_FILE).is_file():
        resolved = read_run_file(Path(out_dir) / RESOLVED_FILE, declared)
    layers = [resolved, file_settings, given]
    settings: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    for layer in layers:
        overrides.update(layer.get(OVERRIDES_TABLE, {}))
        settings.update({k: v for k, v in layer.items() if k != OVERRIDES_TABLE})
    settings[OVERRIDES_TABLE] = overrides
    return settings
