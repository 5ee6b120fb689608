"""Smoke test of the installed ``cleveragents`` command on the example plan."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CLI = Path(sys.executable).with_name("cleveragents")


def test_the_example_plan_runs_and_commits_its_rows(tmp_path: Path) -> None:
    plan = shutil.copy(EXAMPLES / "restock.yaml", tmp_path)

    done = subprocess.run(
        [CLI, "run", "--json", plan], capture_output=True, text=True, timeout=120, check=False
    )

    assert done.returncode == 0, done.stderr
    conn = sqlite3.connect(tmp_path / "inventory.db")
    try:
        rows = conn.execute("SELECT sku, qty FROM items ORDER BY sku").fetchall()
    finally:
        conn.close()
    assert rows == [("apple", 12), ("pear", 7), ("plum", 10)]
