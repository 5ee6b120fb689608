"""Robot Framework keywords that drive the installed cleveragents package and its command."""

from __future__ import annotations

import dataclasses
import difflib
import gc
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, NoReturn

from robot.api import logger
from robot.api.deco import keyword, library

from cleveragents.errors import CheckpointExpiredError, HandlerClosedError
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FD_DIR = "/proc/self/fd"
# Generous upper bounds for liveness only; no check here is about speed.
COMMAND_TIMEOUT = 120.0
WORKLOAD_TIMEOUT = 300.0
SAMPLE_INTERVAL = 0.002

LEDGER_SCHEMA = "CREATE TABLE IF NOT EXISTS ledger (plan TEXT NOT NULL, step TEXT NOT NULL)"

_LEDGER_PLAN = """\
# Written by CleverAgentsLibrary: {rows} ledger rows, {outcome}.
id: {plan_id}
resources:
  ledger:
    kind: database
    engine: sqlite
    location: {location}
steps:
  - id: schema
    resource: ledger
    sql: {schema}
  - id: first
    resource: ledger
    sql: INSERT INTO ledger (plan, step) VALUES (:plan, 'first')
    params: {{plan: {plan_id}}}
  - id: second
    resource: ledger
    checkpoint: true
    retry: 1
    sql: INSERT INTO ledger (plan, step) VALUES (:plan, 'second')
    params: {{plan: {plan_id}}}
  - id: third
    resource: ledger
    sql: INSERT INTO ledger (plan, step) VALUES (:plan, 'third')
    params: {{plan: {plan_id}}}
  - id: check
    resource: ledger
    expect:
      sql: SELECT count(*) FROM ledger WHERE plan = :plan
      params: {{plan: {plan_id}}}
      equals: {expected}
"""

_SLOW_PLAN = """\
# Written by CleverAgentsLibrary: adds a row, then runs a statement for minutes.
id: slow
resources:
  ledger:
    kind: database
    engine: sqlite
    location: {location}
steps:
  - id: first
    resource: ledger
    sql: INSERT INTO ledger (plan, step) VALUES ('slow', 'first')
  - id: count-to-a-trillion
    resource: ledger
    sql: >-
      WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000000)
      SELECT count(*) FROM c
  - id: last
    resource: ledger
    sql: INSERT INTO ledger (plan, step) VALUES ('slow', 'last')
"""

# Each bad plan overrides some values of _BAD_BASE; the value marked "# <-" is the
# problem, and the marker is removed before the plan is written.
_BAD_BASE = """\
id: {name}
resources:
  inventory:
    kind: database
    engine: {engine}
    location: {name}.db{resource_extra}
steps:
  - id: schema
    resource: inventory
    sql: CREATE TABLE IF NOT EXISTS items (sku TEXT PRIMARY KEY, qty INT NOT NULL)
  - id: {step_id}
    {step_action}{step_extra}
"""

_BAD_DEFAULTS = {
    "engine": "sqlite",
    "resource_extra": "",
    "step_id": "count",
    "step_action": "resource: inventory\n    sql: SELECT count(*) FROM items",
    "step_extra": "",
}

_MARK = "  # <-"

#: problem -> (values that differ from _BAD_DEFAULTS, the FIELD the error must name)
_BAD_PLANS: dict[str, tuple[dict[str, str], str]] = {
    "unknown key": ({"resource_extra": f"\n    colour: blue{_MARK}"}, "resources.inventory.colour"),
    "bad duration": (
        {"resource_extra": f"\n    checkpoint_ttl: soon{_MARK}"},
        "resources.inventory.checkpoint_ttl",
    ),
    "unknown engine": ({"engine": f"oracle{_MARK}"}, "resources.inventory.engine"),
    "mistyped retry": ({"step_extra": f"\n    retry: lots{_MARK}"}, "steps[1].retry"),
    "unknown tool": ({"step_action": f"tool: shout{_MARK}"}, "steps[1].tool"),
    "unknown resource": (
        {"step_action": f"resource: warehouse{_MARK}\n    sql: SELECT 1"},
        "steps[1].resource",
    ),
    "duplicate step id": ({"step_id": f"schema{_MARK}"}, "steps[1].id"),
    "yaml syntax": ({"step_extra": f"\n\tretry: 1{_MARK}"}, "YAML"),
}


@dataclasses.dataclass(frozen=True)
class CommandResult:
    """What one run of the ``cleveragents`` command did."""

    args: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str


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


def count_open_descriptors() -> int:
    """Return how many file descriptors this process has open (the listing's own excluded)."""
    return len(os.listdir(FD_DIR)) - 1


def _fail(msg: str | None, default: str) -> NoReturn:
    raise AssertionError(msg or default)


def _connect(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open a separate connection that sees only committed data and creates nothing."""
    if not Path(path).is_file():
        raise AssertionError(f"database {str(path)!r} does not exist")
    return sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, isolation_level=None)


def _ledger_plans(path: str | os.PathLike[str]) -> dict[str, int]:
    """Return how many ledger rows each plan has in the database at *path*."""
    with closing(_connect(path)) as conn:
        rows = conn.execute("SELECT plan, count(*) FROM ledger GROUP BY plan").fetchall()
    return dict(rows)


class _Sampler:
    """Samples open descriptors and a handler's open connections on a thread, keeping the peaks."""

    def __init__(self, handler: DatabaseResourceHandler) -> None:
        self._handler = handler
        self._stop = threading.Event()
        self.peak_fds = count_open_descriptors()
        self.peak_connections = handler.stats().open_connections
        self._thread = threading.Thread(target=self._run, name="robot-fd-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self.sample()

    def sample(self) -> None:
        """Take one sample."""
        self.peak_fds = max(self.peak_fds, count_open_descriptors())
        self.peak_connections = max(self.peak_connections, self._handler.stats().open_connections)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


@library(scope="SUITE")
class CleverAgentsLibrary:
    """Keywords that run the ``cleveragents`` command and the database handler end to end.

    Handlers are opened under an alias and never returned, so that dropping
    one (``Drop Handler Without Closing``) really drops the last reference.
    Suite teardown must call ``Close All Handlers``.
    """

    def __init__(self) -> None:
        self._folders: list[Path] = []
        self._handlers: dict[str, DatabaseResourceHandler] = {}
        self._names: dict[str, str] = {}
        self._dropped: dict[str, weakref.ref[DatabaseResourceHandler]] = {}
        self._warnings: dict[str, list[warnings.WarningMessage]] = {}
        self._workloads: dict[str, _Workload] = {}
        self._peak_fds = 0
        self._peak_connections = 0
        self._process: subprocess.Popen[str] | None = None
        self._process_args: tuple[str, ...] = ()

    # -- folders and cleanup --------------------------------------------------------

    @keyword
    def create_temporary_folder(self) -> str:
        """Create an empty folder outside the repository; ``Close All Handlers`` removes it."""
        folder = Path(tempfile.mkdtemp(prefix="cleveragents-robot-")).resolve()
        self._folders.append(folder)
        return str(folder)

    @keyword
    def copy_examples(self) -> str:
        """Copy the example plans (without any database) into a new temporary folder."""
        folder = Path(self.create_temporary_folder()) / "examples"
        shutil.copytree(EXAMPLES, folder, ignore=shutil.ignore_patterns("*.db", "*.db-*", "plugin"))
        return str(folder)

    @keyword
    def close_all_handlers(self) -> None:
        """Close every handler, stop the command it started, and remove its temporary folders."""
        for alias in list(self._handlers):
            self.close_handler(alias)
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.communicate()
        self._process = None
        for folder in self._folders:
            shutil.rmtree(folder, ignore_errors=True)
        self._folders.clear()

    # -- the command ----------------------------------------------------------------

    @keyword
    def run_cleveragents(self, *args: str, cwd: str | None = None, **env: str) -> CommandResult:
        """Run the installed ``cleveragents`` command; named arguments go into its environment."""
        completed = subprocess.run(
            [self._command(), *args],
            cwd=cwd,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        return self._result(args, completed.returncode, completed.stdout, completed.stderr)

    @staticmethod
    def _command() -> str:
        """Return the installed console script, looked up next to this Python first."""
        search = [str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)]
        command = shutil.which("cleveragents", path=os.pathsep.join(search))
        if command is None:
            raise AssertionError("the 'cleveragents' command is not installed next to Python")
        return command

    @staticmethod
    def _result(args: Sequence[str], rc: int, stdout: str, stderr: str) -> CommandResult:
        result = CommandResult(tuple(args), rc, stdout, stderr)
        logger.info(
            f"cleveragents {' '.join(args)}\nexit {rc}\n"
            f"--- stdout ---\n{stdout}--- stderr ---\n{stderr}"
        )
        return result

    @keyword
    def start_cleveragents(self, *args: str, cwd: str | None = None, **env: str) -> None:
        """Start the ``cleveragents`` command in the background, like ``Run Cleveragents``."""
        if self._process is not None and self._process.poll() is None:
            raise ValueError("a cleveragents command started earlier is still running")
        self._process = subprocess.Popen(
            [self._command(), *args],
            cwd=cwd,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._process_args = tuple(args)
        logger.info(f"started cleveragents {' '.join(args)} (pid {self._process.pid})")

    @keyword
    def send_signal_to_cleveragents(self, signal_name: str) -> None:
        """Send the signal *signal_name* (e.g. ``SIGTERM``) to the background command."""
        process = self._started()
        process.send_signal(signal.Signals[signal_name])

    @keyword
    def wait_for_cleveragents(self, timeout: float = COMMAND_TIMEOUT) -> CommandResult:
        """Wait for the background command to exit; fail (and kill it) if it outlives *timeout*."""
        process = self._started()
        try:
            stdout, stderr = process.communicate(timeout=float(timeout))
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise AssertionError(
                f"'cleveragents {' '.join(self._process_args)}' was still running after "
                f"{timeout}s; it was killed"
            ) from None
        return self._result(self._process_args, process.returncode, stdout, stderr)

    def _started(self) -> subprocess.Popen[str]:
        if self._process is None:
            raise ValueError("no cleveragents command was started")
        return self._process

    @keyword
    def wait_until_file_contains(
        self, path: str, text: str, timeout: float = 30.0, msg: str | None = None
    ) -> None:
        """Wait until the file at *path* contains *text*; fail after *timeout* seconds."""
        deadline = time.monotonic() + float(timeout)
        while True:
            # Looked at before reading: once the command has ended, one last read decides.
            ended = self._process is not None and self._process.poll() is not None
            if Path(path).is_file() and text in Path(path).read_text(encoding="utf-8"):
                return
            if ended or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        _fail(msg, f"{path!r} does not contain {text!r}")

    @keyword
    def exit_code_should_be(
        self, result: CommandResult, expected: int, msg: str | None = None
    ) -> None:
        """Fail unless the command exited with *expected*."""
        if result.rc != int(expected):
            _fail(
                msg,
                f"'cleveragents {' '.join(result.args)}' exited {result.rc}, expected {expected}; "
                f"stderr: {result.stderr.strip()!r}",
            )

    @keyword
    def output_should_contain(
        self, result: CommandResult, text: str, stream: str = "stdout", msg: str | None = None
    ) -> None:
        """Fail unless *stream* (``stdout`` or ``stderr``) contains *text*."""
        output = self._stream(result, stream)
        if text not in output:
            _fail(msg, f"{stream} does not contain {text!r}: {output!r}")

    @keyword
    def output_should_not_contain(
        self, result: CommandResult, text: str, stream: str = "stderr", msg: str | None = None
    ) -> None:
        """Fail if *stream* (``stdout`` or ``stderr``) contains *text*."""
        output = self._stream(result, stream)
        if text in output:
            _fail(msg, f"{stream} contains {text!r}: {output!r}")

    @staticmethod
    def _stream(result: CommandResult, stream: str) -> str:
        if stream not in ("stdout", "stderr"):
            raise ValueError(f"stream must be 'stdout' or 'stderr', got {stream!r}")
        return result.stdout if stream == "stdout" else result.stderr

    @keyword
    def parse_json_output(self, result: CommandResult) -> Any:
        """Return the command's stdout parsed as one JSON document; fail if it is not one."""
        try:
            return json.loads(result.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"stdout is not valid JSON ({exc}): {result.stdout!r}") from None

    @keyword
    def parse_json_lines(self, result: CommandResult) -> list[dict[str, Any]]:
        """Return one JSON object per stdout line; fail on any line that is not one."""
        records = []
        for number, line in enumerate(result.stdout.splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AssertionError(
                    f"stdout line {number} is not JSON ({exc}): {line!r}"
                ) from None
            if not isinstance(record, dict):
                raise AssertionError(f"stdout line {number} is not a JSON object: {line!r}")
            records.append(record)
        return records

    @keyword
    def plan_result_should_be(
        self,
        records: Sequence[dict[str, Any]],
        plan: str,
        status: str,
        failed_step: str | None = None,
        msg: str | None = None,
    ) -> None:
        """Fail unless one full JSON record says *plan* ended *status* at *failed_step*."""
        found = [record for record in records if record.get("plan") == plan]
        if len(found) != 1:
            _fail(msg, f"expected one JSON record for plan {plan!r}, found {len(found)}")
        record = found[0]
        missing = {"plan", "status", "failed_step", "error", "steps"} - set(record)
        if missing:
            _fail(msg, f"plan {plan!r}: JSON record lacks {sorted(missing)}: {record}")
        if (record["status"], record["failed_step"]) != (status, failed_step):
            _fail(
                msg,
                f"plan {plan!r}: status {record['status']!r}, failed_step "
                f"{record['failed_step']!r}; expected {status!r}, {failed_step!r}",
            )
        if (record["error"] is None) != (status == "completed"):
            _fail(msg, f"plan {plan!r} is {status} but its error is {record['error']!r}")
        for step in record["steps"]:
            lacking = {"id", "status", "attempts", "duration_ms"} - set(step)
            if lacking:
                _fail(msg, f"plan {plan!r}: step record lacks {sorted(lacking)}: {step}")
            if not isinstance(step["attempts"], int) or not isinstance(
                step["duration_ms"], int | float
            ):
                _fail(msg, f"plan {plan!r}: step attempts/duration_ms are not numbers: {step}")
        if failed_step is not None:
            failed = [step["id"] for step in record["steps"] if step["status"] == "failed"]
            if failed != [failed_step]:
                _fail(msg, f"plan {plan!r}: failed steps {failed}, expected [{failed_step!r}]")

    # -- plan files -----------------------------------------------------------------

    @keyword
    def write_ledger_plan(
        self, folder: str, plan_id: str, location: str = "ledger.db", fail: bool = False
    ) -> str:
        """Write a plan adding three ledger rows for *plan_id*; with *fail*, its last step fails."""
        text = _LEDGER_PLAN.format(
            plan_id=plan_id,
            location=location,
            schema=LEDGER_SCHEMA,
            rows=3,
            outcome="then fails its check" if fail else "committed",
            expected=99 if fail else 3,
        )
        path = Path(folder) / f"{plan_id}.yaml"
        path.write_text(text, encoding="utf-8")
        return str(path)

    @keyword
    def write_slow_plan(self, folder: str, location: str = "ledger.db") -> str:
        """Write plan ``slow``: one ledger row, then a statement that would run for minutes."""
        path = Path(folder) / "slow.yaml"
        path.write_text(_SLOW_PLAN.format(location=location), encoding="utf-8")
        return str(path)

    @keyword
    def write_ledger_plans(
        self, folder: str, count: int, fail_every: int, location: str = "ledger.db"
    ) -> dict[str, Any]:
        """Write *count* ledger plans sharing one database; every *fail_every*-th one fails."""
        plans: dict[str, Any] = {"paths": [], "committed": [], "failed": []}
        for index in range(1, int(count) + 1):
            plan_id = f"ledger-{index:02d}"
            fail = index % int(fail_every) == 0
            plans["paths"].append(self.write_ledger_plan(folder, plan_id, location, fail))
            plans["failed" if fail else "committed"].append(plan_id)
        plans["database"] = str(Path(folder) / location)
        return plans

    @keyword
    def write_bad_plans(self, folder: str) -> list[dict[str, Any]]:
        """Write one plan per kind of bad input; return their paths, problem lines and fields."""
        written = []
        for index, (problem, (values, field)) in enumerate(_BAD_PLANS.items(), 1):
            name = f"bad-{index}"
            text = _BAD_BASE.format(name=name, **{**_BAD_DEFAULTS, **values})
            line = next(n for n, part in enumerate(text.splitlines(), 1) if part.endswith(_MARK))
            path = Path(folder) / f"{name}.yaml"
            path.write_text(text.replace(_MARK, ""), encoding="utf-8")
            written.append(
                {
                    "problem": problem,
                    "path": str(path),
                    "line": line,
                    "field": field,
                    "database": str(Path(folder) / f"{name}.db"),
                }
            )
        return written

    @keyword
    def stderr_should_report_problem(
        self, result: CommandResult, path: str, line: int, field: str, msg: str | None = None
    ) -> None:
        """Fail unless stderr has a ``PATH:LINE: FIELD: problem`` line for this problem."""
        pattern = re.compile(rf"^{re.escape(path)}:{int(line)}: {re.escape(field)}: \S")
        if not any(pattern.match(text) for text in result.stderr.splitlines()):
            _fail(msg, f"stderr has no line '{path}:{line}: {field}: ...': {result.stderr!r}")

    @keyword
    def every_stderr_line_should_name_a_plan_file(
        self, result: CommandResult, msg: str | None = None
    ) -> None:
        """Fail unless stderr is non-empty and every line starts ``PATH.yaml:LINE: ``."""
        lines = result.stderr.splitlines()
        pattern = re.compile(r"^\S+\.yaml:\d+: \S")
        strays = [text for text in lines if not pattern.match(text)]
        if not lines or strays:
            _fail(msg, f"stderr lines not of the form 'PATH:LINE: ...': {strays or lines!r}")

    # -- databases, read through a separate connection ----------------------------

    @keyword
    def dump_database(self, path: str) -> list[str]:
        """Return a full SQL dump of the database at *path*."""
        with closing(_connect(path)) as conn:
            return list(conn.iterdump())

    @keyword
    def dumps_should_be_equal(
        self, before: Sequence[str], after: Sequence[str], msg: str | None = None
    ) -> None:
        """Fail unless two database dumps are identical, showing the difference."""
        if list(before) != list(after):
            diff = "\n".join(difflib.unified_diff(before, after, "before", "after", lineterm=""))
            _fail(msg, f"the database changed:\n{diff}")

    @keyword
    def query_value_should_be(
        self, path: str, sql: str, expected: str, msg: str | None = None
    ) -> None:
        """Fail unless *sql* returns one row whose one value, as text, is *expected*."""
        with closing(_connect(path)) as conn:
            rows = conn.execute(sql).fetchall()
        if len(rows) != 1 or len(rows[0]) != 1:
            _fail(msg, f"{sql!r} returned {rows!r}, not one value")
        if str(rows[0][0]) != str(expected):
            _fail(msg, f"{sql!r} returned {rows[0][0]!r}, expected {expected!r}")

    @keyword
    def table_should_not_exist(self, path: str, table: str, msg: str | None = None) -> None:
        """Fail if the database at *path* has a table called *table*."""
        with closing(_connect(path)) as conn:
            found = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
            ).fetchone()[0]
        if found:
            _fail(msg, f"table {table!r} exists in {path!r}")

    @keyword
    def database_should_not_exist(self, path: str, msg: str | None = None) -> None:
        """Fail if a database file (or its WAL) exists at *path*: nothing touched it."""
        present = [p for p in (path, f"{path}-wal", f"{path}-shm") if Path(p).exists()]
        if present:
            _fail(msg, f"expected no database, found {present}")

    @keyword
    def ledger_should_contain_plans(
        self, path: str, *plans: str, rows: int = 3, msg: str | None = None
    ) -> None:
        """Fail unless every plan in *plans* has exactly *rows* rows in the ledger at *path*."""
        counts = _ledger_plans(path)
        wrong = {plan: counts.get(plan, 0) for plan in plans if counts.get(plan, 0) != int(rows)}
        if wrong or not plans:
            _fail(msg, f"expected {rows} ledger rows for each of {list(plans)}; got {wrong}")

    @keyword
    def ledger_should_not_contain_plans(
        self, path: str, *plans: str, msg: str | None = None
    ) -> None:
        """Fail if any plan in *plans* has a row in the ledger at *path*."""
        counts = _ledger_plans(path)
        present = {plan: counts[plan] for plan in plans if plan in counts}
        if present or not plans:
            _fail(msg, f"expected no ledger rows for {list(plans)}; found {present}")

    @keyword
    def create_ledger_database(self, folder: str) -> str:
        """Create ``ledger.db`` with an empty ledger table in *folder* and return its path."""
        path = Path(folder) / "ledger.db"
        with closing(sqlite3.connect(path, isolation_level=None)) as conn:
            conn.execute(LEDGER_SCHEMA)
        return str(path)

    # -- handlers through the Python API -----------------------------------------

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
        writer = Resource("ledger", "database", engine="sqlite", location=database)
        reader = Resource("ledger", "database", engine="sqlite", location=database, lock="deferred")
        work = _Workload(database)
        self._workloads[alias] = work
        indexes = iter(range(int(plans)))
        take = threading.Lock()
        errors: list[BaseException] = []

        def one_plan(index: int) -> None:
            plan_id = f"plan-{index:05d}"
            if index % int(forget_every) == int(forget_every) - 1:
                if (index // int(forget_every)) % 2 == 0:
                    handler.create_checkpoint(writer, plan_id, "start")
                    handler.execute(
                        writer, plan_id, "INSERT INTO ledger VALUES (?, 'forgotten')", [plan_id]
                    )
                    work.forgotten_writers.append(plan_id)
                else:
                    handler.create_checkpoint(reader, plan_id, "look")
                    handler.execute(reader, plan_id, "SELECT count(*) FROM ledger")
                    work.forgotten_readers.append(plan_id)
                return
            handler.create_checkpoint(writer, plan_id, "start")
            with handler.connection(writer, plan_id) as conn:
                conn.execute("INSERT INTO ledger VALUES (?, 'kept')", (plan_id,))
            if index % int(rollback_every) == 1:
                handler.rollback_plan(plan_id)
                work.rolled_back.append(plan_id)
                return
            if index % 3 == 0:
                handler.create_checkpoint(writer, plan_id, "scratch")
                handler.execute(
                    writer, plan_id, "INSERT INTO ledger VALUES (?, 'scratch')", [plan_id]
                )
                handler.rollback_to(writer, plan_id, "scratch")
            handler.release_plan(plan_id)
            work.committed.append(plan_id)

        def worker() -> None:
            while not errors:
                with take:
                    index = next(indexes, None)
                if index is None:
                    return
                try:
                    one_plan(index)
                except Exception as exc:  # reported below, with the first one chained
                    errors.append(exc)

        pool = [
            threading.Thread(target=worker, name=f"robot-workload-{n}") for n in range(int(threads))
        ]
        with self._sampling(handler):
            for thread in pool:
                thread.start()
            deadline = time.monotonic() + WORKLOAD_TIMEOUT
            for thread in pool:
                thread.join(max(0.0, deadline - time.monotonic()))
        work.ended_at = time.monotonic()
        if any(thread.is_alive() for thread in pool):
            raise AssertionError(f"the workload did not finish within {WORKLOAD_TIMEOUT:g}s")
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
            yield sampler
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
            _fail(
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
        with closing(_connect(work.database)) as conn:
            rows = conn.execute("SELECT plan, step FROM ledger").fetchall()
        found = sorted(rows)
        expected = sorted((plan, "kept") for plan in work.committed)
        if found != expected:
            unexpected = sorted(set(found) - set(expected))[:10]
            missing = sorted(set(expected) - set(found))[:10]
            _fail(
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
            _fail(msg, f"stats()[{name!r}] is {stats[name]}, expected {expected}: {stats}")

    @keyword
    def forgotten_plans_should_raise_expired_once(self, alias: str, msg: str | None = None) -> None:
        """Fail unless each forgotten plan's next call raises ``CheckpointExpiredError``, once."""
        handler = self._handler(alias)
        for plan_id in self._workloads[alias].forgotten:
            try:
                handler.release_plan(plan_id)
            except CheckpointExpiredError as exc:
                if exc.plan_id != plan_id or type(exc) is not CheckpointExpiredError:
                    _fail(msg, f"release_plan({plan_id!r}) raised {exc!r}")
            else:
                _fail(msg, f"release_plan({plan_id!r}) of a reaped plan raised nothing")
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
        _fail(msg, "create_checkpoint on a closed handler raised nothing")

    @keyword
    def leave_plans_open(self, alias: str, database: str, committed: int, readers: int) -> None:
        """Commit *committed* plans, then leave a writer and *readers* readers open."""
        handler = self._handler(alias)
        writer = Resource("ledger", "database", engine="sqlite", location=database)
        reader = Resource("ledger", "database", engine="sqlite", location=database, lock="deferred")
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
            _fail(msg, f"handler {alias!r} is still alive, held by {referrers}")
        name = self._names[alias]
        found = [
            w
            for w in self._warnings[alias]
            if issubclass(w.category, ResourceWarning) and repr(name) in str(w.message)
        ]
        if len(found) != 1:
            shown = [f"{w.category.__name__}: {w.message}" for w in self._warnings[alias]]
            _fail(msg, f"expected one ResourceWarning naming {name!r}; got {shown}")
        logger.info(f"collected: {found[0].message}")

    # -- descriptors and threads -----------------------------------------------------

    @keyword
    def count_open_descriptors(self) -> int:
        """Return how many file descriptors the robot process has open now."""
        count = count_open_descriptors()
        logger.info(f"{count} file descriptors open")
        return count

    @keyword
    def open_descriptors_should_be(self, expected: int, msg: str | None = None) -> None:
        """Fail unless exactly *expected* file descriptors are open."""
        count = count_open_descriptors()
        if count != int(expected):
            _fail(msg, f"{count} file descriptors open, expected {expected}: {self._fds()}")

    @keyword
    def open_descriptors_should_be_above(self, limit: int, msg: str | None = None) -> None:
        """Fail unless more than *limit* file descriptors are open."""
        count = count_open_descriptors()
        if count <= int(limit):
            _fail(msg, f"{count} file descriptors open, expected more than {limit}")

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
            _fail(msg, f"up to {self._peak_fds} file descriptors were open, limit {limit}")

    @keyword
    def peak_open_connections_should_be_at_most(self, limit: int, msg: str | None = None) -> None:
        """Fail if ``stats().open_connections`` was ever seen above *limit* while sampling."""
        if self._peak_connections > int(limit):
            _fail(msg, f"up to {self._peak_connections} connections were open, limit {limit}")

    def _reaper_threads(self, alias: str) -> list[threading.Thread]:
        name = f"cleveragents-reaper[{self._names[alias]}]"
        return [thread for thread in threading.enumerate() if thread.name == name]

    @keyword
    def reaper_thread_should_be_running(self, alias: str, msg: str | None = None) -> None:
        """Fail unless exactly one live reaper thread belongs to the handler *alias*."""
        found = self._reaper_threads(alias)
        if len(found) != 1 or not found[0].daemon:
            _fail(msg, f"expected one daemon reaper thread for {alias!r}, found {found}")

    @keyword
    def no_reaper_thread_should_be_left(self, alias: str, msg: str | None = None) -> None:
        """Fail if a reaper thread of the handler *alias* is still alive."""
        found = self._reaper_threads(alias)
        if found:
            _fail(msg, f"reaper threads of {alias!r} still alive: {found}")


__all__ = ["CleverAgentsLibrary", "CommandResult", "count_open_descriptors"]
