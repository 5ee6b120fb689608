"""Faults injected at the engine seam, and the checks that follow them, for every engine.

Used by the engine-parametrized contract suite (tests/handler/test_faults.py)
and the SQLite-only faults (tests/test_handler_faults.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import pytest

from cleveragents.errors import ResourceError
from cleveragents.resource.handlers.database import ENGINES, DatabaseResourceHandler


def make_driver_error(engine: str, message: str, *, busy: bool = False) -> BaseException:
    """Return an error of *engine*'s driver: an I/O failure, or a lock wait (*busy*)."""
    if engine == "sqlite":
        return sqlite3.OperationalError("database is locked" if busy else message)
    errors = pytest.importorskip("psycopg").errors
    return errors.LockNotAvailable(message) if busy else errors.DiskFull(message)


class EngineFaults:
    """Make methods of an engine class fail on demand; counts the failures it caused."""

    def __init__(self, engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self._engine = engine
        self._class = ENGINES[engine]
        self._monkeypatch = monkeypatch
        self.raised: list[str] = []

    def error(self, message: str) -> BaseException:
        return make_driver_error(self._engine, message)

    def fail(
        self,
        method: str,
        error: BaseException | None = None,
        *,
        when: Callable[..., bool] = lambda *args: True,
        after_real_call: bool = False,
    ) -> None:
        """Make ``<Engine>.<method>`` raise *error* whenever ``when(*args)`` holds."""
        real = getattr(self._class, method)
        raised = self.raised
        failure = error or self.error(f"disk I/O error in {method}")

        def failing(engine: Any, *args: Any, **kwargs: Any) -> Any:
            if not when(*args):
                return real(engine, *args, **kwargs)
            if after_real_call:
                real(engine, *args, **kwargs)
            raised.append(method)
            raise failure

        self._monkeypatch.setattr(self._class, method, failing)

    def restore(self) -> None:
        self._monkeypatch.undo()


def nothing_lent(handler: DatabaseResourceHandler, *, plans: int = 0) -> None:
    """Check that *plans* plans are open and no connection is lent to a plan that is not."""
    stats = handler.stats()
    assert stats.active_plans == plans
    if plans == 0:
        assert stats.open_connections == stats.idle_connections
        assert stats.checkpoints == 0


def error_context(error: BaseException) -> tuple[Any, ...]:
    """Return what a handler error names: plan, checkpoint, resource and operation."""
    assert isinstance(error, ResourceError)
    return (error.plan_id, error.checkpoint_id, error.resource, error.operation)
