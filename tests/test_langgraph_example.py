"""The LangGraph example runs as a newcomer would run it, and tells the story it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "langgraph" / "shop_graph.py"


def test_the_shop_graph_example_runs_and_its_rows_agree_with_its_state(tmp_path: Path) -> None:
    db = tmp_path / "shop.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--db", str(db)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.count("rows and state agree") == 3
    assert "rolled back 'sell' to tool-" in out and "cannot sell 50" in out
    assert "waiting for a human: 'book the van for customer-42?'" in out
    assert "resumed in a second process" in out
    assert "stock {'pear': 1, 'plum': 10}, van bookings 1" in out
