"""Ctrl-C while a plan is being ended: nothing is orphaned, nothing is misreported.

A KeyboardInterrupt can land anywhere in ``release_plan``: while it waits for
one of the plan's connections that another thread is using (the plan must go
back to the table untouched), or just after one database's COMMIT returned
(the caller must learn exactly what was committed). Issues 10 (item 8) and 14
(item 5).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cleveragents.errors import PartialCommitError
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import ENGINES, DatabaseResourceHandler

from .conftest import Database


@pytest.fixture
def ctrl_c() -> Iterator[Callable[[], None]]:
    """Return a function that sends SIGINT to the main thread, as Ctrl-C does."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    main = threading.main_thread().ident
    assert main is not None
    yield lambda: signal.pthread_kill(main, signal.SIGINT)
    signal.signal(signal.SIGINT, previous)


class _AnnouncingLock:
    """Stands in for a lease's lock: tells when the main thread starts waiting for it.

    The main thread waits in short slices of the real lock's wait: a signal
    that arrives just before a blocking lock wait begins is handled without
    waking it (CPython runs the handler only once the wait ends), so a single
    Ctrl-C could otherwise be missed. Between slices it always lands.
    """

    def __init__(self, real: Any) -> None:
        self._real = real
        self.main_waits = threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if blocking and timeout == -1 and threading.current_thread() is threading.main_thread():
            self.main_waits.set()
            while not self._real.acquire(True, 0.01):
                pass
            return True
        return bool(self._real.acquire(blocking, timeout))

    def release(self) -> None:
        self._real.release()

    def _is_owned(self) -> bool:
        return bool(self._real._is_owned())


def _announce_waits_for(
    handler: DatabaseResourceHandler, plan_id: str, index: int
) -> _AnnouncingLock:
    """Put an :class:`_AnnouncingLock` on the plan's *index*-th lease (in first-use order)."""
    plan = handler._plans.get(plan_id)
    assert plan is not None
    lease = list(plan.leases.values())[index]
    lease.lock = _AnnouncingLock(lease.lock)
    return lease.lock


def _release_interrupted_while_a_tool_holds(
    handler: DatabaseResourceHandler,
    second: Resource,
    lock: _AnnouncingLock,
    ctrl_c: Callable[[], None],
) -> None:
    """Call release_plan("p") while another thread sits in a block of p; Ctrl-C it."""
    inside, leave = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def tool() -> None:  # another thread of the plan, inside a connection() block
        try:
            with handler.connection(second, "p") as conn:
                conn.execute("INSERT INTO t VALUES ('inside')")
                inside.set()
                assert leave.wait(30)
        except BaseException as exc:
            errors.append(exc)

    def press_ctrl_c() -> None:
        if lock.main_waits.wait(30):
            ctrl_c()

    user = threading.Thread(target=tool)
    user.start()
    assert inside.wait(10)
    presser = threading.Thread(target=press_ctrl_c)
    presser.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            handler.release_plan("p")  # waits for the tool's block; Ctrl-C lands
    finally:
        leave.set()
        presser.join(10)
        user.join(10)
    assert errors == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("then", ["rollback_plan", "release_plan"])
def test_ctrl_c_while_release_waits_for_a_busy_connection_puts_the_plan_back(
    handler: DatabaseResourceHandler,
    make_db: Callable[[str], Database],
    ctrl_c: Callable[[], None],
    then: str,
) -> None:
    first_db, second_db = make_db("first"), make_db("second")
    first = first_db.resource("first", busy_timeout="500ms")
    second = second_db.resource("second", busy_timeout="500ms")
    handler.execute(first, "p", "INSERT INTO t VALUES ('first')")
    handler.execute(second, "p", "INSERT INTO t VALUES ('second')")
    lock = _announce_waits_for(handler, "p", 1)
    _release_interrupted_while_a_tool_holds(handler, second, lock, ctrl_c)

    # The plan went back to the table untouched: nothing committed, all still open...
    assert first_db.rows() == []
    assert second_db.rows() == []
    assert handler.stats().active_plans == 1
    # ...so ending it again does all of it.
    getattr(handler, then)("p")
    if then == "release_plan":
        assert first_db.rows() == ["first"]
        assert second_db.rows() == ["inside", "second"]
    else:
        assert first_db.rows() == []
        assert second_db.rows() == []
    stats = handler.stats()
    assert (stats.active_plans, stats.open_connections) == (0, stats.idle_connections)
    # Its write turns were given back: later writers are not busy (busy_timeout 500ms).
    handler.execute(first, "later", "INSERT INTO t VALUES ('later')")
    handler.execute(second, "later", "INSERT INTO t VALUES ('later')")
    handler.release_plan("later")
    assert "later" in first_db.rows()
    assert "later" in second_db.rows()
    handler.close()
    assert handler.stats().open_connections == 0


def test_ctrl_c_just_after_the_first_commit_is_a_partial_commit(
    handler: DatabaseResourceHandler,
    make_db: Callable[[str], Database],
    engine: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first_db, second_db = make_db("first"), make_db("second")
    first, second = first_db.resource("first"), second_db.resource("second")
    handler.execute(first, "p", "INSERT INTO t VALUES ('first')")
    handler.execute(second, "p", "INSERT INTO t VALUES ('second')")
    engine_class = ENGINES[engine]
    real_commit = engine_class.commit
    commits: list[Any] = []

    def commit_then_ctrl_c(self: Any, conn: Any) -> None:
        real_commit(self, conn)
        commits.append(conn)
        if len(commits) == 1:
            raise KeyboardInterrupt  # lands just after the COMMIT returned

    monkeypatch.setattr(engine_class, "commit", commit_then_ctrl_c)
    raised: BaseException | None = None
    try:
        handler.release_plan("p")
    except BaseException as exc:  # a KeyboardInterrupt here would be the bug
        raised = exc
    monkeypatch.undo()

    assert type(raised) is PartialCommitError, repr(raised)
    assert raised.committed == ["first"]
    assert raised.plan_id == "p"
    assert isinstance(raised.__cause__, KeyboardInterrupt)
    assert len(commits) == 1  # the second database was never committed...
    assert first_db.rows() == ["first"]
    assert second_db.rows() == []  # ...but rolled back
    stats = handler.stats()
    assert (stats.active_plans, stats.open_connections) == (0, stats.idle_connections)
    handler.rollback_plan("p")  # nothing is left to end
    assert first_db.rows() == ["first"]
