"""What the agent-framework integrations share: the record of a rolled-back tool call."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class ToolRollback:
    """A tool call that failed and was rolled back to the checkpoint taken before it."""

    #: The checkpoint's label, ``tool-1``, ``tool-2``, ... in the order calls ran.
    checkpoint: str
    #: The tool's name as the model knows it.
    tool: str
    #: The model's id for the call, if the framework gave one.
    call_id: str | None
    #: What went wrong, e.g. ``"ValueError: out of stock"``.
    error: str


__all__ = ["ToolRollback"]
