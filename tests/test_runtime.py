"""Runtime edge cases: tools and their connections, expect, retry, interrupt, subscribers."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pluggy
import pytest
from conftest import make_table
from fakes import FakeHandler

from cleveragents.errors import (
    CheckpointEvictedError,
    CheckpointExpiredError,
    CleverAgentsError,
    PlanError,
    ResourceBusyError,
    ResourceError,
)
from cleveragents.hookspecs import hookimpl
from cleveragents.plan import Plan, ResourceEntry, Step
from cleveragents.plugins import get_plugin_manager
from cleveragents.resource import Resource, ResourceHandler
from cleveragents.resource.handlers.sqlite import SQLiteEngine
from cleveragents.resource.registry import ResourceRegistry
from cleveragents.runtime import PlanResult, Runtime
from cleveragents.tools import ToolContext, ToolRegistry

_LONG_QUERY = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 100000000) "
    "SELECT count(*) FROM c"
)


class _Tools:
    """Test tools, and a subscriber that records plan events."""

    def __init__(self) -> None:
        self.runtime: Runtime | None = None
        self.events: list[str] = []
        self.started = threading.Event()
        self.go = threading.Event()
        self.fail_on: str | None = None
        #: Handler errors a tool caught and hid.
        self.hidden: list[BaseException] = []

    @hookimpl
    def cleveragents_register_tools(self, registry: ToolRegistry) -> None:
        registry.add("use_unknown", self.use_unknown)
        registry.add("flaky", self.flaky)
        registry.add("always_fails", self.always_fails)
        registry.add("interrupt_then", self.interrupt_then)
        registry.add("long_query", self.long_query)
        registry.add("exits", self.exits)
        registry.add("outlive_ttl", self.outlive_ttl)
        registry.add("wait_for_go", self.wait_for_go)
        registry.add("hold_and_reconnect", self.hold_and_reconnect)

    @hookimpl
    def cleveragents_plan_completed(self, plan: Plan) -> None:
        self.events.append(f"completed {plan.id}")
        if self.fail_on == "completed":
            raise RuntimeError("subscriber broke on completed")

    @hookimpl
    def cleveragents_plan_failed(self, plan: Plan, error: BaseException) -> None:
        self.events.append(f"failed {plan.id}: {type(error).__name__}")

    def use_unknown(self, ctx: ToolContext) -> None:
        with ctx.connection("nope"):
            pass

    def flaky(self, ctx: ToolContext, succeed_on: int = 2) -> None:
        with ctx.connection("inv") as conn:
            conn.execute("INSERT INTO t VALUES (?)", (f"{ctx.step_id} attempt {ctx.attempt}",))
        if ctx.attempt < succeed_on:
            raise RuntimeError(f"attempt {ctx.attempt} failed")

    def always_fails(self, ctx: ToolContext) -> None:
        with ctx.connection("inv") as conn:
            conn.execute("INSERT INTO t VALUES ('doomed')")
        raise ValueError("never works")

    def interrupt_then(self, ctx: ToolContext, fail: bool = False) -> None:
        assert self.runtime is not None
        with ctx.connection("inv") as conn:
            conn.execute("INSERT INTO t VALUES ('before interrupt')")
        self.runtime.interrupt("SIGTERM")
        if fail:
            raise RuntimeError("failed after the interrupt")

    def exits(self, ctx: ToolContext) -> None:
        with ctx.connection("inv") as conn:
            conn.execute("INSERT INTO t VALUES ('before exit')")
        raise SystemExit(3)  # e.g. argparse giving up inside a tool

    def outlive_ttl(self, ctx: ToolContext, then: str = "reconnect") -> None:
        """Write, sit idle until the reaper rolls the plan back, then hide its error and go on."""
        assert self.runtime is not None
        with ctx.connection("inv") as conn:
            conn.execute("INSERT INTO t VALUES ('before the reaper')")
        handler = self.runtime.handlers["database"]
        for _ in range(500):  # at most ~10 s
            if handler.stats()["reaped"]:
                break
            threading.Event().wait(0.02)
        else:
            raise AssertionError("the reaper never rolled the plan back")
        if then == "return":
            return
        for _ in range(2):
            try:
                with ctx.connection("inv") as conn:
                    conn.execute("INSERT INTO t VALUES ('after the reaper')")
            except CleverAgentsError as exc:
                self.hidden.append(exc)
        if then == "raise":
            raise ValueError("gave up")

    def hold_and_reconnect(self, ctx: ToolContext) -> None:
        """Ask for a database another plan holds, hide the busy error, and ask again."""
        assert self.runtime is not None
        handler = self.runtime.handlers["database"]
        for _ in range(2):
            try:
                with ctx.connection("other") as conn:
                    conn.execute("INSERT INTO t VALUES ('after busy')")
            except CleverAgentsError as exc:
                self.hidden.append(exc)
                handler.release_plan("someone-else")  # the database is free now

    def wait_for_go(self, ctx: ToolContext) -> None:
        with ctx.connection("inv") as conn:
            conn.execute("INSERT INTO t VALUES (?)", (f"{ctx.plan_id} ran",))
        self.started.set()
        assert self.go.wait(10)

    def long_query(self, ctx: ToolContext) -> None:
        with ctx.connection("inv") as conn:
            conn.execute("INSERT INTO t VALUES ('before long query')")
            self.started.set()
            conn.execute(_LONG_QUERY).fetchall()


@pytest.fixture
def tools() -> _Tools:
    return _Tools()


@pytest.fixture
def runtime(tools: _Tools) -> Iterator[Runtime]:
    pm: pluggy.PluginManager = get_plugin_manager(load_entry_points=False)
    pm.register(tools, name="test-tools")
    with Runtime(plugin_manager=pm, handler_options={"database": {"max_connections": 4}}) as made:
        tools.runtime = made
        yield made


@pytest.fixture
def write_plan(db_path: Path) -> Callable[..., Path]:
    """Write a plan on resource ``inv`` (the test database) with the given steps."""

    def write(steps: str, settings: str = "", name: str = "plan.yaml") -> Path:
        path = db_path.parent / name
        path.write_text(
            f"id: p\nresources:\n  inv: {{kind: database, engine: sqlite, location: {db_path.name},"
            f" synchronous: normal{settings}}}\nsteps:\n{steps}",
            encoding="utf-8",
        )
        return path

    return write


def _run(runtime: Runtime, path: Path) -> PlanResult:
    return runtime.run(runtime.load(path))


def _idle(runtime: Runtime) -> None:
    """Check the runtime's database handler holds no plan and lends no connection."""
    stats = runtime.handlers["database"].stats()
    assert stats["active_plans"] == 0
    assert stats["open_connections"] == stats["idle_connections"]


def test_a_tool_asking_for_an_unknown_resource_fails_its_step(
    runtime: Runtime, write_plan: Callable[..., Path], db_path: Path, rows: Any, tools: _Tools
) -> None:
    path = write_plan(
        "  - {id: seed, resource: inv, sql: \"INSERT INTO t VALUES ('seed')\"}\n"
        "  - {id: bad, tool: use_unknown}\n"
        "  - {id: later, resource: inv, sql: \"INSERT INTO t VALUES ('later')\"}\n"
    )
    result = _run(runtime, path)
    assert result.status == "failed"
    assert result.failed_step == "bad"
    assert result.error == "plan 'p' has no resource 'nope' (known: inv)"
    assert [s.status for s in result.steps] == ["passed", "failed", "not run"]
    assert rows(db_path, "SELECT v FROM t") == []
    assert tools.events == ["failed p: ToolError"]
    _idle(runtime)


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("SELECT 1 UNION ALL SELECT 2", "one row with one value, got [(1,), (2,)]"),
        ("SELECT 1, 2", "one row with one value, got [(1, 2)]"),
        ("SELECT 1 WHERE 0", "one row with one value, got []"),
        ("SELECT 3", "expect: got 3, expected 0"),
    ],
)
def test_expect_needs_exactly_one_matching_value(
    runtime: Runtime,
    write_plan: Callable[..., Path],
    db_path: Path,
    rows: Any,
    query: str,
    error: str,
) -> None:
    path = write_plan(
        "  - {id: seed, resource: inv, sql: \"INSERT INTO t VALUES ('seed')\"}\n"
        f"  - {{id: check, resource: inv, expect: {{sql: '{query}', equals: 0}}}}\n"
    )
    result = _run(runtime, path)
    assert result.status == "failed"
    assert result.failed_step == "check"
    assert result.error is not None
    assert result.error.endswith(error)
    assert rows(db_path, "SELECT v FROM t") == []
    _idle(runtime)


def test_retry_rolls_back_to_the_checkpoint_between_attempts(
    runtime: Runtime, write_plan: Callable[..., Path], db_path: Path, rows: Any, tools: _Tools
) -> None:
    path = write_plan(
        "  - {id: seed, resource: inv, sql: \"INSERT INTO t VALUES ('seed')\"}\n"
        "  - {id: flaky, tool: flaky, retry: 3, with: {succeed_on: 3}}\n"
    )
    result = _run(runtime, path)
    assert result.status == "completed", result.error
    assert result.steps[1].attempts == 3
    assert sorted(rows(db_path, "SELECT v FROM t")) == [("flaky attempt 3",), ("seed",)]
    assert tools.events == ["completed p"]
    _idle(runtime)


def test_a_step_failing_every_retry_rolls_the_whole_plan_back(
    runtime: Runtime, write_plan: Callable[..., Path], db_path: Path, rows: Any
) -> None:
    path = write_plan(
        "  - {id: seed, resource: inv, sql: \"INSERT INTO t VALUES ('seed')\"}\n"
        "  - {id: doomed, tool: always_fails, retry: 2}\n"
    )
    result = _run(runtime, path)
    assert result.status == "failed"
    assert result.steps[1].attempts == 3
    assert result.error == "ValueError: never works"
    assert rows(db_path, "SELECT v FROM t") == []
    _idle(runtime)


def test_a_failing_sql_step_is_retried_then_fails(
    runtime: Runtime, write_plan: Callable[..., Path], db_path: Path, rows: Any
) -> None:
    path = write_plan(
        "  - {id: seed, resource: inv, sql: \"INSERT INTO t VALUES ('seed')\"}\n"
        "  - {id: bad, resource: inv, sql: 'INSERT INTO missing VALUES (1)', retry: 1}\n"
    )
    result = _run(runtime, path)
    assert result.status == "failed"
    assert result.steps[1].attempts == 2
    assert result.error == "sqlite3.OperationalError: no such table: missing"
    assert rows(db_path, "SELECT v FROM t") == []
    _idle(runtime)


def test_interrupt_stops_the_plan_before_its_next_step(
    runtime: Runtime, write_plan: Callable[..., Path], db_path: Path, rows: Any, tools: _Tools
) -> None:
    path = write_plan(
        "  - {id: stop, tool: interrupt_then}\n"
        "  - {id: never, resource: inv, sql: \"INSERT INTO t VALUES ('never')\"}\n"
    )
    result = _run(runtime, path)
    assert result.status == "failed"
    assert result.error == "SIGTERM"
    assert [s.status for s in result.steps] == ["passed", "not run"]
    assert rows(db_path, "SELECT v FROM t") == []
    assert tools.events == ["failed p: Interrupted"]
    _idle(runtime)


def test_interrupt_during_a_retry_does_not_retry(
    runtime: Runtime, write_plan: Callable[..., Path], db_path: Path, rows: Any
) -> None:
    path = write_plan("  - {id: stop, tool: interrupt_then, retry: 3, with: {fail: true}}\n")
    result = _run(runtime, path)
    assert result.status == "failed"
    assert result.steps[0].attempts == 1
    assert result.error == "SIGTERM"
    assert rows(db_path, "SELECT v FROM t") == []
    _idle(runtime)


@pytest.mark.parametrize("kind", ["sql", "tool"])
def test_interrupt_stops_a_running_statement(
    runtime: Runtime,
    write_plan: Callable[..., Path],
    db_path: Path,
    rows: Any,
    tools: _Tools,
    kind: str,
) -> None:
    if kind == "tool":
        path = write_plan("  - {id: long, tool: long_query}\n")
    else:
        path = write_plan(
            "  - {id: seed, resource: inv, sql: \"INSERT INTO t VALUES ('seed')\"}\n"
            f"  - {{id: long, resource: inv, sql: '{_LONG_QUERY}'}}\n"
        )
        real_execute = runtime.handler("database").execute  # type: ignore[attr-defined]

        def execute(*args: Any, **kwargs: Any) -> Any:
            if args[2] == _LONG_QUERY:
                tools.started.set()
            return real_execute(*args, **kwargs)

        runtime.handler("database").execute = execute  # type: ignore[attr-defined]
    plan = runtime.load(path)
    results: list[PlanResult] = []
    worker = threading.Thread(target=lambda: results.append(runtime.run(plan)))
    worker.start()
    assert tools.started.wait(10)
    # An interrupt that lands just before the statement starts is lost (sqlite3
    # interrupts only running statements), so keep interrupting, as a user would.
    for _ in range(300):
        runtime.interrupt("SIGINT")
        worker.join(0.1)
        if not worker.is_alive():
            break
    assert not worker.is_alive()
    (result,) = results
    assert result.status == "failed"
    assert result.error == "SIGINT during step 'long'"
    assert rows(db_path, "SELECT v FROM t") == []
    _idle(runtime)


def test_a_broken_subscriber_does_not_fail_a_completed_plan(
    runtime: Runtime, write_plan: Callable[..., Path], db_path: Path, rows: Any, tools: _Tools
) -> None:
    tools.fail_on = "completed"
    path = write_plan("  - {id: seed, resource: inv, sql: \"INSERT INTO t VALUES ('kept')\"}\n")
    result = _run(runtime, path)
    assert result.status == "completed"
    assert [str(e) for e in result.subscriber_errors] == [
        "test-tools raised on cleveragents_plan_completed: RuntimeError: subscriber broke on "
        "completed"
    ]
    assert result.to_json()["subscriber_errors"] == [str(result.subscriber_errors[0])]
    assert rows(db_path, "SELECT v FROM t") == [("kept",)]


def test_a_tool_missing_at_run_time_fails_its_step(runtime: Runtime) -> None:
    plan = Plan(id="ghostly", steps=[Step(id="a", tool="ghost")])
    result = runtime.run(plan)
    assert result.status == "failed"
    assert result.error == "tool 'ghost' is not registered"
    assert result.to_json()["steps"] == [
        {
            "id": "a",
            "status": "failed",
            "attempts": 1,
            "duration_ms": result.to_json()["steps"][0]["duration_ms"],
            "error": "tool 'ghost' is not registered",
        }
    ]


def test_handlers_are_made_once_per_kind_and_refused_after_close(tools: _Tools) -> None:
    pm = get_plugin_manager(load_entry_points=False)
    runtime = Runtime(plugin_manager=pm)
    handler = runtime.handler("database")
    assert runtime.handler("database") is handler
    assert runtime.handlers == {"database": handler}
    assert pm.get_plugin("cleveragents-handler-database") is handler
    with pytest.raises(ResourceError, match="no plugin serves resource kind 'queue'"):
        runtime.handler("queue")
    runtime.close()
    runtime.close()
    assert pm.get_plugin("cleveragents-handler-database") is None
    with pytest.raises(ResourceError, match="the runtime is closed"):
        runtime.handler("database")


class _NoSql(FakeHandler):
    """A resource kind that cannot run SQL."""

    kind = "nosql"


def test_sql_on_a_kind_that_cannot_run_it_fails_the_step() -> None:
    class Kinds:
        @hookimpl
        def cleveragents_register_resource_handlers(self, registry: ResourceRegistry) -> None:
            registry.add(_NoSql)

    pm = get_plugin_manager(load_entry_points=False)
    pm.register(Kinds(), name="kinds")
    plan = Plan(
        id="p",
        resources={"box": ResourceEntry(kind="nosql")},
        steps=[Step(id="a", resource="box", sql="SELECT 1")],
    )
    with Runtime(plugin_manager=pm) as runtime:
        result = runtime.run(plan)
        handler = runtime.handlers["nosql"]
        assert isinstance(handler, _NoSql)
    assert handler.log == ["handler rolled back p", "handler closed"]
    assert result.status == "failed"
    assert not result.completed
    assert result.error == "resource kind 'nosql' cannot run SQL"


def test_plans_run_one_after_another(runtime: Runtime, db_path: Path, rows: Any) -> None:
    plans = []
    for index in range(2):
        path = db_path.parent / f"seq{index}.yaml"
        path.write_text(
            f"id: s{index}\nresources:\n  inv: {{kind: database, engine: sqlite, "
            f"location: {db_path.name}}}\nsteps:\n"
            f"  - {{id: a, resource: inv, sql: \"INSERT INTO t VALUES ('s{index}')\"}}\n",
            encoding="utf-8",
        )
        plans.append(runtime.load(path))
    results = runtime.run_many(plans, parallel=4)  # parallel, but...
    assert all(result.completed for result in results)
    results = runtime.run_many(plans[:1], parallel=1)  # ...and one at a time
    assert [result.plan for result in results] == ["s0"]
    assert sorted(rows(db_path, "SELECT v FROM t")) == [("s0",), ("s0",), ("s1",)]


def test_plans_run_in_parallel_share_one_handler(
    runtime: Runtime, db_path: Path, rows: Any
) -> None:
    plans = []
    for index in range(6):
        path = db_path.parent / f"p{index}.yaml"
        path.write_text(
            f"id: p{index}\nresources:\n  inv: {{kind: database, engine: sqlite, "
            f"location: {db_path.name}}}\nsteps:\n"
            f"  - {{id: a, resource: inv, sql: \"INSERT INTO t VALUES ('p{index}')\"}}\n"
            f"  - {{id: b, resource: inv, expect: {{sql: 'SELECT {index} % 2', equals: 0}}}}\n",
            encoding="utf-8",
        )
        plans.append(runtime.load(path))
    results = runtime.run_many(plans, parallel=3)
    assert [r.status for r in results] == ["completed", "failed"] * 3
    assert sorted(rows(db_path, "SELECT v FROM t")) == [("p0",), ("p2",), ("p4",)]
    assert runtime.handlers["database"].stats()["open_connections"] <= 4
    _idle(runtime)


def test_a_tool_raising_system_exit_still_ends_its_plan(
    runtime: Runtime, tools: _Tools, write_plan: Callable[..., Path], db_path: Path, rows: Any
) -> None:
    plan = runtime.load(write_plan("  - {id: bail, tool: exits}\n"))

    with pytest.raises(SystemExit) as raised:
        runtime.run(plan)

    assert raised.value.code == 3
    assert tools.events == ["failed p: SystemExit"]
    _idle(runtime)  # rolled back, connection and write turn given back
    assert rows(db_path, "SELECT count(*) FROM t") == [(0,)]
    # The next plan on the same file is not kept waiting for the write turn.
    again = _run(
        runtime, write_plan("  - {id: s, sql: \"INSERT INTO t VALUES ('next')\", resource: inv}\n")
    )
    assert again.completed, again.error


# -- plan ids: one transaction per plan, never shared ----------------------------------------


def test_run_many_refuses_two_plans_with_one_id_and_runs_none(
    runtime: Runtime, write_plan: Callable[..., Path], db_path: Path, rows: Any, tools: _Tools
) -> None:
    first = write_plan("  - {id: a, resource: inv, sql: \"INSERT INTO t VALUES ('a')\"}\n")
    second = write_plan(
        "  - {id: b, resource: inv, sql: \"INSERT INTO t VALUES ('b')\"}\n", name="again.yaml"
    )
    plans = [runtime.load(first), runtime.load(second)]
    for parallel in (1, 2):
        with pytest.raises(PlanError) as raised:
            runtime.run_many(plans, parallel=parallel)
        assert [str(problem) for problem in raised.value.problems] == [
            f"{second}:1: id: plan id 'p' is also the id of {first}:1; "
            "plans run together need different ids"
        ]
    assert tools.events == []  # not even started
    assert runtime.handlers == {}  # no resource was touched
    assert rows(db_path, "SELECT v FROM t") == []


def test_run_many_names_plans_made_in_code_by_their_place() -> None:
    plan = Plan(id="same", steps=[Step(id="a", tool="x")])
    other = plan.model_copy(update={"source": "other.yaml"})
    pm = get_plugin_manager(load_entry_points=False)
    with Runtime(plugin_manager=pm) as runtime, pytest.raises(PlanError) as raised:
        runtime.run_many([plan, plan, other])
    assert [str(problem) for problem in raised.value.problems] == [
        "plans[1]: id: plan id 'same' is also the id of plans[0]; "
        "plans run together need different ids",
        "other.yaml: id: plan id 'same' is also the id of plans[0]; "
        "plans run together need different ids",
    ]


def test_a_plan_is_refused_while_one_with_its_id_runs(
    runtime: Runtime, write_plan: Callable[..., Path], db_path: Path, rows: Any, tools: _Tools
) -> None:
    plan = runtime.load(write_plan("  - {id: w, tool: wait_for_go}\n"))
    results: list[PlanResult] = []
    worker = threading.Thread(target=lambda: results.append(runtime.run(plan)))
    worker.start()
    try:
        assert tools.started.wait(10)
        with pytest.raises(PlanError, match="already running in this runtime"):
            runtime.run(plan)
    finally:
        tools.go.set()
        worker.join(10)
    assert [result.status for result in results] == ["completed"]
    assert rows(db_path, "SELECT v FROM t") == [("p ran",)]
    assert runtime.run(plan).completed  # once it ended, the id is free again
    _idle(runtime)


# -- what became of the work: committed, rolled back, or partly committed --------------------


def test_a_result_names_what_was_committed(
    runtime: Runtime, write_plan: Callable[..., Path]
) -> None:
    good = _run(
        runtime, write_plan("  - {id: a, resource: inv, sql: \"INSERT INTO t VALUES ('a')\"}\n")
    )
    assert (good.outcome, good.committed) == ("committed", ["inv"])
    assert good.to_json()["outcome"] == "committed"
    assert good.to_json()["committed"] == ["inv"]
    bad = _run(runtime, write_plan("  - {id: doomed, tool: always_fails}\n"))
    assert (bad.outcome, bad.committed) == ("rolled_back", [])


def test_a_commit_failing_on_the_second_database_is_reported_as_a_partial_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: Any, tools: _Tools
) -> None:
    for name in ("first", "second"):
        make_table(tmp_path / f"{name}.db")
    path = tmp_path / "two.yaml"
    path.write_text(
        "id: two\nresources:\n"
        "  first: {kind: database, engine: sqlite, location: first.db}\n"
        "  second: {kind: database, engine: sqlite, location: second.db}\n"
        "steps:\n"
        "  - {id: a, resource: first, sql: \"INSERT INTO t VALUES ('first')\"}\n"
        "  - {id: b, resource: second, sql: \"INSERT INTO t VALUES ('second')\"}\n",
        encoding="utf-8",
    )
    real_commit = SQLiteEngine.commit

    def commit(engine: SQLiteEngine, conn: Any) -> None:
        if conn.execute("PRAGMA database_list").fetchone()[2].endswith("second.db"):
            raise sqlite3.OperationalError("disk I/O error")
        real_commit(engine, conn)

    monkeypatch.setattr(SQLiteEngine, "commit", commit)
    pm = get_plugin_manager(load_entry_points=False)
    pm.register(tools, name="test-tools")
    with Runtime(plugin_manager=pm) as runtime:
        result = runtime.run(runtime.load(path))
    assert result.status == "failed"
    assert (result.outcome, result.committed) == ("partial_commit", ["first"])
    assert result.error is not None and "['first'] were committed" in result.error
    line = result.to_json()
    assert (line["status"], line["outcome"], line["committed"]) == (
        "failed",
        "partial_commit",
        ["first"],
    )
    assert tools.events == ["failed two: PartialCommitError"]
    assert rows(tmp_path / "first.db", "SELECT v FROM t") == [("first",)]
    assert rows(tmp_path / "second.db", "SELECT v FROM t") == []


# -- a handler error poisons the plan, even when a tool hides it -----------------------------


def test_a_tool_that_hides_expiry_and_reconnects_fails_its_plan(
    runtime: Runtime, write_plan: Callable[..., Path], db_path: Path, rows: Any, tools: _Tools
) -> None:
    path = write_plan("  - {id: slow, tool: outlive_ttl}\n", settings=", checkpoint_ttl: 0.2")
    result = _run(runtime, path)
    assert result.status == "failed"
    assert result.outcome == "rolled_back"
    assert result.failed_step == "slow"
    assert result.error is not None and "the reaper rolled it back" in result.error
    # Asking again raised the same error: no fresh transaction was opened.
    assert [type(error) for error in tools.hidden] == [CheckpointExpiredError] * 2
    assert tools.hidden[0] is tools.hidden[1]
    assert tools.events == ["failed p: CheckpointExpiredError"]
    assert rows(db_path, "SELECT v FROM t") == []
    _idle(runtime)


def test_after_a_hidden_handler_error_no_later_step_runs_and_no_retry(
    runtime: Runtime, write_plan: Callable[..., Path], db_path: Path, rows: Any, tools: _Tools
) -> None:
    path = write_plan(
        "  - {id: slow, tool: outlive_ttl, retry: 2, with: {then: raise}}\n"
        "  - {id: later, resource: inv, sql: \"INSERT INTO t VALUES ('later')\"}\n",
        settings=", checkpoint_ttl: 0.2",
    )
    result = _run(runtime, path)
    assert result.status == "failed"
    assert result.failed_step == "slow"
    assert result.steps[0].attempts == 1  # never retried: the plan's work is gone
    assert result.steps[0].error == "ValueError: gave up"
    assert result.error is not None and "the reaper rolled it back" in result.error
    assert [step.status for step in result.steps] == ["failed", "not run"]
    assert rows(db_path, "SELECT v FROM t") == []
    _idle(runtime)


def test_a_step_after_a_tool_that_swallowed_the_error_does_not_commit_alone(
    runtime: Runtime, write_plan: Callable[..., Path], db_path: Path, rows: Any, tools: _Tools
) -> None:
    path = write_plan(
        "  - {id: slow, tool: outlive_ttl}\n"
        "  - {id: later, resource: inv, sql: \"INSERT INTO t VALUES ('later')\"}\n",
        settings=", checkpoint_ttl: 0.2",
    )
    result = _run(runtime, path)
    assert result.status == "failed"
    assert result.failed_step == "later"
    assert [step.status for step in result.steps] == ["passed", "failed"]
    assert rows(db_path, "SELECT v FROM t") == []
    _idle(runtime)


def test_a_tool_that_hides_a_busy_database_and_reconnects_fails_its_plan(
    runtime: Runtime, db_path: Path, rows: Any, tools: _Tools
) -> None:
    other_path = db_path.parent / "other.db"
    make_table(other_path)
    path = db_path.parent / "busy.yaml"
    path.write_text(
        "id: p\nresources:\n"
        f"  inv: {{kind: database, engine: sqlite, location: {db_path.name}}}\n"
        "  other: {kind: database, engine: sqlite, location: other.db, busy_timeout: 0.1}\n"
        "steps:\n"
        "  - {id: seed, resource: inv, sql: \"INSERT INTO t VALUES ('seed')\"}\n"
        "  - {id: hold, tool: hold_and_reconnect}\n",
        encoding="utf-8",
    )
    plan = runtime.load(path)
    handler = runtime.handler("database")
    other = Resource(name="other", kind="database", engine="sqlite", location=str(other_path))
    handler.create_checkpoint(other, "someone-else", "holding")  # holds other.db's write turn
    result = runtime.run(plan)
    assert result.status == "failed"
    assert result.failed_step == "hold"
    assert [type(error) for error in tools.hidden] == [ResourceBusyError] * 2
    assert tools.events == ["failed p: ResourceBusyError"]
    assert rows(db_path, "SELECT v FROM t") == []
    assert rows(other_path, "SELECT v FROM t") == []
    _idle(runtime)


def test_an_sql_step_after_the_plan_expired_fails_it(
    runtime: Runtime, write_plan: Callable[..., Path], db_path: Path, rows: Any, tools: _Tools
) -> None:
    path = write_plan(
        "  - {id: slow, tool: outlive_ttl, with: {then: return}}\n"
        "  - {id: later, resource: inv, sql: \"INSERT INTO t VALUES ('later')\"}\n"
        "  - {id: last, resource: inv, sql: \"INSERT INTO t VALUES ('last')\"}\n",
        settings=", checkpoint_ttl: 0.2",
    )
    result = _run(runtime, path)
    assert result.status == "failed"
    assert result.failed_step == "later"
    assert result.steps[1].attempts == 1
    assert result.error is not None and "the reaper rolled it back" in result.error
    assert [step.status for step in result.steps] == ["passed", "failed", "not run"]
    assert rows(db_path, "SELECT v FROM t") == []
    _idle(runtime)


def test_a_checkpoint_the_handler_cannot_take_fails_the_plan(
    runtime: Runtime, write_plan: Callable[..., Path], db_path: Path, rows: Any, tools: _Tools
) -> None:
    path = write_plan(
        "  - {id: careful, resource: inv, checkpoint: true, sql: \"INSERT INTO t VALUES ('a')\"}\n",
        settings=", busy_timeout: 0.1",
    )
    handler = runtime.handler("database")
    holder = Resource(name="holder", kind="database", engine="sqlite", location=str(db_path))
    handler.create_checkpoint(holder, "someone-else", "holding")  # holds the write turn
    try:
        result = _run(runtime, path)
    finally:
        handler.rollback_plan("someone-else")
    assert result.status == "failed"
    assert result.failed_step == "careful"
    assert result.steps[0].attempts == 0  # the step itself never ran
    assert tools.events == ["failed p: ResourceBusyError"]
    assert rows(db_path, "SELECT v FROM t") == []
    _idle(runtime)


class _Box(ResourceHandler):
    """A resource kind whose lent "connection" is a list, and whose block can fail on leaving."""

    kind = "box"

    def __init__(self) -> None:
        self.pending: dict[str, list[str]] = {}
        self.committed: list[str] = []
        self.lent = 0

    @classmethod
    def validate_settings(cls, resource: Resource) -> Any:
        return None

    @contextmanager
    def connection(self, resource: Resource, plan_id: str) -> Iterator[list[str]]:
        self.lent += 1
        yield self.pending.setdefault(plan_id, [])
        raise ResourceError("the plan's transaction ended under it", plan_id=plan_id)

    def create_checkpoint(self, resource: Resource, plan_id: str, checkpoint_id: str) -> Any:
        raise NotImplementedError

    def rollback_to(self, resource: Resource, plan_id: str, checkpoint_id: str) -> None:
        raise NotImplementedError

    def release_plan(self, plan_id: str) -> None:
        self.committed += self.pending.pop(plan_id, [])

    def rollback_plan(self, plan_id: str) -> None:
        self.pending.pop(plan_id, None)

    def close(self) -> None:
        """Nothing to free."""


@pytest.mark.parametrize("inside", [None, CheckpointEvictedError("evicted")])
def test_a_handler_error_leaving_the_connection_block_poisons_the_plan(
    inside: BaseException | None,
) -> None:
    hidden: list[BaseException] = []

    class Plugin:
        @hookimpl
        def cleveragents_register_resource_handlers(self, registry: ResourceRegistry) -> None:
            registry.add(_Box)

        @hookimpl
        def cleveragents_register_tools(self, registry: ToolRegistry) -> None:
            registry.add("pack", pack)

    def pack(ctx: ToolContext) -> None:
        for _ in range(2):
            try:
                with ctx.connection("box") as box:
                    box.append("apple")
                    if inside is not None:
                        raise inside
            except CleverAgentsError as exc:
                hidden.append(exc)

    pm = get_plugin_manager(load_entry_points=False)
    pm.register(Plugin(), name="box-plugin")
    plan = Plan(
        id="p",
        resources={"box": ResourceEntry(kind="box")},
        steps=[Step(id="pack", tool="pack")],
    )
    with Runtime(plugin_manager=pm) as runtime:
        result = runtime.run(plan)
        box = runtime.handlers["box"]
    assert isinstance(box, _Box)
    assert result.status == "failed"
    assert result.failed_step == "pack"
    first = inside or hidden[0]
    assert result.error == str(first)
    assert hidden == [first, first]  # asking again raised it again, lending nothing
    assert box.lent == 1
    assert box.committed == []
