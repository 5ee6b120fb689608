"""A plan's life on one handler: lending, checkpoints, async twins, stats, fork, GC."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import threading
from collections.abc import Callable, Mapping

import pytest

from cleveragents.errors import CheckpointEvictedError, CheckpointNotFoundError
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler, HandlerStats

from .conftest import Database

MakeHandler = Callable[..., DatabaseResourceHandler]


def _insert(handler: DatabaseResourceHandler, resource: Resource, plan_id: str, value: str) -> None:
    with handler.connection(resource, plan_id) as conn:
        conn.execute(f"INSERT INTO t VALUES ('{value}')")


def _reaper_threads(handler: DatabaseResourceHandler) -> list[threading.Thread]:
    name = f"cleveragents-reaper[{handler.name}]"
    return [thread for thread in threading.enumerate() if thread.name == name]


def test_connection_lends_nothing_until_the_block_is_entered(
    handler: DatabaseResourceHandler, db: Database
) -> None:
    lending = handler.connection(db.resource(), "p1")
    assert handler.stats().active_plans == 0
    with lending as conn:
        assert handler.stats().active_plans == 1
        conn.execute("INSERT INTO t VALUES ('x')")
    handler.rollback_plan("p1")
    assert handler.stats().active_plans == 0
    assert db.rows() == []


def test_rollback_to_a_checkpoint_that_is_not_there(
    handler: DatabaseResourceHandler, db: Database
) -> None:
    resource = db.resource()
    with pytest.raises(CheckpointNotFoundError) as info:
        handler.rollback_to(resource, "never-started", "a")
    error = info.value
    assert isinstance(error, LookupError)
    assert (error.plan_id, error.checkpoint_id, error.resource, error.operation) == (
        "never-started",
        "a",
        "db",
        "rollback_to",
    )
    assert handler.stats().active_plans == 0
    handler.create_checkpoint(resource, "p1", "first")
    handler.create_checkpoint(resource, "p1", "second")
    handler.rollback_to(resource, "p1", "first")  # forgets "second"
    with pytest.raises(CheckpointNotFoundError):
        handler.rollback_to(resource, "p1", "second")
    assert handler.stats().checkpoints == 1
    handler.rollback_plan("p1")


def test_equal_resources_made_apart_share_the_plans_lease(
    handler: DatabaseResourceHandler, db: Database
) -> None:
    first = handler.create_checkpoint(db.resource("inv"), "p1", "a")
    second = handler.create_checkpoint(db.resource("inv"), "p1", "b")
    assert (first.depth, second.depth) == (1, 2)
    assert handler.stats().open_connections == 1
    handler.rollback_plan("p1")


def test_async_twins_do_what_their_sync_methods_do(
    handler: DatabaseResourceHandler, db: Database
) -> None:
    resource = db.resource()

    async def scenario() -> None:
        cp = await handler.acreate_checkpoint(resource, "kept", "start")
        assert (cp.plan_id, cp.checkpoint_id, cp.depth) == ("kept", "start", 1)
        await asyncio.to_thread(_insert, handler, resource, "kept", "undone")
        await handler.arollback_to(resource, "kept", "start")
        await asyncio.to_thread(_insert, handler, resource, "kept", "kept")
        await handler.arelease_plan("kept")
        await handler.acreate_checkpoint(resource, "dropped", "start")
        await asyncio.to_thread(_insert, handler, resource, "dropped", "dropped")
        await handler.arollback_plan("dropped")
        with pytest.raises(CheckpointNotFoundError):
            await handler.arollback_to(resource, "dropped", "start")

    asyncio.run(scenario())
    assert db.rows() == ["kept"]
    assert handler.stats().active_plans == 0


# -- stats --------------------------------------------------------------------------------


def test_handler_stats_reads_as_a_mapping(make_handler: MakeHandler, db: Database) -> None:
    resource = db.resource()
    with make_handler(max_connections=2) as handler:
        handler.create_checkpoint(resource, "p1", "first")
        handler.create_checkpoint(resource, "p1", "second")
        stats = handler.stats()
    assert isinstance(stats, Mapping)
    assert isinstance(stats, HandlerStats)
    assert stats["open_connections"] == stats.open_connections == 1
    assert stats["active_plans"] == 1
    assert stats["checkpoints"] == 2
    assert set(stats) >= {
        "open_connections",
        "idle_connections",
        "active_plans",
        "checkpoints",
        "commits",
        "rollbacks",
        "reaped",
        "evicted",
        "close_failures",
    }
    assert len(stats) == len(list(stats)) == len(dict(stats))
    assert dict(stats)["commits"] == 0
    assert stats.get("no_such_counter") is None
    assert "checkpoints" in stats
    with pytest.raises(KeyError):
        stats["no_such_counter"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.commits = 5  # type: ignore[misc]


def test_handler_stats_after_close_shows_everything_freed(
    make_handler: MakeHandler, db: Database
) -> None:
    handler = make_handler(max_connections=2)
    handler.create_checkpoint(db.resource(), "p1", "first")
    handler.close()
    stats = handler.stats()
    assert (stats.open_connections, stats.idle_connections, stats.active_plans) == (0, 0, 0)
    assert stats.rollbacks == 1
    assert stats.commits == 0


# -- fork ---------------------------------------------------------------------------------


def _in_child(check: Callable[[], None]) -> int:
    """Run *check* in a forked child; return its exit status (0 when it passed)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which exits without coverage data
        code = 1
        try:
            check()
            code = 0
        except BaseException as exc:
            os.write(2, f"child check failed: {exc!r}\n".encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_forked_child_starts_empty_and_leaves_the_parents_plans_alone(
    handler: DatabaseResourceHandler,
    db: Database,
    make_db: Callable[[str], Database],
    engine: str,
) -> None:
    resource = db.resource()
    handler.create_checkpoint(resource, "parent", "a")
    _insert(handler, resource, "parent", "from parent")
    child_db = make_db("child")
    child_resource = child_db.resource("child")

    def child() -> None:
        stats = handler.stats()
        assert (stats.active_plans, stats.open_connections, stats.checkpoints) == (0, 0, 0)
        assert _reaper_threads(handler) == []
        handler.release_plan("parent")  # not this process's plan: nothing happens
        handler.rollback_plan("parent")
        _insert(handler, child_resource, "child", "from child")
        handler.release_plan("child")
        handler.close()
        gc.collect()

    assert _in_child(child) == 0
    assert child_db.rows() == ["from child"]
    # The parent's plan and connection were untouched by the child.
    assert handler.stats().active_plans == 1
    _insert(handler, resource, "parent", "after the fork")
    handler.release_plan("parent")
    assert db.rows() == ["after the fork", "from parent"]
    if engine == "sqlite":
        assert db.rows("PRAGMA integrity_check") == ["ok"]


def test_a_plan_evicted_in_the_parent_is_not_the_childs_business(
    make_handler: MakeHandler, db: Database, make_db: Callable[[str], Database]
) -> None:
    handler = make_handler(max_connections=1, on_full="evict_lru")
    handler.create_checkpoint(db.resource(), "old", "a")
    handler.create_checkpoint(make_db("new").resource("new"), "new", "a")

    def child() -> None:
        handler.release_plan("old")  # the parent's ending is not inherited

    assert _in_child(child) == 0
    with pytest.raises(CheckpointEvictedError):
        handler.release_plan("old")
    handler.release_plan("new")


# -- garbage collection -----------------------------------------------------------------------


def test_a_forgotten_handler_is_finalized_with_a_warning(
    db: Database, fd_count: Callable[[], int]
) -> None:
    resource = db.resource()
    baseline = fd_count()
    handler = DatabaseResourceHandler(max_connections=2, name="forgotten")
    _insert(handler, resource, "finished", "committed")
    handler.release_plan("finished")
    _insert(handler, resource, "open-plan", "never committed")
    assert len(_reaper_threads(handler)) == 1
    with pytest.warns(ResourceWarning, match=r"'forgotten' was not closed.*\['open-plan'\]"):
        del handler
        gc.collect()
    reaper = [t for t in threading.enumerate() if t.name == "cleveragents-reaper[forgotten]"]
    assert reaper == []
    assert fd_count() == baseline
    assert db.rows() == ["committed"]
