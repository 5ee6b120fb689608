"""Handlers opened through the Python API in this process, the plans run on them, what they leave.

Handlers are opened under an alias and never returned, so that dropping one
(``Drop Handler Without Closing``) really drops the last reference.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager

from robot.api import logger
from robot.api.deco import keyword

from cleveragents.errors import CheckpointExpiredError, HandlerClosedError
from cleveragents.fds import count_fds
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler
from lib.common import fail
from lib.ledger import connect

FD_DIR = "/proc/self/fd"
# A generous upper bound for liveness only; no check here is about speed.
WORKLOAD_TIMEOUT = 300.0
SAMPLE_INTERVAL = 0.002


def _ledger(database: str) -> tuple[Resource, Resource]:
    """Return the ledger database as writers and as readers (deferred lock) use it."""
    writer = Resource("ledger", "database", engine="sqlite", location=database)
    reader = Resource("ledger", "database", engine="sqlite", location=database, lock="deferred")
    return writer, reader


@dataclasses.dataclass
class _Workload:
    """The plans one workload started, by how each of them ended."""

    database: str
    committed: list[str] = dataclasses.field(default_factory=list)
    rolled_back: list[str] = dataclasses.field(default_factory=list)
    forgotten_writers: list[str] = dataclasses.field(default_factory=list)
    forgotten_readers: list[str] = dataclasses.field(default_factory=list)
    ended_at: float = 0.0

    @property
    def forgotten(self) -> list[str]:
        """Every plan that was never released or rolled back."""
        return self.forgotten_writers + self.forgotten_readers

    def summary(self) -> dict[str, int]:
        """Return how many plans ended which way."""
        return {
            "committed": len(self.committed),
            "rolled_back": len(self.rolled_back),
            "forgotten": len(self.forgotten),
            "forgotten_writers": len(self.forgotten_writers),
            "forgotten_readers": len(self.forgotten_readers),
        }


@dataclasses.dataclass
class _PlanMix:
    """Runs plan number ``index`` of a workload the way its index says, recording how it ended.

    Plan ``i`` is forgotten (never released) when ``i % forget_every`` is
    ``forget_every - 1``, alternately a writer and a reader; otherwise it is
    rolled back when ``i % rollback_every == 1`` and committed else. A third of
    the committed plans also roll back to a checkpoint before releasing.
    """

    handler: DatabaseResourceHandler
    work: _Workload
    rollback_every: int
    forget_every: int

    def __post_init__(self) -> None:
        self.writer, self.reader = _ledger(self.work.database)

    def run(self, index: int) -> None:
        """Run plan number *index*."""
        plan_id = f"plan-{index:05d}"
        if index % self.forget_every == self.forget_every - 1:
            self._forget(plan_id, writes=(index // self.forget_every) % 2 == 0)
            return
        self.handler.create_checkpoint(self.writer, plan_id, "start")
        with self.handler.connection(self.writer, plan_id) as conn:
            conn.execute("INSERT INTO ledger VALUES (?, 'kept')", (plan_id,))
        if index % self.rollback_every == 1:
            self.handler.rollback_plan(plan_id)
            self.work.rolled_back.append(plan_id)
            return
        if index % 3 == 0:
            self._undo_scratch(plan_id)
        self.handler.release_plan(plan_id)
        self.work.committed.append(plan_id)

    def _forget(self, plan_id: str, writes: bool) -> None:
        """Start a plan that writes (or only reads) and never end it."""
        if writes:
            self.handler.create_checkpoint(self.writer, plan_id, "start")
            self.handler.execute(
                self.writer, plan_id, "INSERT INTO ledger VALUES (?, 'forgotten')", [plan_id]
            )
            self.work.forgotten_writers.append(plan_id)
        else:
            self.handler.create_checkpoint(self.reader, plan_id, "look")
            self.handler.execute(self.reader, plan_id, "SELECT count(*) FROM ledger")
            self.work.forgotten_readers.append(plan_id)

    def _undo_scratch(self, plan_id: str) -> None:
        """Add a scratch row after a checkpoint, then roll back to that checkpoint."""
        self.handler.create_checkpoint(self.writer, plan_id, "scratch")
        self.handler.execute(
            self.writer, plan_id, "INSERT INTO ledger VALUES (?, 'scratch')", [plan_id]
        )
        self.handler.rollback_to(self.writer, plan_id, "scratch")


def _run_on_threads(task: Callable[[int], None], count: int, threads: int) -> list[Exception]:
    """Call ``task(i)`` for ``i`` in ``range(count)`` from *threads* threads; return what failed.

    After the first failure no new task starts. Raises ``AssertionError`` if
    the threads outlive ``WORKLOAD_TIMEOUT``.
    """
    indexes = iter(range(count))
    take = threading.Lock()
    errors: list[Exception] = []

    def worker() -> None:
        while not errors:
            with take:
                index = next(indexes, None)
            if index is None:
                return
            try:
                task(index)
            except Exception as exc:  # reported by the caller, with the first one chained
                errors.append(exc)

    pool = [threading.Thread(target=worker, name=f"robot-workload-{n}") for n in range(threads)]
    for thread in pool:
        thread.start()
    deadline = time.monotonic() + WORKLOAD_TIMEOUT
    for thread in pool:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in pool):
        raise AssertionError(f"the workload did not finish within {WORKLOAD_TIMEOUT:g}s")
    return errors


class _Sampler:
    """Samples open descriptors and a handler's open connections on a thread, keeping the peaks."""

    def __init__(self, handler: DatabaseResourceHandler) -> None:
        self._handler = handler
        self._stop = threading.Event()
        self.peak_fds = count_fds()
        self.peak_connections = handler.stats().open_connections
        self._thread = threading.Thread(target=self._run, name="robot-fd-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self.sample()

    def sample(self) -> None:
        """Take one sample."""
        self.peak_fds = max(self.peak_fds, count_fds())
        self.peak_connections = max(self.peak_connections, self._handler.stats().open_connections)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class HandlerKeywords:
    """Open handlers under an alias, run plans on them, and check what they leave behind."""

    def __init__(self) -> None:
        super().__init__()
        self._handlers: dict[str, DatabaseResourceHandler] = {}
        self._names: dict[str, str] = {}
        self._dropped: dict[str, weakref.ref[DatabaseResourceHandler]] = {}
        self._warnings: dict[str, list[warnings.WarningMessage]] = {}
        self._workloads: dict[str, _Workload] = {}
        self._peak_fds = 0
        self._peak_connections = 0

    def close_handlers(self) -> None:
        """Close every handler still known."""
        for alias in list(self._handlers):
            self.close_handler(alias)

    @keyword
    def open_handler(
        self, alias: str, max_connections: int = 8, checkpoint_ttl: float = 0.5
    ) -> None:
        """Create a ``DatabaseResourceHandler`` known as *alias*."""
        if alias in self._handlers or alias in self._names:
            raise ValueError(f"a handler called {alias!r} was already opened")
        handler = DatabaseResourceHandler(
            max_connections=int(max_connections), checkpoint_ttl=float(checkpoint_ttl)
        )
        self._handlers[alias] = handler
        self._names[alias] = handler.name
        logger.info(f"handler {alias!r} is {handler!r}")

    def _handler(self, alias: str) -> DatabaseResourceHandler:
        try:
            return self._handlers[alias]
        except KeyError:
            raise ValueError(f"no open handler called {alias!r}") from None

    @keyword
    def close_handler(self, alias: str) -> None:
        """Close the handler known as *alias* (it stays known, for later checks)."""
        self._handlers[alias].close()
        logger.info(f"handler {alias!r} closed: {self._handlers[alias].stats()}")

    # -- workloads ------------------------------------------------------------------

    @keyword
    def run_plan_workload(
        self,
        alias: str,
        database: str,
        plans: int,
        rollback_every: int,
        forget_every: int,
        threads: int = 4,
    ) -> dict[str, int]:
        """Run *plans* plans on one database from *threads* threads, sampling descriptors.

        Plan ``i`` is forgotten (never released) when ``i % forget_every`` is
        ``forget_every - 1``, alternately a writer and a reader; otherwise it is
        rolled back when ``i % rollback_every == 1`` and committed else. A third
        of the committed plans also roll back to a checkpoint before releasing.
        """
        handler = self._handler(alias)
        work = _Workload(database)
        self._workloads[alias] = work
        mix = _PlanMix(handler, work, int(rollback_every), int(forget_every))
        with self._sampling(handler):
            errors = _run_on_threads(mix.run, int(plans), int(threads))
        work.ended_at = time.monotonic()
        if errors:
            raise AssertionError(
                f"{len(errors)} plans failed; the first: {type(errors[0]).__name__}: {errors[0]}"
            ) from errors[0]
        summary = work.summary()
        logger.info(f"workload: {summary}; handler: {handler.stats()}")
        return summary

    @contextmanager
    def _sampling(self, handler: DatabaseResourceHandler) -> Iterator[_Sampler]:
        with _Sampler(handler) as sampler:
            try:
                yield sampler
            finally:
                self._peak_fds = max(self._peak_fds, sampler.peak_fds)
                self._peak_connections = max(self._peak_connections, sampler.peak_connections)

    @keyword
    def forgotten_plans_should_be_reaped_within(
        self, alias: str, seconds: float, msg: str | None = None
    ) -> float:
        """Poll ``stats()`` until the forgotten plans are reaped, *seconds* after the workload."""
        handler = self._handler(alias)
        work = self._workloads[alias]
        expected = len(work.forgotten)
        # A plan counts as reaped when picked, and as rolled back once its rollback
        # is done: wait for both, so that later checks see the reaping finished.
        rollbacks = len(work.rolled_back) + expected
        deadline = work.ended_at + float(seconds)
        with self._sampling(handler):
            while True:
                stats = handler.stats()
                done = stats.reaped == expected and stats.rollbacks == rollbacks
                if done or time.monotonic() >= deadline:
                    break
                time.sleep(0.01)
        waited = time.monotonic() - work.ended_at
        if not done:
            fail(
                msg,
                f"{stats.reaped} of {expected} forgotten plans reaped, {stats.rollbacks} of "
                f"{rollbacks} rollbacks done {waited:.2f}s after the workload ended "
                f"(limit {seconds}s)",
            )
        logger.info(f"all {expected} forgotten plans reaped {waited:.3f}s after the workload")
        return waited

    @keyword
    def ledger_should_match_workload(self, alias: str, msg: str | None = None) -> None:
        """Fail unless the ledger holds exactly the kept rows of the committed plans."""
        work = self._workloads[alias]
        with closing(connect(work.database)) as conn:
            rows = conn.execute("SELECT plan, step FROM ledger").fetchall()
        found = sorted(rows)
        expected = sorted((plan, "kept") for plan in work.committed)
        if found != expected:
            unexpected = sorted(set(found) - set(expected))[:10]
            missing = sorted(set(expected) - set(found))[:10]
            fail(
                msg,
                f"ledger has {len(found)} rows, expected {len(expected)}; unexpected (first "
                f"10): {unexpected}; missing (first 10): {missing}",
            )

    @keyword
    def handler_stat_should_be(
        self, alias: str, name: str, expected: int, msg: str | None = None
    ) -> None:
        """Fail unless ``stats()[name]`` of the handler *alias* equals *expected*."""
        stats = self._handler(alias).stats()
        if stats[name] != int(expected):
            fail(msg, f"stats()[{name!r}] is {stats[name]}, expected {expected}: {stats}")

    @keyword
    def forgotten_plans_should_raise_expired_once(self, alias: str, msg: str | None = None) -> None:
        """Fail unless each forgotten plan's next call raises ``CheckpointExpiredError``, once."""
        handler = self._handler(alias)
        for plan_id in self._workloads[alias].forgotten:
            try:
                handler.release_plan(plan_id)
            except CheckpointExpiredError as exc:
                if exc.plan_id != plan_id or type(exc) is not CheckpointExpiredError:
                    fail(msg, f"release_plan({plan_id!r}) raised {exc!r}")
            else:
                fail(msg, f"release_plan({plan_id!r}) of a reaped plan raised nothing")
            handler.release_plan(plan_id)

    @keyword
    def closed_handler_should_refuse_work(self, alias: str, msg: str | None = None) -> None:
        """Fail unless a checkpoint on the closed handler *alias* raises ``HandlerClosedError``."""
        handler = self._handler(alias)
        resource = Resource("ledger", "database", engine="sqlite", location=":memory:")
        try:
            handler.create_checkpoint(resource, "after-close", "start")
        except HandlerClosedError:
            return
        fail(msg, "create_checkpoint on a closed handler raised nothing")

    # -- handlers nobody closed -----------------------------------------------------

    @keyword
    def leave_plans_open(self, alias: str, database: str, committed: int, readers: int) -> None:
        """Commit *committed* plans, then leave a writer and *readers* readers open."""
        handler = self._handler(alias)
        writer, reader = _ledger(database)
        for index in range(int(committed)):
            plan_id = f"{alias}-committed-{index}"
            handler.execute(writer, plan_id, "INSERT INTO ledger VALUES (?, 'kept')", [plan_id])
            handler.release_plan(plan_id)
        for index in range(int(readers)):
            plan_id = f"{alias}-reader-{index}"
            handler.create_checkpoint(reader, plan_id, "look")
            handler.execute(reader, plan_id, "SELECT count(*) FROM ledger")
        plan_id = f"{alias}-open-writer"
        handler.create_checkpoint(writer, plan_id, "start")
        handler.execute(writer, plan_id, "INSERT INTO ledger VALUES (?, 'open')", [plan_id])
        logger.info(f"left open on {handler!r}: {handler.stats()}")

    @keyword
    def drop_handler_without_closing(self, alias: str) -> None:
        """Drop the last reference to the handler *alias* and run the garbage collector."""
        handler = self._handlers.pop(alias)
        self._dropped[alias] = weakref.ref(handler)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del handler  # the finalizer may run here already, or in the collection below
            gc.collect()
        self._warnings[alias] = list(caught)

    @keyword
    def handler_should_have_been_collected(self, alias: str, msg: str | None = None) -> None:
        """Fail unless the dropped handler *alias* is gone and warned with a ``ResourceWarning``."""
        if self._dropped[alias]() is not None:
            referrers = [type(r).__name__ for r in gc.get_referrers(self._dropped[alias]())]
            fail(msg, f"handler {alias!r} is still alive, held by {referrers}")
        name = self._names[alias]
        found = [
            w
            for w in self._warnings[alias]
            if issubclass(w.category, ResourceWarning) and repr(name) in str(w.message)
        ]
        if len(found) != 1:
            shown = [f"{w.category.__name__}: {w.message}" for w in self._warnings[alias]]
            fail(msg, f"expected one ResourceWarning naming {name!r}; got {shown}")
        logger.info(f"collected: {found[0].message}")

    # -- descriptors and threads ----------------------------------------------------

    @keyword
    def count_open_descriptors(self) -> int:
        """Return how many file descriptors the robot process has open now."""
        count = count_fds()
        logger.info(f"{count} file descriptors open")
        return count

    @keyword
    def open_descriptors_should_be(self, expected: int, msg: str | None = None) -> None:
        """Fail unless exactly *expected* file descriptors are open."""
        count = count_fds()
        if count != int(expected):
            fail(msg, f"{count} file descriptors open, expected {expected}: {self._fds()}")

    @keyword
    def open_descriptors_should_be_above(self, limit: int, msg: str | None = None) -> None:
        """Fail unless more than *limit* file descriptors are open."""
        count = count_fds()
        if count <= int(limit):
            fail(msg, f"{count} file descriptors open, expected more than {limit}")

    @staticmethod
    def _fds() -> list[str]:
        shown = []
        for fd in os.listdir(FD_DIR):
            try:
                shown.append(f"{fd}->{os.readlink(os.path.join(FD_DIR, fd))}")
            except OSError:
                continue  # closed meanwhile, e.g. the listing's own descriptor
        return shown

    @keyword
    def peak_open_descriptors(self) -> int:
        """Return the most file descriptors seen open while a workload or reaping wait ran."""
        logger.info(f"peak: {self._peak_fds} file descriptors")
        return self._peak_fds

    @keyword
    def peak_open_descriptors_should_be_at_most(self, limit: int, msg: str | None = None) -> None:
        """Fail if more than *limit* file descriptors were ever seen open while sampling."""
        if self._peak_fds > int(limit):
            fail(msg, f"up to {self._peak_fds} file descriptors were open, limit {limit}")

    @keyword
    def peak_open_connections_should_be_at_most(self, limit: int, msg: str | None = None) -> None:
        """Fail if ``stats().open_connections`` was ever seen above *limit* while sampling."""
        if self._peak_connections > int(limit):
            fail(msg, f"up to {self._peak_connections} connections were open, limit {limit}")

    def _reaper_threads(self, alias: str) -> list[threading.Thread]:
        name = f"cleveragents-reaper[{self._names[alias]}]"
        return [thread for thread in threading.enumerate() if thread.name == name]

    @keyword
    def reaper_thread_should_be_running(self, alias: str, msg: str | None = None) -> None:
        """Fail unless exactly one live reaper thread belongs to the handler *alias*."""
        found = self._reaper_threads(alias)
        if len(found) != 1 or not found[0].daemon:
            fail(msg, f"expected one daemon reaper thread for {alias!r}, found {found}")

    @keyword
    def no_reaper_thread_should_be_left(self, alias: str, msg: str | None = None) -> None:
        """Fail if a reaper thread of the handler *alias* is still alive."""
        found = self._reaper_threads(alias)
        if found:
            fail(msg, f"reaper threads of {alias!r} still alive: {found}")
