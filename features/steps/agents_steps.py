"""Steps that run an OpenAI Agents SDK agent inside an AgentPlan, with the SDK's scripted model.

The tools keep what a scenario needs to see (errors, overlaps, events) on the
plan's ``data``, so nothing is shared between scenarios.
"""

from __future__ import annotations

import asyncio
import builtins
import threading
from typing import Any

from agents import (
    Agent,
    GuardrailFunctionOutput,
    OutputGuardrail,
    RunContextWrapper,
    function_tool,
    set_tracing_disabled,
)
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call
from bdd_support import EVENTUALLY_S, path_in_workdir
from behave import given, then, when

from cleveragents.integrations.openai_agents import AgentPlan, plan_tool
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler

set_tracing_disabled(True)  # never export traces from a test run


class AgentScenario:
    """What the tools of one scenario record, reached through ``ctx.context.data``."""

    def __init__(self) -> None:
        self.refusals: dict[str, BaseException] = {}
        self.lock = threading.Lock()
        self.running = 0
        self.most_running = 0
        self.started = threading.Event()
        self.go_on = threading.Event()
        self.finished = threading.Event()

    def enter(self) -> None:
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)

    def leave(self) -> None:
        with self.lock:
            self.running -= 1


def _scenario_of(ctx: RunContextWrapper[AgentPlan]) -> AgentScenario:
    state: AgentScenario = ctx.context.data
    return state


def _keep_refusal(ctx: RunContextWrapper[Any], error: Exception) -> str:
    """Tell the model the tool was refused, and keep the error for the scenario."""
    plan = ctx.context
    if isinstance(plan, AgentPlan):
        plan.data.refusals[getattr(ctx, "tool_name", "?")] = error
    return f"refused: {type(error).__name__}"


def _insert(ctx: RunContextWrapper[AgentPlan], sku: str) -> None:
    with ctx.context.connection("inventory") as conn:
        conn.execute("INSERT INTO items (sku) VALUES (?)", (sku,))


@plan_tool
def add_item(ctx: RunContextWrapper[AgentPlan], sku: str) -> str:
    """Add an item to the inventory; skus starting with 'bad' are written, then refused."""
    state = _scenario_of(ctx)
    state.enter()
    try:
        _insert(ctx, sku)
        threading.Event().wait(0.02)  # long enough for an overlapping call to show
        if sku.startswith("bad"):
            raise ValueError(f"{sku} is not for sale")
        return f"added {sku}"
    finally:
        state.leave()


@plan_tool
def add_item_when_told(ctx: RunContextWrapper[AgentPlan], sku: str) -> str:
    """Add an item once the scenario says so."""
    state = _scenario_of(ctx)
    state.started.set()
    state.go_on.wait(EVENTUALLY_S)
    _insert(ctx, sku)
    state.finished.set()
    return f"added {sku}"


@plan_tool(needs_approval=True)
def clear_items(ctx: RunContextWrapper[AgentPlan]) -> str:
    """Delete every item (a person must approve this)."""
    with ctx.context.connection("inventory") as conn:
        conn.execute("DELETE FROM items")
    return "cleared"


@function_tool(failure_error_function=_keep_refusal)
def sneak_in(ctx: RunContextWrapper[AgentPlan], sku: str) -> str:
    """Add an item without being a plan_tool."""
    _insert(ctx, sku)
    return f"sneaked {sku} in"


TOOLS = [add_item, add_item_when_told, clear_items, sneak_in]


# -- the script -------------------------------------------------------------------------


def _model_turn(context: Any, text: str) -> Any:
    """Turn one ``does`` cell into a scripted model step."""
    text = text.strip()
    expiring = "thinks until the plan expires, then "
    if text.startswith(expiring):
        then_does = _model_turn(context, text[len(expiring) :])

        async def think_until_expired(_: Any) -> Any:
            while context.agent_handler.stats()["reaped"] == 0:
                await asyncio.sleep(0.02)
            return then_does

        return ModelStep.respond(think_until_expired)
    if text == "never answers":

        async def never_answer(_: Any) -> Any:
            await asyncio.sleep(EVENTUALLY_S * 10)
            raise AssertionError("the run should have been cancelled")

        return ModelStep.respond(never_answer)
    if text.startswith("answers "):
        return [assistant_message(text[len("answers ") :].strip('"'))]
    if text.startswith("fails with "):
        error: type[Exception] = getattr(builtins, text[len("fails with ") :])
        return error("the model is unreachable")
    calls = []
    for part in text.split(","):
        tool, _, argument = part.strip().partition(" ")
        context.agent_call_ids += 1
        arguments = {"sku": argument} if argument else {}
        calls.append(function_call(tool, arguments, call_id=f"c{context.agent_call_ids}"))
    return calls


@given('an agent plan on "{filename}"')
def step_agent_plan_on(context: Any, filename: str) -> None:
    context.agent_database = path_in_workdir(context, filename)
    context.agent_settings = {}
    context.agent_call_ids = 0
    context.agent_guardrails = []


@given('the agent plan\'s checkpoint_ttl is "{ttl}"')
def step_agent_plan_ttl(context: Any, ttl: str) -> None:
    context.agent_settings["checkpoint_ttl"] = ttl


@given('the agent\'s final answers must not mention "{word}"')
def step_agent_output_guardrail(context: Any, word: str) -> None:
    def check(ctx: Any, agent: Any, output: Any) -> GuardrailFunctionOutput:
        return GuardrailFunctionOutput(output_info=None, tripwire_triggered=word in str(output))

    context.agent_guardrails.append(OutputGuardrail(check, name=f"never {word!r}"))


@given("the scripted model plays:")
def step_scripted_model(context: Any) -> None:
    assert context.table is not None, "this step needs a table of turns"
    turns = [_model_turn(context, row["does"]) for row in context.table]
    context.agent_model = ScriptedModel(turns)


# -- running --------------------------------------------------------------------------


def _prepare(context: Any) -> tuple[AgentPlan, Agent[Any]]:
    """Make the handler, the plan and the agent of the scenario."""
    handler = DatabaseResourceHandler()
    context.closables.append(handler)  # closed after the scenario by environment.py
    context.agent_handler = handler
    inventory = Resource(
        name="inventory",
        kind="database",
        engine="sqlite",
        location=str(context.agent_database),
        **context.agent_settings,
    )
    context.agent_state = AgentScenario()
    context.agent_plan = AgentPlan(handler, [inventory], data=context.agent_state)
    context.agent_result = None
    context.agent_error = None
    agent = Agent(
        name="clerk",
        model=context.agent_model,
        tools=TOOLS,
        output_guardrails=context.agent_guardrails,
    )
    return context.agent_plan, agent


def _run(context: Any, **options: Any) -> None:
    plan, agent = _prepare(context)

    async def scenario() -> None:
        async with plan:
            context.agent_result = await plan.run(agent, "restock the shelves", **options)

    _capture(context, scenario)


def _capture(context: Any, scenario: Any) -> None:
    try:
        asyncio.run(scenario())
    except (Exception, asyncio.CancelledError) as exc:
        context.agent_error = exc


@when("the agent runs")
def step_agent_runs(context: Any) -> None:
    _run(context)


@when("the agent runs and the block catches what the run raises")
def step_agent_runs_and_block_catches(context: Any) -> None:
    plan, agent = _prepare(context)
    context.agent_caught = None

    async def scenario() -> None:
        async with plan:
            try:
                context.agent_result = await plan.run(agent, "restock the shelves")
            except Exception as exc:  # what a caller that reports and goes on does
                context.agent_caught = exc

    _capture(context, scenario)


@when("the agent runs with at most {turns:d} turns")
def step_agent_runs_with_max_turns(context: Any, turns: int) -> None:
    _run(context, max_turns=turns)


@when("the agent runs with at most {turns:d} turns and a max_turns error handler")
def step_agent_runs_with_max_turns_handler(context: Any, turns: int) -> None:
    _run(context, max_turns=turns, error_handlers={"max_turns": lambda data: "gave up"})


@when('the agent runs and is cancelled while "{tool}" runs')
def step_agent_runs_and_is_cancelled(context: Any, tool: str) -> None:
    plan, agent = _prepare(context)
    state = context.agent_state
    assert tool == "add_item_when_told", f"only add_item_when_told can be waited for, not {tool}"

    async def scenario() -> None:
        try:
            async with plan:
                run = asyncio.ensure_future(plan.run(agent, "restock the shelves"))
                await asyncio.to_thread(state.started.wait, EVENTUALLY_S)
                run.cancel()
                # The tool's thread goes on after the cancel; the plan must wait for it.
                asyncio.get_running_loop().call_later(0.1, state.go_on.set)
                await run
        finally:
            context.agent_finished_at_exit = state.finished.is_set()

    _capture(context, scenario)


@when("the agent runs streamed and the stream is cancelled after the first tool output")
def step_agent_runs_streamed_and_is_cancelled(context: Any) -> None:
    plan, agent = _prepare(context)

    async def scenario() -> None:
        async with plan:
            result = plan.run_streamed(agent, "restock the shelves")
            async for event in result.stream_events():
                if getattr(event, "name", None) == "tool_output":
                    result.cancel()
            context.agent_result = result

    _capture(context, scenario)


# -- checks ----------------------------------------------------------------------------------


def _no_error(context: Any) -> None:
    error = context.agent_error
    assert error is None, f"the run failed: {type(error).__name__}: {error}"


@then("the agent plan was released")
def step_check_agent_plan_released(context: Any) -> None:
    _no_error(context)
    plan = context.agent_plan
    assert plan.outcome == "released", f"{plan.outcome}: {plan.rollback_reason}"


@then("the agent plan was rolled back")
def step_check_agent_plan_rolled_back(context: Any) -> None:
    assert context.agent_plan.outcome == "rolled_back", context.agent_plan.outcome


@then('the agent plan was rolled back because "{text}"')
def step_check_agent_plan_rolled_back_because(context: Any, text: str) -> None:
    plan = context.agent_plan
    assert plan.outcome == "rolled_back", plan.outcome
    assert text in (plan.rollback_reason or ""), plan.rollback_reason


@then("the agent run failed with {name}")
def step_check_agent_run_failed(context: Any, name: str) -> None:
    error = context.agent_error
    assert type(error).__name__ == name, f"expected {name}, got {error!r}"


@then("the block caught {name}")
def step_check_block_caught(context: Any, name: str) -> None:
    _no_error(context)
    caught = context.agent_caught
    assert type(caught).__name__ == name, f"expected {name}, got {caught!r}"


@then('the run\'s final output is "{text}"')
def step_check_final_output(context: Any, text: str) -> None:
    _no_error(context)
    assert context.agent_result.final_output == text, context.agent_result.final_output


@then('the model was told "{text}"')
def step_check_model_was_told(context: Any, text: str) -> None:
    told = [
        item.output
        for item in context.agent_result.new_items
        if item.type == "tool_call_output_item"
    ]
    assert text in told, f"the tools told the model {told}"


@then('the agent plan rolled back the call to "{tool}" at checkpoint "{label}"')
def step_check_tool_rollback(context: Any, tool: str, label: str) -> None:
    done = [(rollback.tool, rollback.checkpoint) for rollback in context.agent_plan.tool_rollbacks]
    assert done == [(tool, label)], f"the plan rolled back {done}"


@then("the tool calls never overlapped")
def step_check_no_overlap(context: Any) -> None:
    assert context.agent_state.most_running == 1, context.agent_state.most_running


@then('the thread of "{tool}" had finished when the plan ended')
def step_check_thread_finished(context: Any, tool: str) -> None:
    assert context.agent_finished_at_exit, f"the plan ended while {tool} was still running"


@then('the run is waiting for approval of "{tool}"')
def step_check_waiting_for_approval(context: Any, tool: str) -> None:
    _no_error(context)
    waiting = [item.tool_name for item in context.agent_result.interruptions]
    assert waiting == [tool], f"the run waits for {waiting}"


@then("the scripted model has {count:d} turn left")
@then("the scripted model has {count:d} turns left")
def step_check_model_turns_left(context: Any, count: int) -> None:
    assert context.agent_model.remaining_steps == count, context.agent_model.remaining_steps


@then('the tool "{tool}" was refused with {name}')
def step_check_tool_refused(context: Any, tool: str, name: str) -> None:
    refusal = context.agent_state.refusals.get(tool)
    assert type(refusal).__name__ == name, f"{tool} got {refusal!r}"
