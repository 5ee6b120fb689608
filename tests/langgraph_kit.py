"""What the LangGraph tests share: a scripted chat model, a shop database on either engine, graphs.

Nothing here talks to a network. Every check of rows or checkpoints goes
through a separate connection (sqlite3 or psycopg), never the handler.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AnyMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langgraph.graph import START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode, tools_condition
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

PG_VARIABLE = "CLEVERAGENTS_TEST_PG_DSN"
PG_SKIP = (
    f"PostgreSQL tests need {PG_VARIABLE}; start a throwaway server with "
    'eval "$(scripts/pg-test-server start)"'
)
#: A generous bound for things that must happen eventually (never a speed check).
EVENTUALLY = 10.0
SHOP = "CREATE TABLE items (sku TEXT PRIMARY KEY, qty INTEGER NOT NULL)"
STOCK = (("pear", 3), ("plum", 0))


# -- the model ----------------------------------------------------------------------------


class ScriptedChatModel(BaseChatModel):
    """A chat model that answers with the next scripted message (or calls a function for it)."""

    replies: list[Any]
    position: int = 0

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedChatModel:
        return self

    def _next(self, messages: list[BaseMessage]) -> AIMessage:
        if self.position >= len(self.replies):
            raise AssertionError(f"the script has only {len(self.replies)} replies")
        reply = self.replies[self.position]
        self.position += 1
        return reply(messages) if callable(reply) else reply

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=self._next(messages))])


def calls(*tool_calls: tuple[str, dict[str, Any]]) -> AIMessage:
    """Return a model message asking for *tool_calls* (name, args), with ids c1, c2, ..."""
    return AIMessage(
        content="",
        tool_calls=[
            {"name": name, "args": args, "id": f"c{index}", "type": "tool_call"}
            for index, (name, args) in enumerate(tool_calls, 1)
        ],
    )


def answer(text: str = "done") -> AIMessage:
    return AIMessage(content=text)


# -- the shop's tools ----------------------------------------------------------------------


@plan_tool
def restock(sku: str, n: int) -> str:
    """Add n units of an item to the stock."""
    with plan_connection("shop") as conn:
        conn.execute(_sql(conn, "UPDATE items SET qty = qty + ? WHERE sku = ?"), (n, sku))
    return f"restocked {n} {sku}"


@plan_tool
def sell(sku: str, n: int) -> str:
    """Sell n units of an item; fails (after writing) if there are not enough."""
    with plan_connection("shop") as conn:
        conn.execute(_sql(conn, "UPDATE items SET qty = qty - ? WHERE sku = ?"), (n, sku))
        (left,) = conn.execute(_sql(conn, "SELECT qty FROM items WHERE sku = ?"), (sku,)).fetchone()
    if left < 0:
        raise ValueError(f"only {left + n} {sku} in stock, cannot sell {n}")
    return f"sold {n} {sku}"


def _sql(conn: Any, sql: str) -> str:
    """Write *sql* with ``?``; psycopg wants ``%s``."""
    return sql if isinstance(conn, sqlite3.Connection) else sql.replace("?", "%s")


# -- graphs ---------------------------------------------------------------------------------


class ChatState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def agent_graph(
    model: ScriptedChatModel,
    tools: Sequence[Any],
    saver: PlanCheckpointer,
    *,
    handle_tool_errors: Any = True,
    before_model: Callable[[], None] | None = None,
) -> PlanGraph:
    """Return a hand-built agent: model node, ToolNode, and back, as one PlanGraph."""

    def agent(state: ChatState) -> dict[str, Any]:
        if before_model is not None:
            before_model()
        return {"messages": [model.invoke(state["messages"])]}

    builder = StateGraph(ChatState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode(list(tools), handle_tool_errors=handle_tool_errors))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return PlanGraph(builder.compile(checkpointer=saver))


class OrderState(TypedDict, total=False):
    decision: str


def approval_graph(saver: PlanCheckpointer, runs: list[str] | None = None) -> PlanGraph:
    """Return a graph that restocks plums, then sells a pear after a human approves.

    Both nodes are plan nodes; ``sell_pear`` writes, then waits at ``interrupt()``.
    """
    seen = runs if runs is not None else []

    @plan_node
    def restock_plums(state: OrderState) -> dict[str, Any]:
        seen.append("restock_plums")
        with plan_connection("shop") as conn:
            conn.execute("UPDATE items SET qty = qty + 10 WHERE sku = 'plum'")
        return {}

    @plan_node
    def sell_pear(state: OrderState) -> dict[str, Any]:
        seen.append("sell_pear")
        with plan_connection("shop") as conn:
            conn.execute("UPDATE items SET qty = qty - 1 WHERE sku = 'pear'")
        decision = interrupt("sell one pear?")
        if decision != "yes":
            raise ValueError(f"not approved: {decision!r}")
        return {"decision": decision}

    builder = StateGraph(OrderState)
    builder.add_node("restock_plums", restock_plums)
    builder.add_node("sell_pear", sell_pear)
    builder.add_edge(START, "restock_plums")
    builder.add_edge("restock_plums", "sell_pear")
    return PlanGraph(builder.compile(checkpointer=saver))


def ask(text: str = "restock plum, sell pears") -> dict[str, Any]:
    return {"messages": [HumanMessage(text)]}


def thread(name: str = "t1") -> dict[str, Any]:
    return {"configurable": {"thread_id": name}}


# -- the database, on either engine -----------------------------------------------------------


class Shop:
    """A shop database on one engine: its resource, and a separate connection to look at it."""

    def __init__(self, engine: str, resource: Resource, connect: Callable[[], Any]) -> None:
        self.engine = engine
        self.resource = resource
        self._connect = connect

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run *sql* (``?`` placeholders) on a new, separate connection; return its rows."""
        with closing(self._connect()) as conn:
            if self.engine == "postgresql":
                sql = sql.replace("?", "%s")
            cursor = conn.execute(sql, params)
            rows = cursor.fetchall() if cursor.description is not None else []
            if self.engine == "sqlite":
                conn.commit()
            return [tuple(row) for row in rows]

    def stock(self) -> dict[str, int]:
        return dict(self.query("SELECT sku, qty FROM items ORDER BY sku"))

    def checkpoints(self, thread_id: str = "t1") -> int:
        """Count the committed checkpoints of *thread_id*."""
        ((count,),) = self.query(
            "SELECT count(*) FROM langgraph_checkpoints WHERE thread_id = ?", (thread_id,)
        )
        return int(count)

    def writes(self, thread_id: str = "t1") -> int:
        ((count,),) = self.query(
            "SELECT count(*) FROM langgraph_writes WHERE thread_id = ?", (thread_id,)
        )
        return int(count)

    def latest(self, thread_id: str = "t1") -> str | None:
        """Return the id of the newest committed checkpoint of *thread_id*."""
        rows = self.query(
            "SELECT max(checkpoint_id) FROM langgraph_checkpoints WHERE thread_id = ?",
            (thread_id,),
        )
        return rows[0][0] if rows else None

    def resource_with(self, **options: Any) -> Resource:
        """Return this shop's resource with some settings changed."""
        return Resource(
            self.resource.name, self.resource.kind, **{**self.resource.options, **options}
        )


def sqlite_shop(folder: Path, name: str = "shop") -> Shop:
    path = folder / f"{name}.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(SHOP)
        conn.executemany("INSERT INTO items VALUES (?, ?)", STOCK)
        conn.commit()
    resource = Resource(name, "database", engine="sqlite", location=str(path))
    return Shop("sqlite", resource, lambda: sqlite3.connect(path, timeout=EVENTUALLY))


@contextmanager
def postgresql_shop(name: str = "shop") -> Iterator[Shop]:
    psycopg = pytest.importorskip("psycopg")
    base = os.environ.get(PG_VARIABLE)
    if not base:
        pytest.skip(PG_SKIP)
    schema = f"lg_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    dsn = psycopg.conninfo.make_conninfo(base, options=f"-c search_path={schema}")

    def connect() -> Any:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=10)

    with closing(connect()) as conn:
        conn.execute(SHOP)
        for sku, qty in STOCK:
            conn.execute("INSERT INTO items VALUES (%s, %s)", (sku, qty))
    resource = Resource(name, "database", engine="postgresql", dsn=dsn, busy_timeout=2.0)
    try:
        yield Shop("postgresql", resource, connect)
    finally:
        with psycopg.connect(base, autocommit=True) as admin:
            admin.execute("SET lock_timeout = '20s'")
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


@contextmanager
def shop_on(engine: str, folder: Path) -> Iterator[Shop]:
    if engine == "sqlite":
        yield sqlite_shop(folder)
    else:
        with postgresql_shop() as shop:
            yield shop


class Rendezvous:
    """Lets a test see whether two calls ever ran at the same time (no timing assertion).

    Each call announces itself and waits a while for another to show up; with
    calls taking turns nobody ever shows up, without them somebody always does.
    """

    def __init__(self, wait: float = 0.5) -> None:
        self._wait = wait
        self._lock = threading.Lock()
        self._inside = 0
        self._arrived = threading.Condition(self._lock)
        self.overlaps = 0
        self.calls = 0

    def meet(self) -> None:
        with self._arrived:
            self._inside += 1
            self.calls += 1
            self._arrived.notify_all()
            self._arrived.wait_for(lambda: self._inside > 1, timeout=self._wait)
            if self._inside > 1:
                self.overlaps += 1
            self._inside -= 1


def make_handler(**options: Any) -> DatabaseResourceHandler:
    options.setdefault("max_connections", 8)
    options.setdefault("acquire_timeout", 5.0)
    return DatabaseResourceHandler(**options)


# -- a second process ---------------------------------------------------------------------------


def child_command(command: str, resource: Resource) -> list[str]:
    """Return the argv that runs *command* on *resource* in a new process (see main())."""
    options = json.dumps(dict(resource.options))
    return [sys.executable, __file__, command, resource.name, options]


def main(argv: list[str]) -> None:
    """Run one step of a scenario in this (new) process, with a new handler."""
    command, name, options = argv
    resource = Resource(name, "database", **json.loads(options))
    with make_handler() as handler:
        saver = PlanCheckpointer(handler, resource)
        if command == "approval-start":
            result = approval_graph(saver).invoke({}, thread())
            print(json.dumps({"interrupted": "__interrupt__" in result}), flush=True)
        elif command == "approval-resume":
            app = approval_graph(saver)
            result = app.invoke(Command(resume="yes"), thread())
            assert app.last_run is not None
            print(json.dumps({"result": result, "outcome": app.last_run.outcome}), flush=True)
        elif command == "hang-after-restock":

            def hang() -> None:
                if model.position == 1:  # the tool has written; the model thinks forever
                    print("ready", flush=True)
                    time.sleep(600)

            model = ScriptedChatModel(replies=[calls(("restock", {"sku": "plum", "n": 10}))])
            agent_graph(model, [restock], saver, before_model=hang).invoke(ask(), thread())
        else:
            raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
