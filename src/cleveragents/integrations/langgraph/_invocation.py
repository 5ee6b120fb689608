"""One PlanGraph invocation as one plan: who may run when, its checkpoints, and how it ends.

An :class:`_Invocation` is found through the key ``CONFIG_KEY`` that PlanGraph
adds to the config (LangGraph hands it to every checkpointer call and task),
or else through the context variable ``_CURRENT_RUN``, which LangGraph copies
into most of its threads and tasks (not into the done-callbacks that submit
some background checkpoint writes: hence the key). Everything that touches
the plan goes through it:

* plan tool and plan node calls take turns (:class:`_Turn`), each starting
  with a checkpoint on every database, labelled ``tool-N`` or ``node-N``;
* the checkpointer's own statements run on the plan's connection and are kept
  in a journal, so that rolling a call back to its checkpoint re-applies the
  checkpointer rows written after it (a finished task's pending writes must
  survive);
* every piece of work counts itself in ``_busy``, so the invocation's end
  waits for stragglers, and nothing can reopen the plan after it ended;
* the first handler error *poisons* the invocation: nothing runs on the plan
  after it, and the invocation is rolled back.

Lock order: a lease's lock (taken through ``handler.connection()`` on the
checkpointer's database) before ``_gate``; turns before both. ``_gate`` is
never held during I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import itertools
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from langgraph.errors import GraphBubbleUp, GraphInterrupt

from cleveragents.errors import ResourceError, ToolError
from cleveragents.integrations._common import ToolRollback

if TYPE_CHECKING:
    from cleveragents.integrations.langgraph._store import Execute, _Store

logger = logging.getLogger("cleveragents.integrations.langgraph")

T = TypeVar("T")
Outcome = Literal["released", "rolled_back"]
_State = Literal["open", "closing", "finished"]

INTERRUPTED = "interrupted: its task runs again when the graph is resumed"

#: The configurable key naming the invocation a config belongs to. LangGraph
#: carries it into every checkpointer call, subgraphs included, even from
#: threads whose context it did not copy (a task's done-callback, for one);
#: keys starting with "__" never reach checkpoint metadata.
CONFIG_KEY = "__cleveragents_invocation"
#: Invocations by plan id while anything may still refer to them.
_RUNS: weakref.WeakValueDictionary[str, _Invocation] = weakref.WeakValueDictionary()

#: The invocation the current thread or task works for (copied into LangGraph's threads).
_CURRENT_RUN: contextvars.ContextVar[_Invocation | None] = contextvars.ContextVar(
    "cleveragents_langgraph_invocation", default=None
)
#: The plan tool or plan node call running here; ``None`` anywhere else.
_CURRENT_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(
    "cleveragents_langgraph_call", default=None
)


def find_run(config: Any, refusal: type[Exception]) -> _Invocation | None:
    """Return the invocation *config* (or else the current context) belongs to, if any.

    :raises refusal: *config* names an invocation that has ended.
    """
    configurable = config.get("configurable") if isinstance(config, dict) else None
    plan_id = configurable.get(CONFIG_KEY) if isinstance(configurable, dict) else None
    if plan_id is None:
        return _CURRENT_RUN.get()
    run = _RUNS.get(plan_id)
    if run is None:
        raise refusal(
            f"PlanGraph invocation {plan_id!r} has ended; its config cannot be used "
            "to reach its plan any more"
        )
    return run


@dataclasses.dataclass(frozen=True, slots=True)
class GraphRun:
    """How one PlanGraph invocation ended."""

    #: The plan's id in the handler, ``langgraph-<hex>``.
    plan_id: str
    #: The ``thread_id`` of the invocation's config.
    thread_id: str | None
    #: ``"released"`` (committed) or ``"rolled_back"``.
    outcome: Outcome
    #: Why it was rolled back; ``None`` when it was released.
    rollback_reason: str | None
    #: Whether the graph stopped at an ``interrupt()`` (its state and writes were committed).
    interrupted: bool
    #: The plan tool and plan node calls rolled back to their checkpoints, in order.
    tool_rollbacks: tuple[ToolRollback, ...]


class _Turn:
    """Lets one call run at a time: threads block on it, coroutines await it.

    A coroutine never blocks its event loop here: it registers a future that
    :meth:`release` resolves, then tries again. Every waiting coroutine is
    woken on each release (there are few), so none can miss its chance.
    """

    __slots__ = ("_lock", "_mutex", "_waiting")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mutex = threading.Lock()
        self._waiting: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def acquire(self) -> None:
        self._lock.acquire()

    def try_acquire(self) -> bool:
        return self._lock.acquire(blocking=False)

    async def aacquire(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            waiter = (loop, loop.create_future())
            with self._mutex:
                self._waiting.append(waiter)
            try:
                # Registered first, then tried: a release in between wakes us.
                if self._lock.acquire(blocking=False):
                    return
                await waiter[1]
            finally:
                with self._mutex, contextlib.suppress(ValueError):
                    self._waiting.remove(waiter)

    def release(self) -> None:
        self._lock.release()
        with self._mutex:
            waiting, self._waiting = self._waiting, []
        for loop, woken in waiting:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits there
                loop.call_soon_threadsafe(_wake, woken)


def _wake(future: asyncio.Future[None]) -> None:
    # Already done: its waiter was cancelled meanwhile, and has moved on.
    with contextlib.suppress(asyncio.InvalidStateError):
        future.set_result(None)


class _Call:
    """One plan tool or plan node call: its checkpoint, its task, and whether it runs."""

    __slots__ = (
        "active",
        "call_id",
        "children",
        "kind",
        "label",
        "mark",
        "name",
        "parent",
        "run",
        "task_id",
    )

    def __init__(
        self,
        run: _Invocation,
        kind: Literal["tool", "node"],
        name: str,
        *,
        parent: _Call | None,
        task_id: str | None,
        call_id: str | None,
    ) -> None:
        self.run = run
        self.kind = kind
        self.name = name
        #: The plan node (or tool) this call runs inside, whose turn it joins.
        self.parent = parent
        #: The LangGraph task it belongs to (a ToolNode task, a node's task).
        self.task_id = task_id
        self.call_id = call_id
        self.label = ""
        #: How many journal entries existed when its checkpoint was taken.
        self.mark = 0
        #: True while its function runs; guarded by the invocation's ``_gate``.
        self.active = False
        #: Plan tools and nodes called from inside this one take turns here.
        self.children = _Turn()

    @property
    def what(self) -> str:
        return f"plan {self.kind} {self.name!r}"


@dataclasses.dataclass(slots=True)
class _Entry:
    """A top-level call's checkpoint, in the order they were taken."""

    label: str
    mark: int
    task_id: str | None
    name: str
    call_id: str | None
    undone: bool = False


class _Invocation:
    """The state of one invocation's plan; see the module docs."""

    def __init__(self, store: _Store, plan_id: str, thread_id: str | None) -> None:
        self.store = store
        self.plan_id = plan_id
        self.thread_id = thread_id
        self.interrupted = False
        self.tool_rollbacks: list[ToolRollback] = []
        #: Top-level calls take turns here; calls inside a plan node use the node's.
        self.turn = _Turn()
        self._handler = store.handler
        self._gate = threading.Condition()
        self._state: _State = "open"
        self._busy = 0
        self._poison: BaseException | None = None
        self._labels = itertools.count(1)
        # Guarded by the lease lock of the checkpointer's database (see _on_plan).
        self._journal: list[tuple[str, Sequence[Any]]] = []
        # Only touched by the call holding the invocation's turn, or at the end.
        self._ledger: list[_Entry] = []
        self._dropped_tasks: set[str] = set()
        self._interrupted_tasks: set[str] = set()
        _RUNS[plan_id] = self

    def config_for(self, config: Any) -> dict[str, Any]:
        """Return a copy of *config* that names this invocation (see ``CONFIG_KEY``)."""
        given = dict(config or {})
        given["configurable"] = {**(given.get("configurable") or {}), CONFIG_KEY: self.plan_id}
        return given

    @property
    def is_running(self) -> bool:
        """Whether the invocation has not ended yet."""
        return self._state != "finished"

    # -- admission ---------------------------------------------------------------

    def admit(self, what: str, refusal: type[Exception]) -> None:
        """Count one piece of work in, or raise: the poison, or *refusal* once it is ending."""
        with self._gate:
            if self._poison is not None:
                raise self._poison
            if self._state != "open":
                raise refusal(
                    f"{what} came after PlanGraph invocation {self.plan_id!r} ended; "
                    "it cannot use the invocation's plan any more"
                )
            self._busy += 1

    def leave(self) -> None:
        with self._gate:
            self._busy -= 1
            if not self._busy:
                self._gate.notify_all()

    def wait_idle(self) -> None:
        """Block until no call, connection or checkpointer statement of this invocation runs."""
        with self._gate:
            self._gate.wait_for(lambda: self._busy == 0)

    def poison_with(self, exc: BaseException) -> None:
        """Remember the first handler error: the invocation can only roll back now."""
        with self._gate:
            self._poison = self._poison or exc  # the first one is what the invocation raises
        logger.warning(
            "PlanGraph invocation %r: %s; it stops and everything is rolled back",
            self.plan_id,
            type(exc).__name__,
        )

    def raise_if_poisoned(self) -> None:
        with self._gate:
            poison = self._poison
        if poison is not None:
            raise poison

    def note_interrupt(self, task_id: str) -> None:
        """Record that *task_id* stopped at an ``interrupt()`` (it runs again on resume)."""
        with self._gate:
            self.interrupted = True
            self._interrupted_tasks.add(task_id)

    # -- the checkpointer's statements -------------------------------------------

    def on_plan(self, operation: Callable[[Execute], T], *, write: bool) -> T:
        """Run a checkpointer *operation* on the plan's connection; journal its writes."""
        self.admit("a checkpointer call", RuntimeError)
        try:
            with self._lease():
                return operation(self._journaled if write else self._execute)
        except BaseException as exc:
            self.poison_with(exc)
            raise
        finally:
            self.leave()

    def _lease(self) -> contextlib.AbstractContextManager[Any]:
        # Holding the lease of the checkpointer's database keeps its statements,
        # checkpoints and rollbacks from interleaving; the handler's calls made
        # inside re-enter the same lease.
        return self._handler.connection(self.store.resource, self.plan_id)

    def _execute(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self._handler.execute(self.store.resource, self.plan_id, sql, params)

    def _journaled(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        rows = self._execute(sql, params)
        self._journal.append((sql, params))
        return rows

    # -- calls ---------------------------------------------------------------------

    def start_call(self, call: _Call) -> None:
        """Check that *call* may run now, then take its checkpoint on every database.

        The caller holds the call's turn.
        """
        with self._gate:
            poison, state = self._poison, self._state
        if poison is not None:
            raise poison
        if state != "open":
            raise ToolError(
                f"{call.what} came after PlanGraph invocation {self.plan_id!r} ended; "
                "it was not run"
            )
        if call.parent is None and call.task_id in self._dropped_tasks:
            raise ToolError(
                f"{call.what} was not run: its task was interrupted and rolled back, "
                "and runs again when the graph is resumed"
            )
        try:
            with self._lease():
                call.label = f"{call.kind}-{next(self._labels)}"
                for resource in self.store.resources:
                    self._handler.create_checkpoint(resource, self.plan_id, call.label)
                call.mark = len(self._journal)
        except BaseException as exc:
            self.poison_with(exc)
            raise
        if call.parent is None:
            entry = _Entry(call.label, call.mark, call.task_id, call.name, call.call_id)
            self._ledger.append(entry)

    @contextlib.contextmanager
    def running(self, call: _Call) -> Iterator[None]:
        """Mark *call* as running for the block: it may borrow the plan's connections."""
        token = _CURRENT_CALL.set(call)
        with self._gate:
            call.active = True
        try:
            yield
        finally:
            with self._gate:
                call.active = False
            _CURRENT_CALL.reset(token)

    def undo(self, call: _Call, error: BaseException) -> None:
        """Roll *call* back after it raised *error*, as the error calls for."""
        with self._gate:
            if self._poison is not None:
                return  # everything is rolled back when the invocation ends
        if isinstance(error, GraphInterrupt):
            if call.parent is None and call.task_id is not None:
                # LangGraph runs the whole task again on resume: every plan call
                # it made must go, not only this one.
                self.rollback_task(call.task_id, call)
            else:
                self._rollback_call(call, INTERRUPTED)
        elif isinstance(error, GraphBubbleUp):
            return  # a Command for the parent graph: control flow, the call's work stands
        else:
            self._rollback_call(call, _describe(error))

    def _rollback_call(self, call: _Call, what: str) -> None:
        if not self._rewind(call.label, call.mark):
            return
        if call.parent is None:
            for entry in self._ledger:
                if entry.label == call.label:
                    entry.undone = True
        self._record(call.label, call.name, call.call_id, what)

    def rollback_task(self, task_id: str, call: _Call | None) -> None:
        """Undo every plan call of *task_id* still in the plan, if that can be done alone."""
        self._dropped_tasks.add(task_id)
        live = [entry for entry in self._ledger if not entry.undone]
        first = next((i for i, entry in enumerate(live) if entry.task_id == task_id), None)
        if first is None:
            return
        undo = live[first:]
        other = next((entry for entry in undo if entry.task_id != task_id), None)
        if other is not None:
            where = f"in {call.what}" if call is not None else "in a task"
            self.poison_with(
                ToolError(
                    f"interrupt() {where} cannot be undone alone: plan {other.name!r} "
                    f"({other.label}) of another task ran after this task's first plan call "
                    f"({undo[0].label}); everything is rolled back, run the invocation again"
                )
            )
            return
        if not self._rewind(undo[0].label, undo[0].mark):
            return
        for entry in undo:
            entry.undone = True
            self._record(entry.label, entry.name, entry.call_id, INTERRUPTED)

    def _rewind(self, label: str, mark: int) -> bool:
        """Roll every database back to checkpoint *label*; re-apply the journal after *mark*."""
        try:
            with self._lease():
                for resource in self.store.resources:
                    self._handler.rollback_to(resource, self.plan_id, label)
                for sql, params in self._journal[mark:]:
                    self._execute(sql, params)
        except BaseException as exc:
            self.poison_with(exc)
            return False
        return True

    def _record(self, label: str, name: str, call_id: str | None, what: str) -> None:
        self.tool_rollbacks.append(ToolRollback(label, name, call_id, what))
        logger.info(
            "PlanGraph invocation %r: %r rolled back to %r (%s)", self.plan_id, name, label, what
        )

    @contextlib.contextmanager
    def lend(self, call: _Call, resource: str) -> Iterator[Any]:
        """Lend the plan's connection to *resource* to code running inside *call*."""
        target = self.store.by_name.get(resource)
        if target is None:
            known = ", ".join(repr(name) for name in self.store.by_name)
            raise ToolError(
                f"PlanGraph invocation {self.plan_id!r} has no resource {resource!r} "
                f"(known: {known}); add it with PlanCheckpointer(..., resources=[...])"
            )
        with self._gate:
            if not call.active:
                raise ToolError(f"{call.what} has returned; its connection cannot be used")
        self.admit(f"a connection for {call.what}", ToolError)
        try:
            with contextlib.ExitStack() as stack:
                try:
                    conn = stack.enter_context(self._handler.connection(target, self.plan_id))
                except BaseException as exc:
                    self.poison_with(exc)
                    raise
                yield conn
        finally:
            self.leave()

    # -- the end -------------------------------------------------------------------

    def end(
        self, error: BaseException | None, *, closed_early: bool = False
    ) -> tuple[GraphRun, BaseException | None]:
        """Wait for stragglers, then release or roll back; return the run and what to raise."""
        with self._gate:
            self._state = "closing"  # nothing new starts from now on
        self.wait_idle()
        try:
            outcome, reason, failure = self._settle(error, closed_early)
        finally:
            with self._gate:
                self._state = "finished"
        if outcome == "released":
            logger.debug("PlanGraph invocation %r released", self.plan_id)
        else:
            logger.info("PlanGraph invocation %r rolled back: %s", self.plan_id, reason)
        poison = self._poison
        # A handler error the graph did not raise itself (a tool's error handled
        # by ToolNode, say) is the invocation's error; cancellation and the
        # user's interruption (KeyboardInterrupt) still win.
        if (
            failure is None
            and poison is not None
            and poison is not error
            and not closed_early
            and (error is None or isinstance(error, Exception))
        ):
            failure = poison
        run = GraphRun(
            plan_id=self.plan_id,
            thread_id=self.thread_id,
            outcome=outcome,
            rollback_reason=reason,
            interrupted=self.interrupted,
            tool_rollbacks=tuple(self.tool_rollbacks),
        )
        return run, failure

    def _settle(
        self, error: BaseException | None, closed_early: bool
    ) -> tuple[Outcome, str | None, BaseException | None]:
        if error is None and not closed_early and self._poison is None:
            # An interrupt outside a plan call (a plain tool, a node's own code)
            # still makes its task run again: undo the task's plan calls too.
            for task_id in sorted(self._interrupted_tasks - self._dropped_tasks):
                self.rollback_task(task_id, None)
        reason = self._reason_to_roll_back(error, closed_early)
        if reason is None:
            try:
                self._handler.release_plan(self.plan_id)
            except ResourceError as exc:
                reason = f"releasing it failed: {exc}"
                self._roll_back()
                return "rolled_back", reason, exc
            return "released", None, None
        self._roll_back()
        return "rolled_back", reason, None

    def _roll_back(self) -> None:
        try:
            self._handler.rollback_plan(self.plan_id)
        except ResourceError as exc:  # expired, evicted or closed: already undone
            logger.debug("rolling back PlanGraph invocation %r: %s", self.plan_id, exc)

    def _reason_to_roll_back(self, error: BaseException | None, closed_early: bool) -> str | None:
        if closed_early:
            return "the stream was closed before it was exhausted"
        if isinstance(error, asyncio.CancelledError):
            return "the invocation was cancelled"
        if error is not None:
            return f"the invocation raised {_describe(error)}"
        if self._poison is not None:
            return _describe(self._poison)
        return None


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


async def uninterrupted(awaitable: Awaitable[T]) -> T:
    """Await *awaitable* to its end even if this task is cancelled meanwhile, then re-raise that."""
    future = asyncio.ensure_future(awaitable)
    cancelled = False
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return future.result()
