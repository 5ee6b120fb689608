"""Example cleveragents plugin: the ``send_report`` tool and a plan-event log."""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

from cleveragents.hookspecs import hookimpl


def send_report(ctx: Any, channel: str = "ops", resource: str = "inventory") -> None:
    """Count the items running low and record a report row in the plan's transaction."""
    with ctx.connection(resource) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS reports (plan TEXT, channel TEXT, low_items INT)")
        (low,) = conn.execute("SELECT count(*) FROM items WHERE qty < 3").fetchone()
        if channel == "nowhere":
            raise RuntimeError("channel 'nowhere' does not exist")
        # sqlite3 binds '?', psycopg (engine: postgresql) binds '%s'.
        mark = "?" if isinstance(conn, sqlite3.Connection) else "%s"
        conn.execute(
            f"INSERT INTO reports VALUES ({mark}, {mark}, {mark})", (ctx.plan_id, channel, low)
        )


@hookimpl
def cleveragents_register_tools(registry: Any) -> None:
    registry.add("send_report", send_report)


def _record(event: str, plan: Any, error: BaseException | None = None) -> None:
    if os.environ.get("CLEVERAGENTS_EXAMPLE_FAIL_ON") == event:
        raise RuntimeError(f"example subscriber fails on {event} as asked")
    path = os.environ.get("CLEVERAGENTS_EXAMPLE_EVENTS")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            line = {"event": event, "plan": plan.id, "error": str(error) if error else None}
            log.write(json.dumps(line) + "\n")


@hookimpl
def cleveragents_plan_started(plan: Any) -> None:
    _record("started", plan)


@hookimpl
def cleveragents_plan_completed(plan: Any) -> None:
    _record("completed", plan)


@hookimpl
def cleveragents_plan_failed(plan: Any, error: BaseException) -> None:
    _record("failed", plan, error)
