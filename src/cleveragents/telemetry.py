"""OpenTelemetry spans and metrics of plans and of the connection pool (DESIGN.md section 11).

Only the OpenTelemetry API is used (``pip install 'cleveragents[otel]'``). The
library never configures a provider, exporter, reader or propagator: it
records through the providers a handler or runtime was given, else through the
global ones, by way of the API's proxies, so providers set later are honoured.

``import cleveragents`` imports nothing of OpenTelemetry. It is imported when
the first handler or runtime is made; when it cannot be imported,
:func:`for_handler` (and ``_run_spans.for_runtime``) return ``None`` and the
callers skip every hook. The spans of plans a caller runs (the runtime, an
agent plan) and of the runtime's steps are started in ``_run_spans``.

Never recorded: SQL text or parameters, the DSN (only the database name),
passwords, folders, a driver's message. Plan, checkpoint and step ids are span
attributes, never metric attributes (their cardinality is unbounded).

Cost: the handler calls these hooks outside its mutex. Attribute dicts are
built once per handler, database or outcome; span attributes and events only
when the span is recording. With no SDK configured a plan costs a no-op span
start and end and a few no-op instrument calls.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import importlib.metadata
import inspect
import os
import re
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias

from cleveragents.errors import CleverAgentsError, PartialCommitError, PoolExhaustedError

# The handler's parts (its Plan, Lease and ConnectionPool) are typed Any here:
# this module sits below the handler in the layers, and imports none of it.
Lease: TypeAlias = Any
Plan: TypeAlias = Any
ConnectionPool: TypeAlias = Any

#: The instrumentation scope's name (its version is the package's).
SCOPE = "cleveragents"

# Span, event and metric names, and attribute keys: OpenTelemetry's database
# semantic conventions where they have one, ``cleveragents.*`` otherwise.
PLAN_SPAN = "cleveragents.plan"
STEP_SPAN = "cleveragents.step"
CHECKPOINT_EVENT = "cleveragents.checkpoint"
ROLLBACK_TO_EVENT = "cleveragents.rollback_to"
REAPED_EVENT = "cleveragents.reaped"
EVICTED_EVENT = "cleveragents.evicted"

PLAN_ID = "cleveragents.plan.id"
PLAN_OUTCOME = "cleveragents.plan.outcome"
PLAN_DATABASES = "cleveragents.plan.databases"
PLAN_FAILED_STEP = "cleveragents.plan.failed_step"
PLAN_IDLE_TIME = "cleveragents.plan.idle_time"
PLAN_TTL = "cleveragents.plan.ttl"
STEP_ID = "cleveragents.step.id"
STEP_ATTEMPT = "cleveragents.step.attempt"
CHECKPOINT_ID = "cleveragents.checkpoint.id"
RESOURCE_NAME = "cleveragents.resource.name"
TOOL_NAME = "gen_ai.tool.name"
ERROR_TYPE = "error.type"
DB_SYSTEM = "db.system.name"
DB_NAMESPACE = "db.namespace"
DB_OPERATION = "db.operation.name"
POOL_NAME = "db.client.connection.pool.name"
POOL_STATE = "db.client.connection.state"

OUTCOMES = ("committed", "rolled_back", "reaped", "evicted", "partial_commit")

# Plans here take microseconds to seconds: the SDK's default buckets (0, 5,
# 10, 25 ... s) would put nearly every one in the first.
_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0)

#: The plan span a runtime or agent plan opened in this context, for the
#: handler to record into instead of starting a second one.
_OPEN_PLAN: contextvars.ContextVar[OpenPlan | None] = contextvars.ContextVar(
    "cleveragents_open_plan", default=None
)


@dataclasses.dataclass(frozen=True)
class _Api:
    """The parts of the OpenTelemetry API used here, imported once."""

    trace: Any
    metrics: Any
    context: Any
    version: str

    def error_status(self, description: str | None) -> Any:
        return self.trace.Status(self.trace.StatusCode.ERROR, description)


@functools.cache
def _api() -> _Api | None:
    """Import the OpenTelemetry API, or return ``None`` when it cannot be imported."""
    try:
        from opentelemetry import context, metrics, trace
    except ImportError:
        return None
    return _Api(trace=trace, metrics=metrics, context=context, version=package_version())


def package_version() -> str:
    """Return the installed cleveragents' version (the instrumentation scope's), or ``""``."""
    try:
        return importlib.metadata.version(SCOPE)
    except importlib.metadata.PackageNotFoundError:  # run from a source tree never installed
        return ""


def for_handler(
    name: str,
    limit: int,
    pool: ConnectionPool,
    mutex: threading.Lock,
    *,
    tracer_provider: Any = None,
    meter_provider: Any = None,
) -> HandlerTelemetry | None:
    """Return what records a database handler's plans and pool, or ``None`` without the API."""
    api = _api()
    if api is None:
        return None
    return HandlerTelemetry(
        api,
        name=name,
        limit=limit,
        pool=pool,
        mutex=mutex,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
    )


def provider_options(
    handler_cls: type[Any], tracer_provider: Any, meter_provider: Any
) -> dict[str, Any]:
    """Return the providers to hand to *handler_cls*: those given, if its constructor takes them."""
    given = {"tracer_provider": tracer_provider, "meter_provider": meter_provider}
    given = {key: value for key, value in given.items() if value is not None}
    if not given:
        return {}
    try:
        parameters = inspect.signature(handler_cls).parameters
    except (TypeError, ValueError):  # no signature to read: hand nothing
        return {}
    return {key: value for key, value in given.items() if key in parameters}


def _tracer(api: _Api, provider: Any) -> Any:
    # With no provider this is the API's proxy tracer while no global provider
    # is set: it starts recording once one is.
    return api.trace.get_tracer(SCOPE, api.version, tracer_provider=provider)


def error_type(exc: BaseException) -> str:
    """Return ``error.type`` for *exc*: its class's fully qualified name."""
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


# A URL up to its last path segment (a PostgreSQL database's label names its
# host and port), and the folders of a path: neither is ever recorded.
_URL_PREFIX = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://(?:[^\s'\"/]*/)*")
_SLASHED = re.compile(r"[^\s'\"(),]*[\\/][^\s'\"(),]*")
_ROOTED = re.compile(r"[\\/~.]|[A-Za-z]:")


def _file_name(match: re.Match[str]) -> str:
    token = match.group()
    name = re.split(r"[\\/]", token)[-1]
    # A rooted path (/x, ~/x, ./x, C:\x), or a relative one to a file with an
    # extension; "I/O" or "and/or" are words.
    return name if _ROOTED.match(token) or "." in name else token


def without_folders(text: str) -> str:
    """Return *text* with the folders of paths and all of a URL but its last segment removed."""
    return _SLASHED.sub(_file_name, _URL_PREFIX.sub("", text))


def _description(exc: BaseException | None) -> str | None:
    """Return what a span's status may say about *exc*: only the library's own messages.

    cleveragents' errors carry redacted messages (folders are removed here);
    any other exception may quote a driver's message, SQL or a secret, so only
    its class is recorded.
    """
    if isinstance(exc, CleverAgentsError):
        return without_folders(str(exc))
    return None


def namespace(engine: str, settings: Any) -> str | None:
    """Return ``db.namespace`` of a database: never a folder, a DSN or a secret.

    SQLite: the file's name without its folder (``:memory:`` as is).
    PostgreSQL: the database name from the DSN, or ``None`` if it names none or
    does not parse.
    """
    if engine == "sqlite":
        location = str(settings.location)
        return location if location == ":memory:" else os.path.basename(location)
    if engine == "postgresql":
        return _postgresql_database(settings)
    return None


def _postgresql_database(settings: Any) -> str | None:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        dbname = conninfo_to_dict(settings.resolved_dsn()).get("dbname")
    except (psycopg.Error, CleverAgentsError):  # unparsable or unset: say nothing of it
        return None
    return str(dbname) if dbname else None


# -- metrics -------------------------------------------------------------------------


class _Instruments:
    """The instruments of one meter, shared by every handler that records through it.

    One per meter provider: the API's proxy provider keeps every meter made
    through it, and a meter hands back its first instrument of a name, so
    asynchronous instruments are made once and observe every live handler.
    """

    def __init__(self, api: _Api, meter: Any) -> None:
        self._observation = api.metrics.Observation
        #: The live handlers' telemetry, observed at each collection.
        self.handlers: weakref.WeakSet[HandlerTelemetry] = weakref.WeakSet()
        self.timeouts = meter.create_counter(
            "db.client.connection.timeouts",
            unit="{timeout}",
            description="Plans that waited acquire_timeout for a pool slot in vain.",
        )
        self.wait_time = self._histogram(
            meter,
            "db.client.connection.wait_time",
            "From asking for a connection to having it.",
        )
        self.use_time = self._histogram(
            meter, "db.client.connection.use_time", "Time from checkout to check-in."
        )
        self.create_time = self._histogram(
            meter, "db.client.connection.create_time", "Time to open a new connection."
        )
        self.operation_duration = self._histogram(
            meter, "db.client.operation.duration", "Duration of a plan's COMMIT or ROLLBACK."
        )
        self.plans = meter.create_counter(
            "cleveragents.plans", unit="{plan}", description="Plans ended, by outcome."
        )
        self.plan_duration = self._histogram(
            meter, "cleveragents.plan.duration", "Time from a plan's first call to its end."
        )
        self.checkpoints = meter.create_counter(
            "cleveragents.checkpoints", unit="{checkpoint}", description="Checkpoints taken."
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            callbacks=[self._observe_count],
            unit="{connection}",
            description="Open connections, idle or used (lent to a plan).",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.max",
            callbacks=[self._observe_max],
            unit="{connection}",
            description="The most connections the pool opens (max_connections).",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.idle.max",
            callbacks=[self._observe_max],
            unit="{connection}",
            description="The most idle connections the pool keeps (max_connections).",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.pending_requests",
            callbacks=[self._observe_pending],
            unit="{request}",
            description="Plans waiting now for a pool slot.",
        )

    @staticmethod
    def _histogram(meter: Any, name: str, description: str) -> Any:
        return meter.create_histogram(
            name, unit="s", description=description, explicit_bucket_boundaries_advisory=_BUCKETS
        )

    def _observe_count(self, options: Any) -> Iterable[Any]:
        observation = self._observation
        found = []
        for handler in list(self.handlers):
            idle, used, _ = handler.pool_state()
            found.append(observation(idle, handler.idle_attributes))
            found.append(observation(used, handler.used_attributes))
        return found

    def _observe_max(self, options: Any) -> Iterable[Any]:
        observation = self._observation
        return [observation(h.limit, h.pool_attributes) for h in list(self.handlers)]

    def _observe_pending(self, options: Any) -> Iterable[Any]:
        observation = self._observation
        return [
            observation(handler.pool_state()[2], handler.pool_attributes)
            for handler in list(self.handlers)
        ]


_INSTRUMENTS: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()
_INSTRUMENTS_LOCK = threading.Lock()


def _instruments(api: _Api, meter_provider: Any) -> _Instruments:
    """Return the instruments recorded through *meter_provider* (None: the global one).

    Every provider class derives from the API's ``MeterProvider``, so it can be
    referenced weakly: a provider dropped by its user takes its instruments along.
    """
    provider = meter_provider if meter_provider is not None else api.metrics.get_meter_provider()
    with _INSTRUMENTS_LOCK:
        found = _INSTRUMENTS.get(provider)
        if found is None:
            meter = api.metrics.get_meter(SCOPE, api.version, meter_provider=provider)
            found = _INSTRUMENTS[provider] = _Instruments(api, meter)
        return found


# -- the handler ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Database:
    """A database's attributes, built once: as events name it, and per COMMIT/ROLLBACK."""

    attributes: Mapping[str, str]
    commit: Mapping[str, str]
    rollback: Mapping[str, str]


class HandlerTelemetry:
    """Records one database handler's plans (spans, events) and pool (metrics).

    The handler calls each hook outside its mutex. Pool state is read under
    the mutex only when a metric reader collects, and the observations are
    handed over after it is released.
    """

    __slots__ = (
        "__weakref__",
        "_api",
        "_databases",
        "_instruments",
        "_mutex",
        "_pool",
        "_tracer",
        "idle_attributes",
        "limit",
        "pool_attributes",
        "used_attributes",
    )

    #: Databases whose attributes are kept, at most (then they are built afresh).
    MAX_DATABASES = 1024

    def __init__(
        self,
        api: _Api,
        *,
        name: str,
        limit: int,
        pool: ConnectionPool,
        mutex: threading.Lock,
        tracer_provider: Any,
        meter_provider: Any,
    ) -> None:
        self._api = api
        self._tracer = _tracer(api, tracer_provider)
        self._pool = pool
        self._mutex = mutex
        self._databases: dict[Any, _Database] = {}
        self.limit = limit
        self.pool_attributes = {POOL_NAME: name}
        self.idle_attributes = {POOL_NAME: name, POOL_STATE: "idle"}
        self.used_attributes = {POOL_NAME: name, POOL_STATE: "used"}
        self._instruments = _instruments(api, meter_provider)
        self._instruments.handlers.add(self)

    def close(self) -> None:
        """Stop reporting the pool (the handler is closed)."""
        self._instruments.handlers.discard(self)

    def pool_state(self) -> tuple[int, int, int]:
        """Return idle, used (open minus idle) and waiting, as ``stats()`` counts them."""
        with self._mutex:
            pool = self._pool
            idle = len(pool)
            return idle, pool.open - idle, pool.waiters

    def open_plan(self, plan_id: str) -> OpenPlan:
        """Start *plan_id*'s span for a caller running the plan (an agent plan), made current."""
        return OpenPlan(self._api, self._tracer, plan_id)

    # -- plans --------------------------------------------------------------------

    def lease_made(self, lease: Lease) -> None:
        """A plan's first call on a database made its lease; the first lease opens the plan."""
        if lease.opens_plan:
            plan = lease.plan
            open_plan = _OPEN_PLAN.get()
            if open_plan is not None and open_plan.claim(plan.plan_id, self):
                span = open_plan.span
            else:
                span = self._tracer.start_span(PLAN_SPAN)
                plan.owns_span = True
            # Only a recording span is kept (a no-op one needs no end): with no
            # SDK, every later hook skips the span with one test.
            if span.is_recording():
                if plan.owns_span:
                    span.set_attribute(PLAN_ID, plan.plan_id)
                plan.span = span
        if lease.conn is not None:  # an idle connection was at hand: no wait
            self._instruments.wait_time.record(0.0, self.pool_attributes)

    def checked_out(self, lease: Lease) -> None:
        """A new lease got its connection after waiting for it (or opening it)."""
        now = time.monotonic()
        self._instruments.wait_time.record(now - lease.since, self.pool_attributes)
        lease.since = now

    def connection_created(self, started: float) -> None:
        """A connection was opened; *started* is when opening began (monotonic)."""
        self._instruments.create_time.record(time.monotonic() - started, self.pool_attributes)

    def lease_abandoned(self, plan: Plan, error: BaseException, *, plan_ended: bool) -> None:
        """A plan's first call on a database failed with *error*; with *plan_ended*, its first.

        Every ``PoolExhaustedError`` comes this way: a pool slot is only ever
        waited for by a new lease.
        """
        if isinstance(error, PoolExhaustedError):
            self._instruments.timeouts.add(1, self.pool_attributes)
        if plan_ended:
            self.plan_ended(plan, False, error)

    def checkpoint(self, lease: Lease, checkpoint_id: str) -> None:
        """The plan took a checkpoint on *lease*'s database."""
        self._instruments.checkpoints.add(1)
        span = lease.plan.span
        if span is not None and span.is_recording():
            attributes = {**self._database(lease).attributes, CHECKPOINT_ID: checkpoint_id}
            attributes[RESOURCE_NAME] = lease.resolved.resource
            span.add_event(CHECKPOINT_EVENT, attributes)

    def rolled_back_to(self, lease: Lease, checkpoint_id: str) -> None:
        """The plan rolled back to a checkpoint on *lease*'s database."""
        span = lease.plan.span
        if span is not None and span.is_recording():
            attributes = {**self._database(lease).attributes, CHECKPOINT_ID: checkpoint_id}
            attributes[RESOURCE_NAME] = lease.resolved.resource
            span.add_event(ROLLBACK_TO_EVENT, attributes)

    def lease_ended(
        self, lease: Lease, commit: bool, started: float, error: BaseException | None
    ) -> None:
        """A lease's COMMIT or ROLLBACK, begun at *started*, returned (or raised *error*)."""
        now = time.monotonic()
        database = self._databases.get(lease.database) or self._describe(lease)
        attributes = database.commit if commit else database.rollback
        if error is not None:
            attributes = {**attributes, ERROR_TYPE: error_type(error)}
        instruments = self._instruments
        instruments.operation_duration.record(now - started, attributes)
        instruments.use_time.record(now - lease.since, self.pool_attributes)

    def plan_ended(
        self, plan: Plan, commit: bool, error: BaseException | None, closing: bool = False
    ) -> None:
        """The plan ended: released, rolled back, reaped, evicted, closed, or its first call failed.

        Counts it, and ends its span if the handler started it; a span a
        runtime or agent plan opened is ended by them, after this recorded
        into it.
        """
        now = time.monotonic()
        if commit and error is None:  # the common case, without a call
            outcome, attributes = "committed", _COMMITTED
        else:
            outcome = _outcome(plan, error)
            attributes = _OUTCOME_ATTRIBUTES[outcome]
        instruments = self._instruments
        instruments.plans.add(1, attributes)
        instruments.plan_duration.record(now - plan.started, attributes)
        # Set by lease_made() while the first lease's lock was held, before
        # anything could end the plan; taken here, by the one call that ends it.
        span, plan.span = plan.span, None
        if span is not None:
            if span.is_recording():  # (not if the caller that opened it ended it already)
                self._record_end(span, plan, outcome=outcome, error=error, closing=closing, now=now)
            if plan.owns_span:
                span.end()

    def _record_end(
        self,
        span: Any,
        plan: Plan,
        *,
        outcome: str,
        error: BaseException | None,
        closing: bool,
        now: float,
    ) -> None:
        leases = list(plan.leases.values())
        span.set_attributes({PLAN_OUTCOME: outcome, PLAN_DATABASES: len(leases)})
        if outcome == "committed":
            return  # status UNSET: libraries leave OK to the application
        idle = now - plan.last_used
        for lease in leases:
            attributes: dict[str, Any] = {
                **self._database(lease).attributes,
                RESOURCE_NAME: lease.resolved.resource,
            }
            if outcome == "reaped":
                attributes[PLAN_IDLE_TIME] = idle
                attributes[PLAN_TTL] = plan.ttl
                span.add_event(REAPED_EVENT, attributes)
            elif outcome == "evicted":
                span.add_event(EVICTED_EVENT, attributes)
        if error is not None:
            description = _description(error)
        elif outcome == "reaped":
            description = (
                f"plan was idle for {idle:.1f}s, longer than its checkpoint_ttl "
                f"({plan.ttl:g}s); the reaper rolled it back"
            )
        elif outcome == "evicted":
            description = "rolled back to free a connection for another plan (on_full=evict_lru)"
        else:
            description = "rolled back: the handler was closed" if closing else "rolled back"
        span.set_attribute(ERROR_TYPE, error_type(error) if error is not None else outcome)
        span.set_status(self._api.error_status(description))

    def _database(self, lease: Lease) -> _Database:
        return self._databases.get(lease.database) or self._describe(lease)

    def _describe(self, lease: Lease) -> _Database:
        """Build and keep the attributes of *lease*'s database (a bounded number of them)."""
        if len(self._databases) >= self.MAX_DATABASES:
            self._databases.clear()
        database = lease.database
        engine = database.engine.name
        attributes = {DB_SYSTEM: engine}
        name = namespace(engine, lease.resolved.settings)
        if name is not None:
            attributes[DB_NAMESPACE] = name
        found = self._databases[database] = _Database(
            attributes=attributes,
            commit={**attributes, DB_OPERATION: "COMMIT"},
            rollback={**attributes, DB_OPERATION: "ROLLBACK"},
        )
        return found


_OUTCOME_ATTRIBUTES = {outcome: {PLAN_OUTCOME: outcome} for outcome in OUTCOMES}
_COMMITTED = _OUTCOME_ATTRIBUTES["committed"]


def _outcome(plan: Plan, error: BaseException | None) -> str:
    """Return how a plan that was not simply committed ended."""
    if isinstance(error, PartialCommitError):
        return "partial_commit"
    for lease in plan.leases.values():
        if lease.ended == "expired":
            return "reaped"
        if lease.ended == "evicted":
            return "evicted"
    return "rolled_back"


# -- plans a caller runs: the runtime, an agent plan ------------------------------------


class OpenPlan:
    """A ``cleveragents.plan`` span a runtime or agent plan started, current until :meth:`finish`.

    The handler's first call for the plan records into it instead of starting
    another (one per plan and handler); the caller ends it.
    """

    __slots__ = ("_api", "_claimed_by", "_context_token", "_token", "failure", "plan_id", "span")

    def __init__(self, api: _Api, tracer: Any, plan_id: str) -> None:
        self._api = api
        self.plan_id = plan_id
        self.failure: BaseException | None = None
        self._claimed_by: Any = None
        self.span = span = tracer.start_span(PLAN_SPAN)
        if span.is_recording():
            span.set_attribute(PLAN_ID, plan_id)
        self._context_token = api.context.attach(api.trace.set_span_in_context(span))
        self._token = _OPEN_PLAN.set(self)

    def claim(self, plan_id: str, handler: Any) -> bool:
        """Let *handler* record *plan_id* into this span, unless another handler does."""
        if plan_id != self.plan_id or self._claimed_by not in (None, handler):
            return False
        self._claimed_by = handler
        return True

    def finish(
        self,
        *,
        committed: bool,
        failure: BaseException | None = None,
        reason: str | None = None,
        failed_step: str | None = None,
    ) -> None:
        """End the span: no longer current; its outcome and status set (*reason*: library text)."""
        try:
            _OPEN_PLAN.reset(self._token)
        except ValueError:  # finished in another context than it started in
            _OPEN_PLAN.set(None)
        self._api.context.detach(self._context_token)
        span = self.span
        failure = failure or self.failure
        if span.is_recording():
            if self._claimed_by is None:  # no handler recorded the plan's end into it
                outcome = "committed" if committed else "rolled_back"
                span.set_attributes({PLAN_OUTCOME: outcome, PLAN_DATABASES: 0})
            if failed_step is not None:
                span.set_attribute(PLAN_FAILED_STEP, failed_step)
            if failure is not None:
                span.set_attribute(ERROR_TYPE, error_type(failure))
                span.set_status(self._api.error_status(_description(failure)))
            elif not committed and self._claimed_by is None:
                # (A handler that recorded the plan's end set a more precise status.)
                span.set_attribute(ERROR_TYPE, "rolled_back")
                span.set_status(
                    self._api.error_status(None if reason is None else without_folders(reason))
                )
        span.end()


__all__ = [
    "OUTCOMES",
    "SCOPE",
    "HandlerTelemetry",
    "OpenPlan",
    "error_type",
    "for_handler",
    "namespace",
    "package_version",
    "provider_options",
    "without_folders",
]
