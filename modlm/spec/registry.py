"""The small name -> spec table behind every registry of modlm (routers, block kinds). No torch.

A spec is a frozen dataclass with a ``name`` and a ``target`` ("module:Class"), imported on first
use, so config validation and ``--help`` can list and check names without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Generic, TypeVar

S = TypeVar("S")


def load_target(target: str) -> type:
    """The class named by "module:Class"."""
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


class Registry(Generic[S]):
    """Specs by name, in registration order; ``what`` names the kind of thing in errors."""

    def __init__(self, what: str, reserved: tuple[str, ...] = ()):
        self.what, self.reserved = what, reserved
        self.items: dict[str, S] = {}

    def register(self, spec: S) -> S:
        """Add a spec (a name may be registered once)."""
        name = spec.name  # type: ignore[attr-defined]
        if name in self.items or name in self.reserved:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self.items[name] = spec
        return spec

    def names(self) -> tuple[str, ...]:
        return tuple(self.items)

    def get(self, name: str) -> S:
        """The spec of a registered name; one-line ValueError naming the value otherwise."""
        try:
            return self.items[name]
        except (KeyError, TypeError):
            raise ValueError(f"{self.what} {name!r} is not registered; available: {', '.join(self.items)}") from None
