"""DatabaseResourceHandler: each plan's own transaction per database, savepoints as checkpoints.

The core here is engine-neutral; what differs between SQLite and PostgreSQL
lives behind :class:`~cleveragents.resource.handlers.engine.Engine`. The
handler is the public API, the lease protocol and every engine call; its
bookkeeping lives in parts, each with one job:

* ``_pool.ConnectionPool``: slots and idle connections (no plans, no I/O);
* ``_plans.PlanTable``: open plans, their leases, plans being finished and
  how reaped or evicted ones ended (no connections);
* ``_databases.Resolver``: resources to databases, with bounded caches;
* ``_turnstile.Turnstile``: one writer at a time per database, in order;
* ``_finalize``: garbage collection, interpreter exit and fork;
* ``reaper.Reaper``: the thread that calls back at deadlines.

Ownership: the handler owns every connection (the pool counts them, lent,
idle and in-memory together, and never past ``max_connections``); a plan owns
one *lease* per database it touched: the connection, its checkpoints, its
write turn, and a lock so one thread at a time uses it.

Lock order:

1. a lease's lock, then the handler's ``_mutex`` (shared by the pool, the plan
   table, the resolver and the turnstiles). Under the mutex only a *new*
   lease's lock is taken; any other only with ``acquire(blocking=False)``;
2. no SQL, connect or close runs under the mutex: decisions are taken under
   it and the I/O they call for is done after it is released;
3. a turnstile gate is waited on only by its own waiter, without the mutex;
4. the reaper's lock may be taken under the mutex, and the reaper never calls
   the handler while holding it; engine locks are leaves.

The per-plan path is kept short on purpose (see docs/performance.md): a new
lease gets an idle connection and a free turn in the one critical section that
makes it, a lease already held is found without the mutex, and giving it back
is one more critical section.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import itertools
import logging
import threading
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Self, final

from pydantic import ValidationError

from cleveragents import telemetry
from cleveragents.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    HandlerClosedError,
    ResourceBusyError,
    ResourceError,
)
from cleveragents.hookspecs import hookimpl
from cleveragents.resource.base import (
    CheckpointResult,
    Resource,
    ResourceHandler,
    make_checkpoint_result,
)
from cleveragents.resource.handlers import _finalize
from cleveragents.resource.handlers._databases import Resolved, Resolver
from cleveragents.resource.handlers._ending import EndingMixin
from cleveragents.resource.handlers._plans import Endings, Lease, Plan, PlanTable
from cleveragents.resource.handlers._pool import ConnectionPool
from cleveragents.resource.handlers._settings import (
    ACQUIRE_TIMEOUT,
    CHECKPOINT_TTL,
    ENGINES,
    IDLE_TIMEOUT,
    MAX_CONNECTIONS,
    ON_FULL,
    DatabaseHandlerSettings,
    OnFull,
    check_label,
    settings_adapter,
    validated,
)
from cleveragents.resource.reaper import Deadline, Reaper

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

logger = logging.getLogger(__name__)

_handler_ids = itertools.count(1)


@dataclasses.dataclass(frozen=True)
class HandlerStats(Mapping[str, int]):
    """A snapshot of a handler's counters; also readable as a mapping."""

    open_connections: int
    idle_connections: int
    active_plans: int
    checkpoints: int
    commits: int
    rollbacks: int
    reaped: int
    evicted: int
    waits: int
    wait_timeouts: int
    busy_timeouts: int
    close_failures: int

    def __getitem__(self, key: str) -> int:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return int(getattr(self, key))

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)


class _Lending:
    """What :meth:`DatabaseResourceHandler.connection` returns: lends on entry, takes back on exit.

    A plain class rather than a generator-based context manager: it is on
    every plan's path, and costs less than half as much.
    """

    __slots__ = ("_handler", "_lease", "_plan_id", "_resource")

    def __init__(self, handler: DatabaseResourceHandler, resource: Resource, plan_id: str) -> None:
        self._handler = handler
        self._resource = resource
        self._plan_id = plan_id
        self._lease: Lease | None = None

    def __enter__(self) -> Any:
        if self._lease is not None:
            raise RuntimeError("this connection() block is already entered")
        lease, _ = self._handler._enter(self._resource, self._plan_id, "connection")
        self._lease = lease
        return lease.conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease, self._lease = self._lease, None
        if lease is None:
            return
        conn = lease.conn
        try:
            if exc is not None or conn is None or lease.database.engine.transaction_lost(conn):
                self._handler._after_plan_sql(lease, exc, "connection")
        finally:
            self._handler._leave(lease)


@final
class DatabaseResourceHandler(EndingMixin, ResourceHandler):
    """Gives every plan its own transaction on each database it touches.

    Checkpoints are savepoints on the plan's one connection per database.
    Completed plans are released (committed), failed ones rolled back, and the
    connections go back to a bounded pool. A reaper thread rolls back plans
    that were forgotten. See the class docs in README for the whole contract.
    """

    kind: ClassVar[str] = "database"
    #: How long :meth:`close` waits, in seconds, for plans other threads are
    #: finishing or running a statement for; set it on a handler to change it.
    close_wait: float = 30.0

    def __init__(
        self,
        *,
        max_connections: int = MAX_CONNECTIONS,
        acquire_timeout: float | str = ACQUIRE_TIMEOUT,
        idle_timeout: float | str = IDLE_TIMEOUT,
        on_full: OnFull = ON_FULL,
        checkpoint_ttl: float | str = CHECKPOINT_TTL,
        name: str | None = None,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        try:
            config = DatabaseHandlerSettings.model_validate(
                {
                    "max_connections": max_connections,
                    "acquire_timeout": acquire_timeout,
                    "idle_timeout": idle_timeout,
                    "on_full": on_full,
                    "checkpoint_ttl": checkpoint_ttl,
                }
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(
                f"DatabaseResourceHandler: {first['loc'][0]}: {first['msg']}"
            ) from None
        self.name = name or f"database-{next(_handler_ids)}"
        self.config = config
        self._closed = False
        self._providers = {"tracer_provider": tracer_provider, "meter_provider": meter_provider}
        self._reset_state()
        logger.debug("handler %r created: %s", self.name, config)

    def _reset_state(self) -> None:
        """Create every lock and part afresh (at start, and in a forked child)."""
        config = self.config
        self._mutex = threading.Lock()
        self._pool = ConnectionPool(self._mutex, config.max_connections, config.idle_timeout)
        self._plans = PlanTable(self._mutex, Endings())
        self._resolver = Resolver(
            self._mutex,
            default_ttl=config.checkpoint_ttl,
            in_use=functools.partial(_databases_in_use, self._pool, self._plans),
        )
        # One reaper deadline covers every plan: the earliest moment one of them
        # can expire. Plans that end before it cost the reaper nothing.
        self._plan_sweep: Deadline | None = None
        self._idle_sweep: Deadline | None = None
        # Plans close() could not lock in time (another thread was mid-statement):
        # that thread finishes them when it leaves its block.
        self._orphans: set[Plan] = set()
        self._counts: collections.Counter[str] = collections.Counter()
        self._reaper = Reaper(self, name=f"cleveragents-reaper[{self.name}]")
        self._telemetry = telemetry.for_handler(
            self.name, config.max_connections, self._pool, self._mutex, **self._providers
        )
        self._finalizer = _finalize.watch(
            self,
            name=self.name,
            plans=self._plans,
            pool=self._pool,
            resolver=self._resolver,
            reaper=self._reaper,
        )

    # -- configuration -------------------------------------------------------

    @classmethod
    def validate_settings(cls, resource: Resource) -> Any:
        """Return the engine settings of *resource*.

        :raises pydantic.ValidationError: a key is unknown, missing or mistyped.
        """
        return validated(resource)

    @classmethod
    def settings_json_schema(cls) -> dict[str, Any]:
        schema = settings_adapter().json_schema(ref_template="#/$defs/{model}")
        for definition in schema.get("$defs", {}).values():
            if "engine" in definition.get("properties", {}):
                definition["properties"]["kind"] = {"const": cls.kind}
                definition.setdefault("required", []).append("kind")
        return schema

    @classmethod
    def from_config(cls, **overrides: Any) -> Self:
        """Create a handler from ``CLEVERAGENTS_*`` variables, then *overrides* (None = unset)."""
        given = {key: value for key, value in overrides.items() if value is not None}
        name = given.pop("name", None)
        providers = {key: given.pop(key, None) for key in ("tracer_provider", "meter_provider")}
        settings = DatabaseHandlerSettings(**given)
        return cls(**settings.model_dump(), name=name, **providers)

    def __repr__(self) -> str:
        state = (
            "closed" if self._closed else f"{len(self._plans)} plans, {self._pool.open} connections"
        )
        return f"<DatabaseResourceHandler {self.name!r} ({state})>"

    # -- public operations ----------------------------------------------------

    @property
    def is_closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def connection(self, resource: Resource, plan_id: str) -> AbstractContextManager[Any]:
        """Lend the plan its own connection to *resource*, inside the plan's transaction.

        Use it as ``with handler.connection(resource, plan_id) as conn:``. The
        connection stays the plan's; the calling thread may use it until the
        block ends. Never commit or roll it back yourself. A lock wait or a
        lost session raised in the block leaves it as ``ResourceBusyError`` or
        ``CheckpointExpiredError``.
        """
        return _Lending(self, resource, plan_id)

    def create_checkpoint(
        self, resource: Resource, plan_id: str, checkpoint_id: str
    ) -> CheckpointResult:
        """Take a checkpoint (a savepoint) labelled *checkpoint_id* in the plan's work.

        :raises CheckpointError: the plan already has a checkpoint with that label there.
        """
        check_label("checkpoint_id", checkpoint_id)
        lease, created = self._enter(resource, plan_id, "create_checkpoint", checkpoint_id)
        try:
            if checkpoint_id in lease.checkpoints:
                raise CheckpointError(
                    "a checkpoint with this label is already open; rollback_to it or use "
                    "a new label",
                    plan_id=plan_id,
                    checkpoint_id=checkpoint_id,
                    resource=resource.name,
                    operation="create_checkpoint",
                )
            lease.savepoints_made += 1
            savepoint = f"cp_{lease.savepoints_made}"
            self._run(lease, "create_checkpoint", checkpoint_id, "savepoint", savepoint)
            lease.checkpoints[checkpoint_id] = savepoint
            if self._telemetry is not None:
                self._telemetry.checkpoint(lease, checkpoint_id)
            created_at = time.time()
        except BaseException as exc:
            if created:
                self._abandon(lease, exc)
            else:
                self._leave(lease)
            raise
        self._leave(lease)
        return make_checkpoint_result(
            plan_id, checkpoint_id, resource.name, len(lease.checkpoints), created_at
        )

    def rollback_to(self, resource: Resource, plan_id: str, checkpoint_id: str) -> None:
        """Undo the plan's work on *resource* after *checkpoint_id*.

        The checkpoint stays and can be rolled back to again; checkpoints taken
        after it are forgotten.

        :raises CheckpointNotFoundError: no open checkpoint has that label there.
        """
        check_label("checkpoint_id", checkpoint_id)
        lease = self._enter(resource, plan_id, "rollback_to", checkpoint_id, create=False)
        if lease is None:
            raise _not_found(resource, plan_id, checkpoint_id)
        try:
            checkpoints = lease.checkpoints
            savepoint = checkpoints.get(checkpoint_id)
            if savepoint is None:
                raise _not_found(resource, plan_id, checkpoint_id)
            self._run(lease, "rollback_to", checkpoint_id, "rollback_to", savepoint)
            if self._telemetry is not None:
                self._telemetry.rolled_back_to(lease, checkpoint_id)
            while next(reversed(checkpoints)) != checkpoint_id:
                checkpoints.popitem()  # the newest: dicts keep insertion order
        finally:
            self._leave(lease)

    def release_plan(self, plan_id: str) -> None:
        """Commit all of the plan's work, one database at a time, and give its connections back.

        Every database is asked whether it can commit before the first COMMIT:
        a plan that cannot commit on one commits on none. A plan with no open
        work here is left alone. If a commit fails, the databases not yet
        committed are rolled back.

        :raises ResourceError: nothing was committed (the plan was rolled back);
            or release_plan was called inside one of the plan's own
            ``connection()`` blocks (nothing was done).
        :raises PartialCommitError: a commit failed, or was interrupted, after
            others succeeded.
        """
        plan = self._take_plan(plan_id, "release_plan")
        if plan is not None:
            self._finish(plan, commit=True)

    def rollback_plan(self, plan_id: str) -> None:
        """Undo all of the plan's work and give its connections back.

        A plan with no open work here is left alone. Called inside one of the
        plan's own ``connection()`` blocks, it rolls back and closes that
        connection: the block's ``conn`` is unusable afterwards.
        """
        plan = self._take_plan(plan_id, "rollback_plan")
        if plan is not None:
            self._finish(plan, commit=False)

    def execute(
        self,
        resource: Resource,
        plan_id: str,
        sql: str,
        params: Mapping[str, Any] | Sequence[Any] | None = None,
    ) -> list[tuple[Any, ...]]:
        """Run one statement in the plan's transaction and return its rows (if any).

        A mapping of *params* binds ``:name`` placeholders on every engine.
        """
        lease, _ = self._enter(resource, plan_id, "execute")
        try:
            rows: list[tuple[Any, ...]] = lease.database.engine.execute(lease.conn, sql, params)
        except BaseException as exc:
            self._after_plan_sql(lease, exc, "execute")
            raise
        else:
            self._after_plan_sql(lease, None, "execute")
            return rows
        finally:
            self._leave(lease)

    async def acreate_checkpoint(
        self, resource: Resource, plan_id: str, checkpoint_id: str
    ) -> CheckpointResult:
        """Awaitable :meth:`create_checkpoint`."""
        return await asyncio.to_thread(self.create_checkpoint, resource, plan_id, checkpoint_id)

    async def arollback_to(self, resource: Resource, plan_id: str, checkpoint_id: str) -> None:
        """Awaitable :meth:`rollback_to`."""
        await asyncio.to_thread(self.rollback_to, resource, plan_id, checkpoint_id)

    async def arelease_plan(self, plan_id: str) -> None:
        """Awaitable :meth:`release_plan`."""
        await asyncio.to_thread(self.release_plan, plan_id)

    async def arollback_plan(self, plan_id: str) -> None:
        """Awaitable :meth:`rollback_plan`."""
        await asyncio.to_thread(self.rollback_plan, plan_id)

    def interrupt(self) -> None:
        """Interrupt every statement running for a plan, from any thread.

        Safe to call from a signal handler: it takes no lock (a signal landing
        while the same thread holds the handler's mutex would otherwise wait
        for itself forever); it reads a snapshot of the open plans instead.
        """
        for plan in self._plans.snapshot():
            for lease in tuple(plan.leases.values()):
                conn = lease.conn
                if conn is not None:
                    lease.database.engine.interrupt(conn)

    def stats(self) -> HandlerStats:
        """Return a snapshot of the handler's counters."""
        with self._mutex:
            counts = self._counts
            return HandlerStats(
                open_connections=self._pool.open,
                idle_connections=len(self._pool),
                active_plans=len(self._plans),
                checkpoints=self._plans.checkpoints(),
                commits=counts["commits"],
                rollbacks=counts["rollbacks"],
                reaped=counts["reaped"],
                evicted=counts["evicted"],
                waits=counts["waits"],
                wait_timeouts=counts["wait_timeouts"],
                busy_timeouts=counts["busy_timeouts"],
                close_failures=counts["close_failures"],
            )

    def close(self) -> None:
        """Roll back open plans and close every connection. Calling it again does nothing.

        Every thread waiting for a pool slot or a write turn is woken at once
        and gets ``HandlerClosedError``. Plans another thread is committing or
        rolling back right now are waited for, so that nothing they use is
        closed under them; a plan mid-statement in another thread is
        interrupted, and waited for at most :attr:`close_wait` seconds (after
        that, the thread rolls it back itself when it leaves its block).
        """
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            plans = self._plans.take_all()
            self._pool.closed = True
            self._pool.wake(self._pool.waiters)
            for database in self._resolver.databases.values():
                database.turnstile.close()
        try:
            self._reaper.stop()
        finally:
            self._interrupt_running(plans)
            deadline = time.monotonic() + self.close_wait
            for plan in plans:
                try:
                    self._finish(plan, commit=False, wait_until=deadline)
                except Exception as exc:  # the other plans must still be rolled back
                    logger.warning("closing %r: %s", self.name, exc)
            with self._mutex:
                left = self._plans.wait_for_finishing(max(0.0, deadline - time.monotonic()))
                if left:
                    logger.warning(
                        "closing %r while plans %r are still being finished", self.name, left
                    )
                idle = self._pool.drain()
                memory = [
                    (database, database.memory_conn)
                    for database in self._resolver.databases.values()
                    if database.memory_conn is not None
                    and not any(
                        lease.database is database
                        for plan in self._orphans
                        for lease in plan.leases.values()
                    )
                ]
                for database, _ in memory:
                    database.memory_conn = None
                self._pool.release_slot(len(memory))
            for entry in idle:
                self._close_connection(entry.database, entry.conn)
            for database, conn in memory:
                self._close_connection(database, conn)
        _finalize.unwatch(self, self._finalizer)
        if self._telemetry is not None:
            self._telemetry.close()
        logger.debug("handler %r closed", self.name)

    def _interrupt_running(self, plans: Sequence[Plan]) -> None:
        """Interrupt the statements *plans* run in other threads right now."""
        for plan in plans:
            for lease in plan.leases.values():
                conn = lease.conn
                if conn is not None and lease.users and not lease.held_here():
                    lease.database.engine.interrupt(conn)

    # -- leases ---------------------------------------------------------------

    def _enter(
        self,
        resource: Resource,
        plan_id: str,
        operation: str,
        checkpoint_id: str | None = None,
        *,
        create: bool = True,
    ) -> Any:
        """Return the plan's lease on *resource*'s database, locked for the caller.

        With *create*, also return whether the lease was made by this call (and
        make it if needed); without, return ``None`` when there is no lease.

        A lease the plan already holds is found without the mutex: the lookups
        are single dict reads, and the lease's own lock, once held, says whether
        the lease is still alive (``ended`` and ``conn`` only change under it).
        A plan in the table never has an ending remembered, so nothing is
        missed that the locked path would raise.
        """
        check_label("plan_id", plan_id)
        if not isinstance(resource, Resource):
            raise TypeError(f"expected a Resource, got {resource!r}")
        # What the resource resolved to before, looked up without the mutex.
        known = self._resolver.by_id.get(id(resource))
        resolved = known[1] if known is not None else self._resolver.by_value.get(resource)
        plan = self._plans.get(plan_id)
        if plan is not None and resolved is not None and not self._closed:
            lease = plan.leases.get(resolved.database.identity)
            if lease is not None:  # self._hold(lease, ...), inline: the path every call takes
                lease.lock.acquire()
                if lease.ended is None and lease.conn is not None and plan.poisoned is None:
                    plan.last_used = time.monotonic()
                    lease.users += 1
                    return (lease, False) if create else lease
                lease.lock.release()
        while True:
            with self._mutex:
                lease, made = self._find_or_make_lease(resource, plan_id, operation, known, create)
            if lease is None:
                return None
            if made:
                break
            if self._hold(lease, resource, operation):
                return (lease, False) if create else lease
            # The plan ended (or its lease failed to open) while we waited: go
            # round again, which raises for a reaped/evicted plan.
        if self._telemetry is not None:
            self._telemetry.lease_made(lease)
        try:
            self._ready(lease, operation, checkpoint_id)
        except BaseException as exc:
            self._abandon(lease, exc)
            raise
        return lease, True

    def _hold(self, lease: Lease, resource: Resource, operation: str) -> bool:
        """Lock a lease the plan holds for the caller; ``False`` if it ended meanwhile."""
        lease.lock.acquire()
        if lease.ended is None and lease.conn is not None:
            plan = lease.plan
            if plan.poisoned is None:
                plan.last_used = time.monotonic()
                lease.users += 1
                return True
            lease.lock.release()
            raise _poisoned_error(plan, resource.name, operation)
        lease.lock.release()
        return False

    def _find_or_make_lease(
        self,
        resource: Resource,
        plan_id: str,
        operation: str,
        known: tuple[Resource, Resolved] | None,
        create: bool,
    ) -> tuple[Lease | None, bool]:
        """Find the plan's lease on *resource*'s database, or make it (locked); hold the mutex.

        A new lease gets an idle connection and a free write turn if both are at hand.
        """
        if self._closed:
            raise HandlerClosedError(self.name)
        self._plans.raise_if_ended(plan_id, operation)
        resolved = self._resolver.resolve(resource, plan_id, known)
        identity = resolved.database.identity
        now = time.monotonic()
        plan = self._plans.get(plan_id)
        lease = plan.leases.get(identity) if plan is not None else None
        if lease is not None or not create:
            if plan is not None:
                plan.last_used = now
            return lease, False
        if plan is not None and plan.poisoned is not None:  # on any database it touches next
            raise _poisoned_error(plan, resource.name, operation)
        ttl, opens_plan = resolved.ttl, plan is None
        # Armed first: should the reaper fail to start, nothing is made.
        if plan is None:
            self._arm_plan_sweep(now + ttl)
            plan = self._plans.open(plan_id, now, ttl)
        elif ttl < plan.ttl:
            self._arm_plan_sweep(plan.last_used + ttl)
            plan.ttl = ttl
        lease = Lease(plan, resolved, since=now, opens_plan=opens_plan)
        lease.lock.acquire()
        lease.users = 1
        plan.leases[identity] = lease
        plan.last_used = now
        self._take_at_hand(lease, resolved, plan_id)
        return lease, True

    def _ready(self, lease: Lease, operation: str, checkpoint_id: str | None) -> None:
        """Give a new lease what it still lacks (a connection, its turn), then BEGIN."""
        resolved = lease.resolved
        if lease.conn is None or (resolved.takes_turns and not lease.has_turn):
            self._wait_for_lease(lease, operation, checkpoint_id)
        engine = lease.database.engine
        for replacements_left in range(self.config.max_connections, -1, -1):
            try:
                engine.begin(lease.conn, resolved.settings, plan_id=lease.plan.plan_id)
                return
            except engine.driver_error as exc:
                lost = not resolved.memory and engine.classify(exc) == "lost"
                if not (lost and replacements_left):
                    raise self._wrap(exc, lease, operation, checkpoint_id) from exc
            # A pooled session the server ended while it sat idle (a restart,
            # a timeout): drop it and take another, as a pool's pre-ping would.
            self._replace_connection(lease)

    def _leave(self, lease: Lease) -> None:
        """Give back a lease :meth:`_enter` locked for the caller."""
        lease.plan.last_used = time.monotonic()
        lease.users -= 1
        lease.lock.release()
        if self._pool.waiters and not lease.users and self.config.on_full == "evict_lru":
            # A plan waiting for a slot may now evict this one.
            with self._mutex:
                self._pool.wake()
        if self._closed and lease.plan in self._orphans:
            self._finish_orphan(lease.plan)

    def _after_plan_sql(self, lease: Lease, exc: BaseException | None, operation: str) -> None:
        """Check, after the plan's own SQL ran, that its transaction is still there.

        If a statement ended it (SQLite's ``OR ROLLBACK``, a server that ended the
        session), the plan is poisoned: nothing of it will ever be committed.
        A lock wait or a lost session raised by the plan's SQL becomes the
        handler's error, chained to the driver's.
        """
        engine = lease.database.engine
        conn = lease.conn  # None if the block ended the plan itself (rollback_plan)
        lost = engine.transaction_lost(conn) if conn is not None else None
        if lost is not None and lease.plan.poisoned is None:
            lease.plan.poisoned = lost
            logger.info("plan %r is poisoned: %s", lease.plan.plan_id, lost)  # its calls raise
        if isinstance(exc, engine.driver_error) and engine.classify(exc) != "other":
            raise self._wrap(exc, lease, operation, None) from exc

    def _take_at_hand(self, lease: Lease, resolved: Resolved, plan_id: str) -> None:
        """Give a new lease an idle connection and its write turn, if both are free now.

        Call with the mutex held; nothing here waits. A turn is only taken
        together with a connection (as :meth:`_wait_for_lease` does, in that
        order), so a plan never holds a turn while it waits for a pool slot.
        """
        database = resolved.database
        if resolved.memory:
            conn = database.memory_conn
            if conn is not None and resolved.takes_turns and database.turnstile.try_take(plan_id):
                lease.has_turn = True
                lease.conn = conn
            return
        conn = self._pool.pop_idle(database, resolved.config)
        if conn is not None:
            lease.conn = conn
            if resolved.takes_turns and database.turnstile.try_take(plan_id):
                lease.has_turn = True

    def _wait_for_lease(self, lease: Lease, operation: str, checkpoint_id: str | None) -> None:
        """Give a new lease what :meth:`_take_at_hand` could not: a connection, then its turn."""
        resolved = lease.resolved
        database = lease.database
        settings = resolved.settings
        plan_id = lease.plan.plan_id
        if not resolved.memory and lease.conn is None:
            lease.conn = self._checkout(lease)
            if self._telemetry is not None:
                self._telemetry.checked_out(lease)
        if resolved.takes_turns and not lease.has_turn:
            if not database.turnstile.acquire(plan_id, settings.busy_timeout):
                if database.turnstile.closed:
                    raise HandlerClosedError(self.name)
                with self._mutex:
                    self._counts["busy_timeouts"] += 1
                holder = database.turnstile.holder
                raise ResourceBusyError(
                    f"database {database.label!r} stayed busy for longer than busy_timeout "
                    f"({settings.busy_timeout:g}s): plan {holder!r} holds its write turn",
                    holder=holder,
                    plan_id=plan_id,
                    checkpoint_id=checkpoint_id,
                    resource=resolved.resource,
                    operation=operation,
                )
            lease.has_turn = True
            if self._closed:
                raise HandlerClosedError(self.name)
        if resolved.memory and lease.conn is None:
            if database.memory_conn is None:
                # Only the turn holder gets here, so one thread opens it.
                database.memory_conn = self._checkout(lease)
            lease.conn = database.memory_conn
            if self._telemetry is not None:
                self._telemetry.checked_out(lease)

    def _run(
        self, lease: Lease, operation: str, checkpoint_id: str | None, action: str, *args: Any
    ) -> None:
        """Run the engine's *action* on the lease's connection, wrapping driver errors."""
        engine = lease.database.engine
        try:
            getattr(engine, action)(lease.conn, *args)
        except engine.driver_error as exc:
            raise self._wrap(exc, lease, operation, checkpoint_id) from exc

    # -- fork -----------------------------------------------------------------------

    def _forget_after_fork(self) -> None:
        """In a forked child: set the parent's connections aside and start empty."""
        _finalize.set_aside(self._finalizer)
        self._reset_state()


def _poisoned_error(plan: Plan, resource: str, operation: str) -> ResourceError:
    return ResourceError(
        f"the plan can no longer commit: {plan.poisoned}; it will be rolled back",
        plan_id=plan.plan_id,
        resource=resource,
        operation=operation,
    )


def _not_found(resource: Resource, plan_id: str, checkpoint_id: str) -> CheckpointError:
    return CheckpointNotFoundError(
        "no open checkpoint with this label",
        plan_id=plan_id,
        checkpoint_id=checkpoint_id,
        resource=resource.name,
        operation="rollback_to",
    )


def _databases_in_use(pool: ConnectionPool, plans: PlanTable) -> set[Hashable]:
    """Return the databases idle connections or open plans use; hold the mutex.

    A free function, not a method: the resolver keeps it, and the finalizer
    keeps the resolver, so it must not keep the handler alive.
    """
    return pool.idle_databases() | {identity for plan in plans for identity in plan.leases}


@hookimpl
def cleveragents_register_resource_handlers(registry: Any) -> None:
    """Serve the ``database`` resource kind."""
    registry.add(DatabaseResourceHandler)


__all__ = ["ENGINES", "DatabaseHandlerSettings", "DatabaseResourceHandler", "HandlerStats"]
