"""Runtime: loads plugins, runs plans step by step, owns the handlers, emits plan events."""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import pluggy

from cleveragents._run_spans import for_runtime, traces_plan, traces_step
from cleveragents.errors import (
    CheckpointEvictedError,
    CheckpointExpiredError,
    CleverAgentsError,
    HandlerClosedError,
    PartialCommitError,
    PlanError,
    PlanProblem,
    ResourceError,
    ToolError,
)
from cleveragents.plan import Plan, Step, load_plan
from cleveragents.plugins import SubscriberError, dispatch, get_plugin_manager, registries
from cleveragents.resource.base import Resource, ResourceHandler
from cleveragents.telemetry import provider_options
from cleveragents.tools import ToolContext

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

logger = logging.getLogger(__name__)

# After these the plan's work is already gone (or the handler is): retrying a
# step would only start a new transaction that nobody asked for.
_FINAL_ERRORS = (CheckpointExpiredError, CheckpointEvictedError, HandlerClosedError)


class Interrupted(CleverAgentsError):
    """The run was interrupted (SIGINT/SIGTERM) and its plans rolled back."""


class ExpectationFailed(CleverAgentsError, AssertionError):
    """An ``expect`` check returned something other than ``equals``."""


@dataclass
class StepResult:
    """How one step went."""

    id: str
    status: Literal["passed", "failed", "not run"]
    attempts: int = 0
    duration_ms: float = 0.0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the step as the ``--json`` output shows it."""
        return {
            "id": self.id,
            "status": self.status,
            "attempts": self.attempts,
            "duration_ms": round(self.duration_ms, 3),
            "error": self.error,
        }


#: What became of a plan's work: all of it committed, all of it rolled back, or
#: (a commit failing after another database's succeeded) part of it committed.
Outcome = Literal["committed", "rolled_back", "partial_commit"]


@dataclass
class PlanResult:
    """How one plan went: ``completed`` (committed) or ``failed``.

    A failed plan's work was rolled back, unless :attr:`outcome` is
    ``"partial_commit"``: then :attr:`committed` names the databases whose
    work was committed before a later commit failed.
    """

    plan: str
    source: str | None
    status: Literal["completed", "failed"]
    steps: list[StepResult]
    failed_step: str | None = None
    error: str | None = None
    subscriber_errors: list[SubscriberError] = field(default_factory=list)
    outcome: Outcome = "rolled_back"
    #: The resources whose work was committed, in the order they were committed.
    committed: list[str] = field(default_factory=list)

    @property
    def completed(self) -> bool:
        """Whether the plan completed and its work was committed."""
        return self.status == "completed"

    def to_json(self) -> dict[str, Any]:
        """Return the plan as one line of ``cleveragents run --json`` shows it."""
        return {
            "plan": self.plan,
            "source": self.source,
            "status": self.status,
            "outcome": self.outcome,
            "committed": list(self.committed),
            "failed_step": self.failed_step,
            "error": self.error,
            "steps": [step.to_json() for step in self.steps],
            "subscriber_errors": [str(error) for error in self.subscriber_errors],
        }


def check_plan_ids(plans: Sequence[Plan]) -> None:
    """Refuse plans that would run together under one id: they would share one transaction.

    :raises PlanError: one problem per plan whose id an earlier plan has, naming both files.
    """
    first: dict[str, str] = {}
    problems = []
    for index, plan in enumerate(plans):
        earlier = first.get(plan.id)
        if earlier is None:
            first[plan.id] = _where(plan, index, line=True)
            continue
        problems.append(
            PlanProblem(
                _where(plan, index),
                plan.id_line,
                "id",
                f"plan id {plan.id!r} is also the id of {earlier}; "
                "plans run together need different ids",
            )
        )
    if problems:
        raise PlanError(problems)


def _where(plan: Plan, index: int, *, line: bool = False) -> str:
    """Name the file of *plan* (with the line of its ``id:``), or its place in the list."""
    if plan.source is None:
        return f"plans[{index}]"
    if line and plan.id_line is not None:
        return f"{plan.source}:{plan.id_line}"
    return plan.source


class _PlanRun:
    """One running plan: the resources it used, and the handler error that poisoned it.

    After a handler error (the plan expired, was evicted, its connection could
    not be had) the plan's work may already be gone. A tool that catches the
    error and asks again would get a fresh transaction, which release would
    then commit alone: so every later handler call of the plan raises that
    error again, and the plan fails and is rolled back.
    """

    __slots__ = ("_lock", "plan", "poison", "poisoned_at", "used")

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.poison: BaseException | None = None
        self.poisoned_at: str | None = None
        #: Resource names in first-use order.
        self.used: list[str] = []
        self._lock = threading.Lock()  # tools may use the plan from their own threads

    def check(self) -> None:
        """Raise the handler error that poisoned the plan, if one did."""
        if self.poison is not None:
            raise self.poison

    def poison_with(self, exc: BaseException, step_id: str) -> None:
        """Remember the first handler error that reached the plan."""
        with self._lock:
            if self.poison is None:
                self.poison, self.poisoned_at = exc, step_id
        logger.info(  # the plan's result reports the error itself
            "plan %r: %s in step %r; the plan fails and is rolled back",
            self.plan.id,
            type(exc).__name__,
            step_id,
        )

    def use(self, name: str) -> None:
        """Note that the plan has work on resource *name*."""
        with self._lock:
            if name not in self.used:
                self.used.append(name)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CleverAgentsError):
        return str(exc)
    module = type(exc).__module__
    prefix = "" if module == "builtins" else f"{module}."
    return f"{prefix}{type(exc).__qualname__}: {exc}"


class Runtime:
    """Runs plans against the resources their plugins serve.

    It creates one handler per resource kind it needs and registers it with
    the plugin manager, so the handler hears of completed and failed plans
    first. Use it as a context manager, or call :meth:`close`.

    :param handler_options: handler-wide settings by resource kind, e.g.
        ``{"database": {"max_connections": 8}}``; unset ones come from
        ``CLEVERAGENTS_*`` variables, then defaults.
    :param tracer_provider: the OpenTelemetry tracer provider for plan and step
        spans (default: the global one), handed to the handlers it creates.
    :param meter_provider: the OpenTelemetry meter provider handed to the
        handlers it creates (default: the global one).
    """

    def __init__(
        self,
        *,
        plugin_manager: pluggy.PluginManager | None = None,
        handler_options: Mapping[str, Mapping[str, Any]] | None = None,
        allowed_roots: Sequence[str | os.PathLike[str]] = (),
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        self.plugin_manager = plugin_manager or get_plugin_manager()
        self.kinds, self.tools = registries(self.plugin_manager)
        self._handler_options = dict(handler_options or {})
        self._allowed_roots = list(allowed_roots)
        self._handlers: dict[str, ResourceHandler] = {}
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self._interrupted: str | None = None
        self._closed = False
        self._providers = {"tracer_provider": tracer_provider, "meter_provider": meter_provider}
        self._telemetry = for_runtime(tracer_provider)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def load(self, path: str | os.PathLike[str]) -> Plan:
        """Load and validate a plan file against the loaded plugins.

        :raises PlanError: the plan is bad input.
        """
        return load_plan(
            path, kinds=self.kinds, tools=self.tools, allowed_roots_extra=self._allowed_roots
        )

    def handler(self, kind: str) -> ResourceHandler:
        """Return this runtime's handler of *kind*, creating and subscribing it on first use."""
        with self._lock:
            if self._closed:
                raise ResourceError("the runtime is closed")
            handler = self._handlers.get(kind)
            if handler is None:
                handler_cls = self.kinds.get(kind)
                if handler_cls is None:
                    raise ResourceError(f"no plugin serves resource kind {kind!r}")
                options = {
                    **provider_options(handler_cls, **self._providers),
                    **self._handler_options.get(kind, {}),
                }
                handler = handler_cls.from_config(**options)
                self.plugin_manager.register(handler, name=f"cleveragents-handler-{kind}")
                self._handlers[kind] = handler
            return handler

    @property
    def handlers(self) -> Mapping[str, ResourceHandler]:
        """The handlers created so far, by kind."""
        return dict(self._handlers)

    def interrupt(self, reason: str = "interrupted") -> None:
        """Stop every running plan at its next step and interrupt running statements."""
        self._interrupted = reason
        for handler in list(self._handlers.values()):
            handler.interrupt()

    def close(self) -> None:
        """Roll back whatever is still open and close every handler. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            handlers = list(self._handlers.values())
        for handler in handlers:
            handler.close()
            self.plugin_manager.unregister(handler)

    def run_many(self, plans: Sequence[Plan], *, parallel: int = 1) -> list[PlanResult]:
        """Run *plans*, up to *parallel* at once, sharing this runtime's handlers.

        :raises PlanError: two of *plans* have the same id; none was run.
        """
        check_plan_ids(plans)
        if parallel <= 1 or len(plans) <= 1:
            return [self.run(plan) for plan in plans]
        with ThreadPoolExecutor(parallel, thread_name_prefix="cleveragents-plan") as pool:
            # Each plan runs in a copy of the caller's context: its span's parent is the caller's.
            futures = [
                pool.submit(contextvars.copy_context().run, self.run, plan) for plan in plans
            ]
            return [future.result() for future in futures]

    @traces_plan
    def run(self, plan: Plan) -> PlanResult:
        """Run *plan*'s steps in order; commit if all pass, else roll everything back.

        :raises PlanError: a plan with the same id is running in this runtime;
            the two would share one transaction, so this one is not run.
        """
        with self._lock:
            if plan.id in self._running:
                raise PlanError(
                    [
                        PlanProblem(
                            plan.source or "<plan>",
                            plan.id_line,
                            "id",
                            f"a plan with id {plan.id!r} is already running in this runtime; "
                            "plans running at once need different ids",
                        )
                    ]
                )
            self._running.add(plan.id)
        try:
            return self._run(_PlanRun(plan))
        finally:
            with self._lock:
                self._running.discard(plan.id)

    def _run(self, run: _PlanRun) -> PlanResult:
        plan = run.plan
        subscriber_errors = dispatch(self.plugin_manager, "cleveragents_plan_started", plan=plan)
        results = [StepResult(step.id, "not run") for step in plan.steps]
        try:
            failure, failed_step = self._run_steps(run, results)
        except BaseException as exc:
            # SystemExit or KeyboardInterrupt from a tool: the plan still ends
            # (rolled back, its connection and write turn given back), then the
            # exception goes on to whoever asked for it.
            dispatch(self.plugin_manager, "cleveragents_plan_failed", plan=plan, error=exc)
            raise
        outcome: Outcome = "rolled_back"
        committed: list[str] = []
        if failure is None:
            errors = dispatch(
                self.plugin_manager, "cleveragents_plan_completed", only="handlers", plan=plan
            )
            if errors:
                failure = errors[0].error
                if isinstance(failure, PartialCommitError):
                    outcome, committed = "partial_commit", list(failure.committed)
            else:
                outcome, committed = "committed", list(run.used)
                subscriber_errors += dispatch(
                    self.plugin_manager, "cleveragents_plan_completed", only="others", plan=plan
                )
        if failure is not None:
            subscriber_errors += dispatch(
                self.plugin_manager, "cleveragents_plan_failed", plan=plan, error=failure
            )
        return PlanResult(
            plan=plan.id,
            source=plan.source,
            status="completed" if failure is None else "failed",
            steps=results,
            failed_step=failed_step,
            error=None if failure is None else _describe(failure),
            subscriber_errors=subscriber_errors,
            outcome=outcome,
            committed=committed,
        )

    def _run_steps(
        self, run: _PlanRun, results: list[StepResult]
    ) -> tuple[BaseException | None, str | None]:
        """Run the steps up to the first that fails; return its error and id."""
        for step, result in zip(run.plan.steps, results, strict=True):
            if self._interrupted is not None:
                return Interrupted(self._interrupted), None
            failure = self._run_step(run, step, result)
            if failure is not None:
                # A handler error the tool turned into another one is still why the plan failed.
                return (failure if run.poison is None else run.poison), step.id
        if run.poison is not None:
            # A tool caught the handler error and carried on: the plan still fails.
            return run.poison, run.poisoned_at
        return None, None

    # -- steps ----------------------------------------------------------------

    @traces_step
    def _run_step(self, run: _PlanRun, step: Step, result: StepResult) -> BaseException | None:
        started = time.perf_counter()
        label = f"step:{step.id}"
        plan = run.plan
        checkpointed = (
            ([step.resource] if step.resource else list(plan.resources))
            if step.takes_checkpoint
            else []
        )
        try:
            for name in checkpointed:
                self._call(run, step, name, "create_checkpoint", label)
            for attempt in range(1, step.retry + 2):
                result.attempts = attempt
                try:
                    self._execute(run, step, attempt)
                except Exception as exc:
                    if (
                        attempt > step.retry
                        or isinstance(exc, _FINAL_ERRORS)
                        or run.poison is not None
                    ):
                        raise
                    logger.info("step %r of plan %r failed (%s); retrying", step.id, plan.id, exc)
                    for name in checkpointed:
                        self._call(run, step, name, "rollback_to", label)
                    if self._interrupted is not None:
                        raise Interrupted(self._interrupted) from exc
                else:
                    break
        except Exception as exc:
            if self._interrupted is not None and not isinstance(exc, Interrupted):
                exc = Interrupted(f"{self._interrupted} during step {step.id!r}")
            result.status = "failed"
            result.error = _describe(exc)
            return exc
        finally:
            result.duration_ms = (time.perf_counter() - started) * 1000
        result.status = "passed"
        return None

    def _call(
        self,
        run: _PlanRun,
        step: Step,
        name: str,
        operation: Literal["create_checkpoint", "rollback_to"],
        label: str,
    ) -> None:
        """Take a checkpoint on resource *name*, or roll back to it; an error poisons the plan."""
        run.check()
        resource = run.plan.resource(name)
        method = getattr(self.handler(resource.kind), operation)
        try:
            method(resource, run.plan.id, label)
        except BaseException as exc:
            run.poison_with(exc, step.id)
            raise
        run.use(name)

    def _execute(self, run: _PlanRun, step: Step, attempt: int) -> None:
        plan = run.plan
        if step.tool is not None:
            tool = self.tools.get(step.tool)
            if tool is None:
                raise ToolError(f"tool {step.tool!r} is not registered")
            ctx = ToolContext(
                plan_id=plan.id,
                step_id=step.id,
                attempt=attempt,
                _connect=lambda name: self._connection(run, step, name),
            )
            tool(ctx, **step.with_)
            return
        assert step.resource is not None
        resource = plan.resource(step.resource)
        handler = self.handler(resource.kind)
        execute = getattr(handler, "execute", None)
        if execute is None:
            raise ResourceError(f"resource kind {resource.kind!r} cannot run SQL")
        if step.sql is not None:
            self._sql(run, step, execute, step.sql, step.params)
        if step.expect is not None:
            rows = self._sql(run, step, execute, step.expect.sql, step.expect.params)
            if not rows or len(rows) != 1 or len(rows[0]) != 1:
                raise ExpectationFailed(
                    f"expect: the query must return one row with one value, got {rows!r}"
                )
            if rows[0][0] != step.expect.equals:
                raise ExpectationFailed(
                    f"expect: got {rows[0][0]!r}, expected {step.expect.equals!r}"
                )

    def _sql(
        self, run: _PlanRun, step: Step, execute: Any, sql: str, params: Any
    ) -> list[tuple[Any, ...]]:
        """Run one statement of *step*; an error that ended the plan's work poisons it."""
        run.check()
        assert step.resource is not None
        try:
            rows: list[tuple[Any, ...]] = execute(
                run.plan.resource(step.resource), run.plan.id, sql, params
            )
        except _FINAL_ERRORS as exc:
            run.poison_with(exc, step.id)
            raise
        run.use(step.resource)
        return rows

    @contextmanager
    def _connection(self, run: _PlanRun, step: Step, name: str) -> Iterator[Any]:
        plan = run.plan
        if name not in plan.resources:
            known = ", ".join(sorted(plan.resources)) or "none"
            raise ToolError(f"plan {plan.id!r} has no resource {name!r} (known: {known})")
        run.check()
        resource: Resource = plan.resource(name)
        handler = self.handler(resource.kind)
        from_the_tool: BaseException | None = None
        try:
            with handler.connection(resource, plan.id) as conn:
                run.use(name)
                try:
                    yield conn
                except BaseException as exc:
                    from_the_tool = exc
                    if isinstance(exc, _FINAL_ERRORS):
                        run.poison_with(exc, step.id)
                    raise
        except BaseException as exc:
            if exc is not from_the_tool:  # the handler's, entering or leaving the block
                run.poison_with(exc, step.id)
            raise
