"""The handler against raw sqlite3 doing the same statements on one connection.

Run it from the repository with the package installed::

    .venv/bin/python benchmarks/bench_sqlite.py            # a table for people
    .venv/bin/python benchmarks/bench_sqlite.py --json     # one JSON object

Every case runs the same SQL both ways, in the same process, on the same WAL
database: raw sqlite3 on one connection opened with the handler's settings,
and the handler on its pooled connection. The two alternate plan by plan (who
goes first alternates too); a round sums each side's time over its plans, a
case's time per plan is the median over the rounds, and its ratio is
handler / raw. The naive cases
open a new connection for every checkpoint, as the design the handler
replaces did, and are compared with the handler doing the same work: plans
with one checkpoint, a plan of five steps (a checkpoint and an INSERT each),
and ten checkpoints without writes.

Not run in CI: timings on a shared machine are noisy. Read the ratios, not
the microseconds, and run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler

INSERT = "INSERT INTO t (v) VALUES (?)"
SAVEPOINT = 'SAVEPOINT "cp_1"'  # what the handler names a plan's first checkpoint


@dataclass(frozen=True)
class Case:
    """One row of the table: what is timed, and the ratio it should meet."""

    key: str
    title: str
    synchronous: str
    raw: Callable[[sqlite3.Connection, str], None]
    handler: Callable[[DatabaseResourceHandler, Resource, str], None]
    target: float
    #: "at most": handler / raw <= target; "at least": raw / handler >= target (naive case).
    bound: str = "at most"


# -- the same work, both ways: one plan each --------------------------------------------


def raw_empty(conn: sqlite3.Connection, plan_id: str) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(SAVEPOINT)
    conn.execute("COMMIT")


def handler_empty(handler: DatabaseResourceHandler, res: Resource, plan_id: str) -> None:
    handler.create_checkpoint(res, plan_id, "start")
    handler.release_plan(plan_id)


def raw_insert(end: str) -> Callable[[sqlite3.Connection, str], None]:
    def run(conn: sqlite3.Connection, plan_id: str) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(SAVEPOINT)
        conn.execute(INSERT, (plan_id,))
        conn.execute(end)

    return run


def handler_insert(commit: bool) -> Callable[[DatabaseResourceHandler, Resource, str], None]:
    def run(handler: DatabaseResourceHandler, res: Resource, plan_id: str) -> None:
        handler.create_checkpoint(res, plan_id, "start")
        with handler.connection(res, plan_id) as conn:
            conn.execute(INSERT, (plan_id,))
        (handler.release_plan if commit else handler.rollback_plan)(plan_id)

    return run


def handler_ten(handler: DatabaseResourceHandler, res: Resource, plan_id: str) -> None:
    for label in CHECKPOINTS:
        handler.create_checkpoint(res, plan_id, label)
    handler.release_plan(plan_id)


def handler_steps(handler: DatabaseResourceHandler, res: Resource, plan_id: str) -> None:
    """A plan of STEPS steps: a checkpoint before each, one INSERT each, committed at the end."""
    for label in CHECKPOINTS[:STEPS]:
        handler.create_checkpoint(res, plan_id, label)
        with handler.connection(res, plan_id) as conn:
            conn.execute(INSERT, (plan_id,))
    handler.release_plan(plan_id)


def naive_connection(conn: sqlite3.Connection) -> sqlite3.Connection:
    """A new connection to the raw connection's database, set up as the handler sets up its own.

    The per-connection pragmas only: the journal mode is a property of the
    file, which the handler, too, sets once per file.
    """
    path, synchronous = NAIVE_TARGET[id(conn)]
    fresh = sqlite3.connect(path, timeout=5, isolation_level=None, check_same_thread=False)
    fresh.execute(f"PRAGMA synchronous = {synchronous}")
    fresh.execute("PRAGMA foreign_keys = ON")
    return fresh


def naive_ten(conn: sqlite3.Connection, plan_id: str) -> None:
    """Ten checkpoints, each its own connection (a savepoint each, kept until the end)."""
    opened = []
    for label in CHECKPOINTS:
        fresh = naive_connection(conn)
        fresh.execute(f'SAVEPOINT "{label}"')
        opened.append((label, fresh))
    for label, fresh in opened:
        fresh.execute(f'RELEASE "{label}"')
        fresh.close()


def naive_steps(conn: sqlite3.Connection, plan_id: str) -> None:
    """The STEPS steps of handler_steps, each checkpoint its own new connection.

    SQLite admits one writer at a time, so a step's connection cannot keep its
    transaction open while the next step's connection writes: each step
    commits and closes before the next one opens (and the plan is no longer
    atomic, which is the handler's whole point; only the cost is compared).
    """
    for label in CHECKPOINTS[:STEPS]:
        fresh = naive_connection(conn)
        fresh.execute("BEGIN IMMEDIATE")
        fresh.execute(f'SAVEPOINT "{label}"')
        fresh.execute(INSERT, (plan_id,))
        fresh.execute("COMMIT")
        fresh.close()


CHECKPOINTS = [f"cp_{i}" for i in range(1, 11)]
STEPS = 5


def naive(work: str) -> Callable[[sqlite3.Connection, str], None]:
    """A new connection for the plan's one checkpoint."""

    def run(conn: sqlite3.Connection, plan_id: str) -> None:
        fresh = naive_connection(conn)
        fresh.execute("BEGIN IMMEDIATE")
        fresh.execute(SAVEPOINT)
        if work == "insert":
            fresh.execute(INSERT, (plan_id,))
        fresh.execute("COMMIT")
        fresh.close()

    return run


#: For the naive case: the database and setting of the raw connection it stands in for.
NAIVE_TARGET: dict[int, tuple[str, str]] = {}

CASES = [
    Case("a", "empty plan, one checkpoint, committed", "normal", raw_empty, handler_empty, 4.0),
    Case("a", "empty plan, one checkpoint, committed", "full", raw_empty, handler_empty, 4.0),
    Case(
        "b", "one checkpoint + one INSERT, committed", "normal",
        raw_insert("COMMIT"), handler_insert(True), 2.0,
    ),
    Case(
        "b", "one checkpoint + one INSERT, committed", "full",
        raw_insert("COMMIT"), handler_insert(True), 1.2,
    ),
    Case(
        "c", "one checkpoint + one INSERT, rolled back", "normal",
        raw_insert("ROLLBACK"), handler_insert(False), 2.0,
    ),
    Case(
        "c", "one checkpoint + one INSERT, rolled back", "full",
        raw_insert("ROLLBACK"), handler_insert(False), 1.2,
    ),
    Case(
        "d", "naive: new connection per checkpoint, empty plan (vs a)", "normal",
        naive("empty"), handler_empty, 10.0, "at least",
    ),
    Case(
        "d", "naive: new connection per checkpoint, + INSERT (vs b)", "normal",
        naive("insert"), handler_insert(True), 10.0, "at least",
    ),
    Case(
        "d", f"naive: new connection per checkpoint, {STEPS} steps (checkpoint + INSERT each)",
        "normal", naive_steps, handler_steps, 10.0, "at least",
    ),
    Case(
        "d", "naive: new connection per checkpoint, 10 checkpoints, no writes", "normal",
        naive_ten, handler_ten, 10.0, "at least",
    ),
]  # fmt: skip


# -- measuring ------------------------------------------------------------------------------


@contextmanager
def database(folder: str | None) -> Iterator[Path]:
    """A fresh WAL database with table t, in *folder* or a temporary one."""
    with tempfile.TemporaryDirectory(prefix="cleveragents-bench-", dir=folder) as tmp:
        path = Path(tmp, "bench.db")
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode = wal")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        conn.close()
        yield path


def raw_connection(path: Path, synchronous: str) -> sqlite3.Connection:
    """One connection with the handler's settings (see SQLiteEngine.open)."""
    conn = sqlite3.connect(path, timeout=5, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA journal_mode = wal")
    return conn


def measure(path: Path, rounds: int, ops: dict[str, int]) -> list[dict[str, Any]]:
    """Time every case, raw and handler alternating plan by plan; one result per case.

    Alternating every plan gives both sides the same share of what SQLite does
    now and then (WAL checkpoints, the WAL file growing), which batch-by-batch
    timing would hand to one side or the other.
    """
    rows = []
    clock = time.perf_counter_ns
    with DatabaseResourceHandler() as handler:
        for number, case in enumerate(CASES):
            n = ops[case.synchronous] if case.key != "d" else ops["naive"]
            raw = raw_connection(path, case.synchronous)
            NAIVE_TARGET[id(raw)] = (str(path), case.synchronous)
            res = Resource("bench", "database", location=str(path), synchronous=case.synchronous)
            for i in range(20):  # warm up: the pooled connection, statement caches, the WAL
                case.handler(handler, res, f"warm-{number}-{i}")
                case.raw(raw, f"warm-{number}-{i}")
            raw_times: list[float] = []
            handler_times: list[float] = []
            for round_ in range(rounds):
                gc.collect()
                raw_ns = handler_ns = 0
                for i in range(n):
                    plan_id = f"{case.key}-{number}-{round_}-{i}"
                    first_raw = (i + round_) % 2 == 0
                    if first_raw:
                        started = clock()
                        case.raw(raw, plan_id)
                        raw_ns += clock() - started
                    started = clock()
                    case.handler(handler, res, plan_id)
                    handler_ns += clock() - started
                    if not first_raw:
                        started = clock()
                        case.raw(raw, plan_id)
                        raw_ns += clock() - started
                raw_times.append(raw_ns / n / 1000)
                handler_times.append(handler_ns / n / 1000)
            del NAIVE_TARGET[id(raw)]
            raw.close()
            raw_us = statistics.median(raw_times)
            handler_us = statistics.median(handler_times)
            if case.bound == "at most":
                ratio = handler_us / raw_us
                ok = ratio <= case.target
            else:
                ratio = raw_us / handler_us
                ok = ratio >= case.target
            rows.append(
                {
                    "case": case.key,
                    "title": case.title,
                    "synchronous": case.synchronous,
                    "plans_per_round": n,
                    "rounds": rounds,
                    "raw_us": round(raw_us, 2),
                    "handler_us": round(handler_us, 2),
                    "ratio": round(ratio, 2),
                    "target": f"{'<=' if case.bound == 'at most' else '>='} {case.target:g}",
                    "meets_target": ok,
                    "raw_rounds_us": [round(t, 2) for t in raw_times],
                    "handler_rounds_us": [round(t, 2) for t in handler_times],
                }
            )
    return rows


def environment() -> dict[str, Any]:
    """Where the numbers come from."""
    return {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "machine": platform.machine(),
        "system": platform.system(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'case':4} {'sync':6} {'raw us':>9} {'handler us':>11} {'ratio':>7} {'target':>7}  what"
    )
    for row in rows:
        raw, ours = row["raw_us"], row["handler_us"]
        if row["case"] == "d":
            label_raw, label_ours = f"{raw:9.1f}", f"{ours:11.1f}"
            what = f"{row['title']} (naive us / handler us)"
        else:
            label_raw, label_ours, what = f"{raw:9.1f}", f"{ours:11.1f}", row["title"]
        mark = "" if row["meets_target"] else "  MISSED"
        print(
            f"{row['case']:4} {row['synchronous']:6} {label_raw} {label_ours} "
            f"{row['ratio']:6.2f}x {row['target']:>7}  {what}{mark}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds per case (median of them)")
    parser.add_argument(
        "--ops", type=int, default=2000, help="plans per batch at synchronous=normal"
    )
    parser.add_argument("--full-ops", type=int, default=200, help="plans per batch at full")
    parser.add_argument("--naive-ops", type=int, default=300, help="plans per naive batch")
    parser.add_argument("--dir", default=None, help="folder for the database (default: temp)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.rounds < 5:
        parser.error("--rounds must be at least 5")
    ops = {"normal": args.ops, "full": args.full_ops, "naive": args.naive_ops}
    with database(args.dir) as path:
        rows = measure(path, args.rounds, ops)
    if args.json:
        print(json.dumps({"environment": environment(), "results": rows}, indent=2))
    else:
        env = environment()
        print(
            f"Python {env['python']}, SQLite {env['sqlite']}, {env['cpus']} CPUs, "
            f"load {env['load_average']}; median of {args.rounds} rounds"
        )
        print_table(rows)
    return 0 if all(row["meets_target"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
