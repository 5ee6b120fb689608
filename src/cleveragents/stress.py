"""The load and soak harness behind ``cleveragents stress``.

It reproduces the methodology that exposed the public descriptor leak: N
writer plans and M readers run for T seconds on one database through one
:class:`~cleveragents.resource.handlers.database.DatabaseResourceHandler`,
every handler call made through ``asyncio.to_thread`` on an executor of K
threads. About one writer plan in five fails on purpose and is rolled back.
Open descriptors and threads are sampled while it runs; at the end every
committed plan's rows must be present, every other plan's rows absent, and
the database must pass its own integrity check.

Only the :class:`~cleveragents.resource.Resource` depends on the engine, so
``--engine postgresql --dsn ...`` runs the same harness on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cleveragents.errors import CleverAgentsError, ResourceError
from cleveragents.fds import count_fds, fd_limit
from cleveragents.resource.base import Resource
from cleveragents.resource.handlers.database import ENGINES, DatabaseResourceHandler

#: Label of the plans' rows; every run has its own ``run`` value.
TABLE = "stress_rows"
_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} ("
    "run TEXT NOT NULL, plan TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (run, plan, n))"
)
_INSERT = f"INSERT INTO {TABLE} (run, plan, n) VALUES (:run, :plan, :n)"
_READ = f"SELECT n FROM {TABLE} WHERE run = :run AND plan = :plan ORDER BY n"
_READ_ALL = f"SELECT plan, n FROM {TABLE} WHERE run = :run"
#: The rows a committed writer plan leaves; row 99 is undone by ``rollback_to``.
COMMITTED_ROWS = (1, 2)
_SCRATCH_ROW = 99
#: Integrity checks of the storage itself, by engine (the engine's own word for "fine").
_STORAGE_CHECKS = {"sqlite": ("PRAGMA integrity_check", "ok")}
_MAX_EXAMPLES = 5
_FD_POLL = 0.1


@dataclasses.dataclass(frozen=True)
class StressOptions:
    """What to run: how many writers and readers, for how long, under which limits."""

    db: str | None = None
    writers: int = 30
    readers: int = 10
    seconds: float = 60.0
    executor_threads: int = 32
    fd_limit: int | None = None
    max_connections: int = 32
    engine: str = "sqlite"
    dsn: str | None = dataclasses.field(default=None, repr=False)  # a secret
    fail_ratio: float = 0.2
    sample_interval: float = 1.0
    seed: int | None = None
    #: Further keywords of the handler (``acquire_timeout``, ``on_full``, ...).
    handler_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_counts()
        self._check_engine()
        if self.fd_limit is not None:
            import resource as rlimit

            hard = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)[1]
            if hard != rlimit.RLIM_INFINITY and self.fd_limit > hard:
                raise ValueError(
                    f"fd_limit {self.fd_limit} is above this process's hard limit ({hard})"
                )

    def _check_counts(self) -> None:
        """Refuse counts, durations and ratios out of their range."""
        if self.writers < 1:
            raise ValueError(f"writers must be at least 1, got {self.writers}")
        if self.readers < 0:
            raise ValueError(f"readers must be 0 or more, got {self.readers}")
        if not 0 < self.seconds < math.inf:
            raise ValueError(f"seconds must be more than 0, got {self.seconds}")
        if self.executor_threads < 1:
            raise ValueError(f"executor_threads must be at least 1, got {self.executor_threads}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {self.max_connections}")
        if self.fd_limit is not None and self.fd_limit < 64:
            raise ValueError(f"fd_limit must be at least 64, got {self.fd_limit}")
        if not 0 <= self.fail_ratio <= 1:
            raise ValueError(f"fail_ratio must be between 0 and 1, got {self.fail_ratio}")
        if self.sample_interval <= 0:
            raise ValueError(f"sample_interval must be more than 0, got {self.sample_interval}")

    def _check_engine(self) -> None:
        """Refuse an unknown engine, and a database option of the other engine."""
        if self.engine not in ENGINES:
            known = ", ".join(sorted(ENGINES))
            raise ValueError(f"unknown engine {self.engine!r} (known: {known})")
        if self.engine == "sqlite" and self.dsn is not None:
            raise ValueError("--dsn is for --engine postgresql; SQLite takes --db")
        if self.engine != "sqlite" and self.dsn is None:
            raise ValueError(f"--engine {self.engine} needs --dsn")
        if self.engine != "sqlite" and self.db is not None:
            raise ValueError(f"--db is for SQLite; --engine {self.engine} takes --dsn")

    @property
    def fd_bound(self) -> int:
        """How far above the baseline the descriptor count may go: two per connection, plus 8."""
        return 2 * self.max_connections + 8


@dataclasses.dataclass(frozen=True)
class Sample:
    """One point of the timeline, taken every ``sample_interval`` seconds."""

    t: float
    fds: int
    threads: int
    plans_committed: int
    plans_rolled_back: int
    reads: int
    errors: int
    open_connections: int


@dataclasses.dataclass
class StressReport:
    """What a stress run measured, and whether the handler stayed healthy."""

    options: StressOptions
    database: str
    #: The value of the ``run`` column of this run's rows.
    run_id: str = ""
    elapsed_s: float = 0.0
    plans_committed: int = 0
    plans_rolled_back: int = 0
    plans_errored: int = 0
    reads: int = 0
    errors_by_type: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    error_examples: list[str] = dataclasses.field(default_factory=list)
    fd_baseline: int = 0
    fd_peak: int = 0
    fd_final: int = 0
    threads_baseline: int = 0
    threads_peak: int = 0
    threads_final: int = 0
    missing_plans: int = 0
    unexpected_plans: int = 0
    #: What the engine's own check said (SQLite: ``PRAGMA integrity_check``), if it has one.
    storage_check: str | None = None
    storage_ok: bool = True
    integrity_checked: bool = False
    handler_stats: dict[str, int] = dataclasses.field(default_factory=dict)
    samples: list[Sample] = dataclasses.field(default_factory=list)
    interrupted: str | None = None

    @property
    def errors(self) -> int:
        """How many operations failed unexpectedly (deliberate failures are not errors)."""
        return sum(self.errors_by_type.values())

    @property
    def plans_per_s(self) -> float:
        """Writer plans finished (committed or rolled back) per second."""
        finished = self.plans_committed + self.plans_rolled_back
        return finished / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def integrity_ok(self) -> bool:
        """Committed rows all present, other plans' rows all absent, storage check passed."""
        return (
            self.integrity_checked
            and self.missing_plans == 0
            and self.unexpected_plans == 0
            and self.storage_ok
        )

    @property
    def fds_ok(self) -> bool:
        """Peak within ``2 * max_connections + 8`` of the baseline, final within 1 of it."""
        return (
            self.fd_peak - self.fd_baseline <= self.options.fd_bound
            and abs(self.fd_final - self.fd_baseline) <= 1
        )

    @property
    def healthy(self) -> bool:
        """No errors, exact integrity, descriptors bounded: what exit status 0 means."""
        return self.errors == 0 and self.integrity_ok and self.fds_ok

    def to_json(self) -> dict[str, Any]:
        """Return the report as ``cleveragents stress --json`` prints it."""
        options = self.options
        return {
            "engine": options.engine,
            "database": self.database,
            "run_id": self.run_id,
            "writers": options.writers,
            "readers": options.readers,
            "seconds": options.seconds,
            "elapsed_s": round(self.elapsed_s, 3),
            "executor_threads": options.executor_threads,
            "max_connections": options.max_connections,
            "fd_limit": options.fd_limit,
            "plans_committed": self.plans_committed,
            "plans_rolled_back": self.plans_rolled_back,
            "plans_errored": self.plans_errored,
            "reads": self.reads,
            "errors": self.errors,
            "errors_by_type": dict(self.errors_by_type),
            "error_examples": self.error_examples,
            "plans_per_s": round(self.plans_per_s, 1),
            "reads_per_s": round(self.reads / self.elapsed_s, 1) if self.elapsed_s else 0.0,
            "fd_baseline": self.fd_baseline,
            "fd_peak": self.fd_peak,
            "fd_final": self.fd_final,
            "fd_bound": options.fd_bound,
            "fds_ok": self.fds_ok,
            "threads_baseline": self.threads_baseline,
            "threads_peak": self.threads_peak,
            "threads_final": self.threads_final,
            "integrity_ok": self.integrity_ok,
            "missing_plans": self.missing_plans,
            "unexpected_plans": self.unexpected_plans,
            "storage_check": self.storage_check,
            "handler_stats": self.handler_stats,
            "interrupted": self.interrupted,
            "healthy": self.healthy,
            "samples": [dataclasses.asdict(sample) for sample in self.samples],
        }


class _PlannedFailure(Exception):
    """Raised inside a writer plan that is meant to fail and be rolled back."""


def _is_integrity_error(exc: BaseException) -> bool:
    # DB-API drivers all name the class of constraint violations IntegrityError.
    return any(cls.__name__ == "IntegrityError" for cls in type(exc).__mro__)


def resources(options: StressOptions, location: str | None) -> tuple[Resource, Resource]:
    """Return the writers' and the readers' resource: the only engine-specific part."""
    if options.engine == "sqlite":
        writer = Resource("stress", "database", engine="sqlite", location=location)
        reader = Resource("stress", "database", engine="sqlite", location=location, lock="deferred")
        return writer, reader
    writer = Resource("stress", "database", engine=options.engine, dsn=options.dsn)
    return writer, writer


class _Harness:
    """One stress run: the handler, the workers, the sampler and the final check."""

    def __init__(
        self,
        options: StressOptions,
        report: StressReport,
        writer: Resource,
        reader: Resource,
        progress: Callable[[Sample, StressReport], None] | None,
    ) -> None:
        self.options = options
        self.report = report
        self.writer = writer
        self.reader = reader
        self.progress = progress
        self.run_id = report.run_id = uuid.uuid4().hex[:12]
        self.rng = random.Random(options.seed)
        self.committed: list[str] = []
        self.rolled_back: list[str] = []
        self.in_flight: dict[int, str] = {}
        self.stop = asyncio.Event()
        # A plan waiting for its write turn or a connection blocks its executor
        # thread. With every thread blocked so, the plan holding the turn could not
        # make its next call until busy_timeout: keep one thread free for it.
        self.admission = asyncio.Semaphore(max(1, options.executor_threads - 1))
        self.handler: DatabaseResourceHandler | None = None

    # -- the run ----------------------------------------------------------------

    async def run(self) -> None:
        options, report = self.options, self.report
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(options.executor_threads, thread_name_prefix="stress")
        loop.set_default_executor(executor)
        report.fd_baseline = report.fd_peak = count_fds()
        report.threads_baseline = report.threads_peak = threading.active_count()
        handler = self.handler = DatabaseResourceHandler(
            max_connections=options.max_connections,
            name="stress",
            **options.handler_options,
        )
        try:
            with self._signals(loop):
                await asyncio.to_thread(self._create_schema)
                started = time.monotonic()
                workers = [
                    *(asyncio.create_task(self._writer(i)) for i in range(options.writers)),
                    *(asyncio.create_task(self._reader(i)) for i in range(options.readers)),
                ]
                await self._sample(started)
                await asyncio.gather(*workers)
                report.elapsed_s = time.monotonic() - started
                self._poll()
                self._record(started)
            report.handler_stats = dict(handler.stats())
            try:
                await asyncio.to_thread(self._check_integrity)
            except Exception as exc:  # a check that cannot read the rows has failed
                self._error(exc, f"{self.run_id}-check")
        finally:
            await asyncio.to_thread(handler.close)
        report.fd_final = count_fds()
        executor.shutdown(wait=True)
        report.threads_final = threading.active_count()

    @contextmanager
    def _signals(self, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
        """On SIGINT/SIGTERM, stop starting plans; the run then ends and is checked as usual."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        for signum in signals:
            loop.add_signal_handler(signum, self._interrupt, signum)
        try:
            yield
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)

    def _interrupt(self, signum: int) -> None:
        self.report.interrupted = signal.Signals(signum).name
        self.stop.set()

    def _create_schema(self) -> None:
        handler = self._handler()
        plan_id = f"{self.run_id}-schema"
        try:
            handler.execute(self.writer, plan_id, _SCHEMA)
        except BaseException as exc:
            handler.rollback_plan(plan_id)
            if isinstance(exc, Exception) and not isinstance(exc, CleverAgentsError):
                raise ResourceError(
                    f"cannot create table {TABLE!r}: {type(exc).__name__}: {exc}",
                    plan_id=plan_id,
                    resource=self.writer.name,
                    operation="execute",
                ) from exc
            raise
        handler.release_plan(plan_id)

    def _handler(self) -> DatabaseResourceHandler:
        assert self.handler is not None
        return self.handler

    # -- sampling -----------------------------------------------------------------

    def _poll(self) -> None:
        report = self.report
        report.fd_peak = max(report.fd_peak, count_fds())
        report.threads_peak = max(report.threads_peak, threading.active_count())

    def _record(self, started: float) -> None:
        report = self.report
        sample = Sample(
            t=round(time.monotonic() - started, 3),
            fds=count_fds(),
            threads=threading.active_count(),
            plans_committed=report.plans_committed,
            plans_rolled_back=report.plans_rolled_back,
            reads=report.reads,
            errors=report.errors,
            open_connections=self._handler().stats().open_connections,
        )
        report.samples.append(sample)
        if self.progress is not None:
            self.progress(sample, report)

    async def _sample(self, started: float) -> None:
        """Poll descriptors and threads, record a sample each interval, stop at the deadline."""
        deadline = started + self.options.seconds
        next_record = started + self.options.sample_interval
        while not self.stop.is_set():
            self._poll()
            now = time.monotonic()
            if now >= next_record:
                self._record(started)
                next_record += self.options.sample_interval
            if now >= deadline:
                self.stop.set()
                break
            with suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), min(_FD_POLL, deadline - now))

    # -- workers --------------------------------------------------------------------

    def _error(self, exc: BaseException, plan_id: str) -> None:
        report = self.report
        report.errors_by_type[type(exc).__name__] += 1
        if len(report.error_examples) < _MAX_EXAMPLES:
            report.error_examples.append(f"{plan_id}: {type(exc).__name__}: {exc}")

    async def _writer(self, index: int) -> None:
        rng = random.Random(self.rng.random())
        sequence = 0
        while not self.stop.is_set():
            sequence += 1
            plan_id = f"{self.run_id}-w{index}-{sequence}"
            fail = rng.random() < self.options.fail_ratio
            by_statement = rng.random() < 0.5
            async with self.admission:
                self.in_flight[index] = plan_id
                try:
                    await self._write_plan(plan_id, fail=fail, by_statement=by_statement)
                finally:
                    del self.in_flight[index]

    async def _write_plan(self, plan_id: str, *, fail: bool, by_statement: bool) -> None:
        """Take a checkpoint, write in a pool thread, then commit, or fail and roll back."""
        handler = self._handler()
        try:
            await handler.acreate_checkpoint(self.writer, plan_id, "start")
            await asyncio.to_thread(self._write_rows, plan_id, fail and by_statement)
            if fail:
                raise _PlannedFailure(plan_id)
            await handler.arelease_plan(plan_id)
        except _PlannedFailure:
            try:
                await handler.arollback_plan(plan_id)
            except Exception as exc:  # counted: the harness must see every failure
                self._error(exc, plan_id)
                self.report.plans_errored += 1
            else:
                self.report.plans_rolled_back += 1
                self.rolled_back.append(plan_id)
            return
        except Exception as exc:  # counted: the harness must see every failure
            self._error(exc, plan_id)
            self.report.plans_errored += 1
            try:
                await handler.arollback_plan(plan_id)
            except Exception as again:  # counted as well, then the writer goes on
                self._error(again, plan_id)
            return
        self.report.plans_committed += 1
        self.committed.append(plan_id)

    def _write_rows(self, plan_id: str, duplicate: bool) -> None:
        """Write rows 1 and 2, and row 99 undone by ``rollback_to``; *duplicate* repeats row 1."""
        handler = self._handler()
        resource = self.writer
        row = {"run": self.run_id, "plan": plan_id}
        handler.execute(resource, plan_id, _INSERT, {**row, "n": 1})
        handler.create_checkpoint(resource, plan_id, "scratch")
        handler.execute(resource, plan_id, _INSERT, {**row, "n": _SCRATCH_ROW})
        handler.rollback_to(resource, plan_id, "scratch")
        handler.execute(resource, plan_id, _INSERT, {**row, "n": 2})
        if not duplicate:
            return
        try:
            handler.execute(resource, plan_id, _INSERT, {**row, "n": 1})
        except Exception as exc:
            if not _is_integrity_error(exc):
                raise
            raise _PlannedFailure(plan_id) from exc
        raise AssertionError(f"the database accepted a duplicate row in plan {plan_id!r}")

    async def _reader(self, index: int) -> None:
        """Read a committed, rolled-back or in-flight plan: all of it or nothing, never part."""
        rng = random.Random(self.rng.random())
        sequence = 0
        handler = self._handler()
        while not self.stop.is_set():
            sequence += 1
            plan_id = f"{self.run_id}-r{index}-{sequence}"
            async with self.admission:
                target, allowed = self._pick_target(rng)
                try:
                    rows = await asyncio.to_thread(
                        handler.execute,
                        self.reader,
                        plan_id,
                        _READ,
                        {"run": self.run_id, "plan": target},
                    )
                    await handler.arelease_plan(plan_id)
                except Exception as exc:  # counted: the harness must see every failure
                    self._error(exc, plan_id)
                    try:
                        await handler.arollback_plan(plan_id)
                    except Exception as again:  # counted as well, then the reader goes on
                        self._error(again, plan_id)
                    continue
            self.report.reads += 1
            found = tuple(n for (n,) in rows)
            if found not in allowed:
                self._error(
                    AssertionError(f"plan {target!r} read as rows {found}, expected {allowed}"),
                    plan_id,
                )

    def _pick_target(self, rng: random.Random) -> tuple[str, tuple[tuple[int, ...], ...]]:
        choice = rng.random()
        if choice < 0.5 and self.committed:
            return rng.choice(self.committed), (COMMITTED_ROWS,)
        if choice < 0.75 and self.rolled_back:
            return rng.choice(self.rolled_back), ((),)
        if self.in_flight:
            target = rng.choice(list(self.in_flight.values()))
            return target, ((), COMMITTED_ROWS)
        return f"{self.run_id}-none", ((),)

    # -- the final check -------------------------------------------------------------

    def _check_integrity(self) -> None:
        """Compare the database with what the workers saw, row by row, then check the storage."""
        handler = self._handler()
        report = self.report
        plan_id = f"{self.run_id}-check"
        try:
            rows = handler.execute(self.reader, plan_id, _READ_ALL, {"run": self.run_id})
            storage = _STORAGE_CHECKS.get(self.options.engine)
            if storage is not None:
                result = handler.execute(self.reader, plan_id, storage[0])
                report.storage_check = "; ".join(str(value) for (value,) in result)
                report.storage_ok = report.storage_check == storage[1]
        finally:
            handler.rollback_plan(plan_id)
        found: dict[str, list[int]] = collections.defaultdict(list)
        for plan, n in rows:
            found[plan].append(n)
        committed = set(self.committed)
        report.missing_plans = sum(
            1 for plan in committed if tuple(sorted(found.get(plan, ()))) != COMMITTED_ROWS
        )
        report.unexpected_plans = sum(1 for plan in found if plan not in committed)
        report.integrity_checked = True


def run_stress(
    options: StressOptions,
    *,
    progress: Callable[[Sample, StressReport], None] | None = None,
) -> StressReport:
    """Run the harness and return its report; *progress* is called with every sample."""
    folder = None
    location = options.db
    if options.engine == "sqlite" and location is None:
        folder = tempfile.mkdtemp(prefix="cleveragents-stress-")
        location = str(Path(folder, "stress.db"))
    shown = location if options.engine == "sqlite" else f"{options.engine} (dsn hidden)"
    report = StressReport(options=options, database=str(shown))
    writer, reader = resources(options, location)
    try:
        with fd_limit(options.fd_limit):
            asyncio.run(_Harness(options, report, writer, reader, progress).run())
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return report


_OPTION_OF_SETTING = {"location": "--db", "dsn": "--dsn", "engine": "--engine"}


def check_resource(options: StressOptions) -> str | None:
    """Return why the harness's resource is bad input, or ``None`` if it is fine."""
    location = options.db or str(Path(tempfile.gettempdir(), "stress.db"))
    writer, _ = resources(options, location)
    try:
        DatabaseResourceHandler.validate_settings(writer)
    except ValidationError as exc:
        # Only the location and the message: the input may be a DSN with a password.
        first = exc.errors()[0]
        key = str(first["loc"][-1]) if first["loc"] else "engine"
        option = _OPTION_OF_SETTING.get(key, key)
        return f"{option}: {first['msg'].removeprefix('Value error, ')}"
    if options.db is not None and not Path(options.db).resolve().parent.is_dir():
        return f"--db: folder {str(Path(options.db).resolve().parent)!r} does not exist"
    return None


# -- output ----------------------------------------------------------------------------


def summary_lines(report: StressReport) -> list[str]:
    """Return the report as lines for people."""
    options = report.options
    limit = f", fd limit {options.fd_limit}" if options.fd_limit else ""
    storage = f", storage check {report.storage_check}" if report.storage_check else ""
    errors = ", ".join(f"{name} {count}" for name, count in report.errors_by_type.most_common())
    lines = [
        f"stress: {report.elapsed_s:.1f}s on {options.engine} {report.database}: "
        f"{options.writers} writers, {options.readers} readers, "
        f"{options.executor_threads} executor threads, max {options.max_connections} "
        f"connections{limit}",
        f"plans committed    {report.plans_committed} ({report.plans_per_s:.1f} plans/s)",
        f"plans rolled back  {report.plans_rolled_back} (on purpose)",
        f"reads              {report.reads}",
        f"errors             {report.errors}" + (f" ({errors})" if errors else ""),
        *(f"  {example}" for example in report.error_examples),
        f"descriptors        baseline {report.fd_baseline}, peak {report.fd_peak} "
        f"(bound +{options.fd_bound}), final {report.fd_final}: "
        + ("ok" if report.fds_ok else "NOT BOUNDED"),
        f"threads            baseline {report.threads_baseline}, peak {report.threads_peak}, "
        f"final {report.threads_final}",
        f"integrity          {'ok' if report.integrity_ok else 'FAILED'}: "
        f"{report.missing_plans} committed plans missing rows, "
        f"{report.unexpected_plans} other plans with rows{storage}",
    ]
    if report.interrupted:
        lines.append(f"interrupted by {report.interrupted}")
    lines.append(f"result             {'healthy' if report.healthy else 'NOT HEALTHY'}")
    return lines


_PLOT_FORMATS = (".svg", ".png", ".pdf")


def plot_problem(path: str | os.PathLike[str]) -> str | None:
    """Return why ``--plot PATH`` cannot work (no matplotlib, bad suffix or folder), or ``None``."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib: pip install 'cleveragents[plot]'"
    target = Path(path)
    if target.suffix.lower() not in _PLOT_FORMATS:
        return f"--plot: {str(path)!r} must end in {', '.join(_PLOT_FORMATS)}"
    if not target.resolve().parent.is_dir():
        return f"--plot: folder {str(target.resolve().parent)!r} does not exist"
    return None


def write_plot(report: StressReport, path: str | os.PathLike[str]) -> None:
    """Draw descriptors and throughput over time into *path* (.svg, .png, .pdf).

    Needs matplotlib (the ``plot`` extra); check with :func:`plot_problem` first.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    samples = report.samples
    end = max(report.elapsed_s, samples[-1].t if samples else 0.0)
    figure, (fds_axes, rate_axes) = pyplot.subplots(2, 1, sharex=True, figsize=(8, 6))
    try:
        fds_axes.plot(
            [0.0, *(sample.t for sample in samples), end],
            [report.fd_baseline, *(sample.fds for sample in samples), report.fd_final],
            marker=".",
            label="open descriptors (last: after close)",
        )
        fds_axes.axhline(report.fd_baseline, linestyle=":", color="grey", label="baseline")
        fds_axes.axhline(
            report.fd_baseline + report.options.fd_bound,
            linestyle="--",
            color="red",
            label="bound (2 x max_connections + 8)",
        )
        fds_axes.set_ylabel("descriptors")
        fds_axes.legend(loc="center right")
        times, rates = [], []
        previous_t, previous_done = 0.0, 0
        for sample in samples:
            span = sample.t - previous_t
            if span < report.options.sample_interval / 2:
                continue  # the last sample, taken as the run drained: too short for a rate
            done = sample.plans_committed + sample.plans_rolled_back
            times.append(sample.t)
            rates.append((done - previous_done) / span)
            previous_t, previous_done = sample.t, done
        rate_axes.plot(times, rates, marker=".", label="writer plans/s")
        rate_axes.set_ylim(bottom=0)
        rate_axes.set_ylabel("plans per second")
        rate_axes.set_xlabel("seconds")
        rate_axes.legend(loc="lower right")
        figure.suptitle(
            f"cleveragents stress: {report.options.writers} writers, "
            f"{report.options.readers} readers, {report.options.executor_threads} threads"
        )
        figure.savefig(os.fspath(path))
    finally:
        pyplot.close(figure)


class LiveLine:
    """A one-line live progress display, shown only when *console* is a terminal."""

    def __init__(self, console: Any) -> None:
        from rich.live import Live

        self.console = console
        self.live: Live | None = None
        if console.is_terminal:
            self.live = Live(console=console, auto_refresh=False, transient=True)

    def __enter__(self) -> LiveLine:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.live is not None:
            self.live.stop()

    def __call__(self, sample: Sample, report: StressReport) -> None:
        """Show *sample*."""
        if self.live is None:
            return
        options = report.options
        line = (
            f"{sample.t:5.0f}/{options.seconds:g}s  committed {sample.plans_committed}  "
            f"rolled back {sample.plans_rolled_back}  reads {sample.reads}  "
            f"errors {sample.errors}  fds {sample.fds} (+{sample.fds - report.fd_baseline})  "
            f"threads {sample.threads}  connections {sample.open_connections}"
        )
        self.live.update(line, refresh=True)


def exit_status(report: StressReport) -> int:
    """Return 0 for a healthy run, 128 + signal when interrupted, else 1."""
    if report.interrupted:
        return 128 + signal.Signals[report.interrupted].value
    return 0 if report.healthy else 1


def print_report(report: StressReport, *, as_json: bool, out: Any = None) -> None:
    """Write the report to *out* (stdout): JSON on one line, or lines for people."""
    import json

    out = out or sys.stdout
    if as_json:
        out.write(json.dumps(report.to_json()) + "\n")
    else:
        out.write("\n".join(summary_lines(report)) + "\n")
    out.flush()


__all__ = [
    "COMMITTED_ROWS",
    "TABLE",
    "LiveLine",
    "Sample",
    "StressOptions",
    "StressReport",
    "check_resource",
    "exit_status",
    "print_report",
    "plot_problem",
    "resources",
    "run_stress",
    "summary_lines",
    "write_plot",
]
