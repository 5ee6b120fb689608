"""Steps about a handler's life: closing, being forgotten, forking, the interpreter exiting."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
import warnings
import weakref
from typing import Any

from bdd_support import (
    EVENTUALLY_S,
    database_resource,
    path_in_workdir,
    wait_until,
)
from behave import given, then, when

from cleveragents.fds import count_fds
from cleveragents.resource.handlers.database import DatabaseResourceHandler

# -- file descriptors ---------------------------------------------------------


@given("the open file descriptors are counted")
def step_count_descriptors(context: Any) -> None:
    context.fd_baseline = count_fds()


@then("the open file descriptors are back to that count")
def step_descriptors_back(context: Any) -> None:
    # A connection is closed just after it stops being counted: allow a moment.
    wait_until(
        lambda: count_fds() <= context.fd_baseline,
        f"{count_fds()} descriptors to drop to {context.fd_baseline}",
    )


# -- closing ------------------------------------------------------------------


@when("the handler is closed")
def step_close_handler(context: Any) -> None:
    context.handler.close()


@when("the handler is closed twice")
def step_close_handler_twice(context: Any) -> None:
    context.handler.close()
    context.handler.close()


@when("the handler is closed from {count:d} threads at once")
def step_close_handler_concurrently(context: Any, count: int) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def close() -> None:
        try:
            start.wait(EVENTUALLY_S)
            context.handler.close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=close) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(EVENTUALLY_S)
    assert not any(thread.is_alive() for thread in threads), "close() did not return"
    assert errors == [], errors


@then("the handler is closed")
def step_check_handler_closed(context: Any) -> None:
    assert context.handler.is_closed


@when('plan "{plan}" adds item "{sku}" to "{resource}" inside a "with handler:" block')
def step_handler_as_context_manager(context: Any, plan: str, sku: str, resource: str) -> None:
    with (
        context.handler as handler,
        handler.connection(context.db_resources[resource], plan_id=plan) as conn,
    ):
        conn.execute("INSERT INTO items (sku) VALUES (?)", (sku,))


# -- a forgotten handler ------------------------------------------------------


@given('a handler named "{name}" that is never closed')
def step_forgotten_handler(context: Any, name: str) -> None:
    context.forgotten = DatabaseResourceHandler(name=name)
    context.forgotten_ref = weakref.ref(context.forgotten)


@given('on that handler, plan "{plan}" adds item "{sku}" to "{filename}"')
def step_forgotten_handler_plan(context: Any, plan: str, sku: str, filename: str) -> None:
    resource = database_resource(context, "inventory", filename)
    with context.forgotten.connection(resource, plan_id=plan) as conn:
        conn.execute("INSERT INTO items (sku) VALUES (?)", (sku,))


@given('on that handler, plan "{plan}" adds item "{sku}" to "{filename}" and is released')
def step_forgotten_handler_released(context: Any, plan: str, sku: str, filename: str) -> None:
    step_forgotten_handler_plan(context, plan, sku, filename)
    context.forgotten.release_plan(plan)


@given('on that handler, plan "{plan}" creates a table in an in-memory database')
def step_forgotten_handler_memory(context: Any, plan: str) -> None:
    resource = database_resource(context, "scratch", ":memory:")
    with context.forgotten.connection(resource, plan_id=plan) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")


@then('the reaper thread of "{name}" is running')
def step_check_reaper_running(context: Any, name: str) -> None:
    alive = [t.name for t in threading.enumerate() if t.name == f"cleveragents-reaper[{name}]"]
    assert alive, "the handler's reaper thread did not start"


@when("the last reference to that handler is dropped and the garbage collector runs")
def step_drop_forgotten_handler(context: Any) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del context.forgotten
        gc.collect()
    context.caught_warnings = list(caught)


@then('a ResourceWarning naming "{name}" was emitted')
def step_check_resource_warning(context: Any, name: str) -> None:
    found = [
        str(w.message) for w in context.caught_warnings if issubclass(w.category, ResourceWarning)
    ]
    assert any(repr(name) in message for message in found), found


@then("the forgotten handler is gone")
def step_check_forgotten_collected(context: Any) -> None:
    assert context.forgotten_ref() is None, gc.get_referrers(context.forgotten_ref())


@then('no reaper thread of "{name}" is running')
def step_check_no_reaper(context: Any, name: str) -> None:
    alive = [t.name for t in threading.enumerate() if t.name == f"cleveragents-reaper[{name}]"]
    assert alive == [], alive


# -- fork ---------------------------------------------------------------------

# Exit statuses of the forked child, so that the parent can say what went wrong.
_CHILD_OK = 0
_CHILD_NOT_EMPTY = 3
_CHILD_TOUCHED_PARENT = 4
_CHILD_FAILED = 5


def _child_work(
    handler: DatabaseResourceHandler, parent_plan: str, plan: str, sku: str, resource: Any
) -> int:
    """Run in the forked child: leave the parent's plan alone, run our own, close the handler."""
    if handler.stats().active_plans or handler.stats().open_connections:
        return _CHILD_NOT_EMPTY
    handler.release_plan(parent_plan)
    handler.rollback_plan(parent_plan)
    if handler.stats().commits or handler.stats().rollbacks:
        return _CHILD_TOUCHED_PARENT
    with handler.connection(resource, plan_id=plan) as conn:
        conn.execute("INSERT INTO items (sku) VALUES (?)", (sku,))
    handler.release_plan(plan)
    handler.close()
    return _CHILD_OK


@when(
    'the process forks and the child releases and rolls back plan "{parent_plan}", '
    'adds item "{sku}" to "{resource}" in plan "{plan}", releases it and closes the handler'
)
def step_fork_child_plan(
    context: Any, parent_plan: str, sku: str, resource: str, plan: str
) -> None:
    target = context.db_resources[resource]
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never return into behave
        status = _CHILD_FAILED
        try:
            status = _child_work(context.handler, parent_plan, plan, sku, target)
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    context.child_status = os.waitstatus_to_exitcode(status)


@then("the child exited with status {status:d}")
def step_check_child_status(context: Any, status: int) -> None:
    assert context.child_status == status, f"the child exited with {context.child_status}"


# -- the interpreter exiting --------------------------------------------------

_EXIT_PROGRAM = """
import sys
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler
from cleveragents.fds import count_fds

resource = Resource(name="inventory", kind="database", engine="sqlite", location=sys.argv[1])
handler = DatabaseResourceHandler()
with handler.connection(resource, plan_id="at-exit") as conn:
    conn.execute("INSERT INTO items (sku) VALUES (?)", (sys.argv[2],))
if sys.argv[3] == "released":
    handler.release_plan("at-exit")
print("exiting without close()")
"""


@when(
    'a Python program adds item "{sku}" to "{filename}" in a plan, leaves it {state}, '
    "and exits without closing the handler"
)
def step_program_exits(context: Any, sku: str, filename: str, state: str) -> None:
    assert state in ("released", "open"), state
    context.program = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(_EXIT_PROGRAM),
            str(path_in_workdir(context, filename)),
            sku,
            state,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@then("the program exited with status {status:d}")
def step_check_program_status(context: Any, status: int) -> None:
    result = context.program
    assert result.returncode == status, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
