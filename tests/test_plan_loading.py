"""Plan loading edge cases: line numbers, anchors, generated ids, locations and roots, schema."""

from __future__ import annotations

import inspect
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeHandler
from pydantic import BaseModel, ConfigDict

from cleveragents.errors import PlanError
from cleveragents.plan import MAX_PLAN_BYTES, load_plan, plan_json_schema
from cleveragents.plugins import get_plugin_manager, registries
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler
from cleveragents.resource.registry import ResourceRegistry

_STEP = "steps:\n  - id: s\n    resource: inv\n    sql: SELECT 1\n"


class _QueueSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    topic: str


class _QueueHandler(FakeHandler):
    """A second resource kind, to check what only a database can do."""

    kind = "queue"
    settings_model = _QueueSettings


@pytest.fixture
def kinds() -> ResourceRegistry:
    registry = ResourceRegistry()
    registry.add(DatabaseResourceHandler)
    registry.add(_QueueHandler)
    return registry


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run every test from a working folder that is not the plans' folder."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("CLEVERAGENTS_ALLOWED_ROOTS", raising=False)
    yield cwd


@pytest.fixture
def plans(tmp_path: Path) -> Path:
    folder = tmp_path / "plans"
    folder.mkdir()
    return folder


def _write(folder: Path, text: str, name: str = "plan.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _problems(
    path: Path, kinds: ResourceRegistry, **options: Any
) -> list[tuple[int | None, str, str]]:
    with pytest.raises(PlanError) as info:
        load_plan(path, kinds=kinds, tools=options.pop("tools", ()), **options)
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    assert all(repr(p) == f"PlanProblem({str(p)!r})" for p in info.value.problems)
    return [(p.line, p.field, p.message) for p in info.value.problems]


def _database(location: str, **extra: str) -> str:
    more = "".join(f"\n    {key}: {value}" for key, value in extra.items())
    return (
        f"resources:\n  inv:\n    kind: database\n    engine: sqlite\n"
        f"    location: {location!r}{more}\n"
    )


# -- line numbers -------------------------------------------------------------------


def test_nested_fields_are_reported_at_their_own_lines(
    plans: Path, kinds: ResourceRegistry
) -> None:
    path = _write(
        plans,
        """\
id: nested
resources:
  inv: {kind: database, engine: sqlite, location: inv.db}
steps:
  - id: a
    resource: inv
    sql: SELECT 1
  - id: b
    resource: inv
    expect:
      sql: SELECT 1
      equalz: 1
  - id: c
    tool: send_report
    with: {channel: ops}
    retry: -1
""",
    )
    assert _problems(path, kinds) == [
        (10, "steps[1].expect.equals", "required key is missing"),
        (12, "steps[1].expect.equalz", "unknown key"),
        (16, "steps[2].retry", "Input should be greater than or equal to 0"),
    ]


def test_resource_settings_are_reported_at_their_lines(
    plans: Path, kinds: ResourceRegistry
) -> None:
    path = _write(
        plans,
        """\
resources:
  inv:
    kind: database
    engine: sqlite
    location: inv.db
    busy_timeout: soon
    jornal_mode: wal
  q:
    kind: queue
    topic: 5
steps:
  - id: a
    resource: inv
    sql: SELECT 1
""",
    )
    problems = _problems(path, kinds)
    assert [(line, field) for line, field, _ in problems] == [
        (6, "resources.inv.busy_timeout"),
        (7, "resources.inv.jornal_mode"),
        (10, "resources.q.topic"),
    ]
    assert "expected a duration" in problems[0][2]
    assert problems[1][2] == "unknown key"


def test_problems_in_anchored_values_name_each_use(plans: Path, kinds: ResourceRegistry) -> None:
    path = _write(
        plans,
        """\
resources:
  inv: &db
    kind: database
    engine: sqlite
    location: inv.db
    journal_mode: nope
  other: *db
  third:
    <<: *db
    location: third.db
    busy_timeout: soon
steps:
  - &step
    id: a
    resource: inv
    sql: SELECT 1
  - <<: *step
    id: b
""",
    )
    problems = _problems(path, kinds)
    assert [(line, field) for line, field, _ in problems] == [
        (6, "resources.inv.journal_mode"),
        (7, "resources.other.journal_mode"),
        (8, "resources.third.journal_mode"),
        (11, "resources.third.busy_timeout"),
    ]


def test_anchors_and_merge_keys_are_expanded(plans: Path, kinds: ResourceRegistry) -> None:
    path = _write(
        plans,
        """\
resources:
  inv: &db {kind: database, engine: sqlite, location: inv.db, busy_timeout: 250ms}
  copy:
    <<: *db
    location: copy.db
steps:
  - &step {id: a, resource: inv, sql: SELECT 1}
  - <<: *step
    id: b
    resource: copy
""",
    )
    plan = load_plan(path, kinds=kinds, tools=())
    assert [step.id for step in plan.steps] == ["a", "b"]
    assert plan.steps[1].sql == "SELECT 1"
    assert plan.resource("copy").location == str(plans / "copy.db")
    assert plan.resource("copy").busy_timeout == "250ms"


def test_a_yaml_syntax_error_names_its_line(plans: Path, kinds: ResourceRegistry) -> None:
    path = _write(plans, "id: x\nsteps:\n  - id: a\n    sql: [unclosed\n")
    ((line, field, message),) = _problems(path, kinds)
    assert (line, field) == (5, "")
    assert message.startswith("YAML: expected ',' or ']'")


def test_an_alias_to_nothing_is_a_yaml_problem(plans: Path, kinds: ResourceRegistry) -> None:
    path = _write(plans, "id: x\nsteps: *missing\n")
    ((line, _, message),) = _problems(path, kinds)
    assert line == 2
    assert "undefined alias" in message


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "file is empty; a plan needs 'steps'"),
        (b"# only a comment\n", "file is empty; a plan needs 'steps'"),
        (b"- a\n- b\n", "a plan must be a mapping with 'steps', not list"),
        (b"just text\n", "a plan must be a mapping with 'steps', not str"),
        (b"\xff\xfe\x00", "not UTF-8 text (invalid start byte)"),
        (b"!!python/object:os.system {}\n", "YAML: could not determine a constructor"),
    ],
)
def test_files_that_are_not_plans(
    plans: Path, kinds: ResourceRegistry, content: bytes, message: str
) -> None:
    path = plans / "plan.yaml"
    path.write_bytes(content)
    ((_, field, got),) = _problems(path, kinds)
    assert field == ""
    assert got.startswith(message)


def test_missing_folder_and_oversized_files_are_refused(
    plans: Path, kinds: ResourceRegistry
) -> None:
    assert _problems(plans / "absent.yaml", kinds) == [(None, "", "file not found")]
    assert _problems(plans, kinds) == [(None, "", "is a folder, not a plan file")]
    big = plans / "big.yaml"
    big.write_bytes(b"#" * (MAX_PLAN_BYTES + 1))
    ((line, _, message),) = _problems(big, kinds)
    assert line is None
    assert message == f"file is {MAX_PLAN_BYTES + 1} bytes; plans are limited to {MAX_PLAN_BYTES}"


def test_unreadable_files_are_reported(plans: Path, kinds: ResourceRegistry) -> None:
    path = _write(plans, "id: x\n" + _STEP)
    ((_, _, message),) = _problems(path / "inside", kinds)
    assert message == "cannot be read: Not a directory"


def test_too_many_yaml_values_are_refused(
    plans: Path, kinds: ResourceRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real bound is 100,000 values; a small one keeps the test fast.
    monkeypatch.setattr("cleveragents.plan._MAX_NODES", 50)
    path = _write(plans, "id: x\nbig: [" + ",".join(["1"] * 51) + "]\n" + _STEP)
    ((_, _, message),) = _problems(path, kinds)
    assert message == "YAML has more than 50 values"


def test_duplicate_keys_are_refused_at_the_second(plans: Path, kinds: ResourceRegistry) -> None:
    path = _write(plans, "id: x\nsteps:\n  - id: a\n    tool: t\n    tool: u\n")
    assert _problems(path, kinds, tools={"t", "u"}) == [
        (5, "", "YAML: duplicate key 'tool' (first at line 4)")
    ]


def test_deeply_nested_yaml_is_refused(plans: Path, kinds: ResourceRegistry) -> None:
    path = _write(plans, "id: x\nsteps: " + "[" * 400 + "]" * 400 + "\n")
    # PyYAML is slow on deep nesting; a lower recursion limit gets to the point sooner.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack(0)) + 250)
    try:
        with pytest.raises(PlanError) as info:
            load_plan(path, kinds=kinds, tools=())
    finally:
        sys.setrecursionlimit(limit)
    assert [str(p) for p in info.value.problems] == [f"{path}: YAML is nested too deeply"]


def test_characters_yaml_cannot_hold_are_refused(plans: Path, kinds: ResourceRegistry) -> None:
    path = _write(plans, "id: x\x07\n" + _STEP)
    ((line, _, message),) = _problems(path, kinds)
    assert line is None
    assert message.startswith("YAML: unacceptable character #x0007")


def test_an_unknown_engine_is_reported_at_its_line(plans: Path, kinds: ResourceRegistry) -> None:
    path = _write(plans, _database("inv.db").replace("sqlite", "oracle") + _STEP)
    ((line, field, message),) = _problems(path, kinds)
    assert (line, field) == (4, "resources.inv.engine")
    assert "'sqlite'" in message


def test_an_alias_bomb_is_not_expanded(plans: Path, kinds: ResourceRegistry) -> None:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    body = "\n".join(f"      {line}" for line in lines)
    path = _write(plans, f"id: bomb\nsteps:\n  - id: a\n    tool: t\n    with:\n{body}\n")
    plan = load_plan(path, kinds=kinds, tools={"t"})
    assert plan.steps[0].with_["a9"][0][0] is plan.steps[0].with_["a8"][0]


# -- references -----------------------------------------------------------------


def test_unknown_kind_resource_tool_and_sql_on_other_kinds(
    plans: Path, kinds: ResourceRegistry
) -> None:
    path = _write(
        plans,
        """\
resources:
  q: {kind: queue, topic: orders}
  x: {kind: blob}
steps:
  - id: a
    resource: q
    sql: SELECT 1
  - id: b
    resource: nowhere
    sql: SELECT 1
  - id: c
    tool: no_such_tool
  - id: d
    resource: q
    expect: {sql: SELECT 1, equals: 1}
""",
    )
    assert _problems(path, kinds, tools={"send_report"}) == [
        (3, "resources.x.kind", "unknown resource kind 'blob' (known: database, queue)"),
        (7, "steps[0].sql", "'sql' and 'expect' need a database resource, not 'queue'"),
        (9, "steps[1].resource", "unknown resource 'nowhere' (known: q, x)"),
        (12, "steps[2].tool", "unknown tool 'no_such_tool' (registered: send_report)"),
        (15, "steps[3].expect", "'sql' and 'expect' need a database resource, not 'queue'"),
    ]


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("{id: a, tool: t, sql: SELECT 1}", "a step runs either a 'tool' or 'sql'/'expect'"),
        ("{id: a}", "a step needs 'sql', 'expect' or 'tool'"),
        ("{id: a, sql: SELECT 1}", "a step with 'sql' or 'expect' needs 'resource'"),
        ("{id: a, tool: t, params: {x: 1}}", "'params' needs 'sql'"),
        ("{id: a, resource: inv, sql: SELECT 1, with: {x: 1}}", "'with' needs 'tool'"),
        ('{id: "a\\tb", tool: t}', "must be 1 to 256 printable characters"),
        ("{id: '', tool: t}", "must be 1 to 256 printable characters"),
    ],
)
def test_step_shape_problems(plans: Path, kinds: ResourceRegistry, step: str, message: str) -> None:
    path = _write(plans, _database("inv.db") + f"steps:\n  - {step}\n")
    ((line, field, got),) = _problems(path, kinds, tools={"t"})
    assert line == 7
    assert field.startswith("steps[0]")
    assert message in got


def test_duplicate_step_ids_are_refused(plans: Path, kinds: ResourceRegistry) -> None:
    path = _write(plans, "steps:\n  - {id: a, tool: t}\n  - {id: a, tool: t}\n")
    assert _problems(path, kinds, tools={"t"}) == [(3, "steps[1].id", "duplicate step id 'a'")]


def test_default_registries_come_from_the_plugins(plans: Path) -> None:
    path = _write(plans, _database("inv.db") + "steps:\n  - {id: a, tool: send_report}\n")
    plan = load_plan(path)
    assert plan.steps[0].tool == "send_report"
    with pytest.raises(PlanError, match="unknown tool 'send_report'"):
        load_plan(path, tools=())


# -- ids --------------------------------------------------------------------------


def test_plan_ids_are_generated_from_the_file_name(plans: Path, kinds: ResourceRegistry) -> None:
    path = _write(plans, _database("inv.db") + _STEP, name="restock-plan.yaml")
    first = load_plan(path, kinds=kinds, tools=())
    second = load_plan(path, kinds=kinds, tools=())
    assert re.fullmatch(r"restock-plan-[0-9a-f]{8}", first.id)
    assert re.fullmatch(r"restock-plan-[0-9a-f]{8}", second.id)
    assert first.id != second.id
    assert first.source == str(path)


def test_given_plan_ids_are_kept_and_checked(plans: Path, kinds: ResourceRegistry) -> None:
    path = _write(plans, "id: restock\n" + _database("inv.db") + _STEP)
    assert load_plan(path, kinds=kinds, tools=()).id == "restock"
    bad = _write(plans, "id: 'x\\ny'\n" + _database("inv.db") + _STEP, name="bad.yaml")
    bad.write_text('id: "x\\ny"\n' + _database("inv.db") + _STEP)
    ((line, field, message),) = _problems(bad, kinds)
    assert (line, field) == (1, "id")
    assert "printable characters" in message


# -- locations and roots ----------------------------------------------------------------


def test_relative_locations_resolve_against_the_plan_folder(
    plans: Path, kinds: ResourceRegistry, _elsewhere: Path
) -> None:
    (plans / "data").mkdir()
    path = _write(plans, _database("data/inv.db") + _STEP)
    plan = load_plan(path, kinds=kinds, tools=())
    assert plan.resource("inv").location == str(plans / "data" / "inv.db")
    assert not (_elsewhere / "data").exists()


def test_memory_locations_are_kept_as_they_are(plans: Path, kinds: ResourceRegistry) -> None:
    path = _write(plans, _database(":memory:") + _STEP)
    assert load_plan(path, kinds=kinds, tools=()).resource("inv").location == ":memory:"


def test_locations_in_the_working_folder_are_allowed(
    plans: Path, kinds: ResourceRegistry, _elsewhere: Path
) -> None:
    target = _elsewhere / "inv.db"
    path = _write(plans, _database(str(target)) + _STEP)
    assert load_plan(path, kinds=kinds, tools=()).resource("inv").location == str(target)


@pytest.mark.parametrize("location", ["../outside/inv.db", "/etc/inv.db", "~/inv.db"])
def test_locations_outside_the_roots_are_refused(
    plans: Path, kinds: ResourceRegistry, tmp_path: Path, location: str
) -> None:
    (tmp_path / "outside").mkdir()
    path = _write(plans, _database(location) + _STEP)
    ((line, field, message),) = _problems(path, kinds)
    assert (line, field) == (5, "resources.inv.location")
    assert message.startswith(f"{location!r} is outside the allowed folders")


def test_a_symlink_out_of_the_plan_folder_is_refused(
    plans: Path, kinds: ResourceRegistry, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (plans / "link").symlink_to(outside)
    path = _write(plans, _database("link/inv.db") + _STEP)
    ((_, field, message),) = _problems(path, kinds)
    assert field == "resources.inv.location"
    assert "outside the allowed folders" in message


def test_allowed_roots_from_the_environment(
    plans: Path, kinds: ResourceRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    path = _write(plans, _database(str(second / "inv.db")) + _STEP)
    with pytest.raises(PlanError, match="outside the allowed folders"):
        load_plan(path, kinds=kinds, tools=())
    monkeypatch.setenv("CLEVERAGENTS_ALLOWED_ROOTS", f"{first}{os.pathsep}{os.pathsep}{second}")
    plan = load_plan(path, kinds=kinds, tools=())
    assert plan.resource("inv").location == str(second / "inv.db")


def test_allowed_roots_given_by_the_caller(
    plans: Path, kinds: ResourceRegistry, tmp_path: Path
) -> None:
    extra = tmp_path / "extra"
    (extra / "sub").mkdir(parents=True)
    path = _write(plans, _database("../extra/sub/inv.db") + _STEP)
    with pytest.raises(PlanError, match="outside the allowed folders"):
        load_plan(path, kinds=kinds, tools=())
    plan = load_plan(path, kinds=kinds, tools=(), allowed_roots_extra=[extra])
    assert plan.resource("inv").location == str(extra / "sub" / "inv.db")


def test_a_location_must_be_a_file_in_an_existing_folder(
    plans: Path, kinds: ResourceRegistry
) -> None:
    (plans / "folder.db").mkdir()
    missing = _write(plans, _database("nowhere/inv.db") + _STEP, name="missing.yaml")
    folder = _write(plans, _database("folder.db") + _STEP, name="folder.yaml")
    ((_, _, message),) = _problems(missing, kinds)
    assert message == f"folder {str(plans / 'nowhere')!r} does not exist"
    ((_, _, message),) = _problems(folder, kinds)
    assert message == "'folder.db' is a folder, not a database file"


def test_a_resource_the_handler_refuses_outright(
    plans: Path, kinds: ResourceRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(resource: Resource) -> BaseModel:
        raise ValueError(f"{resource.name} is not served here")

    monkeypatch.setattr(_QueueHandler, "validate_settings", refuse)
    path = _write(plans, "resources:\n  q: {kind: queue, topic: t}\nsteps:\n  - {id: a, tool: t}\n")
    assert _problems(path, kinds, tools={"t"}) == [(2, "resources.q", "q is not served here")]


# -- schema -------------------------------------------------------------------------


def test_plan_json_schema_describes_plans_and_each_kind(kinds: ResourceRegistry) -> None:
    schema = plan_json_schema(kinds)
    assert schema["title"] == "cleveragents plan"
    assert set(schema["properties"]) == {"id", "description", "resources", "steps"}
    variants = schema["properties"]["resources"]["additionalProperties"]["anyOf"]
    assert len(variants) == 2
    sqlite = schema["$defs"]["SQLiteSettings"]
    assert sqlite["properties"]["kind"] == {"const": "database"}
    assert {"kind", "location"} <= set(sqlite["required"])
    assert sqlite["additionalProperties"] is False
    step = schema["$defs"]["Step"]
    assert "with" in step["properties"]
    assert "with_" not in step["properties"]
    assert step["properties"]["retry"]["maximum"] == 100
    assert step["additionalProperties"] is False


def test_plan_json_schema_without_kinds_keeps_generic_resources() -> None:
    schema = plan_json_schema(ResourceRegistry())
    resources = schema["properties"]["resources"]
    assert "anyOf" not in resources.get("additionalProperties", {})
    assert "kind" in schema["$defs"]["ResourceEntry"]["properties"]


def test_plan_json_schema_from_the_default_plugins() -> None:
    kinds, _ = registries(get_plugin_manager())
    schema = plan_json_schema(kinds)
    assert "SQLiteSettings" in schema["$defs"]
