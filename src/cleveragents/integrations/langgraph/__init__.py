"""LangGraph: graph state and database writes commit together, so every effect happens once.

One graph invocation is one plan. The graph's checkpoints live in the plan's
database and are written inside the plan's transaction, so the state LangGraph
resumes from and the rows the tools wrote always agree::

    from cleveragents.integrations.langgraph import (
        PlanCheckpointer, PlanGraph, plan_connection, plan_node, plan_tool)

    saver = PlanCheckpointer(handler, inventory)      # tables live in `inventory`

    @plan_tool                                        # langchain_core's @tool + plan semantics
    def restock(sku: str, n: int) -> str:
        '''Add n units of an item.'''
        with plan_connection("inventory") as conn:    # the invocation's own connection
            conn.execute("UPDATE items SET qty = qty + ? WHERE sku = ?", (n, sku))
        return "ok"

    app = PlanGraph(builder.compile(checkpointer=saver))
    app.invoke(inputs, {"configurable": {"thread_id": "t1"}})   # one plan
    app.last_run.outcome                                        # "released" / "rolled_back"

This package imports LangGraph (``pip install 'cleveragents[langgraph]'``);
importing ``cleveragents`` does not. See ``docs/langgraph.md``.
"""

from __future__ import annotations

try:
    import langchain_core.tools  # noqa: F401
    import langgraph.checkpoint.base  # noqa: F401
except ImportError as exc:
    raise ImportError(
        "cleveragents.integrations.langgraph needs LangGraph: pip install 'cleveragents[langgraph]'"
    ) from exc

from cleveragents.integrations._common import ToolRollback
from cleveragents.integrations.langgraph._calls import plan_connection, plan_node, plan_tool
from cleveragents.integrations.langgraph._checkpointer import PlanCheckpointer
from cleveragents.integrations.langgraph._graph import PlanGraph
from cleveragents.integrations.langgraph._invocation import GraphRun, Outcome
from cleveragents.integrations.langgraph._store import TABLES

__all__ = [
    "TABLES",
    "GraphRun",
    "Outcome",
    "PlanCheckpointer",
    "PlanGraph",
    "ToolRollback",
    "plan_connection",
    "plan_node",
    "plan_tool",
]
