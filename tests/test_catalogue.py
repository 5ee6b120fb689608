"""Malformed and hostile plans: exit 2 or 1, one clear line, no traceback, nothing half-applied.

The plans and what each must get live in ``tests/catalogue/cases.yaml``. Every
case runs ``cleveragents run`` in a fresh folder through a subprocess, like a
user would; one more test runs ``cleveragents validate`` on all the bad input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

CATALOGUE = Path(__file__).parent / "catalogue"
CLI = [sys.executable, "-m", "cleveragents.cli"]
DB = "cat.db"


@dataclasses.dataclass(frozen=True)
class Case:
    """One catalogue entry: a plan and the answer it must get."""

    plan: str
    exit: tuple[int, ...]
    expect: str | None = None
    setup: str | None = None
    known_bug: str | None = None


def _load_cases() -> list[Case]:
    entries = yaml.safe_load((CATALOGUE / "cases.yaml").read_text(encoding="utf-8"))
    cases = []
    for entry in entries:
        codes = entry.pop("exit")
        cases.append(Case(exit=tuple(codes) if isinstance(codes, list) else (codes,), **entry))
    return cases


CASES = _load_cases()


# -- setups: what a case finds next to its plan -------------------------------------------


def _seed(path: Path, *, journal_mode: str = "wal") -> None:
    """Create a database with table t holding one row, as an earlier plan would have."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA journal_mode = {journal_mode}")
        conn.execute("CREATE TABLE t (v INT)")
        conn.execute("INSERT INTO t VALUES (0)")
    finally:
        conn.close()


@contextlib.contextmanager
def _seeded(plans: Path) -> Iterator[None]:
    _seed(plans / DB)
    yield


_HOLD_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
conn.execute("ROLLBACK")
conn.close()
"""


@contextlib.contextmanager
def _locked(plans: Path) -> Iterator[None]:
    """Another program holds the write lock while the plan runs."""
    _seed(plans / DB)
    # A separate process: POSIX locks are per process, so a lock held here would
    # be dropped as soon as this process closed any descriptor of the file.
    with subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(plans / DB)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdin is not None
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        try:
            yield
        finally:
            holder.stdin.close()
            holder.wait(timeout=30)


@contextlib.contextmanager
def _read_only(plans: Path) -> Iterator[None]:
    """A database file nobody may write, root included (chattr +i), else chmod 0444."""
    path = plans / DB
    _seed(path, journal_mode="delete")
    if os.geteuid() == 0:
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot make a file read-only for root here: {done.stderr!r}")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o444)
        plans.chmod(0o555)  # no -journal or -wal next to it either
        try:
            yield
        finally:
            plans.chmod(0o755)
            path.chmod(0o644)


@contextlib.contextmanager
def _corrupt(plans: Path) -> Iterator[None]:
    (plans / DB).write_bytes(b"this is not an SQLite database\n" * 200)
    yield


@contextlib.contextmanager
def _malformed(plans: Path) -> Iterator[None]:
    """A real SQLite file whose schema page is zeroed after its header."""
    path = plans / DB
    _seed(path, journal_mode="delete")
    data = bytearray(path.read_bytes())
    data[100:160] = bytes(60)
    path.write_bytes(bytes(data))
    yield


@contextlib.contextmanager
def _folder(plans: Path) -> Iterator[None]:
    (plans / "folder.db").mkdir()
    yield


@contextlib.contextmanager
def _symlink_out(plans: Path) -> Iterator[None]:
    outside = plans.parent / "outside"
    outside.mkdir()
    _seed(outside / "target.db")
    (plans / "link.db").symlink_to(outside / "target.db")
    yield


@contextlib.contextmanager
def _huge(plans: Path) -> Iterator[None]:
    with (plans / "huge.yaml").open("a", encoding="utf-8") as plan:
        for _ in range(12_000):
            plan.write("# " + "padding " * 12 + "\n")
    yield


@contextlib.contextmanager
def _pg_seeded(plans: Path) -> Iterator[None]:
    """A fresh PostgreSQL schema with table t holding one row; plans read its DSN from
    ``CATALOGUE_PG_DSN``. On the way out it checks that the row is all there is."""
    base = os.environ.get("CLEVERAGENTS_TEST_PG_DSN")
    if not base:
        pytest.skip("PostgreSQL cases need CLEVERAGENTS_TEST_PG_DSN (scripts/pg-test-server)")
    psycopg = pytest.importorskip("psycopg")
    schema = f"cat_{plans.parent.name[-12:].replace('-', '_').lower()}_{os.getpid()}"
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    dsn = psycopg.conninfo.make_conninfo(base, options=f"-c search_path={schema}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (v INT)")
        conn.execute("INSERT INTO t VALUES (0)")
    os.environ["CATALOGUE_PG_DSN"] = dsn
    try:
        yield
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT v FROM t").fetchall() == [(0,)]
    finally:
        del os.environ["CATALOGUE_PG_DSN"]
        with psycopg.connect(base, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


SETUPS: dict[str | None, Callable[[Path], contextlib.AbstractContextManager[None]]] = {
    None: lambda plans: contextlib.nullcontext(),
    "db": _seeded,
    "locked": _locked,
    "read-only": _read_only,
    "corrupt": _corrupt,
    "malformed": _malformed,
    "folder": _folder,
    "symlink-out": _symlink_out,
    "huge": _huge,
    "pg": _pg_seeded,
}


# -- checks ------------------------------------------------------------------------------


_TRANSIENT = ("-wal", "-shm", "-journal")


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under *root* with a hash of its bytes, but plans and SQLite's transient files.

    Those live only while a connection is open; :func:`_left_behind` checks they are gone.
    """
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file() or path.suffix == ".yaml":
            continue
        if not path.name.endswith(_TRANSIENT):
            files[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def _left_behind(root: Path) -> list[str]:
    return [str(path) for path in root.rglob("*") if path.name.endswith(_TRANSIENT)]


def _run(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home)}
    env.pop("CLEVERAGENTS_ALLOWED_ROOTS", None)
    return subprocess.run(
        [*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def _problem_line(plans: list[str]) -> re.Pattern[str]:
    """PATH:LINE: FIELD: problem (or PATH: problem for a file-wide one), nothing else."""
    names = "|".join(re.escape(plan) for plan in plans)
    return re.compile(rf"^({names})(:\d+)?: \S.*$")


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    plans = tmp_path / "plans"
    home = tmp_path / "home"
    plans.mkdir()
    home.mkdir()
    return plans, home


def _params() -> list[object]:
    params: list[object] = []
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case.known_bug)] if case.known_bug else []
        params.append(pytest.param(case, id=case.plan.removesuffix(".yaml"), marks=marks))
    return params


@pytest.mark.parametrize("case", _params())
def test_a_hostile_plan_gets_one_clear_line_and_changes_nothing(
    case: Case, folders: tuple[Path, Path]
) -> None:
    plans, home = folders
    shutil.copy(CATALOGUE / case.plan, plans / case.plan)
    root = plans.parent
    with SETUPS[case.setup](plans):
        before = _snapshot(root)
        done = _run(["run", case.plan], plans, home)
    after = _snapshot(root)

    output = done.stdout + done.stderr
    assert done.returncode in case.exit, output
    assert "Traceback" not in output
    if done.returncode == 2:
        assert done.stdout == ""
        lines = done.stderr.splitlines()
        assert lines, "bad input without a word"
        for line in lines:
            assert _problem_line([case.plan]).match(line), line
        if case.expect is not None:
            assert any(case.expect in line for line in lines), (case.expect, lines)
    else:
        assert done.stderr == ""
        errors = [line for line in done.stdout.splitlines() if line.startswith("  error: ")]
        assert len(errors) == 1, done.stdout
        if case.expect is not None:
            assert case.expect in errors[0]
    # Nothing half-applied: no database made, and every file there is as it was.
    assert after == before
    assert _left_behind(root) == []
    if case.setup in ("db", "locked"):
        conn = sqlite3.connect(plans / DB)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert conn.execute("SELECT v FROM t").fetchall() == [(0,)]
        finally:
            conn.close()


def test_validate_reports_every_bad_plan_at_once(folders: tuple[Path, Path]) -> None:
    plans, home = folders
    bad = [case for case in CASES if case.exit == (2,)]
    for case in bad:
        shutil.copy(CATALOGUE / case.plan, plans / case.plan)
    with contextlib.ExitStack() as stack:
        for setup in {case.setup for case in bad}:
            stack.enter_context(SETUPS[setup](plans))
        before = _snapshot(plans.parent)
        done = _run(["validate", *(case.plan for case in bad)], plans, home)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    pattern = _problem_line([case.plan for case in bad])
    assert [line for line in lines if not pattern.match(line)] == []
    for case in bad:
        assert case.expect is not None
        assert any(case.expect in line for line in lines), case.expect
    assert _snapshot(plans.parent) == before


def test_the_catalogue_lists_every_plan_in_its_folder() -> None:
    listed = [case.plan for case in CASES]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(
        path.name for path in CATALOGUE.glob("*.yaml") if path.name != "cases.yaml"
    )
    assert len(listed) >= 30
    assert all(case.setup in SETUPS for case in CASES)
    assert all(set(case.exit) <= {1, 2} for case in CASES)


def test_merge_keys_and_equal_text_with_other_tags_are_not_duplicates(tmp_path: Path) -> None:
    from cleveragents.errors import PlanError
    from cleveragents.plan import load_plan

    plan = tmp_path / "merge.yaml"
    plan.write_text(
        "id: merge\n"
        "defaults: &db {kind: database, engine: sqlite}\n"
        "resources:\n"
        "  a: {<<: *db, location: a.db}\n"
        "  b:\n"
        "    <<: *db\n"
        "    <<: {busy_timeout: 1s}\n"
        "    location: b.db\n"
        "steps:\n"
        "  - {id: one, resource: a, expect: {sql: SELECT 1, equals: {1: one, '1': two}}}\n",
        encoding="utf-8",
    )
    with pytest.raises(PlanError) as raised:
        load_plan(plan)
    # Only the unknown top-level key is wrong: neither '<<' twice nor 1 and '1' are duplicates.
    assert str(raised.value) == f"{plan}:2: defaults: unknown key"
