"""Tools that plan steps call by name, and the context a tool receives."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from cleveragents.errors import PluginError

_TOOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")

Tool = Callable[..., Any]


class ToolRegistry:
    """Tools by name; plugins fill it through ``cleveragents_register_tools``.

    Names are plain words (letters, digits, ``_`` and ``-``), never import
    paths: plans may be written by agents and can only call what is here.
    """

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}
        self._sources: dict[str, str] = {}
        #: Set by the plugin manager while a plugin's hook runs, to name sources.
        self.current_source = "unknown"

    def add(self, name: str, func: Tool) -> None:
        """Make *func* callable from plans as ``tool: name``.

        :raises PluginError: the name is not a plain word, is taken, or *func* is not callable.
        """
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise PluginError(
                f"tool name {name!r} must be a word of letters, digits, '_' or '-' "
                "(at most 64 characters)",
                plugin=self.current_source,
            )
        if not callable(func):
            raise PluginError(
                f"tool {name!r} is not callable: {func!r}", plugin=self.current_source
            )
        if name in self._tools and self._tools[name] is not func:
            raise PluginError(
                f"tool {name!r} is already registered by {self._sources[name]}",
                plugin=self.current_source,
            )
        self._tools[name] = func
        self._sources[name] = self.current_source

    def get(self, name: str) -> Tool | None:
        """Return the tool called *name*, if any."""
        return self._tools.get(name)

    def source(self, name: str) -> str:
        """Return the plugin that registered *name*."""
        return self._sources[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._tools))

    def __len__(self) -> int:
        return len(self._tools)


@dataclass(frozen=True)
class ToolContext:
    """What a tool receives as its first argument.

    ``with ctx.connection("inventory") as conn:`` lends the plan's own
    connection to that resource, inside the plan's transaction: never commit
    or roll back on it; raise to fail the step.
    """

    plan_id: str
    step_id: str
    attempt: int
    _connect: Callable[[str], AbstractContextManager[Any]] = field(repr=False)

    def connection(self, resource: str) -> AbstractContextManager[Any]:
        """Lend the plan's connection to the resource named *resource*."""
        return self._connect(resource)
