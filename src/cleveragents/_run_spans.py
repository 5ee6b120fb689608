"""Spans of plans a caller runs (the runtime, an agent plan) and of the runtime's steps.

The caller starts the ``cleveragents.plan`` span before the plan's first step
and makes it current; the handler records the plan's work and end into it
(:mod:`cleveragents.telemetry`), and the caller ends it. Each is a decorator,
so the decorated method's body stays as it was; with no OpenTelemetry
importable it calls straight through.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

from cleveragents.telemetry import (
    _OPEN_PLAN,
    ERROR_TYPE,
    STEP_ATTEMPT,
    STEP_ID,
    STEP_SPAN,
    TOOL_NAME,
    HandlerTelemetry,
    OpenPlan,
    _Api,
    _api,
    _description,
    _tracer,
    error_type,
)

_Function = TypeVar("_Function", bound=Callable[..., Any])


def for_runtime(tracer_provider: Any = None) -> RuntimeTelemetry | None:
    """Return what records a runtime's plan and step spans, or ``None`` without the API."""
    api = _api()
    if api is None:
        return None
    return RuntimeTelemetry(api, _tracer(api, tracer_provider))


class _Step:
    """What a step span learns when the step ends."""

    __slots__ = ("attempts", "failure")

    def __init__(self) -> None:
        self.attempts = 0
        self.failure: BaseException | None = None


def traces_plan(run: _Function) -> _Function:
    """Make ``Runtime.run`` run the plan in its ``cleveragents.plan`` span, when telemetry is on.

    The span is current while the plan runs, so step spans, the handler and a
    tool's own spans nest under it, and it ends once the plan has ended.
    """

    @functools.wraps(run)
    def run_in_span(runtime: Any, plan: Any) -> Any:
        recorder: RuntimeTelemetry | None = runtime._telemetry
        if recorder is None:
            return run(runtime, plan)
        open_plan = recorder.open_plan(plan.id)
        try:
            result = run(runtime, plan)
        except BaseException as exc:
            open_plan.finish(committed=False, failure=exc)
            raise
        open_plan.finish(committed=result.completed, failed_step=result.failed_step)
        return result

    return cast(_Function, run_in_span)


def traces_step(run_step: _Function) -> _Function:
    """Make the runtime run a step in its ``cleveragents.step`` span, when telemetry is on.

    The decorated method takes ``(plan or run, step, result)`` and returns the
    step's failure, if any, which the plan's span is told of too.
    """

    @functools.wraps(run_step)
    def run_in_span(runtime: Any, plan: Any, step: Any, result: Any) -> Any:
        recorder: RuntimeTelemetry | None = runtime._telemetry
        if recorder is None:
            return run_step(runtime, plan, step, result)
        with recorder.step(step.id, step.tool) as traced:
            try:
                failure = run_step(runtime, plan, step, result)
            finally:
                traced.attempts = result.attempts
            traced.failure = failure
        if failure is not None:  # the first failing step is the plan's last
            open_plan = _OPEN_PLAN.get()
            assert open_plan is not None  # run() opened it, and steps run only inside run()
            open_plan.failure = failure
        return failure

    return cast(_Function, run_in_span)


def opens_plan_span(aenter: _Function) -> _Function:
    """Make an agent plan's ``__aenter__`` start its ``cleveragents.plan`` span, made current.

    The span's parent is the span current when the block is entered: an SDK
    span there (a tool call running a sub-agent, a custom span) when a bridge
    puts the SDK's spans in OpenTelemetry's context. The handler records the
    plan's tool calls into it; :func:`closes_plan_span` ends it.
    """

    @functools.wraps(aenter)
    async def enter(plan: Any) -> Any:
        entered = await aenter(plan)
        recorder: HandlerTelemetry | None = getattr(plan._handler, "_telemetry", None)
        plan._open_span = None if recorder is None else recorder.open_plan(plan.plan_id)
        return entered

    return cast(_Function, enter)


def closes_plan_span(aexit: _Function) -> _Function:
    """Make an agent plan's ``__aexit__`` end the span :func:`opens_plan_span` started."""

    @functools.wraps(aexit)
    async def leave(plan: Any, exc_type: Any, exc: BaseException | None, tb: Any) -> Any:
        failure = exc
        try:
            return await aexit(plan, exc_type, exc, tb)
        except BaseException as raised:
            failure = raised
            raise
        finally:
            open_plan: OpenPlan | None = getattr(plan, "_open_span", None)
            if open_plan is not None:
                plan._open_span = None
                released = plan.outcome == "released"
                open_plan.finish(
                    committed=released,
                    failure=None if released else failure,
                    reason=plan.rollback_reason,
                )

    return cast(_Function, leave)


class RuntimeTelemetry:
    """Records a runtime's plans and steps as spans."""

    __slots__ = ("_api", "_tracer")

    def __init__(self, api: _Api, tracer: Any) -> None:
        self._api = api
        self._tracer = tracer

    def open_plan(self, plan_id: str) -> OpenPlan:
        """Start the plan's span, current until the plan ends (the handler records into it)."""
        return OpenPlan(self._api, self._tracer, plan_id)

    @contextlib.contextmanager
    def step(self, step_id: str, tool: str | None) -> Iterator[_Step]:
        """Run a step in its ``cleveragents.step`` span, a child of the plan's."""
        api = self._api
        span = self._tracer.start_span(STEP_SPAN)
        if span.is_recording():
            span.set_attribute(STEP_ID, step_id)
            if tool is not None:
                span.set_attribute(TOOL_NAME, tool)
        token = api.context.attach(api.trace.set_span_in_context(span))
        record = _Step()
        try:
            yield record
        except BaseException as exc:
            record.failure = exc
            raise
        finally:
            api.context.detach(token)
            if span.is_recording():
                span.set_attribute(STEP_ATTEMPT, record.attempts)
                if record.failure is not None:
                    span.set_attribute(ERROR_TYPE, error_type(record.failure))
                    span.set_status(api.error_status(_description(record.failure)))
            span.end()


__all__ = [
    "RuntimeTelemetry",
    "closes_plan_span",
    "for_runtime",
    "opens_plan_span",
    "traces_plan",
    "traces_step",
]
