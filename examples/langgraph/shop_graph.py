"""A LangGraph shop assistant whose graph state and database writes commit together.

Run it (after ``pip install -e '.[langgraph]'``), on a fresh database in a
temporary folder, with a scripted chat model (no network, no API key)::

    python examples/langgraph/shop_graph.py

What happens, one plan per graph invocation:

1. The model restocks plums and tries to sell 50 pears. The sale raises after
   its UPDATE ran: that tool call alone is rolled back to its checkpoint, the
   model is told, and it sells 2 pears instead.
2. The ``dispatch`` node books the van, then waits for a human at
   ``interrupt()``. The invocation ends there and is released: the restock,
   the sale and the graph state up to the interrupt commit together, while
   the interrupted node's booking is rolled back (LangGraph runs it again).
3. A second process, with a new handler, resumes with the human's "yes":
   ``dispatch`` runs again and books the van exactly once.

After each step the rows (read through a separate sqlite3 connection) and the
graph state are printed side by side, and checked to agree.
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AnyMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode
from langgraph.types import Command, interrupt

from cleveragents.integrations.langgraph import (
    PlanCheckpointer,
    PlanGraph,
    plan_connection,
    plan_node,
    plan_tool,
)
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler

THREAD = {"configurable": {"thread_id": "customer-42"}}


# -- the tools and the approval node ---------------------------------------------------------------


@plan_tool
def restock(sku: str, n: int) -> str:
    """Add n units of an item to the stock.

    Args:
        sku: The item.
        n: How many units to add.
    """
    with plan_connection("shop") as conn:
        conn.execute("UPDATE items SET qty = qty + ? WHERE sku = ?", (n, sku))
    return f"restocked {n} {sku}"


@plan_tool
def sell(sku: str, n: int) -> str:
    """Sell n units of an item; fails if there are not enough.

    Args:
        sku: The item.
        n: How many units to sell.
    """
    with plan_connection("shop") as conn:
        conn.execute("UPDATE items SET qty = qty - ? WHERE sku = ?", (n, sku))
        (left,) = conn.execute("SELECT qty FROM items WHERE sku = ?", (sku,)).fetchone()
    if left < 0:
        # The UPDATE already ran: this call is rolled back to its checkpoint.
        raise ValueError(f"only {left + n} {sku} in stock, cannot sell {n}")
    return f"sold {n} {sku}, {left} left"


class ShopState(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    dispatched: bool


@plan_node
def dispatch(state: ShopState) -> dict[str, Any]:
    """Book the delivery van, once a human says yes."""
    with plan_connection("shop") as conn:
        conn.execute("INSERT INTO bookings (what) VALUES ('van for customer-42')")
    # LangGraph stops here and, on resume, runs this node again from its start:
    # the booking above is rolled back with the interrupted node, so it happens once.
    answer = interrupt("book the van for customer-42?")
    if answer != "yes":
        raise ValueError(f"the human said {answer!r}")
    return {"dispatched": True}


# -- a scripted chat model (no network) ------------------------------------------------------------


class ScriptedChatModel(BaseChatModel):
    """Answers with the next scripted message, whatever it is asked."""

    replies: list[AIMessage]

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedChatModel:
        return self

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        turn = sum(isinstance(message, AIMessage) for message in messages)
        return ChatResult(generations=[ChatGeneration(message=self.replies[turn])])


def call(name: str, call_id: str, **args: Any) -> dict[str, Any]:
    return {"name": name, "args": args, "id": call_id, "type": "tool_call"}


MODEL = ScriptedChatModel(
    replies=[
        AIMessage(
            "",
            tool_calls=[
                call("restock", "c1", sku="plum", n=10),
                call("sell", "c2", sku="pear", n=50),
            ],
        ),
        AIMessage("", tool_calls=[call("sell", "c3", sku="pear", n=2)]),
        AIMessage("Plums restocked; 2 pears sold (50 was more than we had). Booking the van."),
    ]
)


# -- the graph -------------------------------------------------------------------------------------


def build(handler: DatabaseResourceHandler, shop: Resource) -> PlanGraph:
    """The shop assistant: model <-> tools, then dispatch (with its approval)."""

    def agent(state: ShopState) -> dict[str, Any]:
        return {"messages": [MODEL.invoke(state["messages"])]}

    def after_agent(state: ShopState) -> str:
        return "tools" if state["messages"][-1].tool_calls else "dispatch"

    builder = StateGraph(ShopState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([restock, sell], handle_tool_errors=True))
    builder.add_node("dispatch", dispatch)
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", after_agent, ["tools", "dispatch"])
    builder.add_edge("tools", "agent")
    builder.add_edge("dispatch", END)
    saver = PlanCheckpointer(handler, shop)
    saver.setup()  # creates langgraph_checkpoints, _blobs and _writes in shop.db (once)
    return PlanGraph(builder.compile(checkpointer=saver))


# -- looking at rows and state ---------------------------------------------------------------------


def rows(db: Path) -> tuple[dict[str, int], int, int]:
    """Read stock, bookings and checkpoints through a separate sqlite3 connection."""
    with closing(sqlite3.connect(db)) as conn:
        stock = dict(conn.execute("SELECT sku, qty FROM items ORDER BY sku").fetchall())
        (bookings,) = conn.execute("SELECT count(*) FROM bookings").fetchone()
        (checkpoints,) = conn.execute("SELECT count(*) FROM langgraph_checkpoints").fetchone()
    return stock, bookings, checkpoints


def show(title: str, db: Path, app: PlanGraph) -> None:
    """Print rows and graph state side by side, and check that they tell the same story."""
    stock, bookings, checkpoints = rows(db)
    state = app.get_state(THREAD)
    tools = [m for m in state.values.get("messages", []) if isinstance(m, ToolMessage)]
    print(f"\n== {title}")
    print(f"   rows:  stock {stock}, van bookings {bookings}, checkpoints {checkpoints}")
    print(f"   state: next {state.next}, dispatched {state.values.get('dispatched', False)}")
    for message in tools:
        text = str(message.content).splitlines()[0][:60]
        print(f"          tool {message.name!r} ({message.status}): {text}")
    # What the state says happened is exactly what the rows show.
    sold = sum(2 for m in tools if m.name == "sell" and m.status == "success")
    restocked = sum(10 for m in tools if m.name == "restock" and m.status == "success")
    assert stock == {"pear": 3 - sold, "plum": restocked}, "rows and state disagree!"
    assert bookings == int(bool(state.values.get("dispatched"))), "rows and state disagree!"
    print("   rows and state agree")


def fresh_database(db: Path) -> None:
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE items (sku TEXT PRIMARY KEY, qty INTEGER NOT NULL)")
        conn.execute("CREATE TABLE bookings (what TEXT NOT NULL)")
        conn.executemany("INSERT INTO items VALUES (?, ?)", [("pear", 3), ("plum", 0)])
        conn.commit()


# -- the two processes -----------------------------------------------------------------------------


def first_process(db: Path) -> None:
    shop = Resource(name="shop", kind="database", engine="sqlite", location=str(db))
    with DatabaseResourceHandler() as handler:
        app = build(handler, shop)
        show("before: a fresh database", db, app)
        result = app.invoke({"messages": [HumanMessage("Restock plums, sell 50 pears.")]}, THREAD)
        run = app.last_run
        assert run is not None
        print(f"\n-- invocation {run.plan_id}: {run.outcome}, interrupted={run.interrupted}")
        for rollback in run.tool_rollbacks:
            print(f"   rolled back {rollback.tool!r} to {rollback.checkpoint}: {rollback.error}")
        print(f"   waiting for a human: {result['__interrupt__'][0].value!r}")
        show("after the first invocation (stopped at the interrupt)", db, app)


def second_process(db: Path) -> None:
    shop = Resource(name="shop", kind="database", engine="sqlite", location=str(db))
    with DatabaseResourceHandler() as handler:  # a new process, a new handler
        app = build(handler, shop)
        app.invoke(Command(resume="yes"), THREAD)
        run = app.last_run
        assert run is not None
        print(f"\n-- resumed in a second process, invocation {run.plan_id}: {run.outcome}")
        for rollback in run.tool_rollbacks:
            print(f"   rolled back {rollback.tool!r} to {rollback.checkpoint}: {rollback.error}")
        show("after the resume: the van is booked exactly once", db, app)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, help="database file (default: a fresh temporary one)")
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.resume:
        second_process(args.db)
        return 0
    with tempfile.TemporaryDirectory() as folder:
        db = args.db or Path(folder) / "shop.db"
        if not db.exists():
            fresh_database(db)
        first_process(db)
        done = subprocess.run([sys.executable, __file__, "--resume", "--db", str(db)], check=False)
        return done.returncode


if __name__ == "__main__":
    sys.exit(main())
