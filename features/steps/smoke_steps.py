"""Steps of the command-line smoke scenario."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from behave import given, then, when

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CLI = Path(sys.executable).with_name("cleveragents")


@given('a copy of the example plan "{name}" in a temporary folder')
def step_copy_example_plan(context: Any, name: str) -> None:
    folder = Path(tempfile.mkdtemp(prefix="cleveragents-smoke-"))
    context.add_cleanup(shutil.rmtree, folder, ignore_errors=True)
    context.smoke_folder = folder
    context.smoke_plan = shutil.copy(EXAMPLES / name, folder)


@when('I run "cleveragents run" on it')
def step_run_example_plan(context: Any) -> None:
    context.smoke_result = subprocess.run(
        [CLI, "run", context.smoke_plan], capture_output=True, text=True, timeout=120, check=False
    )


@then("the command exits with status {status:d}")
def step_command_exit_status(context: Any, status: int) -> None:
    result = context.smoke_result
    assert result.returncode == status, (result.returncode, result.stderr)


@then('the table "items" of "{database}" holds apple 12, pear 7 and plum 10')
def step_items_hold_restocked_rows(context: Any, database: str) -> None:
    conn = sqlite3.connect(context.smoke_folder / database)
    try:
        rows = conn.execute("SELECT sku, qty FROM items ORDER BY sku").fetchall()
    finally:
        conn.close()
    assert rows == [("apple", 12), ("pear", 7), ("plum", 10)], rows
