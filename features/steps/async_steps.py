"""Steps that drive the handler's awaitable methods from an event loop and its executor."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bdd_support import path_in_workdir, separate_connection
from behave import given, then, when

from cleveragents.resource.handlers.database import DatabaseResourceHandler


async def _one_plan(handler: DatabaseResourceHandler, resource: Any, number: int) -> None:
    """Add this plan's item, add and undo an extra one, then release (even) or roll back (odd)."""
    plan = f"plan-{number:02d}"

    def add(sku: str) -> None:
        with handler.connection(resource, plan_id=plan) as conn:
            conn.execute("INSERT INTO items (sku) VALUES (?)", (sku,))

    await handler.acreate_checkpoint(resource, plan, "start")
    await asyncio.to_thread(add, plan)
    await handler.acreate_checkpoint(resource, plan, "extra")
    await asyncio.to_thread(add, f"{plan}-extra")
    await handler.arollback_to(resource, plan, "extra")
    if number % 2 == 0:
        await handler.arelease_plan(plan)
    else:
        await handler.arollback_plan(plan)


@given("an event loop with {threads:d} executor threads")
def step_event_loop(context: Any, threads: int) -> None:
    executor = ThreadPoolExecutor(threads, thread_name_prefix="bdd-executor")
    loop = asyncio.new_event_loop()
    loop.set_default_executor(executor)
    context.loop = loop

    def stop() -> None:
        loop.close()
        executor.shutdown(wait=True)

    # The executor's threads stay alive until the scenario ends: a connection
    # kept per thread would still be open when the handler is closed.
    context.add_cleanup(stop)


@when(
    '{count:d} plans run on the event loop, {at_once:d} at a time, on "{resource}", '
    "the even ones released and the odd ones rolled back"
)
def step_run_async_plans(context: Any, count: int, at_once: int, resource: str) -> None:
    handler: DatabaseResourceHandler = context.handler
    target = context.db_resources[resource]

    async def main() -> None:
        # Fewer plans at once than threads: a plan waiting for its turn blocks a
        # thread, and the plan holding the turn needs one to go on.
        gate = asyncio.Semaphore(at_once)

        async def gated(number: int) -> None:
            async with gate:
                await _one_plan(handler, target, number)

        await asyncio.wait_for(asyncio.gather(*(gated(n) for n in range(count))), 60)

    context.loop.run_until_complete(main())


@then('"{filename}" has {count:d} items, all of even plans')
def step_check_even_plans_items(context: Any, filename: str, count: int) -> None:
    with separate_connection(path_in_workdir(context, filename)) as conn:
        skus = [sku for (sku,) in conn.execute("SELECT sku FROM items")]
    assert len(skus) == count, skus
    assert all(int(sku.removeprefix("plan-")) % 2 == 0 for sku in skus), skus


@then("the handler has at most {count:d} open connections")
def step_check_open_connections_at_most(context: Any, count: int) -> None:
    found = context.handler.stats().open_connections
    assert found <= count, f"{found} connections are open"
