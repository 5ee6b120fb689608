"""PlanCheckpointer: LangGraph's checkpoints in the plan's own database, inside its transaction.

Three tables, made by :meth:`PlanCheckpointer.setup` (or on first use):

* ``langgraph_checkpoints``: one row per checkpoint, without its channel values;
* ``langgraph_blobs``: one row per channel value and version, so a channel that
  did not change is not written again at the next step;
* ``langgraph_writes``: the pending writes of each checkpoint's tasks.

Every statement goes through the handler (``execute``, ``connection``,
``release_plan``, ``rollback_plan``): during a PlanGraph invocation on the
invocation's plan, otherwise as a short plan of its own that commits at once.
On SQLite those short plans read with ``lock: deferred``, so they never wait
for an invocation holding the file's write lock.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import functools
import json
import secrets
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, TypeVar, final

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    get_checkpoint_id,
    get_serializable_checkpoint_metadata,
    writes_sort_key,
)
from langgraph.checkpoint.serde.base import SerializerProtocol
from langgraph.checkpoint.serde.types import INTERRUPT
from pydantic import ValidationError

from cleveragents.integrations.langgraph._invocation import find_run
from cleveragents.integrations.langgraph._store import TABLES, Execute, _Store
from cleveragents.resource.base import Resource
from cleveragents.resource.handlers.database import ENGINES, DatabaseResourceHandler

T = TypeVar("T")

# Statements stay far below both engines' limits on bound parameters.
_ROWS_PER_INSERT = 200
_PAGE = 100

_CHECKPOINT_COLUMNS = "checkpoint_id, parent_checkpoint_id, type, checkpoint, metadata"
_SELECT_CHECKPOINT = (
    f"SELECT {_CHECKPOINT_COLUMNS} FROM langgraph_checkpoints "
    "WHERE thread_id = ? AND checkpoint_ns = ? AND checkpoint_id = ?"
)
_SELECT_LATEST = (
    f"SELECT {_CHECKPOINT_COLUMNS} FROM langgraph_checkpoints "
    "WHERE thread_id = ? AND checkpoint_ns = ? ORDER BY checkpoint_id DESC LIMIT 1"
)
# One round trip for a checkpoint's pending writes and its channel values.
_SELECT_WRITES = (
    "SELECT 'w', task_id, channel, type, value, task_path, idx FROM langgraph_writes "
    "WHERE thread_id = ? AND checkpoint_ns = ? AND checkpoint_id = ?"
)
_SELECT_BLOBS = (
    " UNION ALL SELECT 'b', NULL, channel, type, value, version, NULL FROM langgraph_blobs "
    "WHERE thread_id = ? AND checkpoint_ns = ? AND (channel, version) IN (VALUES {pairs})"
)
_UPSERT_CHECKPOINT = (
    "INSERT INTO langgraph_checkpoints (thread_id, checkpoint_ns, checkpoint_id, "
    "parent_checkpoint_id, type, checkpoint, metadata) VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id) DO UPDATE SET "
    "parent_checkpoint_id = excluded.parent_checkpoint_id, type = excluded.type, "
    "checkpoint = excluded.checkpoint, metadata = excluded.metadata"
)
_INSERT_BLOBS = (
    "INSERT INTO langgraph_blobs (thread_id, checkpoint_ns, channel, version, type, value) "
    "VALUES {rows} ON CONFLICT (thread_id, checkpoint_ns, channel, version) DO NOTHING"
)
_INSERT_WRITES = (
    "INSERT INTO langgraph_writes (thread_id, checkpoint_ns, checkpoint_id, task_id, "
    "task_path, idx, channel, type, value) VALUES {rows} "
    "ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id, task_id, idx) "
)
# A task's special writes (error, interrupt...) replace the earlier ones; regular
# writes are kept as first written, so that a retried task does not duplicate them.
_REPLACE = "DO UPDATE SET channel = excluded.channel, type = excluded.type, value = excluded.value"
_KEEP = "DO NOTHING"


def _values(row_width: int, rows: int) -> str:
    one = "(" + ", ".join("?" * row_width) + ")"
    return ", ".join([one] * rows)


def _chunks(rows: Sequence[tuple[Any, ...]]) -> Iterator[Sequence[tuple[Any, ...]]]:
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        yield rows[start : start + _ROWS_PER_INSERT]


def _flat(rows: Sequence[tuple[Any, ...]]) -> builtins.list[Any]:
    return [value for row in rows for value in row]


@dataclasses.dataclass(slots=True)
class _Listing:
    """Where a ``list()`` stands: its filters, the last row it returned, how many are left."""

    where: builtins.list[str]
    params: builtins.list[Any]
    filter: dict[str, Any] | None
    remaining: int | None
    after: tuple[str, str, str] | None = None

    def page_query(self) -> tuple[str, builtins.list[Any]]:
        where, params = builtins.list(self.where), builtins.list(self.params)
        if self.after is not None:
            where.append("(checkpoint_id, thread_id, checkpoint_ns) < (?, ?, ?)")
            params.extend(self.after)
        size = _PAGE if self.filter or self.remaining is None else min(self.remaining, _PAGE)
        sql = (
            "SELECT thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id, type, "
            "checkpoint, metadata FROM langgraph_checkpoints"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY checkpoint_id DESC, thread_id DESC, checkpoint_ns DESC LIMIT ?"
        )
        return sql, [*params, size]


@final
class PlanCheckpointer(BaseCheckpointSaver[str]):
    """A LangGraph checkpointer whose tables live in a plan's database.

    Run the graph through :class:`PlanGraph` and each invocation's checkpoints
    are written inside the invocation's plan, so they commit or roll back
    together with what its tools wrote. Used on its own (``get_state``,
    ``get_state_history``, a plain ``graph.invoke``) it is an ordinary
    checkpointer: each call is a short plan of its own.

    :param handler: the database handler that owns every connection.
    :param resource: the database that holds the checkpoint tables.
    :param resources: more databases that plan tools and nodes may use (by name).
    :param serde: LangGraph's serializer for checkpoints and channel values.
    """

    def __init__(
        self,
        handler: DatabaseResourceHandler,
        resource: Resource,
        *,
        resources: Sequence[Resource] = (),
        serde: SerializerProtocol | None = None,
    ) -> None:
        super().__init__(serde=serde)
        if not isinstance(handler, DatabaseResourceHandler):
            raise TypeError(f"PlanCheckpointer needs a DatabaseResourceHandler, got {handler!r}")
        if isinstance(resources, Resource):
            raise TypeError("resources must be a list of Resource objects, not one Resource")
        names: set[str] = set()
        for item in (resource, *resources):
            if not isinstance(item, Resource) or item.kind != DatabaseResourceHandler.kind:
                raise TypeError(f"PlanCheckpointer needs database resources, got {item!r}")
            if item.name in names:
                raise ValueError(f"two resources are called {item.name!r}; names must differ")
            names.add(item.name)
            try:
                settings = DatabaseResourceHandler.validate_settings(item)
            except ValidationError as exc:
                first = exc.errors()[0]
                # The first part of the location is the engine's tag: not a field.
                loc = [str(part) for part in first["loc"] if part not in ENGINES]
                field = ".".join(loc) or "settings"
                raise ValueError(f"resource {item.name!r}: {field}: {first['msg']}") from None
            if item is resource:
                engine = str(settings.engine)
        self._store = _Store(handler, resource, resources, engine)

    def __repr__(self) -> str:
        return f"<PlanCheckpointer on {self._store.resource.name!r}>"

    @property
    def handler(self) -> DatabaseResourceHandler:
        """The handler that owns the connections."""
        return self._store.handler

    @property
    def resource(self) -> Resource:
        """The database that holds the checkpoint tables."""
        return self._store.resource

    @property
    def resources(self) -> tuple[Resource, ...]:
        """Every database of an invocation: the checkpointer's first, then the tools' ones."""
        return self._store.resources

    def setup(self) -> None:
        """Create ``langgraph_checkpoints``, ``langgraph_blobs`` and ``langgraph_writes``.

        Done on first use too; calling it again does nothing.
        """
        self._store.ensure_setup()

    def _use(
        self, operation: Callable[[Execute], T], config: RunnableConfig | None, *, write: bool
    ) -> T:
        """Run *operation* on the invocation's plan (found by *config* or context), or alone."""
        store = self._store
        store.ensure_setup()
        run = find_run(config, RuntimeError)
        if run is not None and run.store.same_database(store):
            return run.on_plan(operation, write=write)
        return store.short_plan(operation, write=write)

    # -- reads ---------------------------------------------------------------------

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """Return the checkpoint *config* names (or the thread's latest), or ``None``."""
        return self._use(functools.partial(self._get_tuple, config), config, write=False)

    def _get_tuple(self, config: RunnableConfig, execute: Execute) -> CheckpointTuple | None:
        configurable = config["configurable"]
        thread_id = str(configurable["thread_id"])
        namespace = str(configurable.get("checkpoint_ns", ""))
        checkpoint_id = get_checkpoint_id(config)
        if checkpoint_id:
            rows = execute(_SELECT_CHECKPOINT, (thread_id, namespace, checkpoint_id))
        else:
            rows = execute(_SELECT_LATEST, (thread_id, namespace))
        if not rows:
            return None
        return self._load(execute, thread_id, namespace, rows[0])

    def _load(
        self, execute: Execute, thread_id: str, namespace: str, row: tuple[Any, ...]
    ) -> CheckpointTuple:
        """Build the tuple of checkpoint *row* (id, parent, type, checkpoint, metadata)."""
        checkpoint_id, parent_id, type_, data, metadata = row
        checkpoint: Checkpoint = self.serde.loads_typed((type_, bytes(data)))
        versions = checkpoint.get("channel_versions") or {}
        sql, params = _SELECT_WRITES, [thread_id, namespace, checkpoint_id]
        if versions:
            sql += _SELECT_BLOBS.format(pairs=_values(2, len(versions)))
            params += [thread_id, namespace]
            params += _flat([(channel, str(version)) for channel, version in versions.items()])
        values: dict[str, Any] = {}
        writes: builtins.list[tuple[tuple[str, str, int], str, str, Any]] = []
        for kind, task_id, channel, kind_of_value, value, path, idx in execute(sql, params):
            if kind == "b":
                if kind_of_value != "empty":
                    values[channel] = self.serde.loads_typed((kind_of_value, bytes(value)))
            else:
                loaded = self.serde.loads_typed((kind_of_value, bytes(value)))
                writes.append((writes_sort_key(path, task_id, idx), task_id, channel, loaded))
        writes.sort(key=lambda write: write[0])
        checkpoint["channel_values"] = values

        def config_of(checkpoint_id: str) -> RunnableConfig:
            return {
                "configurable": {
                    "thread_id": thread_id,
                    "checkpoint_ns": namespace,
                    "checkpoint_id": checkpoint_id,
                }
            }

        return CheckpointTuple(
            config=config_of(checkpoint_id),
            checkpoint=checkpoint,
            metadata=json.loads(metadata),
            parent_config=config_of(parent_id) if parent_id else None,
            pending_writes=[(task_id, channel, value) for _, task_id, channel, value in writes],
        )

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        """Yield the checkpoints that match, newest first.

        Read a page at a time, each page a short read of its own, so a listing
        left half-read holds nothing open.
        """
        listing = _listing(config, filter, before, limit)
        while True:
            page, done = self._use(functools.partial(self._page, listing), config, write=False)
            yield from page
            if done:
                return

    def _page(
        self, listing: _Listing, execute: Execute
    ) -> tuple[builtins.list[CheckpointTuple], bool]:
        if listing.remaining == 0:
            return [], True
        sql, params = listing.page_query()
        rows = execute(sql, params)
        found: builtins.list[CheckpointTuple] = []
        for thread_id, namespace, checkpoint_id, parent_id, type_, data, metadata in rows:
            listing.after = (checkpoint_id, thread_id, namespace)
            wanted = listing.filter
            if wanted and not _matches(json.loads(metadata), wanted):
                continue
            row = (checkpoint_id, parent_id, type_, data, metadata)
            found.append(self._load(execute, thread_id, namespace, row))
            if listing.remaining is not None:
                listing.remaining -= 1
                if listing.remaining == 0:
                    return found, True
        return found, len(rows) < params[-1]

    # -- writes --------------------------------------------------------------------

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Store *checkpoint*, and the values of the channels in *new_versions*."""
        configurable = config["configurable"]
        thread_id = str(configurable["thread_id"])
        namespace = str(configurable.get("checkpoint_ns", ""))
        values = checkpoint.get("channel_values", {})
        stored = {key: value for key, value in checkpoint.items() if key != "channel_values"}
        type_, data = self.serde.dumps_typed(stored)
        blobs = [
            (thread_id, namespace, channel, str(version), *self._dump_value(values, channel))
            for channel, version in new_versions.items()
        ]
        row = (
            thread_id,
            namespace,
            checkpoint["id"],
            configurable.get("checkpoint_id"),
            type_,
            data,
            json.dumps(get_serializable_checkpoint_metadata(config, metadata), ensure_ascii=False),
        )

        def write(execute: Execute) -> None:
            for chunk in _chunks(blobs):
                execute(_INSERT_BLOBS.format(rows=_values(6, len(chunk))), _flat(chunk))
            execute(_UPSERT_CHECKPOINT, row)

        self._use(write, config, write=True)
        return {
            "configurable": {
                "thread_id": thread_id,
                "checkpoint_ns": namespace,
                "checkpoint_id": checkpoint["id"],
            }
        }

    def _dump_value(self, values: dict[str, Any], channel: str) -> tuple[str, bytes | None]:
        if channel not in values:
            return "empty", None  # the channel was cleared at this version
        return self.serde.dumps_typed(values[channel])

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Store a task's pending *writes* for the checkpoint *config* names."""
        if not writes:
            return
        configurable = config["configurable"]
        head = (
            str(configurable["thread_id"]),
            str(configurable.get("checkpoint_ns", "")),
            str(configurable["checkpoint_id"]),
            task_id,
            task_path,
        )
        rows = [
            (*head, WRITES_IDX_MAP.get(channel, idx), channel, *self.serde.dumps_typed(value))
            for idx, (channel, value) in enumerate(writes)
        ]
        special = all(channel in WRITES_IDX_MAP for channel, _ in writes)
        conflict = _REPLACE if special else _KEEP

        def write(execute: Execute) -> None:
            for chunk in _chunks(rows):
                execute(_INSERT_WRITES.format(rows=_values(9, len(chunk))) + conflict, _flat(chunk))

        self._use(write, config, write=True)
        if any(channel == INTERRUPT for channel, _ in writes):
            run = find_run(config, RuntimeError)
            if run is not None and run.store.same_database(self._store):
                run.note_interrupt(task_id)

    def delete_thread(self, thread_id: str) -> None:
        """Delete every checkpoint, channel value and pending write of *thread_id*."""

        def write(execute: Execute) -> None:
            for table in TABLES:
                execute(f"DELETE FROM {table} WHERE thread_id = ?", (str(thread_id),))

        self._use(write, None, write=True)

    def get_next_version(self, current: str | None, channel: None) -> str:
        """Return the version after *current*: increasing, and unique to this write.

        The random part keeps two branches of one thread (after time travel)
        from sharing a channel value row that only one of them wrote.
        """
        if current is None:
            number = 0
        elif isinstance(current, int):
            number = current
        else:
            number = int(str(current).split(".", 1)[0])
        return f"{number + 1:032}.{secrets.token_hex(8)}"

    # -- async twins (the same work, off the event loop) ------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """Awaitable :meth:`get_tuple`."""
        return await asyncio.to_thread(self.get_tuple, config)

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        """Async :meth:`list`."""
        listing = _listing(config, filter, before, limit)
        while True:
            page, done = await asyncio.to_thread(
                self._use, functools.partial(self._page, listing), config, write=False
            )
            for item in page:
                yield item
            if done:
                return

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Awaitable :meth:`put`."""
        return await asyncio.to_thread(self.put, config, checkpoint, metadata, new_versions)

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Awaitable :meth:`put_writes`."""
        await asyncio.to_thread(self.put_writes, config, writes, task_id, task_path)

    async def adelete_thread(self, thread_id: str) -> None:
        """Awaitable :meth:`delete_thread`."""
        await asyncio.to_thread(self.delete_thread, thread_id)


def _listing(
    config: RunnableConfig | None,
    filter: dict[str, Any] | None,
    before: RunnableConfig | None,
    limit: int | None,
) -> _Listing:
    where: builtins.list[str] = []
    params: builtins.list[Any] = []
    if config is not None:
        configurable = config.get("configurable") or {}
        if configurable.get("thread_id") is not None:
            where.append("thread_id = ?")
            params.append(str(configurable["thread_id"]))
        if configurable.get("checkpoint_ns") is not None:
            where.append("checkpoint_ns = ?")
            params.append(str(configurable["checkpoint_ns"]))
        if checkpoint_id := get_checkpoint_id(config):
            where.append("checkpoint_id = ?")
            params.append(checkpoint_id)
    if before is not None and (before_id := get_checkpoint_id(before)):
        where.append("checkpoint_id < ?")
        params.append(before_id)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must not be negative, got {limit}")
    return _Listing(where, params, filter or None, limit)


def _matches(metadata: dict[str, Any], wanted: dict[str, Any]) -> bool:
    return all(key in metadata and metadata[key] == value for key, value in wanted.items())


__all__ = ["TABLES", "PlanCheckpointer"]
