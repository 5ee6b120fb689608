"""The ``cleveragents`` command: run, validate, plugins, schema, stress."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from types import FrameType
from typing import Any, NoReturn

import click
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cleveragents.durations import parse_duration
from cleveragents.errors import CleverAgentsError, PlanError, PluginError
from cleveragents.plan import Plan, plan_json_schema
from cleveragents.plugins import get_plugin_manager, plugin_source, registries
from cleveragents.resource.handlers.database import DatabaseHandlerSettings
from cleveragents.runtime import PlanResult, Runtime, check_plan_ids

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False, soft_wrap=True)


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """Parse a duration option ('250ms', '5s', '2m' or seconds)."""
    if value is None:
        return None
    try:
        return parse_duration(value.strip())
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _bad_input(lines: Sequence[str]) -> NoReturn:
    for line in lines:
        _err.print(line, markup=False)
    sys.exit(EXIT_BAD_INPUT)


def _check_handler_settings(flags: dict[str, Any]) -> None:
    """Refuse bad handler settings (flags or ``CLEVERAGENTS_*`` variables) before plans run."""
    given = {key: value for key, value in flags.items() if value is not None}
    try:
        DatabaseHandlerSettings(**given)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = str(error["loc"][0])
            source = (
                f"--{field.replace('_', '-')}"
                if field in given
                else f"{DatabaseHandlerSettings.model_config['env_prefix']}{field.upper()}"
            )
            message = str(error["msg"]).removeprefix("Value error, ")
            lines.append(f"cleveragents: {source}: {message}")
        _bad_input(lines)


def _runtime(allow_root: Sequence[str], **handler_options: Any) -> Runtime:
    _check_handler_settings(handler_options)
    try:
        return Runtime(
            handler_options={"database": handler_options}, allowed_roots=list(allow_root)
        )
    except PluginError as exc:
        _bad_input([f"cleveragents: {exc}"])


def _load_all(runtime: Runtime, paths: Sequence[str], *, together: bool = False) -> list[Plan]:
    """Load every plan, or report every problem and exit 2.

    With *together*, the plans are to run in one run, so they need different ids.
    """
    plans: list[Plan] = []
    problems: list[str] = []
    for path in paths:
        try:
            plans.append(runtime.load(path))
        except PlanError as exc:
            problems += [str(problem) for problem in exc.problems]
    if together and not problems:
        try:
            check_plan_ids(plans)
        except PlanError as exc:
            problems += [str(problem) for problem in exc.problems]
    if problems:
        _bad_input(problems)
    return plans


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cleveragents")
def cli() -> None:
    """Run agent plans against databases, each plan in its own transaction."""


_allow_root = click.option(
    "--allow-root",
    multiple=True,
    type=click.Path(file_okay=False),
    help="Also allow database locations under DIR (repeatable).",
)


@cli.command()
@click.argument("plans", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per plan per line.")
@click.option(
    "--parallel",
    default=1,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Run up to N plans at once.",
)
@_allow_root
@click.option(
    "--max-connections",
    type=click.IntRange(1),
    default=None,
    help="Open connections at most [env CLEVERAGENTS_MAX_CONNECTIONS; default 32].",
)
@click.option(
    "--acquire-timeout",
    callback=_duration,
    default=None,
    help="Wait this long for a free connection [default 5s].",
)
@click.option(
    "--idle-timeout",
    callback=_duration,
    default=None,
    help="Close idle connections after this long [default 60s].",
)
@click.option(
    "--on-full",
    type=click.Choice(["wait", "evict_lru"]),
    default=None,
    help="What to do when every connection is busy [default wait].",
)
@click.option(
    "--checkpoint-ttl",
    callback=_duration,
    default=None,
    help="Roll back plans idle this long [default 300s].",
)
def run(
    plans: tuple[str, ...],
    as_json: bool,
    parallel: int,
    allow_root: tuple[str, ...],
    **handler_options: Any,
) -> None:
    """Run PLANS; exit 0 if all completed, 1 if one failed, 2 on bad input (nothing run).

    A failed plan's work is rolled back, unless a commit failed after another
    database's succeeded: its status line then names the databases committed.
    """
    runtime = _runtime(allow_root, **handler_options)
    with runtime:
        loaded = _load_all(runtime, plans, together=True)
        with _signals_interrupt(runtime) as received:
            results = _run_plans(runtime, loaded, parallel, as_json, received)
    for result in results:
        for error in result.subscriber_errors:
            _err.print(f"warning: plan {result.plan!r}: {error}", markup=False)
    if received:
        signum = received[0]
        _err.print(
            f"cleveragents: interrupted by {signal.Signals(signum).name}; open plans were "
            "rolled back",
            markup=False,
        )
        sys.exit(128 + signum)
    sys.exit(EXIT_OK if all(r.completed for r in results) else EXIT_FAILED)


def _run_plans(
    runtime: Runtime,
    plans: Sequence[Plan],
    parallel: int,
    as_json: bool,
    received: Sequence[int] = (),
) -> list[PlanResult]:
    """Run plans on worker threads, keeping the main thread free to take signals."""
    results: dict[int, PlanResult] = {}
    show = _print_json if as_json else _print_table
    with ThreadPoolExecutor(min(parallel, len(plans)), "cleveragents-plan") as pool:
        pending: dict[Future[PlanResult], int] = {
            pool.submit(runtime.run, plan): index for index, plan in enumerate(plans)
        }
        while pending:
            done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            if received:
                # A statement that began just after the signal was not running when
                # it came: interrupt again until every plan has stopped.
                runtime.interrupt(f"interrupted by {signal.Signals(received[0]).name}")
            for future in done:
                index = pending.pop(future)
                results[index] = future.result()
                show(results[index])
    return [results[index] for index in range(len(plans))]


@contextmanager
def _signals_interrupt(runtime: Runtime) -> Iterator[list[int]]:
    """On SIGINT/SIGTERM, interrupt running statements so plans fail and roll back."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        runtime.interrupt(f"interrupted by {signal.Signals(signum).name}")

    previous: dict[int, Callable[..., Any] | int | None] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, on_signal)
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _print_json(result: PlanResult) -> None:
    sys.stdout.write(json.dumps(result.to_json()) + "\n")
    sys.stdout.flush()


_STATUS_STYLE = {"passed": "green", "failed": "bold red", "not run": "dim"}


def _status_line(result: PlanResult) -> str:
    """Say how the plan ended and what became of its work."""
    if result.completed:
        return "completed (committed)"
    if result.outcome == "partial_commit":
        return f"failed (partial commit: committed {', '.join(result.committed)})"
    return "failed (rolled back)"


def _print_table(result: PlanResult) -> None:
    colour = "green" if result.completed else "bold red"
    outcome = escape(_status_line(result))
    title = f"plan {escape(result.plan)}: [{colour}]{outcome}[/]"
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("step")
    table.add_column("status")
    table.add_column("attempts", justify="right")
    table.add_column("time", justify="right")
    for step in result.steps:
        table.add_row(
            escape(step.id),
            f"[{_STATUS_STYLE[step.status]}]{step.status}[/]",
            str(step.attempts),
            f"{step.duration_ms:.1f} ms",
        )
    _out.print(table)
    if result.error:
        _out.print(f"  error: {result.error}", markup=False)


@cli.command()
@click.argument("plans", nargs=-1, required=True, type=click.Path(dir_okay=False))
@_allow_root
def validate(plans: tuple[str, ...], allow_root: tuple[str, ...]) -> None:
    """Check PLANS without touching any resource; exit 0 if all are valid, else 2."""
    runtime = _runtime(allow_root)
    with runtime:
        for plan in _load_all(runtime, plans):
            _out.print(f"{plan.source}: ok ({len(plan.steps)} steps)", markup=False)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json: bool) -> None:
    """List loaded plugins, resource kinds and tools, with where they come from."""
    try:
        pm = get_plugin_manager()
        kinds, tools = registries(pm)
    except PluginError as exc:
        _bad_input([f"cleveragents: {exc}"])
    listing = {
        "plugins": [
            {"name": name, "source": plugin_source(pm, plugin)}
            for name, plugin in sorted(pm.list_name_plugin())
            if plugin is not None
        ],
        "resource_kinds": [{"kind": kind, "source": kinds.source(kind)} for kind in kinds],
        "tools": [{"name": name, "source": tools.source(name)} for name in tools],
    }
    if as_json:
        _print_json_obj(listing)
        return
    for section, key in (("plugins", "name"), ("resource_kinds", "kind"), ("tools", "name")):
        table = Table(title=section.replace("_", " "), title_justify="left", show_edge=False)
        table.add_column(key)
        table.add_column("source")
        for entry in listing[section]:
            table.add_row(entry[key], entry["source"])
        if not listing[section]:
            table.add_row("(none)", "")
        _out.print(table)


def _print_json_obj(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


@cli.command()
def schema() -> None:
    """Print the JSON Schema of plan files (for editors)."""
    try:
        kinds, _ = registries(get_plugin_manager())
    except PluginError as exc:
        _bad_input([f"cleveragents: {exc}"])
    _print_json_obj(plan_json_schema(kinds))


@cli.command()
@click.option(
    "--db",
    type=click.Path(dir_okay=False),
    default=None,
    help="SQLite database file [default: a temporary one, removed afterwards].",
)
@click.option("--writers", type=click.IntRange(1), default=30, show_default=True)
@click.option("--readers", type=click.IntRange(0), default=10, show_default=True)
@click.option("--seconds", type=click.FloatRange(0, min_open=True), default=60.0, show_default=True)
@click.option(
    "--executor-threads",
    type=click.IntRange(1),
    default=32,
    show_default=True,
    help="Threads of the executor behind asyncio.to_thread.",
)
@click.option(
    "--fd-limit",
    type=click.IntRange(64),
    default=None,
    help="Lower this process's open-descriptor limit (RLIMIT_NOFILE) to N.",
)
@click.option("--max-connections", type=click.IntRange(1), default=32, show_default=True)
@click.option("--engine", default="sqlite", show_default=True, help="Database engine.")
@click.option(
    "--dsn", default=None, help="Connection string for --engine postgresql ('${NAME}' reads NAME)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="Draw descriptors and throughput over time into FILE (.svg, .png, .pdf).",
)
def stress(as_json: bool, plot: str | None, **settings: Any) -> None:
    """Run writer plans and readers on one database; exit 0 if healthy, 1 if not.

    Healthy: no errors, every committed plan's rows present and every rolled-back
    plan's rows absent, and open descriptors bounded by the connection limit.
    """
    from cleveragents import stress as harness

    try:
        options = harness.StressOptions(**settings)
    except ValueError as exc:
        _bad_input([f"cleveragents stress: {exc}"])
    problem = harness.check_resource(options) or (plot and harness.plot_problem(plot))
    if problem:
        _bad_input([f"cleveragents stress: {problem}"])
    with harness.LiveLine(_err) as live:
        report = harness.run_stress(options, progress=live)
    harness.print_report(report, as_json=as_json)
    if plot:
        harness.write_plot(report, plot)
    sys.exit(harness.exit_status(report))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``cleveragents`` console script."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="cleveragents")
    except CleverAgentsError as exc:
        # Anything of ours that reaches here is reported on one line, not as a traceback.
        _err.print(f"cleveragents: {exc}", markup=False)
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":  # pragma: no cover - the console script calls main()
    main()
