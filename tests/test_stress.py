"""``cleveragents stress``: the CI soak run, and the harness catching what it exists to catch."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from cleveragents import cli, fds, stress
from cleveragents.errors import PoolExhaustedError
from cleveragents.resource.handlers.database import DatabaseResourceHandler
from cleveragents.stress import StressOptions, StressReport, run_stress

CLI = [sys.executable, "-m", "cleveragents.cli"]
REPORT_KEYS = {
    "plans_committed",
    "plans_rolled_back",
    "reads",
    "errors",
    "fd_baseline",
    "fd_peak",
    "fd_final",
    "integrity_ok",
    "plans_per_s",
}


def _rows_by_plan(db: Path, run_id: str) -> dict[str, list[int]]:
    """Read the run's rows through a separate sqlite3 connection."""
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        found: dict[str, list[int]] = {}
        for plan, n in conn.execute(
            f"SELECT plan, n FROM {stress.TABLE} WHERE run = ? ORDER BY plan, n", (run_id,)
        ):
            found.setdefault(plan, []).append(n)
        return found
    finally:
        conn.close()


def _small(tmp_path: Path, **changes: Any) -> StressOptions:
    settings: dict[str, Any] = {
        "db": str(tmp_path / "stress.db"),
        "writers": 4,
        "readers": 2,
        "seconds": 1.0,
        "executor_threads": 4,
        "max_connections": 4,
        "sample_interval": 0.25,
        "seed": 7,
    }
    return StressOptions(**{**settings, **changes})


def test_the_ci_soak_run_is_healthy(tmp_path: Path) -> None:
    """About 10 s, 32 executor threads, 1024 descriptors: the conditions of the public leak."""
    db = tmp_path / "soak.db"
    done = subprocess.run(
        [
            *CLI,
            "stress",
            "--seconds",
            "10",
            "--executor-threads",
            "32",
            "--fd-limit",
            "1024",
            "--json",
            "--db",
            str(db),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""  # no live line when not on a terminal
    report = json.loads(done.stdout)
    assert set(report) >= REPORT_KEYS
    assert report["errors"] == 0, report["error_examples"]
    assert report["integrity_ok"] is True
    assert report["storage_check"] == "ok"
    assert report["plans_committed"] > 0
    assert report["plans_rolled_back"] > 0
    assert report["reads"] > 0
    assert report["fd_peak"] - report["fd_baseline"] <= 2 * 32 + 8
    assert abs(report["fd_final"] - report["fd_baseline"]) <= 1
    assert report["threads_final"] == report["threads_baseline"]
    assert report["handler_stats"]["wait_timeouts"] == 0
    assert len(report["samples"]) >= 9
    # What the harness claims, checked again from outside: every committed plan
    # left exactly its two rows, and no other plan of the run left any.
    rows = _rows_by_plan(db, report["run_id"])
    assert len(rows) == report["plans_committed"]
    assert all(found == [1, 2] for found in rows.values())


def test_a_short_run_reports_what_it_did(tmp_path: Path) -> None:
    samples: list[stress.Sample] = []
    report = run_stress(_small(tmp_path), progress=lambda sample, _: samples.append(sample))
    assert report.healthy, stress.summary_lines(report)
    assert stress.exit_status(report) == 0
    assert report.plans_committed > 0 and report.plans_rolled_back > 0 and report.reads > 0
    assert report.missing_plans == report.unexpected_plans == 0
    assert samples == report.samples and len(samples) >= 3
    assert samples[-1].plans_committed == report.plans_committed
    rows = _rows_by_plan(tmp_path / "stress.db", report.run_id)
    assert len(rows) == report.plans_committed
    assert report.handler_stats["open_connections"] <= 4
    as_json = report.to_json()
    assert set(as_json) >= REPORT_KEYS
    assert as_json["healthy"] is True
    json.dumps(as_json)
    text = "\n".join(stress.summary_lines(report))
    assert f"plans committed    {report.plans_committed}" in text
    assert text.endswith("result             healthy")


def test_a_temporary_database_is_removed_afterwards() -> None:
    report = run_stress(StressOptions(writers=2, readers=1, seconds=0.5, executor_threads=3))
    assert report.healthy, stress.summary_lines(report)
    assert not Path(report.database).parent.exists()


def test_errors_are_counted_by_type_and_make_the_run_unhealthy(tmp_path: Path) -> None:
    # One connection, and no patience for it: plans that cannot get it fail.
    options = _small(
        tmp_path, max_connections=1, handler_options={"acquire_timeout": 0.001}, seconds=1.5
    )
    report = run_stress(options)
    assert report.errors_by_type[PoolExhaustedError.__name__] > 0
    assert report.errors == sum(report.errors_by_type.values())
    assert report.error_examples and "PoolExhaustedError" in report.error_examples[0]
    assert not report.healthy
    assert stress.exit_status(report) == 1
    # The failed plans were rolled back: integrity still holds.
    assert report.integrity_ok
    text = "\n".join(stress.summary_lines(report))
    assert "PoolExhaustedError" in text and text.endswith("NOT HEALTHY")


def test_lost_commits_are_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def release_that_rolls_back(self: DatabaseResourceHandler, plan_id: str) -> None:
        self.rollback_plan(plan_id)

    monkeypatch.setattr(DatabaseResourceHandler, "arelease_plan", release_that_rolls_back)
    report = run_stress(_small(tmp_path))
    assert report.missing_plans == report.plans_committed > 0
    assert not report.integrity_ok and not report.healthy
    assert "integrity          FAILED" in "\n".join(stress.summary_lines(report))


def test_rows_that_should_be_gone_are_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def rollback_that_commits(self: DatabaseResourceHandler, plan_id: str) -> None:
        self.release_plan(plan_id)

    monkeypatch.setattr(DatabaseResourceHandler, "arollback_plan", rollback_that_commits)
    report = run_stress(_small(tmp_path, fail_ratio=0.5))
    assert report.unexpected_plans > 0
    assert not report.integrity_ok


def test_a_failed_storage_check_fails_integrity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(stress._STORAGE_CHECKS, "sqlite", ("SELECT 'page 3 is broken'", "ok"))
    report = run_stress(_small(tmp_path, seconds=0.5))
    assert report.storage_check == "page 3 is broken"
    assert not report.integrity_ok


def test_leaked_descriptors_are_caught(tmp_path: Path) -> None:
    leaked: list[Any] = []

    def leak(sample: stress.Sample, report: StressReport) -> None:
        leaked.append(open(os.devnull, "rb"))  # noqa: SIM115 - the leak under test

    try:
        report = run_stress(_small(tmp_path, seconds=1.0), progress=leak)
    finally:
        for file in leaked:
            file.close()
    assert report.fd_final - report.fd_baseline == len(leaked) >= 3
    assert not report.fds_ok and not report.healthy
    assert "NOT BOUNDED" in "\n".join(stress.summary_lines(report))


def test_sigint_stops_the_run_early_and_it_is_still_checked(tmp_path: Path) -> None:
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        report = run_stress(_small(tmp_path, seconds=60))
    finally:
        timer.cancel()
    assert report.interrupted == "SIGINT"
    assert report.elapsed_s < 30
    assert report.integrity_ok and report.errors == 0
    assert stress.exit_status(report) == 130
    assert "interrupted by SIGINT" in stress.summary_lines(report)


def test_the_live_line_shows_progress_on_a_terminal(tmp_path: Path) -> None:
    screen = io.StringIO()
    with stress.LiveLine(Console(file=screen, force_terminal=True, width=200)) as live:
        report = run_stress(_small(tmp_path, seconds=0.6), progress=live)
    assert report.healthy
    assert "committed" in screen.getvalue() and "fds" in screen.getvalue()
    quiet = io.StringIO()
    with stress.LiveLine(Console(file=quiet, force_terminal=False)) as live:
        live(report.samples[0], report)
    assert quiet.getvalue() == ""


def test_the_fd_limit_is_lowered_for_the_run_and_restored(tmp_path: Path) -> None:
    import resource

    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    seen: list[tuple[int, int]] = []
    report = run_stress(
        _small(tmp_path, fd_limit=256, seconds=0.5),
        progress=lambda *_: seen.append(resource.getrlimit(resource.RLIMIT_NOFILE)),
    )
    assert report.healthy
    assert seen and all(limit == (256, before[1]) for limit in seen)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == before


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"writers": 0}, "writers must be at least 1"),
        ({"readers": -1}, "readers must be 0 or more"),
        ({"seconds": 0}, "seconds must be more than 0"),
        ({"seconds": float("inf")}, "seconds must be more than 0"),
        ({"executor_threads": 0}, "executor_threads must be at least 1"),
        ({"max_connections": 0}, "max_connections must be at least 1"),
        ({"fd_limit": 10}, "fd_limit must be at least 64"),
        ({"fd_limit": 2**62}, "above this process's hard limit"),
        ({"fail_ratio": 1.5}, "fail_ratio must be between 0 and 1"),
        ({"sample_interval": 0}, "sample_interval must be more than 0"),
        ({"engine": "oracle"}, "unknown engine 'oracle' (known: "),
        ({"dsn": "dbname=x"}, "--dsn is for --engine postgresql"),
        ({"engine": "postgresql"}, "--engine postgresql needs --dsn"),
        ({"engine": "postgresql", "dsn": "dbname=x", "db": "x.db"}, "--db is for SQLite"),
    ],
)
def test_bad_options_are_refused(changes: dict[str, Any], message: str) -> None:
    if changes.get("fd_limit") == 2**62:
        import resource

        if resource.getrlimit(resource.RLIMIT_NOFILE)[1] == resource.RLIM_INFINITY:
            pytest.skip("no hard descriptor limit to exceed here")
    with pytest.raises(ValueError) as raised:
        StressOptions(**changes)
    assert message in str(raised.value)


def test_only_the_resource_depends_on_the_engine() -> None:
    sqlite = StressOptions()
    writer, reader = stress.resources(sqlite, "/tmp/x.db")
    assert (writer.options["engine"], reader.options["lock"]) == ("sqlite", "deferred")
    postgres = StressOptions(engine="postgresql", dsn="host=db password=secret")
    writer, reader = stress.resources(postgres, None)
    assert writer is reader
    assert dict(writer.options) == {"engine": "postgresql", "dsn": "host=db password=secret"}
    assert "secret" not in repr(writer)


# -- the command line -----------------------------------------------------------------------


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        cli.main(["stress", *args])
    out, err = capsys.readouterr()
    code = exited.value.code
    assert isinstance(code, int)
    return code, out, err


def test_the_command_prints_a_summary_for_people(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "people.db"
    args = ["--db", str(db), "--seconds", "0.5", "--writers", "3", "--readers", "1"]
    code, out, err = _main([*args, "--executor-threads", "4", "--max-connections", "4"], capsys)
    assert code == 0, out + err
    assert out.splitlines()[0].startswith("stress: ")
    assert "result             healthy" in out
    assert err == ""


def test_the_command_draws_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "stress.svg"
    code, out, _ = _main(
        [
            "--db",
            str(tmp_path / "p.db"),
            "--seconds",
            "1.2",
            "--writers",
            "2",
            "--readers",
            "1",
            "--executor-threads",
            "3",
            "--json",
            "--plot",
            str(plot),
        ],
        capsys,
    )
    assert code == 0
    assert json.loads(out)["healthy"] is True
    assert "<svg" in plot.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engine", "oracle"], "cleveragents stress: unknown engine 'oracle'"),
        (["--dsn", "dbname=x"], "cleveragents stress: --dsn is for --engine postgresql"),
        (["--db", "/nowhere/at/all/x.db"], "cleveragents stress: --db: folder '/nowhere/at/all'"),
        (["--plot", "out.txt"], "cleveragents stress: --plot: 'out.txt' must end in .svg"),
        (["--plot", "/nowhere/at/all/x.svg"], "cleveragents stress: --plot: folder"),
        (
            ["--engine", "postgresql", "--dsn", "${CLEVERAGENTS_STRESS_UNSET_DSN}"],
            "cleveragents stress: --dsn: environment variable 'CLEVERAGENTS_STRESS_UNSET_DSN' "
            "is not set",
        ),
        (
            ["--engine", "postgresql", "--dsn", "host=db password=hunter2 =="],
            "cleveragents stress: --dsn: the dsn does not parse",
        ),
    ],
)
def test_the_command_refuses_bad_input_in_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if "--plot" in args:
        pytest.importorskip("matplotlib")
    code, out, err = _main(args, capsys)
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith(message)
    assert "hunter2" not in err


def test_plot_needs_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert stress.plot_problem("x.svg") == (
        "--plot needs matplotlib: pip install 'cleveragents[plot]'"
    )


def test_count_fds_counts_this_process_descriptors() -> None:
    before = fds.count_fds()
    assert before == len(os.listdir("/proc/self/fd"))
    with open(os.devnull, "rb"):
        assert fds.count_fds() == before + 1
    assert fds.count_fds() == before


def test_count_fds_falls_back_to_dev_fd(monkeypatch: pytest.MonkeyPatch) -> None:
    listdir = os.listdir

    def no_proc(path: str) -> list[str]:
        if path == "/proc/self/fd":
            raise FileNotFoundError(path)
        return listdir(path)

    monkeypatch.setattr(os, "listdir", no_proc)
    assert fds.count_fds() == len(listdir("/dev/fd"))

    def nothing(path: str) -> list[str]:
        raise PermissionError(path)

    monkeypatch.setattr(os, "listdir", nothing)
    assert fds.count_fds() == -1


def test_a_database_the_harness_cannot_open_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "corrupt.db"
    db.write_bytes(b"not a database at all\n" * 100)
    code, out, err = _main(["--db", str(db), "--seconds", "1"], capsys)
    assert code == 1
    assert out == ""
    assert len(err.splitlines()) == 1 and "file is not a database" in err
    assert db.read_bytes() == b"not a database at all\n" * 100


def test_a_run_off_the_main_thread_takes_no_signals(tmp_path: Path) -> None:
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    reports: list[StressReport] = []
    thread = threading.Thread(target=lambda: reports.append(run_stress(_small(tmp_path))))
    thread.start()
    thread.join(timeout=60)
    assert reports and reports[0].healthy
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_the_harness_counts_failures_of_its_own_cleanup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even rollbacks that fail are counted, and the run goes on to its check."""
    rollback_plan = DatabaseResourceHandler.rollback_plan

    async def failing_rollback(self: DatabaseResourceHandler, plan_id: str) -> None:
        rollback_plan(self, plan_id)  # the work is undone, but the call reports failure
        raise RuntimeError(f"rollback of {plan_id} reported a failure")

    monkeypatch.setattr(DatabaseResourceHandler, "arollback_plan", failing_rollback)
    options = _small(
        tmp_path, max_connections=1, handler_options={"acquire_timeout": 0.001}, seconds=1.5
    )
    report = run_stress(options)
    assert report.errors_by_type["RuntimeError"] > 0
    assert report.errors_by_type[PoolExhaustedError.__name__] > 0
    assert report.plans_errored > 0
    assert report.integrity_ok


def test_a_duplicate_the_database_accepts_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A table without its primary key lets the "failing" statement succeed.
    monkeypatch.setattr(
        stress,
        "_SCHEMA",
        f"CREATE TABLE IF NOT EXISTS {stress.TABLE} (run TEXT, plan TEXT, n INTEGER)",
    )
    report = run_stress(_small(tmp_path, fail_ratio=1.0, seconds=0.5))
    assert report.errors_by_type["AssertionError"] > 0
    assert "accepted a duplicate row" in report.error_examples[0]
    assert report.plans_committed == 0 and report.integrity_ok


def test_a_failing_statement_other_than_a_duplicate_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stress, "_is_integrity_error", lambda exc: False)
    report = run_stress(_small(tmp_path, fail_ratio=1.0, seconds=0.5))
    assert report.errors_by_type["IntegrityError"] > 0
    assert report.plans_errored == report.errors_by_type["IntegrityError"]
    assert report.plans_committed == 0 and report.integrity_ok


def test_engines_without_a_storage_check_skip_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(stress._STORAGE_CHECKS, "sqlite")
    report = run_stress(_small(tmp_path, seconds=0.5))
    assert report.storage_check is None
    assert report.integrity_ok


def test_a_reader_with_nothing_to_read_yet_reads_a_plan_that_never_was(tmp_path: Path) -> None:
    options = _small(tmp_path)
    writer, reader = stress.resources(options, options.db)
    harness = stress._Harness(options, StressReport(options, "x"), writer, reader, None)
    target, allowed = harness._pick_target(random.Random(1))
    assert target == f"{harness.run_id}-none"
    assert allowed == ((),)


@pytest.mark.skipif(
    not os.environ.get("CLEVERAGENTS_TEST_PG_DSN"),
    reason="needs CLEVERAGENTS_TEST_PG_DSN; start a throwaway server with "
    'eval "$(scripts/pg-test-server start)"',
)
def test_the_same_harness_runs_on_postgresql() -> None:
    psycopg = pytest.importorskip("psycopg")
    dsn = os.environ["CLEVERAGENTS_TEST_PG_DSN"]
    done = subprocess.run(
        [
            *CLI,
            "stress",
            "--engine",
            "postgresql",
            "--dsn",
            "${CLEVERAGENTS_TEST_PG_DSN}",
            "--seconds",
            "3",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["errors"] == 0 and report["integrity_ok"] is True
    assert report["storage_check"] is None
    assert report["plans_committed"] > 0 and report["plans_rolled_back"] > 0
    assert dsn not in done.stdout
    with psycopg.connect(dsn) as conn:
        (plans,) = conn.execute(
            f"SELECT count(DISTINCT plan) FROM {stress.TABLE} WHERE run = %s", (report["run_id"],)
        ).fetchone()
    assert plans == report["plans_committed"]


def test_a_table_it_cannot_use_is_counted_and_unhealthy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "view.db"
    conn = sqlite3.connect(db)
    conn.execute(f"CREATE VIEW {stress.TABLE} AS SELECT 1 AS x")
    conn.close()
    code, out, err = _main(["--db", str(db), "--seconds", "0.5", "--json"], capsys)
    assert code == 1 and err == ""
    report = json.loads(out)
    assert report["errors_by_type"]["OperationalError"] > 0
    assert report["integrity_ok"] is False


def test_a_table_it_cannot_create_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "index.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE x (a INT)")
    conn.execute(f"CREATE INDEX {stress.TABLE} ON x (a)")
    conn.close()
    code, out, err = _main(["--db", str(db), "--seconds", "0.5"], capsys)
    assert (code, out) == (1, "")
    assert len(err.splitlines()) == 1
    assert err.startswith(
        f"cleveragents: cannot create table {stress.TABLE!r}: OperationalError: there is "
        f"already an index named {stress.TABLE} (plan "
    )
