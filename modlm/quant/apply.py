"""Swap a model's ``Linear`` layers for low-bit ones, and rebuild them from a checkpoint's record."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from modlm.kernels import lowbit
from modlm.model.layers import Linear
from modlm.quant.linear import Bf16Linear, Int4Linear, QuantLinear

__all__ = ["FORMATS", "apply_formats", "model_formats", "quantize_model"]

FORMATS = ("int4", "bf16")
_CLASSES: dict[str, type[QuantLinear]] = {"int4": Int4Linear, "bf16": Bf16Linear}


def _int4_fits(linear: nn.Linear, group_size: int) -> bool:
    try:
        lowbit.check_int4_shape(linear.out_features, linear.in_features, group_size)
    except ValueError:
        return False
    return True


@torch.no_grad()
def quantize_model(
    model: nn.Module, weights: str, skip: Iterable[str] = (), group_size: int = lowbit.INT4_GROUP_SIZE
) -> dict[str, dict]:
    """Replace, in place, every ``Linear`` of ``model`` not named in ``skip`` by its ``weights``
    format; returns ``model_formats(model)`` (what a checkpoint records).

    Args:
        model: a built model on the CPU (the int4 kernel is a CPU kernel).
        weights: "int4" (groups of ``group_size`` along the input, bf16 scales and zeros) or
            "bf16". An int4 layer whose shape the kernel cannot take falls back to bf16.
        skip: module names to leave in fp32 (e.g. ``("lm_head",)``).
    Raises:
        ValueError: an unknown ``weights``, a ``skip`` name that is no ``Linear`` of the model,
            or a bad ``group_size``.
    """
    if weights not in FORMATS:
        raise ValueError(f"weights={weights!r} is invalid: must be one of {', '.join(FORMATS)}")
    lowbit.check_int4_shape(16, group_size, group_size)  # the group size alone
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    unknown = sorted(set(skip) - set(linears))
    if unknown:
        raise ValueError(f"skip={unknown[0]!r} is not a Linear layer of the model (e.g. {next(iter(linears), '')!r})")
    for name, linear in linears.items():
        if name in skip:
            continue
        if weights == "int4" and _int4_fits(linear, group_size):
            new: QuantLinear = Int4Linear.from_linear(linear, group_size)
        else:
            new = Bf16Linear.from_linear(linear)
        model.set_submodule(name, new)
    return model_formats(model)


def model_formats(model: nn.Module) -> dict[str, dict]:
    """{module name: its record} for every low-bit linear of ``model`` (empty: none)."""
    return {name: m.record() for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def apply_formats(model: nn.Module, formats: dict[str, dict]) -> None:
    """Give ``model`` the empty low-bit layers ``formats`` records (``model_formats``), ready for
    ``load_state_dict``. Raises ValueError naming a record that does not fit the model."""
    for name, rec in formats.items():
        try:
            old = model.get_submodule(name)
            cls = _CLASSES[rec["weights"]]
        except (AttributeError, KeyError, TypeError) as e:
            raise ValueError(f"quantized layer {name!r} ({rec!r}) does not fit the model: {e}") from None
        kwargs = {"group_size": rec["group_size"]} if cls is Int4Linear else {}
        model.set_submodule(name, cls(old.in_features, old.out_features, bias=bool(rec.get("bias")), **kwargs))
