"""The exception hierarchy: everything cleveragents raises descends from CleverAgentsError."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _rebuild(cls: type[BaseException], args: tuple[Any, ...]) -> BaseException:
    """Make an error of *cls* with *args* without calling its ``__init__`` (for pickle)."""
    error = cls.__new__(cls, *args)
    error.args = args
    return error


class CleverAgentsError(Exception):
    """Base class of every error raised by cleveragents.

    Every subclass pickles and copies with its message and attributes, whatever
    its ``__init__`` takes: agent runtimes ship errors across processes.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's own reduce calls cls(*self.args) on load, which fails for
        # keyword-only arguments and builds a message from the finished message
        # again. Rebuild without __init__, then restore the attributes as they were.
        return (_rebuild, (type(self), self.args), self.__dict__)


class PluginError(CleverAgentsError):
    """A plugin could not be loaded, or registered something invalid."""

    def __init__(self, message: str, *, plugin: str | None = None) -> None:
        super().__init__(message)
        self.plugin = plugin


class PlanProblem:
    """One problem found in a plan file: where it is and what is wrong."""

    __slots__ = ("field", "line", "message", "path")

    def __init__(self, path: str, line: int | None, field: str, message: str) -> None:
        self.path = path
        self.line = line
        self.field = field
        self.message = message

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )

    def __repr__(self) -> str:
        return f"PlanProblem({str(self)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # With __slots__, pickle protocols 0 and 1 cannot save it by default.
        return (PlanProblem, (self.path, self.line, self.field, self.message))


class PlanError(CleverAgentsError, ValueError):
    """A plan is bad input: it was not run and no resource was touched.

    :attr:`problems` lists every problem found, each naming file, line and field.
    """

    def __init__(self, problems: Sequence[PlanProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class ToolError(CleverAgentsError):
    """A tool was registered or called in a way that cannot work."""


class ResourceError(CleverAgentsError):
    """An operation on a resource failed.

    The attributes name what was being done when it failed; any of them may be
    ``None`` when it does not apply.
    """

    def __init__(
        self,
        message: str,
        *,
        plan_id: str | None = None,
        checkpoint_id: str | None = None,
        resource: str | None = None,
        operation: str | None = None,
    ) -> None:
        self.plan_id = plan_id
        self.checkpoint_id = checkpoint_id
        self.resource = resource
        self.operation = operation
        context = [
            f"{label} {value!r}"
            for label, value in (
                ("plan", plan_id),
                ("checkpoint", checkpoint_id),
                ("resource", resource),
                ("operation", operation),
            )
            if value is not None
        ]
        super().__init__(f"{message} ({', '.join(context)})" if context else message)
        self.reason = message


class ResourceBusyError(ResourceError):
    """The database stayed locked by another writer for longer than ``busy_timeout``."""

    def __init__(self, message: str, *, holder: str | None = None, **context: str | None) -> None:
        super().__init__(message, **context)
        self.holder = holder


class PoolExhaustedError(ResourceError):
    """Every connection slot held a live plan for longer than ``acquire_timeout``."""

    def __init__(
        self, message: str, *, limit: int, holders: Sequence[str], **context: str | None
    ) -> None:
        super().__init__(message, **context)
        self.limit = limit
        self.holders = list(holders)


class PartialCommitError(ResourceError):
    """A plan's commit failed part-way: some databases were committed, the rest rolled back."""

    def __init__(self, message: str, *, committed: Sequence[str], **context: str | None) -> None:
        super().__init__(message, **context)
        self.committed = list(committed)


class HandlerClosedError(ResourceError):
    """A handler was used after it was closed."""

    def __init__(self, handler: str) -> None:
        super().__init__(f"handler {handler!r} is closed; create a new one")
        self.handler = handler


class CheckpointError(ResourceError):
    """A checkpoint could not be created, found or rolled back to."""


class CheckpointNotFoundError(CheckpointError, LookupError):
    """The plan has no open checkpoint with that label on that resource."""


class CheckpointExpiredError(CheckpointError):
    """The plan sat idle past its ``checkpoint_ttl``; the reaper rolled it back."""

    def __init__(self, message: str, *, age: float, ttl: float, **context: str | None) -> None:
        super().__init__(message, **context)
        self.age = age
        self.ttl = ttl


class CheckpointEvictedError(CheckpointError):
    """The plan was rolled back to free a connection for another plan (``on_full: evict_lru``)."""


__all__ = [
    "CheckpointError",
    "CheckpointEvictedError",
    "CheckpointExpiredError",
    "CheckpointNotFoundError",
    "CleverAgentsError",
    "HandlerClosedError",
    "PartialCommitError",
    "PlanError",
    "PlanProblem",
    "PluginError",
    "PoolExhaustedError",
    "ResourceBusyError",
    "ResourceError",
    "ToolError",
]
