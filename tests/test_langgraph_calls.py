"""Plan tools, plan nodes and plan_connection: turns, rollbacks, interrupts, refusals.

Engine-neutral behaviour runs on SQLite; rows are read through a separate
sqlite3 connection.
"""

from __future__ import annotations

import asyncio
import contextvars
import operator
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.tools import BaseTool, tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, StateGraph
from langgraph.types import Command, interrupt
from langgraph_kit import (
    EVENTUALLY,
    ScriptedChatModel,
    Shop,
    agent_graph,
    answer,
    ask,
    calls,
    make_handler,
    restock,
    sell,
    sqlite_shop,
    thread,
)

from cleveragents.errors import CheckpointExpiredError, ToolError
from cleveragents.integrations.langgraph import (
    PlanCheckpointer,
    PlanGraph,
    ToolRollback,
    plan_connection,
    plan_node,
    plan_tool,
)
from cleveragents.resource.handlers.database import DatabaseResourceHandler

START_STOCK = {"pear": 3, "plum": 0}


@pytest.fixture
def shop(tmp_path: Path) -> Shop:
    return sqlite_shop(tmp_path)


@pytest.fixture
def handler() -> Iterator[DatabaseResourceHandler]:
    with make_handler() as made:
        yield made
        assert made.stats()["active_plans"] == 0, "an invocation left its plan open"


@pytest.fixture
def saver(handler: DatabaseResourceHandler, shop: Shop) -> PlanCheckpointer:
    return PlanCheckpointer(handler, shop.resource)


class Fan(TypedDict, total=False):
    log: Annotated[list[str], operator.add]


def fan_out(saver: PlanCheckpointer, **nodes: Any) -> PlanGraph:
    """Return a graph running *nodes* in parallel from the start."""
    builder = StateGraph(Fan)
    for name, node in nodes.items():
        builder.add_node(name, node)
        builder.add_edge(START, name)
    return PlanGraph(builder.compile(checkpointer=saver))


def wait_for(check: Any, what: str) -> None:
    deadline = time.monotonic() + EVENTUALLY
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- the checkpointer's own writes survive a rollback -------------------------------------------


def test_rollback_keeps_the_pending_writes_of_tasks_that_finished(
    shop: Shop, saver: PlanCheckpointer
) -> None:
    runs: list[str] = []
    checkpoint_taken = threading.Event()

    def quick(state: Fan) -> Fan:
        runs.append("quick")
        assert checkpoint_taken.wait(EVENTUALLY)  # finishes after approve's checkpoint
        return {"log": ["quick"]}

    def quick_writes_saved() -> bool:
        with plan_connection("shop") as conn:
            (count,) = conn.execute(
                "SELECT count(*) FROM langgraph_writes WHERE channel = 'log'"
            ).fetchone()
        return bool(count)

    @plan_node
    def approve(state: Fan) -> Fan:
        runs.append("approve")
        checkpoint_taken.set()
        # quick's pending write lands in the plan after this node's checkpoint...
        wait_for(quick_writes_saved, "quick's pending writes")
        # ...and the rollback of this interrupted node must not take it away.
        interrupt("go on?")
        return {"log": ["approve"]}

    app = fan_out(saver, quick=quick, approve=approve)
    app.invoke({}, thread())
    app.invoke(Command(resume="yes"), thread())
    # quick's writes were kept with the interrupted checkpoint: LangGraph did not run it again.
    assert runs in (["quick", "approve", "approve"], ["approve", "quick", "approve"])
    assert sorted(app.get_state(thread()).values["log"]) == ["approve", "quick"]


# -- interrupts inside ToolNode tasks -----------------------------------------------------------


def test_calls_of_an_interrupted_task_that_wait_for_their_turn_do_not_run(
    shop: Shop, saver: PlanCheckpointer
) -> None:
    bodies: list[str] = []

    @plan_tool
    async def ship(sku: str) -> str:
        """Ship after approval."""
        bodies.append("ship")
        if interrupt("ship?") != "yes":
            raise ValueError("no")
        return "shipped"

    @plan_tool
    async def note(sku: str) -> str:
        """Write a note."""
        bodies.append("note")
        with plan_connection("shop") as conn:
            conn.execute("UPDATE items SET qty = qty + 1 WHERE sku = 'plum'")
        return "noted"

    model = ScriptedChatModel(
        replies=[calls(("ship", {"sku": "pear"}), ("note", {"sku": "plum"})), answer()]
    )
    app = agent_graph(model, [ship, note], saver)

    async def scenario() -> None:
        await app.ainvoke(ask(), thread())
        assert shop.stock() == START_STOCK  # nothing of the interrupted task stays
        await app.ainvoke(Command(resume="yes"), thread())

    asyncio.run(scenario())
    assert shop.stock() == {"pear": 3, "plum": 1}  # note's write happened exactly once


def test_interrupt_after_another_task_s_call_cannot_be_undone_alone(
    shop: Shop, saver: PlanCheckpointer
) -> None:
    x_restocked, y_sold = threading.Event(), threading.Event()

    @plan_tool
    def approve(question: str) -> str:
        """Ask a human."""
        return str(interrupt(question))

    def x(state: Fan) -> Fan:
        restock.invoke({"sku": "plum", "n": 10})
        x_restocked.set()
        assert y_sold.wait(EVENTUALLY)
        approve.invoke({"question": "ok?"})
        return {"log": ["x"]}

    def y(state: Fan) -> Fan:
        assert x_restocked.wait(EVENTUALLY)
        sell.invoke({"sku": "pear", "n": 1})
        y_sold.set()
        return {"log": ["y"]}

    app = fan_out(saver, x=x, y=y)
    with pytest.raises(ToolError, match=r"cannot be undone alone: plan 'sell' \(tool-2\)"):
        app.invoke({}, thread())
    assert shop.stock() == START_STOCK
    assert shop.checkpoints() == 0
    assert app.last_run is not None and app.last_run.outcome == "rolled_back"


def test_a_command_for_the_parent_graph_keeps_the_node_s_work(
    shop: Shop, saver: PlanCheckpointer
) -> None:
    inner = StateGraph(Fan)
    inner.add_node("hand_back", lambda state: Command(graph=Command.PARENT, goto="finish"))
    inner.add_edge(START, "hand_back")
    subgraph = inner.compile()

    @plan_node
    def delegate(state: Fan) -> Fan:
        with plan_connection("shop") as conn:
            conn.execute("UPDATE items SET qty = qty + 10 WHERE sku = 'plum'")
        return subgraph.invoke(state)  # type: ignore[no-any-return]

    builder = StateGraph(Fan)
    builder.add_node("delegate", delegate, destinations=("finish",))
    builder.add_node("finish", lambda state: {"log": ["finished"]})
    builder.add_edge(START, "delegate")
    app = PlanGraph(builder.compile(checkpointer=saver))
    assert app.invoke({}, thread()) == {"log": ["finished"]}
    assert shop.stock()["plum"] == 10
    assert app.last_run is not None and app.last_run.tool_rollbacks == ()


# -- plan tools inside plan nodes, several databases ---------------------------------------------


def test_plan_tools_inside_a_plan_node_join_it(
    tmp_path: Path, handler: DatabaseResourceHandler
) -> None:
    shop = sqlite_shop(tmp_path)
    ledger = sqlite_shop(tmp_path, "ledger")
    saver = PlanCheckpointer(handler, shop.resource, resources=[ledger.resource])

    @plan_tool
    def book(sku: str, n: int) -> str:
        """Book a sale on both databases; refuses big ones after writing."""
        with plan_connection("shop") as conn:
            conn.execute("UPDATE items SET qty = qty - ? WHERE sku = ?", (n, sku))
        with plan_connection("ledger") as conn:
            conn.execute("UPDATE items SET qty = qty + ? WHERE sku = ?", (n, sku))
        if n > 2:
            raise ValueError("too big")
        return "booked"

    @plan_node
    def clerk(state: Fan) -> Fan:
        outcome = [book.invoke({"sku": "pear", "n": 1})]
        try:
            book.invoke({"sku": "pear", "n": 5})
        except ValueError as exc:
            outcome.append(str(exc))
        return {"log": outcome}

    builder = StateGraph(Fan)
    builder.add_node("clerk", clerk)
    builder.add_edge(START, "clerk")
    app = PlanGraph(builder.compile(checkpointer=saver))
    assert app.invoke({}, thread()) == {"log": ["booked", "too big"]}
    assert shop.stock()["pear"] == 2 and ledger.stock()["pear"] == 4
    run = app.last_run
    assert run is not None
    assert run.tool_rollbacks == (ToolRollback("tool-3", "book", None, "ValueError: too big"),)


def test_an_unknown_resource_is_refused(shop: Shop, saver: PlanCheckpointer) -> None:
    @plan_tool
    def peek(sku: str) -> str:
        """Look at another database."""
        with plan_connection("warehouse"):
            return "never"

    model = ScriptedChatModel(replies=[calls(("peek", {"sku": "pear"})), answer()])
    app = agent_graph(model, [peek], saver)
    app.invoke(ask(), thread())
    (rollback,) = app.last_run.tool_rollbacks  # type: ignore[union-attr]
    assert rollback.error.startswith("ToolError: PlanGraph invocation")
    assert "has no resource 'warehouse' (known: 'shop')" in rollback.error


# -- handler errors poison the invocation -------------------------------------------------------


def test_a_handler_error_in_a_tool_rolls_back_even_when_toolnode_handles_it(shop: Shop) -> None:
    with make_handler() as handler:
        saver = PlanCheckpointer(handler, shop.resource_with(checkpoint_ttl=0.3))

        @plan_tool
        def slow_restock(sku: str) -> str:
            """Restock, after thinking longer than the plan's checkpoint_ttl."""
            wait_for(lambda: handler.stats()["reaped"] >= 1, "the reaper")
            with plan_connection("shop") as conn:  # the plan is gone: this raises
                conn.execute("UPDATE items SET qty = qty + 10 WHERE sku = ?", (sku,))
            return "restocked"

        model = ScriptedChatModel(replies=[calls(("slow_restock", {"sku": "plum"})), answer()])
        # ToolNode turns the tool's error into a message, but the plan is lost:
        # the invocation raises at its next checkpointer call and nothing commits.
        app = agent_graph(model, [slow_restock], saver, handle_tool_errors=True)
        with pytest.raises(CheckpointExpiredError):
            app.invoke(ask(), thread())
        assert shop.stock() == START_STOCK and shop.checkpoints() == 0
        assert app.last_run is not None and app.last_run.outcome == "rolled_back"
        assert "CheckpointExpiredError" in (app.last_run.rollback_reason or "")
        assert handler.stats()["active_plans"] == 0


# -- exit waits for tool threads ------------------------------------------------------------------


def test_exit_waits_for_a_tool_thread_after_cancellation(
    shop: Shop, saver: PlanCheckpointer
) -> None:
    inside, finished = threading.Event(), threading.Event()
    refused: list[str] = []

    @plan_tool
    def long_restock(sku: str) -> str:
        """Restock, then keep working (a sync tool: its thread cannot be stopped)."""
        try:
            with plan_connection("shop") as conn:
                conn.execute("UPDATE items SET qty = qty + 10 WHERE sku = ?", (sku,))
            inside.set()
            deadline = time.monotonic() + EVENTUALLY
            while time.monotonic() < deadline:  # until the invocation stops lending
                try:
                    with plan_connection("shop") as conn:
                        conn.execute("SELECT qty FROM items WHERE sku = ?", (sku,))
                except ToolError as exc:
                    refused.append(str(exc))  # it is ending: no more work starts
                    raise
                time.sleep(0.01)
            return "never"
        finally:
            finished.set()

    model = ScriptedChatModel(
        replies=[calls(("long_restock", {"sku": "plum"}), ("restock", {"sku": "pear", "n": 1}))]
    )
    app = agent_graph(model, [long_restock, restock], saver)

    async def scenario() -> None:
        running = asyncio.ensure_future(app.ainvoke(ask(), thread()))
        await asyncio.to_thread(inside.wait, EVENTUALLY)
        running.cancel()
        await asyncio.sleep(0.05)
        running.cancel()  # cancelling again does not stop the wait
        with pytest.raises(asyncio.CancelledError):
            await running
        # The invocation ended only after the tool's thread was done with the plan.
        assert finished.is_set()
        assert refused == [
            "a connection for plan tool 'long_restock' came after PlanGraph invocation "
            f"{app.last_run.plan_id!r} ended; it cannot use the invocation's plan any more"  # type: ignore[union-attr]
        ]

    asyncio.run(scenario())
    assert shop.stock() == START_STOCK
    assert (
        app.last_run is not None and app.last_run.rollback_reason == "the invocation was cancelled"
    )


# -- refusals ------------------------------------------------------------------------------------


def test_plan_tools_and_nodes_refuse_to_run_outside_an_invocation(
    shop: Shop, saver: PlanCheckpointer
) -> None:
    with pytest.raises(ToolError, match=r"plan tool 'restock' ran outside a PlanGraph invocation"):
        restock.invoke({"sku": "plum", "n": 1})

    @plan_node
    def write(state: Fan) -> Fan:
        return {}

    with pytest.raises(ToolError, match=r"plan node 'write' ran outside a PlanGraph invocation"):
        write({})
    with (
        pytest.raises(ToolError, match="works only inside a @plan_tool or @plan_node"),
        plan_connection("shop"),
    ):
        pass
    # A plain graph.invoke (not through PlanGraph) is outside too.
    model = ScriptedChatModel(replies=[calls(("restock", {"sku": "plum", "n": 1}))])
    plain = agent_graph(model, [restock], saver, handle_tool_errors=False).graph
    with pytest.raises(ToolError, match="outside a PlanGraph invocation"):
        plain.invoke(ask(), thread())
    assert shop.stock() == START_STOCK


def test_plangraph_needs_a_plan_checkpointer(saver: PlanCheckpointer) -> None:
    builder = StateGraph(Fan)
    builder.add_node("n", lambda state: {})
    builder.add_edge(START, "n")
    with pytest.raises(TypeError, match="compiled with a PlanCheckpointer"):
        PlanGraph(builder.compile())
    with pytest.raises(TypeError, match="this one's checkpointer is <langgraph"):
        PlanGraph(builder.compile(checkpointer=InMemorySaver()))
    app = PlanGraph(builder.compile(checkpointer=saver, name="shop-graph"))
    assert repr(app) == "<PlanGraph of 'shop-graph'>"
    assert app.checkpointer.resource is saver.resource and app.get_graph == app.graph.get_graph
    assert app.last_run is None


def test_an_invocation_inside_another_is_refused(shop: Shop, saver: PlanCheckpointer) -> None:
    inner = agent_graph(ScriptedChatModel(replies=[answer()]), [], saver)

    def nested(state: Fan) -> Fan:
        inner.invoke(ask(), thread("inner"))
        return {}

    outer = fan_out(saver, nested=nested)
    with pytest.raises(RuntimeError, match="cannot start inside another"):
        outer.invoke({}, thread())
    assert outer.last_run is not None and outer.last_run.outcome == "rolled_back"


def test_nothing_reaches_the_plan_after_the_invocation_ended(
    shop: Shop, saver: PlanCheckpointer
) -> None:
    kept: dict[str, Any] = {}

    @plan_tool
    def keep(sku: str) -> str:
        """Keep what a straggler would use."""
        from langchain_core.runnables.config import var_child_runnable_config

        kept["config"] = var_child_runnable_config.get()
        kept["context"] = contextvars.copy_context()  # what a thread it started would see
        return "kept"

    def straggle() -> None:
        restock.invoke({"sku": "plum", "n": 1})

    model = ScriptedChatModel(replies=[calls(("keep", {"sku": "pear"})), answer()])
    app = agent_graph(model, [keep], saver)
    app.invoke(ask(), thread())

    def borrow() -> None:
        with plan_connection("shop"):
            pass

    with pytest.raises(ToolError, match="has returned; its connection cannot be used"):
        kept["context"].run(borrow)
    with pytest.raises(ToolError, match="plan tool 'restock' came after PlanGraph invocation"):
        kept["context"].run(straggle)
    assert shop.stock() == START_STOCK
    # The invocation's config still names it: the checkpointer refuses rather than
    # write outside the (finished) plan.
    config = {"configurable": {**kept["config"]["configurable"], "checkpoint_id": "x"}}
    with pytest.raises(RuntimeError, match="ended"):
        saver.put_writes(config, [("a", 1)], "straggler")
    assert shop.query("SELECT count(*) FROM langgraph_writes WHERE task_id = 'straggler'") == [(0,)]


def test_a_sync_plan_tool_on_the_event_loop_does_not_block_it(
    shop: Shop, saver: PlanCheckpointer
) -> None:
    release = asyncio.Event()

    @plan_tool
    async def hold(sku: str) -> str:
        """Hold the turn until released."""
        await release.wait()
        return "held"

    @plan_node
    async def both(state: Fan) -> Fan:
        holding = asyncio.ensure_future(hold.ainvoke({"sku": "pear"}))
        await asyncio.sleep(0)
        while not holding.done():
            try:
                restock.invoke({"sku": "plum", "n": 1})  # sync, on the loop's thread
            except ToolError as exc:
                release.set()
                await holding
                return {"log": [str(exc)]}
            await asyncio.sleep(0.01)
        raise AssertionError("hold never held the turn")

    app = fan_out(saver, both=both)
    result = asyncio.run(app.ainvoke({}, thread()))
    assert "called synchronously on the event loop's thread" in result["log"][0]


# -- decorators ----------------------------------------------------------------------------------


def test_plan_tool_takes_tool_s_options_and_forms(shop: Shop, saver: PlanCheckpointer) -> None:
    @plan_tool("stock_of", return_direct=True)
    def look(sku: str) -> str:
        """Return the stock of an item.

        Args:
            sku: The item.
        """
        with plan_connection("shop") as conn:
            return str(conn.execute("SELECT qty FROM items WHERE sku = ?", (sku,)).fetchone()[0])

    @plan_tool(parse_docstring=True)
    def look_again(sku: str) -> str:
        """Return the stock of an item.

        Args:
            sku: The item to look at.
        """
        return sku

    assert isinstance(look, BaseTool) and look.name == "stock_of" and look.return_direct
    assert look_again.args_schema.model_json_schema()["properties"]["sku"]["description"] == (  # type: ignore[union-attr]
        "The item to look at."
    )
    model = ScriptedChatModel(replies=[calls(("stock_of", {"sku": "pear"})), answer()])
    app = agent_graph(model, [look], saver)
    assert app.invoke(ask(), thread())["messages"][-2].content == "3"

    for bad in (42, print, tool(look.func)):  # type: ignore[arg-type]
        with pytest.raises(ToolError):
            plan_tool(bad)  # type: ignore[call-overload]

    def gen(sku: str) -> Iterator[str]:
        """Yield."""
        yield sku

    with pytest.raises(ToolError, match="cannot wrap generator function 'gen'"):
        plan_tool(gen)
    with pytest.raises(ToolError, match="needs a function defined with def"):
        plan_node(operator.add)  # type: ignore[arg-type]
    assert plan_node() is plan_node


def test_plan_node_keeps_the_function_s_signature(shop: Shop, saver: PlanCheckpointer) -> None:
    from langchain_core.runnables import RunnableConfig

    seen: list[str] = []

    @plan_node
    def with_config(state: Fan, config: RunnableConfig) -> Fan:
        seen.append(config["configurable"]["thread_id"])
        return {"log": ["ok"]}

    app = fan_out(saver, with_config=with_config)
    app.invoke({}, thread("configured"))
    assert seen == ["configured"]


def test_a_database_locked_by_another_program_makes_the_invocation_raise(
    tmp_path: Path, handler: DatabaseResourceHandler
) -> None:
    shop = sqlite_shop(tmp_path)
    saver = PlanCheckpointer(handler, shop.resource_with(busy_timeout=0.2))
    saver.setup()
    app = agent_graph(ScriptedChatModel(replies=[answer()]), [], saver)
    with closing(sqlite3.connect(shop.resource.location, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        from cleveragents.errors import ResourceBusyError

        with pytest.raises(ResourceBusyError):
            app.invoke(ask(), thread())
        other.execute("ROLLBACK")
    assert app.last_run is not None and app.last_run.outcome == "rolled_back"
    app.invoke(ask(), thread())
    assert shop.checkpoints() > 0


# -- a plan that expires or fails to commit -------------------------------------------------------


@pytest.mark.parametrize("then", ["raise", "interrupt", "swallow the error"])
def test_a_tool_that_outlives_its_plan_makes_the_invocation_raise(shop: Shop, then: str) -> None:
    with make_handler() as handler:
        saver = PlanCheckpointer(handler, shop.resource_with(checkpoint_ttl=0.3))

        @plan_tool
        def slow_restock(sku: str) -> str:
            """Restock, then think longer than the plan's checkpoint_ttl."""
            with plan_connection("shop") as conn:
                conn.execute("UPDATE items SET qty = qty + 10 WHERE sku = ?", (sku,))
            wait_for(lambda: handler.stats()["reaped"] >= 1, "the reaper")
            if then == "raise":
                raise ValueError("changed my mind")  # its rollback finds the plan gone
            if then == "interrupt":
                interrupt("still there?")
            try:
                with plan_connection("shop"):
                    pass
            except CheckpointExpiredError:
                return "never mind"  # hiding the handler's error does not hide it
            raise AssertionError("the plan was reaped")

        model = ScriptedChatModel(replies=[calls(("slow_restock", {"sku": "plum"})), answer()])
        app = agent_graph(model, [slow_restock], saver, handle_tool_errors=True)
        with pytest.raises(CheckpointExpiredError):
            app.invoke(ask(), thread())
        assert shop.stock() == START_STOCK and shop.checkpoints() == 0
        assert app.last_run is not None and app.last_run.outcome == "rolled_back"
        assert handler.stats()["active_plans"] == 0


def test_a_plan_tool_called_after_the_plan_expired_makes_the_invocation_raise(shop: Shop) -> None:
    with make_handler() as handler:
        saver = PlanCheckpointer(handler, shop.resource_with(checkpoint_ttl=0.3))

        def late(state: Fan) -> Fan:
            wait_for(lambda: handler.stats()["reaped"] >= 1, "the reaper")
            restock.invoke({"sku": "plum", "n": 10})  # its checkpoint finds the plan gone
            return {}

        app = fan_out(saver, late=late)
        with pytest.raises(CheckpointExpiredError):
            app.invoke({}, thread())
        assert shop.stock() == START_STOCK and shop.checkpoints() == 0


def test_closing_the_handler_mid_invocation_commits_nothing(shop: Shop) -> None:
    handler = make_handler()
    saver = PlanCheckpointer(handler, shop.resource)

    def close_it(messages: Any) -> Any:
        handler.close()  # say, the process shuts down
        return answer()

    model = ScriptedChatModel(replies=[calls(("restock", {"sku": "plum", "n": 10})), close_it])
    app = agent_graph(model, [restock], saver)
    from cleveragents.errors import HandlerClosedError

    with pytest.raises(HandlerClosedError):
        app.invoke(ask(), thread())
    assert shop.stock() == START_STOCK and shop.checkpoints() == 0
    assert app.last_run is not None and app.last_run.outcome == "rolled_back"


@pytest.mark.parametrize("how", ["invoke", "ainvoke"])
def test_a_commit_that_fails_makes_the_invocation_raise(
    shop: Shop, saver: PlanCheckpointer, how: str
) -> None:
    shop.query(
        "CREATE TABLE orders (sku TEXT REFERENCES items (sku) DEFERRABLE INITIALLY DEFERRED)"
    )

    @plan_tool
    def order(sku: str) -> str:
        """Order an item (checked only when the plan commits)."""
        with plan_connection("shop") as conn:
            conn.execute("INSERT INTO orders VALUES (?)", (sku,))
        return "ordered"

    model = ScriptedChatModel(
        replies=[calls(("restock", {"sku": "plum", "n": 10}), ("order", {"sku": "kiwi"})), answer()]
    )
    app = agent_graph(model, [restock, order], saver)
    from cleveragents.errors import ResourceError

    with pytest.raises(ResourceError, match="FOREIGN KEY constraint failed"):
        if how == "invoke":
            app.invoke(ask(), thread())
        else:
            asyncio.run(app.ainvoke(ask(), thread()))
    assert shop.stock() == START_STOCK and shop.checkpoints() == 0
    assert shop.query("SELECT count(*) FROM orders") == [(0,)]
    run = app.last_run
    assert run is not None and run.outcome == "rolled_back"
    assert (run.rollback_reason or "").startswith("releasing it failed: ")


# -- more interrupts -------------------------------------------------------------------------------


def test_a_plain_interrupt_commits_and_resumes(shop: Shop, saver: PlanCheckpointer) -> None:
    def human(state: Fan) -> Fan:
        return {"log": [str(interrupt("name?"))]}

    app = fan_out(saver, human=human)
    assert "__interrupt__" in app.invoke({}, thread())
    assert (
        app.last_run is not None and app.last_run.interrupted and app.last_run.outcome == "released"
    )
    assert app.invoke(Command(resume="ada"), thread()) == {"log": ["ada"]}


def test_an_interrupt_in_a_tool_inside_a_plan_node_undoes_the_node(
    shop: Shop, saver: PlanCheckpointer
) -> None:
    @plan_tool
    def ship(sku: str) -> str:
        """Ship after approval."""
        with plan_connection("shop") as conn:
            conn.execute("UPDATE items SET qty = qty - 1 WHERE sku = ?", (sku,))
        return str(interrupt("ship?"))

    @plan_node
    def clerk(state: Fan) -> Fan:
        restock.invoke({"sku": "plum", "n": 10})
        return {"log": [ship.invoke({"sku": "pear"})]}

    app = fan_out(saver, clerk=clerk)
    app.invoke({}, thread())
    assert shop.stock() == START_STOCK
    assert [r.tool for r in app.last_run.tool_rollbacks] == ["ship", "clerk"]  # type: ignore[union-attr]
    assert app.invoke(Command(resume="yes"), thread()) == {"log": ["yes"]}
    assert shop.stock() == {"pear": 2, "plum": 10}


def test_a_plain_tool_interrupt_after_another_task_s_call_raises_at_the_end(
    shop: Shop, saver: PlanCheckpointer
) -> None:
    x_restocked, y_sold = threading.Event(), threading.Event()

    @tool
    def approve(question: str) -> str:
        """Ask a human (a plain tool)."""
        return str(interrupt(question))

    def x(state: Fan) -> Fan:
        restock.invoke({"sku": "plum", "n": 10})
        x_restocked.set()
        assert y_sold.wait(EVENTUALLY)
        approve.invoke({"question": "ok?"})
        return {"log": ["x"]}

    def y(state: Fan) -> Fan:
        assert x_restocked.wait(EVENTUALLY)
        sell.invoke({"sku": "pear", "n": 1})
        y_sold.set()
        return {"log": ["y"]}

    app = fan_out(saver, x=x, y=y)
    with pytest.raises(ToolError, match=r"interrupt\(\) in a task cannot be undone alone"):
        app.invoke({}, thread())
    assert shop.stock() == START_STOCK and shop.checkpoints() == 0
    assert (app.last_run.rollback_reason or "").startswith("ToolError: interrupt()")  # type: ignore[union-attr]


def test_calls_waiting_for_their_turn_when_the_plan_is_lost_do_not_run(shop: Shop) -> None:
    with make_handler() as handler:
        saver = PlanCheckpointer(handler, shop.resource_with(checkpoint_ttl=0.3))
        a_inside = threading.Event()
        errors: list[BaseException] = []

        @plan_tool
        def slow(sku: str) -> str:
            """Hold the turn until the plan is reaped, then use it."""
            a_inside.set()
            wait_for(lambda: handler.stats()["reaped"] >= 1, "the reaper")
            with plan_connection("shop"):
                return "never"

        def call(tool: BaseTool) -> None:
            try:
                tool.invoke({"sku": "plum", "n": 1} if tool is restock else {"sku": "plum"})
            except BaseException as exc:
                errors.append(exc)

        @plan_node
        def clerk(state: Fan) -> Fan:
            first = threading.Thread(target=contextvars.copy_context().run, args=(call, slow))
            first.start()
            assert a_inside.wait(EVENTUALLY)
            # restock waits for slow's turn; by then the plan is gone: it never runs.
            second = threading.Thread(target=contextvars.copy_context().run, args=(call, restock))
            second.start()
            first.join(EVENTUALLY)
            second.join(EVENTUALLY)
            return {}

        app = fan_out(saver, clerk=clerk)
        with pytest.raises(CheckpointExpiredError):
            app.invoke({}, thread())
        assert [type(error) for error in errors] == [CheckpointExpiredError] * 2
        assert errors[0] is errors[1]  # the first handler error is what everyone gets
        assert shop.stock() == START_STOCK and shop.checkpoints() == 0
