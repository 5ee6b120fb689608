"""The seam between the engine-neutral database handler and one database engine."""

from __future__ import annotations

import abc
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, ClassVar, Literal, NoReturn

from pydantic import BaseModel

from cleveragents.errors import ResourceError

Outcome = Literal["busy", "lost", "other"]

# Why a plan may not end its own transaction, and what the connection lent to
# a plan says when asked to: the same words on every engine.
OWNS_TRANSACTION = (
    "cleveragents owns the plan's transaction: it takes checkpoints, commits and rolls back"
)
NOT_A_CONTEXT_MANAGER = (
    "a plan's connection is not a context manager: 'with conn:' would commit or close it; "
    "cleveragents ends the plan's transaction"
)
CANNOT_COMMIT = (
    "a plan's connection cannot commit(): cleveragents commits the plan when it completes "
    "(and rolls it back when it fails)"
)
CANNOT_ROLLBACK = (
    "a plan's connection cannot rollback(): fail the step (raise) to roll back to its "
    "checkpoint, or fail the plan to undo all of it"
)


class PlanConnectionMixin:
    """What the connection lent to a plan adds to the driver's, on every engine.

    Listed before the driver's connection class: it refuses ``commit()``,
    ``rollback()`` and ``with conn:`` (the handler owns the plan's
    transaction), and :meth:`own` runs the handler's own statements with
    ``handler_statement`` set, so the engine's check lets them through.
    """

    handler_statement = False  # True while the handler runs its own SQL

    def own(self, sql: str) -> None:
        """Run one of the handler's own statements (BEGIN, SAVEPOINT, COMMIT...)."""
        self.handler_statement = True
        try:
            self.execute(sql)  # type: ignore[attr-defined]  # the driver's connection's
        finally:
            self.handler_statement = False

    def __enter__(self) -> NoReturn:
        raise ResourceError(NOT_A_CONTEXT_MANAGER)

    def commit(self) -> NoReturn:
        raise ResourceError(CANNOT_COMMIT)

    def rollback(self) -> NoReturn:
        raise ResourceError(CANNOT_ROLLBACK)


class Engine(abc.ABC):
    """What the handler needs from a database engine: open, transact, classify errors.

    One instance serves every resource of its engine in one handler. Methods
    that take a connection are called by one thread at a time for that
    connection; :meth:`interrupt` may be called from any thread.
    """

    #: The value of ``engine:`` in a resource entry.
    name: ClassVar[str]
    #: The pydantic model of a resource entry of this engine.
    settings_model: ClassVar[type[BaseModel]]
    #: Whether the handler admits writers to one database one plan at a time.
    serializes_writers: ClassVar[bool]
    #: The driver's base exception class; these are wrapped into ResourceError.
    driver_error: ClassVar[type[BaseException]]
    #: The handler's ``checkpoint_ttl``, for resources that set none (the handler sets it).
    default_checkpoint_ttl: float = 300.0

    @abc.abstractmethod
    def identity(self, settings: Any, resource_name: str) -> Hashable:
        """Return what identifies the database: two resources with one identity share it."""

    def describe(self, settings: Any) -> str:
        """Return a printable name of the database, with no secret in it."""
        return self.name

    @abc.abstractmethod
    def connection_config(self, settings: Any) -> Hashable:
        """Return the per-connection settings an idle connection must match to be reused."""

    def is_memory(self, settings: Any) -> bool:
        """Whether the database lives only as long as its one connection."""
        return False

    def takes_turns(self, settings: Any) -> bool:
        """Whether a plan on this database must wait for its turn before it begins."""
        return self.serializes_writers

    @abc.abstractmethod
    def open(self, settings: Any, *, application_name: str) -> Any:
        """Open a new connection configured by *settings*."""

    @abc.abstractmethod
    def begin(self, conn: Any, settings: Any, *, plan_id: str) -> None:
        """Start *plan_id*'s transaction."""

    @abc.abstractmethod
    def savepoint(self, conn: Any, name: str) -> None:
        """Create savepoint *name* (already quoted-safe, made by the handler)."""

    @abc.abstractmethod
    def rollback_to(self, conn: Any, name: str) -> None:
        """Undo everything after savepoint *name*, keeping it."""

    @abc.abstractmethod
    def commit(self, conn: Any) -> None:
        """Commit the plan's transaction."""

    @abc.abstractmethod
    def rollback(self, conn: Any) -> None:
        """Roll the plan's transaction back."""

    @abc.abstractmethod
    def execute(
        self, conn: Any, sql: str, params: Mapping[str, Any] | Sequence[Any] | None
    ) -> list[tuple[Any, ...]]:
        """Run one statement; a mapping of *params* binds ``:name``. Return its rows."""

    @abc.abstractmethod
    def is_clean(self, conn: Any) -> bool:
        """Whether *conn* has no open transaction and can be lent to another plan."""

    def check_committable(self, conn: Any) -> str | None:
        """Return why committing *conn* now would lose work, or ``None`` if it is fine.

        The handler asks it of every database a plan holds before the first COMMIT.
        """
        return self.transaction_lost(conn)

    def transaction_lost(self, conn: Any) -> str | None:
        """Return why the plan's transaction on *conn* is gone, or ``None`` while it lasts.

        A statement of the plan can end it (SQLite's ``OR ROLLBACK``), and so can
        the server. The handler asks after each ``connection()`` block and
        ``execute()``, and when a plan comes back to a database it holds; an
        answer poisons the plan: nothing of it is committed anywhere.
        """
        return None

    @abc.abstractmethod
    def close(self, conn: Any) -> None:
        """Close *conn*."""

    @abc.abstractmethod
    def interrupt(self, conn: Any) -> None:
        """Interrupt the statement running on *conn*, from any thread."""

    @abc.abstractmethod
    def classify(self, exc: BaseException) -> Outcome:
        """Say whether a driver error means busy, a lost session, or anything else."""

    def redact(self, exc: BaseException) -> str:
        """Return the driver's message, with any secret removed."""
        return str(exc)
