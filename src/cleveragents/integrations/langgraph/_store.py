"""Where a PlanCheckpointer's tables live, and how it reaches them outside an invocation."""

from __future__ import annotations

import contextlib
import functools
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from cleveragents.errors import ResourceError
from cleveragents.resource.base import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler

T = TypeVar("T")
#: Runs one statement on a plan's connection and returns its rows.
Execute = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]

TABLES = ("langgraph_checkpoints", "langgraph_blobs", "langgraph_writes")
_DDL = (
    """CREATE TABLE IF NOT EXISTS langgraph_checkpoints (
        thread_id {key} NOT NULL,
        checkpoint_ns {key} NOT NULL,
        checkpoint_id {key} NOT NULL,
        parent_checkpoint_id TEXT,
        type TEXT NOT NULL,
        checkpoint {blob} NOT NULL,
        metadata TEXT NOT NULL,
        PRIMARY KEY (thread_id, checkpoint_ns, checkpoint_id)
    )""",
    """CREATE TABLE IF NOT EXISTS langgraph_blobs (
        thread_id TEXT NOT NULL,
        checkpoint_ns TEXT NOT NULL,
        channel TEXT NOT NULL,
        version TEXT NOT NULL,
        type TEXT NOT NULL,
        value {blob},
        PRIMARY KEY (thread_id, checkpoint_ns, channel, version)
    )""",
    """CREATE TABLE IF NOT EXISTS langgraph_writes (
        thread_id TEXT NOT NULL,
        checkpoint_ns TEXT NOT NULL,
        checkpoint_id TEXT NOT NULL,
        task_id TEXT NOT NULL,
        task_path TEXT NOT NULL,
        idx INTEGER NOT NULL,
        channel TEXT NOT NULL,
        type TEXT NOT NULL,
        value {blob},
        PRIMARY KEY (thread_id, checkpoint_ns, checkpoint_id, task_id, idx)
    )""",
)
# PostgreSQL compares the key columns byte by byte ("C"), as SQLite does: the
# newest checkpoint is the greatest id, whatever the server's locale.
_TYPES = {
    "sqlite": {"key": "TEXT", "blob": "BLOB"},
    "postgresql": {"key": 'TEXT COLLATE "C"', "blob": "BYTEA"},
}
_EXISTING = {
    "sqlite": "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN (?, ?, ?)",
    "postgresql": "SELECT count(to_regclass(name)) FROM unnest(ARRAY[?, ?, ?]) AS name",
}


class _Store:
    """What every copy of one PlanCheckpointer shares: the handler, its databases, its tables."""

    def __init__(
        self,
        handler: DatabaseResourceHandler,
        resource: Resource,
        resources: Sequence[Resource],
        engine: str,
    ) -> None:
        self.handler = handler
        self.resource = resource
        #: The checkpointer's database first, then the ones only tools use.
        self.resources = (resource, *resources)
        self.by_name = {item.name: item for item in self.resources}
        self.engine = engine
        # Reads outside an invocation must not wait for one that holds the
        # file's write lock: on SQLite they begin deferred (WAL readers never wait).
        self.reader = (
            Resource(resource.name, resource.kind, **{**resource.options, "lock": "deferred"})
            if engine == "sqlite"
            else resource
        )
        self._ready = False
        self._ready_lock = threading.Lock()

    def same_database(self, other: _Store) -> bool:
        return other is self or (other.handler is self.handler and other.resource == self.resource)

    def short_plan(self, operation: Callable[[Execute], T], *, write: bool) -> T:
        """Run *operation* as a plan of its own, committed as soon as it returns."""
        plan_id = f"langgraph-saver-{uuid.uuid4().hex[:12]}"
        resource = self.resource if write else self.reader
        execute: Execute = functools.partial(self.handler.execute, resource, plan_id)
        try:
            result = operation(execute)
        except BaseException:
            with contextlib.suppress(ResourceError):  # closed, expired: nothing is left open
                self.handler.rollback_plan(plan_id)
            raise
        self.handler.release_plan(plan_id)
        return result

    def ensure_setup(self) -> None:
        """Create the checkpoint tables unless they exist (looked up without the write lock)."""
        if self._ready:
            return
        with self._ready_lock:
            self._ready = self._ready or self._make_tables()

    def _make_tables(self) -> bool:
        if self.short_plan(self._tables_exist, write=False):
            return True
        try:
            self.short_plan(self._create_tables, write=True)
        except Exception:
            # Another process may have created them at the same moment.
            if not self.short_plan(self._tables_exist, write=False):
                raise
        return True

    def _tables_exist(self, execute: Execute) -> bool:
        ((count,),) = execute(_EXISTING[self.engine], TABLES)
        return bool(count == len(TABLES))

    def _create_tables(self, execute: Execute) -> None:
        for ddl in _DDL:
            execute(ddl.format(**_TYPES[self.engine]), ())


__all__ = ["TABLES", "Execute"]
