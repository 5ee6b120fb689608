"""Helpers shared by the step modules: paths, resources, rows read through a separate connection.

This module defines no steps. Step modules import it by name (behave puts
the steps folder on ``sys.path`` while it loads them). The fakes the pytest
suite uses too (``tests/fakes.py``) are imported through here.
"""

from __future__ import annotations

import builtins
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from cleveragents import errors
from cleveragents.resource import Resource

# The fakes shared with the pytest suite. The folder is appended, not
# prepended: nothing in tests/ may shadow another module.
sys.path.append(str(Path(__file__).resolve().parents[2] / "tests"))
import fakes

#: A plugin that records the plan events it is told (``events_of(plan_id)``).
RecordingSubscriber = fakes.RecordingSubscriber

#: A generous bound for anything that must happen "eventually" (never a speed check).
EVENTUALLY_S = 15.0


def workdir(context: Any) -> Path:
    """Return the scenario's temporary folder (made by ``@fixture.sqlite``)."""
    folder = getattr(context, "workdir", None)
    assert folder is not None, "tag the scenario or feature with @fixture.sqlite"
    return Path(folder)


def path_in_workdir(context: Any, name: str) -> Path:
    """Return *name* resolved inside the scenario's temporary folder."""
    return workdir(context) / name


def parse_value(text: str) -> Any:
    """Turn a table cell into an int, a float, a bool, ``None`` or leave it a string."""
    lowered = text.strip().lower()
    if lowered in ("null", "none"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def settings_from_table(context: Any) -> dict[str, Any]:
    """Read a two-column ``| setting | value |`` table (no heading) into a dict."""
    assert context.table is not None, "this step needs a table of settings"
    rows = [context.table.headings, *(row.cells for row in context.table)]
    return {name.strip(): parse_value(value) for name, value in rows}


def database_resource(context: Any, name: str, filename: str, **settings: Any) -> Resource:
    """Return a database resource called *name* on *filename* in the temporary folder."""
    location = filename if filename == ":memory:" else str(path_in_workdir(context, filename))
    return Resource(name=name, kind="database", engine="sqlite", location=location, **settings)


@contextmanager
def separate_connection(path: Path, timeout: float = 5.0) -> Iterator[sqlite3.Connection]:
    """Open a plain sqlite3 connection of our own (not the handler's) and close it after."""
    with closing(sqlite3.connect(path, timeout=timeout, isolation_level=None)) as conn:
        yield conn


def create_items_table(path: Path, skus: list[str] | None = None) -> None:
    """Create the ``items`` table used throughout the features, with *skus* in it."""
    with separate_connection(path) as conn:
        conn.execute("CREATE TABLE items (sku TEXT PRIMARY KEY, qty INT NOT NULL DEFAULT 1)")
        conn.executemany("INSERT INTO items (sku) VALUES (?)", [(sku,) for sku in skus or []])


def committed_items(path: Path) -> list[str]:
    """Return the skus another program sees in ``items``, sorted."""
    assert path.exists(), f"{path.name} does not exist"
    with separate_connection(path) as conn:
        return [sku for (sku,) in conn.execute("SELECT sku FROM items ORDER BY sku")]


def table_names(path: Path) -> list[str]:
    """Return the tables another program sees in the database at *path*."""
    with separate_connection(path) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        return [name for (name,) in rows]


def split_names(text: str) -> list[str]:
    """Split ``"apple, pear"`` into ``["apple", "pear"]``."""
    return [part.strip().strip('"') for part in text.split(",") if part.strip()]


def error_class(name: str) -> type[BaseException]:
    """Return the exception class called *name* from ``cleveragents.errors`` or builtins."""
    found = getattr(errors, name, None) or getattr(builtins, name, None)
    assert isinstance(found, type) and issubclass(found, BaseException), name
    return found


def capture(context: Any, action: Callable[[], Any]) -> None:
    """Run *action*, keeping what it raised on ``context.error`` (``None`` if nothing)."""
    context.error = None
    try:
        action()
    except Exception as exc:
        context.error = exc


def wait_until(check: Callable[[], bool], what: str, timeout: float = EVENTUALLY_S) -> None:
    """Poll *check* until it holds; fail naming *what* if it never does within *timeout*."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"gave up after {timeout:g}s waiting for {what}"
        time.sleep(0.02)
