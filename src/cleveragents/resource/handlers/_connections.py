"""The handler's connections: lend one from the pool or open one, take it back, wrap errors.

A mixin of :class:`~cleveragents.resource.handlers.database.DatabaseResourceHandler`,
kept apart so each file holds one concern: here every decision about a
connection is taken under the mutex by :class:`~._pool.ConnectionPool`, and the
connect or close it calls for runs after the mutex is released.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from cleveragents.errors import (
    CheckpointExpiredError,
    HandlerClosedError,
    PoolExhaustedError,
    ResourceBusyError,
    ResourceError,
)
from cleveragents.resource.handlers._plans import Lease, Plan, PlanTable
from cleveragents.resource.handlers._pool import ConnectionPool
from cleveragents.resource.handlers._settings import DatabaseHandlerSettings

if TYPE_CHECKING:
    from cleveragents.telemetry import HandlerTelemetry

logger = logging.getLogger("cleveragents.resource.handlers.database")


class ConnectionsMixin:
    """Checkout and check-in of the connections the handler lends to plans."""

    name: str
    config: DatabaseHandlerSettings
    _closed: bool
    _mutex: threading.Lock
    _pool: ConnectionPool
    _plans: PlanTable
    _counts: collections.Counter[str]
    _telemetry: HandlerTelemetry | None

    def _finish(self, plan: Plan, *, commit: bool, locked: bool = False) -> None:
        raise NotImplementedError  # EndingMixin's

    def _arm_idle_sweep(self, when: float) -> None:
        raise NotImplementedError  # EndingMixin's

    def _wrap(
        self, exc: BaseException, lease: Lease, operation: str, checkpoint_id: str | None
    ) -> ResourceError:
        engine = lease.database.engine
        context: dict[str, Any] = {
            "plan_id": lease.plan.plan_id,
            "checkpoint_id": checkpoint_id,
            "resource": lease.resolved.resource,
            "operation": operation,
        }
        kind = engine.classify(exc)
        if kind == "busy":
            with self._mutex:
                self._counts["busy_timeouts"] += 1
            return ResourceBusyError(
                f"database {lease.database.label!r} stayed locked for longer than busy_timeout "
                f"({lease.resolved.settings.busy_timeout:g}s): {engine.redact(exc)}",
                **context,
            )
        if kind == "lost":
            age = time.monotonic() - lease.plan.last_used
            return CheckpointExpiredError(
                f"the server ended the plan's session: {engine.redact(exc)}",
                age=age,
                ttl=lease.plan.ttl,
                **context,
            )
        return ResourceError(
            f"{operation} failed on database {lease.database.label!r}: {engine.redact(exc)}",
            **context,
        )

    # -- connections ----------------------------------------------------------

    def _checkout(self, lease: Lease) -> Any:
        """Return a connection for *lease*: an idle one if it fits, else a new one.

        Decide under the mutex: take an idle connection, else reserve a slot,
        else take the oldest idle connection's slot, else pick a victim
        (``evict_lru``) or wait up to ``acquire_timeout``. Then, outside it,
        finish the victim, close the old connection, or open the new one.
        """
        deadline = time.monotonic() + self.config.acquire_timeout
        waited = False
        pool = self._pool
        resolved = lease.resolved
        while True:
            victim: Plan | None = None
            to_close = None
            with self._mutex:
                if self._closed:
                    raise HandlerClosedError(self.name)
                conn = pool.pop_idle(resolved.database, resolved.config)
                if conn is not None:
                    return conn
                if not pool.reserve():
                    to_close = pool.take_oldest_idle()
                    if to_close is None and self.config.on_full == "evict_lru":
                        victim = self._plans.pick_victim(lease.plan, time.monotonic())
                        if victim is not None:
                            self._counts["evicted"] += 1
                    if to_close is None and victim is None:
                        if not waited:
                            waited = True
                            self._counts["waits"] += 1
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            self._counts["wait_timeouts"] += 1
                            raise self._exhausted(lease)
                        pool.wait(remaining)
                        continue
            if victim is not None:
                logger.warning(
                    "handler %r evicted plan %r to free a connection", self.name, victim.plan_id
                )
                self._finish(victim, commit=False, locked=True)
                continue
            if to_close is not None:
                self._close_connection(to_close.database, to_close.conn)
            return self._open_connection(lease)

    def _exhausted(self, lease: Lease) -> PoolExhaustedError:
        holders = self._plans.holders()
        limit = self.config.max_connections
        return PoolExhaustedError(
            f"all {limit} connections are held by live plans {holders[:10]!r} for longer "
            f"than acquire_timeout ({self.config.acquire_timeout:g}s); raise "
            "max_connections or finish plans sooner",
            limit=limit,
            holders=holders,
            plan_id=lease.plan.plan_id,
            resource=lease.resolved.resource,
            operation="acquire",
        )

    def _replace_connection(self, lease: Lease) -> None:
        """Close the lease's broken connection and give the lease another one."""
        conn, lease.conn = lease.conn, None
        with self._mutex:
            self._pool.release_slot()
        logger.info("handler %r dropped a connection the server had closed", self.name)
        self._close_connection(lease.database, conn)
        lease.conn = self._checkout(lease)

    def _open_connection(self, lease: Lease) -> Any:
        """Open a connection in a slot already reserved."""
        engine = lease.database.engine
        started = time.monotonic()
        try:
            conn = engine.open(
                lease.resolved.settings, application_name=f"cleveragents:{lease.plan.plan_id}"
            )
        except BaseException as exc:
            with self._mutex:
                self._pool.release_slot()
            if isinstance(exc, engine.driver_error):
                raise self._wrap(exc, lease, "open", None) from exc
            raise
        if self._telemetry is not None:
            self._telemetry.connection_created(started)
        logger.debug("handler %r opened a connection to %r", self.name, lease.database.label)
        return conn

    def _checkin(self, lease: Lease, *, broken: bool = False, outcome: str | None = None) -> None:
        """Take the lease's connection and write turn back: to the idle pool if clean, else close.

        One pass under the mutex gives back both and counts the plan's
        *outcome* (a ``_counts`` key), if given. The next plan in line for the
        turn is woken only once the shared memory connection is settled. A
        connection still in the hands of a ``connection()`` block (the plan
        was ended inside it) is closed, never pooled.
        """
        database = lease.database
        conn, lease.conn = lease.conn, None
        memory = lease.resolved.memory
        broken = broken or lease.users > 0  # ended inside its own connection() block
        clean = conn is not None and not memory and not broken and database.engine.is_clean(conn)
        close = False
        with self._mutex:
            if outcome is not None:
                self._counts[outcome] += 1
                self._plans.settle(lease.plan)
            if conn is None:
                pass
            elif memory:
                # The shared connection stays, unless it broke: then whoever takes
                # it out of memory_conn (here, or close()) uncounts and closes it.
                if broken and database.memory_conn is conn and lease.ended == "broken":
                    database.memory_conn = None
                    self._pool.release_slot()
                    close = True
            elif clean and not self._closed:
                now = time.monotonic()
                if self._pool.put_idle(database, conn, lease.resolved.config, now):
                    self._arm_idle_sweep(now + self.config.idle_timeout)
            else:
                self._pool.release_slot()
                close = True
            # The turn goes on only now that the memory connection is settled.
            if lease.has_turn:
                lease.has_turn = False
                database.turnstile.release()
        if close:
            self._close_connection(database, conn)

    def _close_connection(self, database: Any, conn: Any) -> None:
        try:
            database.engine.close(conn)
        except database.engine.driver_error as exc:
            with self._mutex:
                self._counts["close_failures"] += 1
            logger.warning(
                "closing a connection to %r failed: %s",
                database.label,
                database.engine.redact(exc),
            )
