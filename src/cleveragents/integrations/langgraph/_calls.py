"""plan_tool, plan_node and plan_connection: code that writes through the invocation's plan."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, overload

from langchain_core.messages import ToolCall
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import var_child_runnable_config
from langchain_core.tools import BaseTool, StructuredTool
from langgraph._internal._constants import CONFIG_KEY_TASK_ID

from cleveragents.errors import ToolError
from cleveragents.integrations.langgraph._invocation import (
    _CURRENT_CALL,
    _Call,
    _Invocation,
    _Turn,
    find_run,
    uninterrupted,
)

Kind = Literal["tool", "node"]

#: The model's id of the tool call being invoked (set by _PlanTool.invoke/ainvoke).
_TOOL_CALL_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "cleveragents_langgraph_tool_call_id", default=None
)


class _PlanTool(StructuredTool):
    """A StructuredTool that notes the model's id of the call it runs (for ToolRollback)."""

    def invoke(
        self,
        input: str | dict[str, Any] | ToolCall,
        config: RunnableConfig | None = None,
        **kwargs: Any,
    ) -> Any:
        token = _TOOL_CALL_ID.set(_call_id_of(input))
        try:
            return super().invoke(input, config, **kwargs)
        finally:
            _TOOL_CALL_ID.reset(token)

    async def ainvoke(
        self,
        input: str | dict[str, Any] | ToolCall,
        config: RunnableConfig | None = None,
        **kwargs: Any,
    ) -> Any:
        token = _TOOL_CALL_ID.set(_call_id_of(input))
        try:
            return await super().ainvoke(input, config, **kwargs)
        finally:
            _TOOL_CALL_ID.reset(token)


def _call_id_of(input: Any) -> str | None:
    if isinstance(input, dict) and input.get("type") == "tool_call":
        call_id = input.get("id")
        return str(call_id) if call_id is not None else None
    return None


@overload
def plan_tool(name_or_callable: Callable[..., Any], /, **options: Any) -> BaseTool: ...


@overload
def plan_tool(
    name_or_callable: str | None = None, /, **options: Any
) -> Callable[[Callable[..., Any]], BaseTool]: ...


def plan_tool(
    name_or_callable: str | Callable[..., Any] | None = None, /, **options: Any
) -> BaseTool | Callable[[Callable[..., Any]], BaseTool]:
    """Make a tool that writes to the invocation's databases: ``@tool`` plus plan semantics.

    Use it as ``@plan_tool``, ``@plan_tool("name")`` or ``@plan_tool(...)``
    with ``langchain_core.tools.tool``'s options. Inside, ``plan_connection(name)``
    lends the invocation's own connection. Each call takes a checkpoint
    first, runs alone (calls take turns), and is rolled back to its checkpoint
    if it raises; ToolNode then reports the error as it is configured to.

    :raises ToolError: what is decorated is not a plain function.
    """
    if callable(name_or_callable) and not isinstance(name_or_callable, str):
        return _make_tool(name_or_callable, None, options)
    if name_or_callable is not None and not isinstance(name_or_callable, str):
        raise ToolError(f"plan_tool takes a function or a tool name, got {name_or_callable!r}")
    name = name_or_callable

    def decorate(func: Callable[..., Any]) -> BaseTool:
        return _make_tool(func, name, options)

    return decorate


def _make_tool(func: Callable[..., Any], name: str | None, options: dict[str, Any]) -> BaseTool:
    _check_function("plan_tool", func)
    tool_name = name or func.__name__
    options.setdefault("error_on_invalid_docstring", True)  # as @tool does
    if inspect.iscoroutinefunction(func):
        return _PlanTool.from_function(
            None, _async_call("tool", tool_name, func), name=tool_name, **options
        )
    return _PlanTool.from_function(_sync_call("tool", tool_name, func), name=tool_name, **options)


@overload
def plan_node(func: Callable[..., Any], /) -> Callable[..., Any]: ...


@overload
def plan_node() -> Callable[[Callable[..., Any]], Callable[..., Any]]: ...


def plan_node(
    func: Callable[..., Any] | None = None, /
) -> Callable[..., Any] | Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make a graph node whose database writes are undone if it raises or is interrupted.

    The node takes a checkpoint when it starts and holds the invocation's
    turn until it ends (parallel plan nodes take turns; plan tools it calls
    join it). If it raises, calls ``interrupt()`` or is retried by a
    ``RetryPolicy``, its writes are rolled back, so on resume it runs once
    more from a clean start and its effects happen exactly once.

    :raises ToolError: what is decorated is not a plain function.
    """
    if func is None:
        return plan_node
    _check_function("plan_node", func)
    if inspect.iscoroutinefunction(func):
        return _async_call("node", func.__name__, func)
    return _sync_call("node", func.__name__, func)


@contextmanager
def plan_connection(resource: str) -> Iterator[Any]:
    """Lend the invocation's own connection to *resource*, inside its transaction.

    Only code running inside a :func:`plan_tool` or :func:`plan_node` call of
    a PlanGraph invocation may borrow it; never commit or roll back on it.

    :raises ToolError: called anywhere else, or *resource* is not one of the invocation's.
    """
    call = _CURRENT_CALL.get()
    if call is None:
        raise ToolError(
            f"plan_connection({resource!r}) works only inside a @plan_tool or @plan_node "
            "call of a PlanGraph invocation"
        )
    with call.run.lend(call, resource) as conn:
        yield conn


def _check_function(decorator: str, func: Any) -> None:
    if not inspect.isfunction(func):
        raise ToolError(f"{decorator} needs a function defined with def, got {func!r}")
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        raise ToolError(
            f"{decorator} cannot wrap generator function {func.__name__!r}: its writes "
            "would outlive the call; return the result instead"
        )


def _begin(kind: Kind, name: str) -> tuple[_Invocation, _Call, _Turn]:
    """Find the invocation this call belongs to, the call it runs inside, and its turn."""
    config = var_child_runnable_config.get() or {}
    run = find_run(config, ToolError)
    if run is None:
        raise ToolError(
            f"plan {kind} {name!r} ran outside a PlanGraph invocation; compile the graph "
            "with a PlanCheckpointer and run it with PlanGraph(graph).invoke() (or "
            "ainvoke, stream, astream)"
        )
    parent = _CURRENT_CALL.get()
    if parent is not None and (parent.run is not run or not parent.active):
        parent = None  # a straggler of a call that has returned: it is on its own
    task_id = (config.get("configurable") or {}).get(CONFIG_KEY_TASK_ID)
    call = _Call(
        run,
        kind,
        name,
        parent=parent,
        task_id=str(task_id) if task_id is not None else None,
        call_id=_TOOL_CALL_ID.get() if kind == "tool" else None,
    )
    return run, call, (parent.children if parent is not None else run.turn)


def _sync_call(kind: Kind, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def call_in_plan(*args: Any, **kwargs: Any) -> Any:
        run, call, turn = _begin(kind, name)
        run.admit(call.what, ToolError)
        try:
            _take_turn(turn, call)
            try:
                run.start_call(call)
                with run.running(call):
                    error: BaseException | None = None
                    try:
                        result = func(*args, **kwargs)
                    except BaseException as exc:
                        error = exc
                if error is not None:
                    run.undo(call, error)
                    raise error
                run.raise_if_poisoned()
                return result
            finally:
                turn.release()
        finally:
            run.leave()

    return call_in_plan


def _async_call(kind: Kind, name: str, func: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    @functools.wraps(func)
    async def call_in_plan(*args: Any, **kwargs: Any) -> Any:
        run, call, turn = _begin(kind, name)
        run.admit(call.what, ToolError)
        try:
            await turn.aacquire()
            try:
                await uninterrupted(asyncio.to_thread(run.start_call, call))
                with run.running(call):
                    error: BaseException | None = None
                    try:
                        result = await func(*args, **kwargs)
                    except BaseException as exc:
                        error = exc
                if error is not None:
                    await uninterrupted(asyncio.to_thread(run.undo, call, error))
                    raise error
                run.raise_if_poisoned()
                return result
            finally:
                turn.release()
        finally:
            run.leave()

    return call_in_plan


def _take_turn(turn: _Turn, call: _Call) -> None:
    """Wait for *call*'s turn, unless waiting would block a running event loop."""
    if turn.try_acquire():
        return
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        turn.acquire()
        return
    raise ToolError(
        f"{call.what} was called synchronously on the event loop's thread while another "
        "plan call runs; waiting would block the loop: use 'await ... .ainvoke()'"
    )


__all__ = ["plan_connection", "plan_node", "plan_tool"]
