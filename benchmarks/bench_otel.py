"""What OpenTelemetry costs a plan: off (not importable), the API with no SDK, and the SDK.

Run it from the repository with the package and ``cleveragents[otel]`` installed
(the ``sdk`` case also needs ``opentelemetry-sdk``)::

    .venv/bin/python benchmarks/bench_otel.py            # a table for people
    .venv/bin/python benchmarks/bench_otel.py --json     # one JSON object

Each case runs in its own process, on its own fresh SQLite file (WAL,
``synchronous=normal``): a loop of one-row plans (a checkpoint, one INSERT, a
commit) through one handler. A process times three rounds and keeps the best
round's time per plan. The cases run in turns, five times, the order reversed
every other turn; a ratio is the median over the five turns of case / off.

Time is the process's CPU time (user + system), which other processes on a
busy machine do not inflate, and the loop never waits (WAL with
``synchronous=normal`` does not sync at commit); wall-clock figures are
reported beside it.

- ``off``: ``opentelemetry`` cannot be imported (an import hook refuses it),
  so the handler records nothing and imports none of it;
- ``api``: the API imports, no SDK is configured: what every user who has the
  API installed pays (DESIGN.md section 11: at most 10 % over ``off``);
- ``sdk``: the SDK's tracer and meter providers are set globally, with a
  span processor that drops what it is given and a metric reader nobody
  reads: recording itself, without any export.

Not run in CI: timings on a shared machine are noisy. Read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CASES = ("off", "api", "sdk")
TURNS = 5
ROUNDS = 3
BUDGET = 1.10  # DESIGN.md section 11: api / off at most this (aim: 1.05)


class _Refuse:
    """An import hook that makes ``opentelemetry`` unimportable, as if it were not installed."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ImportError(f"{name} is hidden for the 'off' case")


def _configure_sdk() -> None:
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

    class Drop(SpanProcessor):
        """Receives every ended span and keeps none."""

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(Drop())
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))


def child(case: str, plans: int, folder: str) -> dict[str, Any]:
    """Time *plans* one-row plans, best of ROUNDS rounds, in this process; return the figures."""
    if case == "off":
        sys.meta_path.insert(0, _Refuse())
    elif case == "sdk":
        _configure_sdk()
    from cleveragents.resource import Resource
    from cleveragents.resource.handlers.database import DatabaseResourceHandler

    resource = Resource(
        "bench",
        "database",
        engine="sqlite",
        location=os.path.join(folder, f"{case}.db"),
        synchronous="normal",
    )
    cpu: list[float] = []
    wall: list[float] = []
    with DatabaseResourceHandler() as handler:
        handler.execute(resource, "schema", "CREATE TABLE IF NOT EXISTS t (n INTEGER)")
        handler.release_plan("schema")
        for _ in range(ROUNDS):
            started, started_cpu = time.perf_counter(), time.process_time()
            for n in range(plans):
                plan_id = f"plan-{n}"
                handler.create_checkpoint(resource, plan_id, "start")
                handler.execute(resource, plan_id, "INSERT INTO t (n) VALUES (?)", (n,))
                handler.release_plan(plan_id)
            cpu.append((time.process_time() - started_cpu) / plans)
            wall.append((time.perf_counter() - started) / plans)
    return {
        "case": case,
        "cpu_us": min(cpu) * 1e6,
        "wall_us": min(wall) * 1e6,
        "opentelemetry_imported": any(name.startswith("opentelemetry") for name in sys.modules),
    }


def _run_child(case: str, plans: int, folder: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", case, "--plans", str(plans), "--folder", str(folder)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def measure(plans: int) -> dict[str, Any]:
    """Run every case TURNS times in alternating order; return times and median ratios."""
    runs: dict[str, dict[str, list[float]]] = {
        clock: {case: [] for case in CASES} for clock in ("cpu_us", "wall_us")
    }
    imported: dict[str, bool] = {}
    for turn in range(TURNS):
        order = CASES if turn % 2 == 0 else tuple(reversed(CASES))
        with tempfile.TemporaryDirectory(prefix="bench-otel-") as folder:
            for case in order:
                result = _run_child(case, plans, Path(folder))
                for clock, per_case in runs.items():
                    per_case[case].append(result[clock])
                imported[case] = result["opentelemetry_imported"]

    def ratios(per_case: dict[str, list[float]]) -> dict[str, float]:
        return {
            case: statistics.median(
                mine / off for mine, off in zip(per_case[case], per_case["off"], strict=True)
            )
            for case in CASES
            if case != "off"
        }

    cpu, wall = ratios(runs["cpu_us"]), ratios(runs["wall_us"])
    return {
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "plans_per_round": plans,
        "rounds": ROUNDS,
        "turns": TURNS,
        "cpu_us": {case: statistics.median(times) for case, times in runs["cpu_us"].items()},
        "wall_us": {case: statistics.median(times) for case, times in runs["wall_us"].items()},
        "runs": runs,
        "ratio_to_off": cpu,
        "wall_ratio_to_off": wall,
        "opentelemetry_imported": imported,
        "budget": BUDGET,
        "within_budget": cpu["api"] <= BUDGET,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=int, default=5000, help="plans per round (5000)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.plans, args.folder)))
        return 0
    report = measure(args.plans)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"one-row plans, SQLite WAL synchronous=normal, {report['machine']}")
    print(f"best of {ROUNDS} rounds of {args.plans} plans per run, median of {TURNS} turns")
    print(f"{'case':<6} {'CPU µs/plan':>12} {'ratio':>7} {'wall µs/plan':>13} {'ratio':>7}")
    for case in CASES:
        print(
            f"{case:<6} {report['cpu_us'][case]:>12.2f} "
            f"{report['ratio_to_off'].get(case, 1.0):>7.3f} "
            f"{report['wall_us'][case]:>13.2f} {report['wall_ratio_to_off'].get(case, 1.0):>7.3f}"
        )
    verdict = "within" if report["within_budget"] else "OVER"
    print(
        f"api / off = {report['ratio_to_off']['api']:.3f} (CPU): {verdict} the budget of {BUDGET}"
    )
    return 0 if report["within_budget"] else 1


if __name__ == "__main__":
    sys.exit(main())
