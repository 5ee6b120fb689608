"""The one rule for ids and labels: plan ids, step ids, checkpoint labels."""

from __future__ import annotations

import re

#: The longest id or label, in characters.
MAX_ID = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
RULE = f"must be 1 to {MAX_ID} printable characters without control characters"


def id_problem(value: object) -> str | None:
    """Return what is wrong with *value* as an id, or ``None`` if it is a good one."""
    if not isinstance(value, str) or not value or len(value) > MAX_ID:
        return RULE
    if not value.isprintable() and _CONTROL.search(value):  # isprintable() is the fast path
        return RULE
    return None


__all__ = ["MAX_ID", "RULE", "id_problem"]
