"""PlanGraph on PlanCheckpointer against the same graph on LangGraph's own savers, same run.

Three measurements:

``overhead`` (default): one small agent invocation (model -> one tool call
-> model) on SQLite, timed on ``InMemorySaver``, on the stock
``SqliteSaver``, and as a PlanGraph on ``PlanCheckpointer``; twice: with a
tool that updates a row (with the stock savers through its own autocommit
``sqlite3`` connection, what a LangGraph user does today; with ours a
``@plan_tool``), and with a tool that writes nothing (the savers' cost
alone). Rounds alternate the three, each invocation on a fresh thread; a
ratio is the median of the per-round ratios.

``round trips`` (with ``--dsn`` or ``CLEVERAGENTS_TEST_PG_DSN``): the same
invocation on PostgreSQL, counting the statements each saver sends (every
``Cursor.execute``/``executemany``), per invocation and per checkpoint
written, for PlanCheckpointer and for the stock ``PostgresSaver``.

``--endings``: the same endings on the stock ``SqliteSaver`` and on
PlanCheckpointer, printing what the rows and the graph state say afterwards
(the table in ``docs/langgraph.md`` comes from this run).

Usage (the stock savers are not dependencies of cleveragents)::

    pip install langgraph-checkpoint-sqlite langgraph-checkpoint-postgres
    python benchmarks/bench_langgraph.py [--invocations 40] [--rounds 7] [--json]
    python benchmarks/bench_langgraph.py --endings
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager, suppress
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AnyMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
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

#: Where the PostgresSaver of an ending keeps its tables (inherited by the killed child).
SAVER_DSN = "BENCH_LANGGRAPH_SAVER_DSN"

try:
    from langgraph.checkpoint.sqlite import SqliteSaver
except ImportError:  # reported when needed
    SqliteSaver = None


class ScriptedChatModel(BaseChatModel):
    """Turn 1 asks for one restock; turn 2 answers. Stateless, so every invocation is alike."""

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedChatModel:
        return self

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        if any(isinstance(message, AIMessage) for message in messages):
            reply = AIMessage("done")
        else:
            call = {"name": "restock", "args": {"sku": "plum", "n": 1}, "id": "c1"}
            reply = AIMessage("", tool_calls=[{**call, "type": "tool_call"}])
        return ChatResult(generations=[ChatGeneration(message=reply)])


class ChatState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


MODEL = ScriptedChatModel()


def agent_builder(restock_tool: Any) -> StateGraph:
    def agent(state: ChatState) -> dict[str, Any]:
        return {"messages": [MODEL.invoke(state["messages"])]}

    builder = StateGraph(ChatState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([restock_tool], handle_tool_errors=True))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return builder


@plan_tool("restock")
def plan_restock(sku: str, n: int) -> str:
    """Add n units of an item."""
    with plan_connection("shop") as conn:
        conn.execute(_placeholders(conn, "UPDATE items SET qty = qty + ? WHERE sku = ?"), (n, sku))
    return "ok"


@plan_tool("restock")
def plan_noop(sku: str, n: int) -> str:
    """Pretend to add n units of an item (a plan tool that writes nothing)."""
    return "ok"


@tool("restock")
def noop(sku: str, n: int) -> str:
    """Pretend to add n units of an item."""
    return "ok"


def _placeholders(conn: Any, sql: str) -> str:
    return sql if isinstance(conn, sqlite3.Connection) else sql.replace("?", "%s")


def stock_restock(connect: Callable[[], Any]) -> Any:
    """The tool as written without cleveragents: its own connection, committed at once."""

    @tool("restock")
    def restock(sku: str, n: int) -> str:
        """Add n units of an item."""
        with closing(connect()) as conn:
            conn.execute(
                _placeholders(conn, "UPDATE items SET qty = qty + ? WHERE sku = ?"), (n, sku)
            )
            conn.commit()
        return "ok"

    return restock


def make_shop(path: Path) -> Path:
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode = wal")
        conn.execute("CREATE TABLE items (sku TEXT PRIMARY KEY, qty INTEGER NOT NULL)")
        conn.execute("CREATE TABLE bookings (what TEXT NOT NULL)")
        conn.executemany("INSERT INTO items VALUES (?, ?)", [("pear", 3), ("plum", 0)])
        conn.commit()
    return path


def ask() -> dict[str, Any]:
    return {"messages": [HumanMessage("restock plums")]}


def thread(name: str | None = None) -> dict[str, Any]:
    return {"configurable": {"thread_id": name or uuid.uuid4().hex}}


# -- overhead --------------------------------------------------------------------------------------


def overhead(invocations: int, rounds: int, *, writes: bool) -> dict[str, Any]:
    """Time the invocation on the three savers; with *writes*, the tool updates a row."""
    if SqliteSaver is None:
        raise SystemExit("pip install langgraph-checkpoint-sqlite for the stock SqliteSaver")
    with tempfile.TemporaryDirectory() as folder, DatabaseResourceHandler() as handler:
        memory_db = make_shop(Path(folder) / "memory.db")
        stock_db = make_shop(Path(folder) / "stock.db")
        ours_db = make_shop(Path(folder) / "ours.db")
        memory_tool = stock_restock(lambda: sqlite3.connect(memory_db, isolation_level=None))
        stock_tool = stock_restock(lambda: sqlite3.connect(stock_db, isolation_level=None))
        ours_tool = plan_restock if writes else plan_noop
        if not writes:
            memory_tool = stock_tool = noop
        saver_conn = sqlite3.connect(stock_db, check_same_thread=False)
        shop = Resource("shop", "database", engine="sqlite", location=str(ours_db))
        variants: dict[str, Any] = {
            "InMemorySaver": agent_builder(memory_tool).compile(checkpointer=InMemorySaver()),
            "SqliteSaver": agent_builder(stock_tool).compile(checkpointer=SqliteSaver(saver_conn)),
            "PlanCheckpointer": PlanGraph(
                agent_builder(ours_tool).compile(checkpointer=PlanCheckpointer(handler, shop))
            ),
        }
        for app in variants.values():  # warm up: imports, table creation, caches
            app.invoke(ask(), thread())
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        order = list(variants)
        for round_number in range(rounds):
            for name in order[round_number % 3 :] + order[: round_number % 3]:
                app = variants[name]
                started = time.perf_counter()
                for _ in range(invocations):
                    app.invoke(ask(), thread())
                seconds[name].append((time.perf_counter() - started) / invocations)
        saver_conn.close()
    per_invocation = {name: statistics.median(values) for name, values in seconds.items()}
    ours = seconds["PlanCheckpointer"]
    return {
        "tool_writes_a_row": writes,
        "invocations_per_round": invocations,
        "rounds": rounds,
        "ms_per_invocation": {
            name: round(value * 1000, 2) for name, value in per_invocation.items()
        },
        "ratio_vs_InMemorySaver": _ratio(ours, seconds["InMemorySaver"]),
        "ratio_vs_SqliteSaver": _ratio(ours, seconds["SqliteSaver"]),
    }


def _ratio(ours: list[float], theirs: list[float]) -> float:
    return round(statistics.median(o / t for o, t in zip(ours, theirs, strict=True)), 2)


# -- round trips on PostgreSQL ---------------------------------------------------------------------


@contextmanager
def counted_statements() -> Iterator[list[str]]:
    """Count every statement psycopg sends from this process (execute and executemany)."""
    import psycopg

    sent: list[str] = []
    execute, executemany = psycopg.Cursor.execute, psycopg.Cursor.executemany

    def counting_execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(str(query).split(None, 1)[0].upper() if isinstance(query, str) else "SQL")
        return execute(self, query, *args, **kwargs)

    def counting_executemany(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append("EXECUTEMANY")
        return executemany(self, query, *args, **kwargs)

    psycopg.Cursor.execute = counting_execute  # type: ignore[method-assign]
    psycopg.Cursor.executemany = counting_executemany  # type: ignore[method-assign]
    try:
        yield sent
    finally:
        psycopg.Cursor.execute = execute  # type: ignore[method-assign]
        psycopg.Cursor.executemany = executemany  # type: ignore[method-assign]


def round_trips(dsn: str, invocations: int) -> dict[str, Any]:
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    scoped = psycopg.conninfo.make_conninfo(dsn, options=f"-c search_path={schema}")
    try:
        with psycopg.connect(scoped, autocommit=True) as conn:
            conn.execute("CREATE TABLE items (sku TEXT PRIMARY KEY, qty INTEGER NOT NULL)")
            conn.execute("INSERT INTO items VALUES ('pear', 3), ('plum', 0)")
        report: dict[str, Any] = {}
        with DatabaseResourceHandler() as handler:
            shop = Resource("shop", "database", engine="postgresql", dsn=scoped)
            saver = PlanCheckpointer(handler, shop)
            app = PlanGraph(agent_builder(plan_restock).compile(checkpointer=saver))
            app.invoke(ask(), thread())  # warm up: tables, pooled session
            report["PlanCheckpointer"] = _count(app, invocations, scoped)
        try:
            from langgraph.checkpoint.postgres import PostgresSaver
        except ImportError:
            report["PostgresSaver"] = "pip install langgraph-checkpoint-postgres"
        else:
            with PostgresSaver.from_conn_string(scoped) as stock_saver:
                stock_saver.setup()
                restock = stock_restock(lambda: psycopg.connect(scoped, autocommit=True))
                stock_app = agent_builder(restock).compile(checkpointer=stock_saver)
                stock_app.invoke(ask(), thread())
                report["PostgresSaver"] = _count(stock_app, invocations, scoped)
        return report
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def _count(app: Any, invocations: int, dsn: str) -> dict[str, Any]:
    import psycopg

    threads = [uuid.uuid4().hex for _ in range(invocations)]
    with counted_statements() as sent:
        for name in threads:
            app.invoke(ask(), thread(name))
    kinds: dict[str, int] = {}
    for kind in sent:
        kinds[kind] = kinds.get(kind, 0) + 1
    with psycopg.connect(dsn) as conn:
        table = "langgraph_checkpoints" if "PlanGraph" in type(app).__name__ else "checkpoints"
        (checkpoints,) = conn.execute(
            f"SELECT count(*) FROM {table} WHERE thread_id = ANY(%s)", (threads,)
        ).fetchone()
    tool_statements = invocations  # the tool's own UPDATE, one per invocation
    saver_statements = len(sent) - tool_statements
    return {
        "statements_per_invocation": round(len(sent) / invocations, 2),
        "checkpoints_per_invocation": round(checkpoints / invocations, 2),
        "saver_statements_per_checkpoint": round(saver_statements / checkpoints, 2),
        "by_first_word": {kind: round(count / invocations, 2) for kind, count in kinds.items()},
    }


# -- endings, side by side -------------------------------------------------------------------------


class OrderState(TypedDict, total=False):
    done: bool


def _book(conn: Any) -> None:
    conn.execute("INSERT INTO bookings (what) VALUES ('van')")


def endings_graph(
    checkpointer: Any, db: Path, *, ours: bool, hang: bool = False, fail_once: bool = False
) -> Any:
    """restock (writes) -> book the van (writes, then waits for approval at interrupt())."""
    failures = {"left": 1 if fail_once else 0}

    def write(action: Callable[[Any], None]) -> None:
        if ours:
            with plan_connection("shop") as conn:
                action(conn)
        else:  # the usual way: the node's own connection, committed when it is done
            with closing(sqlite3.connect(db)) as conn:
                action(conn)
                conn.commit()

    def restock(state: OrderState) -> dict[str, Any]:
        write(lambda conn: conn.execute("UPDATE items SET qty = qty + 10 WHERE sku = 'plum'"))
        if hang:
            print("ready", flush=True)
            time.sleep(600)
        return {}

    def book(state: OrderState) -> dict[str, Any]:
        write(_book)
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("the van service is down")
        if interrupt("book the van?") != "yes":
            raise ValueError("not approved")
        return {"done": True}

    builder = StateGraph(OrderState)
    builder.add_node("restock", plan_node(restock) if ours else restock)
    builder.add_node("book", plan_node(book) if ours else book)
    builder.add_edge(START, "restock")
    builder.add_edge("restock", "book")
    graph = builder.compile(checkpointer=checkpointer)
    return PlanGraph(graph) if ours else graph


@contextmanager
def saver_for(kind: str, db: Path) -> Iterator[Any]:
    if kind == "PlanCheckpointer":
        with DatabaseResourceHandler() as handler:
            yield PlanCheckpointer(
                handler, Resource("shop", "database", engine="sqlite", location=str(db))
            )
    elif kind == "PostgresSaver":
        from langgraph.checkpoint.postgres import PostgresSaver

        # Its own schema per ending (see endings()); the shop stays in SQLite.
        with PostgresSaver.from_conn_string(os.environ[SAVER_DSN]) as saver:
            saver.setup()
            yield saver
    else:
        if SqliteSaver is None:
            raise SystemExit("pip install langgraph-checkpoint-sqlite for the stock SqliteSaver")
        with closing(sqlite3.connect(db, check_same_thread=False)) as conn:
            yield SqliteSaver(conn)


@contextmanager
def fresh_schema(dsn: str) -> Iterator[str]:
    """Yield *dsn* pointed at a new schema, dropped afterwards."""
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield psycopg.conninfo.make_conninfo(dsn, options=f"-c search_path={schema}")
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def observe(db: Path, app: Any) -> str:
    with closing(sqlite3.connect(db)) as conn:
        (plum,) = conn.execute("SELECT qty FROM items WHERE sku = 'plum'").fetchone()
        (vans,) = conn.execute("SELECT count(*) FROM bookings").fetchone()
    state = app.get_state(thread("t"))
    if not state.values and not state.next:
        where = "nothing saved"
    else:
        where = f"next {list(state.next)}" if state.next else "finished"
    return f"plum {plum}, vans {vans}, state: {where}"


def again(app: Any, ours: bool, value: Any = None) -> None:
    """Go on the way each saver's users are told to: resume (stock) or run again (ours)."""
    if value is not None:
        app.invoke(Command(resume=value), thread("t"))
    elif ours:
        app.invoke({}, thread("t"))  # nothing of the failed run was kept: same input again
    else:
        app.invoke(None, thread("t"))  # LangGraph resumes from the failed step


def endings(dsn: str | None) -> list[dict[str, str]]:
    """Run each ending on each saver; report rows and state at the ending and after going on.

    Done right, the van is booked once and plums restocked once (plum 10, vans 1).
    """
    table: list[dict[str, str]] = []
    kinds = ["SqliteSaver", "PlanCheckpointer"] + (["PostgresSaver"] if dsn else [])
    for kind in kinds:
        ours = kind == "PlanCheckpointer"
        with tempfile.TemporaryDirectory() as folder:
            for ending in ("interrupt", "exception", "kill -9"):
                db = make_shop(Path(folder) / f"{ending.split()[0]}.db")
                with ExitStack() as stack:
                    if kind == "PostgresSaver":
                        os.environ[SAVER_DSN] = stack.enter_context(fresh_schema(str(dsn)))
                    saver = stack.enter_context(saver_for(kind, db))
                    app = endings_graph(saver, db, ours=ours, fail_once=ending == "exception")
                    if ending == "kill -9":
                        _kill_mid_invocation(kind, db)
                        at_end = observe(db, app)
                        again(app, ours)
                    else:
                        with suppress(RuntimeError):  # the exception ending
                            app.invoke({}, thread("t"))
                        at_end = observe(db, app)
                        if ending == "exception":
                            again(app, ours)
                    again(app, ours, "yes")
                    table.append(
                        {"saver": kind, "ending": ending, "at": at_end, "then": observe(db, app)}
                    )
    return table


def _kill_mid_invocation(kind: str, db: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, __file__, "--hang", kind, str(db)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"  # restock has written
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()


def _hang(kind: str, db: Path) -> None:
    with saver_for(kind, db) as saver:
        app = endings_graph(saver, db, ours=kind == "PlanCheckpointer", hang=True)
        app.invoke({}, thread("t"))


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--invocations", type=int, default=40, help="invocations per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dsn", default=os.environ.get("CLEVERAGENTS_TEST_PG_DSN"))
    parser.add_argument("--endings", action="store_true", help="compare endings instead")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--hang", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hang:
        _hang(args.hang[0], Path(args.hang[1]))
        return 0
    if args.endings:
        rows = endings(args.dsn)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for row in rows:
                print(f"{row['saver']:<17} {row['ending']:<10} at the ending: {row['at']}")
                print(f"{'':<28} then:          {row['then']}")
        return 0
    report: dict[str, Any] = {
        "overhead": [
            overhead(args.invocations, args.rounds, writes=True),
            overhead(args.invocations, args.rounds, writes=False),
        ]
    }
    if args.dsn:
        report["round_trips"] = round_trips(args.dsn, args.invocations)
    print(json.dumps(report, indent=2 if not args.json else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
