"""Typed dataclass fields read from text: KEY=VALUE overrides, JSON configs, run files. No torch.

Every command's ``--model-arg``/``--train-arg`` and every config file goes through these, so a
value is read by the type its field declares, and a bad one is refused in one line naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from typing import Any

from modlm.validation import is_int, is_number


def dataclass_from_dict(cls, d: dict[str, Any]):
    """``cls(**d)``, refusing unknown keys with one line that names them (configs from JSON files)."""
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(known)}")
    return cls(**d)


def parse_assignments(
    items: list[str] | tuple[str, ...], flag: str = "--model-arg", into: type | None = None
) -> dict[str, Any]:
    """``["d_model=128", "router=random"]`` -> ``{"d_model": 128, "router": "random"}``.

    The one parser of KEY=VALUE overrides for every command. With ``into`` (a dataclass, e.g.
    ``ModelConfig``) each value is read by the type its field declares (``read_as``): ``int``
    ("64"), ``float`` ("1e-3", finite), ``bool`` (true/false, yes/no, on/off, 1/0, any case),
    ``str`` (as given), ``X | None`` ("none" or "null" is None, anything else an X), a tuple of
    str (a comma list: "dense,routed,dense,routed"), a dict (a JSON object). A key that is not
    one of its fields, or a value its field cannot hold, is a one-line ValueError naming
    ``flag``, the key and the value. Without ``into`` values are read as JSON where they parse
    (numbers, true/false, null, lists), else kept as bare strings, and the config that receives
    them checks them. A malformed item is a one-line ValueError naming ``flag``.
    """
    declared = field_types(into) if into is not None else None
    out: dict[str, Any] = {}
    for text in items:
        key, sep, raw = str(text).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{flag} {text!r} is invalid: expected KEY=VALUE, e.g. d_model=128")
        if declared is None:
            try:
                out[key] = json.loads(raw)
            except json.JSONDecodeError:
                out[key] = raw
            continue
        if key not in declared:
            raise ValueError(
                f"{flag} {key}={raw!r} is invalid: {into.__name__} has no field {key!r}; known: {', '.join(declared)}"
            )
        try:
            out[key] = read_as(raw, declared[key])
        except ValueError:
            raise ValueError(
                f"{flag} {key}={raw!r} is invalid: {into.__name__}.{key} must be {describe_type(declared[key])}"
            ) from None
    return out


def field_types(cls: type) -> dict[str, Any]:
    """The declared type of each ``__init__`` field of dataclass ``cls``, annotations resolved."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    """The members of ``X | Y`` (or ``Optional[X]``), else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _is_str_tuple(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple and typing.get_args(tp) in ((str, ...), ())


def read_as(raw: str, tp: Any) -> Any:
    """The command-line text ``raw`` read as a value of the declared type ``tp`` (see
    ``parse_assignments``); ValueError when ``tp`` cannot hold it."""
    text = raw.strip()
    members = _union_args(tp)
    if members is not None:
        if type(None) in members and text.lower() in ("none", "null"):
            return None
        for member in (m for m in members if m is not type(None)):
            try:
                return read_as(raw, member)
            except ValueError:
                continue
        raise ValueError(raw)
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(raw)
    if tp is int:
        return int(text)  # "64", not "64.0" or "1e3": a count is never a rounded float
    if tp is float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(raw)
        return value
    if tp is str:
        if text.startswith('"'):  # a JSON-quoted string, as earlier versions read it
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                pass
        return raw
    if _is_str_tuple(tp):
        items = json.loads(text) if text.startswith("[") else [s.strip() for s in text.split(",")]
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ValueError(raw)
        return tuple(items)
    if tp is dict or typing.get_origin(tp) is dict:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError(raw)
        return value
    try:  # Any, or a type this reader does not know: JSON where it parses, else the text
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def conforms(value: Any, tp: Any) -> bool:
    """Whether ``value`` is of the declared type ``tp``: an ``int`` is never a bool, a ``float``
    is a finite int or float (never a bool), a tuple of str may be given as a list."""
    members = _union_args(tp)
    if members is not None:
        return any(conforms(value, m) for m in members)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return is_int(value)
    if tp is float:
        return is_number(value)
    if tp is str:
        return isinstance(value, str)
    if _is_str_tuple(tp):
        return isinstance(value, (tuple, list)) and all(isinstance(s, str) for s in value)
    if tp is dict or typing.get_origin(tp) is dict:
        key_type = (typing.get_args(tp) or (Any,))[0]
        return isinstance(value, dict) and (key_type is Any or all(isinstance(k, key_type) for k in value))
    return True  # Any


def describe_type(tp: Any) -> str:
    """What a value of the declared type ``tp`` is, for error messages ("an int or None")."""
    members = _union_args(tp)
    if members is not None:
        return " or ".join(describe_type(m) for m in members)
    names = {
        type(None): "None",
        bool: "a bool (true/false, yes/no, 1/0)",
        int: "an int",
        float: "a finite number",
        str: "a string",
    }
    if tp in names:
        return names[tp]
    if _is_str_tuple(tp):
        return "a comma-separated list of strings"
    if tp is dict or typing.get_origin(tp) is dict:
        return "a JSON object"
    return "any value"


# --------------------------------------------------------------------------------------------
# Command-line flags declared with the fields (litgpt-style typed CLIs)
# --------------------------------------------------------------------------------------------


def flag(default: Any, group: str | None, help: str, *, shown: str | None = None, **kwargs: Any) -> Any:
    """A dataclass field that is also the command-line flag ``--name-with-dashes`` (``add_field_flags``).

    ``group``: the argparse group it goes in (None: the parser itself). ``help`` gets
    ``(default: ...)`` appended: the default's value, or ``shown`` where the default is resolved
    later (a None). ``kwargs`` go to argparse (``choices``, ``metavar``, a ``type`` that parses
    the text into the field's value); without ``type`` the flag reads the field's type. ``flag``
    in ``kwargs`` names a special-case builder ``add_field_flags`` is given (e.g. the one
    ``--threads`` of every command)."""
    return dataclasses.field(default=default, metadata={"group": group, "help": help, "shown": shown, **kwargs})


def flag_type(tp: Any) -> type:
    """The type a flag reads: the field's, without its None (``int | None`` reads an int)."""
    members = [t for t in typing.get_args(tp) if t is not type(None)] or [tp]
    if len(members) != 1 or members[0] not in (bool, int, float, str):
        raise TypeError(f"a flag reads bool, int, float or str; give the field's flag a type= for {tp}")
    return members[0]


def flagged_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of dataclass ``cls`` that declare a flag (``flag``), in declaration order."""
    return [f for f in dataclasses.fields(cls) if "group" in f.metadata]


def add_field_flags(
    cls: type,
    parser: Any,
    groups: dict[str, Any] | None = None,
    special: dict[str, Any] | None = None,
    fmt: dict[str, str] | None = None,
) -> None:
    """One flag per field of ``cls`` that declares one (``flag``): ``--name-with-dashes``, the
    field's type (or its ``type=``) and default, its help with ``(default: ...)``; a bool field
    is a switch. Flags go in ``groups[field's group]``, or ``parser`` for group None.

    ``special``: {name: builder(target, field)} for fields whose metadata ``flag`` names a
    builder (the caller's, e.g. one that imports torch, which this module does not). ``fmt``:
    values for ``{...}`` placeholders in help texts."""
    declared = field_types(cls)
    for f in flagged_fields(cls):
        meta = dict(f.metadata)
        group = meta.pop("group")
        target = parser if group is None else (groups or {})[group]
        builder = meta.pop("flag", None)
        if builder is not None:
            (special or {})[builder](target, f)
            continue
        help_text = meta.pop("help").format(**(fmt or {}))
        shown = meta.pop("shown")
        if "type" in meta:
            meta["type"] = _reads_with_message(meta["type"])
        else:
            tp = flag_type(declared[f.name])
            if tp is bool:
                meta["action"] = "store_true"
                shown = "on" if f.default else "off"
            else:
                meta["type"] = tp
        default = "%(default)s" if shown is None else shown
        target.add_argument(
            "--" + f.name.replace("_", "-"), default=f.default, help=f"{help_text} (default: {default})", **meta
        )


def _reads_with_message(parse: Any) -> Any:
    """``parse`` as an argparse type whose ValueError message reaches the user as it is (argparse
    would print "invalid parse value" instead of the one line that names the value)."""

    def read(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    read.__name__ = getattr(parse, "__name__", "value")
    return read


def flag_values(cls: type, namespace: Any) -> dict[str, Any]:
    """{field: value} of ``cls``'s flagged fields read off a parsed argparse namespace."""
    return {f.name: getattr(namespace, f.name) for f in flagged_fields(cls)}
