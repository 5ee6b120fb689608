"""AgentPlan and plan_tool with the OpenAI Agents SDK, driven by its scripted model.

Every run here uses ``agents.testing.ScriptedModel`` (no network), and every
check on rows goes through a separate sqlite3 connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
from agents import (
    Agent,
    FunctionTool,
    GuardrailFunctionOutput,
    MaxTurnsExceeded,
    OutputGuardrailTripwireTriggered,
    RunConfig,
    RunContextWrapper,
    RunHooks,
    Runner,
    function_tool,
    output_guardrail,
    set_tracing_disabled,
)
from agents.run_config import CallModelData, ModelInputData
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
from agents.tool import default_tool_error_function
from agents.tool_context import ToolContext
from conftest import make_table, query

from cleveragents.errors import (
    CheckpointEvictedError,
    CheckpointExpiredError,
    CleverAgentsError,
    PartialCommitError,
    PlanError,
    ResourceBusyError,
    ToolError,
)
from cleveragents.fds import count_fds
from cleveragents.integrations.openai_agents import AgentPlan, ToolRollback, plan_tool
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler
from cleveragents.resource.handlers.sqlite import SQLiteEngine

set_tracing_disabled(True)  # no trace export, ever

#: A generous bound for things that must happen eventually (never a speed check).
EVENTUALLY = 10.0
SDK_ERROR = default_tool_error_function(None, ValueError())  # type: ignore[arg-type]


# -- tools ----------------------------------------------------------------------------


@plan_tool
def add_item(ctx: RunContextWrapper[AgentPlan], sku: str) -> str:
    """Add one item; skus starting with 'bad' are written, then refused."""
    with ctx.context.connection("inventory") as conn:
        conn.execute("INSERT INTO items (sku) VALUES (?)", (sku,))
    if sku.startswith("bad"):
        raise ValueError(f"refusing {sku}")
    return f"added {sku}"


@plan_tool(name_override="add_item_async")
async def add_item_async(ctx: RunContextWrapper[AgentPlan], sku: str) -> str:
    """Add one item from an async tool."""
    with ctx.context.connection("inventory") as conn:
        conn.execute("INSERT INTO items (sku) VALUES (?)", (sku,))
    await asyncio.sleep(0)
    return f"added {sku}"


@output_guardrail
async def no_secrets(ctx: Any, agent: Any, output: Any) -> GuardrailFunctionOutput:
    """Reject a final output that mentions a secret."""
    return GuardrailFunctionOutput(output_info=None, tripwire_triggered="secret" in str(output))


def refused(errors: list[BaseException]) -> Callable[[Any, Exception], str]:
    """Return a failure_error_function that keeps the exception the tool raised."""

    def keep(ctx: Any, error: Exception) -> str:
        errors.append(error)
        return f"refused: {type(error).__name__}"

    return keep


# -- helpers ----------------------------------------------------------------------------


def call(tool: str, call_id: str, **arguments: Any) -> Any:
    """Return a scripted model output item asking for one tool call."""
    return function_call(tool, arguments, call_id=call_id)


def answer(text: str = "done") -> list[Any]:
    """Return a scripted model turn giving the final answer."""
    return [assistant_message(text)]


def agent_with(
    steps: list[Any], *tools: Any, name: str = "clerk", **options: Any
) -> tuple[Agent[Any], ScriptedModel]:
    """Return an agent on a scripted model playing *steps*, and the model."""
    model = ScriptedModel(steps)
    return Agent(name=name, model=model, tools=list(tools), **options), model


def stalled_model(reached: asyncio.Event) -> ModelStep:
    """Return a model turn that never answers (until the run is cancelled)."""

    async def think_forever(_: Any) -> list[Any]:
        reached.set()
        await asyncio.sleep(EVENTUALLY * 10)
        return answer()

    return ModelStep.respond(think_forever)


def items(path: Path) -> list[str]:
    """Return the skus another connection sees, sorted."""
    return [sku for (sku,) in query(path, "SELECT sku FROM items ORDER BY sku")]


def outputs(result: Any) -> list[Any]:
    """Return the tool outputs the model was given, in order."""
    return [item.output for item in result.new_items if item.type == "tool_call_output_item"]


@pytest.fixture
def inventory_path(tmp_path: Path) -> Path:
    path = tmp_path / "inventory.db"
    make_table(path, "CREATE TABLE items (sku TEXT PRIMARY KEY, qty INT NOT NULL DEFAULT 1)")
    return path


@pytest.fixture
def inventory(inventory_path: Path) -> Resource:
    return Resource(
        name="inventory", kind="database", engine="sqlite", location=str(inventory_path)
    )


@pytest.fixture
def handler() -> Iterator[DatabaseResourceHandler]:
    with DatabaseResourceHandler(max_connections=4, acquire_timeout=2.0) as made:
        yield made


async def run_plan(
    handler: DatabaseResourceHandler, resource: Resource, agent: Agent[Any], **options: Any
) -> tuple[AgentPlan, Any]:
    """Run *agent* as one plan; return the plan and the result (or what the block raised)."""
    plan = AgentPlan(handler, [resource])
    outcome: Any = None
    try:
        async with plan:
            outcome = await plan.run(agent, "restock", **options)
    except Exception as exc:
        outcome = exc
    return plan, outcome


# -- importing ------------------------------------------------------------------------------


def test_importing_cleveragents_does_not_import_the_sdk() -> None:
    code = (
        "import sys, cleveragents, cleveragents.integrations\n"
        "assert 'agents' not in sys.modules, 'the SDK was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_integration_without_the_sdk_says_how_to_install_it() -> None:
    code = (
        "import sys\n"
        "sys.modules['agents'] = None  # as if the extra were not installed\n"
        "import cleveragents\n"
        "try:\n"
        "    import cleveragents.integrations.openai_agents\n"
        "except ImportError as exc:\n"
        '    assert "cleveragents[agents]" in str(exc), exc\n'
        "else:\n"
        "    raise SystemExit('imported without the SDK')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- runs that end well -------------------------------------------------------------------


def test_two_tools_then_an_answer_commits_with_labelled_checkpoints(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    labels: list[str] = []
    take_checkpoint = handler.acreate_checkpoint

    async def spy(resource: Resource, plan_id: str, checkpoint_id: str) -> Any:
        labels.append(checkpoint_id)
        return await take_checkpoint(resource, plan_id, checkpoint_id)

    handler.acreate_checkpoint = spy  # type: ignore[method-assign]
    agent, model = agent_with(
        [[call("add_item", "c1", sku="apple")], [call("add_item", "c2", sku="pear")], answer()],
        add_item,
    )
    plan, result = asyncio.run(run_plan(handler, inventory, agent))
    assert result.final_output == "done"
    assert plan.outcome == "released"
    assert plan.rollback_reason is None
    assert plan.tool_rollbacks == []
    assert labels == ["tool-1", "tool-2"]
    assert items(inventory_path) == ["apple", "pear"]
    assert handler.stats()["active_plans"] == 0
    model.assert_complete()


def test_an_async_plan_tool_commits_too(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    agent, _ = agent_with([[call("add_item_async", "c1", sku="fig")], answer()], add_item_async)
    plan, result = asyncio.run(run_plan(handler, inventory, agent))
    assert outputs(result) == ["added fig"]
    assert plan.outcome == "released"
    assert items(inventory_path) == ["fig"]


def test_a_streamed_run_that_completes_commits(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    agent, _ = agent_with([[call("add_item", "c1", sku="kiwi")], answer()], add_item)

    async def scenario() -> AgentPlan:
        async with AgentPlan(handler, [inventory], plan_id="streamed") as plan:
            result = plan.run_streamed(agent, "restock")
            async for _ in result.stream_events():
                pass
            assert result.final_output == "done"
        return plan

    plan = asyncio.run(scenario())
    assert plan.plan_id == "streamed"
    assert plan.outcome == "released"
    assert items(inventory_path) == ["kiwi"]


# -- failing tool calls -------------------------------------------------------------------------


def test_a_failing_tool_is_rolled_back_and_the_others_kept(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    agent, _ = agent_with(
        [
            [call("add_item", "c1", sku="apple")],
            [call("add_item", "c2", sku="bad-pear")],
            [call("add_item", "c3", sku="plum")],
            answer(),
        ],
        add_item,
    )
    plan, result = asyncio.run(run_plan(handler, inventory, agent))
    # The model hears about the failure exactly as the SDK reports any tool error.
    assert outputs(result) == ["added apple", SDK_ERROR, "added plum"]
    assert plan.outcome == "released"
    assert plan.tool_rollbacks == [
        ToolRollback("tool-2", "add_item", "c2", "ValueError: refusing bad-pear")
    ]
    assert items(inventory_path) == ["apple", "plum"]


def test_calls_of_one_turn_run_one_at_a_time_and_a_failure_undoes_only_its_own(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    lock = threading.Lock()
    running = [0]
    most = [0]

    @plan_tool
    def add_slowly(ctx: RunContextWrapper[AgentPlan], sku: str) -> str:
        """Add an item, taking a moment (long enough for a concurrent call to overlap)."""
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            with ctx.context.connection("inventory") as conn:
                conn.execute("INSERT INTO items (sku) VALUES (?)", (sku,))
            threading.Event().wait(0.05)
            if sku.startswith("bad"):
                raise ValueError(f"refusing {sku}")
            return f"added {sku}"
        finally:
            with lock:
                running[0] -= 1

    agent, _ = agent_with(
        [
            [
                call("add_slowly", "c1", sku="apple"),
                call("add_slowly", "c2", sku="bad-pear"),
                call("add_slowly", "c3", sku="plum"),
            ],
            answer(),
        ],
        add_slowly,
    )
    plan, result = asyncio.run(run_plan(handler, inventory, agent))
    assert most[0] == 1
    assert outputs(result) == ["added apple", SDK_ERROR, "added plum"]
    assert [(r.checkpoint, r.call_id) for r in plan.tool_rollbacks] == [("tool-2", "c2")]
    assert plan.outcome == "released"
    assert items(inventory_path) == ["apple", "plum"]


def test_a_tool_without_a_failure_function_fails_the_run_and_rolls_back(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    @plan_tool(failure_error_function=None)
    def add_strictly(ctx: RunContextWrapper[AgentPlan], sku: str) -> str:
        """Add an item; a failure stops the run."""
        return add_item_body(ctx, sku)

    agent, _ = agent_with(
        [[call("add_item", "c1", sku="apple")], [call("add_strictly", "c2", sku="bad")]],
        add_item,
        add_strictly,
    )
    plan, raised = asyncio.run(run_plan(handler, inventory, agent))
    assert isinstance(raised, Exception)
    assert plan.outcome == "rolled_back"
    assert items(inventory_path) == []


def add_item_body(ctx: RunContextWrapper[AgentPlan], sku: str) -> str:
    """Do what add_item does, from another tool."""
    with ctx.context.connection("inventory") as conn:
        conn.execute("INSERT INTO items (sku) VALUES (?)", (sku,))
    if sku.startswith("bad"):
        raise ValueError(f"refusing {sku}")
    return f"added {sku}"


def test_a_tool_naming_an_unknown_resource_fails_alone(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    errors: list[BaseException] = []

    @plan_tool(failure_error_function=refused(errors))
    def audit(ctx: RunContextWrapper[AgentPlan]) -> str:
        """Write to a database the plan does not have."""
        with ctx.context.connection("audit"):
            return "never"

    agent, _ = agent_with(
        [[call("add_item", "c1", sku="apple")], [call("audit", "c2")], answer()], add_item, audit
    )
    plan, _ = asyncio.run(run_plan(handler, inventory, agent))
    assert type(errors[0]) is ToolError
    assert "no resource 'audit'" in str(errors[0])
    assert plan.outcome == "released"
    assert items(inventory_path) == ["apple"]


# -- runs that end badly ----------------------------------------------------------------------


def test_max_turns_rolls_everything_back(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    agent, _ = agent_with(
        [[call("add_item", "c1", sku="apple")], [call("add_item", "c2", sku="pear")]], add_item
    )
    plan, raised = asyncio.run(run_plan(handler, inventory, agent, max_turns=2))
    assert type(raised) is MaxTurnsExceeded
    assert plan.outcome == "rolled_back"
    assert "MaxTurnsExceeded" in (plan.rollback_reason or "")
    assert items(inventory_path) == []


def test_max_turns_rolls_back_even_when_an_error_handler_answers(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    agent, _ = agent_with(
        [[call("add_item", "c1", sku="apple")], [call("add_item", "c2", sku="pear")]], add_item
    )
    handlers = {"max_turns": lambda data: "gave up"}
    plan, result = asyncio.run(
        run_plan(handler, inventory, agent, max_turns=2, error_handlers=handlers)
    )
    assert result.final_output == "gave up"
    assert plan.outcome == "rolled_back"
    assert "max turns" in (plan.rollback_reason or "")
    assert items(inventory_path) == []


def test_max_turns_handled_in_a_direct_runner_call_rolls_back(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    agent, _ = agent_with([[call("add_item", "c1", sku="apple")]], add_item)

    async def scenario() -> AgentPlan:
        async with AgentPlan(handler, [inventory]) as plan:
            result = await Runner.run(
                agent,
                "restock",
                context=plan,
                hooks=plan.hooks,
                run_config=plan.run_config,
                max_turns=1,
                error_handlers={"max_turns": lambda data: "gave up"},
            )
            assert result.final_output == "gave up"
        return plan

    plan = asyncio.run(scenario())
    assert plan.outcome == "rolled_back"
    assert items(inventory_path) == []


def test_a_direct_runner_call_with_the_plan_commits(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    agent, _ = agent_with([[call("add_item", "c1", sku="apple")], answer()], add_item)

    async def scenario() -> AgentPlan:
        async with AgentPlan(handler, [inventory]) as plan:
            await Runner.run(
                agent, "restock", context=plan, hooks=plan.hooks, run_config=plan.run_config
            )
        return plan

    assert asyncio.run(scenario()).outcome == "released"
    assert items(inventory_path) == ["apple"]


def test_a_model_error_rolls_everything_back(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    agent, _ = agent_with(
        [[call("add_item", "c1", sku="apple")], ConnectionError("model unreachable")], add_item
    )
    plan, raised = asyncio.run(run_plan(handler, inventory, agent))
    assert type(raised) is ConnectionError
    assert plan.outcome == "rolled_back"
    assert items(inventory_path) == []


def test_cancelling_the_run_waits_for_the_sync_tool_thread_then_rolls_back(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    started, go_on, finished = threading.Event(), threading.Event(), threading.Event()

    @plan_tool
    def add_when_told(ctx: RunContextWrapper[AgentPlan], sku: str) -> str:
        """Add an item once the test says so."""
        started.set()
        go_on.wait(EVENTUALLY)
        with ctx.context.connection("inventory") as conn:
            conn.execute("INSERT INTO items (sku) VALUES (?)", (sku,))
        finished.set()
        return f"added {sku}"

    agent, _ = agent_with(
        [[call("add_item", "c1", sku="apple")], [call("add_when_told", "c2", sku="pear")]],
        add_item,
        add_when_told,
    )
    plan = AgentPlan(handler, [inventory])

    async def scenario() -> None:
        async with plan:
            run = asyncio.ensure_future(plan.run(agent, "restock"))
            await asyncio.to_thread(started.wait, EVENTUALLY)
            run.cancel()
            # The thread keeps going after the cancel; the plan must wait for it.
            asyncio.get_running_loop().call_later(0.1, go_on.set)
            await run

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(scenario())
    assert finished.is_set()
    assert plan.outcome == "rolled_back"
    assert plan.rollback_reason == "the run was cancelled"
    assert items(inventory_path) == []
    assert handler.stats()["active_plans"] == 0


def test_a_cancelled_streamed_run_rolls_back(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    async def scenario() -> tuple[AgentPlan, ScriptedModel]:
        reached = asyncio.Event()
        agent, model = agent_with(
            [[call("add_item", "c1", sku="apple")], stalled_model(reached), answer()], add_item
        )
        async with AgentPlan(handler, [inventory]) as plan:
            result = plan.run_streamed(agent, "restock")
            async for event in result.stream_events():
                if getattr(event, "name", None) == "tool_output":
                    # The SDK holds the next turn until this turn's events are consumed.
                    result.cancel()
        return plan, model

    plan, model = asyncio.run(scenario())
    assert model.remaining_steps >= 1  # the final answer never came
    assert plan.outcome == "rolled_back"
    assert items(inventory_path) == []


def test_a_streamed_run_still_going_at_exit_is_cancelled_and_rolled_back(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    async def scenario() -> AgentPlan:
        reached = asyncio.Event()
        agent, _ = agent_with(
            [[call("add_item", "c1", sku="apple")], stalled_model(reached), answer()], add_item
        )
        async with AgentPlan(handler, [inventory]) as plan:
            plan.run_streamed(agent, "restock")
            await reached.wait()  # the item is written; the model is thinking
        return plan

    plan = asyncio.run(scenario())
    assert plan.outcome == "rolled_back"
    assert "still going" in (plan.rollback_reason or "")
    assert items(inventory_path) == []
    assert handler.stats()["active_plans"] == 0


def test_an_approval_interruption_rolls_back_and_the_plan_takes_no_second_run(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    @plan_tool(needs_approval=True)
    def clear_items(ctx: RunContextWrapper[AgentPlan]) -> str:
        """Delete every item (needs a person's approval)."""
        with ctx.context.connection("inventory") as conn:
            conn.execute("DELETE FROM items")
        return "cleared"

    agent, _ = agent_with(
        [[call("add_item", "c1", sku="apple")], [call("clear_items", "c2")], answer()],
        add_item,
        clear_items,
    )

    async def scenario() -> AgentPlan:
        async with AgentPlan(handler, [inventory]) as plan:
            result = await plan.run(agent, "restock")
            assert result.interruptions
            assert result.final_output is None
            state = result.to_state()
            state.approve(result.interruptions[0])
            with pytest.raises(RuntimeError, match="approval interruption"):
                await plan.run(agent, state)
        return plan

    plan = asyncio.run(scenario())
    assert plan.outcome == "rolled_back"
    assert plan.rollback_reason == "the run stopped at an approval interruption"
    assert items(inventory_path) == []


def test_a_run_without_the_plan_hooks_is_never_released(
    handler: DatabaseResourceHandler,
    inventory: Resource,
    inventory_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent, _ = agent_with([[call("add_item", "c1", sku="apple")], answer()], add_item)

    async def scenario() -> AgentPlan:
        async with AgentPlan(handler, [inventory]) as plan:
            await Runner.run(agent, "restock", context=plan)
        return plan

    with caplog.at_level(logging.WARNING, logger="cleveragents.integrations.openai_agents"):
        plan = asyncio.run(scenario())
    assert plan.outcome == "rolled_back"
    assert "hooks=plan.hooks" in caplog.text
    assert items(inventory_path) == []


def test_a_tool_timeout_rolls_back_the_straggler_once_it_ends_and_the_run_goes_on(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    go_on, finished = threading.Event(), threading.Event()

    @plan_tool(timeout=0.1)
    async def add_slowly_async(ctx: RunContextWrapper[AgentPlan], sku: str) -> str:
        """Add an item from an async tool, slower than the tool's timeout."""
        with ctx.context.connection("inventory") as conn:
            conn.execute("INSERT INTO items (sku) VALUES (?)", (sku,))
        await asyncio.sleep(EVENTUALLY)
        return "never"

    def timed_out(ctx: Any, error: Exception) -> str:
        go_on.set()  # the SDK gave up on the call: only now may its thread go on
        return "timed out"

    @plan_tool(timeout=0.5, timeout_error_function=timed_out)
    def add_slowly(ctx: RunContextWrapper[AgentPlan], sku: str) -> str:
        """Add an item, slower than the tool's timeout."""
        with ctx.context.connection("inventory") as conn:
            conn.execute("INSERT INTO items (sku) VALUES (?)", (sku,))
        go_on.wait(EVENTUALLY)
        finished.set()
        return f"added {sku}"

    agent, _ = agent_with(
        [
            [call("add_slowly_async", "c1", sku="slower")],
            [call("add_slowly", "c2", sku="slow")],
            [call("add_item", "c3", sku="apple")],
            answer(),
        ],
        add_slowly,
        add_slowly_async,
        add_item,
    )
    plan, result = asyncio.run(run_plan(handler, inventory, agent))
    assert finished.is_set()
    assert outputs(result) == [
        "Tool 'add_slowly_async' timed out after 0.1 seconds.",
        "timed out",
        "added apple",
    ]
    assert [(r.checkpoint, r.tool) for r in plan.tool_rollbacks] == [
        ("tool-1", "add_slowly_async"),
        ("tool-2", "add_slowly"),
    ]
    assert plan.outcome == "released"
    assert items(inventory_path) == ["apple"]


def test_a_call_cancelled_while_its_checkpoint_is_taken_never_runs(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    ran = threading.Event()
    in_checkpoint = asyncio.Event()
    take_checkpoint = handler.acreate_checkpoint

    async def slow_checkpoint(resource: Resource, plan_id: str, checkpoint_id: str) -> Any:
        in_checkpoint.set()
        await asyncio.sleep(0.1)
        return await take_checkpoint(resource, plan_id, checkpoint_id)

    handler.acreate_checkpoint = slow_checkpoint  # type: ignore[method-assign]

    @plan_tool
    def mark(ctx: RunContextWrapper[AgentPlan]) -> str:
        """Note that it ran."""
        ran.set()
        return "ran"

    agent, _ = agent_with([[call("mark", "c1")], answer()], mark)

    async def scenario() -> AgentPlan:
        async with AgentPlan(handler, [inventory]) as plan:
            run = asyncio.ensure_future(plan.run(agent, "restock"))
            await in_checkpoint.wait()
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run
        return plan

    plan = asyncio.run(scenario())
    assert not ran.is_set()
    assert plan.outcome == "rolled_back"
    assert items(inventory_path) == []


def test_leaving_is_not_hurried_by_a_second_cancel(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    started, go_on, finished = threading.Event(), threading.Event(), threading.Event()

    @plan_tool
    def add_when_told(ctx: RunContextWrapper[AgentPlan], sku: str) -> str:
        """Add an item once the test says so."""
        with ctx.context.connection("inventory") as conn:
            conn.execute("INSERT INTO items (sku) VALUES (?)", (sku,))
        started.set()
        go_on.wait(EVENTUALLY)
        finished.set()
        return f"added {sku}"

    agent, _ = agent_with([[call("add_when_told", "c1", sku="apple")], answer()], add_when_told)
    plan = AgentPlan(handler, [inventory])

    async def body() -> None:
        async with plan:
            await plan.run(agent, "restock")

    async def scenario() -> None:
        task = asyncio.ensure_future(body())
        await asyncio.to_thread(started.wait, EVENTUALLY)
        task.cancel()
        for _ in range(3):
            await asyncio.sleep(0.02)
            task.cancel()  # cancel again while the plan waits for the tool's thread
        go_on.set()
        await task

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(scenario())
    assert finished.is_set()
    assert plan.outcome == "rolled_back"
    assert items(inventory_path) == []
    assert handler.stats()["active_plans"] == 0


def test_an_approval_interruption_in_a_streamed_run_rolls_back(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    @plan_tool(needs_approval=True)
    def clear_items(ctx: RunContextWrapper[AgentPlan]) -> str:
        """Delete every item (needs a person's approval)."""
        return "cleared"

    agent, _ = agent_with(
        [[call("add_item", "c1", sku="apple")], [call("clear_items", "c2")], answer()],
        add_item,
        clear_items,
    )

    async def scenario() -> AgentPlan:
        async with AgentPlan(handler, [inventory]) as plan:
            result = plan.run_streamed(agent, "restock")
            async for _ in result.stream_events():
                pass
            assert result.interruptions
        return plan

    plan = asyncio.run(scenario())
    assert plan.outcome == "rolled_back"
    assert plan.rollback_reason == "the run stopped at an approval interruption"
    assert items(inventory_path) == []


def test_a_handoff_keeps_one_plan(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    specialist, _ = agent_with(
        [[call("add_item", "c2", sku="pear")], answer()], add_item, name="specialist"
    )
    clerk, _ = agent_with(
        [[call("add_item", "c1", sku="apple")], [call("transfer_to_specialist", "h1")]],
        add_item,
        handoffs=[specialist],
    )

    async def scenario() -> AgentPlan:
        async with AgentPlan(handler, [inventory]) as plan:
            await Runner.run(
                clerk, "restock", context=plan, hooks=plan.hooks, run_config=plan.run_config
            )
        return plan

    assert asyncio.run(scenario()).outcome == "released"
    assert items(inventory_path) == ["apple", "pear"]


# -- output guardrails: a rejected final output commits nothing --------------------------------


def guarded_agent(text: str) -> Agent[Any]:
    """Return an agent that adds an apple, then answers *text*, under the no-secrets guardrail."""
    agent, _ = agent_with(
        [[call("add_item", "c1", sku="apple")], answer(text)],
        add_item,
        output_guardrails=[no_secrets],
    )
    return agent


@pytest.mark.parametrize("caught", [True, False], ids=["caught in the block", "raised"])
def test_a_final_output_an_output_guardrail_rejects_rolls_back(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path, caught: bool
) -> None:
    async def scenario() -> tuple[AgentPlan, BaseException | None]:
        plan = AgentPlan(handler, [inventory])
        try:
            async with plan:
                try:
                    await plan.run(guarded_agent("the secret is 42"), "restock")
                except OutputGuardrailTripwireTriggered:
                    if not caught:
                        raise
        except OutputGuardrailTripwireTriggered as exc:
            return plan, exc
        return plan, None

    plan, raised = asyncio.run(scenario())
    assert (raised is None) is caught
    assert plan.outcome == "rolled_back"
    assert "OutputGuardrailTripwireTriggered" in (plan.rollback_reason or "")
    assert items(inventory_path) == []


def test_a_final_output_the_output_guardrail_accepts_commits(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    async def scenario() -> AgentPlan:
        async with AgentPlan(handler, [inventory]) as plan:
            await plan.run(guarded_agent("all restocked"), "restock")
        return plan

    plan = asyncio.run(scenario())
    assert plan.outcome == "released"
    assert items(inventory_path) == ["apple"]


@pytest.mark.parametrize("text", ["the secret is 42", "all restocked"])
def test_a_streamed_run_is_released_only_if_its_output_passed_the_guardrails(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path, text: str
) -> None:
    async def scenario() -> AgentPlan:
        async with AgentPlan(handler, [inventory]) as plan:
            result = plan.run_streamed(guarded_agent(text), "restock")
            try:
                async for _ in result.stream_events():
                    pass
            except OutputGuardrailTripwireTriggered:
                pass  # the caller reports it and carries on
        return plan

    plan = asyncio.run(scenario())
    if "secret" in text:
        assert plan.outcome == "rolled_back"
        assert "OutputGuardrailTripwireTriggered" in (plan.rollback_reason or "")
        assert items(inventory_path) == []
    else:
        assert plan.outcome == "released"
        assert items(inventory_path) == ["apple"]


@pytest.mark.parametrize("text", ["the secret is 42", "all restocked"])
def test_a_direct_runner_call_with_output_guardrails_is_never_released(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path, text: str
) -> None:
    async def scenario() -> AgentPlan:
        async with AgentPlan(handler, [inventory]) as plan:
            with contextlib.suppress(OutputGuardrailTripwireTriggered):
                await Runner.run(
                    guarded_agent(text),
                    "restock",
                    context=plan,
                    hooks=plan.hooks,
                    run_config=plan.run_config,
                )
        return plan

    plan = asyncio.run(scenario())
    # The SDK tells the hooks of the final output before its guardrails run, and a
    # direct call never tells the plan how they went: it cannot commit safely.
    assert plan.outcome == "rolled_back"
    assert "plan.run()" in (plan.rollback_reason or "")
    assert items(inventory_path) == []


def test_the_plans_own_hooks_given_to_plan_run_change_nothing(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    async def scenario() -> AgentPlan:
        async with AgentPlan(handler, [inventory]) as plan:
            await plan.run(guarded_agent("all restocked"), "restock", hooks=plan.hooks)
        return plan

    plan = asyncio.run(scenario())
    assert plan.outcome == "released"
    assert items(inventory_path) == ["apple"]


def test_any_run_that_raises_rolls_back_even_if_the_block_goes_on(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    agent, _ = agent_with([[call("add_item", "c1", sku="apple")], answer()], add_item)

    async def scenario() -> AgentPlan:
        async with AgentPlan(handler, [inventory]) as plan:
            await plan.run(agent, "restock")
            failing, _ = agent_with([RuntimeError("model down")])
            with pytest.raises(RuntimeError, match="model down"):
                await plan.run(failing, "check")
        return plan

    plan = asyncio.run(scenario())
    assert plan.outcome == "rolled_back"
    assert plan.rollback_reason == "a run raised RuntimeError: model down"
    assert items(inventory_path) == []


# -- what became of the work -------------------------------------------------------------------


def test_a_commit_failing_on_the_second_database_is_reported_as_a_partial_commit(
    handler: DatabaseResourceHandler,
    inventory: Resource,
    inventory_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    orders_path = tmp_path / "orders.db"
    make_table(orders_path, "CREATE TABLE items (sku TEXT PRIMARY KEY)")
    orders = Resource(name="orders", kind="database", engine="sqlite", location=str(orders_path))

    @plan_tool
    def order(ctx: RunContextWrapper[AgentPlan], sku: str) -> str:
        """Add an item to the stock and to the orders."""
        for name in ("inventory", "orders"):
            with ctx.context.connection(name) as conn:
                conn.execute("INSERT INTO items (sku) VALUES (?)", (sku,))
        return "ordered"

    real_commit = SQLiteEngine.commit

    def commit(engine: SQLiteEngine, conn: Any) -> None:
        if conn.execute("PRAGMA database_list").fetchone()[2] == str(orders_path):
            raise sqlite3.OperationalError("disk I/O error")
        real_commit(engine, conn)

    monkeypatch.setattr(SQLiteEngine, "commit", commit)
    agent, _ = agent_with([[call("order", "c1", sku="apple")], answer()], order)

    async def scenario() -> tuple[AgentPlan, BaseException | None]:
        plan = AgentPlan(handler, [inventory, orders])
        try:
            async with plan:
                await plan.run(agent, "order")
        except PartialCommitError as exc:
            return plan, exc
        return plan, None

    plan, raised = asyncio.run(scenario())
    assert type(raised) is PartialCommitError
    assert plan.outcome == "partial_commit"
    assert plan.committed == ("inventory",)
    assert repr(plan) == f"<AgentPlan {plan.plan_id!r} (partial_commit)>"
    assert items(inventory_path) == ["apple"]
    assert query(orders_path, "SELECT sku FROM items") == []


def test_a_released_plan_names_the_databases_it_committed(
    handler: DatabaseResourceHandler, inventory: Resource, tmp_path: Path
) -> None:
    unused = Resource(
        name="unused", kind="database", engine="sqlite", location=str(tmp_path / "unused.db")
    )
    agent, _ = agent_with([[call("add_item", "c1", sku="apple")], answer()], add_item)
    plan, _ = asyncio.run(run_plan(handler, inventory, agent))
    assert (plan.outcome, plan.committed) == ("released", ("inventory",))
    quiet, _ = agent_with([answer()])

    async def scenario() -> AgentPlan:
        async with AgentPlan(handler, [inventory, unused]) as plan:
            await plan.run(quiet, "nothing to do")
        return plan

    plan = asyncio.run(scenario())
    assert (plan.outcome, plan.committed) == ("released", ())
    failing, _ = agent_with([[call("add_item", "c1", sku="pear")], RuntimeError("down")], add_item)
    plan, _ = asyncio.run(run_plan(handler, inventory, failing))
    assert (plan.outcome, plan.committed) == ("rolled_back", ())


# -- one plan id, one transaction ------------------------------------------------------------


def test_two_agent_plans_with_one_id_are_never_open_at_once(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    agent, _ = agent_with([[call("add_item", "c1", sku="apple")], answer()], add_item)

    async def scenario() -> tuple[AgentPlan, AgentPlan]:
        first = AgentPlan(handler, [inventory], plan_id="restock")
        second = AgentPlan(handler, [inventory], plan_id="restock")
        async with first:
            await first.run(agent, "restock")
            with pytest.raises(PlanError) as raised:
                async with second:
                    raise AssertionError("the second plan was entered")
            assert str(raised.value) == (
                "AgentPlan 'restock': plan_id: another AgentPlan with this id is open on "
                f"handler {handler.name!r}; plans open at once need different ids "
                "(leave plan_id out to get a fresh one)"
            )
            assert repr(second) == "<AgentPlan 'restock' (new)>"
        # Once the first has ended, the id is free again.
        again, _ = agent_with([[call("add_item", "c2", sku="pear")], answer()], add_item)
        async with second:
            await second.run(again, "restock")
        return first, second

    first, second = asyncio.run(scenario())
    assert (first.outcome, second.outcome) == ("released", "released")
    assert items(inventory_path) == ["apple", "pear"]


def test_agent_plans_on_different_handlers_may_share_an_id(
    inventory: Resource, inventory_path: Path, tmp_path: Path
) -> None:
    other_path = tmp_path / "other.db"
    make_table(other_path, "CREATE TABLE items (sku TEXT PRIMARY KEY, qty INT NOT NULL DEFAULT 1)")
    other = Resource(name="inventory", kind="database", engine="sqlite", location=str(other_path))
    with DatabaseResourceHandler() as first_handler, DatabaseResourceHandler() as second_handler:

        async def scenario() -> None:
            async with AgentPlan(first_handler, [inventory], plan_id="same") as first:
                async with AgentPlan(second_handler, [other], plan_id="same") as second:
                    agent, _ = agent_with(
                        [[call("add_item", "c1", sku="pear")], answer()], add_item
                    )
                    await second.run(agent, "restock")
                agent, _ = agent_with([[call("add_item", "c1", sku="apple")], answer()], add_item)
                await first.run(agent, "restock")

        asyncio.run(scenario())
    assert items(inventory_path) == ["apple"]
    assert items(other_path) == ["pear"]


# -- handler errors poison the plan -------------------------------------------------------------


def test_a_slow_model_past_checkpoint_ttl_commits_nothing(
    handler: DatabaseResourceHandler, inventory_path: Path
) -> None:
    inventory = Resource(
        name="inventory",
        kind="database",
        engine="sqlite",
        location=str(inventory_path),
        checkpoint_ttl=0.2,
    )

    async def think_slowly(_: Any) -> list[Any]:
        while handler.stats()["reaped"] == 0:  # the reaper rolls the plan back meanwhile
            await asyncio.sleep(0.02)
        return answer()

    agent, _ = agent_with(
        [[call("add_item", "c1", sku="apple")], ModelStep.respond(think_slowly)], add_item
    )
    plan, raised = asyncio.run(run_plan(handler, inventory, agent))
    assert type(raised) is CheckpointExpiredError
    assert plan.outcome == "rolled_back"
    assert "releasing it failed" in (plan.rollback_reason or "")
    assert items(inventory_path) == []


def test_an_expired_plan_stops_the_run_before_the_next_model_call(
    handler: DatabaseResourceHandler, inventory_path: Path
) -> None:
    inventory = Resource(
        name="inventory",
        kind="database",
        engine="sqlite",
        location=str(inventory_path),
        checkpoint_ttl=0.2,
    )

    async def think_slowly(_: Any) -> list[Any]:
        while handler.stats()["reaped"] == 0:
            await asyncio.sleep(0.02)
        return [call("add_item", "c2", sku="pear"), call("add_item", "c3", sku="plum")]

    agent, model = agent_with(
        [[call("add_item", "c1", sku="apple")], ModelStep.respond(think_slowly), answer()],
        add_item,
    )
    plan, raised = asyncio.run(run_plan(handler, inventory, agent))
    assert type(raised) is CheckpointExpiredError
    assert model.remaining_steps == 1  # never asked again after the poisoned turn
    assert plan.outcome == "rolled_back"
    assert items(inventory_path) == []
    assert handler.stats()["active_plans"] == 0


def test_a_plan_reaped_inside_a_tool_call_is_poisoned_even_if_the_tool_carries_on(
    handler: DatabaseResourceHandler, inventory_path: Path
) -> None:
    inventory = Resource(
        name="inventory",
        kind="database",
        engine="sqlite",
        location=str(inventory_path),
        checkpoint_ttl=0.2,
    )

    errors: list[BaseException] = []
    active: list[int] = []

    @plan_tool
    def add_twice(ctx: RunContextWrapper[AgentPlan], sku: str) -> str:
        """Add an item, dawdle past the TTL, then try again and hide the error."""
        with ctx.context.connection("inventory") as conn:
            conn.execute("INSERT INTO items (sku) VALUES (?)", (sku,))
        while handler.stats()["reaped"] == 0:
            threading.Event().wait(0.02)
        for attempt in (2, 3):
            try:
                with ctx.context.connection("inventory") as conn:
                    conn.execute("INSERT INTO items (sku) VALUES (?)", (f"{sku}-{attempt}",))
            except CleverAgentsError as exc:
                errors.append(exc)
        # Trying again did not open a new transaction for the plan.
        active.append(handler.stats()["active_plans"])
        return "all fine, honest"

    agent, model = agent_with([[call("add_twice", "c1", sku="apple")], answer()], add_twice)
    plan, raised = asyncio.run(run_plan(handler, inventory, agent))
    assert type(raised) is CheckpointExpiredError
    assert [type(error) for error in errors] == [CheckpointExpiredError] * 2
    assert active == [0]
    assert model.remaining_steps == 1
    assert plan.outcome == "rolled_back"
    assert items(inventory_path) == []


def test_a_plan_reaped_before_a_failed_call_rolls_back_is_poisoned(
    handler: DatabaseResourceHandler, inventory_path: Path
) -> None:
    inventory = Resource(
        name="inventory",
        kind="database",
        engine="sqlite",
        location=str(inventory_path),
        checkpoint_ttl=0.2,
    )

    @plan_tool
    def add_then_fail(ctx: RunContextWrapper[AgentPlan], sku: str) -> str:
        """Add an item, dawdle past the TTL, then fail."""
        with ctx.context.connection("inventory") as conn:
            conn.execute("INSERT INTO items (sku) VALUES (?)", (sku,))
        while handler.stats()["reaped"] == 0:
            threading.Event().wait(0.02)
        raise ValueError("too late")

    agent, _ = agent_with([[call("add_then_fail", "c1", sku="apple")], answer()], add_then_fail)
    plan, raised = asyncio.run(run_plan(handler, inventory, agent))
    assert type(raised) is CheckpointExpiredError
    assert plan.tool_rollbacks == []
    assert plan.outcome == "rolled_back"
    assert items(inventory_path) == []


def test_a_tool_that_lets_the_handler_error_through_is_poisoned_too(
    handler: DatabaseResourceHandler, inventory_path: Path
) -> None:
    inventory = Resource(
        name="inventory",
        kind="database",
        engine="sqlite",
        location=str(inventory_path),
        checkpoint_ttl=0.2,
    )

    @plan_tool
    def add_twice(ctx: RunContextWrapper[AgentPlan], sku: str) -> str:
        """Add an item, dawdle past the TTL, then try again."""
        with ctx.context.connection("inventory") as conn:
            conn.execute("INSERT INTO items (sku) VALUES (?)", (sku,))
        while handler.stats()["reaped"] == 0:
            threading.Event().wait(0.02)
        with ctx.context.connection("inventory") as conn:
            conn.execute("INSERT INTO items (sku) VALUES (?)", (sku + "-2",))
        return "unreachable"

    agent, _ = agent_with([[call("add_twice", "c1", sku="apple")], answer()], add_twice)
    plan, raised = asyncio.run(run_plan(handler, inventory, agent))
    assert type(raised) is CheckpointExpiredError
    assert plan.tool_rollbacks == []
    assert plan.outcome == "rolled_back"
    assert items(inventory_path) == []


def test_a_reaped_plan_whose_run_then_fails_rolls_back_quietly(
    handler: DatabaseResourceHandler, inventory_path: Path
) -> None:
    inventory = Resource(
        name="inventory",
        kind="database",
        engine="sqlite",
        location=str(inventory_path),
        checkpoint_ttl=0.2,
    )

    async def think_then_fail(_: Any) -> list[Any]:
        while handler.stats()["reaped"] == 0:
            await asyncio.sleep(0.02)
        raise ConnectionError("model unreachable")

    agent, _ = agent_with(
        [[call("add_item", "c1", sku="apple")], ModelStep.respond(think_then_fail)], add_item
    )
    plan, raised = asyncio.run(run_plan(handler, inventory, agent))
    assert type(raised) is ConnectionError
    assert plan.outcome == "rolled_back"
    assert items(inventory_path) == []


def test_a_busy_database_poisons_the_plan(tmp_path: Path, inventory_path: Path) -> None:
    inventory = Resource(
        name="inventory",
        kind="database",
        engine="sqlite",
        location=str(inventory_path),
        busy_timeout=0.2,
    )
    agent, model = agent_with(
        [[call("add_item", "c1", sku="apple"), call("add_item", "c2", sku="pear")], answer()],
        add_item,
    )
    with DatabaseResourceHandler() as handler:
        handler.create_checkpoint(inventory, "someone-else", "holding")  # holds the write turn
        plan, raised = asyncio.run(run_plan(handler, inventory, agent))
        handler.release_plan("someone-else")
    assert type(raised) is ResourceBusyError
    assert model.remaining_steps == 1
    assert plan.outcome == "rolled_back"
    assert items(inventory_path) == []


def test_a_poisoned_run_that_ends_without_another_model_call_raises_at_exit(
    inventory_path: Path,
) -> None:
    inventory = Resource(
        name="inventory",
        kind="database",
        engine="sqlite",
        location=str(inventory_path),
        busy_timeout=0.2,
    )
    agent, _ = agent_with(
        [[call("add_item", "c1", sku="apple")]], add_item, tool_use_behavior="stop_on_first_tool"
    )
    with DatabaseResourceHandler() as handler:
        handler.create_checkpoint(inventory, "someone-else", "holding")
        plan, raised = asyncio.run(run_plan(handler, inventory, agent))
        handler.rollback_plan("someone-else")
    assert type(raised) is ResourceBusyError
    assert plan.outcome == "rolled_back"
    assert items(inventory_path) == []


def test_an_evicted_plan_is_poisoned(
    tmp_path: Path, inventory: Resource, inventory_path: Path
) -> None:
    other_path = tmp_path / "other.db"
    make_table(other_path)
    other = Resource(name="other", kind="database", engine="sqlite", location=str(other_path))
    with DatabaseResourceHandler(max_connections=1, on_full="evict_lru") as handler:

        async def let_another_plan_in(_: Any) -> list[Any]:
            # Our plan is idle while the model thinks: the other plan evicts it.
            await asyncio.to_thread(handler.create_checkpoint, other, "other", "first")
            return [call("add_item", "c2", sku="pear")]

        agent, model = agent_with(
            [
                [call("add_item", "c1", sku="apple")],
                ModelStep.respond(let_another_plan_in),
                answer(),
            ],
            add_item,
        )
        plan, raised = asyncio.run(run_plan(handler, inventory, agent))
        handler.rollback_plan("other")
    assert type(raised) is CheckpointEvictedError
    assert model.remaining_steps == 1
    assert plan.outcome == "rolled_back"
    assert items(inventory_path) == []


# -- who may use the connection -----------------------------------------------------------


def test_a_plain_function_tool_cannot_reach_the_connection(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    errors: list[BaseException] = []

    @function_tool(failure_error_function=refused(errors))
    def sneak_in(ctx: RunContextWrapper[AgentPlan], sku: str) -> str:
        """Try to write without a checkpoint."""
        with ctx.context.connection("inventory") as conn:
            conn.execute("INSERT INTO items (sku) VALUES (?)", (sku,))
        return "sneaked in"

    agent, _ = agent_with(
        [[call("sneak_in", "c1", sku="mole"), call("add_item", "c2", sku="apple")], answer()],
        sneak_in,
        add_item,
    )
    plan, result = asyncio.run(run_plan(handler, inventory, agent))
    assert type(errors[0]) is ToolError
    assert "@plan_tool" in str(errors[0])
    assert outputs(result) == ["refused: ToolError", "added apple"]
    assert plan.outcome == "released"
    assert items(inventory_path) == ["apple"]


def test_code_outside_a_tool_call_cannot_reach_the_connection(
    handler: DatabaseResourceHandler, inventory: Resource
) -> None:
    async def scenario() -> None:
        async with AgentPlan(handler, [inventory]) as plan:
            with pytest.raises(ToolError, match="only a running @plan_tool call"):
                plan.connection("inventory").__enter__()

    asyncio.run(scenario())
    assert handler.stats()["active_plans"] == 0


def test_a_straggling_call_cannot_reopen_a_finished_plan(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    errors: list[BaseException] = []

    @plan_tool(failure_error_function=refused(errors))
    def late(ctx: RunContextWrapper[AgentPlan], sku: str) -> str:
        """Add an item (called after the plan ended)."""
        return add_item_body(ctx, sku)

    async def scenario() -> tuple[AgentPlan, Any]:
        async with AgentPlan(handler, [inventory]) as plan:
            agent, _ = agent_with([answer()], late)
            await plan.run(agent, "restock")
        context = ToolContext(plan, tool_name="late", tool_call_id="c9", tool_arguments="{}")
        output = await late.on_invoke_tool(context, '{"sku": "apple"}')
        return plan, output

    plan, output = asyncio.run(scenario())
    assert plan.outcome == "released"
    assert output == "refused: ToolError"
    assert "after it ended" in str(errors[0])
    assert handler.stats()["active_plans"] == 0
    assert items(inventory_path) == []


def test_leaving_waits_for_a_thread_still_holding_the_connection(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    inside, go_on, left = threading.Event(), threading.Event(), threading.Event()
    late_errors: list[BaseException] = []

    @plan_tool
    def hand_off(ctx: RunContextWrapper[AgentPlan], sku: str) -> str:
        """Start a thread that keeps the connection after the call returns."""
        plan = ctx.context

        def keep_using() -> None:
            with plan.connection("inventory") as conn:
                inside.set()
                go_on.wait(EVENTUALLY)
                conn.execute("INSERT INTO items (sku) VALUES (?)", (sku,))
            left.set()
            try:
                plan.connection("inventory").__enter__()
            except ToolError as exc:
                late_errors.append(exc)

        # The thread copies this call's context, as asyncio.to_thread would.
        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(keep_using,)).start()
        inside.wait(EVENTUALLY)
        return "handed off"

    agent, _ = agent_with([[call("hand_off", "c1", sku="apple")], answer()], hand_off)

    async def scenario() -> AgentPlan:
        async with AgentPlan(handler, [inventory]) as plan:
            await plan.run(agent, "restock")
            asyncio.get_running_loop().call_later(0.1, go_on.set)
        return plan

    plan = asyncio.run(scenario())
    assert left.is_set()
    assert plan.outcome == "released"
    assert items(inventory_path) == ["apple"]
    for _ in range(int(EVENTUALLY / 0.02)):
        if late_errors:
            break
        threading.Event().wait(0.02)
    assert type(late_errors[0]) is ToolError


def test_a_cancel_while_leaving_still_finishes_the_plan_then_propagates(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    inside, go_on, left = threading.Event(), threading.Event(), threading.Event()

    @plan_tool
    def hand_off(ctx: RunContextWrapper[AgentPlan], sku: str) -> str:
        """Start a thread that keeps the connection after the call returns."""
        plan = ctx.context

        def keep_using() -> None:
            with plan.connection("inventory") as conn:
                inside.set()
                go_on.wait(EVENTUALLY)
                conn.execute("INSERT INTO items (sku) VALUES (?)", (sku,))
            left.set()

        threading.Thread(target=contextvars.copy_context().run, args=(keep_using,)).start()
        inside.wait(EVENTUALLY)
        return "handed off"

    agent, _ = agent_with([[call("hand_off", "c1", sku="apple")], answer()], hand_off)
    plan = AgentPlan(handler, [inventory])

    async def scenario() -> None:
        ran = asyncio.Event()

        async def body() -> None:
            async with plan:
                await plan.run(agent, "restock")
                ran.set()  # leaving starts right away, and waits for the thread

        task = asyncio.ensure_future(body())
        await ran.wait()
        task.cancel()
        go_on.set()
        await task

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(scenario())
    assert left.is_set()
    assert plan.outcome == "released"  # the run had ended well before the cancel came
    assert items(inventory_path) == ["apple"]


def test_a_plan_tool_run_without_an_agent_plan_is_refused(inventory_path: Path) -> None:
    errors: list[BaseException] = []

    @plan_tool(failure_error_function=refused(errors))
    def add(ctx: RunContextWrapper[AgentPlan], sku: str) -> str:
        """Add an item."""
        return add_item_body(ctx, sku)

    agent, _ = agent_with([[call("add", "c1", sku="apple")], answer()], add)
    asyncio.run(Runner.run(agent, "restock", context={"not": "a plan"}))
    assert type(errors[0]) is ToolError
    assert "needs an AgentPlan" in str(errors[0])
    assert items(inventory_path) == []


# -- the plan's own API ---------------------------------------------------------------------------


def test_the_plan_checks_what_it_is_given(
    handler: DatabaseResourceHandler, inventory: Resource
) -> None:
    with pytest.raises(ValueError, match="at least one resource"):
        AgentPlan(handler, [])
    with pytest.raises(ValueError, match="two resources are called 'inventory'"):
        AgentPlan(handler, [inventory, inventory])
    with pytest.raises(TypeError, match="Resource objects"):
        AgentPlan(handler, ["inventory"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="DatabaseResourceHandler"):
        AgentPlan(object(), [inventory])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="plan_id"):
        AgentPlan(handler, [inventory], plan_id="")
    first, second = AgentPlan(handler, [inventory]), AgentPlan(handler, [inventory])
    assert first.plan_id.startswith("agent-")
    assert first.plan_id != second.plan_id
    plan = AgentPlan(handler, [inventory], plan_id="restock-42", data={"user": "ann"})
    assert (plan.plan_id, plan.resources, plan.data) == (
        "restock-42",
        (inventory,),
        {"user": "ann"},
    )
    assert repr(plan) == "<AgentPlan 'restock-42' (new)>"
    assert plan.outcome is None


def test_the_plan_is_entered_once_and_runs_only_inside_its_block(
    handler: DatabaseResourceHandler, inventory: Resource
) -> None:
    agent, _ = agent_with([answer()])

    async def scenario() -> AgentPlan:
        plan = AgentPlan(handler, [inventory])
        with pytest.raises(RuntimeError, match="not entered yet"):
            await plan.run(agent, "restock")
        with pytest.raises(RuntimeError, match="not entered"):
            await Runner.run(agent, "restock", context=plan, hooks=plan.hooks)
        async with plan:
            with pytest.raises(RuntimeError, match="already entered"):
                await plan.__aenter__()
            with pytest.raises(TypeError, match="the plan is the run's context"):
                await plan.run(agent, "restock", context={})
            await plan.run(agent, "restock")
        with pytest.raises(RuntimeError, match="finished"):
            plan.run_streamed(agent, "restock")
        return plan

    plan = asyncio.run(scenario())
    # The run touched no database, so there was nothing to commit, but it returned an answer.
    assert plan.outcome == "released"
    assert repr(plan) == f"<AgentPlan {plan.plan_id!r} (released)>"


def test_an_empty_block_rolls_back(handler: DatabaseResourceHandler, inventory: Resource) -> None:
    async def scenario() -> AgentPlan:
        async with AgentPlan(handler, [inventory]) as plan:
            pass
        return plan

    plan = asyncio.run(scenario())
    assert plan.outcome == "rolled_back"
    assert plan.rollback_reason == "no run returned a final output"


def test_your_hooks_and_run_config_are_combined_with_the_plans(
    handler: DatabaseResourceHandler, inventory: Resource, inventory_path: Path
) -> None:
    seen: list[str] = []

    class Recorder(RunHooks[Any]):
        async def on_agent_start(self, context: Any, agent: Any) -> None:
            seen.append("agent_start")

        async def on_llm_start(self, context: Any, agent: Any, prompt: Any, items: Any) -> None:
            seen.append("llm_start")

        async def on_llm_end(self, context: Any, agent: Any, response: Any) -> None:
            seen.append("llm_end")

        async def on_tool_start(self, context: Any, agent: Any, tool: Any) -> None:
            seen.append("tool_start")

        async def on_tool_end(self, context: Any, agent: Any, tool: Any, result: Any) -> None:
            seen.append("tool_end")

        async def on_handoff(self, context: Any, from_agent: Any, to_agent: Any) -> None:
            seen.append("handoff")

        async def on_agent_end(self, context: Any, agent: Any, output: Any) -> None:
            seen.append("agent_end")

    def my_filter(data: CallModelData[Any]) -> ModelInputData:
        seen.append("filter")
        return data.model_data

    async def my_async_filter(data: CallModelData[Any]) -> ModelInputData:
        seen.append("async filter")
        return data.model_data

    specialist, _ = agent_with(
        [[call("add_item", "c2", sku="pear")], answer()], add_item, name="specialist"
    )
    clerk, _ = agent_with(
        [[call("add_item", "c1", sku="apple"), call("transfer_to_specialist", "h1")]],
        add_item,
        handoffs=[specialist],
    )

    async def scenario() -> list[AgentPlan]:
        plans = []
        async with AgentPlan(handler, [inventory]) as plan:
            await plan.run(
                clerk,
                "restock",
                hooks=Recorder(),
                run_config=RunConfig(call_model_input_filter=my_filter),
            )
        plans.append(plan)
        again, _ = agent_with([answer()])
        async with AgentPlan(handler, [inventory]) as plan:
            await plan.run(again, "check", run_config={"call_model_input_filter": my_async_filter})
        plans.append(plan)
        return plans

    plans = asyncio.run(scenario())
    assert [plan.outcome for plan in plans] == ["released", "released"]
    assert seen[:3] == ["agent_start", "filter", "llm_start"]
    for event in ("tool_start", "tool_end", "handoff", "llm_end", "agent_end", "async filter"):
        assert event in seen
    assert items(inventory_path) == ["apple", "pear"]


def test_file_descriptors_return_to_baseline(tmp_path: Path) -> None:
    path = tmp_path / "inventory.db"
    make_table(path, "CREATE TABLE items (sku TEXT PRIMARY KEY, qty INT NOT NULL DEFAULT 1)")
    inventory = Resource(name="inventory", kind="database", engine="sqlite", location=str(path))

    async def runs(handler: DatabaseResourceHandler) -> None:
        for number in range(5):
            agent, _ = agent_with(
                [[call("add_item", "c1", sku=f"ok-{number}")], [call("add_item", "c2", sku="bad")]],
                add_item,
            )
            await run_plan(handler, inventory, agent, max_turns=2)
            agent, _ = agent_with(
                [[call("add_item", "c1", sku=f"ok-{number}")], answer()], add_item
            )
            await run_plan(handler, inventory, agent)

    with DatabaseResourceHandler() as warm_up:
        asyncio.run(runs(warm_up))  # the SDK's imports and caches settle first
    baseline = count_fds()
    with DatabaseResourceHandler() as handler:
        asyncio.run(runs(handler))
    assert count_fds() <= baseline
    assert items(path) == [f"ok-{number}" for number in range(5)]


# -- decorating -----------------------------------------------------------------------------


def no_parameters() -> str:
    return "x"


def unannotated(ctx, sku: str) -> str:  # type: ignore[no-untyped-def]
    return sku


def wrong_annotation(ctx: str, sku: str) -> str:
    return sku


def keyword_only(*, ctx: RunContextWrapper[AgentPlan]) -> str:
    return "x"


def context_second(sku: str, ctx: RunContextWrapper[AgentPlan]) -> str:
    return sku


def unresolvable(ctx: NoSuchType) -> str:  # type: ignore[name-defined]  # noqa: F821
    return "x"


@pytest.mark.parametrize(
    ("func", "message"),
    [
        (no_parameters, "must take the run context first"),
        (unannotated, "got no annotation"),
        (wrong_annotation, "must be annotated as the run context"),
        (keyword_only, "must take the run context first"),
        (context_second, "'sku' must be annotated as the run context"),
        (unresolvable, "cannot be resolved"),
        (functools.partial(add_item_body), "needs a function"),
    ],
)
def test_plan_tool_refuses_a_function_without_the_run_context_first(
    func: Callable[..., Any], message: str
) -> None:
    with pytest.raises(ToolError, match=message):
        plan_tool(func)
    with pytest.raises(ToolError, match=message):
        plan_tool(name_override="x")(func)


def with_tool_context(ctx: ToolContext[AgentPlan], sku: str) -> str:
    """Take the richer tool context."""
    return sku


def with_annotated_context(ctx: Annotated[RunContextWrapper[AgentPlan], "the plan"]) -> str:
    """Take an annotated context."""
    return "x"


@pytest.mark.parametrize("func", [with_tool_context, with_annotated_context, add_item_body])
def test_plan_tool_accepts_any_form_of_the_run_context(func: Callable[..., Any]) -> None:
    tool = plan_tool(func)
    assert isinstance(tool, FunctionTool)
    assert tool.name == func.__name__
    assert "ctx" not in tool.params_json_schema["properties"]


def test_plan_tool_passes_function_tool_options_on() -> None:
    tool = plan_tool(
        name_override="restock",
        description_override="Restock one item.",
        strict_mode=False,
        needs_approval=True,
    )(add_item_body)
    assert isinstance(tool, FunctionTool)
    assert (tool.name, tool.description) == ("restock", "Restock one item.")
    assert tool.strict_json_schema is False
    assert tool.needs_approval is True
    assert list(tool.params_json_schema["properties"]) == ["sku"]


# -- the example ----------------------------------------------------------------------------


def test_the_example_runs_with_its_scripted_model(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "examples" / "agents" / "restock_agent.py"
    shop = tmp_path / "shop.db"
    done = subprocess.run(
        [sys.executable, str(example), "--db", str(shop)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "released" in done.stdout
    assert "rolled back sell at tool-3" in done.stdout
    assert query(shop, "SELECT sku, qty FROM items ORDER BY sku") == [
        ("apple", 4),
        ("pear", 3),
        ("plum", 10),
    ]
    fresh = tmp_path / "fresh.db"
    short = subprocess.run(
        [sys.executable, str(example), "--db", str(fresh), "--max-turns", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert short.returncode == 1, short.stderr
    assert "MaxTurnsExceeded" in short.stdout
    assert "rolled_back" in short.stdout
    assert query(fresh, "SELECT sku, qty FROM items ORDER BY sku") == [
        ("apple", 4),
        ("pear", 5),
        ("plum", 0),
    ]
