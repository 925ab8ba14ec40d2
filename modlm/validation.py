"""The checks every config dataclass uses: one way to say "this field has a bad value".

No torch import. Errors are one line that names the owner, the field and the value, and says
what is allowed, e.g. ``ModelConfig.capacity=1.5 is invalid: must be in (0, 1]``.
"""

from __future__ import annotations

import math
from typing import Any


def is_int(x: Any) -> bool:
    """An int that is not a bool (``True`` is an int to Python, never a layer count to us)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def require(cond: bool, owner: str, name: str, value: Any, allowed: str) -> None:
    """Raise ``ValueError("{owner}.{name}={value!r} is invalid: {allowed}")`` unless ``cond``."""
    if not cond:
        raise ValueError(f"{owner}.{name}={value!r} is invalid: {allowed}")
