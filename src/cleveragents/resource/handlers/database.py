"""DatabaseResourceHandler: each plan's own transaction per database, savepoints as checkpoints.

The core here is engine-neutral; what differs between SQLite and PostgreSQL
lives behind :class:`~cleveragents.resource.handlers.engine.Engine`.

Ownership, in one place:

* the handler owns every connection: ``_open`` counts them (lent, idle and
  in-memory together) and never exceeds ``max_connections``;
* a plan owns one *lease* per database it touched: the connection, its
  checkpoints, its write turn, and a lock so one thread at a time uses it;
* the reaper owns nothing: it only calls back at deadlines, one for all
  plans (the earliest a plan can expire) and one for idle connections;
* ``_lock`` guards the bookkeeping, write turnstiles included, and is never
  held while SQL runs. Lock order is lease lock, then ``_lock``; under
  ``_lock`` a new lease's lock is taken, any other only tried without blocking.

The per-plan path is kept short on purpose (see docs/performance.md): a new
lease gets an idle connection and a free turn in the one critical section that
makes it, a lease already held is found without ``_lock``, and giving it back
is one more critical section.
"""

from __future__ import annotations

import _thread
import asyncio
import collections
import dataclasses
import functools
import itertools
import logging
import os
import threading
import time
import warnings
import weakref
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Annotated, Any, ClassVar, Literal, Self, Union, final

from pydantic import ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from cleveragents.durations import Duration
from cleveragents.errors import (
    CheckpointError,
    CheckpointEvictedError,
    CheckpointExpiredError,
    CheckpointNotFoundError,
    HandlerClosedError,
    PartialCommitError,
    PoolExhaustedError,
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
from cleveragents.resource.handlers.engine import Engine
from cleveragents.resource.handlers.postgresql import PostgreSQLEngine
from cleveragents.resource.handlers.sqlite import SQLiteEngine
from cleveragents.resource.reaper import Deadline, Reaper

logger = logging.getLogger(__name__)

OnFull = Literal["wait", "evict_lru"]

#: Engines by the value of ``engine:``; each handler makes its own instance.
ENGINES: dict[str, type[Engine]] = {
    SQLiteEngine.name: SQLiteEngine,
    PostgreSQLEngine.name: PostgreSQLEngine,
}

# Reaped/evicted plans are remembered so that their next call raises instead of
# silently starting a new transaction (which release_plan would then commit:
# a partial commit). The latest _MAX_ENDINGS are always kept, older ones for at
# least _ENDINGS_KEPT_FOR seconds: a plan forgotten for good must not grow
# memory forever, and one that comes back within the hour still gets its error.
_MAX_ENDINGS = 10_000
_ENDINGS_KEPT_FOR = 3600.0
_MAX_LABEL = 256
# close() waits at most this long for plans other threads are finishing.
_CLOSE_WAIT = 30.0
_MAX_RESOLVED = 1024
_handler_ids = itertools.count(1)


class DatabaseHandlerSettings(BaseSettings):
    """Handler-wide settings; read from ``CLEVERAGENTS_*`` variables by :meth:`from_config`."""

    model_config = SettingsConfigDict(env_prefix="CLEVERAGENTS_", extra="ignore", frozen=True)

    max_connections: int = Field(
        default=32, ge=1, description="Open connections at most, lent and idle together."
    )
    acquire_timeout: Duration = Field(
        default=5.0, description="How long a plan waits for a free connection slot."
    )
    idle_timeout: Duration = Field(
        default=60.0, description="Idle connections are closed after this long."
    )
    on_full: OnFull = Field(
        default="wait",
        description="When every slot holds a live plan: 'wait', or 'evict_lru' to roll "
        "back the least recently used plan.",
    )
    checkpoint_ttl: Duration = Field(
        default=300.0, gt=0, description="Idle time after which a plan is rolled back."
    )


def _engine_of(value: Any) -> str:
    engine = value.get("engine", "sqlite") if isinstance(value, Mapping) else value.engine
    return engine if isinstance(engine, str) else repr(engine)


@functools.cache
def _settings_adapter() -> TypeAdapter[Any]:
    """Return the validator of a database resource: one settings model per engine."""
    choices: Any = tuple(Annotated[cls.settings_model, Tag(name)] for name, cls in ENGINES.items())
    union: Any = Union[choices]  # noqa: UP007 - built from a tuple at run time
    # Inputs stay out of error messages: one of them may be a DSN with a password.
    config = ConfigDict(hide_input_in_errors=True)
    return TypeAdapter(Annotated[union, Discriminator(_engine_of)], config=config)


@functools.lru_cache(maxsize=1024)
def _validated(resource: Resource) -> Any:
    engine = resource.options.get("engine", "sqlite")
    if not isinstance(engine, str) or engine not in ENGINES:
        # The union would report an unknown engine against the whole resource;
        # report it against the 'engine' key, so the plan error names its line.
        expected = " or ".join(repr(name) for name in ENGINES)
        raise ValidationError.from_exception_data(
            "DatabaseSettings",
            [
                {
                    "type": "literal_error",
                    "loc": ("engine",),
                    "input": engine,
                    "ctx": {"expected": expected},
                }
            ],
        )
    return _settings_adapter().validate_python(dict(resource.options))


def _check_label(what: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > _MAX_LABEL:
        raise ValueError(f"{what} is longer than {_MAX_LABEL} characters: {value[:40]!r}...")
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL characters: {value!r}")
    return value


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


class _Turnstile:
    """Admits one plan at a time to a database, first come, first served.

    It shares the handler's ``_lock``: taking a free turn and giving it back
    happen inside the handler's own critical sections, so the uncontended path
    costs no lock of its own and no thread handoff. A waiter parks on its own
    lock and is handed the turn directly, so a release wakes exactly the next
    plan in line.
    """

    __slots__ = ("_mutex", "_queue", "holder")

    def __init__(self, mutex: threading.Lock) -> None:
        self._mutex = mutex
        self._queue: collections.deque[tuple[threading.Lock, str]] = collections.deque()
        self.holder: str | None = None

    def try_take(self, plan_id: str) -> bool:
        """Take the turn if nobody holds it or waits for it; call with the mutex held."""
        if self.holder is None and not self._queue:
            self.holder = plan_id
            return True
        return False

    def acquire(self, plan_id: str, timeout: float) -> bool:
        """Wait up to *timeout* for the turn; call without the mutex held."""
        with self._mutex:
            if self.try_take(plan_id):
                return True
            gate = threading.Lock()
            gate.acquire()
            entry = (gate, plan_id)
            self._queue.append(entry)
        try:
            if gate.acquire(timeout=timeout):
                return True
        except BaseException:
            # Interrupted (KeyboardInterrupt) while waiting: leave the line, and
            # pass on a turn handed over meanwhile, or nobody would ever get it.
            with self._mutex:
                if gate.acquire(blocking=False):
                    self.release()
                else:
                    self._queue.remove(entry)
            raise
        with self._mutex:
            if gate.acquire(blocking=False):
                return True  # handed over just as we gave up
            self._queue.remove(entry)
            return False

    def release(self) -> None:
        """Hand the turn to the next plan in line; call with the mutex held."""
        if self._queue:
            gate, self.holder = self._queue.popleft()
            gate.release()
        else:
            self.holder = None


class _Database:
    """One database as this handler sees it: its engine, write turnstile and memory connection."""

    __slots__ = ("engine", "identity", "label", "memory_conn", "turnstile")

    def __init__(
        self, identity: Hashable, engine: Engine, label: str, mutex: threading.Lock
    ) -> None:
        self.identity = identity
        self.engine = engine
        self.label = label
        self.turnstile = _Turnstile(mutex)
        self.memory_conn: Any = None


@dataclasses.dataclass(frozen=True, slots=True)
class _Resolved:
    """What a resource resolves to, worked out once per resource and cached."""

    resource: str
    settings: Any
    database: _Database
    #: What an idle connection must match to be lent for this resource.
    config: Hashable
    ttl: float
    memory: bool
    takes_turns: bool


class _Plan:
    """A plan with open work on this handler."""

    __slots__ = ("last_used", "leases", "plan_id", "poisoned", "settled", "ttl")

    def __init__(self, plan_id: str, now: float, ttl: float) -> None:
        self.plan_id = plan_id
        self.last_used = now
        self.ttl = ttl
        self.leases: dict[Hashable, _Lease] = {}
        #: Why the plan can no longer commit (its transaction ended under it), once known.
        self.poisoned: str | None = None
        self.settled = (
            False  # taken out of _plans and finished: see DatabaseResourceHandler._finish
        )


class _Lease:
    """A plan's connection to one database, with its checkpoints and write turn."""

    __slots__ = (
        "checkpoints",
        "conn",
        "database",
        "ended",
        "has_turn",
        "lock",
        "plan",
        "resolved",
        "savepoints_made",
        "users",
    )

    def __init__(self, plan: _Plan, resolved: _Resolved) -> None:
        self.plan = plan
        self.resolved = resolved  # its settings, resource name and connection config
        self.database = resolved.database
        self.lock = _thread.RLock()  # threading.RLock() is a Python-level factory for it
        self.users = 0
        self.conn: Any = None
        self.has_turn = False
        #: The savepoint name of each open checkpoint, by label, oldest first.
        self.checkpoints: dict[str, str] = {}
        self.savepoints_made = 0
        self.ended: str | None = None


@dataclasses.dataclass(slots=True)
class _Idle:
    database: _Database
    conn: Any
    config: Hashable
    since: float


@dataclasses.dataclass(frozen=True, slots=True)
class _Ending:
    """Why a plan ended without being asked to: its next call raises this, once."""

    how: Literal["expired", "evicted"]
    checkpoint_id: str | None
    resource: str | None
    age: float
    ttl: float
    at: float  # when it ended (monotonic)


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
        self._lease: _Lease | None = None

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
        try:
            self._handler._after_plan_sql(lease, exc, "connection")
        finally:  # DatabaseResourceHandler._leave, inline
            lease.plan.last_used = time.monotonic()
            lease.users -= 1
            lease.lock.release()


_LIVE: weakref.WeakSet[DatabaseResourceHandler] = weakref.WeakSet()
# What a forked child inherited: the containers holding the parent's
# connections (never the handlers themselves). They are kept referenced and
# never used: closing or rolling them back would act on the parent's state.
_INHERITED: list[Any] = []


@final
class DatabaseResourceHandler(ResourceHandler):
    """Gives every plan its own transaction on each database it touches.

    Checkpoints are savepoints on the plan's one connection per database.
    Completed plans are released (committed), failed ones rolled back, and the
    connections go back to a bounded pool. A reaper thread rolls back plans
    that were forgotten. See the class docs in README for the whole contract.
    """

    kind: ClassVar[str] = "database"

    def __init__(
        self,
        *,
        max_connections: int = 32,
        acquire_timeout: float | str = 5.0,
        idle_timeout: float | str = 60.0,
        on_full: OnFull = "wait",
        checkpoint_ttl: float | str = 300.0,
        name: str | None = None,
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
        self._reset_state()
        _LIVE.add(self)
        logger.debug("handler %r created: %s", self.name, config)

    def _reset_state(self) -> None:
        """Create every lock and container afresh (at start, and in a forked child)."""
        self._lock = threading.Lock()
        self._slot_freed = threading.Condition(self._lock)
        self._engines: dict[str, Engine] = {}
        self._databases: dict[Hashable, _Database] = {}
        self._resolved: dict[Resource, _Resolved] = {}
        # The same, by the Resource object itself: keyed by id(), with the
        # object kept alive in the value, so an id found here is that very
        # object's (two live objects never share one). Equal resources made
        # apart (each plan load makes its own) cost one equality lookup each.
        self._resolved_by_id: dict[int, tuple[Resource, _Resolved]] = {}
        self._plans: dict[str, _Plan] = {}
        # One reaper deadline covers every plan: the earliest moment one of them
        # can expire. Plans that end before it cost the reaper nothing.
        self._plan_sweep: Deadline | None = None
        self._idle: collections.OrderedDict[int, _Idle] = collections.OrderedDict()
        self._idle_sweep: Deadline | None = None
        self._slot_waiters = 0  # threads in _slot_freed.wait(): notify only when one waits
        # Plans taken out of _plans and not yet finished (committed or rolled
        # back): close() waits for them before it closes what they still use.
        self._finishing: set[_Plan] = set()
        self._settled = threading.Condition(self._lock)
        self._endings: collections.OrderedDict[str, _Ending] = collections.OrderedDict()
        self._open = 0
        self._counts: collections.Counter[str] = collections.Counter()
        self._reaper = Reaper(self, name=f"cleveragents-reaper[{self.name}]")
        self._finalizer = weakref.finalize(
            self, _finalize, self.name, self._plans, self._idle, self._databases, self._reaper
        )

    # -- configuration -------------------------------------------------------

    @classmethod
    def validate_settings(cls, resource: Resource) -> Any:
        """Return the engine settings of *resource*.

        :raises pydantic.ValidationError: a key is unknown, missing or mistyped.
        """
        return _validated(resource)

    @classmethod
    def settings_json_schema(cls) -> dict[str, Any]:
        schema = _settings_adapter().json_schema(ref_template="#/$defs/{model}")
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
        settings = DatabaseHandlerSettings(**given)
        return cls(**settings.model_dump(), name=name)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._plans)} plans, {self._open} connections"
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
        block ends. Never commit or roll it back yourself.
        """
        return _Lending(self, resource, plan_id)

    def create_checkpoint(
        self, resource: Resource, plan_id: str, checkpoint_id: str
    ) -> CheckpointResult:
        """Take a checkpoint (a savepoint) labelled *checkpoint_id* in the plan's work.

        :raises CheckpointError: the plan already has a checkpoint with that label there.
        """
        _check_label("checkpoint_id", checkpoint_id)
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
            engine = lease.database.engine
            try:
                engine.savepoint(lease.conn, savepoint)
            except engine.driver_error as exc:
                raise self._wrap(exc, lease, "create_checkpoint", checkpoint_id) from exc
            lease.checkpoints[checkpoint_id] = savepoint
            created_at = time.time()
        except BaseException:
            if created:
                self._abandon(lease)
            else:
                self._leave(lease)
            raise
        # _leave(lease), inline: this is the path every plan takes.
        lease.plan.last_used = time.monotonic()
        lease.users -= 1
        lease.lock.release()
        return make_checkpoint_result(
            plan_id, checkpoint_id, resource.name, len(lease.checkpoints), created_at
        )

    def rollback_to(self, resource: Resource, plan_id: str, checkpoint_id: str) -> None:
        """Undo the plan's work on *resource* after *checkpoint_id*.

        The checkpoint stays and can be rolled back to again; checkpoints taken
        after it are forgotten.

        :raises CheckpointNotFoundError: no open checkpoint has that label there.
        """
        _check_label("checkpoint_id", checkpoint_id)
        lease = self._enter(resource, plan_id, "rollback_to", checkpoint_id, create=False)
        if lease is None:
            raise self._not_found(resource, plan_id, checkpoint_id)
        try:
            checkpoints = lease.checkpoints
            savepoint = checkpoints.get(checkpoint_id)
            if savepoint is None:
                raise self._not_found(resource, plan_id, checkpoint_id)
            self._run(
                lease,
                "rollback_to",
                checkpoint_id,
                lease.database.engine.rollback_to,
                savepoint,
            )
            while next(reversed(checkpoints)) != checkpoint_id:
                checkpoints.popitem()  # the newest: dicts keep insertion order
        finally:
            self._leave(lease)

    def release_plan(self, plan_id: str) -> None:
        """Commit all of the plan's work, one database at a time, and give its connections back.

        A plan with no open work here is left alone. If a commit fails, the
        databases not yet committed are rolled back.

        :raises PartialCommitError: a commit failed after others succeeded.
        """
        plan = self._take_plan(plan_id, "release_plan")
        if plan is not None:
            self._finish(plan, commit=True)

    def rollback_plan(self, plan_id: str) -> None:
        """Undo all of the plan's work and give its connections back.

        A plan with no open work here is left alone.
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
        """Interrupt every statement running for a plan, from any thread."""
        with self._lock:
            leases = [
                lease
                for plan in self._plans.values()
                for lease in plan.leases.values()
                if lease.conn is not None
            ]
        for lease in leases:
            conn = lease.conn
            if conn is not None:
                lease.database.engine.interrupt(conn)

    def stats(self) -> HandlerStats:
        """Return a snapshot of the handler's counters."""
        with self._lock:
            counts = self._counts
            return HandlerStats(
                open_connections=self._open,
                idle_connections=len(self._idle),
                active_plans=len(self._plans),
                checkpoints=sum(
                    len(lease.checkpoints)
                    for plan in self._plans.values()
                    for lease in plan.leases.values()
                ),
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

        Plans another thread is committing or rolling back right now are
        waited for, so that nothing they use is closed under them.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            plans = list(self._plans.values())
            self._plans.clear()
            self._finishing.update(plans)
            self._slot_freed.notify_all()
        try:
            self._reaper.stop()
        finally:
            for plan in plans:
                try:
                    self._finish(plan, commit=False)
                except Exception as exc:  # the other plans must still be rolled back
                    logger.warning("closing %r: %s", self.name, exc)
            with self._lock:
                self._wait_for_finishing_plans()
                idle = list(self._idle.values())
                self._idle.clear()
                memory = [
                    (database, database.memory_conn)
                    for database in self._databases.values()
                    if database.memory_conn is not None
                ]
                for database, _ in memory:
                    database.memory_conn = None
                self._open -= len(idle) + len(memory)
            for entry in idle:
                self._close_connection(entry.database, entry.conn)
            for database, conn in memory:
                self._close_connection(database, conn)
        self._finalizer.detach()
        _LIVE.discard(self)
        logger.debug("handler %r closed", self.name)

    @hookimpl
    def cleveragents_plan_completed(self, plan: Any) -> None:
        """Commit the completed plan's work."""
        self.release_plan(plan.id)

    @hookimpl
    def cleveragents_plan_failed(self, plan: Any) -> None:
        """Roll back the failed plan's work."""
        self.rollback_plan(plan.id)

    # -- leases ---------------------------------------------------------------

    def _resolve(self, resource: Resource, plan_id: str) -> _Resolved:
        """Validate *resource* and find its database (both cached). Call with ``_lock`` held."""
        known = self._resolved_by_id.get(id(resource))
        if known is not None:
            return known[1]
        if len(self._resolved_by_id) >= _MAX_RESOLVED:
            self._resolved_by_id.clear()
        found = self._resolved.get(resource)
        if found is not None:
            self._resolved_by_id[id(resource)] = (resource, found)
            return found
        try:
            settings = _validated(resource)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or "engine"
            raise ResourceError(
                f"bad setting {field}: {first['msg']}", plan_id=plan_id, resource=resource.name
            ) from None
        engine = self._engines.get(settings.engine)
        if engine is None:
            engine = self._engines[settings.engine] = ENGINES[settings.engine]()
            engine.default_checkpoint_ttl = self.config.checkpoint_ttl
        identity = engine.identity(settings, resource.name)
        database = self._databases.get(identity)
        if database is None:
            if len(self._databases) >= _MAX_RESOLVED:
                self._forget_unused_databases()
            database = _Database(identity, engine, engine.describe(settings), self._lock)
            self._databases[identity] = database
        if len(self._resolved) >= _MAX_RESOLVED:
            self._resolved.clear()
        found = self._resolved[resource] = _Resolved(
            resource=resource.name,
            settings=settings,
            database=database,
            config=engine.connection_config(settings),
            ttl=settings.checkpoint_ttl or self.config.checkpoint_ttl,
            memory=engine.is_memory(settings),
            takes_turns=engine.takes_turns(settings),
        )
        self._resolved_by_id[id(resource)] = (resource, found)
        return found

    def _forget_unused_databases(self) -> None:
        """Drop databases nothing uses, so endless distinct files stay bounded; hold ``_lock``."""
        used = {entry.database.identity for entry in self._idle.values()}
        used |= {identity for plan in self._plans.values() for identity in plan.leases}
        for identity, database in list(self._databases.items()):
            busy = database.turnstile.holder is not None or database.memory_conn is not None
            if identity not in used and not busy:
                del self._databases[identity]
        self._resolved.clear()
        self._resolved_by_id.clear()

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

        A lease the plan already holds is found without ``_lock``: the lookups
        are single dict reads, and the lease's own lock, once held, says whether
        the lease is still alive (``ended`` and ``conn`` only change under it).
        A plan in ``_plans`` never has an entry in ``_endings``, so nothing is
        missed that the locked path would raise.

        A new lease takes an idle connection and a free write turn right here,
        under ``_lock``; only when one of them is not at hand does
        :meth:`_wait_for_lease` wait for it, outside the lock.
        """
        _check_label("plan_id", plan_id)
        if not isinstance(resource, Resource):
            raise TypeError(f"expected a Resource, got {resource!r}")
        plan = self._plans.get(plan_id)
        known = self._resolved_by_id.get(id(resource))
        resolved = known[1] if known is not None else self._resolved.get(resource)
        if plan is not None and resolved is not None and not self._closed:
            lease = plan.leases.get(resolved.database.identity)
            if lease is not None:
                lease.lock.acquire()
                if lease.ended is None and lease.conn is not None:
                    if plan.poisoned is None:
                        plan.last_used = time.monotonic()
                        lease.users += 1
                        return (lease, False) if create else lease
                    lease.lock.release()
                    raise self._poisoned_error(plan, resource.name, operation)
                lease.lock.release()
        while True:
            with self._lock:
                if self._closed:
                    raise HandlerClosedError(self.name)
                if self._endings:
                    self._raise_if_ended(plan_id, operation)
                if known is not None and self._resolved_by_id.get(id(resource)) is known:
                    resolved = known[1]  # what the lock-free look-up found is still current
                else:
                    resolved = self._resolve(resource, plan_id)
                database = resolved.database
                now = time.monotonic()
                plan = self._plans.get(plan_id)
                lease = plan.leases.get(database.identity) if plan is not None else None
                if lease is None:
                    if not create:
                        return None
                    ttl = resolved.ttl
                    # Armed first: should the reaper fail to start, nothing is made.
                    if plan is None:
                        self._arm_plan_sweep(now + ttl)
                        plan = self._plans[plan_id] = _Plan(plan_id, now, ttl)
                    elif ttl < plan.ttl:
                        self._arm_plan_sweep(plan.last_used + ttl)
                        plan.ttl = ttl
                    lease = _Lease(plan, resolved)
                    lease.lock.acquire()
                    lease.users = 1
                    plan.leases[database.identity] = lease
                    plan.last_used = now
                    self._take_at_hand(lease, resolved, plan_id)
                    break
                assert plan is not None
                plan.last_used = now
            lease.lock.acquire()
            if lease.ended is None and lease.conn is not None:
                if plan.poisoned is None:
                    lease.users += 1
                    return (lease, False) if create else lease
                lease.lock.release()
                raise self._poisoned_error(plan, resource.name, operation)
            lease.lock.release()
            # The plan ended (or its lease failed to open) while we waited: go
            # round again, which raises for a reaped/evicted plan.
        try:
            if lease.conn is None or (resolved.takes_turns and not lease.has_turn):
                self._wait_for_lease(lease, operation, checkpoint_id)
            engine = database.engine
            for replacements_left in range(self.config.max_connections, -1, -1):
                try:
                    engine.begin(lease.conn, resolved.settings, plan_id=plan_id)
                    break
                except engine.driver_error as exc:
                    lost = not resolved.memory and engine.classify(exc) == "lost"
                    if not (lost and replacements_left):
                        raise self._wrap(exc, lease, operation, checkpoint_id) from exc
                # A pooled session the server ended while it sat idle (a restart,
                # a timeout): drop it and take another, as a pool's pre-ping would.
                self._replace_connection(lease)
        except BaseException:
            self._abandon(lease)
            raise
        return lease, True

    def _after_plan_sql(self, lease: _Lease, exc: BaseException | None, operation: str) -> None:
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
            logger.warning("plan %r is poisoned: %s", lease.plan.plan_id, lost)
        if isinstance(exc, engine.driver_error) and engine.classify(exc) != "other":
            raise self._wrap(exc, lease, operation, None) from exc

    def _poisoned_error(self, plan: _Plan, resource: str, operation: str) -> ResourceError:
        return ResourceError(
            f"the plan can no longer commit: {plan.poisoned}; it will be rolled back",
            plan_id=plan.plan_id,
            resource=resource,
            operation=operation,
        )

    def _leave(self, lease: _Lease) -> None:
        lease.plan.last_used = time.monotonic()
        lease.users -= 1
        lease.lock.release()

    def _take_at_hand(self, lease: _Lease, resolved: _Resolved, plan_id: str) -> None:
        """Give a new lease an idle connection and its write turn, if both are free now.

        Call with ``_lock`` held; nothing here waits. A turn is only taken
        together with a connection (as :meth:`_wait_for_lease` does, in that order),
        so a plan never holds a turn while it waits for a pool slot.
        """
        database = resolved.database
        if resolved.memory:
            conn = database.memory_conn
            if conn is not None and resolved.takes_turns and database.turnstile.try_take(plan_id):
                lease.has_turn = True
                lease.conn = conn
            return
        conn = self._pop_idle(resolved)
        if conn is not None:
            lease.conn = conn
            if resolved.takes_turns and database.turnstile.try_take(plan_id):
                lease.has_turn = True

    def _pop_idle(self, resolved: _Resolved) -> Any:
        """Take the most recently used idle connection that fits *resolved*; hold ``_lock``."""
        idle = self._idle
        for key in reversed(idle):
            entry = idle[key]
            if entry.database is resolved.database and entry.config == resolved.config:
                del idle[key]
                return entry.conn
        return None

    def _wait_for_lease(self, lease: _Lease, operation: str, checkpoint_id: str | None) -> None:
        """Give a new lease what :meth:`_take_at_hand` could not: a connection, then its turn."""
        resolved = lease.resolved
        database = lease.database
        settings = resolved.settings
        plan_id = lease.plan.plan_id
        if not resolved.memory and lease.conn is None:
            lease.conn = self._checkout(lease, settings)
        if resolved.takes_turns and not lease.has_turn:
            if not database.turnstile.acquire(plan_id, settings.busy_timeout):
                with self._lock:
                    self._counts["busy_timeouts"] += 1
                holder = database.turnstile.holder
                raise ResourceBusyError(
                    f"database {database.label!r} stayed busy for longer than busy_timeout "
                    f"({settings.busy_timeout:g}s): plan {holder!r} holds its write turn",
                    holder=holder,
                    plan_id=plan_id,
                    checkpoint_id=checkpoint_id,
                    resource=lease.resolved.resource,
                    operation=operation,
                )
            lease.has_turn = True
        if resolved.memory and lease.conn is None:
            if database.memory_conn is None:
                # Only the turn holder gets here, so one thread opens it.
                database.memory_conn = self._checkout(lease, settings)
            lease.conn = database.memory_conn

    def _run(
        self,
        lease: _Lease,
        operation: str,
        checkpoint_id: str | None,
        action: Any,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """Run an engine action on the lease's connection, wrapping driver errors."""
        engine = lease.database.engine
        try:
            action(lease.conn, *args, **kwargs)
        except engine.driver_error as exc:
            raise self._wrap(exc, lease, operation, checkpoint_id) from exc

    def _wrap(
        self, exc: BaseException, lease: _Lease, operation: str, checkpoint_id: str | None
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
            with self._lock:
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

    def _abandon(self, lease: _Lease) -> None:
        """Undo a lease this call made: roll back, give the connection back, forget it."""
        try:
            self._end_lease(lease, commit=False, ended="failed")
        except ResourceError as exc:
            logger.debug("abandoning lease of plan %r: %s", lease.plan.plan_id, exc)
        finally:
            self._checkin(lease)
            with self._lock:
                plan = lease.plan
                if plan.leases.get(lease.database.identity) is lease:
                    del plan.leases[lease.database.identity]
                if not plan.leases and self._plans.get(plan.plan_id) is plan:
                    del self._plans[plan.plan_id]
            lease.users -= 1
            lease.lock.release()

    def _not_found(self, resource: Resource, plan_id: str, checkpoint_id: str) -> CheckpointError:
        return CheckpointNotFoundError(
            "no open checkpoint with this label",
            plan_id=plan_id,
            checkpoint_id=checkpoint_id,
            resource=resource.name,
            operation="rollback_to",
        )

    # -- the pool -------------------------------------------------------------

    def _checkout(self, lease: _Lease, settings: Any) -> Any:
        """Return a connection for *lease*: an idle one if it fits, else a new one.

        Waits for a slot up to ``acquire_timeout``; with ``on_full="evict_lru"``
        rolls back the least recently used other plan instead of waiting.
        """
        deadline = time.monotonic() + self.config.acquire_timeout
        waited = False
        while True:
            victim: _Plan | None = None
            to_close: _Idle | None = None
            with self._lock:
                self._check_open()
                conn = self._pop_idle(lease.resolved)
                if conn is not None:
                    return conn
                if self._open < self.config.max_connections:
                    self._open += 1
                elif self._idle:
                    _, to_close = self._idle.popitem(last=False)  # its slot becomes ours
                elif self.config.on_full == "evict_lru" and (
                    victim := self._pick_victim(lease.plan)
                ):
                    pass
                else:
                    remaining = deadline - time.monotonic()
                    if not waited:
                        waited = True
                        self._counts["waits"] += 1
                    if remaining <= 0:
                        self._counts["wait_timeouts"] += 1
                        holders = sorted(
                            plan.plan_id
                            for plan in self._plans.values()
                            if any(held.conn is not None for held in plan.leases.values())
                        )
                        raise PoolExhaustedError(
                            f"all {self.config.max_connections} connections are held by live "
                            f"plans {holders[:10]!r} for longer than acquire_timeout "
                            f"({self.config.acquire_timeout:g}s); raise max_connections or "
                            "finish plans sooner",
                            limit=self.config.max_connections,
                            holders=holders,
                            plan_id=lease.plan.plan_id,
                            resource=lease.resolved.resource,
                            operation="acquire",
                        )
                    self._slot_waiters += 1
                    try:
                        self._slot_freed.wait(remaining)
                    finally:
                        self._slot_waiters -= 1
                    continue
            if victim is not None:
                self._finish(victim, commit=False, locked=True)
                continue
            if to_close is not None:
                self._close_connection(to_close.database, to_close.conn)
            return self._open_connection(lease, settings)

    def _replace_connection(self, lease: _Lease) -> None:
        """Close the lease's broken connection and give the lease another one."""
        conn, lease.conn = lease.conn, None
        with self._lock:
            self._open -= 1
            if self._slot_waiters:
                self._slot_freed.notify()
        logger.info("handler %r dropped a connection the server had closed", self.name)
        self._close_connection(lease.database, conn)
        lease.conn = self._checkout(lease, lease.resolved.settings)

    def _open_connection(self, lease: _Lease, settings: Any) -> Any:
        """Open a connection in a slot already counted in ``_open``."""
        engine = lease.database.engine
        try:
            conn = engine.open(settings, application_name=f"cleveragents:{lease.plan.plan_id}")
        except BaseException as exc:
            with self._lock:
                self._open -= 1
                if self._slot_waiters:
                    self._slot_freed.notify()
            if isinstance(exc, engine.driver_error):
                raise self._wrap(exc, lease, "open", None) from exc
            raise
        logger.debug("handler %r opened a connection to %r", self.name, lease.database.label)
        return conn

    def _checkin(self, lease: _Lease, *, broken: bool = False, outcome: str | None = None) -> None:
        """Take the lease's connection and write turn back: to the idle pool if clean, else close.

        One pass under ``_lock`` gives back both and counts the plan's
        *outcome* (a ``_counts`` key), if given. The next plan in line for the
        turn is woken only once the shared memory connection is settled.
        """
        database = lease.database
        conn, lease.conn = lease.conn, None
        memory = lease.resolved.memory
        clean = conn is not None and not memory and not broken and database.engine.is_clean(conn)
        close = False
        with self._lock:
            if outcome is not None:
                self._counts[outcome] += 1
                self._settle(lease.plan)
            if conn is None:
                pass
            elif memory:
                # The shared connection stays, unless it broke: then whoever takes
                # it out of memory_conn (here, or close()) uncounts and closes it.
                if broken and database.memory_conn is conn:
                    database.memory_conn = None
                    self._open -= 1
                    close = True
            elif clean and not self._closed:
                now = time.monotonic()
                self._idle[id(conn)] = _Idle(database, conn, lease.resolved.config, now)
                if self._idle_sweep is None:
                    self._idle_sweep = self._reaper.schedule(now + self.config.idle_timeout, "idle")
            else:
                self._open -= 1
                close = True
            # The turn goes on only now that the memory connection is settled.
            if lease.has_turn:
                lease.has_turn = False
                database.turnstile.release()
            if (close or clean) and self._slot_waiters:
                self._slot_freed.notify()
        if close:
            self._close_connection(database, conn)

    def _close_connection(self, database: _Database, conn: Any) -> None:
        try:
            database.engine.close(conn)
        except database.engine.driver_error as exc:
            with self._lock:
                self._counts["close_failures"] += 1
            logger.warning(
                "closing a connection to %r failed: %s",
                database.label,
                database.engine.redact(exc),
            )

    # -- ending plans -----------------------------------------------------------

    def _take_plan(self, plan_id: str, operation: str) -> _Plan | None:
        _check_label("plan_id", plan_id)
        with self._lock:
            if self._closed:
                raise HandlerClosedError(self.name)
            if self._endings:
                self._raise_if_ended(plan_id, operation)
            plan = self._plans.pop(plan_id, None)
            if plan is not None:
                self._finishing.add(plan)  # the caller finishes it
            return plan

    def _finish(self, plan: _Plan, *, commit: bool, locked: bool = False) -> None:
        """Commit or roll back every lease of a plan already taken out of ``_plans``.

        Whoever takes a plan out adds it to ``_finishing``; this takes it off.

        Databases are committed in first-use order; after a failed commit the
        rest are rolled back. Each lease's connection and turn are given back
        as soon as its database is done; the plan's outcome is counted when the
        last one is. With *locked*, the caller already holds every lease lock
        (eviction and reaping).
        """
        try:
            self._finish_leases(plan, commit=commit, locked=locked)
        finally:
            if not plan.settled:  # normally the last check-in did it, in its critical section
                with self._lock:
                    self._settle(plan)

    def _settle(self, plan: _Plan) -> None:
        """Take a finished plan off ``_finishing``; call with ``_lock`` held."""
        plan.settled = True
        self._finishing.discard(plan)
        if self._closed:
            self._settled.notify_all()

    def _wait_for_finishing_plans(self) -> None:
        """Wait (in :meth:`close`) for plans other threads are committing or rolling back.

        Call with ``_lock`` held. Plans whose lease this very thread holds
        (close() called inside a ``connection()`` block) cannot finish before
        it returns, so they are not waited for; nor is anything for longer
        than ``_CLOSE_WAIT`` seconds.
        """
        deadline = time.monotonic() + _CLOSE_WAIT
        while True:
            others = [
                plan.plan_id
                for plan in self._finishing
                if not any(_held_here(lease.lock) for lease in plan.leases.values())
            ]
            remaining = deadline - time.monotonic()
            if not others:
                return
            if remaining <= 0:
                logger.warning(
                    "closing %r while plans %r are still being finished", self.name, others
                )
                return
            self._settled.wait(remaining)

    def _finish_leases(self, plan: _Plan, *, commit: bool, locked: bool) -> None:
        leases = list(plan.leases.values())
        if not locked:
            for lease in leases:
                lease.lock.acquire()
        committed: list[str] = []
        error: BaseException | None = None  # the first one; it is what the caller gets
        try:
            if commit:
                error = self._refuse_commit(plan, leases)
            if not leases:
                with self._lock:
                    self._counts["commits" if commit else "rollbacks"] += 1
                    self._settle(plan)
            last = leases[-1] if leases else None
            for lease in leases:
                ended = False
                if commit and error is None:
                    try:
                        self._end_lease(lease, commit=True, ended="released")
                        committed.append(lease.resolved.resource)
                        ended = True
                    except BaseException as exc:
                        error = exc
                if not ended:
                    try:
                        self._end_lease(lease, commit=False, ended="rolled back")
                    except BaseException as exc:
                        if error is None:
                            error = exc
                outcome = None
                if lease is last:
                    outcome = "commits" if commit and error is None else "rollbacks"
                try:
                    self._checkin(lease, outcome=outcome)
                except BaseException as exc:
                    if error is None:
                        error = exc
        finally:
            for lease in leases:
                lease.lock.release()
        if error is None:
            logger.debug("plan %r %s", plan.plan_id, "released" if commit else "rolled back")
            return
        if commit and committed and isinstance(error, ResourceError):
            raise PartialCommitError(
                f"commit failed after {committed!r} were committed; the rest were rolled "
                f"back: {error.reason}",
                committed=committed,
                plan_id=plan.plan_id,
                resource=error.resource,
                operation="commit",
            ) from error
        raise error

    def _refuse_commit(self, plan: _Plan, leases: list[_Lease]) -> ResourceError | None:
        """Say why *plan* must commit nothing, asking every database before the first COMMIT."""
        for lease in leases:
            reason = plan.poisoned
            if reason is None and lease.conn is not None:
                reason = lease.database.engine.check_committable(lease.conn)
            if reason is not None:
                return ResourceError(
                    f"nothing was committed: {reason}",
                    plan_id=plan.plan_id,
                    resource=lease.resolved.resource,
                    operation="commit",
                )
        return None

    def _end_lease(self, lease: _Lease, *, commit: bool, ended: str) -> None:
        """Commit or roll back one lease's transaction (its lock held).

        The caller gives the connection back with :meth:`_checkin`, except after
        a failed rollback: the connection's state is then unknown, so it is
        closed here and never lent again.
        """
        lease.ended = lease.ended or ended
        conn = lease.conn
        if conn is None:
            return
        engine = lease.database.engine
        try:
            if commit:
                engine.commit(conn)
            else:
                engine.rollback(conn)
        except BaseException as exc:
            if not commit:
                self._checkin(lease, broken=True)
            if isinstance(exc, engine.driver_error):
                raise self._wrap(exc, lease, "commit" if commit else "rollback", None) from exc
            raise

    def _pick_victim(self, asking: _Plan) -> _Plan | None:
        """Take the least recently used plan not mid-statement, with its lease locks held.

        Call with ``_lock`` held. The plan is marked evicted and removed.
        """
        for plan in sorted(self._plans.values(), key=lambda p: p.last_used):
            if plan is asking or not any(
                lease.conn is not None and lease.conn is not lease.database.memory_conn
                for lease in plan.leases.values()
            ):
                continue
            if self._try_lock_plan(plan):
                self._end_quietly(plan, "evicted", time.monotonic())
                logger.warning(
                    "handler %r evicted plan %r to free a connection", self.name, plan.plan_id
                )
                return plan
        return None

    def _try_lock_plan(self, plan: _Plan) -> bool:
        """Lock every lease of *plan* if none is in use; call with ``_lock`` held."""
        taken: list[_Lease] = []
        for lease in plan.leases.values():
            if lease.lock.acquire(blocking=False):
                taken.append(lease)
                if lease.users == 0 and lease.conn is not None:
                    continue
            for held in taken:
                held.lock.release()
            return False
        return True

    def _end_quietly(self, plan: _Plan, how: Literal["expired", "evicted"], now: float) -> None:
        """Mark a plan reaped or evicted so its next call raises; call with ``_lock`` held."""
        del self._plans[plan.plan_id]
        last = None
        for lease in plan.leases.values():
            lease.ended = how
            if lease.checkpoints:
                last = lease
        self._endings[plan.plan_id] = _Ending(
            how=how,
            checkpoint_id=next(reversed(last.checkpoints)) if last else None,
            resource=(last or next(iter(plan.leases.values()))).resolved.resource,
            age=now - plan.last_used,
            ttl=plan.ttl,
            at=now,
        )
        endings = self._endings
        while (
            len(endings) > _MAX_ENDINGS
            and next(iter(endings.values())).at < now - _ENDINGS_KEPT_FOR
        ):
            endings.popitem(last=False)
        self._finishing.add(plan)  # the caller finishes it
        self._counts["reaped" if how == "expired" else "evicted"] += 1

    def _raise_if_ended(self, plan_id: str, operation: str) -> None:
        """Raise, once, for a plan the reaper or an eviction ended; call with ``_lock`` held."""
        ending = self._endings.pop(plan_id, None)
        if ending is None:
            return
        context: dict[str, Any] = {
            "plan_id": plan_id,
            "checkpoint_id": ending.checkpoint_id,
            "resource": ending.resource,
            "operation": operation,
        }
        if ending.how == "expired":
            raise CheckpointExpiredError(
                f"plan was idle for {ending.age:.1f}s, longer than its checkpoint_ttl "
                f"({ending.ttl:g}s); the reaper rolled it back",
                age=ending.age,
                ttl=ending.ttl,
                **context,
            )
        raise CheckpointEvictedError(
            "plan was rolled back to free a connection for another plan (on_full=evict_lru)",
            **context,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise HandlerClosedError(self.name)

    # -- the reaper's callback ------------------------------------------------------

    def _on_deadlines(self, due: list[Any], now: float) -> None:
        """Reap plans idle past their TTL and close connections idle past ``idle_timeout``."""
        reaped: list[_Plan] = []
        stale: list[_Idle] = []
        with self._lock:
            for item in due:
                if item == "plans":
                    reaped += self._sweep_plans(now)
                    continue
                if item == "idle":
                    self._idle_sweep = None
                    limit = now - self.config.idle_timeout
                    while self._idle and next(iter(self._idle.values())).since <= limit:
                        stale.append(self._idle.popitem(last=False)[1])
                    self._open -= len(stale)
                    if self._idle:
                        oldest = next(iter(self._idle.values())).since
                        self._idle_sweep = self._reaper.schedule(
                            oldest + self.config.idle_timeout, "idle"
                        )
            if stale and self._slot_waiters:
                self._slot_freed.notify(len(stale))
        for entry in stale:
            self._close_connection(entry.database, entry.conn)
        for plan in reaped:
            logger.warning(
                "handler %r reaped plan %r: idle longer than checkpoint_ttl (%gs)",
                self.name,
                plan.plan_id,
                plan.ttl,
            )
            try:
                self._finish(plan, commit=False, locked=True)
            except Exception as exc:  # the other reaped plans must still be finished
                logger.warning("rolling back reaped plan %r: %s", plan.plan_id, exc)

    def _arm_plan_sweep(self, when: float) -> None:
        """Make sure the plan sweep runs by *when*; call with ``_lock`` held.

        A plan that ends before the sweep costs the reaper nothing: there is
        one deadline for all plans, moved earlier only when a plan could expire
        before it (a first plan, or a shorter ``checkpoint_ttl``).
        """
        sweep = self._plan_sweep
        if sweep is not None and not sweep.done:
            if sweep.when <= when:
                return
            self._reaper.cancel(sweep)
        self._plan_sweep = self._reaper.schedule(when, "plans")

    def _sweep_plans(self, now: float) -> list[_Plan]:
        """Take every plan idle past its TTL and not in use; re-arm for the rest.

        Call with ``_lock`` held. The plans returned are marked expired, out of
        ``_plans``, with their lease locks held. A plan in use now is looked at
        again a whole TTL later, as it cannot expire sooner once it is left.
        """
        sweep = self._plan_sweep
        if sweep is not None and sweep.done:  # handed over: this is it running
            self._plan_sweep = None
        reaped: list[_Plan] = []
        earliest: float | None = None
        for plan in list(self._plans.values()):
            expiry = plan.last_used + plan.ttl
            if expiry <= now:
                if self._try_lock_plan(plan):
                    self._end_quietly(plan, "expired", now)
                    reaped.append(plan)
                    continue
                expiry = now + plan.ttl
            if earliest is None or expiry < earliest:
                earliest = expiry
        if earliest is not None:
            self._arm_plan_sweep(earliest)
        return reaped

    # -- fork -----------------------------------------------------------------------

    def _forget_after_fork(self) -> None:
        """In a forked child: set the parent's connections aside and start empty."""
        detached = self._finalizer.detach()  # (handler, function, args, kwargs)
        if detached is not None:
            _INHERITED.append(detached[2])
        self._reset_state()


def _held_here(lock: Any) -> bool:
    """Whether the calling thread holds *lock*, a ``_thread.RLock``."""
    return bool(lock._is_owned())  # CPython's RLock has it; typeshed does not list it


def _finalize(
    name: str,
    plans: dict[str, _Plan],
    idle: collections.OrderedDict[int, _Idle],
    databases: dict[Hashable, _Database],
    reaper: Reaper,
) -> None:
    """Free what a handler that was never closed still holds (at collection or exit)."""
    reaper.stop()
    open_plans = sorted(plans)
    for plan in list(plans.values()):
        for lease in plan.leases.values():
            conn = lease.conn
            if conn is not None and conn is not lease.database.memory_conn:
                _discard(lease.database, conn, rollback=True)
    for entry in list(idle.values()):
        _discard(entry.database, entry.conn, rollback=False)
    for database in list(databases.values()):
        if database.memory_conn is not None:
            _discard(database, database.memory_conn, rollback=True)
    plans.clear()
    idle.clear()
    warnings.warn(
        f"database handler {name!r} was not closed; rolled back open plans {open_plans!r} "
        "and closed its connections (use 'with DatabaseResourceHandler(...)' or close())",
        ResourceWarning,
        stacklevel=2,
    )


def _discard(database: _Database, conn: Any, *, rollback: bool) -> None:
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


@hookimpl
def cleveragents_register_resource_handlers(registry: Any) -> None:
    """Serve the ``database`` resource kind."""
    registry.add(DatabaseResourceHandler)


__all__ = ["ENGINES", "DatabaseHandlerSettings", "DatabaseResourceHandler", "HandlerStats"]
