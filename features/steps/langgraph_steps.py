"""Steps that run LangGraph graphs through PlanGraph, with LangChain's fake chat model.

A scenario's graph keeps what it needs to see (how often a node ran) on
``context``, so nothing is shared between scenarios.
"""

# No "from __future__ import annotations": LangGraph reads the state classes'
# annotations at run time, and behave runs step files outside sys.modules.
import sqlite3
from contextlib import closing
from typing import Annotated, Any, TypedDict

from behave import given, then, when
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
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


@plan_tool
def restock(sku: str, n: int) -> str:
    """Add n units of an item to the stock."""
    with plan_connection("shop") as conn:
        conn.execute("UPDATE items SET qty = qty + ? WHERE sku = ?", (n, sku))
    return f"restocked {n} {sku}"


@plan_tool
def sell(sku: str, n: int) -> str:
    """Sell n units of an item; fails, after writing, if there are not enough."""
    with plan_connection("shop") as conn:
        conn.execute("UPDATE items SET qty = qty - ? WHERE sku = ?", (n, sku))
        (left,) = conn.execute("SELECT qty FROM items WHERE sku = ?", (sku,)).fetchone()
    if left < 0:
        raise ValueError(f"only {left + n} {sku} in stock, cannot sell {n}")
    return f"sold {n} {sku}"


class ChatState(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


class OrderState(TypedDict, total=False):
    decision: str


def _saver(context: Any) -> PlanCheckpointer:
    handler = DatabaseResourceHandler(max_connections=4, acquire_timeout=5.0)
    context.closables.append(handler)
    shop = Resource("shop", "database", engine="sqlite", location=str(context.shop_path))
    return PlanCheckpointer(handler, shop)


def _tool_calls(asks: str) -> AIMessage:
    """Turn "restock plum 10, sell pear 50" into one model message asking for those calls."""
    calls = []
    for index, ask in enumerate(asks.split(","), 1):
        name, sku, n = ask.split()
        args = {"sku": sku, "n": int(n)}
        calls.append({"name": name, "args": args, "id": f"c{index}", "type": "tool_call"})
    return AIMessage(content="", tool_calls=calls)


def _agent_graph(context: Any, replies: list[AIMessage], *, then_fail: bool = False) -> PlanGraph:
    """Model node, ToolNode (tool errors go back to the model), and back.

    With *then_fail*, the model raises once its replies are used up, as an
    unreachable model would.
    """
    model = GenericFakeChatModel(messages=iter(replies))
    left = [len(replies)]

    def agent(state: ChatState) -> dict[str, Any]:
        if then_fail and not left[0]:
            raise RuntimeError("the model is down")
        left[0] -= 1
        return {"messages": [model.invoke(state["messages"])]}

    builder = StateGraph(ChatState)
    builder.add_node("agent", agent)
    builder.add_node("tools", ToolNode([restock, sell], handle_tool_errors=True))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return PlanGraph(builder.compile(checkpointer=_saver(context)))


def _shop(context: Any, name: str) -> dict[str, int]:
    with closing(sqlite3.connect(context.workdir / name)) as conn:
        return dict(conn.execute("SELECT sku, qty FROM items"))


def _checkpoints(context: Any, name: str, thread_id: str) -> int:
    with closing(sqlite3.connect(context.workdir / name)) as conn:
        ((count,),) = conn.execute(
            "SELECT count(*) FROM langgraph_checkpoints WHERE thread_id = ?", (thread_id,)
        )
    return int(count)


@given('a shop database "{name}" with {pears:d} pears and {plums:d} plums')
def step_shop(context: Any, name: str, pears: int, plums: int) -> None:
    context.shop_path = context.workdir / name
    with closing(sqlite3.connect(context.shop_path)) as conn:
        conn.execute("CREATE TABLE items (sku TEXT PRIMARY KEY, qty INTEGER NOT NULL)")
        conn.executemany("INSERT INTO items VALUES (?, ?)", [("pear", pears), ("plum", plums)])
        conn.commit()


@given('an agent graph whose model asks for "{asks}", then answers "{text}"')
def step_agent_answers(context: Any, asks: str, text: str) -> None:
    context.graph = _agent_graph(context, [_tool_calls(asks), AIMessage(content=text)])
    context.graph_input = {"messages": [HumanMessage("restock plums, sell pears")]}


@given('an agent graph whose model asks for "{asks}", then fails')
def step_agent_fails(context: Any, asks: str) -> None:
    context.graph = _agent_graph(context, [_tool_calls(asks)], then_fail=True)
    context.graph_input = {"messages": [HumanMessage("restock plums")]}


@given("a graph that restocks plums, then sells a pear once a person approves")
def step_approval_graph(context: Any) -> None:
    context.node_runs = []

    @plan_node
    def restock_plums(state: OrderState) -> dict[str, Any]:
        context.node_runs.append("restock_plums")
        with plan_connection("shop") as conn:
            conn.execute("UPDATE items SET qty = qty + 10 WHERE sku = 'plum'")
        return {}

    @plan_node
    def sell_pear(state: OrderState) -> dict[str, Any]:
        context.node_runs.append("sell_pear")
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
    context.graph = PlanGraph(builder.compile(checkpointer=_saver(context)))
    context.graph_input = {}


@when('the graph is invoked on thread "{thread_id}"')
def step_invoke(context: Any, thread_id: str) -> None:
    context.graph_error = None
    try:
        context.graph_result = context.graph.invoke(
            context.graph_input, {"configurable": {"thread_id": thread_id}}
        )
    except Exception as exc:  # the scenario says which error it expects
        context.graph_error = exc


@when('the graph is resumed on thread "{thread_id}" with "{decision}"')
def step_resume(context: Any, thread_id: str, decision: str) -> None:
    context.graph_result = context.graph.invoke(
        Command(resume=decision), {"configurable": {"thread_id": thread_id}}
    )


@then("the invocation was released")
def step_released(context: Any) -> None:
    assert context.graph_error is None, context.graph_error
    run = context.graph.last_run
    assert run is not None and run.outcome == "released", run


@then("the invocation was rolled back")
def step_rolled_back(context: Any) -> None:
    run = context.graph.last_run
    assert run is not None and run.outcome == "rolled_back", run


@then('the invocation raised {name} "{message}"')
def step_raised(context: Any, name: str, message: str) -> None:
    error = context.graph_error
    assert type(error).__name__ == name and str(error) == message, repr(error)


@then("the invocation stopped at an interrupt and was released")
def step_interrupted(context: Any) -> None:
    assert "__interrupt__" in context.graph_result, context.graph_result
    run = context.graph.last_run
    assert run is not None and run.interrupted and run.outcome == "released", run


@then('the tool call "{tool}" was rolled back to its checkpoint')
def step_tool_rolled_back(context: Any, tool: str) -> None:
    run = context.graph.last_run
    assert run is not None, "the graph never ran"
    assert [rollback.tool for rollback in run.tool_rollbacks] == [tool], run.tool_rollbacks
    assert run.tool_rollbacks[0].checkpoint.startswith("tool-"), run.tool_rollbacks


@then('"{name}" has {pears:d} pears and {plums:d} plums')
def step_stock(context: Any, name: str, pears: int, plums: int) -> None:
    stock = _shop(context, name)
    assert stock == {"pear": pears, "plum": plums}, stock


@then('thread "{thread_id}" has a committed checkpoint in "{name}"')
def step_has_checkpoint(context: Any, thread_id: str, name: str) -> None:
    assert _checkpoints(context, name, thread_id) >= 1


@then('thread "{thread_id}" has no committed checkpoint in "{name}"')
def step_no_checkpoint(context: Any, thread_id: str, name: str) -> None:
    count = _checkpoints(context, name, thread_id)
    assert count == 0, f"{count} checkpoints of {thread_id!r} were committed"


@then('the node "{node}" ran {times:d} times')
def step_node_runs(context: Any, node: str, times: int) -> None:
    assert context.node_runs.count(node) == times, context.node_runs
