"""Steps that write plan files and run them with a Runtime (the Python API)."""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

import cleveragents_example_report
from bdd_support import (
    RecordingSubscriber,
    database_resource,
    path_in_workdir,
    split_names,
    wait_until,
)
from behave import given, step, then, when

from cleveragents import PlanResult, Runtime, hookimpl
from cleveragents.plugins import get_plugin_manager
from cleveragents.tools import ToolContext, ToolRegistry


class BddTools:
    """An in-test plugin: the tools the feature files call from their plans."""

    def __init__(self) -> None:
        self.readers: list[sqlite3.Connection] = []
        self.runtime: Runtime | None = None

    @hookimpl
    def cleveragents_register_tools(self, registry: ToolRegistry) -> None:
        registry.add("add_item_failing_before", self.add_item_failing_before)
        registry.add("hold_read_lock", self.hold_read_lock)
        registry.add("idle_until_reaped", self.idle_until_reaped)

    def add_item_failing_before(
        self, ctx: ToolContext, sku: str, passes_on: int, resource: str = "inventory"
    ) -> None:
        """Add "SKU-attempt-N", then fail unless this is attempt *passes_on* or later."""
        with ctx.connection(resource) as conn:
            conn.execute("INSERT INTO items (sku) VALUES (?)", (f"{sku}-attempt-{ctx.attempt}",))
        if ctx.attempt < passes_on:
            raise RuntimeError(f"attempt {ctx.attempt} of step {ctx.step_id!r} fails on purpose")

    def hold_read_lock(self, ctx: ToolContext, resource: str) -> None:
        """Have another program open a read transaction on the resource's file, and keep it."""
        with ctx.connection(resource) as conn:
            path = next(row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main")
        reader = sqlite3.connect(path, isolation_level=None)
        self.readers.append(reader)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM items").fetchone()

    def idle_until_reaped(self, ctx: ToolContext, resource: str = "inventory") -> None:
        """Sit idle (holding no connection) until the reaper rolled a plan back, then write."""
        assert self.runtime is not None
        handler = self.runtime.handler("database")
        wait_until(lambda: handler.stats()["reaped"] > 0, "the reaper to roll a plan back")
        with ctx.connection(resource) as conn:
            conn.execute("INSERT INTO items (sku) VALUES (?)", (f"late-{ctx.attempt}",))

    def close(self) -> None:
        """Close the other program's connections."""
        for reader in self.readers:
            reader.close()


def _start_runtime(context: Any, plugin_manager: Any = None) -> None:
    context.runtime = Runtime(plugin_manager=plugin_manager)
    context.closables.append(context.runtime)
    context.results = {}


# -- runtimes -----------------------------------------------------------------


@given("a runtime")
def step_runtime(context: Any) -> None:
    _start_runtime(context)


@given("a runtime with the in-test tools plugin")
def step_runtime_with_test_tools(context: Any) -> None:
    tools = BddTools()
    context.add_cleanup(tools.close)
    pm = get_plugin_manager()
    pm.register(tools, name="bdd-tools")
    context.recorders = {"recorder": RecordingSubscriber()}
    pm.register(context.recorders["recorder"], name="recorder")
    _start_runtime(context, pm)
    tools.runtime = context.runtime


@given('a runtime whose subscribers are "{first}", the example plugin and "{last}", in that order')
def step_runtime_with_recorders(context: Any, first: str, last: str) -> None:
    pm = get_plugin_manager(load_entry_points=False)
    context.recorders = {first: RecordingSubscriber(first), last: RecordingSubscriber(last)}
    pm.register(context.recorders[first], name=first)
    pm.register(cleveragents_example_report, name="example_report")
    pm.register(context.recorders[last], name=last)
    _start_runtime(context, pm)


# -- the environment ----------------------------------------------------------


@given('the environment variable "{name}" is "{value}"')
def step_set_environment(context: Any, name: str, value: str) -> None:
    previous = os.environ.get(name)

    def restore() -> None:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous

    context.add_cleanup(restore)
    os.environ[name] = value


@given('the example plugin logs its events to "{filename}"')
def step_example_event_log(context: Any, filename: str) -> None:
    step_set_environment(
        context, "CLEVERAGENTS_EXAMPLE_EVENTS", str(path_in_workdir(context, filename))
    )


@when('the event log "{filename}" shows that plan "{plan}" started')
def step_wait_for_started(context: Any, filename: str, plan: str) -> None:
    path = path_in_workdir(context, filename)

    def started() -> bool:
        if not path.exists():
            return False
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        return any(line["event"] == "started" and line["plan"] == plan for line in lines)

    wait_until(started, f"plan {plan!r} to start")


@then('the event log "{filename}" has the events "{events}" for plan "{plan}"')
def step_check_event_log(context: Any, filename: str, events: str, plan: str) -> None:
    path = path_in_workdir(context, filename)
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    found = [line["event"] for line in lines if line["plan"] == plan]
    assert found == split_names(events), f"{filename} has {lines}"


# -- plan files and running them ----------------------------------------------


@given('the plan file "{filename}":')
def step_plan_file(context: Any, filename: str) -> None:
    assert context.text, "give the plan as a doc string"
    path_in_workdir(context, filename).write_text(context.text + "\n", encoding="utf-8")


@given('an empty plan file "{filename}"')
def step_empty_plan_file(context: Any, filename: str) -> None:
    path_in_workdir(context, filename).write_text("", encoding="utf-8")


@given('a folder "{name}"')
def step_make_folder(context: Any, name: str) -> None:
    path_in_workdir(context, name).mkdir()


@given('a file "{filename}" that is not UTF-8 text')
def step_latin1_file(context: Any, filename: str) -> None:
    path_in_workdir(context, filename).write_bytes("id: café\n".encode("latin-1"))


@then('there is no file "{name}"')
def step_check_no_file(context: Any, name: str) -> None:
    path = path_in_workdir(context, name)
    assert not path.exists(), f"{path} exists"


@when('the runtime runs "{filenames}"')
def step_runtime_runs(context: Any, filenames: str) -> None:
    for filename in split_names(filenames):
        plan = context.runtime.load(path_in_workdir(context, filename))
        result: PlanResult = context.runtime.run(plan)
        context.results[result.plan] = result


@when('the runtime runs "{filenames}", {parallel:d} at a time')
def step_runtime_runs_parallel(context: Any, filenames: str, parallel: int) -> None:
    plans = [context.runtime.load(path_in_workdir(context, f)) for f in split_names(filenames)]
    for result in context.runtime.run_many(plans, parallel=parallel):
        context.results[result.plan] = result


@given('plan "{plan}" of the runtime adds item "{sku}" to "{filename}"')
def step_runtime_plan_adds_item(context: Any, plan: str, sku: str, filename: str) -> None:
    resource = database_resource(context, "inventory", filename)
    with context.runtime.handler("database").connection(resource, plan_id=plan) as conn:
        conn.execute("INSERT INTO items (sku) VALUES (?)", (sku,))


@step('plan "{plan}" of the runtime is released')
def step_runtime_plan_released(context: Any, plan: str) -> None:
    context.runtime.handler("database").release_plan(plan)


def _result(context: Any, plan: str) -> PlanResult:
    assert plan in context.results, f"no plan {plan!r} ran; ran {sorted(context.results)}"
    result: PlanResult = context.results[plan]
    return result


@then('plan "{plan}" completed')
def step_plan_completed(context: Any, plan: str) -> None:
    result = _result(context, plan)
    assert result.status == "completed", result
    assert result.failed_step is None, result


@then('plan "{plan}" failed at step "{step_id}"')
def step_plan_failed_at(context: Any, plan: str, step_id: str) -> None:
    result = _result(context, plan)
    assert result.status == "failed", result
    assert result.failed_step == step_id, result


@then('plan "{plan}" failed without a failed step')
def step_plan_failed_after_steps(context: Any, plan: str) -> None:
    result = _result(context, plan)
    assert result.status == "failed", result
    assert result.failed_step is None, result
    assert all(step.status == "passed" for step in result.steps), result


@then('the error of plan "{plan}" mentions "{text}"')
def step_plan_error_mentions(context: Any, plan: str, text: str) -> None:
    error = _result(context, plan).error
    assert error is not None and text in error, error


@then('step "{step_id}" of plan "{plan}" {status} after {attempts:d} attempts')
def step_check_step_attempts(
    context: Any, step_id: str, plan: str, status: str, attempts: int
) -> None:
    (found,) = [step for step in _result(context, plan).steps if step.id == step_id]
    assert (found.status, found.attempts) == (status, attempts), found


@then('plan "{plan}" reports a subscriber error mentioning "{text}"')
def step_check_subscriber_error(context: Any, plan: str, text: str) -> None:
    errors = [str(error) for error in _result(context, plan).subscriber_errors]
    assert any(text in error for error in errors), errors


@then('subscriber "{name}" was told "{events}" for plan "{plan}"')
def step_check_recorded_events(context: Any, name: str, events: str, plan: str) -> None:
    found = context.recorders[name].events_of(plan)
    assert found == split_names(events), found


@then("no file was created in the scenario's folder but the plans")
def step_check_no_database_files(context: Any) -> None:
    found = sorted(p.name for p in path_in_workdir(context, ".").iterdir())
    assert all(name.endswith(".yaml") for name in found), found


@then('no file was created in the scenario\'s folder but "{filename}"')
def step_check_only_file(context: Any, filename: str) -> None:
    found = sorted(p.name for p in path_in_workdir(context, ".").iterdir())
    assert all(name.startswith(filename) for name in found), found
