"""Smoke test of the installed ``cleveragents`` command on the example plan."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("CLEVERAGENTS_MAX_CONNECTIONS", "0", "Input should be greater than or equal to 1"),
        ("CLEVERAGENTS_ACQUIRE_TIMEOUT", "bogus", "expected a duration such as 5"),
        ("CLEVERAGENTS_ON_FULL", "never", "Input should be 'wait' or 'evict_lru'"),
    ],
)
def test_a_bad_handler_variable_is_bad_input_and_nothing_runs(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    plan = shutil.copy(EXAMPLES / "restock.yaml", tmp_path)

    done = subprocess.run(
        [CLI, "run", plan],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, variable: value},
    )

    assert done.returncode == 2
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"cleveragents: {variable}: {message}")
    assert not (tmp_path / "inventory.db").exists()


def test_a_flag_overrides_a_bad_variable_and_a_bad_flag_is_named(tmp_path: Path) -> None:
    plan = shutil.copy(EXAMPLES / "restock.yaml", tmp_path)
    env = {**os.environ, "CLEVERAGENTS_MAX_CONNECTIONS": "0"}

    fixed = subprocess.run(
        [CLI, "run", "--max-connections", "4", plan],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    bad = subprocess.run(
        [CLI, "run", "--checkpoint-ttl", "0", plan],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ},
    )

    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert bad.returncode == 2
    expected = "cleveragents: --checkpoint-ttl: Input should be greater than 0"
    assert bad.stderr.splitlines() == [expected]
