"""The README's hook table and the hook specifications say the same thing.

Plugin authors write their ``@hookimpl`` functions from the README's "Hooks"
table: a hook missing there is one nobody implements, a parameter missing is
one nobody receives, and a row for a hook that does not exist is an
implementation pluggy rejects at start. The specifications are read from a
plugin manager, as the runtime loads them, not from the source text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import pluggy
import pytest

from cleveragents import hookspecs

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "### Hooks"
#: A table row whose first cell is a call: | `name(a, b)` | ... |
_ROW = re.compile(r"^\|\s*`(?P<name>\w+)\((?P<params>[^)]*)\)`\s*\|")

Hooks = Mapping[str, tuple[str, ...]]


def documented_hooks(text: str) -> dict[str, tuple[str, ...]]:
    """Return ``{hook: parameters}`` from the table under ``### Hooks`` in Markdown *text*.

    :raises ValueError: the heading is missing, or a hook has two rows.
    """
    lines = text.splitlines()
    start = lines.index(HEADING) + 1
    documented: dict[str, tuple[str, ...]] = {}
    for line in lines[start:]:
        if line.startswith("#"):
            break  # the next section
        match = _ROW.match(line)
        if match is None:
            continue
        if match["name"] in documented:
            raise ValueError(f"{match['name']} has two rows")
        params = tuple(part.strip() for part in match["params"].split(",") if part.strip())
        documented[match["name"]] = params
    return documented


def specified_hooks() -> dict[str, tuple[str, ...]]:
    """Return ``{hook: parameters}`` of every hook a plugin manager learns from hookspecs.py."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    return {
        name: tuple(caller.spec.argnames)
        for name, caller in vars(pm.hook).items()
        if isinstance(caller, pluggy.HookCaller) and caller.spec is not None
    }


def _call(name: str, params: tuple[str, ...]) -> str:
    return f"{name}({', '.join(params)})"


def mismatches(documented: Hooks, specified: Hooks) -> list[str]:
    """Return what the documentation gets wrong about the *specified* hooks, one line each."""
    found = [f"{name} is not documented" for name in sorted(set(specified) - set(documented))]
    found += [f"{name} does not exist" for name in sorted(set(documented) - set(specified))]
    found += [
        f"documented as {_call(name, documented[name])}, specified as {_call(name, params)}"
        for name, params in sorted(specified.items())
        if name in documented and documented[name] != params
    ]
    return found


#: The hooks of the project contract (DESIGN.md, "Plugin contract"), which plugins rely on.
DESIGN_HOOKS = {
    "cleveragents_register_resource_handlers": ("registry",),
    "cleveragents_register_tools": ("registry",),
    "cleveragents_plan_started": ("plan",),
    "cleveragents_plan_completed": ("plan",),
    "cleveragents_plan_failed": ("plan", "error"),
}


def test_hookspecs_specifies_the_hooks_of_the_design() -> None:
    assert specified_hooks() == DESIGN_HOOKS


def test_the_readme_hook_table_matches_hookspecs() -> None:
    documented = documented_hooks(README.read_text(encoding="utf-8"))
    assert mismatches(documented, specified_hooks()) == []


SPECIFIED = {"started": ("plan",), "failed": ("plan", "error")}
TABLE = """\
### Hooks

| hook | called |
| --- | --- |
{rows}
## More

| `ignored(x)` | a table of another section |
"""


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ("| `started(plan)` | x |\n| `failed(plan, error)` | y |", []),
        ("| `started(plan)` | x |", ["failed is not documented"]),
        (
            "| `started(plan)` | x |\n| `failed(plan)` | y |",
            ["documented as failed(plan), specified as failed(plan, error)"],
        ),
        (
            "| `started(plan)` | x |\n| `failed(plan, error)` | y |\n| `gone(plan)` | z |",
            ["gone does not exist"],
        ),
        (
            "| `started()` | x |\n| `failed(error, plan)` | y |",
            [
                "documented as failed(error, plan), specified as failed(plan, error)",
                "documented as started(), specified as started(plan)",
            ],
        ),
    ],
    ids=["matching", "missing hook", "missing parameter", "unknown hook", "wrong parameters"],
)
def test_mismatches_name_each_difference(rows: str, expected: list[str]) -> None:
    documented = documented_hooks(TABLE.format(rows=rows))
    assert mismatches(documented, SPECIFIED) == expected


def test_a_hook_documented_twice_is_an_error() -> None:
    rows = "| `started(plan)` | x |\n| `started(plan)` | again |"
    with pytest.raises(ValueError, match=r"^started has two rows$"):
        documented_hooks(TABLE.format(rows=rows))


def test_a_readme_without_the_hooks_heading_is_an_error() -> None:
    with pytest.raises(ValueError):
        documented_hooks("# cleveragents\n\nno hooks here\n")
