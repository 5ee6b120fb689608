"""Databases as another program sees them: read through a separate, read-only connection."""

from __future__ import annotations

import difflib
import os
import sqlite3
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

from robot.api.deco import keyword

from lib.common import fail

LEDGER_SCHEMA = "CREATE TABLE IF NOT EXISTS ledger (plan TEXT NOT NULL, step TEXT NOT NULL)"


def connect(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open a separate connection that sees only committed data and creates nothing."""
    if not Path(path).is_file():
        raise AssertionError(f"database {str(path)!r} does not exist")
    return sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, isolation_level=None)


def ledger_plans(path: str | os.PathLike[str]) -> dict[str, int]:
    """Return how many ledger rows each plan has in the database at *path*."""
    with closing(connect(path)) as conn:
        rows = conn.execute("SELECT plan, count(*) FROM ledger GROUP BY plan").fetchall()
    return dict(rows)


class LedgerKeywords:
    """Create the ledger database; check what any database holds after the fact."""

    @keyword
    def create_ledger_database(self, folder: str) -> str:
        """Create ``ledger.db`` with an empty ledger table in *folder* and return its path."""
        path = Path(folder) / "ledger.db"
        with closing(sqlite3.connect(path, isolation_level=None)) as conn:
            conn.execute(LEDGER_SCHEMA)
        return str(path)

    @keyword
    def dump_database(self, path: str) -> list[str]:
        """Return a full SQL dump of the database at *path*."""
        with closing(connect(path)) as conn:
            return list(conn.iterdump())

    @keyword
    def dumps_should_be_equal(
        self, before: Sequence[str], after: Sequence[str], msg: str | None = None
    ) -> None:
        """Fail unless two database dumps are identical, showing the difference."""
        if list(before) != list(after):
            diff = "\n".join(difflib.unified_diff(before, after, "before", "after", lineterm=""))
            fail(msg, f"the database changed:\n{diff}")

    @keyword
    def query_value_should_be(
        self, path: str, sql: str, expected: str, msg: str | None = None
    ) -> None:
        """Fail unless *sql* returns one row whose one value, as text, is *expected*."""
        with closing(connect(path)) as conn:
            rows = conn.execute(sql).fetchall()
        if len(rows) != 1 or len(rows[0]) != 1:
            fail(msg, f"{sql!r} returned {rows!r}, not one value")
        if str(rows[0][0]) != str(expected):
            fail(msg, f"{sql!r} returned {rows[0][0]!r}, expected {expected!r}")

    @keyword
    def table_should_not_exist(self, path: str, table: str, msg: str | None = None) -> None:
        """Fail if the database at *path* has a table called *table*."""
        with closing(connect(path)) as conn:
            found = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
            ).fetchone()[0]
        if found:
            fail(msg, f"table {table!r} exists in {path!r}")

    @keyword
    def database_should_not_exist(self, path: str, msg: str | None = None) -> None:
        """Fail if a database file (or its WAL) exists at *path*: nothing touched it."""
        present = [p for p in (path, f"{path}-wal", f"{path}-shm") if Path(p).exists()]
        if present:
            fail(msg, f"expected no database, found {present}")

    @keyword
    def ledger_should_contain_plans(
        self, path: str, *plans: str, rows: int = 3, msg: str | None = None
    ) -> None:
        """Fail unless every plan in *plans* has exactly *rows* rows in the ledger at *path*."""
        counts = ledger_plans(path)
        wrong = {plan: counts.get(plan, 0) for plan in plans if counts.get(plan, 0) != int(rows)}
        if wrong or not plans:
            fail(msg, f"expected {rows} ledger rows for each of {list(plans)}; got {wrong}")

    @keyword
    def ledger_should_not_contain_plans(
        self, path: str, *plans: str, msg: str | None = None
    ) -> None:
        """Fail if any plan in *plans* has a row in the ledger at *path*."""
        counts = ledger_plans(path)
        present = {plan: counts[plan] for plan in plans if plan in counts}
        if present or not plans:
            fail(msg, f"expected no ledger rows for {list(plans)}; found {present}")
