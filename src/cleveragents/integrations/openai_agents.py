"""Transactional tool calls for OpenAI Agents SDK runs: one agent run is one plan.

An :class:`AgentPlan` is the run's context. Every :func:`plan_tool` call takes
a checkpoint on each of the plan's databases and runs alone, under the plan's
lock; a call that raises is rolled back to its checkpoint and the model hears
about the error as usual. When the ``async with`` block ends, the plan is
released (committed) only if the run returned the model's final output and
no handler error poisoned it; otherwise all of its work is rolled back.

This module imports the SDK (``pip install 'cleveragents[agents]'``); importing
``cleveragents`` does not. See ``docs/agents.md``.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import inspect
import itertools
import logging
import threading
import typing
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from types import TracebackType
from typing import Any, Literal, TypeVar, final, overload

try:
    from agents import (
        Agent,
        FunctionTool,
        RunConfig,
        RunContextWrapper,
        RunHooks,
        Runner,
        function_tool,
    )
    from agents.result import RunResult, RunResultStreaming
    from agents.run_config import CallModelData, ModelInputData
    from agents.tool_context import ToolContext
except ImportError as exc:
    raise ImportError(
        "cleveragents.integrations.openai_agents needs the OpenAI Agents SDK: "
        "pip install 'cleveragents[agents]'"
    ) from exc

from cleveragents._run_spans import closes_plan_span, opens_plan_span
from cleveragents.errors import PartialCommitError, PlanError, PlanProblem, ResourceError, ToolError
from cleveragents.integrations._agent_verdict import NO_FINAL_OUTPUT, Verdict
from cleveragents.integrations._common import ToolRollback
from cleveragents.resource.base import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: What became of the plan's work: all committed, all rolled back, or (a commit
#: failing after another database's succeeded) part of it committed.
Outcome = Literal["released", "rolled_back", "partial_commit"]
_State = Literal["new", "open", "closing", "finished"]

#: The AgentPlans open on each handler, by plan id: two open at once under one id
#: would share one transaction in the handler.
_OPEN: weakref.WeakKeyDictionary[DatabaseResourceHandler, dict[str, AgentPlan]] = (
    weakref.WeakKeyDictionary()
)
_OPEN_LOCK = threading.Lock()

#: The plan_tool call the current task or thread is running on behalf of. Set
#: only inside a call (asyncio.to_thread copies it into the call's thread), so
#: code anywhere else finds ``None`` and cannot reach a plan's connection.
_CURRENT_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(
    "cleveragents_plan_tool_call", default=None
)


class _Call:
    """One plan_tool call: its checkpoint and whether its function is running."""

    __slots__ = ("abandoned", "active", "call_id", "checkpoint", "plan", "task", "tool")

    def __init__(self, plan: AgentPlan, tool: str, call_id: str | None) -> None:
        self.plan = plan
        self.tool = tool
        self.call_id = call_id
        self.checkpoint = ""
        #: True while the tool function runs; guarded by the plan's ``_gate``.
        self.active = False
        #: The SDK stopped waiting for this call (cancellation or the tool's timeout).
        self.abandoned = False
        #: The task running an async tool function, so that abandoning it cancels it.
        self.task: asyncio.Future[Any] | None = None


@final
class AgentPlan:
    """One agent run as one plan: pass it as the run's context, with its hooks and run config.

    ::

        async with AgentPlan(handler, resources=[inventory]) as plan:
            result = await plan.run(agent, "restock low items", max_turns=10)
        assert plan.outcome in ("released", "rolled_back")

    ``plan.run()`` and ``plan.run_streamed()`` call the ``Runner`` with
    ``context=plan, hooks=plan.hooks, run_config=plan.run_config``; calling
    the ``Runner`` yourself with those three works the same way, except that a
    ``max_turns`` error handler is then recognised only for agents with the
    default ``tool_use_behavior``.

    :param handler: the database handler that owns the connections.
    :param resources: the databases the plan's tools may use, by name.
    :param plan_id: the plan's id in the handler; generated when omitted.
    :param data: anything else your tools need (``ctx.context.data``).
    """

    def __init__(
        self,
        handler: DatabaseResourceHandler,
        resources: Sequence[Resource],
        *,
        plan_id: str | None = None,
        data: Any = None,
    ) -> None:
        if not isinstance(handler, DatabaseResourceHandler):
            raise TypeError(f"AgentPlan needs a DatabaseResourceHandler, got {handler!r}")
        by_name: dict[str, Resource] = {}
        for resource in resources:
            if not isinstance(resource, Resource):
                raise TypeError(f"AgentPlan resources must be Resource objects, got {resource!r}")
            if resource.name in by_name:
                raise ValueError(f"two resources are called {resource.name!r}; names must differ")
            by_name[resource.name] = resource
        if not by_name:
            raise ValueError("AgentPlan needs at least one resource")
        if plan_id is None:
            plan_id = f"agent-{uuid.uuid4().hex[:12]}"
        elif not isinstance(plan_id, str) or not plan_id:
            raise ValueError(f"plan_id must be a non-empty string, got {plan_id!r}")
        self.plan_id = plan_id
        self.resources = tuple(by_name.values())
        self.data = data
        #: ``"released"``, ``"rolled_back"`` or ``"partial_commit"`` once the block has ended.
        self.outcome: Outcome | None = None
        #: The resources whose work was committed, in commit order (all the plan used
        #: when released, those committed before a commit failed after a partial commit).
        self.committed: tuple[str, ...] = ()
        #: Why the plan was rolled back (``None`` when it was released or is still open).
        self.rollback_reason: str | None = None
        #: The tool calls that raised and were rolled back to their checkpoints, in order.
        self.tool_rollbacks: list[ToolRollback] = []
        self._handler = handler
        self._by_name = by_name
        # _gate guards what tool threads read: the state, the calls' `active`
        # flags, the poison and the count of connections lent out.
        self._gate = threading.Condition()
        self._state: _State = "new"
        self._lent = 0
        self._verdict = Verdict()
        # Resource names the plan has work on; only tool calls add to it, one at a time.
        self._used: set[str] = set()
        # The rest is only touched on the event loop.
        self._turn = asyncio.Lock()
        self._calls: set[asyncio.Task[Any]] = set()
        self._labels = itertools.count(1)
        self._streams: list[RunResultStreaming] = []
        self._exit_cancelled = False
        self._hooks = _PlanHooks(self)

    def __repr__(self) -> str:
        return f"<AgentPlan {self.plan_id!r} ({self.outcome or self._state})>"

    # -- what the run is given ---------------------------------------------------

    @property
    def hooks(self) -> RunHooks[Any]:
        """Run hooks that stop a poisoned run before its next model call and see how it ends."""
        return self._hooks

    @property
    def run_config(self) -> RunConfig:
        """A ``RunConfig`` that stops a poisoned run before its next model call."""
        return self._run_config(None)

    async def run(self, starting_agent: Agent[Any], input: Any, **options: Any) -> RunResult:
        """Run the agent as this plan's run: ``Runner.run`` with the plan's context and hooks.

        Takes ``Runner.run``'s keywords; ``hooks``, ``run_config`` and
        ``error_handlers`` given here are combined with the plan's own.
        """
        self._check_open("run()")
        options = self._run_options(options)
        try:
            result = await Runner.run(starting_agent, input, **options)
        except BaseException as exc:
            # Output guardrails raise after the hooks saw the final output.
            self._verdict.run_raised(exc)
            raise
        if result.interruptions:
            self._verdict.doom_with("the run stopped at an approval interruption")
        return result

    def run_streamed(
        self, starting_agent: Agent[Any], input: Any, **options: Any
    ) -> RunResultStreaming:
        """Start the agent as this plan's run, streamed: ``Runner.run_streamed``, set up likewise.

        Leaving the ``async with`` block cancels the run if it is still going,
        and waits for it to stop.
        """
        self._check_open("run_streamed()")
        result = Runner.run_streamed(starting_agent, input, **self._run_options(options))
        self._streams.append(result)
        return result

    # -- what tools use -----------------------------------------------------------

    @contextmanager
    def connection(self, resource: str) -> Iterator[Any]:
        """Lend the plan's own connection to *resource*, inside the plan's transaction.

        Only code running inside a :func:`plan_tool` call of this plan may
        borrow it; never commit or roll back on it.

        :raises ToolError: called outside a ``plan_tool`` call, or *resource* is unknown.
        """
        call = _CURRENT_CALL.get()
        target = self._by_name.get(resource)
        with self._gate:
            if call is None or call.plan is not self or not call.active:
                raise ToolError(
                    f"only a running @plan_tool call of agent plan {self.plan_id!r} may use "
                    f"its connection to {resource!r}; make this tool a @plan_tool"
                )
            if target is None:
                known = ", ".join(repr(name) for name in self._by_name)
                raise ToolError(
                    f"agent plan {self.plan_id!r} has no resource {resource!r} (known: {known})"
                )
            if self._verdict.poison is not None:
                # The handler already ended the plan's work: going on would open a new one.
                raise self._verdict.poison
            self._lent += 1
        try:
            with ExitStack() as stack:
                try:
                    conn = stack.enter_context(self._handler.connection(target, self.plan_id))
                except BaseException as exc:
                    self._poison_with(exc)
                    raise
                self._used.add(resource)
                yield conn
        finally:
            with self._gate:
                self._lent -= 1
                self._gate.notify_all()

    # -- the plan's lifetime ----------------------------------------------------------

    @opens_plan_span
    async def __aenter__(self) -> AgentPlan:
        with self._gate:
            if self._state != "new":
                raise RuntimeError(f"agent plan {self.plan_id!r} was already entered")
            self._claim_plan_id()
            self._state = "open"
        return self

    @closes_plan_span
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._gate:
            self._state = "closing"  # no new tool call starts from now on
        try:
            await self._wait_for_runs()
            self.rollback_reason = self._verdict.reason_to_roll_back(exc)
            if self.rollback_reason == NO_FINAL_OUTPUT:
                logger.warning(
                    "agent plan %r saw no final output; pass hooks=plan.hooks to the Runner, "
                    "or use plan.run()",
                    self.plan_id,
                )
            failure = await self._end_in_handler()
        finally:
            with self._gate:
                self._state = "finished"
            self._free_plan_id()
        self._raise_at_exit(exc, failure)

    def _claim_plan_id(self) -> None:
        """Take the plan id on the handler; call with ``_gate`` held."""
        with _OPEN_LOCK:
            open_here = _OPEN.setdefault(self._handler, {})
            if self.plan_id in open_here:
                problem = (
                    f"another AgentPlan with this id is open on handler {self._handler.name!r}; "
                    "plans open at once need different ids (leave plan_id out to get a fresh one)"
                )
                raise PlanError(
                    [PlanProblem(f"AgentPlan {self.plan_id!r}", None, "plan_id", problem)]
                )
            open_here[self.plan_id] = self

    def _free_plan_id(self) -> None:
        with _OPEN_LOCK:
            del _OPEN[self._handler][self.plan_id]  # taken by _claim_plan_id on entering

    async def _wait_for_runs(self) -> None:
        """Stop streamed runs still going, then wait for every run and tool call to end."""
        for stream in self._streams:
            if not stream.is_complete:
                self._verdict.doom_with("the streamed run was still going when the plan ended")
                stream.cancel()
        runs = [stream.run_loop_task for stream in self._streams if stream.run_loop_task]
        # Wait for every call still running, even through cancellation: a sync
        # tool's thread cannot be stopped, and it may still be writing.
        while runs or self._calls:
            await self._uninterrupted(asyncio.gather(*runs, *self._calls, return_exceptions=True))
            runs = []
        with self._gate:
            lent = self._lent
        if lent:
            await self._uninterrupted(asyncio.to_thread(self._wait_until_returned))
        for stream in self._streams:
            # A stream keeps what its run raised (an output guardrail, say) for the
            # one who reads its events, who may have caught it.
            raised = stream.run_loop_exception or getattr(stream, "_stored_exception", None)
            if raised is not None:
                self._verdict.run_raised(raised)
            if stream.interruptions:
                self._verdict.doom_with("the run stopped at an approval interruption")

    async def _end_in_handler(self) -> ResourceError | None:
        """Release or roll back the plan's work; return the error releasing raised, if any."""
        failure: ResourceError | None = None
        if self.rollback_reason is None:
            try:
                await self._uninterrupted(self._handler.arelease_plan(self.plan_id))
                self.outcome = "released"
                self.committed = tuple(r.name for r in self.resources if r.name in self._used)
            except PartialCommitError as error:
                self.rollback_reason = f"releasing it failed: {error}"
                self.outcome = "partial_commit"
                self.committed = tuple(error.committed)
                failure = error
            except ResourceError as error:
                self.rollback_reason = f"releasing it failed: {error}"
                failure = error
        if self.outcome is None:
            try:
                await self._uninterrupted(self._handler.arollback_plan(self.plan_id))
            except ResourceError as error:
                # Expired, evicted or closed: its work is already undone.
                logger.debug("rolling back agent plan %r: %s", self.plan_id, error)
            self.outcome = "rolled_back"
        if self.outcome == "released":
            logger.debug("agent plan %r released", self.plan_id)
        else:
            logger.info("agent plan %r %s: %s", self.plan_id, self.outcome, self.rollback_reason)
        return failure

    def _raise_at_exit(self, exc: BaseException | None, failure: ResourceError | None) -> None:
        """Raise what the block's end must report: a failed release, an unreported poison."""
        if failure is not None:
            raise failure
        verdict = self._verdict
        if exc is None and verdict.poison is not None and not verdict.poison_reported:
            # The run never stopped on it (no model call came after): say it here.
            raise verdict.poison
        if self._exit_cancelled and not isinstance(exc, asyncio.CancelledError):
            raise asyncio.CancelledError

    # -- internals: calls ------------------------------------------------------------

    async def _invoke(
        self,
        func: Callable[..., Any],
        ctx: RunContextWrapper[Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """Run one plan_tool call under the plan's lock; what its wrapper awaits."""
        tool = getattr(ctx, "tool_name", None) or func.__name__
        self._refuse_call(tool)
        call = _Call(self, tool, getattr(ctx, "tool_call_id", None))
        task = asyncio.ensure_future(self._run_call(call, func, ctx, args, kwargs))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The SDK gave up on the call (the run was cancelled, or the tool's
            # timeout fired). It finishes in its own task and is rolled back; an
            # async function is cancelled, a sync one's thread runs to its end.
            call.abandoned = True
            if call.task is not None:
                call.task.cancel()
            raise

    async def _run_call(
        self,
        call: _Call,
        func: Callable[..., Any],
        ctx: RunContextWrapper[Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        async with self._turn:
            self._refuse_call(call.tool)
            call.checkpoint = f"tool-{next(self._labels)}"
            try:
                for resource in self.resources:
                    await self._handler.acreate_checkpoint(resource, self.plan_id, call.checkpoint)
                    self._used.add(resource.name)
            except BaseException as exc:
                self._poison_with(exc)
                raise
            if call.abandoned:
                return None  # nothing ran after the checkpoint
            try:
                result = await self._call_function(call, func, ctx, args, kwargs)
            except BaseException as exc:
                await self._undo(call, exc)
                raise
            if call.abandoned:
                await self._undo(call, None)
                return None
            if self._verdict.poison is not None:
                raise self._verdict.poison
            return result

    async def _call_function(
        self,
        call: _Call,
        func: Callable[..., Any],
        ctx: RunContextWrapper[Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        token = _CURRENT_CALL.set(call)
        with self._gate:
            call.active = True
        try:
            if inspect.iscoroutinefunction(func):
                call.task = asyncio.ensure_future(func(ctx, *args, **kwargs))
                return await call.task
            return await asyncio.to_thread(func, ctx, *args, **kwargs)
        finally:
            with self._gate:
                call.active = False
            _CURRENT_CALL.reset(token)

    async def _undo(self, call: _Call, error: BaseException | None) -> None:
        """Roll a failed or abandoned call back to its checkpoint on every resource."""
        if self._verdict.poison is not None:
            return  # the whole plan is rolled back when it ends
        try:
            for resource in self.resources:
                await self._handler.arollback_to(resource, self.plan_id, call.checkpoint)
        except BaseException as exc:
            self._poison_with(exc)
            return
        if error is None:
            what = "cancelled: the run stopped waiting for it"
        else:
            what = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        self.tool_rollbacks.append(ToolRollback(call.checkpoint, call.tool, call.call_id, what))
        logger.info(
            "agent plan %r: tool %r failed (%s); rolled back to %r",
            self.plan_id,
            call.tool,
            what,
            call.checkpoint,
        )

    def _refuse_call(self, tool: str) -> None:
        """Raise unless a new tool call may start now."""
        with self._gate:
            state, poison = self._state, self._verdict.poison
        if poison is not None:
            raise poison
        if state != "open":
            where = "before its 'async with' block" if state == "new" else "after it ended"
            raise ToolError(
                f"plan_tool {tool!r} was called {where}: agent plan {self.plan_id!r} "
                "takes tool calls only while its 'async with' block runs"
            )

    def _poison_with(self, exc: BaseException) -> None:
        """Remember the first handler error of a tool call: the plan can only roll back now."""
        with self._gate:
            # The first one is what the run reports.
            self._verdict.poison = self._verdict.poison or exc
        logger.warning(
            "agent plan %r: %s during a tool call; the run stops and everything is rolled back",
            self.plan_id,
            type(exc).__name__,
        )

    def _wait_until_returned(self) -> None:
        """Block until no connection of this plan is lent out (a straggling thread)."""
        with self._gate:
            self._gate.wait_for(lambda: self._lent == 0)

    async def _uninterrupted(self, awaitable: Awaitable[T]) -> T:
        """Await *awaitable* to its end even if this task is cancelled meanwhile."""
        future = asyncio.ensure_future(awaitable)
        while not future.done():
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError:
                self._exit_cancelled = True
        return future.result()

    # -- internals: the run ------------------------------------------------------------

    def _check_open(self, what: str) -> None:
        with self._gate:
            state = self._state
        if state != "open":
            raise RuntimeError(
                f"call {what} inside 'async with' agent plan {self.plan_id!r} "
                f"(it is {'not entered yet' if state == 'new' else 'finished'})"
            )

    def _before_model_call(self) -> None:
        """Stop the run here if the plan cannot be released any more."""
        with self._gate:
            state, poison = self._state, self._verdict.poison
        if poison is not None:
            self._verdict.poison_reported = True
            raise poison
        if state != "open":
            raise RuntimeError(
                f"agent plan {self.plan_id!r} is {'not entered' if state == 'new' else 'ending'}; "
                "run the agent inside its 'async with' block"
            )
        if self._verdict.doom is not None:
            raise RuntimeError(
                f"agent plan {self.plan_id!r} will be rolled back ({self._verdict.doom}); "
                "start a new AgentPlan for a new run"
            )
        self._verdict.awaiting_output = True

    def _run_options(self, options: dict[str, Any]) -> dict[str, Any]:
        if "context" in options:
            raise TypeError(
                "the plan is the run's context; pass your own data as AgentPlan(..., data=...)"
            )
        options["context"] = self
        theirs = options.get("hooks")
        if isinstance(theirs, _PlanHooks) and theirs._plan is self:
            theirs = theirs._forward  # plan.hooks passed along: they are these hooks
        options["hooks"] = _PlanHooks(self, theirs, sees_the_end=True)
        options["run_config"] = self._run_config(options.get("run_config"))
        handlers = options.get("error_handlers")
        if handlers and "max_turns" in handlers:
            options["error_handlers"] = {
                **handlers,
                "max_turns": self._on_max_turns(handlers["max_turns"]),
            }
        return options

    def _run_config(self, base: RunConfig | dict[str, Any] | None) -> RunConfig:
        if isinstance(base, dict):
            base = RunConfig(**base)
        theirs = base.call_model_input_filter if base is not None else None

        def stop_if_poisoned(
            data: CallModelData[Any],
        ) -> ModelInputData | Awaitable[ModelInputData]:
            self._before_model_call()
            return data.model_data if theirs is None else theirs(data)

        if base is None:
            return RunConfig(call_model_input_filter=stop_if_poisoned)
        return dataclasses.replace(base, call_model_input_filter=stop_if_poisoned)

    def _on_max_turns(self, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def on_max_turns(data: Any) -> Any:
            self._verdict.doom_with(
                "max turns exceeded: the max_turns error handler made the final output"
            )
            return handler(data)

        return on_max_turns


class _PlanHooks(RunHooks[Any]):
    """Run hooks of an AgentPlan, passing every event on to the caller's own hooks."""

    def __init__(
        self, plan: AgentPlan, forward: RunHooks[Any] | None = None, *, sees_the_end: bool = False
    ) -> None:
        self._plan = plan
        self._forward = forward
        #: Whether the plan started the run itself and so sees whether it raised.
        self._sees_the_end = sees_the_end

    async def on_llm_start(
        self, context: Any, agent: Any, system_prompt: Any, input_items: Any
    ) -> None:
        self._plan._before_model_call()
        if self._forward is not None:
            await self._forward.on_llm_start(context, agent, system_prompt, input_items)

    async def on_llm_end(self, context: Any, agent: Any, response: Any) -> None:
        self._plan._verdict.tools_since_model = False
        if self._forward is not None:
            await self._forward.on_llm_end(context, agent, response)

    async def on_agent_start(self, context: Any, agent: Any) -> None:
        self._plan._verdict.awaiting_output = True
        if self._forward is not None:
            await self._forward.on_agent_start(context, agent)

    async def on_agent_end(self, context: Any, agent: Any, output: Any) -> None:
        self._plan._verdict.agent_ended(agent, sees_the_end=self._sees_the_end)
        if self._forward is not None:
            await self._forward.on_agent_end(context, agent, output)

    async def on_handoff(self, context: Any, from_agent: Any, to_agent: Any) -> None:
        if self._forward is not None:
            await self._forward.on_handoff(context, from_agent, to_agent)

    async def on_tool_start(self, context: Any, agent: Any, tool: Any) -> None:
        if self._forward is not None:
            await self._forward.on_tool_start(context, agent, tool)

    async def on_tool_end(self, context: Any, agent: Any, tool: Any, result: Any) -> None:
        self._plan._verdict.tools_since_model = True
        if self._forward is not None:
            await self._forward.on_tool_end(context, agent, tool, result)


@overload
def plan_tool(func: Callable[..., Any], /) -> FunctionTool: ...


@overload
def plan_tool(**options: Any) -> Callable[[Callable[..., Any]], FunctionTool]: ...


def plan_tool(
    func: Callable[..., Any] | None = None, /, **options: Any
) -> FunctionTool | Callable[[Callable[..., Any]], FunctionTool]:
    """Make a tool that changes the plan's databases: ``function_tool`` plus plan semantics.

    Use it as ``@plan_tool`` or ``@plan_tool(...)`` with ``function_tool``'s
    options. The function's first parameter must be the run context,
    ``ctx: RunContextWrapper[AgentPlan]``; ``ctx.context.connection(name)``
    lends it the plan's connection. Each call takes a checkpoint first,
    runs alone, and is rolled back to it if it raises.

    :raises ToolError: *func* is not a function whose first parameter is the run context.
    """
    if func is not None:
        return _make_plan_tool(func, options)

    def decorate(real_func: Callable[..., Any]) -> FunctionTool:
        return _make_plan_tool(real_func, options)

    return decorate


def _make_plan_tool(func: Callable[..., Any], options: dict[str, Any]) -> FunctionTool:
    if not inspect.isfunction(func):
        raise ToolError(f"plan_tool needs a function defined with def, got {func!r}")
    _check_context_parameter(func)

    @functools.wraps(func)
    async def call_in_plan(ctx: RunContextWrapper[Any], *args: Any, **kwargs: Any) -> Any:
        plan = ctx.context
        if not isinstance(plan, AgentPlan):
            raise ToolError(
                f"plan_tool {func.__name__!r} needs an AgentPlan as the run's context: "
                "plan.run(agent, ...) or Runner.run(agent, ..., context=plan, ...)"
            )
        return await plan._invoke(func, ctx, args, kwargs)

    tool: FunctionTool = function_tool(call_in_plan, **options)
    return tool


def _check_context_parameter(func: Callable[..., Any]) -> None:
    """Refuse a function whose first parameter is not annotated as the run context."""
    name = func.__name__
    parameters = list(inspect.signature(func).parameters.values())
    first = parameters[0] if parameters else None
    if first is None or first.kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise ToolError(
            f"plan_tool {name!r} must take the run context first, "
            "e.g. 'def restock(ctx: RunContextWrapper[AgentPlan], ...)'"
        )
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except (NameError, TypeError, AttributeError, SyntaxError) as exc:
        raise ToolError(f"plan_tool {name!r}: its annotations cannot be resolved: {exc}") from exc
    annotation = hints.get(first.name, inspect.Parameter.empty)
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    origin = typing.get_origin(annotation) or annotation
    if origin is not RunContextWrapper and origin is not ToolContext:
        shown = "no annotation" if annotation is inspect.Parameter.empty else repr(annotation)
        raise ToolError(
            f"plan_tool {name!r}: its first parameter {first.name!r} must be annotated as the "
            f"run context, e.g. '{first.name}: RunContextWrapper[AgentPlan]' (got {shown})"
        )


__all__ = ["AgentPlan", "Outcome", "ToolRollback", "plan_tool"]
