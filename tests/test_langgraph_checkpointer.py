"""PlanCheckpointer outside an invocation: a plain LangGraph checkpointer, on SQLite and PostgreSQL.

Its base capabilities are checked by LangGraph's own conformance suite
(``langgraph-checkpoint-conformance``); the rest here is what that suite does
not cover: short plans that leave nothing open, reads that never wait for a
running invocation's write lock, paging, and bad arguments.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.capabilities import BASE_CAPABILITIES
from langgraph.checkpoint.serde.types import ERROR, INTERRUPT
from langgraph_kit import (
    EVENTUALLY,
    ScriptedChatModel,
    Shop,
    agent_graph,
    answer,
    ask,
    make_handler,
    shop_on,
    sqlite_shop,
    thread,
)

from cleveragents.errors import ResourceBusyError
from cleveragents.integrations.langgraph import TABLES, PlanCheckpointer
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(params=["sqlite", "postgresql"])
def shop(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Shop]:
    """Return a fresh shop database on each engine (PostgreSQL skips without a server)."""
    with shop_on(request.param, tmp_path) as made:
        yield made


@pytest.fixture
def handler() -> Iterator[DatabaseResourceHandler]:
    with make_handler() as made:
        yield made


def put_checkpoint(saver: PlanCheckpointer, thread_id: str, step: int, **values: Any) -> Any:
    """Put one checkpoint with *values* on *thread_id*; return its config."""
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = dict(values)
    versions = {channel: saver.get_next_version(None, None) for channel in values}
    checkpoint["channel_versions"] = versions
    config = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
    return saver.put(config, checkpoint, {"source": "loop", "step": step}, versions)


async def _collect(items: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in items]


# -- LangGraph's conformance suite ------------------------------------------------------------


def test_conformance_base_capabilities(shop: Shop, handler: DatabaseResourceHandler) -> None:
    @checkpointer_test(name=f"PlanCheckpointer[{shop.engine}]")
    async def factory() -> AsyncIterator[PlanCheckpointer]:
        saver = PlanCheckpointer(handler, shop.resource)
        yield saver

    report = asyncio.run(validate(factory, capabilities={cap.value for cap in BASE_CAPABILITIES}))
    failures = [
        failure for result in report.results.values() for failure in (result.failures or [])
    ]
    assert report.passed_all_base(), failures
    # Every call was a short plan of its own: nothing is left open.
    assert handler.stats()["active_plans"] == 0


# -- plain use ---------------------------------------------------------------------------------


def test_setup_creates_the_three_tables_once(shop: Shop, handler: DatabaseResourceHandler) -> None:
    saver = PlanCheckpointer(handler, shop.resource)
    saver.setup()
    saver.setup()  # nothing to do the second time
    for table in TABLES:
        assert shop.query(f"SELECT count(*) FROM {table}") == [(0,)]
    # A new checkpointer on the same database finds them (and creates nothing).
    PlanCheckpointer(handler, shop.resource).setup()
    assert handler.stats()["active_plans"] == 0


def test_setup_tolerates_another_process_creating_the_tables_first(
    shop: Shop, handler: DatabaseResourceHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cleveragents.integrations.langgraph import _checkpointer

    # The other process looks, finds nothing, and creates the tables; ours
    # looked at the same moment, so its CREATE fails (PostgreSQL raises a
    # unique violation on pg_type when two sessions create one table).
    PlanCheckpointer(handler, shop.resource).setup()
    real_exist = _checkpointer._Store._tables_exist
    looks: list[str] = []

    def looked_too_early(store: Any, execute: Any) -> bool:
        looks.append("look")
        return len(looks) > 1 and bool(real_exist(store, execute))

    def collide(store: Any, execute: Any) -> None:
        looks.append("create")
        raise RuntimeError("duplicate key value violates unique constraint")

    monkeypatch.setattr(_checkpointer._Store, "_tables_exist", looked_too_early)
    monkeypatch.setattr(_checkpointer._Store, "_create_tables", collide)
    saver = PlanCheckpointer(handler, shop.resource)
    saver.setup()  # no error: the tables are there
    assert looks == ["look", "create", "look"]
    assert saver.get_tuple(thread("t1")) is None


def test_setup_that_fails_raises(
    shop: Shop, handler: DatabaseResourceHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cleveragents.integrations.langgraph import _checkpointer

    def fail(store: Any, execute: Any) -> None:
        raise PermissionError("read-only database")

    monkeypatch.setattr(_checkpointer._Store, "_create_tables", fail)
    saver = PlanCheckpointer(handler, shop.resource)
    with pytest.raises(PermissionError, match="read-only database"):
        saver.get_tuple(thread("t1"))
    assert handler.stats()["active_plans"] == 0


def test_tables_are_made_on_first_use(shop: Shop, handler: DatabaseResourceHandler) -> None:
    saver = PlanCheckpointer(handler, shop.resource)
    assert saver.get_tuple(thread("nobody")) is None
    assert shop.query("SELECT count(*) FROM langgraph_checkpoints") == [(0,)]


def test_put_commits_at_once_and_reads_see_committed_state(
    shop: Shop, handler: DatabaseResourceHandler
) -> None:
    saver = PlanCheckpointer(handler, shop.resource)
    first = put_checkpoint(saver, "t1", 0, messages=["hi"], count=1)
    # Seen at once through a separate connection: the put was its own plan.
    assert shop.checkpoints("t1") == 1
    second = put_checkpoint(saver, "t1", 1, count=2)
    saver.put_writes(second, [("count", 3), (INTERRUPT, {"why": "approve"})], "task-1", "a:b")
    latest = saver.get_tuple(thread("t1"))
    assert latest is not None
    assert latest.config["configurable"]["checkpoint_id"] == second["configurable"]["checkpoint_id"]
    assert latest.checkpoint["channel_values"] == {"count": 2}
    # In writes_sort_key order: the interrupt's index is -3, so it comes first.
    assert latest.pending_writes == [
        ("task-1", INTERRUPT, {"why": "approve"}),
        ("task-1", "count", 3),
    ]
    older = saver.get_tuple(first)
    assert older is not None and older.checkpoint["channel_values"] == {
        "messages": ["hi"],
        "count": 1,
    }
    assert shop.writes("t1") == 2
    assert handler.stats()["active_plans"] == 0


def test_special_writes_replace_and_regular_writes_are_kept(
    shop: Shop, handler: DatabaseResourceHandler
) -> None:
    saver = PlanCheckpointer(handler, shop.resource)
    config = put_checkpoint(saver, "t1", 0)
    saver.put_writes(config, [("x", "first")], "task")
    saver.put_writes(config, [("x", "second")], "task")
    saver.put_writes(config, [(ERROR, "boom")], "task")
    saver.put_writes(config, [(ERROR, "boom again")], "task")
    saver.put_writes(config, [], "task")  # nothing to write
    found = saver.get_tuple(config)
    assert found is not None
    assert sorted(found.pending_writes or []) == [
        ("task", ERROR, "boom again"),
        ("task", "x", "first"),
    ]


def test_list_pages_filters_and_limits(shop: Shop, handler: DatabaseResourceHandler) -> None:
    saver = PlanCheckpointer(handler, shop.resource)
    ids = [
        put_checkpoint(saver, "t1", step)["configurable"]["checkpoint_id"] for step in range(230)
    ]
    put_checkpoint(saver, "t2", 0)
    newest_first = list(reversed(ids))
    listed = [item.checkpoint["id"] for item in saver.list(thread("t1"))]
    assert listed == newest_first  # three pages
    assert len(list(saver.list(None))) == 231
    assert [item.checkpoint["id"] for item in saver.list(thread("t1"), limit=120)] == newest_first[
        :120
    ]
    assert list(saver.list(thread("t1"), limit=0)) == []
    before = {"configurable": {"checkpoint_id": ids[100]}}
    assert [item.checkpoint["id"] for item in saver.list(thread("t1"), before=before, limit=3)] == [
        ids[99],
        ids[98],
        ids[97],
    ]
    even = [item.metadata["step"] for item in saver.list(thread("t1"), filter={"step": 200})]
    assert even == [200]
    assert list(saver.list(thread("t1"), filter={"step": 200, "source": "input"})) == []
    assert list(saver.list(thread("t1"), filter={"no such key": None})) == []
    # A config without a thread lists every thread; an async listing pages the same way.
    assert len(list(saver.list({"configurable": {}}, limit=150))) == 150
    listed_async = asyncio.run(_collect(saver.alist(thread("t1"), limit=150)))
    assert [item.checkpoint["id"] for item in listed_async] == newest_first[:150]
    wanted = {"configurable": {"thread_id": "t1", "checkpoint_ns": "", "checkpoint_id": ids[5]}}
    assert [item.checkpoint["id"] for item in saver.list(wanted)] == [ids[5]]
    with pytest.raises(ValueError, match="limit must not be negative"):
        list(saver.list(thread("t1"), limit=-1))
    # Left half-read, a listing holds nothing open: each page was its own read.
    pages = saver.list(thread("t1"))
    next(pages)
    assert handler.stats()["active_plans"] == 0


def test_delete_thread_removes_only_that_thread(
    shop: Shop, handler: DatabaseResourceHandler
) -> None:
    saver = PlanCheckpointer(handler, shop.resource)
    kept = put_checkpoint(saver, "keep", 0, a=1)
    gone = put_checkpoint(saver, "gone", 0, a=2)
    saver.put_writes(gone, [("a", 3)], "task")
    saver.delete_thread("gone")
    assert shop.query("SELECT count(*) FROM langgraph_blobs WHERE thread_id = ?", ("gone",)) == [
        (0,)
    ]
    assert shop.checkpoints("gone") == 0 and shop.writes("gone") == 0
    assert saver.get_tuple(kept) is not None


def test_async_methods_do_the_same(shop: Shop, handler: DatabaseResourceHandler) -> None:
    saver = PlanCheckpointer(handler, shop.resource)

    async def scenario() -> list[Any]:
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = {"x": 1}
        checkpoint["channel_versions"] = {"x": "1"}
        config = await saver.aput(thread("t1"), checkpoint, {"step": 0}, {"x": "1"})
        await saver.aput_writes(config, [("x", 2)], "task")
        found = await saver.aget_tuple(config)
        listed = [item async for item in saver.alist(thread("t1"), limit=5)]
        await saver.adelete_thread("t1")
        return [found, listed, await saver.aget_tuple(thread("t1"))]

    found, listed, after = asyncio.run(scenario())
    assert found.checkpoint["channel_values"] == {"x": 1} and found.pending_writes == [
        ("task", "x", 2)
    ]
    assert [item.checkpoint["id"] for item in listed] == [found.checkpoint["id"]]
    assert after is None


def test_next_version_increases_and_never_repeats(
    handler: DatabaseResourceHandler, tmp_path: Path
) -> None:
    saver = PlanCheckpointer(handler, sqlite_shop(tmp_path).resource)
    first = saver.get_next_version(None, None)
    second = saver.get_next_version(first, None)
    assert first < second and int(second.split(".")[0]) == 2
    assert saver.get_next_version(first, None) != second  # two branches, two values
    assert saver.get_next_version(7, None).startswith(f"{8:032}.")  # type: ignore[arg-type]


# -- reads never wait for a running invocation ------------------------------------------------


def test_sqlite_reads_do_not_wait_for_an_invocation_holding_the_write_lock(tmp_path: Path) -> None:
    shop = sqlite_shop(tmp_path)
    resource = shop.resource_with(busy_timeout=0.2)
    thinking, release = threading.Event(), threading.Event()

    def think() -> None:
        thinking.set()
        assert release.wait(EVENTUALLY)

    with make_handler() as handler:
        saver = PlanCheckpointer(handler, resource)
        put_checkpoint(saver, "other", 0, x=1)
        model = ScriptedChatModel(replies=[answer("hello")])
        app = agent_graph(model, [], saver, before_model=think)
        running = threading.Thread(target=app.invoke, args=(ask(), thread("t1")))
        running.start()
        try:
            assert thinking.wait(EVENTUALLY)
            # The invocation holds the file's write lock while its model thinks;
            # with busy_timeout 0.2s, waiting for it would raise ResourceBusyError.
            assert saver.get_tuple(thread("other")) is not None
            assert app.get_state(thread("t1")).values == {}
            assert len(list(saver.list(None))) == 1
            # Writers do wait, and give up after busy_timeout.
            with pytest.raises(ResourceBusyError):
                put_checkpoint(saver, "other", 1, x=2)
        finally:
            release.set()
            running.join(EVENTUALLY)
        assert app.last_run is not None and app.last_run.outcome == "released"
        assert handler.stats()["active_plans"] == 0


# -- bad arguments ------------------------------------------------------------------------------


def test_bad_arguments_are_refused(tmp_path: Path, handler: DatabaseResourceHandler) -> None:
    resource = sqlite_shop(tmp_path).resource
    with pytest.raises(TypeError, match="needs a DatabaseResourceHandler"):
        PlanCheckpointer(object(), resource)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs database resources"):
        PlanCheckpointer(handler, "shop.db")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs database resources"):
        PlanCheckpointer(handler, Resource("shop", "queue", location="x"))
    with pytest.raises(TypeError, match="a list of Resource objects"):
        PlanCheckpointer(handler, resource, resources=resource)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="two resources are called 'shop'"):
        PlanCheckpointer(handler, resource, resources=[resource])
    with pytest.raises(ValueError, match="resource 'bad': journal_mode"):
        PlanCheckpointer(
            handler, Resource("bad", "database", engine="sqlite", location="x", journal_mode="no")
        )
    saver = PlanCheckpointer(handler, resource)
    assert repr(saver) == "<PlanCheckpointer on 'shop'>"
    assert saver.handler is handler and saver.resource is resource
    assert saver.resources == (resource,)


def test_importing_cleveragents_imports_no_langgraph() -> None:
    code = (
        "import sys, cleveragents, cleveragents.integrations, cleveragents.resource\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('langgraph', 'langchain', 'langchain_core'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(SRC)}
    )


def test_without_langgraph_the_import_says_which_extra_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['langgraph'] = None\n"
        "try:\n"
        "    import cleveragents.integrations.langgraph\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert "pip install 'cleveragents[langgraph]'" in done.stdout
