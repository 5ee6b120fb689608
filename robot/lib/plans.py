"""Plan files, written from the templates in ``robot/plans/``.

A template is a plan whose variable parts are ``$name`` placeholders
(:class:`string.Template`), so it reads, and mostly parses, as the YAML it
becomes. Substitution is strict: a missing value is an error, never a blank.
"""

from __future__ import annotations

import functools
from pathlib import Path
from string import Template
from typing import Any

import yaml
from robot.api.deco import keyword

from lib.ledger import LEDGER_SCHEMA

PLANS = Path(__file__).resolve().parent.parent / "plans"
#: Ends the line of a bad plan that holds its problem; removed when the plan is written.
MARK = "  # <-"


@functools.cache
def _template(name: str) -> Template:
    return Template((PLANS / name).read_text(encoding="utf-8"))


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _bad_plan(folder: Path, name: str, template: str) -> tuple[str, int]:
    """Write the bad plan *template* as *name*.yaml; return its path and the problem's line."""
    text = _template(f"bad/{template}").substitute(name=name)
    line = next(n for n, part in enumerate(text.splitlines(), 1) if part.endswith(MARK))
    return _write(folder / f"{name}.yaml", text.replace(MARK, "")), line


class PlanFileKeywords:
    """Write plan files for the command to run."""

    @keyword
    def write_ledger_plan(
        self, folder: str, plan_id: str, location: str = "ledger.db", fail: bool = False
    ) -> str:
        """Write a plan adding three ledger rows for *plan_id*; with *fail*, its last step fails."""
        text = _template("ledger.yaml").substitute(
            plan_id=plan_id,
            location=location,
            schema=LEDGER_SCHEMA,
            outcome="then fails its check" if fail else "committed",
            expected=99 if fail else 3,
        )
        return _write(Path(folder) / f"{plan_id}.yaml", text)

    @keyword
    def write_slow_plan(self, folder: str, location: str = "ledger.db") -> str:
        """Write plan ``slow``: one ledger row, then a statement that would run for minutes."""
        text = _template("slow.yaml").substitute(location=location)
        return _write(Path(folder) / "slow.yaml", text)

    @keyword
    def write_ledger_plans(
        self, folder: str, count: int, fail_every: int, location: str = "ledger.db"
    ) -> dict[str, Any]:
        """Write *count* ledger plans sharing one database; every *fail_every*-th one fails."""
        plans: dict[str, Any] = {"paths": [], "committed": [], "failed": []}
        for index in range(1, int(count) + 1):
            plan_id = f"ledger-{index:02d}"
            fail = index % int(fail_every) == 0
            plans["paths"].append(self.write_ledger_plan(folder, plan_id, location, fail))
            plans["failed" if fail else "committed"].append(plan_id)
        plans["database"] = str(Path(folder) / location)
        return plans

    @keyword
    def write_bad_plans(self, folder: str) -> list[dict[str, Any]]:
        """Write one plan per kind of bad input; return their paths, problem lines and fields.

        The plans and the field each error must name are listed in
        ``robot/plans/bad/cases.yaml``.
        """
        cases = yaml.safe_load((PLANS / "bad" / "cases.yaml").read_text(encoding="utf-8"))
        written = []
        for index, case in enumerate(cases, 1):
            name = f"bad-{index}"
            path, line = _bad_plan(Path(folder), name, case["plan"])
            written.append(
                {
                    "problem": case["problem"],
                    "path": path,
                    "line": line,
                    "field": case["field"],
                    "database": str(Path(folder) / f"{name}.db"),
                }
            )
        return written
