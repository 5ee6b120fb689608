"""PlanGraph: a compiled graph whose every invocation is one plan."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, final

from langchain_core.runnables import RunnableConfig

from cleveragents.integrations.langgraph._checkpointer import PlanCheckpointer
from cleveragents.integrations.langgraph._invocation import (
    _CURRENT_RUN,
    GraphRun,
    _Invocation,
    uninterrupted,
)


@final
class PlanGraph:
    """A compiled graph whose ``invoke``, ``stream``, ``update_state`` (and async twins) are plans.

    ::

        app = PlanGraph(builder.compile(checkpointer=PlanCheckpointer(handler, inventory)))
        result = app.invoke(inputs, {"configurable": {"thread_id": "t1"}})
        app.last_run.outcome            # "released" or "rolled_back"

    Each invocation's checkpoints and its plan tools' and plan nodes' writes
    commit together when it returns or stops at an ``interrupt()``, and are
    all rolled back when it raises, is cancelled, or its stream is closed
    before the end. Every other attribute is the compiled graph's own.

    :raises TypeError: the graph was not compiled with a :class:`PlanCheckpointer`.
    """

    def __init__(self, graph: Any) -> None:
        saver = getattr(graph, "checkpointer", None)
        if not isinstance(saver, PlanCheckpointer):
            raise TypeError(
                "PlanGraph needs a graph compiled with a PlanCheckpointer, e.g. "
                "builder.compile(checkpointer=PlanCheckpointer(handler, resource)); "
                f"this one's checkpointer is {saver!r}"
            )
        self._graph = graph
        self._saver = saver
        self._last_run: GraphRun | None = None
        self._last_run_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<PlanGraph of {getattr(self._graph, 'name', None) or self._graph!r}>"

    def __getattr__(self, name: str) -> Any:
        # Everything but the invocations is the compiled graph's own.
        return getattr(self._graph, name)

    @property
    def graph(self) -> Any:
        """The compiled graph this wraps."""
        return self._graph

    @property
    def checkpointer(self) -> PlanCheckpointer:
        """The graph's checkpointer."""
        return self._saver

    @property
    def last_run(self) -> GraphRun | None:
        """How the latest invocation to end on this wrapper ended."""
        with self._last_run_lock:
            return self._last_run

    # -- invocations ---------------------------------------------------------------

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """Run the graph as one plan: ``graph.invoke`` with the same arguments."""
        run = self._begin(config)
        return self._call(run, self._graph.invoke, input, run.config_for(config), **kwargs)

    def update_state(self, config: RunnableConfig, values: Any, *args: Any, **kwargs: Any) -> Any:
        """Update the thread's state as one plan: ``graph.update_state`` with the same arguments."""
        run = self._begin(config)
        return self._call(
            run, self._graph.update_state, run.config_for(config), values, *args, **kwargs
        )

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        """Awaitable :meth:`invoke`."""
        run = await self._abegin(config)
        return await self._acall(run, self._graph.ainvoke, input, run.config_for(config), **kwargs)

    async def aupdate_state(
        self, config: RunnableConfig, values: Any, *args: Any, **kwargs: Any
    ) -> Any:
        """Awaitable :meth:`update_state`."""
        run = await self._abegin(config)
        method = self._graph.aupdate_state
        return await self._acall(run, method, run.config_for(config), values, *args, **kwargs)

    def stream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        """Stream the graph as one plan: released when exhausted, rolled back when closed early."""
        run = self._begin(config)
        steps = self._graph.stream(input, run.config_for(config), **kwargs)
        error: BaseException | None = None
        exhausted = False
        try:
            while True:
                token = _CURRENT_RUN.set(run)
                try:
                    chunk = next(steps)
                except StopIteration:
                    exhausted = True
                    break
                finally:
                    _CURRENT_RUN.reset(token)
                yield chunk
        except GeneratorExit:
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            if not exhausted and error is None:
                token = _CURRENT_RUN.set(run)
                try:
                    steps.close()  # the graph unwinds (and waits for its threads) first
                finally:
                    _CURRENT_RUN.reset(token)
            self._end(run, error, closed_early=not exhausted and error is None)

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        """Async :meth:`stream`."""
        run = await self._abegin(config)
        steps = self._graph.astream(input, run.config_for(config), **kwargs)
        error: BaseException | None = None
        exhausted = False
        try:
            while True:
                token = _CURRENT_RUN.set(run)
                try:
                    chunk = await steps.__anext__()
                except StopAsyncIteration:
                    exhausted = True
                    break
                finally:
                    _CURRENT_RUN.reset(token)
                yield chunk
        except GeneratorExit:
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            if not exhausted and error is None:
                token = _CURRENT_RUN.set(run)
                try:
                    await uninterrupted(steps.aclose())
                finally:
                    _CURRENT_RUN.reset(token)
            await self._aend(run, error, closed_early=not exhausted and error is None)

    # -- internals -------------------------------------------------------------------

    def _call(self, run: _Invocation, method: Any, *args: Any, **kwargs: Any) -> Any:
        error: BaseException | None = None
        token = _CURRENT_RUN.set(run)
        try:
            result = method(*args, **kwargs)
        except BaseException as exc:
            error = exc
            raise
        finally:
            _CURRENT_RUN.reset(token)
            if error is not None:
                self._end(run, error)
        _note_interrupt(run, result)
        self._end(run, None)
        return result

    async def _acall(self, run: _Invocation, method: Any, *args: Any, **kwargs: Any) -> Any:
        error: BaseException | None = None
        token = _CURRENT_RUN.set(run)
        try:
            result = await method(*args, **kwargs)
        except BaseException as exc:
            error = exc
            raise
        finally:
            _CURRENT_RUN.reset(token)
            if error is not None:
                await self._aend(run, error)
        _note_interrupt(run, result)
        await self._aend(run, None)
        return result

    def _begin(self, config: RunnableConfig | None) -> _Invocation:
        current = _CURRENT_RUN.get()
        if current is not None and current.is_running:
            raise RuntimeError(
                f"a PlanGraph invocation cannot start inside another ({current.plan_id!r}): "
                "call the compiled graph itself (it joins the running plan) or start the "
                "second invocation after the first has ended"
            )
        store = self._saver._store
        store.ensure_setup()  # before the plan: creating tables must not join it
        configurable = (config or {}).get("configurable") or {}
        thread_id = configurable.get("thread_id")
        return _Invocation(
            store,
            plan_id=f"langgraph-{uuid.uuid4().hex[:12]}",
            thread_id=str(thread_id) if thread_id is not None else None,
        )

    async def _abegin(self, config: RunnableConfig | None) -> _Invocation:
        await asyncio.to_thread(self._saver._store.ensure_setup)
        return self._begin(config)

    def _end(
        self, run: _Invocation, error: BaseException | None, closed_early: bool = False
    ) -> None:
        failure = self._finish(run, error, closed_early)
        if failure is not None:
            raise failure

    async def _aend(
        self, run: _Invocation, error: BaseException | None, closed_early: bool = False
    ) -> None:
        # Even if this task is cancelled meanwhile, the end runs to completion
        # (and last_run is set): the plan must never be left open.
        failure = await uninterrupted(asyncio.to_thread(self._finish, run, error, closed_early))
        if failure is not None:
            raise failure

    def _finish(
        self, run: _Invocation, error: BaseException | None, closed_early: bool
    ) -> BaseException | None:
        finished, failure = run.end(error, closed_early=closed_early)
        with self._last_run_lock:
            self._last_run = finished
        return failure


def _note_interrupt(run: _Invocation, result: Any) -> None:
    if isinstance(result, dict) and "__interrupt__" in result:
        run.interrupted = True


__all__ = ["PlanGraph"]
