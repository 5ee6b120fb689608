"""interrupt(): stops the statements plans run, from any thread and from a signal handler."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest

from cleveragents.resource.handlers.database import DatabaseResourceHandler

from .conftest import Database

# Run in a child process: a deadlock there fails the test instead of hanging it.
_SIGNAL_UNDER_THE_MUTEX = textwrap.dedent(
    """
    import os, signal, sys
    from cleveragents.resource import Resource
    from cleveragents.resource.handlers.database import DatabaseResourceHandler, HandlerStats

    engine, where = sys.argv[1], os.environ["HANDLER_TEST_DATABASE"]
    key = "location" if engine == "sqlite" else "dsn"
    resource = Resource("db", "database", engine=engine, **{key: where})
    handler = DatabaseResourceHandler()
    handler.execute(resource, "p", "INSERT INTO t VALUES ('x')")
    handled = []

    def on_signal(signum, frame):  # what the CLI's SIGINT/SIGTERM handler does
        handler.interrupt()
        handled.append(signum)

    def raise_signal_under_the_mutex(frame, event, arg):
        # stats() builds its HandlerStats while it holds the handler's mutex:
        # the signal lands there, and its handler runs in this very thread.
        if event == "call" and frame.f_code is HandlerStats.__init__.__code__:
            signal.raise_signal(signal.SIGUSR1)

    signal.signal(signal.SIGUSR1, on_signal)
    sys.setprofile(raise_signal_under_the_mutex)
    handler.stats()
    sys.setprofile(None)
    assert handled == [signal.SIGUSR1], handled
    handler.rollback_plan("p")
    handler.close()
    print("interrupt() returned under the mutex")
    """
)


def test_interrupt_from_a_signal_handler_while_the_thread_holds_the_mutex(
    db: Database, engine: str
) -> None:
    """Issue 10 item 9: the old interrupt() took the handler's lock and hung for good."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _SIGNAL_UNDER_THE_MUTEX, engine],
            env={**os.environ, "HANDLER_TEST_DATABASE": db.where},  # a DSN stays out of argv
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("interrupt() called from a signal handler deadlocked the process")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["interrupt() returned under the mutex"]
    assert db.rows() == []


# Read-only statements that never end on their own.
_ENDLESS_READ = {
    "sqlite": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 100000000) "
    "SELECT count(*) FROM c",
    "postgresql": "SELECT pg_sleep(600)",
}


def test_interrupt_stops_statements_of_every_plan(
    handler: DatabaseResourceHandler, db: Database, engine: str
) -> None:
    resource = db.resource()
    handler.interrupt()  # nothing running: harmless
    started = threading.Event()
    errors: list[BaseException] = []

    def long_statement() -> None:
        with handler.connection(resource, "p1") as conn:
            conn.execute("INSERT INTO t VALUES ('x')")
            started.set()
            try:
                conn.execute(_ENDLESS_READ[engine]).fetchall()
            except Exception as exc:
                errors.append(exc)

    worker = threading.Thread(target=long_statement)
    worker.start()
    assert started.wait(10)
    while worker.is_alive():  # an interrupt before the statement starts is lost
        handler.interrupt()
        worker.join(0.05)
    if engine == "sqlite":
        assert [str(error) for error in errors] == ["interrupted"]
    else:
        assert [type(error).__name__ for error in errors] == ["QueryCanceled"]
    handler.rollback_plan("p1")
    assert handler.stats().active_plans == 0
    assert db.rows() == []
