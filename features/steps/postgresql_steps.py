"""Steps of the PostgreSQL feature: a fresh schema per scenario, rows checked on the server.

A scenario that needs a server starts with "Given a PostgreSQL test server
with a fresh schema". Without CLEVERAGENTS_TEST_PG_DSN it skips the scenario,
and says once how to get a server. Everything a scenario creates
(its schema, handlers, sessions) is removed through ``context.add_cleanup``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from behave import given, then, when

from cleveragents import errors
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler

DSN_VARIABLE = "CLEVERAGENTS_TEST_PG_DSN"
#: The variable the scenarios' plan files read their DSN from.
PLAN_DSN_VARIABLE = "CLEVERAGENTS_BDD_PG_DSN"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CLI = Path(sys.executable).with_name("cleveragents")
RUNTIME_NAME = f"cleveragents[{os.getpid()}]"
_SKIP_REASON = (
    f"PostgreSQL scenarios skipped: {DSN_VARIABLE} is not set; start a throwaway server with "
    'eval "$(scripts/pg-test-server start)"'
)
_told_skip = False


def _psycopg() -> Any:
    import psycopg

    return psycopg


def _admin(dsn: str) -> Any:
    """Open a separate autocommit session: the view of another program."""
    return _psycopg().connect(dsn, autocommit=True, connect_timeout=10)


def _folder(context: Any) -> Path:
    folder = getattr(context, "pg_folder", None)
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="cleveragents-bdd-pg-"))
        context.pg_folder = folder

        def remove() -> None:
            for path in sorted(folder.rglob("*"), reverse=True):
                path.unlink() if path.is_file() else path.rmdir()
            folder.rmdir()

        context.add_cleanup(remove)
    return folder


def _rows(context: Any, table: str = "t") -> list[Any]:
    with _admin(context.pg_dsn) as conn:
        return [row[0] for row in conn.execute(f"SELECT v FROM {table} ORDER BY v")]


def _snapshot(context: Any) -> dict[str, list[Any]]:
    """Return every table of the scenario's schema with its rows."""
    with _admin(context.pg_dsn) as conn:
        tables = [
            name
            for (name,) in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1"
            )
        ]
        return {
            name: conn.execute(f"SELECT * FROM {name} ORDER BY 1").fetchall() for name in tables
        }


def _wait_for(check: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


# -- the server ---------------------------------------------------------------------------


@given("a PostgreSQL test server with a fresh schema")
def step_pg_server_with_schema(context: Any) -> None:
    global _told_skip
    base = os.environ.get(DSN_VARIABLE)
    if not base:
        # behave logs the reason of a skip: give it once, so one line explains them all.
        context.scenario.skip(None if _told_skip else _SKIP_REASON)
        _told_skip = True
        return
    psycopg = _psycopg()
    schema = f"bdd_{uuid.uuid4().hex[:12]}"
    with _admin(base) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(f'CREATE TABLE "{schema}".t (v TEXT)')
        conn.execute(f'CREATE SEQUENCE "{schema}".tries')

    def drop() -> None:
        with _admin(base) as conn:
            # A scenario that failed half-way may have left a session holding locks.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE starts_with(application_name, %s)",
                (RUNTIME_NAME,),
            )
            conn.execute("SET lock_timeout = '20s'")
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')

    context.add_cleanup(drop)
    context.pg_dsn = psycopg.conninfo.make_conninfo(base, options=f"-c search_path={schema}")
    context.pg_password = psycopg.conninfo.conninfo_to_dict(base).get("password") or ""
    context.pg_run_dsn = context.pg_dsn
    assert context.pg_password, f"{DSN_VARIABLE} must carry a password for these scenarios"


@given("the password in the DSN is wrong")
def step_pg_wrong_password(context: Any) -> None:
    context.pg_run_dsn = context.pg_dsn.replace(context.pg_password, context.pg_password[::-1])
    assert context.pg_run_dsn != context.pg_dsn


@given("another session holds a lock on every row")
def step_pg_other_session_locks(context: Any) -> None:
    other = _admin(context.pg_dsn)
    context.add_cleanup(other.close)
    other.execute("INSERT INTO t VALUES ('seed')")
    other.execute("BEGIN")
    other.execute("UPDATE t SET v = v")
    context.pg_other = other


# -- plans through the handler --------------------------------------------------------------


def _keep(context: Any, handler: DatabaseResourceHandler) -> DatabaseResourceHandler:
    context.add_cleanup(handler.close)
    closables = getattr(context, "closables", None)
    if closables is not None:
        closables.append(handler)
    return handler


@given('a handler serving the PostgreSQL resource "{name}"')
def step_pg_handler(context: Any, name: str) -> None:
    step_pg_handler_bounded(context, name, 32)


@given('a handler serving the PostgreSQL resource "{name}" with at most {limit:d} connections')
def step_pg_handler_bounded(context: Any, name: str, limit: int) -> None:
    context.pg_handler = _keep(context, DatabaseResourceHandler(max_connections=limit))
    context.pg_limit = limit
    context.pg_resource = Resource(
        name, "database", engine="postgresql", dsn=context.pg_dsn, busy_timeout="300ms"
    )


def _attempt(context: Any, action: Any) -> None:
    context.pg_error = None
    try:
        action()
    except Exception as exc:
        context.pg_error = exc


@when('PostgreSQL plan "{plan}" writes "{value}"')
def step_pg_plan_writes(context: Any, plan: str, value: str) -> None:
    context.pg_handler.execute(context.pg_resource, plan, "INSERT INTO t VALUES (:v)", {"v": value})


@when('PostgreSQL plan "{plan}" tries to write "{value}"')
def step_pg_plan_tries_to_write(context: Any, plan: str, value: str) -> None:
    _attempt(context, lambda: step_pg_plan_writes(context, plan, value))


@when('PostgreSQL plan "{plan}" tries to change every row')
def step_pg_plan_tries_to_change(context: Any, plan: str) -> None:
    resource = context.pg_resource
    _attempt(context, lambda: context.pg_handler.execute(resource, plan, "UPDATE t SET v = 'x'"))
    context.pg_other.execute("ROLLBACK")
    context.pg_handler.rollback_plan(plan)


@when('PostgreSQL plan "{plan}" takes checkpoint "{label}"')
def step_pg_plan_checkpoint(context: Any, plan: str, label: str) -> None:
    context.pg_handler.create_checkpoint(context.pg_resource, plan, label)


@when('PostgreSQL plan "{plan}" rolls back to checkpoint "{label}"')
def step_pg_plan_rollback_to(context: Any, plan: str, label: str) -> None:
    context.pg_handler.rollback_to(context.pg_resource, plan, label)


@when('PostgreSQL plan "{plan}" runs a statement that fails')
def step_pg_plan_fails_statement(context: Any, plan: str) -> None:
    psycopg = _psycopg()
    try:
        context.pg_handler.execute(context.pg_resource, plan, "SELECT 1 / 0")
    except psycopg.errors.DivisionByZero:
        return
    raise AssertionError("the statement did not fail")


@then('PostgreSQL plan "{plan}" cannot write "{value}" until it rolls back')
def step_pg_plan_aborted(context: Any, plan: str, value: str) -> None:
    psycopg = _psycopg()
    try:
        step_pg_plan_writes(context, plan, value)
    except psycopg.errors.InFailedSqlTransaction:
        return
    raise AssertionError("the transaction was not aborted")


@when('PostgreSQL plan "{plan}" runs "{sql}"')
def step_pg_plan_runs(context: Any, plan: str, sql: str) -> None:
    context.pg_handler.execute(context.pg_resource, plan, sql)


@when('PostgreSQL plan "{plan}" tries to run a COMMIT after a comment ended by a carriage return')
def step_pg_plan_tries_cr_commit(context: Any, plan: str) -> None:
    sql = "SELECT 1 --\r; COMMIT; BEGIN"
    _attempt(context, lambda: context.pg_handler.execute(context.pg_resource, plan, sql))


@when('a tool of PostgreSQL plan "{plan}" commits straight through libpq')
def step_pg_tool_commits_through_libpq(context: Any, plan: str) -> None:
    with context.pg_handler.connection(context.pg_resource, plan) as conn:
        conn.pgconn.exec_(b"COMMIT")


@when('PostgreSQL plan "{plan}" is rolled back')
def step_pg_plan_rolled_back(context: Any, plan: str) -> None:
    context.pg_handler.rollback_plan(plan)


@when('PostgreSQL plan "{plan}" is released')
def step_pg_plan_released(context: Any, plan: str) -> None:
    context.pg_handler.release_plan(plan)


@then('releasing PostgreSQL plan "{plan}" fails with {name} mentioning "{text}"')
def step_pg_release_fails(context: Any, plan: str, name: str, text: str) -> None:
    _attempt(context, lambda: context.pg_handler.release_plan(plan))
    step_pg_call_failed(context, name)
    assert text in str(context.pg_error), context.pg_error


@when('the server ends the session of PostgreSQL plan "{plan}"')
def step_pg_server_ends_session(context: Any, plan: str) -> None:
    with context.pg_handler.connection(context.pg_resource, plan) as conn:
        pid = conn.info.backend_pid
    with _admin(context.pg_dsn) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        _wait_for(
            lambda: (
                admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
                ).fetchone()
                == (0,)
            ),
            "the session to end",
        )


@then("that call failed with {name}")
def step_pg_call_failed(context: Any, name: str) -> None:
    expected = getattr(errors, name)
    assert isinstance(context.pg_error, expected), repr(context.pg_error)


@when("{threads:d} threads each run {count:d} PostgreSQL plans, every second one rolled back")
def step_pg_concurrent_plans(context: Any, threads: int, count: int) -> None:
    handler, resource = context.pg_handler, context.pg_resource
    context.pg_errors = []
    context.pg_released = []
    context.pg_peak = 0
    done = threading.Event()

    def watch() -> None:
        with _admin(context.pg_dsn) as admin:
            while not done.is_set():
                (sessions,) = admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE starts_with(application_name, %s)",
                    (RUNTIME_NAME,),
                ).fetchone()
                context.pg_peak = max(context.pg_peak, sessions)
                time.sleep(0.005)

    def writer(thread: int) -> None:
        try:
            for n in range(count):
                plan = f"w{thread}-{n:02d}"
                handler.create_checkpoint(resource, plan, "start")
                handler.execute(resource, plan, "INSERT INTO t VALUES (:v)", {"v": plan})
                if n % 2:
                    handler.rollback_plan(plan)
                else:
                    handler.release_plan(plan)
                    context.pg_released.append(plan)
        except Exception as exc:
            context.pg_errors.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    workers = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    done.set()
    watcher.join(10)


@then("the server has exactly the rows of the released plans")
def step_pg_exact_rows(context: Any) -> None:
    assert context.pg_released, "no plan was released"
    assert _rows(context) == sorted(context.pg_released)


@then("no thread saw an error")
def step_pg_no_thread_errors(context: Any) -> None:
    assert context.pg_errors == [], context.pg_errors


@then("the server never had more than {limit:d} sessions of this process")
def step_pg_session_bound(context: Any, limit: int) -> None:
    assert 1 <= context.pg_peak <= limit, context.pg_peak


# -- plan files and commands -------------------------------------------------------------------


@given('the PostgreSQL plan file "{filename}":')
def step_pg_plan_file(context: Any, filename: str) -> None:
    (_folder(context) / filename).write_text(context.text)


@when('the PostgreSQL copy of the example "{name}" is run')
def step_pg_run_example(context: Any, name: str) -> None:
    text = (EXAMPLES / name).read_text()
    changed = re.sub(
        r"    engine: sqlite\n    location: [^\n]*\n",
        f'    engine: postgresql\n    dsn: "${{{PLAN_DSN_VARIABLE}}}"\n',
        text,
    )
    assert changed.count("engine: postgresql") == 1, f"{name} has no one SQLite resource"
    (_folder(context) / name).write_text(changed)
    context.pg_before = _snapshot(context)
    _run(context, ["run", "--json", name])


@when('"cleveragents {command}" is run against the server')
def step_pg_run_command_on_server(context: Any, command: str) -> None:
    args = [arg.replace("{dsn}", context.pg_run_dsn) for arg in shlex.split(command)]
    _run(context, args, {PLAN_DSN_VARIABLE: context.pg_run_dsn})


@when('"cleveragents {command}" is run')
def step_pg_run_command(context: Any, command: str) -> None:
    _run(context, shlex.split(command))


def _run(context: Any, args: list[str], extra_env: dict[str, str] | None = None) -> None:
    env = {**os.environ, **(extra_env or {})}
    if hasattr(context, "pg_run_dsn"):
        env.setdefault(PLAN_DSN_VARIABLE, context.pg_run_dsn)
    context.pg_result = subprocess.run(
        [str(CLI), *args],
        cwd=_folder(context),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@then("the run exited with status {status:d}")
def step_pg_run_status(context: Any, status: int) -> None:
    result = context.pg_result
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)


@then('its output mentions "{text}"')
def step_pg_output_mentions(context: Any, text: str) -> None:
    output = context.pg_result.stdout + context.pg_result.stderr
    assert text in output, output


@then('its output does not mention "{text}"')
def step_pg_output_does_not_mention(context: Any, text: str) -> None:
    output = context.pg_result.stdout + context.pg_result.stderr
    assert text not in output, output


@then("its output shows neither the DSN nor its password")
def step_pg_output_hides_dsn(context: Any) -> None:
    output = context.pg_result.stdout + context.pg_result.stderr
    password = psycopg_password(context.pg_run_dsn)
    for secret in (context.pg_run_dsn, context.pg_dsn, password, context.pg_password):
        assert secret not in output, "a secret was shown"


def psycopg_password(dsn: str) -> str:
    """Return the password in *dsn*."""
    return str(_psycopg().conninfo.conninfo_to_dict(dsn).get("password") or "")


@then("the stress report says the run was healthy with no errors")
def step_pg_stress_healthy(context: Any) -> None:
    report = json.loads(context.pg_result.stdout)
    assert report["engine"] == "postgresql"
    assert report["healthy"] is True, report
    assert report["errors"] == 0, report["error_examples"]
    assert report["integrity_ok"] is True
    assert report["plans_committed"] > 0


# -- what the server holds -------------------------------------------------------------------------


@then("the server's items are apple 12, pear 7 and plum 10")
def step_pg_items(context: Any) -> None:
    with _admin(context.pg_dsn) as conn:
        rows = conn.execute("SELECT sku, qty FROM items ORDER BY sku").fetchall()
    assert rows == [("apple", 12), ("pear", 7), ("plum", 10)], rows


@then("the server's schema is exactly as before that run")
def step_pg_schema_unchanged(context: Any) -> None:
    assert _snapshot(context) == context.pg_before


@then('the server\'s table "{table}" has {count:d} row')
def step_pg_table_rows(context: Any, table: str, count: int) -> None:
    with _admin(context.pg_dsn) as conn:
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (count,)


@then('the server has the rows "{values}"')
def step_pg_rows(context: Any, values: str) -> None:
    expected = sorted(value.strip() for value in values.split(","))
    assert _rows(context) == expected, _rows(context)


@then("the server has no rows")
def step_pg_no_rows(context: Any) -> None:
    assert _rows(context) == []
