"""Plan models and :func:`load_plan`: plan YAML in, a validated :class:`Plan` out.

Validation runs in two steps. The models here check the plan's own shape
(ids, steps, which resource each step names); each resource entry is then
checked against the settings of its kind's handler, so third-party kinds need
no change here. Every problem names the file, the line and the field.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from cleveragents.errors import PlanError, PlanProblem
from cleveragents.ids import id_problem
from cleveragents.resource.base import _SECRET_KEYS, Resource

if TYPE_CHECKING:
    from cleveragents.resource.registry import ResourceRegistry

#: Plan files larger than this are refused before parsing.
MAX_PLAN_BYTES = 1_000_000
_MAX_NODES = 100_000
#: Settings whose value is a filesystem path, resolved against the plan's folder.
PATH_SETTINGS = ("location",)
MEMORY = ":memory:"


def _check_id(value: str) -> str:
    problem = id_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


class Expect(BaseModel):
    """A query whose single value must equal ``equals``, or the step fails."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sql: str = Field(min_length=1, description="A query returning one row with one column.")
    params: dict[str, Any] | list[Any] | None = Field(
        default=None, description="Values bound to the query's ':name' (mapping) or '?' (list)."
    )
    equals: Any = Field(description="The value the query must return.")


class Step(BaseModel):
    """One step of a plan: SQL on a resource, a check, or a registered tool."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    id: str = Field(description="Unique within the plan.")
    description: str | None = Field(default=None, description="What the step is for.")
    resource: str | None = Field(
        default=None, description="The resource the step works on (a key of 'resources')."
    )
    sql: str | None = Field(default=None, min_length=1, description="A statement to run.")
    params: dict[str, Any] | list[Any] | None = Field(
        default=None, description="Values bound to ':name' (mapping) or '?' (list)."
    )
    expect: Expect | None = Field(default=None, description="A check that must hold.")
    tool: str | None = Field(default=None, description="A tool registered by a plugin.")
    with_: dict[str, Any] = Field(
        default_factory=dict, alias="with", description="Keyword arguments of the tool."
    )
    checkpoint: bool = Field(
        default=False,
        description="Take a checkpoint before the step (on every resource for a tool step "
        "without 'resource').",
    )
    retry: int = Field(
        default=0,
        ge=0,
        le=100,
        description="On failure, roll back to the step's checkpoint and run it again, up to "
        "this many more times. Implies 'checkpoint: true'.",
    )

    _check_step_id = field_validator("id")(_check_id)

    @model_validator(mode="after")
    def _check_action(self) -> Step:
        if self.tool is not None:
            if self.sql is not None or self.expect is not None:
                raise ValueError("a step runs either a 'tool' or 'sql'/'expect', not both")
        elif self.sql is None and self.expect is None:
            raise ValueError("a step needs 'sql', 'expect' or 'tool'")
        elif self.resource is None:
            raise ValueError("a step with 'sql' or 'expect' needs 'resource'")
        if self.params is not None and self.sql is None:
            raise ValueError("'params' needs 'sql' (a check has its own 'params')")
        if self.with_ and self.tool is None:
            raise ValueError("'with' needs 'tool'")
        return self

    @property
    def takes_checkpoint(self) -> bool:
        """Whether a checkpoint is taken before the step (``retry`` implies it)."""
        return self.checkpoint or self.retry > 0


class ResourceEntry(BaseModel):
    """A resource entry: its kind, plus the settings its kind's handler defines."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: str = Field(description="The resource kind, e.g. 'database'.")

    def to_resource(self, name: str) -> Resource:
        """Return the :class:`Resource` this entry describes."""
        return Resource(name, self.kind, **(self.model_extra or {}))

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        # A secret setting (a DSN) never shows in repr(), as in Resource's.
        for key, value in super().__repr_args__():
            yield key, "***" if key in _SECRET_KEYS else value


class Plan(BaseModel):
    """A validated plan: its resources and its steps, in order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(default="", description="Plan id; generated when absent.")
    description: str | None = Field(default=None, description="What the plan does.")
    resources: dict[str, ResourceEntry] = Field(
        default_factory=dict, description="Resources the steps use, by name."
    )
    steps: list[Step] = Field(min_length=1, description="The steps, run in order.")
    source: str | None = Field(
        default=None, exclude=True, description="The file the plan was loaded from."
    )
    _id_line: int | None = PrivateAttr(default=None)

    @field_validator("id")
    @classmethod
    def _check_plan_id(cls, value: str) -> str:
        return _check_id(value) if value else value

    @model_validator(mode="after")
    def _check_references(self) -> Plan:
        seen: set[str] = set()
        for step in self.steps:
            if step.id in seen:
                raise ValueError(f"duplicate step id {step.id!r}")
            seen.add(step.id)
        return self

    def resource(self, name: str) -> Resource:
        """Return the resource called *name*."""
        return self.resources[name].to_resource(name)

    @property
    def id_line(self) -> int | None:
        """The line of ``id:`` in :attr:`source` (``None``: a generated id, or made in code)."""
        return self._id_line


# -- YAML with line numbers -------------------------------------------------------


class _Located:
    """Line numbers of the values in a parsed YAML document, by path."""

    def __init__(self) -> None:
        self.lines: dict[tuple[Any, ...], int] = {}

    def line_of(self, path: Iterable[Any], data: Any) -> int | None:
        """Return the line of the deepest part of *path* that exists in *data*."""
        found: list[Any] = []
        for part in path:
            if (isinstance(data, Mapping) and part in data) or (
                isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)
            ):
                data = data[part]
            else:
                continue
            found.append(part)
        key = tuple(found)
        while key not in self.lines and key:
            key = key[:-1]
        return self.lines.get(key)


def _walk(node: yaml.Node, path: tuple[Any, ...], located: _Located, seen: set[int]) -> None:
    if id(node) in seen:
        return  # an alias: its lines are where it was first written
    seen.add(id(node))
    if len(seen) > _MAX_NODES:
        raise _TooLarge
    located.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        first_lines: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if isinstance(key, str) and key != "<<":
                # PyYAML keeps the last of two equal keys; a reader sees the first.
                first = first_lines.get((key_node.tag, key))
                if first is not None:
                    problem = f"duplicate key {key!r} (first at line {first})"
                    raise yaml.constructor.ConstructorError(
                        None, None, problem, key_node.start_mark
                    )
                first_lines[(key_node.tag, key)] = key_node.start_mark.line + 1
            located.lines.setdefault((*path, key), key_node.start_mark.line + 1)
            _walk(value_node, (*path, key), located, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*path, index), located, seen)


class _TooLarge(Exception):
    pass


def _parse(path: Path, shown: str) -> tuple[Any, _Located]:
    text = _read(path, shown)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            raise _unreadable(shown, 1, "file is empty; a plan needs 'steps'")
        located = _Located()
        _walk(node, (), located, set())
        data = yaml.SafeLoader(text).get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise _unreadable(shown, line, f"YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise _unreadable(shown, None, f"YAML: {exc}") from None
    except RecursionError:
        raise _unreadable(shown, None, "YAML is nested too deeply") from None
    except _TooLarge:
        raise _unreadable(shown, None, f"YAML has more than {_MAX_NODES} values") from None
    if not isinstance(data, dict):
        problem = f"a plan must be a mapping with 'steps', not {type(data).__name__}"
        raise _unreadable(shown, 1, problem)
    return data, located


def _read(path: Path, shown: str) -> str:
    """Return the plan file's text, refusing what is too large or not UTF-8 text."""
    try:
        size = path.stat().st_size
        if size > MAX_PLAN_BYTES:
            problem = f"file is {size} bytes; plans are limited to {MAX_PLAN_BYTES}"
            raise _unreadable(shown, None, problem)
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _unreadable(shown, None, "file not found") from None
    except IsADirectoryError:
        raise _unreadable(shown, None, "is a folder, not a plan file") from None
    except UnicodeDecodeError as exc:
        raise _unreadable(shown, None, f"not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise _unreadable(shown, None, f"cannot be read: {exc.strerror}") from None


def _unreadable(shown: str, line: int | None, message: str) -> PlanError:
    return PlanError([PlanProblem(shown, line, "", message)])


def _field_name(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


def _problems_from(
    exc: ValidationError, prefix: tuple[Any, ...], data: Any, located: _Located, shown: str
) -> list[PlanProblem]:
    problems = []
    for error in exc.errors():
        loc = tuple(part for part in error["loc"] if part != "with_")
        loc = tuple("with" if part == "with_" else part for part in loc)
        full = (*prefix, *loc)
        # Drop parts pydantic adds that are not keys in the file (union tags).
        kept = []
        probe: Any = data
        for index, part in enumerate(full):
            last = index == len(full) - 1
            if (isinstance(probe, Mapping) and part in probe) or (
                isinstance(probe, list) and isinstance(part, int) and 0 <= part < len(probe)
            ):
                probe = probe[part]
            elif not (last and error["type"] == "missing"):
                continue
            kept.append(part)
        message = _MESSAGES.get(error["type"], error["msg"])
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        problems.append(PlanProblem(shown, located.line_of(kept, data), _field_name(kept), message))
    return problems


def allowed_roots(plan_path: Path, extra: Iterable[str | os.PathLike[str]] = ()) -> list[Path]:
    """Return the folders a plan's locations may be in: its own, the working one, *extra*."""
    roots = [plan_path.resolve().parent, Path.cwd().resolve()]
    env = os.environ.get("CLEVERAGENTS_ALLOWED_ROOTS", "")
    roots += [Path(p).resolve() for p in env.split(os.pathsep) if p]
    roots += [Path(p).resolve() for p in extra]
    return roots


class _Problems:
    """The problems found in one plan file, each placed at its line."""

    def __init__(self, shown: str, data: Any, located: _Located) -> None:
        self.shown = shown
        self.data = data
        self.located = located
        self.found: list[PlanProblem] = []

    def add(self, where: tuple[Any, ...], message: str) -> None:
        """Note that the value at *where* is wrong because of *message*."""
        line = self.located.line_of(where, self.data)
        self.found.append(PlanProblem(self.shown, line, _field_name(where), message))

    def add_validation(self, exc: ValidationError, prefix: tuple[Any, ...]) -> None:
        """Note every problem of *exc*, raised validating the value at *prefix*."""
        self.found += _problems_from(exc, prefix, self.data, self.located, self.shown)

    def error(self) -> PlanError:
        """Return them as one error, in the order of their lines."""
        return PlanError(sorted(self.found, key=lambda p: p.line or 0))


def load_plan(
    path: str | os.PathLike[str],
    *,
    kinds: ResourceRegistry | None = None,
    tools: Collection[str] | None = None,
    allowed_roots_extra: Iterable[str | os.PathLike[str]] = (),
) -> Plan:
    """Read, validate and return the plan in *path*.

    *kinds* and *tools* are what the loaded plugins provide; when ``None``,
    the default plugin manager is asked. Relative locations resolve against the
    plan's folder and must stay inside the allowed roots.

    :raises PlanError: the plan is bad input; every problem names file, line and field.
    """
    if kinds is None or tools is None:
        from cleveragents.plugins import get_plugin_manager, registries

        found_kinds, found_tools = registries(get_plugin_manager())
        kinds = found_kinds if kinds is None else kinds
        tools = found_tools if tools is None else tools
    plan_path = Path(path)
    shown = str(path)
    data, located = _parse(plan_path, shown)
    problems = _Problems(shown, data, located)
    plan = _validate_shape(data, problems)
    roots = allowed_roots(plan_path, allowed_roots_extra)
    resources = _check_resources(plan, kinds, plan_path, roots, problems)
    _check_steps(plan, tools, problems)
    if problems.found:
        raise problems.error()
    plan_id = plan.id or f"{plan_path.stem}-{uuid.uuid4().hex[:8]}"
    loaded = plan.model_copy(update={"id": plan_id, "resources": resources, "source": shown})
    loaded._id_line = located.line_of(("id",), data) if plan.id else None
    return loaded


def _validate_shape(data: dict[str, Any], problems: _Problems) -> Plan:
    """Check the plan's own shape (ids, steps, keys); raise with every problem found."""
    # Duplicate ids are found on the raw data too, so they are reported along
    # with any other problem instead of only once the rest is valid.
    seen: set[Any] = set()
    raw_steps = data.get("steps")
    for index, raw in enumerate(raw_steps if isinstance(raw_steps, list) else []):
        step_id = raw.get("id") if isinstance(raw, dict) else None
        if isinstance(step_id, str) and step_id in seen:
            problems.add(("steps", index, "id"), f"duplicate step id {step_id!r}")
        seen.add(step_id)
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        found = _problems_from(exc, (), problems.data, problems.located, problems.shown)
        problems.found += [p for p in found if not p.message.startswith("duplicate step id")]
        raise problems.error() from None
    assert not problems.found, "a duplicate step id always fails Plan's own validation"
    return plan


def _check_resources(
    plan: Plan,
    kinds: ResourceRegistry,
    plan_path: Path,
    roots: list[Path],
    problems: _Problems,
) -> dict[str, ResourceEntry]:
    """Check each resource entry against its kind's settings; return them, locations resolved."""
    resources: dict[str, ResourceEntry] = {}
    for name, entry in plan.resources.items():
        handler_cls = kinds.get(entry.kind)
        if handler_cls is None:
            known = ", ".join(kinds) or "none"
            problems.add(
                ("resources", name, "kind"),
                f"unknown resource kind {entry.kind!r} (known: {known})",
            )
            continue
        options = _resolved_options(name, entry, plan_path, roots, problems)
        try:
            handler_cls.validate_settings(Resource(name, entry.kind, **options))
        except ValidationError as exc:
            problems.add_validation(exc, ("resources", name))
            continue
        except ValueError as exc:
            problems.add(("resources", name), str(exc))
            continue
        resources[name] = ResourceEntry(kind=entry.kind, **options)
    return resources


def _resolved_options(
    name: str, entry: ResourceEntry, plan_path: Path, roots: list[Path], problems: _Problems
) -> dict[str, Any]:
    """Return the entry's settings with its paths resolved (a refused one is left as written)."""
    options = dict(entry.model_extra or {})
    for key in PATH_SETTINGS:
        value = options.get(key)
        if isinstance(value, str) and value and value != MEMORY:
            resolved, error = _resolve_location(plan_path, value, roots)
            if error:
                problems.add(("resources", name, key), error)
                continue
            options[key] = resolved
    return options


def _check_steps(plan: Plan, tools: Collection[str], problems: _Problems) -> None:
    """Check that every step names a known resource or tool, of a kind that fits."""
    for index, step in enumerate(plan.steps):
        if step.resource is not None and step.resource not in plan.resources:
            known = ", ".join(sorted(plan.resources)) or "none"
            problems.add(
                ("steps", index, "resource"), f"unknown resource {step.resource!r} (known: {known})"
            )
        if step.tool is not None and step.tool not in tools:
            known = ", ".join(sorted(tools)) or "none"
            problems.add(
                ("steps", index, "tool"), f"unknown tool {step.tool!r} (registered: {known})"
            )
        if step.tool is None and step.resource in plan.resources:
            kind = plan.resources[step.resource].kind
            if kind != "database":
                problems.add(
                    ("steps", index, "sql" if step.sql else "expect"),
                    f"'sql' and 'expect' need a database resource, not {kind!r}",
                )


def _resolve_location(plan_path: Path, value: str, roots: list[Path]) -> tuple[str, str | None]:
    location = (plan_path.resolve().parent / os.path.expanduser(value)).resolve()
    if not any(location.is_relative_to(root) for root in roots):
        return "", (
            f"{value!r} is outside the allowed folders (the plan's folder, the working "
            "folder, --allow-root / CLEVERAGENTS_ALLOWED_ROOTS)"
        )
    if not location.parent.is_dir():
        return "", f"folder {str(location.parent)!r} does not exist"
    if location.is_dir():
        return "", f"{value!r} is a folder, not a database file"
    return str(location), None


def plan_json_schema(kinds: ResourceRegistry) -> dict[str, Any]:
    """Return the JSON Schema of plan files, with each kind's resource settings."""
    schema = Plan.model_json_schema(by_alias=True)
    schema["properties"].pop("source", None)
    defs = schema.setdefault("$defs", {})
    variants = []
    for kind in kinds:
        handler_cls = kinds.get(kind)
        assert handler_cls is not None
        kind_schema = handler_cls.settings_json_schema()
        defs.update(kind_schema.pop("$defs", {}))
        variants.append(kind_schema)
    if variants:
        schema["properties"]["resources"]["additionalProperties"] = {"anyOf": variants}
    schema["title"] = "cleveragents plan"
    return schema
