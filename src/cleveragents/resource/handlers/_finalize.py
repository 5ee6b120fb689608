"""A handler's afterlife: garbage collection or interpreter exit without close(), and fork.

A handler registers its containers here (never itself): the finalizer needs
what holds connections, not the handler, so the handler can still be
collected. In a forked child every live handler starts empty, and what it
inherited is kept referenced and never used: closing or rolling back the
parent's connections would act on the parent's state.
"""

from __future__ import annotations

import logging
import os
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cleveragents.resource.handlers._databases import Database, Resolver
    from cleveragents.resource.handlers._plans import PlanTable
    from cleveragents.resource.handlers._pool import ConnectionPool
    from cleveragents.resource.reaper import Reaper

logger = logging.getLogger(__name__)


class _Forking(Protocol):
    def _forget_after_fork(self) -> None: ...


_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()
# What forked children inherited: kept referenced, never used.
_INHERITED: list[Any] = []


def watch(
    handler: _Forking,
    *,
    name: str,
    plans: PlanTable,
    pool: ConnectionPool,
    resolver: Resolver,
    reaper: Reaper,
) -> weakref.finalize[Any, Any]:
    """Register *handler*: finalized if collected unclosed, emptied in a forked child."""
    _LIVE.add(handler)
    return weakref.finalize(handler, finalize, name, plans, pool, resolver, reaper)


def unwatch(handler: Any, finalizer: weakref.finalize[Any, Any]) -> None:
    """Forget a closed handler."""
    finalizer.detach()
    _LIVE.discard(handler)


def set_aside(finalizer: weakref.finalize[Any, Any]) -> None:
    """In a forked child: keep what the finalizer would free, and never free it."""
    detached = finalizer.detach()  # (handler, function, args, kwargs)
    if detached is not None:
        _INHERITED.append(detached[2])


def finalize(
    name: str, plans: PlanTable, pool: ConnectionPool, resolver: Resolver, reaper: Reaper
) -> None:
    """Free what a handler that was never closed still holds (at collection or exit)."""
    reaper.stop()
    open_plans = sorted(plan.plan_id for plan in plans)
    for plan in plans.take_all():
        for lease in plan.leases.values():
            conn = lease.conn
            if conn is not None and conn is not lease.database.memory_conn:
                discard(lease.database, conn, rollback=True)
    for entry in pool.drain():
        discard(entry.database, entry.conn, rollback=False)
    for database in list(resolver.databases.values()):
        if database.memory_conn is not None:
            discard(database, database.memory_conn, rollback=True)
    warnings.warn(
        f"database handler {name!r} was not closed; rolled back open plans {open_plans!r} "
        "and closed its connections (use 'with DatabaseResourceHandler(...)' or close())",
        ResourceWarning,
        stacklevel=2,
    )


def discard(database: Database, conn: Any, *, rollback: bool) -> None:
    """Roll back (if asked) and close *conn*, whatever happens."""
    engine = database.engine
    try:
        if rollback:
            engine.rollback(conn)
    except engine.driver_error:
        pass  # closing below rolls back whatever is left
    try:
        engine.close(conn)
    except engine.driver_error as exc:
        logger.warning("closing a connection to %r failed: %s", database.label, engine.redact(exc))


def _after_fork_in_child() -> None:
    for handler in list(_LIVE):
        handler._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)

__all__ = ["discard", "finalize", "set_aside", "unwatch", "watch"]
