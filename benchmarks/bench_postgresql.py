"""The handler against raw psycopg, same statements, same server, same run.

Each plan writes one row in its own transaction. The handler runs the INSERT
through ``DatabaseResourceHandler.execute`` and ``release_plan``; on the wire
that is ``BEGIN; SET LOCAL application_name = '...'`` (one round trip: the
contract names the plan in ``pg_stat_activity``), the INSERT, and ``COMMIT``.
Raw psycopg runs on one autocommit connection, twice: sending exactly those
statements ("same SQL"), and without the ``SET LOCAL`` ("bare": the fastest
correct plan by hand). The difference between the two ratios is the price of
naming the plan; the rest is the handler's own work (pool, plan bookkeeping,
reaper deadline). A second set adds a checkpoint (``SAVEPOINT``) before the
write. Rounds are short and alternate the three (in a rotating order), so a
noisy machine slows them alike; a ratio is the median of the per-round ratios.

Usage::

    eval "$(scripts/pg-test-server start)"
    .venv/bin/python benchmarks/bench_postgresql.py [--plans 300] [--rounds 21] [--json]

The DSN comes from ``--dsn`` or ``CLEVERAGENTS_TEST_PG_DSN``; the benchmark
works in a schema of its own and drops it afterwards. Target: the handler at
0.8x of raw psycopg's throughput or better.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg

from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler

INSERT_RAW = "INSERT INTO bench (plan, v) VALUES (%(plan)s, %(v)s)"
INSERT_PLAN = "INSERT INTO bench (plan, v) VALUES (:plan, :v)"


def raw_plans(conn: Any, count: int, *, checkpoint: bool, name_plans: bool = False) -> None:
    """Run *count* one-row plans by hand on one psycopg connection."""
    for n in range(count):
        if name_plans:
            conn.execute(f"BEGIN; SET LOCAL application_name = E'cleveragents[0]:raw-{n}'")
        else:
            conn.execute("BEGIN")
        if checkpoint:
            conn.execute('SAVEPOINT "cp_1"')
        conn.execute(INSERT_RAW, {"plan": f"raw-{n}", "v": n})
        conn.execute("COMMIT")


def handler_plans(
    handler: DatabaseResourceHandler, resource: Resource, count: int, *, checkpoint: bool
) -> None:
    """Run *count* one-row plans through the handler."""
    for n in range(count):
        plan_id = f"plan-{n}"
        if checkpoint:
            handler.create_checkpoint(resource, plan_id, "before-write")
        handler.execute(resource, plan_id, INSERT_PLAN, {"plan": plan_id, "v": n})
        handler.release_plan(plan_id)


def _timed(action: Callable[[], None], count: int) -> float:
    started = time.perf_counter()
    action()
    return count / (time.perf_counter() - started)


def _ratio(ours: list[float], theirs: list[float]) -> float:
    """Return the median of the per-round ratios of two lists of rates."""
    return round(statistics.median(a / b for a, b in zip(ours, theirs, strict=True)), 3)


def run(dsn: str, plans: int, rounds: int) -> dict[str, Any]:
    """Return plans per second of raw psycopg and of the handler, and their ratios."""
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    scoped = psycopg.conninfo.make_conninfo(dsn, options=f"-c search_path={schema}")
    results: dict[str, Any] = {"plans_per_round": plans, "rounds": rounds}
    try:
        with psycopg.connect(scoped, autocommit=True) as conn:
            conn.execute("CREATE TABLE bench (plan TEXT NOT NULL, v INT NOT NULL)")
            resource = Resource("bench", "database", engine="postgresql", dsn=scoped)
            with DatabaseResourceHandler(max_connections=4) as handler:
                # Warm both up: sessions open, statements prepared.
                raw_plans(conn, 50, checkpoint=True)
                handler_plans(handler, resource, 50, checkpoint=True)
                for checkpoint in (False, True):
                    runs: dict[str, Callable[[], None]] = {
                        "raw_bare": lambda c=checkpoint: raw_plans(conn, plans, checkpoint=c),
                        "raw_same_sql": lambda c=checkpoint: raw_plans(
                            conn, plans, checkpoint=c, name_plans=True
                        ),
                        "handler": lambda c=checkpoint: handler_plans(
                            handler, resource, plans, checkpoint=c
                        ),
                    }
                    rates: dict[str, list[float]] = {name: [] for name in runs}
                    names = list(runs)
                    for round_number in range(rounds):
                        shift = round_number % len(names)
                        for name in names[shift:] + names[:shift]:
                            conn.execute("TRUNCATE bench")
                            rates[name].append(_timed(runs[name], plans))
                            committed = conn.execute("SELECT count(*) FROM bench").fetchone()
                            assert committed == (plans,), committed
                    median = {name: statistics.median(values) for name, values in rates.items()}
                    results["with_checkpoint" if checkpoint else "one_row_plan"] = {
                        **{f"{name}_plans_per_s": round(rate) for name, rate in median.items()},
                        "ratio_same_sql": _ratio(rates["handler"], rates["raw_same_sql"]),
                        "ratio_bare": _ratio(rates["handler"], rates["raw_bare"]),
                    }
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("CLEVERAGENTS_TEST_PG_DSN"))
    parser.add_argument("--plans", type=int, default=300, help="one-row plans per round")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if not args.dsn:
        print(
            "bench_postgresql: no --dsn and no CLEVERAGENTS_TEST_PG_DSN; "
            'start a server with eval "$(scripts/pg-test-server start)"',
            file=sys.stderr,
        )
        return 2
    results = run(args.dsn, args.plans, args.rounds)
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"{args.plans} one-row plans per round, {args.rounds} rounds (medians)")
    for name in ("one_row_plan", "with_checkpoint"):
        row = results[name]
        print(
            f"{name:16} handler {row['handler_plans_per_s']:>6} plans/s | raw same SQL "
            f"{row['raw_same_sql_plans_per_s']:>6} plans/s (ratio {row['ratio_same_sql']:.2f}x) | "
            f"raw bare {row['raw_bare_plans_per_s']:>6} plans/s (ratio {row['ratio_bare']:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
