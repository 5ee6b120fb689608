"""Steps that run LangGraph graphs through PlanGraph.

The shop, its plan tools, the scripted chat model and the graphs are the
pytest suite's own (``tests/langgraph_kit.py``), so both suites drive the
same code. Rows and checkpoints are read through a separate connection.
"""

# No "from __future__ import annotations": LangGraph reads state classes'
# annotations at run time, and behave runs step files outside sys.modules.
import sys
from pathlib import Path
from typing import Any

from behave import given, then, when
from langchain_core.messages import AIMessage, HumanMessage, ToolCall
from langgraph.types import Command

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from langgraph_kit import (  # found through the path set just above
    ScriptedChatModel,
    Shop,
    agent_graph,
    answer,
    approval_graph,
    make_handler,
    restock,
    sell,
    sqlite_shop,
)

from cleveragents.integrations.langgraph import PlanCheckpointer


def _saver(context: Any) -> PlanCheckpointer:
    handler = make_handler()
    context.closables.append(handler)
    shop: Shop = context.shop
    return PlanCheckpointer(handler, shop.resource)


def _asking(asks: str) -> AIMessage:
    """Turn "restock plum 10, sell pear 50" into one model message asking for those calls."""
    calls: list[ToolCall] = []
    for index, ask in enumerate(asks.split(","), 1):
        name, sku, n = ask.split()
        args = {"sku": sku, "n": int(n)}
        calls.append({"name": name, "args": args, "id": f"c{index}", "type": "tool_call"})
    return AIMessage(content="", tool_calls=calls)


def _model_down(messages: Any) -> AIMessage:
    raise RuntimeError("the model is down")


def _agent(context: Any, replies: list[Any]) -> None:
    model = ScriptedChatModel(replies=replies)
    context.graph = agent_graph(model, [restock, sell], _saver(context), handle_tool_errors=True)
    context.graph_input = {"messages": [HumanMessage("restock plums, sell pears")]}


@given('a shop database "{name}" with {pears:d} pears and {plums:d} plums')
def step_shop(context: Any, name: str, pears: int, plums: int) -> None:
    context.shop = sqlite_shop(context.workdir, name=Path(name).stem)
    stock = context.shop.stock()
    assert stock == {"pear": pears, "plum": plums}, f"the kit's shop starts with {stock}"


@given('an agent graph whose model asks for "{asks}", then answers "{text}"')
def step_agent_answers(context: Any, asks: str, text: str) -> None:
    _agent(context, [_asking(asks), answer(text)])


@given('an agent graph whose model asks for "{asks}", then fails')
def step_agent_fails(context: Any, asks: str) -> None:
    _agent(context, [_asking(asks), _model_down])


@given("a graph that restocks plums, then sells a pear once a person approves")
def step_approval_graph(context: Any) -> None:
    context.node_runs = []
    context.graph = approval_graph(_saver(context), context.node_runs)
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
    stock = context.shop.stock()
    assert stock == {"pear": pears, "plum": plums}, stock


@then('thread "{thread_id}" has a committed checkpoint in "{name}"')
def step_has_checkpoint(context: Any, thread_id: str, name: str) -> None:
    assert context.shop.checkpoints(thread_id) >= 1


@then('thread "{thread_id}" has no committed checkpoint in "{name}"')
def step_no_checkpoint(context: Any, thread_id: str, name: str) -> None:
    count = context.shop.checkpoints(thread_id)
    assert count == 0, f"{count} checkpoints of {thread_id!r} were committed"


@then('the node "{node}" ran {times:d} times')
def step_node_runs(context: Any, node: str, times: int) -> None:
    assert context.node_runs.count(node) == times, context.node_runs
