"""Every ending of a PlanGraph invocation, against real LangGraph, on SQLite and PostgreSQL.

A scripted chat model drives each graph (no network). Rows and checkpoints
are read through a separate connection; ``get_state`` goes through the
checkpointer outside any invocation, so it sees committed state only.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import ToolMessage
from langgraph.errors import GraphRecursionError
from langgraph.graph import START, StateGraph
from langgraph.types import Command, RetryPolicy
from langgraph_kit import (
    EVENTUALLY,
    OrderState,
    Rendezvous,
    ScriptedChatModel,
    Shop,
    agent_graph,
    answer,
    approval_graph,
    ask,
    calls,
    child_command,
    make_handler,
    restock,
    sell,
    shop_on,
    thread,
)

from cleveragents.errors import CheckpointExpiredError
from cleveragents.integrations.langgraph import (
    PlanCheckpointer,
    PlanGraph,
    plan_connection,
    plan_node,
    plan_tool,
)
from cleveragents.resource.handlers.database import DatabaseResourceHandler

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent
START_STOCK = {"pear": 3, "plum": 0}


@pytest.fixture(params=["sqlite", "postgresql"])
def shop(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Shop]:
    """Return a fresh shop database on each engine (PostgreSQL skips without a server)."""
    with shop_on(request.param, tmp_path) as made:
        yield made


@pytest.fixture
def handler() -> Iterator[DatabaseResourceHandler]:
    with make_handler() as made:
        yield made
        assert made.stats()["active_plans"] == 0, "an invocation left its plan open"


@pytest.fixture
def saver(handler: DatabaseResourceHandler, shop: Shop) -> PlanCheckpointer:
    return PlanCheckpointer(handler, shop.resource)


def greeted(saver: PlanCheckpointer) -> PlanGraph:
    """Run one committed invocation on thread t1 (the state every failure must fall back to)."""
    app = agent_graph(ScriptedChatModel(replies=[answer("hello")]), [], saver)
    app.invoke(ask("hi"), thread())
    return app


def messages(app: PlanGraph) -> list[str]:
    return [message.content for message in app.get_state(thread()).values.get("messages", [])]


# -- released ---------------------------------------------------------------------------------


@pytest.mark.parametrize("durability", ["sync", "async", "exit"])
def test_a_normal_end_commits_state_and_writes_together(
    shop: Shop, saver: PlanCheckpointer, durability: str
) -> None:
    model = ScriptedChatModel(replies=[calls(("restock", {"sku": "plum", "n": 10})), answer()])
    app = agent_graph(model, [restock, sell], saver)
    result = app.invoke(ask(), thread(), durability=durability)
    assert result["messages"][-1].content == "done"
    assert shop.stock() == {"pear": 3, "plum": 10}
    assert shop.checkpoints() >= 1
    assert messages(app) == ["restock plum, sell pears", "", "restocked 10 plum", "done"]
    run = app.last_run
    assert run is not None and run.outcome == "released" and run.rollback_reason is None
    assert run.plan_id.startswith("langgraph-") and run.thread_id == "t1"
    assert run.tool_rollbacks == () and not run.interrupted


def test_a_failing_tool_is_rolled_back_and_the_rest_commits(
    shop: Shop, saver: PlanCheckpointer
) -> None:
    model = ScriptedChatModel(
        replies=[
            calls(("restock", {"sku": "plum", "n": 10}), ("sell", {"sku": "pear", "n": 50})),
            answer(),
        ]
    )
    app = agent_graph(model, [restock, sell], saver, handle_tool_errors=True)
    app.invoke(ask(), thread())
    # sell's UPDATE ran, then it raised: only that call was undone.
    assert shop.stock() == {"pear": 3, "plum": 10}
    tool_messages = [
        m for m in app.get_state(thread()).values["messages"] if isinstance(m, ToolMessage)
    ]
    assert [(m.name, m.status) for m in tool_messages] == [
        ("restock", "success"),
        ("sell", "error"),
    ]
    run = app.last_run
    assert run is not None and run.outcome == "released"
    (rollback,) = run.tool_rollbacks
    assert rollback.tool == "sell" and rollback.call_id == "c2"
    assert rollback.checkpoint in ("tool-1", "tool-2")  # calls take turns in no promised order
    assert rollback.error == "ValueError: only 3 pear in stock, cannot sell 50"


def test_a_tool_error_that_is_not_handled_rolls_everything_back(
    shop: Shop, saver: PlanCheckpointer
) -> None:
    greeted(saver)
    before = shop.latest()
    model = ScriptedChatModel(
        replies=[calls(("restock", {"sku": "plum", "n": 10}), ("sell", {"sku": "pear", "n": 50}))]
    )
    # create_agent's ToolNode re-raises tool errors (the default).
    app = PlanGraph(create_agent(model, [restock, sell], checkpointer=saver))
    with pytest.raises(ValueError, match="cannot sell 50"):
        app.invoke(ask(), thread())
    assert shop.stock() == START_STOCK
    assert shop.latest() == before
    assert messages(app) == ["hi", "hello"]
    run = app.last_run
    assert run is not None and run.outcome == "rolled_back"
    assert (
        run.rollback_reason
        == "the invocation raised ValueError: only 3 pear in stock, cannot sell 50"
    )


# -- rolled back ---------------------------------------------------------------------------------


@pytest.mark.parametrize("durability", ["sync", "async", "exit"])
def test_an_exception_rolls_back_state_and_writes(
    shop: Shop, saver: PlanCheckpointer, durability: str
) -> None:
    greeted(saver)
    before, checkpoints = shop.latest(), shop.checkpoints()

    def broken(messages: Any) -> Any:
        raise RuntimeError("the model is down")

    model = ScriptedChatModel(replies=[calls(("restock", {"sku": "plum", "n": 10})), broken])
    app = agent_graph(model, [restock], saver)
    with pytest.raises(RuntimeError, match="the model is down"):
        app.invoke(ask(), thread(), durability=durability)
    assert shop.stock() == START_STOCK
    assert (shop.latest(), shop.checkpoints()) == (before, checkpoints)
    assert messages(app) == ["hi", "hello"]
    assert app.last_run is not None and app.last_run.outcome == "rolled_back"
    # LangGraph's own "resume from the failed step" finds nothing: re-invoke instead.
    model.replies[1] = answer()
    model.position = 0
    app.invoke(ask(), thread(), durability=durability)
    assert shop.stock() == {"pear": 3, "plum": 10}


def test_cancellation_rolls_back(shop: Shop, saver: PlanCheckpointer) -> None:
    greeted(saver)
    before = shop.latest()
    thinking = asyncio.Event()

    @plan_node
    async def restock_plums(state: OrderState) -> dict[str, Any]:
        with plan_connection("shop") as conn:
            conn.execute("UPDATE items SET qty = qty + 10 WHERE sku = 'plum'")
        return {}

    async def think(state: OrderState) -> dict[str, Any]:
        thinking.set()
        await asyncio.sleep(EVENTUALLY * 10)
        return {}

    builder = StateGraph(OrderState)
    builder.add_node("restock_plums", restock_plums)
    builder.add_node("think", think)
    builder.add_edge(START, "restock_plums")
    builder.add_edge("restock_plums", "think")
    app = PlanGraph(builder.compile(checkpointer=saver))

    async def scenario() -> None:
        running = asyncio.ensure_future(app.ainvoke({}, thread()))
        await asyncio.wait_for(thinking.wait(), EVENTUALLY)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running

    asyncio.run(scenario())
    assert shop.stock() == START_STOCK
    assert shop.latest() == before
    assert app.last_run is not None and app.last_run.outcome == "rolled_back"
    assert app.last_run.rollback_reason == "the invocation was cancelled"


def test_a_stream_closed_early_rolls_back(shop: Shop, saver: PlanCheckpointer) -> None:
    app = greeted(saver)
    before = shop.latest()
    model = ScriptedChatModel(replies=[calls(("restock", {"sku": "plum", "n": 10})), answer()])
    app = agent_graph(model, [restock], saver)
    steps = app.stream(ask(), thread(), stream_mode="updates")
    for step in steps:
        if "tools" in step:
            break  # the tool has written; nobody reads the rest
    steps.close()
    assert shop.stock() == START_STOCK
    assert shop.latest() == before
    assert messages(app) == ["hi", "hello"]
    assert app.last_run is not None and app.last_run.outcome == "rolled_back"
    assert app.last_run.rollback_reason == "the stream was closed before it was exhausted"
    # Read to the end, the same stream commits.
    model.position = 0
    assert [next(iter(step)) for step in app.stream(ask(), thread(), stream_mode="updates")] == [
        "agent",
        "tools",
        "agent",
    ]
    assert shop.stock() == {"pear": 3, "plum": 10}
    assert app.last_run is not None and app.last_run.outcome == "released"


def test_an_async_stream_closed_early_rolls_back(shop: Shop, saver: PlanCheckpointer) -> None:
    greeted(saver)
    before = shop.latest()
    model = ScriptedChatModel(replies=[calls(("restock", {"sku": "plum", "n": 10})), answer()])
    app = agent_graph(model, [restock], saver)

    async def scenario() -> list[str]:
        steps = app.astream(ask(), thread(), stream_mode="updates")
        async for step in steps:
            if "tools" in step:
                break
        await steps.aclose()  # type: ignore[attr-defined]
        assert shop.stock() == START_STOCK and shop.latest() == before
        model.position = 0
        return [
            next(iter(step)) async for step in app.astream(ask(), thread(), stream_mode="updates")
        ]

    assert asyncio.run(scenario()) == ["agent", "tools", "agent"]
    assert shop.stock() == {"pear": 3, "plum": 10}


def test_a_graph_error_in_an_async_stream_rolls_back(shop: Shop, saver: PlanCheckpointer) -> None:
    def broken(messages: Any) -> Any:
        raise RuntimeError("the model is down")

    model = ScriptedChatModel(replies=[calls(("restock", {"sku": "plum", "n": 10})), broken])
    app = agent_graph(model, [restock], saver)

    async def scenario() -> None:
        async for _ in app.astream(ask(), thread()):
            pass

    with pytest.raises(RuntimeError, match="the model is down"):
        asyncio.run(scenario())
    assert shop.stock() == START_STOCK and shop.checkpoints() == 0
    assert app.last_run is not None and app.last_run.outcome == "rolled_back"


def test_a_graph_error_in_a_stream_rolls_back(shop: Shop, saver: PlanCheckpointer) -> None:
    model = ScriptedChatModel(replies=[calls(("restock", {"sku": "plum", "n": 10}))] * 3)
    app = agent_graph(model, [restock], saver)
    with pytest.raises(GraphRecursionError):
        list(app.stream(ask(), {**thread(), "recursion_limit": 3}))
    assert shop.stock() == START_STOCK and shop.checkpoints() == 0
    assert app.last_run is not None and app.last_run.outcome == "rolled_back"


# -- interrupts and resume -------------------------------------------------------------------------


def test_an_interrupted_plan_node_is_rolled_back_and_runs_once_on_resume(
    shop: Shop, saver: PlanCheckpointer
) -> None:
    runs: list[str] = []
    app = approval_graph(saver, runs)
    result = app.invoke({}, thread())
    assert "__interrupt__" in result
    # Released at the interrupt: the restock is committed, the pear sale is not.
    assert shop.stock() == {"pear": 3, "plum": 10}
    assert app.get_state(thread()).next == ("sell_pear",)
    run = app.last_run
    assert run is not None and run.outcome == "released" and run.interrupted
    assert [(r.checkpoint, r.tool) for r in run.tool_rollbacks] == [("node-2", "sell_pear")]
    app.invoke(Command(resume="yes"), thread())
    # sell_pear ran twice (LangGraph re-runs an interrupted task), its write happened once.
    assert runs == ["restock_plums", "sell_pear", "sell_pear"]
    assert shop.stock() == {"pear": 2, "plum": 10}
    assert app.get_state(thread()).values == {"decision": "yes"}


def test_interrupt_in_a_plan_tool_undoes_the_task_and_resume_writes_once(
    shop: Shop, saver: PlanCheckpointer
) -> None:
    from langgraph.types import interrupt

    @plan_tool
    def ship(sku: str) -> str:
        """Ship one item after a human approves."""
        with plan_connection("shop") as conn:
            conn.execute("UPDATE items SET qty = qty - 1 WHERE sku = 'pear'")
        if interrupt(f"ship one {sku}?") != "yes":
            raise ValueError("not approved")
        return "shipped"

    model = ScriptedChatModel(
        replies=[calls(("restock", {"sku": "plum", "n": 10}), ("ship", {"sku": "pear"})), answer()]
    )
    app = agent_graph(model, [restock, ship], saver)
    result = app.invoke(ask(), thread())
    assert "__interrupt__" in result
    # Both calls belong to one ToolNode task, which runs again on resume: both undone.
    assert shop.stock() == START_STOCK
    assert app.last_run is not None and app.last_run.interrupted
    assert sorted(r.tool for r in app.last_run.tool_rollbacks) == ["restock", "ship"]
    app.invoke(Command(resume="yes"), thread())
    assert shop.stock() == {"pear": 2, "plum": 10}
    assert messages(app)[-1] == "done"


def test_interrupt_in_a_plain_tool_undoes_its_task_s_plan_calls(
    shop: Shop, saver: PlanCheckpointer
) -> None:
    from langchain_core.tools import tool
    from langgraph.types import interrupt

    @tool
    def approve(question: str) -> str:
        """Ask a human."""
        return str(interrupt(question))

    model = ScriptedChatModel(
        replies=[
            calls(("restock", {"sku": "plum", "n": 10}), ("approve", {"question": "ok?"})),
            answer(),
        ]
    )
    app = agent_graph(model, [restock, approve], saver)
    app.invoke(ask(), thread())
    assert shop.stock() == START_STOCK  # restock runs again on resume: undone now
    app.invoke(Command(resume="yes"), thread())
    assert shop.stock() == {"pear": 3, "plum": 10}


def test_resume_in_a_new_process_with_a_new_handler(shop: Shop) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])}

    def child(command: str) -> dict[str, Any]:
        done = subprocess.run(
            child_command(command, shop.resource),
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        reply: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return reply

    assert child("approval-start") == {"interrupted": True}
    assert shop.stock() == {"pear": 3, "plum": 10}
    assert child("approval-resume") == {"result": {"decision": "yes"}, "outcome": "released"}
    assert shop.stock() == {"pear": 2, "plum": 10}
    with make_handler() as handler:
        state = approval_graph(PlanCheckpointer(handler, shop.resource)).get_state(thread())
    assert state.next == () and state.values == {"decision": "yes"}


def test_kill_9_mid_invocation_leaves_nothing(shop: Shop, saver: PlanCheckpointer) -> None:
    app = greeted(saver)
    before, checkpoints = shop.latest(), shop.checkpoints()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])}
    child = subprocess.Popen(
        child_command("hang-after-restock", shop.resource),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()  # the tool wrote; the model is "thinking"
        assert line.strip() == "ready", child.stderr.read() if child.stderr else ""
        child.send_signal(signal.SIGKILL)
        child.wait(EVENTUALLY)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(EVENTUALLY)
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    assert child.returncode == -signal.SIGKILL
    assert shop.stock() == START_STOCK
    assert (shop.latest(), shop.checkpoints()) == (before, checkpoints)
    assert messages(app) == ["hi", "hello"]
    # Any process, any handler: it goes on from the last committed checkpoint.
    model = ScriptedChatModel(replies=[calls(("restock", {"sku": "plum", "n": 10})), answer()])
    agent_graph(model, [restock], saver).invoke(ask(), thread())
    assert shop.stock() == {"pear": 3, "plum": 10}
    assert len(messages(app)) == 6


# -- turns ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("agent", ["ToolNode", "create_agent"])
def test_parallel_tool_calls_of_one_message_take_turns(
    shop: Shop, saver: PlanCheckpointer, agent: str
) -> None:
    meeting = Rendezvous()

    @plan_tool
    def count(sku: str) -> str:
        """Count an item."""
        meeting.meet()
        with plan_connection("shop") as conn:
            conn.execute("UPDATE items SET qty = qty + 1 WHERE sku = 'plum'")
        return "counted"

    model = ScriptedChatModel(
        replies=[
            calls(("count", {"sku": "a"}), ("count", {"sku": "b"}), ("count", {"sku": "c"})),
            answer(),
        ]
    )
    # A ToolNode runs one message's calls in threads; create_agent sends each
    # call to a task of its own, and the tasks run in threads too.
    if agent == "ToolNode":
        app = agent_graph(model, [count], saver)
    else:
        app = PlanGraph(create_agent(model, [count], checkpointer=saver))
    app.invoke(ask(), thread())
    assert (meeting.calls, meeting.overlaps) == (3, 0)
    assert shop.stock()["plum"] == 3


def test_parallel_async_tool_calls_take_turns(shop: Shop, saver: PlanCheckpointer) -> None:
    meeting = Rendezvous()

    @plan_tool
    async def count(sku: str) -> str:
        """Count an item (async)."""
        await asyncio.to_thread(meeting.meet)
        with plan_connection("shop") as conn:
            conn.execute("UPDATE items SET qty = qty + 1 WHERE sku = 'plum'")
        return "counted"

    @plan_tool
    async def fail(sku: str) -> str:
        """Write, then fail (async)."""
        with plan_connection("shop") as conn:
            conn.execute("UPDATE items SET qty = qty + 100 WHERE sku = 'plum'")
        raise ValueError("no")

    model = ScriptedChatModel(
        replies=[
            calls(("count", {"sku": "a"}), ("fail", {"sku": "b"}), ("count", {"sku": "c"})),
            answer(),
        ]
    )
    # ToolNode gathers the three async calls at once.
    app = agent_graph(model, [count, fail], saver, handle_tool_errors=True)
    asyncio.run(app.ainvoke(ask(), thread()))
    assert (meeting.calls, meeting.overlaps) == (2, 0)
    assert shop.stock()["plum"] == 2
    assert app.last_run is not None and [r.tool for r in app.last_run.tool_rollbacks] == ["fail"]


# -- plan nodes ----------------------------------------------------------------------------------


def test_a_retried_plan_node_keeps_only_its_last_attempt(
    shop: Shop, saver: PlanCheckpointer
) -> None:
    attempts: list[int] = []

    @plan_node
    def flaky(state: OrderState) -> dict[str, Any]:
        attempts.append(len(attempts) + 1)
        with plan_connection("shop") as conn:
            conn.execute("UPDATE items SET qty = qty + 1 WHERE sku = 'plum'")
        if len(attempts) < 3:
            raise ConnectionError("try again")
        return {"decision": "done"}

    builder = StateGraph(OrderState)
    builder.add_node(
        "flaky", flaky, retry_policy=RetryPolicy(max_attempts=3, initial_interval=0.01)
    )
    builder.add_edge(START, "flaky")
    app = PlanGraph(builder.compile(checkpointer=saver))
    app.invoke({}, thread())
    assert attempts == [1, 2, 3]
    assert shop.stock()["plum"] == 1
    assert app.last_run is not None and len(app.last_run.tool_rollbacks) == 2


def test_update_state_is_one_plan(shop: Shop, saver: PlanCheckpointer) -> None:
    app = greeted(saver)
    before = shop.checkpoints()
    app.update_state(thread(), {"messages": [("user", "one more thing")]})
    assert shop.checkpoints() == before + 1
    assert app.last_run is not None and app.last_run.outcome == "released"
    asyncio.run(app.aupdate_state(thread(), {"messages": [("user", "and another")]}))
    assert shop.checkpoints() == before + 2
    assert messages(app)[-2:] == ["one more thing", "and another"]


def test_handler_error_mid_invocation_rolls_everything_back(shop: Shop) -> None:
    with make_handler() as handler:
        saver = PlanCheckpointer(handler, shop.resource_with(checkpoint_ttl=0.3))
        greeted(saver)
        before = shop.latest()

        def until_reaped(messages: Any) -> Any:
            # The model "thinks" longer than checkpoint_ttl: the reaper rolls the plan back.
            deadline = time.monotonic() + EVENTUALLY
            while handler.stats()["reaped"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            return answer()

        model = ScriptedChatModel(
            replies=[calls(("restock", {"sku": "plum", "n": 10})), until_reaped]
        )
        app = agent_graph(model, [restock], saver)
        with pytest.raises(CheckpointExpiredError):
            app.invoke(ask(), thread())
        assert shop.stock() == START_STOCK
        assert shop.latest() == before
        assert app.last_run is not None and app.last_run.outcome == "rolled_back"
        assert handler.stats()["active_plans"] == 0
