"""Durations as plans write them: a number of seconds, or ``250ms``, ``5s``, ``2m``, ``1h``."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PATTERN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*")


def parse_duration(value: Any) -> float:
    """Return *value* in seconds; accepts numbers and strings like ``'250ms'``.

    :raises ValueError: *value* is negative, not finite, or not a duration.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 5, '250ms', '5s' or '2m', got a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _PATTERN.fullmatch(value)):
        seconds = float(match[1]) * _UNITS[match[2] or "s"]
    else:
        raise ValueError(f"expected a duration such as 5, '250ms', '5s' or '2m', got {value!r}")
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"a duration must be zero or more seconds, got {value!r}")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A pydantic field type: seconds as a float, parsed with :func:`parse_duration`."""
