"""Nox sessions: lint, type checks, the three test runners under coverage, the coverage report.

``nox`` with no arguments runs what CI runs. ``nox -s tests -- -k plan`` passes
arguments after ``--`` to the session's tool. Everything a session writes goes
under ``build/``: JUnit reports in ``build/reports/<runner>/`` and coverage
data in ``build/coverage/<runner>/``, combined by ``coverage_report``.
"""

from __future__ import annotations

import atexit
import functools
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import nox

# requires= and dependency-group helpers (2025.02), download_python (2025.10),
# uv 0.10's `uv venv --clear` (2026.02): `nox[uv]` installs a recent uv.
nox.needs_version = ">=2026.2.9"
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.download_python = "never"  # only PyPI is reachable from CI
nox.options.error_on_external_run = True
nox.options.sessions = ["lint", "typecheck", "tests", "bdd", "robot", "coverage_report"]

ROOT = Path(__file__).resolve().parent
BUILD = ROOT / "build"
REPORTS = BUILD / "reports"
COVERAGE = BUILD / "coverage"
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")

LINT_PATHS = (
    "src",
    "tests",
    "features",
    "robot",
    "benchmarks",
    "examples",
    "scripts",
    "noxfile.py",
)
RUNNERS = ("tests", "bdd", "robot")
# Every optional extra, so the code behind each is type-checked and tested.
PACKAGE = ".[postgresql,agents,langgraph,plot,otel]"
PG_VARIABLE = "CLEVERAGENTS_TEST_PG_DSN"
PG_SERVER = ROOT / "scripts" / "pg-test-server"


def _group(name: str) -> tuple[str, ...]:
    """Return the requirements of the ``[dependency-groups]`` entry *name*."""
    return nox.project.dependency_groups(PYPROJECT, name)


def _install_for_tests(session: nox.Session) -> None:
    """Install the package with every extra, the example plugin and the test tools.

    Editable, so coverage measures ``src/cleveragents`` directly. The example
    plugin is installed too: tests rely on its ``cleveragents`` entry point.
    """
    session.install("-e", PACKAGE, "-e", "./examples/plugin", *_group("test"))


def _fresh_dir(path: Path) -> Path:
    """Empty *path* (left over from an earlier run) and return it."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


@functools.cache
def _postgresql() -> tuple[dict[str, str], str]:
    """Return what points the PostgreSQL tests at a server (starting one), and what was done.

    A DSN already in ``CLEVERAGENTS_TEST_PG_DSN`` is used as it is. Otherwise
    ``scripts/pg-test-server`` starts a throwaway server, once per nox run, and
    it is stopped when nox exits. Without a server the PostgreSQL tests skip,
    each saying how to get one (and coverage falls short of its minimum).
    """
    if os.environ.get(PG_VARIABLE):
        return {}, f"PostgreSQL tests use the server in {PG_VARIABLE}"
    BUILD.mkdir(parents=True, exist_ok=True)
    server_env = {**os.environ, "PG_TEST_SERVER_STATE": str(BUILD / "pg-test-server.state")}
    # From /, so that the server's own user can enter its working directory.
    run = functools.partial(
        subprocess.run, cwd="/", env=server_env, capture_output=True, text=True, check=False
    )
    started = run([str(PG_SERVER), "start"])
    atexit.register(run, [str(PG_SERVER), "stop"])
    for word in shlex.split(started.stdout):
        name, _, value = word.partition("=")
        if name == PG_VARIABLE and value:
            return {PG_VARIABLE: value}, "started a throwaway PostgreSQL server for the tests"
    reason = started.stderr.strip() or "pg-test-server printed no DSN"
    return {}, f"no PostgreSQL server ({reason}): the PostgreSQL tests will be skipped"


def _run_under_coverage(session: nox.Session, runner: str, *args: str) -> None:
    """Run ``coverage run -m ARGS`` with *runner*'s own data and report folders.

    Afterwards the runner's JUnit reports must show at least one passed test
    and no failure: behave exits 0 when no scenario was selected, and this
    catches that (and the same for the others) in one place.
    """
    data = _fresh_dir(COVERAGE / runner)
    reports = _fresh_dir(REPORTS / runner)
    postgresql, note = _postgresql()
    session.log(note)
    session.run(
        "coverage",
        "run",
        "-m",
        *args,
        env={"COVERAGE_FILE": str(data / ".coverage"), **postgresql},
    )
    session.run(
        "python", str(ROOT / "scripts" / "junit_summary.py"), "--label", runner, str(reports)
    )


@nox.session
def lint(session: nox.Session) -> None:
    """Check style with ruff (rules and formatting) and the import layers with import-linter."""
    session.install(*_group("lint"))
    paths = [path for path in LINT_PATHS if (ROOT / path).exists()]
    cache = f"--cache-dir={BUILD / 'ruff-cache'}"
    session.run("ruff", "check", cache, *paths, *session.posargs)
    session.run("ruff", "format", cache, "--check", *paths)
    # The contracts are in pyproject's [tool.importlinter]. Grimp only reads
    # the source, so src/ on the path is enough; nothing is installed or imported.
    session.run(
        "lint-imports",
        "--no-logo",
        f"--cache-dir={BUILD / 'import-linter-cache'}",
        env={"PYTHONPATH": str(ROOT / "src")},
    )


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check src/cleveragents with mypy --strict."""
    session.install("-e", PACKAGE, *_group("typecheck"))
    session.run("mypy", f"--cache-dir={BUILD / 'mypy-cache'}", *(session.posargs or ["src"]))


@nox.session
def tests(session: nox.Session) -> None:
    """Run the pytest suite under coverage."""
    _install_for_tests(session)
    _run_under_coverage(
        session,
        "tests",
        "pytest",
        f"--junitxml={REPORTS / 'tests' / 'junit.xml'}",
        "--durations=5",
        *session.posargs,
    )


@nox.session
def bdd(session: nox.Session) -> None:
    """Run the behave features under coverage."""
    _install_for_tests(session)
    # Reports go to build/reports/bdd ([tool.behave] junit_directory).
    _run_under_coverage(session, "bdd", "behave", *session.posargs)


@nox.session
def robot(session: nox.Session) -> None:
    """Run the Robot Framework suites under coverage."""
    _install_for_tests(session)
    args = list(session.posargs)
    # Options alone (`-- --include smoke`) still need a data source: the suite folder.
    if not any((ROOT / arg).exists() for arg in args):
        args.append("robot")
    _run_under_coverage(
        session,
        "robot",
        "robot",
        "--outputdir",
        str(REPORTS / "robot"),
        "--xunit",
        "xunit.xml",
        *args,
    )


@nox.session(requires=list(RUNNERS))
def coverage_report(session: nox.Session) -> None:
    """Combine the three runners' coverage and report it (fails below fail_under)."""
    session.install(*(req for req in _group("test") if req.startswith("coverage")))
    combined = str(COVERAGE / ".coverage")
    missing = [runner for runner in RUNNERS if not (COVERAGE / runner).is_dir()]
    if missing:
        session.error(f"no coverage data from {', '.join(missing)}: run those sessions first")
    Path(combined).unlink(missing_ok=True)
    session.run(
        "coverage",
        "combine",
        f"--data-file={combined}",
        "--keep",
        *(str(COVERAGE / runner) for runner in RUNNERS),
    )
    session.run("coverage", "report", f"--data-file={combined}", *session.posargs)
