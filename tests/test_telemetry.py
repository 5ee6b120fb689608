"""OpenTelemetry spans and metrics, checked name by name against DESIGN.md section 11.

Every test records through its own SDK providers (an in-memory span exporter
and metric reader) handed to the handler or runtime; what global providers do,
and what happens when OpenTelemetry cannot be imported, is checked in a
subprocess, as the global providers can be set only once per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib.metadata
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy
import pytest
from agents import (
    Agent,
    RunContextWrapper,
    Runner,
    TracingProcessor,
    function_tool,
    set_trace_processors,
    set_tracing_disabled,
)
from agents.testing import ScriptedModel, assistant_message, function_call
from agents.tracing import get_trace_provider
from conftest import make_table, query
from fakes import FakeHandler
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import Histogram, InMemoryMetricReader, Metric, Sum
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

import cleveragents
from cleveragents import telemetry
from cleveragents._run_spans import for_runtime
from cleveragents.errors import (
    CheckpointEvictedError,
    CheckpointExpiredError,
    PartialCommitError,
    PoolExhaustedError,
    ResourceError,
    ToolError,
)
from cleveragents.hookspecs import hookimpl
from cleveragents.integrations.openai_agents import AgentPlan, plan_tool
from cleveragents.plugins import get_plugin_manager
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler
from cleveragents.resource.registry import ResourceRegistry
from cleveragents.runtime import Runtime
from cleveragents.tools import ToolContext, ToolRegistry

set_tracing_disabled(True)  # the SDK's own tracing exports nowhere, except where a test says

#: A generous bound for what must happen eventually (never a speed check).
EVENTUALLY = 10.0
PG_VARIABLE = "CLEVERAGENTS_TEST_PG_DSN"
PLAN = "cleveragents.plan"
POOL = "db.client.connection.pool.name"

#: Section 11's table: name -> (instrument kind, unit, attribute keys beyond the pool's).
METRICS: dict[str, tuple[str, str, frozenset[str]]] = {
    "db.client.connection.count": (
        "updowncounter",
        "{connection}",
        frozenset({POOL, "db.client.connection.state"}),
    ),
    "db.client.connection.max": ("updowncounter", "{connection}", frozenset({POOL})),
    "db.client.connection.idle.max": ("updowncounter", "{connection}", frozenset({POOL})),
    "db.client.connection.pending_requests": ("updowncounter", "{request}", frozenset({POOL})),
    "db.client.connection.timeouts": ("counter", "{timeout}", frozenset({POOL})),
    "db.client.connection.wait_time": ("histogram", "s", frozenset({POOL})),
    "db.client.connection.use_time": ("histogram", "s", frozenset({POOL})),
    "db.client.connection.create_time": ("histogram", "s", frozenset({POOL})),
    "db.client.operation.duration": (
        "histogram",
        "s",
        frozenset({"db.operation.name", "db.system.name", "db.namespace"}),
    ),
    "cleveragents.plans": ("counter", "{plan}", frozenset({"cleveragents.plan.outcome"})),
    "cleveragents.plan.duration": (
        "histogram",
        "s",
        frozenset({"cleveragents.plan.outcome"}),
    ),
    "cleveragents.checkpoints": ("counter", "{checkpoint}", frozenset()),
}


@dataclass
class Otel:
    """An SDK tracer provider and meter provider that keep everything in memory."""

    tracer_provider: TracerProvider
    exporter: InMemorySpanExporter
    meter_provider: MeterProvider
    reader: InMemoryMetricReader

    @property
    def providers(self) -> dict[str, Any]:
        return {"tracer_provider": self.tracer_provider, "meter_provider": self.meter_provider}

    def spans(self, name: str = PLAN) -> list[ReadableSpan]:
        """Return the ended spans called *name*, oldest first."""
        return [span for span in self.exporter.get_finished_spans() if span.name == name]

    def span(self, plan_id: str) -> ReadableSpan:
        """Return the one ended plan span of *plan_id*."""
        found = [s for s in self.spans() if s.attributes["cleveragents.plan.id"] == plan_id]
        assert len(found) == 1, found
        return found[0]

    def metrics(self) -> dict[str, Metric]:
        """Collect now and return the cleveragents scope's metrics, by name."""
        data = self.reader.get_metrics_data()
        found: dict[str, Metric] = {}
        for resource_metrics in data.resource_metrics if data else ():
            for scope_metrics in resource_metrics.scope_metrics:
                assert scope_metrics.scope.name == "cleveragents"
                assert scope_metrics.scope.version == importlib.metadata.version("cleveragents")
                for metric in scope_metrics.metrics:
                    found[metric.name] = metric
        return found

    def points(self, name: str, metrics: dict[str, Metric] | None = None) -> dict[Any, Any]:
        """Return a metric's values (sums, or histogram counts) by frozen attribute set."""
        metric = (metrics or self.metrics())[name]
        return {
            frozenset(point.attributes.items()): getattr(point, "value", None)
            if isinstance(metric.data, Sum)
            else point.count
            for point in metric.data.data_points
        }

    def exported_text(self) -> str:
        """Return everything exported, spans and metrics, as text."""
        spans = [span.to_json() for span in self.exporter.get_finished_spans()]
        data = self.reader.get_metrics_data()
        return "\n".join(spans) + (data.to_json() if data else "")


@pytest.fixture
def otel() -> Iterator[Otel]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    yield Otel(tracer_provider, exporter, meter_provider, reader)
    meter_provider.shutdown()
    tracer_provider.shutdown()


@pytest.fixture
def make_handler(otel: Otel) -> Iterator[Callable[..., DatabaseResourceHandler]]:
    """Return a factory of handlers recording into ``otel``, closed after the test."""
    made: list[DatabaseResourceHandler] = []

    def factory(**options: Any) -> DatabaseResourceHandler:
        handler = DatabaseResourceHandler(**{"name": "inventory-pool", **options}, **otel.providers)
        made.append(handler)
        return handler

    yield factory
    for handler in made:
        handler.close()


@dataclass
class Database:
    """A database of one engine: its resource, its db.namespace, and what must never leak."""

    engine: str
    resource: Resource
    namespace: str
    secrets: list[str]
    rows: Callable[[], list[str]]


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """Return a database with a table ``t (v TEXT UNIQUE)`` on each engine a test can reach."""
    if request.param == "sqlite":
        folder = tmp_path / "secret-folder"
        folder.mkdir()
        path = folder / "inventory.db"
        make_table(path, "CREATE TABLE t (v TEXT UNIQUE)")
        resource = Resource("inv", "database", engine="sqlite", location=str(path))
        yield Database(
            "sqlite",
            resource,
            "inventory.db",
            [str(folder), "secret-folder"],
            lambda: [row[0] for row in query(path, "SELECT v FROM t ORDER BY v")],
        )
        return
    dsn = os.environ.get(PG_VARIABLE)
    if not dsn:
        pytest.skip(f"PostgreSQL tests need {PG_VARIABLE}")
    psycopg = pytest.importorskip("psycopg")
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(f'CREATE TABLE "{schema}".t (v TEXT UNIQUE)')
    scoped = psycopg.conninfo.make_conninfo(dsn, options=f"-c search_path={schema}")

    def rows() -> list[str]:
        with psycopg.connect(scoped) as conn:
            return [row[0] for row in conn.execute("SELECT v FROM t ORDER BY v").fetchall()]

    resource = Resource("inv", "database", engine="postgresql", dsn=scoped)
    # (Not the user or port alone: "cleveragents" is the scope's name, and digits occur anywhere.)
    secrets = [dsn, str(params["password"]), f"{params['host']}:{params['port']}"]
    try:
        yield Database("postgresql", resource, str(params["dbname"]), secrets, rows)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND application_name LIKE 'cleveragents%%'"
            )
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def sqlite_resource(tmp_path: Path, name: str = "inventory.db", **settings: Any) -> Resource:
    """Return a resource on a new SQLite file in *tmp_path* with a table ``t (v TEXT)``."""
    path = tmp_path / name
    make_table(path)
    return Resource("inv", "database", engine="sqlite", location=str(path), **settings)


def eventually(check: Callable[[], Any], what: str) -> Any:
    """Return *check*'s first truthy result, polling for up to EVENTUALLY seconds."""
    deadline = time.monotonic() + EVENTUALLY
    while True:
        found = check()
        if found or time.monotonic() > deadline:
            assert found, f"never happened: {what}"
            return found
        time.sleep(0.01)


def event_attributes(span: ReadableSpan) -> list[tuple[str, dict[str, Any]]]:
    return [(event.name, dict(event.attributes or {})) for event in span.events]


def check_instruments(metrics: dict[str, Metric]) -> None:
    """Check each metric's instrument kind, unit and attribute keys against section 11."""
    assert "db.client.connection.idle.min" not in metrics
    for name, metric in metrics.items():
        kind, unit, keys = METRICS[name]
        assert metric.unit == unit, name
        if kind == "histogram":
            assert isinstance(metric.data, Histogram), name
        else:
            assert isinstance(metric.data, Sum), name
            assert metric.data.is_monotonic is (kind == "counter"), name
        for point in metric.data.data_points:
            attributes = set(point.attributes)
            assert attributes - {"error.type"} == keys, (name, attributes)


# -- one plan, from start to end ---------------------------------------------------------


def test_a_committed_plan_is_one_span_under_the_callers_span(
    otel: Otel, make_handler: Callable[..., DatabaseResourceHandler], database: Database
) -> None:
    handler = make_handler()
    res = database.resource
    with otel.tracer_provider.get_tracer("app").start_as_current_span("handle request") as caller:
        handler.create_checkpoint(res, "restock-1", "before-restock")
        handler.execute(res, "restock-1", "INSERT INTO t (v) VALUES ('widget')")
        handler.release_plan("restock-1")
    assert database.rows() == ["widget"]

    span = otel.span("restock-1")
    assert span.kind is SpanKind.INTERNAL
    assert span.parent is not None
    assert span.parent.span_id == caller.get_span_context().span_id
    assert span.context.trace_id == caller.get_span_context().trace_id
    assert span.instrumentation_scope.name == "cleveragents"
    assert span.instrumentation_scope.version == cleveragents.__version__
    assert dict(span.attributes) == {
        "cleveragents.plan.id": "restock-1",
        "cleveragents.plan.outcome": "committed",
        "cleveragents.plan.databases": 1,
    }
    assert span.status.status_code is StatusCode.UNSET
    assert event_attributes(span) == [
        (
            "cleveragents.checkpoint",
            {
                "cleveragents.resource.name": "inv",
                "db.system.name": database.engine,
                "db.namespace": database.namespace,
                "cleveragents.checkpoint.id": "before-restock",
            },
        )
    ]

    metrics = otel.metrics()
    check_instruments(metrics)
    pool = frozenset({(POOL, "inventory-pool")})
    assert otel.points("cleveragents.plans", metrics) == {
        frozenset({("cleveragents.plan.outcome", "committed")}): 1
    }
    assert otel.points("cleveragents.plan.duration", metrics) == {
        frozenset({("cleveragents.plan.outcome", "committed")}): 1
    }
    assert otel.points("cleveragents.checkpoints", metrics) == {frozenset(): 1}
    assert otel.points("db.client.operation.duration", metrics) == {
        frozenset(
            {
                ("db.operation.name", "COMMIT"),
                ("db.system.name", database.engine),
                ("db.namespace", database.namespace),
            }
        ): 1
    }
    for name in ("wait_time", "use_time", "create_time"):
        assert otel.points(f"db.client.connection.{name}", metrics) == {pool: 1}
    stats = handler.stats()
    assert otel.points("db.client.connection.count", metrics) == {
        pool | {("db.client.connection.state", "idle")}: stats.idle_connections,
        pool | {("db.client.connection.state", "used")}: (
            stats.open_connections - stats.idle_connections
        ),
    }
    assert stats.idle_connections == 1
    assert otel.points("db.client.connection.max", metrics) == {pool: 32}
    assert otel.points("db.client.connection.idle.max", metrics) == {pool: 32}
    assert otel.points("db.client.connection.pending_requests", metrics) == {pool: 0}
    assert "db.client.connection.timeouts" not in metrics


def test_a_rolled_back_plan_ends_in_error_with_its_rollback_to(
    otel: Otel, make_handler: Callable[..., DatabaseResourceHandler], database: Database
) -> None:
    handler = make_handler()
    res = database.resource
    handler.create_checkpoint(res, "p", "first")
    handler.execute(res, "p", "INSERT INTO t (v) VALUES ('a')")
    handler.create_checkpoint(res, "p", "second")
    handler.rollback_to(res, "p", "first")
    handler.rollback_plan("p")
    assert database.rows() == []

    span = otel.span("p")
    assert dict(span.attributes) == {
        "cleveragents.plan.id": "p",
        "cleveragents.plan.outcome": "rolled_back",
        "cleveragents.plan.databases": 1,
        "error.type": "rolled_back",
    }
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "rolled back"
    base = {
        "cleveragents.resource.name": "inv",
        "db.system.name": database.engine,
        "db.namespace": database.namespace,
    }
    assert event_attributes(span) == [
        ("cleveragents.checkpoint", {**base, "cleveragents.checkpoint.id": "first"}),
        ("cleveragents.checkpoint", {**base, "cleveragents.checkpoint.id": "second"}),
        ("cleveragents.rollback_to", {**base, "cleveragents.checkpoint.id": "first"}),
    ]
    metrics = otel.metrics()
    check_instruments(metrics)
    rolled_back = frozenset({("cleveragents.plan.outcome", "rolled_back")})
    assert otel.points("cleveragents.plans", metrics) == {rolled_back: 1}
    assert otel.points("cleveragents.checkpoints", metrics) == {frozenset(): 2}
    assert otel.points("db.client.operation.duration", metrics) == {
        frozenset(
            {
                ("db.operation.name", "ROLLBACK"),
                ("db.system.name", database.engine),
                ("db.namespace", database.namespace),
            }
        ): 1
    }


def test_a_release_that_commits_nothing_is_an_error_of_its_class(
    otel: Otel, make_handler: Callable[..., DatabaseResourceHandler], tmp_path: Path
) -> None:
    handler = make_handler()
    make_table(tmp_path / "u.db", "CREATE TABLE t (v TEXT UNIQUE)")
    res = Resource("inv", "database", engine="sqlite", location=str(tmp_path / "u.db"))
    handler.execute(res, "p", "INSERT INTO t VALUES ('a')")
    with pytest.raises(sqlite3.DatabaseError):  # it ends the transaction: the plan is poisoned
        handler.execute(res, "p", "INSERT OR ROLLBACK INTO t VALUES ('a')")
    with pytest.raises(ResourceError, match="nothing was committed") as raised:
        handler.release_plan("p")

    span = otel.span("p")
    assert span.attributes["cleveragents.plan.outcome"] == "rolled_back"
    assert span.attributes["error.type"] == "cleveragents.errors.ResourceError"
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == str(raised.value)
    assert str(tmp_path) not in otel.exported_text()


def test_a_first_call_that_fails_ends_the_plan_span(
    otel: Otel, make_handler: Callable[..., DatabaseResourceHandler], tmp_path: Path
) -> None:
    handler = make_handler()
    folder = tmp_path / "no-such-folder"
    res = Resource("inv", "database", engine="sqlite", location=str(folder / "inv.db"))
    with pytest.raises(ResourceError) as raised:
        handler.create_checkpoint(res, "p", "start")
    assert str(folder) in str(raised.value)  # the error names the file; telemetry does not

    span = otel.span("p")
    assert span.attributes["cleveragents.plan.outcome"] == "rolled_back"
    assert span.attributes["cleveragents.plan.databases"] == 0
    assert span.attributes["error.type"] == "cleveragents.errors.ResourceError"
    assert span.status.description == str(raised.value).replace(f"{folder}/", "")
    assert "no-such-folder" not in otel.exported_text()
    assert otel.points("cleveragents.plans") == {
        frozenset({("cleveragents.plan.outcome", "rolled_back")}): 1
    }


def test_a_later_database_failing_to_open_leaves_the_plan_open(
    otel: Otel, make_handler: Callable[..., DatabaseResourceHandler], tmp_path: Path
) -> None:
    handler = make_handler()
    res = sqlite_resource(tmp_path)
    broken = Resource("other", "database", engine="sqlite", location=str(tmp_path / "x" / "y.db"))
    handler.create_checkpoint(res, "p", "start")
    with pytest.raises(ResourceError):
        handler.create_checkpoint(broken, "p", "start")
    assert otel.spans() == []
    handler.release_plan("p")
    assert otel.span("p").attributes["cleveragents.plan.outcome"] == "committed"


def test_a_plan_rolled_back_by_close_says_so(
    otel: Otel, make_handler: Callable[..., DatabaseResourceHandler], tmp_path: Path
) -> None:
    handler = make_handler()
    handler.create_checkpoint(sqlite_resource(tmp_path), "p", "start")
    handler.close()
    span = otel.span("p")
    assert span.attributes["cleveragents.plan.outcome"] == "rolled_back"
    assert span.status.description == "rolled back: the handler was closed"
    assert "db.client.connection.count" not in otel.metrics()  # a closed pool is not reported


# -- plans ended by someone else ----------------------------------------------------------


def test_a_reaped_plans_span_is_ended_by_the_reaper(
    otel: Otel, make_handler: Callable[..., DatabaseResourceHandler], tmp_path: Path
) -> None:
    handler = make_handler()
    res = sqlite_resource(tmp_path, checkpoint_ttl=0.05)
    handler.create_checkpoint(res, "forgotten", "start")

    span = eventually(otel.spans, "the reaper ended the plan's span")[0]
    assert dict(span.attributes) == {
        "cleveragents.plan.id": "forgotten",
        "cleveragents.plan.outcome": "reaped",
        "cleveragents.plan.databases": 1,
        "error.type": "reaped",
    }
    assert span.status.status_code is StatusCode.ERROR
    assert "the reaper rolled it back" in (span.status.description or "")
    (name, attributes) = event_attributes(span)[-1]
    assert name == "cleveragents.reaped"
    assert attributes.pop("cleveragents.plan.idle_time") >= 0.05
    assert attributes == {
        "cleveragents.resource.name": "inv",
        "db.system.name": "sqlite",
        "db.namespace": "inventory.db",
        "cleveragents.plan.ttl": 0.05,
    }
    with pytest.raises(CheckpointExpiredError):
        handler.create_checkpoint(res, "forgotten", "again")
    assert len(otel.spans()) == 1  # its next call raised: no second span
    assert otel.points("cleveragents.plans") == {
        frozenset({("cleveragents.plan.outcome", "reaped")}): 1
    }


def test_an_evicted_plans_span_is_ended_by_the_evicting_plan(
    otel: Otel, make_handler: Callable[..., DatabaseResourceHandler], tmp_path: Path
) -> None:
    handler = make_handler(max_connections=1, on_full="evict_lru")
    first = sqlite_resource(tmp_path, "first.db")
    second = sqlite_resource(tmp_path, "second.db")
    handler.create_checkpoint(first, "idle-plan", "start")
    handler.create_checkpoint(second, "busy-plan", "start")  # takes the only connection

    evicted = otel.span("idle-plan")
    assert evicted.attributes["cleveragents.plan.outcome"] == "evicted"
    assert evicted.attributes["error.type"] == "evicted"
    assert "on_full=evict_lru" in (evicted.status.description or "")
    assert event_attributes(evicted)[-1] == (
        "cleveragents.evicted",
        {
            "cleveragents.resource.name": "inv",
            "db.system.name": "sqlite",
            "db.namespace": "first.db",
        },
    )
    with pytest.raises(CheckpointEvictedError):
        handler.create_checkpoint(first, "idle-plan", "again")
    handler.release_plan("busy-plan")
    assert otel.span("busy-plan").attributes["cleveragents.plan.outcome"] == "committed"
    assert otel.points("cleveragents.plans") == {
        frozenset({("cleveragents.plan.outcome", "evicted")}): 1,
        frozenset({("cleveragents.plan.outcome", "committed")}): 1,
    }


def test_a_full_pool_counts_timeouts_and_pending_requests(
    otel: Otel, make_handler: Callable[..., DatabaseResourceHandler], tmp_path: Path
) -> None:
    handler = make_handler(max_connections=1, acquire_timeout=0.05)
    res = sqlite_resource(tmp_path, "first.db")
    other = sqlite_resource(tmp_path, "second.db")
    handler.create_checkpoint(res, "holder", "start")
    with pytest.raises(PoolExhaustedError) as raised:
        handler.create_checkpoint(other, "too-late", "start")

    pool = frozenset({(POOL, "inventory-pool")})
    metrics = otel.metrics()
    check_instruments(metrics)
    assert otel.points("db.client.connection.timeouts", metrics) == {pool: 1}
    assert otel.points("db.client.connection.count", metrics) == {
        pool | {("db.client.connection.state", "idle")}: 0,
        pool | {("db.client.connection.state", "used")}: 1,
    }
    span = otel.span("too-late")
    assert span.attributes["error.type"] == "cleveragents.errors.PoolExhaustedError"
    assert span.status.description == str(raised.value)

    handler.release_plan("holder")

    # A plan waiting for the slot is a pending request until the holder is done.
    waiting = DatabaseResourceHandler(
        name="waiting-pool", max_connections=1, acquire_timeout=EVENTUALLY, **otel.providers
    )
    try:
        waiting.create_checkpoint(res, "holder", "start")
        waiter = threading.Thread(target=waiting.create_checkpoint, args=(other, "waiter", "s"))
        waiter.start()
        mine = frozenset({(POOL, "waiting-pool")})
        eventually(
            lambda: otel.points("db.client.connection.pending_requests").get(mine) == 1,
            "the waiter is a pending request",
        )
        waiting.release_plan("holder")
        waiter.join(EVENTUALLY)
        assert otel.points("db.client.connection.pending_requests")[mine] == 0
        waiting.release_plan("waiter")
    finally:
        waiting.close()


def test_a_memory_database_is_named_as_is(
    otel: Otel, make_handler: Callable[..., DatabaseResourceHandler]
) -> None:
    handler = make_handler()
    res = Resource("scratch", "database", engine="sqlite", location=":memory:")
    handler.execute(res, "p", "CREATE TABLE t (v)")
    handler.release_plan("p")
    (point,) = otel.points("db.client.operation.duration")
    assert ("db.namespace", ":memory:") in point
    assert otel.points("db.client.connection.wait_time") == {
        frozenset({(POOL, "inventory-pool")}): 1
    }


def deferred_orphan(tmp_path: Path, name: str) -> Resource:
    """Return a resource whose plan's COMMIT fails: a child row whose parent check waits for it."""
    path = tmp_path / name
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    conn.execute(
        "CREATE TABLE child (pid INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)"
    )
    conn.close()
    return Resource(name.removesuffix(".db"), "database", engine="sqlite", location=str(path))


def test_a_failed_commit_is_an_operation_error_and_a_partial_one_its_own_outcome(
    otel: Otel, make_handler: Callable[..., DatabaseResourceHandler], tmp_path: Path
) -> None:
    handler = make_handler()
    orphans = deferred_orphan(tmp_path, "orphans.db")
    handler.execute(orphans, "alone", "INSERT INTO child VALUES (7)")
    with pytest.raises(ResourceError, match="FOREIGN KEY"):
        handler.release_plan("alone")
    span = otel.span("alone")
    assert span.attributes["cleveragents.plan.outcome"] == "rolled_back"
    assert span.attributes["error.type"] == "cleveragents.errors.ResourceError"

    fine = sqlite_resource(tmp_path)
    handler.execute(fine, "both", "INSERT INTO t VALUES ('kept')")
    handler.execute(orphans, "both", "INSERT INTO child VALUES (7)")
    with pytest.raises(PartialCommitError):
        handler.release_plan("both")
    span = otel.span("both")
    assert span.attributes["cleveragents.plan.outcome"] == "partial_commit"
    assert span.attributes["cleveragents.plan.databases"] == 2
    assert span.attributes["error.type"] == "cleveragents.errors.PartialCommitError"

    metrics = otel.metrics()
    check_instruments(metrics)
    commits = {
        dict(attributes).get("db.namespace"): (dict(attributes).get("error.type"), count)
        for attributes, count in otel.points("db.client.operation.duration", metrics).items()
        if ("db.operation.name", "COMMIT") in attributes
    }
    assert commits == {
        "orphans.db": ("sqlite3.IntegrityError", 2),
        "inventory.db": (None, 1),
    }
    assert otel.points("cleveragents.plans", metrics) == {
        frozenset({("cleveragents.plan.outcome", "rolled_back")}): 1,
        frozenset({("cleveragents.plan.outcome", "partial_commit")}): 1,
    }


def test_database_attributes_are_rebuilt_past_the_bound(
    otel: Otel,
    make_handler: Callable[..., DatabaseResourceHandler],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(telemetry.HandlerTelemetry, "MAX_DATABASES", 1)
    handler = make_handler()
    for name in ("a.db", "b.db", "a.db"):
        res = (
            sqlite_resource(tmp_path, name)
            if not (tmp_path / name).exists()
            else Resource("inv", "database", engine="sqlite", location=str(tmp_path / name))
        )
        handler.create_checkpoint(res, "p", name)
        handler.release_plan("p")
    assert [
        dict(event.attributes or {})["db.namespace"]
        for span in otel.spans()
        for event in span.events
    ] == ["a.db", "b.db", "a.db"]


def test_sampled_out_spans_cost_nothing_and_metrics_still_count(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider(sampler=ALWAYS_OFF)
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    otel = Otel(tracer_provider, exporter, MeterProvider(metric_readers=[reader]), reader)
    res = sqlite_resource(tmp_path, checkpoint_ttl=0.05)
    pm: pluggy.PluginManager = get_plugin_manager(load_entry_points=False)
    pm.register(_Tools(), name="test-tools")
    plan = write_plan(tmp_path, "p", "  - {id: a, tool: add_item, with: {sku: bad}}\n")
    with Runtime(plugin_manager=pm, **otel.providers) as runtime:
        assert not runtime.run(runtime.load(plan)).completed
    with DatabaseResourceHandler(**otel.providers) as handler:
        handler.create_checkpoint(res, "q", "start")
        handler.rollback_to(res, "q", "start")
        eventually(lambda: handler.stats().reaped == 1, "the plan was reaped")

        async def agent_run() -> None:
            async with AgentPlan(handler, [res], plan_id="r") as agent_plan:
                await agent_plan.run(restocking_agent(), "restock")

        asyncio.run(agent_run())
        eventually(
            lambda: sum(otel.points("cleveragents.plans").values()) == 3, "three plans counted"
        )
    assert exporter.get_finished_spans() == ()
    assert otel.points("cleveragents.plans") == {
        frozenset({("cleveragents.plan.outcome", "rolled_back")}): 1,
        frozenset({("cleveragents.plan.outcome", "reaped")}): 1,
        frozenset({("cleveragents.plan.outcome", "committed")}): 1,
    }


# -- never recorded ---------------------------------------------------------------------


def test_no_sql_parameter_password_or_folder_is_ever_recorded(
    otel: Otel, tmp_path: Path, database: Database
) -> None:
    literal, parameter = "literal-0f3c9", "parameter-77ab1"
    res = database.resource
    with DatabaseResourceHandler(**otel.providers) as handler:
        handler.create_checkpoint(res, "p", "start")
        handler.execute(res, "p", f"INSERT INTO t (v) VALUES ('{literal}')")
        handler.execute(res, "p", "INSERT INTO t (v) VALUES (?)", (parameter,))
        with pytest.raises(Exception, match=r"(?i)unique"):  # the driver's own error
            handler.execute(res, "p", f"INSERT INTO t (v) VALUES ('{literal}')")
        handler.rollback_plan("p")
        handler.execute(res, "q", "INSERT INTO t (v) VALUES (:v)", {"v": parameter})
        handler.release_plan("q")
        text = otel.exported_text()
    assert database.rows() == [parameter]
    assert otel.span("p").attributes["cleveragents.plan.outcome"] == "rolled_back"
    for secret in [literal, parameter, "INSERT", "VALUES", *database.secrets]:
        assert secret not in text, secret
    assert database.namespace in text


def test_a_dsn_naming_no_database_leaves_db_namespace_out(
    otel: Otel,
    make_handler: Callable[..., DatabaseResourceHandler],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dsn = os.environ.get(PG_VARIABLE)
    if not dsn:
        pytest.skip(f"PostgreSQL tests need {PG_VARIABLE}")
    psycopg = pytest.importorskip("psycopg")
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    monkeypatch.setenv("PGDATABASE", str(params.pop("dbname")))  # libpq's default, not the DSN's
    res = Resource(
        "inv", "database", engine="postgresql", dsn=psycopg.conninfo.make_conninfo(**params)
    )
    handler = make_handler()
    handler.create_checkpoint(res, "p", "start")
    handler.release_plan("p")
    assert dict(otel.span("p").events[0].attributes or {}) == {
        "cleveragents.resource.name": "inv",
        "db.system.name": "postgresql",
        "cleveragents.checkpoint.id": "start",
    }
    (commit,) = otel.points("db.client.operation.duration")
    assert dict(commit) == {"db.operation.name": "COMMIT", "db.system.name": "postgresql"}


def test_only_library_messages_without_folders_reach_a_status() -> None:
    assert telemetry.without_folders(
        "commit failed on database '/srv/data/inv.db': disk I/O error"
    ) == ("commit failed on database 'inv.db': disk I/O error")
    assert telemetry.without_folders("'postgresql://db.example:5432/stock' busy") == "'stock' busy"
    assert telemetry.without_folders(r"C:\plans\a.yaml:3: id; ./x/y.db and/or ~/z") == (
        "a.yaml:3: id; y.db and/or z"
    )
    assert telemetry.without_folders("data/inv.db") == "inv.db"
    assert telemetry.error_type(ValueError()) == "ValueError"
    assert telemetry.error_type(PoolExhaustedError("x", limit=1, holders=[])) == (
        "cleveragents.errors.PoolExhaustedError"
    )


def test_namespace_is_the_file_or_database_name_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = DatabaseResourceHandler.validate_settings(
        Resource("r", "database", engine="sqlite", location=str(tmp_path / "a" / "b.db"))
    )
    assert telemetry.namespace("sqlite", settings) == "b.db"
    assert telemetry.namespace("other", settings) is None
    pytest.importorskip("psycopg")

    def postgresql(dsn: str) -> str | None:
        settings = DatabaseResourceHandler.validate_settings(
            Resource("r", "database", engine="postgresql", dsn=dsn)
        )
        return telemetry.namespace("postgresql", settings)

    assert postgresql("postgresql://u:pw@h:1/stock") == "stock"
    assert postgresql("host=h user=u password=pw") is None  # names no database
    # A DSN read from the environment that stopped parsing, or was unset, since validation.
    monkeypatch.setenv("TELEMETRY_TEST_DSN", "postgresql://u:pw@h:1/stock")
    settings = DatabaseResourceHandler.validate_settings(
        Resource("r", "database", engine="postgresql", dsn="${TELEMETRY_TEST_DSN}")
    )
    assert telemetry.namespace("postgresql", settings) == "stock"
    monkeypatch.setenv("TELEMETRY_TEST_DSN", "host='unterminated")
    assert telemetry.namespace("postgresql", settings) is None
    monkeypatch.delenv("TELEMETRY_TEST_DSN")
    assert telemetry.namespace("postgresql", settings) is None


# -- providers -----------------------------------------------------------------------


def test_without_providers_the_global_ones_are_used_even_when_set_later(tmp_path: Path) -> None:
    script = f"""
import json
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler

handler = DatabaseResourceHandler(name="made-first")   # before any provider is set
res = Resource("inv", "database", engine="sqlite", location={str(tmp_path / "g.db")!r})
handler.create_checkpoint(res, "early", "start")        # recorded nowhere
exporter = InMemorySpanExporter()
tracer_provider = TracerProvider()
tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(tracer_provider)
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
handler.release_plan("early")
handler.create_checkpoint(res, "late", "start")
handler.release_plan("late")
names = sorted(m.name for rm in reader.get_metrics_data().resource_metrics
               for sm in rm.scope_metrics for m in sm.metrics)
spans = [dict(s.attributes) for s in exporter.get_finished_spans()]
handler.close()
print(json.dumps({{"spans": spans, "metrics": names}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    found = json.loads(out.stdout)
    assert [span["cleveragents.plan.id"] for span in found["spans"]] == ["late"]
    assert "cleveragents.plans" in found["metrics"]
    assert "db.client.connection.count" in found["metrics"]


def test_without_opentelemetry_everything_works_and_imports_none_of_it(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    make_table(tmp_path / "inv.db")
    plan.write_text(
        "id: p\nresources:\n  inv: {kind: database, engine: sqlite, location: inv.db}\n"
        "steps:\n  - {id: a, resource: inv, sql: \"INSERT INTO t VALUES ('x')\"}\n",
        encoding="utf-8",
    )
    script = f"""
import sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ImportError("blocked: " + name)

sys.meta_path.insert(0, Blocker())
import cleveragents
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler
from cleveragents.runtime import Runtime

with DatabaseResourceHandler() as handler:
    res = Resource("inv", "database", engine="sqlite", location={str(tmp_path / "inv.db")!r})
    handler.create_checkpoint(res, "p", "start")
    handler.rollback_to(res, "p", "start")
    handler.release_plan("p")
with Runtime() as runtime:
    assert runtime.run(runtime.load({str(plan)!r})).completed
loaded = [name for name in sys.modules if name.startswith("opentelemetry")]
assert not loaded, loaded
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert query(tmp_path / "inv.db", "SELECT v FROM t") == [("x",)]


def test_importing_the_package_imports_no_opentelemetry() -> None:
    script = (
        "import sys, cleveragents, cleveragents.telemetry\n"
        "print([m for m in sys.modules if m.startswith('opentelemetry')])"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


def test_the_scope_version_falls_back_when_the_package_is_not_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert telemetry.package_version() == cleveragents.__version__

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert telemetry.package_version() == ""


# -- the runtime ------------------------------------------------------------------------


class _Tools:
    @hookimpl
    def cleveragents_register_tools(self, registry: ToolRegistry) -> None:
        registry.add("add_item", self.add_item)
        registry.add("refuse", self.refuse)

    def add_item(self, ctx: ToolContext, sku: str) -> None:
        with ctx.connection("inv") as conn:
            conn.execute("INSERT INTO t VALUES (?)", (sku,))
        if sku.startswith("bad"):
            raise ValueError(f"refusing {sku}")

    def refuse(self, ctx: ToolContext, fail: bool) -> None:
        if fail:
            raise ToolError(f"refused: see {Path.cwd() / 'inv.db'}")


class _OtherKind(FakeHandler):
    kind = "other"


class _OtherPlugin:
    @hookimpl
    def cleveragents_register_resource_handlers(self, registry: ResourceRegistry) -> None:
        registry.add(_OtherKind)


@pytest.fixture
def runtime(otel: Otel) -> Iterator[Runtime]:
    pm: pluggy.PluginManager = get_plugin_manager(load_entry_points=False)
    pm.register(_Tools(), name="test-tools")
    pm.register(_OtherPlugin(), name="other-kind")
    with Runtime(plugin_manager=pm, **otel.providers) as made:
        yield made


def write_plan(tmp_path: Path, plan_id: str, steps: str) -> Path:
    if not (tmp_path / "inv.db").exists():
        make_table(tmp_path / "inv.db")
    path = tmp_path / f"{plan_id}.yaml"
    path.write_text(
        f"id: {plan_id}\nresources:\n  inv: {{kind: database, engine: sqlite, location: inv.db}}\n"
        f"steps:\n{steps}",
        encoding="utf-8",
    )
    return path


def test_the_runtime_runs_a_plan_in_one_span_with_a_span_per_step(
    otel: Otel, runtime: Runtime, tmp_path: Path
) -> None:
    path = write_plan(
        tmp_path,
        "restock",
        "  - {id: add, tool: add_item, with: {sku: w1}, checkpoint: true}\n"
        "  - {id: check, resource: inv, expect: {sql: 'SELECT count(*) FROM t', equals: 1}}\n",
    )
    with otel.tracer_provider.get_tracer("app").start_as_current_span("cron job") as caller:
        assert runtime.run(runtime.load(path)).completed

    plan = otel.span("restock")
    assert plan.parent is not None
    assert plan.parent.span_id == caller.get_span_context().span_id
    assert dict(plan.attributes) == {
        "cleveragents.plan.id": "restock",
        "cleveragents.plan.outcome": "committed",
        "cleveragents.plan.databases": 1,
    }
    assert plan.status.status_code is StatusCode.UNSET
    assert [name for name, _ in event_attributes(plan)] == ["cleveragents.checkpoint"]
    steps = otel.spans("cleveragents.step")
    assert [dict(step.attributes) for step in steps] == [
        {
            "cleveragents.step.id": "add",
            "gen_ai.tool.name": "add_item",
            "cleveragents.step.attempt": 1,
        },
        {"cleveragents.step.id": "check", "cleveragents.step.attempt": 1},
    ]
    for step in steps:
        assert step.parent is not None
        assert step.parent.span_id == plan.context.span_id
        assert step.kind is SpanKind.INTERNAL
        assert step.status.status_code is StatusCode.UNSET
    # The runtime handed its providers to the handler it made.
    assert otel.points("cleveragents.plans") == {
        frozenset({("cleveragents.plan.outcome", "committed")}): 1
    }


def test_a_failed_step_fails_its_span_and_the_plans(
    otel: Otel, runtime: Runtime, tmp_path: Path
) -> None:
    path = write_plan(
        tmp_path,
        "restock",
        "  - {id: add, tool: add_item, with: {sku: w1}}\n"
        "  - {id: bad, tool: add_item, with: {sku: bad-1}, retry: 1}\n"
        "  - {id: never, resource: inv, sql: 'DELETE FROM t'}\n",
    )
    result = runtime.run(runtime.load(path))
    assert result.failed_step == "bad"
    assert query(tmp_path / "inv.db", "SELECT v FROM t") == []

    plan = otel.span("restock")
    assert dict(plan.attributes) == {
        "cleveragents.plan.id": "restock",
        "cleveragents.plan.outcome": "rolled_back",
        "cleveragents.plan.databases": 1,
        "cleveragents.plan.failed_step": "bad",
        "error.type": "ValueError",
    }
    assert plan.status.status_code is StatusCode.ERROR
    assert plan.status.description is None  # not the library's message: only its class
    add, bad = otel.spans("cleveragents.step")
    assert add.status.status_code is StatusCode.UNSET
    assert dict(bad.attributes) == {
        "cleveragents.step.id": "bad",
        "gen_ai.tool.name": "add_item",
        "cleveragents.step.attempt": 2,
        "error.type": "ValueError",
    }
    assert bad.status.status_code is StatusCode.ERROR
    assert [name for name, _ in event_attributes(plan)] == [
        "cleveragents.checkpoint",
        "cleveragents.rollback_to",
    ]


def test_a_plan_that_never_touched_a_database_still_has_its_span(
    otel: Otel, runtime: Runtime, tmp_path: Path
) -> None:
    passes = write_plan(tmp_path, "passes", "  - {id: a, tool: refuse, with: {fail: false}}\n")
    fails = write_plan(tmp_path, "fails", "  - {id: a, tool: refuse, with: {fail: true}}\n")
    assert runtime.run(runtime.load(passes)).completed
    assert not runtime.run(runtime.load(fails)).completed

    assert dict(otel.span("passes").attributes) == {
        "cleveragents.plan.id": "passes",
        "cleveragents.plan.outcome": "committed",
        "cleveragents.plan.databases": 0,
    }
    span = otel.span("fails")
    assert dict(span.attributes) == {
        "cleveragents.plan.id": "fails",
        "cleveragents.plan.outcome": "rolled_back",
        "cleveragents.plan.databases": 0,
        "cleveragents.plan.failed_step": "a",
        "error.type": "cleveragents.errors.ToolError",
    }
    assert span.status.description == "refused: see inv.db"


def test_a_tool_raising_system_exit_ends_the_plan_span(
    otel: Otel, runtime: Runtime, tmp_path: Path
) -> None:
    path = write_plan(tmp_path, "p", "  - {id: a, tool: add_item, with: {sku: w}}\n")

    def exits(ctx: ToolContext, sku: str) -> None:
        raise SystemExit(3)

    runtime.tools.add("exits", exits)
    path.write_text(path.read_text().replace("add_item", "exits"), encoding="utf-8")
    with pytest.raises(SystemExit):
        runtime.run(runtime.load(path))
    span = otel.span("p")
    assert span.attributes["error.type"] == "SystemExit"
    step = otel.spans("cleveragents.step")[0]
    assert step.attributes["error.type"] == "SystemExit"


def test_parallel_plans_are_children_of_the_callers_span(
    otel: Otel, runtime: Runtime, tmp_path: Path
) -> None:
    plans = [
        runtime.load(
            write_plan(tmp_path, f"p{i}", f"  - {{id: a, tool: add_item, with: {{sku: s{i}}}}}\n")
        )
        for i in range(3)
    ]
    with otel.tracer_provider.get_tracer("app").start_as_current_span("batch") as caller:
        results = runtime.run_many(plans, parallel=3)
    assert all(result.completed for result in results)
    for i in range(3):
        span = otel.span(f"p{i}")
        assert span.parent is not None
        assert span.parent.span_id == caller.get_span_context().span_id


def test_providers_go_only_to_handlers_that_take_them(otel: Otel) -> None:
    assert telemetry.provider_options(_OtherKind, otel.tracer_provider, None) == {}
    assert telemetry.provider_options(DatabaseResourceHandler, None, None) == {}
    assert telemetry.provider_options(DatabaseResourceHandler, otel.tracer_provider, None) == {
        "tracer_provider": otel.tracer_provider
    }
    assert telemetry.provider_options(dict, otel.tracer_provider, None) == {}  # no signature
    handler = DatabaseResourceHandler.from_config(
        name="configured", max_connections=2, **otel.providers
    )
    try:
        handler.execute(
            Resource("m", "database", engine="sqlite", location=":memory:"), "p", "SELECT 1"
        )
        handler.release_plan("p")
    finally:
        handler.close()
    assert otel.span("p").attributes["cleveragents.plan.outcome"] == "committed"


def test_a_plan_span_opened_elsewhere_is_recorded_into_once(
    otel: Otel, make_handler: Callable[..., DatabaseResourceHandler], tmp_path: Path
) -> None:
    first, second = make_handler(name="one"), make_handler(name="two")
    res, other = sqlite_resource(tmp_path), sqlite_resource(tmp_path, "other.db")
    memory = Resource("m", "database", engine="sqlite", location=":memory:")
    recorder = for_runtime(otel.tracer_provider)
    assert recorder is not None

    def run() -> int:
        opened = recorder.open_plan("p")
        first.create_checkpoint(res, "p", "a")
        second.execute(memory, "p", "SELECT 1")
        first.create_checkpoint(other, "other-plan", "a")  # another plan: its own span
        for handler in (first, second):
            handler.release_plan("p")
        first.release_plan("other-plan")
        assert trace.get_current_span() is opened.span
        opened.finish(committed=True)
        assert trace.get_current_span() is not opened.span
        return int(opened.span.get_span_context().span_id)

    opened_id = contextvars.copy_context().run(run)
    spans = {
        s.context.span_id: s for s in otel.spans() if s.attributes["cleveragents.plan.id"] == "p"
    }
    assert len(spans) == 2  # one per plan and handler: the opened one, and the second handler's
    opened_span = spans.pop(opened_id)
    assert dict(opened_span.attributes) == {
        "cleveragents.plan.id": "p",
        "cleveragents.plan.outcome": "committed",
        "cleveragents.plan.databases": 1,
    }
    assert [name for name, _ in event_attributes(opened_span)] == ["cleveragents.checkpoint"]
    (own,) = spans.values()
    assert own.parent is not None
    assert own.parent.span_id == opened_id


def test_a_plan_span_finished_in_another_context_still_ends(otel: Otel) -> None:
    recorder = for_runtime(otel.tracer_provider)
    assert recorder is not None

    def open_here_finish_elsewhere() -> None:
        opened = recorder.open_plan("p")
        contextvars.Context().run(opened.finish, committed=False, reason="gave up in /tmp/x/y")

    contextvars.copy_context().run(open_here_finish_elsewhere)
    span = otel.span("p")
    assert span.status.description == "gave up in y"
    assert span.attributes["error.type"] == "rolled_back"


# -- the OpenAI Agents SDK integration -----------------------------------------------------


@plan_tool
def stock_item(ctx: RunContextWrapper[AgentPlan], sku: str) -> str:
    """Add one item to the inventory."""
    with ctx.context.connection("inv") as conn:
        conn.execute("INSERT INTO t VALUES (?)", (sku,))
    return f"added {sku}"


def scripted_agent(*turns: list[Any], tools: list[Any], name: str = "clerk") -> Agent[Any]:
    """Return an agent whose model plays *turns* (each a list of output items)."""
    return Agent(name=name, model=ScriptedModel(list(turns)), tools=tools)


def restocking_agent() -> Agent[Any]:
    return scripted_agent(
        [function_call("stock_item", {"sku": "w1"}, call_id="c1")],
        [assistant_message("done")],
        tools=[stock_item],
    )


def test_an_agent_plan_is_one_span_under_the_callers_that_the_handler_records_into(
    otel: Otel, make_handler: Callable[..., DatabaseResourceHandler], tmp_path: Path
) -> None:
    handler = make_handler()
    res = sqlite_resource(tmp_path)
    tracer = otel.tracer_provider.get_tracer("app")

    async def run() -> Any:
        with tracer.start_as_current_span("invoke_agent clerk") as caller:
            async with AgentPlan(handler, [res], plan_id="agent-1") as plan:
                await plan.run(restocking_agent(), "restock")
            assert plan.outcome == "released"
            async with AgentPlan(handler, [res], plan_id="agent-2") as plan:
                await plan.run(restocking_agent(), "restock")
                raise_after_the_run()
        return caller

    with pytest.raises(RuntimeError, match="the caller gave up"):
        asyncio.run(run())
    assert query(tmp_path / "inventory.db", "SELECT v FROM t") == [("w1",)]

    released, rolled_back = otel.span("agent-1"), otel.span("agent-2")
    for span in (released, rolled_back):
        assert span.parent is not None
        assert span.parent.span_id == otel.spans("invoke_agent clerk")[0].context.span_id
        assert event_attributes(span) == [
            (
                "cleveragents.checkpoint",
                {
                    "cleveragents.resource.name": "inv",
                    "db.system.name": "sqlite",
                    "db.namespace": "inventory.db",
                    "cleveragents.checkpoint.id": "tool-1",
                },
            )
        ]
    assert dict(released.attributes) == {
        "cleveragents.plan.id": "agent-1",
        "cleveragents.plan.outcome": "committed",
        "cleveragents.plan.databases": 1,
    }
    assert released.status.status_code is StatusCode.UNSET
    assert dict(rolled_back.attributes) == {
        "cleveragents.plan.id": "agent-2",
        "cleveragents.plan.outcome": "rolled_back",
        "cleveragents.plan.databases": 1,
        "error.type": "RuntimeError",
    }
    assert rolled_back.status.status_code is StatusCode.ERROR
    assert rolled_back.status.description is None  # the caller's message is not the library's


def raise_after_the_run() -> None:
    raise RuntimeError("the caller gave up")


def test_an_agent_plan_whose_tools_never_ran_still_ends_its_span(
    otel: Otel, make_handler: Callable[..., DatabaseResourceHandler], tmp_path: Path
) -> None:
    handler = make_handler()
    res = sqlite_resource(tmp_path)

    async def run() -> None:
        async with AgentPlan(handler, [res], plan_id="answers") as plan:
            await plan.run(scripted_agent([assistant_message("nothing to do")], tools=[]), "hi")
        async with AgentPlan(handler, [res], plan_id="no-run"):
            pass

    asyncio.run(run())
    assert dict(otel.span("answers").attributes) == {
        "cleveragents.plan.id": "answers",
        "cleveragents.plan.outcome": "committed",
        "cleveragents.plan.databases": 0,
    }
    span = otel.span("no-run")
    assert span.attributes["cleveragents.plan.outcome"] == "rolled_back"
    assert span.attributes["error.type"] == "rolled_back"
    assert span.status.description == "no run returned a final output"


@plan_tool
def end_the_transaction(ctx: RunContextWrapper[AgentPlan]) -> str:
    """Run a statement that ends the plan's transaction from inside (it poisons the plan)."""
    with ctx.context.connection("inv") as conn:
        conn.execute("INSERT INTO t VALUES ('a')")
        with contextlib.suppress(sqlite3.IntegrityError):
            conn.execute("INSERT OR ROLLBACK INTO t VALUES ('a')")
    return "done"


def test_an_agent_plan_whose_release_fails_ends_in_that_error(
    otel: Otel, make_handler: Callable[..., DatabaseResourceHandler], tmp_path: Path
) -> None:
    handler = make_handler()
    make_table(tmp_path / "u.db", "CREATE TABLE t (v TEXT UNIQUE)")
    res = Resource("inv", "database", engine="sqlite", location=str(tmp_path / "u.db"))
    agent = scripted_agent(
        [function_call("end_the_transaction", {}, call_id="c1")],
        [assistant_message("done")],
        tools=[end_the_transaction],
    )

    async def run() -> None:
        async with AgentPlan(handler, [res], plan_id="doomed") as plan:
            await plan.run(agent, "go")

    with pytest.raises(ResourceError, match="nothing was committed") as raised:
        asyncio.run(run())
    span = otel.span("doomed")
    assert span.attributes["cleveragents.plan.outcome"] == "rolled_back"
    assert span.attributes["error.type"] == "cleveragents.errors.ResourceError"
    assert span.status.description == telemetry.without_folders(str(raised.value))


class _Bridge(TracingProcessor):
    """What an OpenTelemetry bridge for the Agents SDK does (no network, no exporter).

    Each SDK span becomes an OpenTelemetry span, child of its SDK parent's, and
    is made current while it is open, as OpenInference's processor does; a
    trace's root takes the span current when the run starts as its parent.
    """

    def __init__(self, tracer: Any) -> None:
        self._tracer = tracer
        self._spans: dict[str, Any] = {}
        self._tokens: dict[str, Any] = {}

    def on_trace_start(self, trace: Any) -> None:
        self._spans[trace.trace_id] = self._tracer.start_span(trace.name)

    def on_trace_end(self, trace: Any) -> None:
        self._spans.pop(trace.trace_id).end()

    def on_span_start(self, span: Any) -> None:
        parent = self._spans.get(span.parent_id or span.trace_id)
        data = span.span_data
        name = {"function": "execute_tool", "agent": "invoke_agent"}.get(data.type, data.type)
        if getattr(data, "name", None):
            name = f"{name} {data.name}"
        started = self._tracer.start_span(
            name, context=None if parent is None else trace.set_span_in_context(parent)
        )
        self._spans[span.span_id] = started
        self._tokens[span.span_id] = otel_context.attach(trace.set_span_in_context(started))

    def on_span_end(self, span: Any) -> None:
        otel_context.detach(self._tokens.pop(span.span_id))
        self._spans.pop(span.span_id).end()

    def shutdown(self) -> None:
        pass

    def force_flush(self) -> None:
        pass


@pytest.fixture
def bridged(otel: Otel) -> Iterator[None]:
    """Turn the SDK's tracing on, into OpenTelemetry only, for one test."""
    provider = get_trace_provider()
    saved = list(provider._multi_processor._processors)
    set_trace_processors([_Bridge(otel.tracer_provider.get_tracer("agents-bridge"))])
    set_tracing_disabled(False)
    try:
        yield
    finally:
        set_tracing_disabled(True)
        set_trace_processors(saved)


def test_with_a_bridge_the_plan_span_nests_under_the_sdks_tool_span(
    otel: Otel,
    make_handler: Callable[..., DatabaseResourceHandler],
    tmp_path: Path,
    bridged: None,
) -> None:
    handler = make_handler()
    res = sqlite_resource(tmp_path)
    other = sqlite_resource(tmp_path, "orders.db")

    @function_tool
    async def delegate(ctx: RunContextWrapper[Any]) -> str:
        """Restock through a sub-agent, as one plan of its own."""
        async with AgentPlan(handler, [res], plan_id="sub-plan") as plan:
            await plan.run(restocking_agent(), "restock")
        return "delegated"

    @function_tool
    def order(ctx: RunContextWrapper[Any]) -> str:
        """Record an order straight through the handler."""
        handler.execute(other, "order-plan", "INSERT INTO t VALUES ('o1')")
        handler.release_plan("order-plan")
        return "ordered"

    coordinator = scripted_agent(
        [function_call("delegate", {}, call_id="d1")],
        [function_call("order", {}, call_id="o1")],
        [assistant_message("all done")],
        tools=[delegate, order],
        name="coordinator",
    )
    result = asyncio.run(Runner.run(coordinator, "restock and order"))
    assert result.final_output == "all done"
    assert query(tmp_path / "inventory.db", "SELECT v FROM t") == [("w1",)]

    by_id = {span.context.span_id: span for span in otel.exporter.get_finished_spans()}
    for plan_id, tool in (("sub-plan", "delegate"), ("order-plan", "order")):
        span = otel.span(plan_id)
        assert span.parent is not None
        assert by_id[span.parent.span_id].name == f"execute_tool {tool}"
        assert span.attributes["cleveragents.plan.outcome"] == "committed"
    assert [name for name, _ in event_attributes(otel.span("sub-plan"))] == [
        "cleveragents.checkpoint"
    ]


def test_a_plan_span_its_opener_ended_first_is_left_alone(
    otel: Otel, make_handler: Callable[..., DatabaseResourceHandler], tmp_path: Path
) -> None:
    handler = make_handler()
    res = sqlite_resource(tmp_path)
    recorder = for_runtime(otel.tracer_provider)
    assert recorder is not None

    def run() -> None:
        opened = recorder.open_plan("p")
        handler.create_checkpoint(res, "p", "a")
        opened.finish(committed=True)  # too early: the plan goes on in the handler
        handler.create_checkpoint(res, "p", "b")
        handler.release_plan("p")

    contextvars.copy_context().run(run)
    span = otel.span("p")
    assert dict(span.attributes) == {"cleveragents.plan.id": "p"}  # ended before the plan did
    assert [
        dict(event.attributes or {})["cleveragents.checkpoint.id"] for event in span.events
    ] == ["a"]
    assert otel.points("cleveragents.plans") == {
        frozenset({("cleveragents.plan.outcome", "committed")}): 1
    }
