"""Restock a shop with an OpenAI Agents SDK agent: one agent run is one plan.

With the SDK's scripted model (no network, no API key), on a fresh database
in a temporary folder::

    python examples/agents/restock_agent.py

With a real model (the SDK reads OPENAI_API_KEY), on a database you keep::

    python examples/agents/restock_agent.py --model gpt-4.1-mini --db shop.db

The scripted model restocks plum, tries to sell 50 pears (the tool raises, so
that call is rolled back and the model is told it failed), sells 2 pears
instead, and answers. The plan is then released: plum and the 2 pears are
committed, the failed sale left no trace.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
from contextlib import closing
from pathlib import Path
from typing import Any

from agents import Agent, RunContextWrapper, set_tracing_disabled
from agents.testing import ScriptedModel, assistant_message, function_call

from cleveragents.integrations.openai_agents import AgentPlan, plan_tool
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler

INSTRUCTIONS = (
    "You run a small shop. Check the stock levels, restock every item that is out "
    "of stock with 10 units, and sell 2 pears to the customer who is waiting."
)


@plan_tool
def stock_levels(ctx: RunContextWrapper[AgentPlan]) -> str:
    """Return every item with its quantity, one 'sku: qty' per line."""
    with ctx.context.connection("shop") as conn:
        rows = conn.execute("SELECT sku, qty FROM items ORDER BY sku").fetchall()
    return "\n".join(f"{sku}: {qty}" for sku, qty in rows)


@plan_tool
def restock(ctx: RunContextWrapper[AgentPlan], sku: str, n: int) -> str:
    """Add n units of an item to the stock.

    Args:
        sku: The item.
        n: How many units to add.
    """
    with ctx.context.connection("shop") as conn:
        conn.execute("UPDATE items SET qty = qty + ? WHERE sku = ?", (n, sku))
    return f"restocked {n} {sku}"


@plan_tool
def sell(ctx: RunContextWrapper[AgentPlan], sku: str, n: int) -> str:
    """Sell n units of an item; fails if there are not enough.

    Args:
        sku: The item.
        n: How many units to sell.
    """
    with ctx.context.connection("shop") as conn:
        conn.execute("UPDATE items SET qty = qty - ? WHERE sku = ?", (n, sku))
        (left,) = conn.execute("SELECT qty FROM items WHERE sku = ?", (sku,)).fetchone()
    if left < 0:
        # The UPDATE already ran: the plan rolls this call back to its checkpoint.
        raise ValueError(f"only {left + n} {sku} in stock, cannot sell {n}")
    return f"sold {n} {sku}, {left} left"


def scripted_model() -> ScriptedModel:
    """Return a model that plays one fixed conversation, turn by turn."""
    return ScriptedModel(
        [
            [function_call("stock_levels", {}, call_id="call-1")],
            [
                function_call("restock", {"sku": "plum", "n": 10}, call_id="call-2"),
                function_call("sell", {"sku": "pear", "n": 50}, call_id="call-3"),
            ],
            [function_call("sell", {"sku": "pear", "n": 2}, call_id="call-4")],
            [assistant_message("Restocked 10 plums and sold 2 pears.")],
        ]
    )


def create_shop(path: Path) -> None:
    """Create the items table with a little stock, unless it is there already."""
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE IF NOT EXISTS items (sku TEXT PRIMARY KEY, qty INT NOT NULL)")
        conn.executemany(
            "INSERT OR IGNORE INTO items (sku, qty) VALUES (?, ?)",
            [("apple", 4), ("pear", 5), ("plum", 0)],
        )


def stock(path: Path) -> list[tuple[Any, ...]]:
    """Read the stock through a connection of our own: what everyone else sees."""
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT sku, qty FROM items ORDER BY sku").fetchall()


async def run_shop(path: Path, model: Any, max_turns: int) -> AgentPlan:
    """Run the agent once, as one plan on the shop's database."""
    shop = Resource(name="shop", kind="database", engine="sqlite", location=str(path))
    agent = Agent(
        name="shopkeeper",
        instructions=INSTRUCTIONS,
        model=model,
        tools=[stock_levels, restock, sell],
    )
    with DatabaseResourceHandler() as handler:
        plan = AgentPlan(handler, [shop])
        try:
            async with plan:
                result = await plan.run(agent, "A customer wants 2 pears.", max_turns=max_turns)
                print(f"agent: {result.final_output}")
        except Exception as exc:  # any way the run fails, the plan has rolled back
            print(f"the run failed: {type(exc).__name__}: {exc}")
    return plan


def main(argv: list[str] | None = None) -> int:
    """Run the example; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, help="the shop's SQLite file (default: a temporary one)")
    parser.add_argument("--model", help="a real model name, e.g. gpt-4.1-mini (needs an API key)")
    parser.add_argument("--max-turns", type=int, default=10, help="model turns allowed (10)")
    args = parser.parse_args(argv)
    if args.model is None:
        set_tracing_disabled(True)  # nothing to send anywhere for a scripted run
    with tempfile.TemporaryDirectory(prefix="cleveragents-shop-") as folder:
        path = args.db or Path(folder) / "shop.db"
        create_shop(path)
        print(f"before: {stock(path)}")
        plan = asyncio.run(run_shop(path, args.model or scripted_model(), args.max_turns))
        for rollback in plan.tool_rollbacks:
            print(f"rolled back {rollback.tool} at {rollback.checkpoint}: {rollback.error}")
        reason = f" ({plan.rollback_reason})" if plan.rollback_reason else ""
        print(f"plan {plan.plan_id}: {plan.outcome}{reason}")
        print(f"after:  {stock(path)}")
    return 0 if plan.outcome == "released" else 1


if __name__ == "__main__":
    sys.exit(main())
