"""The plugin manager, the kind and tool registries, and isolated event dispatch."""

from __future__ import annotations

import importlib.metadata
import logging
import sys
import types
from collections.abc import Callable
from typing import Any

import pluggy
import pytest
from fakes import FakeHandler, RecordingSubscriber

from cleveragents.errors import PluginError
from cleveragents.hookspecs import hookimpl
from cleveragents.plugins import (
    BUILTIN_PLUGINS,
    SubscriberError,
    dispatch,
    get_plugin_manager,
    plugin_source,
    registries,
)
from cleveragents.resource.handlers.database import DatabaseResourceHandler
from cleveragents.resource.registry import ResourceRegistry
from cleveragents.tools import ToolRegistry


class _FakeDistribution:
    """Just enough of importlib.metadata.Distribution for the entry-point loader."""

    def __init__(self, name: str, version: str, *entry_points: tuple[str, str, str]) -> None:
        self.metadata = {"name": name}
        self.version = version
        self.entry_points = [
            importlib.metadata.EntryPoint(name=ep_name, value=value, group=group)
            for ep_name, value, group in entry_points
        ]


@pytest.fixture
def distributions(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Replace the installed distributions with the fakes given."""

    def install(*dists: _FakeDistribution) -> None:
        monkeypatch.setattr(importlib.metadata, "distributions", lambda: list(dists))

    return install


@pytest.fixture
def module(monkeypatch: pytest.MonkeyPatch) -> Callable[..., types.ModuleType]:
    """Make an importable module holding the given functions."""

    def make(name: str, **attributes: Any) -> types.ModuleType:
        made = types.ModuleType(name)
        for key, value in attributes.items():
            setattr(made, key, value)
        monkeypatch.setitem(sys.modules, name, made)
        return made

    return make


# -- get_plugin_manager -------------------------------------------------------------


def test_each_call_builds_a_fresh_manager_with_builtins_and_entry_points() -> None:
    first, second = get_plugin_manager(), get_plugin_manager()
    assert first is not second
    names = dict(first.list_name_plugin())
    assert set(BUILTIN_PLUGINS) <= set(names)
    assert "example_report" in names
    assert plugin_source(first, names["example_report"]).startswith("cleveragents-example-report ")
    assert plugin_source(first, names[BUILTIN_PLUGINS[0]]) == "built-in"
    kinds, tools = registries(first)
    assert kinds.get("database") is DatabaseResourceHandler
    assert "send_report" in tools
    assert tools.source("send_report").startswith("example_report (cleveragents-example-report ")
    assert kinds.source("database") == f"{BUILTIN_PLUGINS[0]} (built-in)"


def test_entry_points_can_be_left_out() -> None:
    pm = get_plugin_manager(load_entry_points=False)
    assert [name for name, _ in pm.list_name_plugin()] == list(BUILTIN_PLUGINS)
    _, tools = registries(pm)
    assert "send_report" not in tools


def test_a_plugin_that_fails_to_import_names_its_distribution(
    distributions: Callable[..., None],
) -> None:
    distributions(
        _FakeDistribution(
            "broken-plugin", "1.2.3", ("broken", "no_such_module_xyz", "cleveragents")
        )
    )
    with pytest.raises(PluginError) as info:
        get_plugin_manager()
    error = info.value
    assert error.plugin == "broken-plugin 1.2.3"
    assert "'broken' from distribution 'broken-plugin 1.2.3' failed to load" in str(error)
    assert "ModuleNotFoundError" in str(error)
    assert isinstance(error.__cause__, ModuleNotFoundError)


def test_a_plugin_that_raises_while_importing(
    distributions: Callable[..., None], module: Callable[..., types.ModuleType]
) -> None:
    module("half_plugin")
    distributions(_FakeDistribution("half", "0.1", ("half", "half_plugin:missing", "cleveragents")))
    with pytest.raises(PluginError, match=r"'half' from distribution 'half 0\.1' failed") as info:
        get_plugin_manager()
    assert isinstance(info.value.__cause__, AttributeError)


def test_entry_points_of_other_groups_are_ignored(
    distributions: Callable[..., None], module: Callable[..., types.ModuleType]
) -> None:
    @hookimpl
    def cleveragents_register_tools(registry: ToolRegistry) -> None:
        registry.add("greet", lambda ctx: None)

    module("greeter", cleveragents_register_tools=cleveragents_register_tools)
    distributions(
        _FakeDistribution(
            "greeter-dist",
            "2.0",
            ("broken", "no_such_module_xyz", "console_scripts"),
            ("greeter", "greeter", "cleveragents"),
        )
    )
    pm = get_plugin_manager()
    _, tools = registries(pm)
    assert list(tools) == ["greet"]
    assert tools.source("greet") == "greeter (greeter-dist 2.0)"


def test_a_hook_with_wrong_arguments_is_invalid(
    distributions: Callable[..., None], module: Callable[..., types.ModuleType]
) -> None:
    @hookimpl
    def cleveragents_plan_failed(plan: Any, reason: Any) -> None:
        """Takes an argument the spec does not have."""

    module("wrong_args", cleveragents_plan_failed=cleveragents_plan_failed)
    distributions(_FakeDistribution("wrong", "1.0", ("wrong", "wrong_args", "cleveragents")))
    with pytest.raises(
        PluginError, match=r"'wrong' from distribution 'wrong 1\.0' is invalid"
    ) as info:
        get_plugin_manager()
    assert info.value.plugin == "wrong 1.0"
    assert isinstance(info.value.__cause__, pluggy.PluginValidationError)


def test_an_unknown_hook_is_invalid_and_names_its_distribution(
    distributions: Callable[..., None], module: Callable[..., types.ModuleType]
) -> None:
    @hookimpl
    def cleveragents_plan_finished(plan: Any) -> None:
        """A typo of a hook name."""

    module("typo_plugin", cleveragents_plan_finished=cleveragents_plan_finished)
    distributions(_FakeDistribution("typo", "0.9", ("typo", "typo_plugin", "cleveragents")))
    with pytest.raises(
        PluginError, match=r"'typo' from distribution 'typo 0\.9' is invalid"
    ) as info:
        get_plugin_manager()
    assert "cleveragents_plan_finished" in str(info.value)
    assert info.value.plugin == "typo 0.9"
    assert isinstance(info.value.__cause__, pluggy.PluginValidationError)


def test_one_module_under_two_names_cannot_be_registered(
    distributions: Callable[..., None], module: Callable[..., types.ModuleType]
) -> None:
    module("twice")
    distributions(
        _FakeDistribution(
            "twice-dist",
            "1.0",
            ("first", "twice", "cleveragents"),
            ("second", "twice", "cleveragents"),
        )
    )
    with pytest.raises(
        PluginError, match=r"'second' from distribution 'twice-dist 1\.0' could not"
    ):
        get_plugin_manager()


def test_a_second_entry_point_with_a_taken_name_is_skipped(
    distributions: Callable[..., None], module: Callable[..., types.ModuleType]
) -> None:
    module("kept")
    distributions(
        _FakeDistribution("a", "1", ("same", "kept", "cleveragents")),
        _FakeDistribution("b", "1", ("same", "no_such_module_xyz", "cleveragents")),
    )
    pm = get_plugin_manager()
    assert plugin_source(pm, pm.get_plugin("same")) == "a 1"


# -- registries -------------------------------------------------------------------


class _OtherKind(FakeHandler):
    """Serves the same kind as :class:`FakeHandler`."""


def test_a_kind_served_twice_names_both_plugins() -> None:
    class First:
        @hookimpl
        def cleveragents_register_resource_handlers(self, registry: ResourceRegistry) -> None:
            registry.add(FakeHandler)

    class Second:
        @hookimpl
        def cleveragents_register_resource_handlers(self, registry: ResourceRegistry) -> None:
            registry.add(_OtherKind)

    pm = get_plugin_manager(load_entry_points=False)
    pm.register(First(), name="first")
    pm.register(Second(), name="second")
    with pytest.raises(PluginError) as info:
        registries(pm)
    assert str(info.value) == "resource kind 'fake' is already served by first (built-in)"
    assert info.value.plugin == "second (built-in)"


def test_resource_registry_refuses_what_is_not_a_handler() -> None:
    registry = ResourceRegistry()
    with pytest.raises(PluginError, match="is not a ResourceHandler subclass"):
        registry.add(object)  # type: ignore[arg-type]
    with pytest.raises(PluginError, match="is not a ResourceHandler subclass"):
        registry.add(FakeHandler())  # type: ignore[arg-type]

    class Nameless(FakeHandler):
        kind = ""

    with pytest.raises(PluginError, match="Nameless has no 'kind'"):
        registry.add(Nameless)
    registry.add(FakeHandler)
    registry.add(FakeHandler)  # the same class again is harmless
    assert list(registry) == ["fake"]
    assert len(registry) == 1
    assert "fake" in registry
    assert registry.get("missing") is None


def test_a_tool_registered_twice_names_both_plugins() -> None:
    def one(ctx: Any) -> None:
        """First."""

    def two(ctx: Any) -> None:
        """Second."""

    class First:
        @hookimpl
        def cleveragents_register_tools(self, registry: ToolRegistry) -> None:
            registry.add("report", one)

    class Second:
        @hookimpl
        def cleveragents_register_tools(self, registry: ToolRegistry) -> None:
            registry.add("report", two)

    pm = get_plugin_manager(load_entry_points=False)
    pm.register(First(), name="first")
    pm.register(Second(), name="second")
    with pytest.raises(PluginError) as info:
        registries(pm)
    assert str(info.value) == "tool 'report' is already registered by first (built-in)"
    assert info.value.plugin == "second (built-in)"


@pytest.mark.parametrize(
    "name", ["", "os.system", "pkg.module:func", "has space", "1starts_with_digit", "x" * 65, None]
)
def test_tool_names_are_plain_words(name: Any) -> None:
    registry = ToolRegistry()
    registry.current_source = "mine"
    with pytest.raises(PluginError, match="must be a word") as info:
        registry.add(name, lambda ctx: None)
    assert info.value.plugin == "mine"
    assert len(registry) == 0


def test_tool_registry_basics() -> None:
    registry = ToolRegistry()

    def tool(ctx: Any) -> None:
        """A tool."""

    with pytest.raises(PluginError, match="'notify' is not callable"):
        registry.add("notify", "not a function")  # type: ignore[arg-type]
    registry.add("notify", tool)
    registry.add("notify", tool)  # the same function again is harmless
    registry.add("x" * 64, tool)
    assert registry.get("notify") is tool
    assert registry.get("missing") is None
    assert list(registry) == ["notify", "x" * 64]
    assert "notify" in registry
    assert registry.source("notify") == "unknown"


# -- dispatch ---------------------------------------------------------------------


@pytest.fixture
def subscribed() -> tuple[pluggy.PluginManager, list[str]]:
    """A manager with subscribers a, b (raises) and c, and a handler registered after them."""
    log: list[str] = []
    pm = get_plugin_manager(load_entry_points=False)
    pm.register(RecordingSubscriber("a", log), name="a")
    pm.register(RecordingSubscriber("b", log, fail=True), name="b")
    pm.register(RecordingSubscriber("c", log), name="c")
    pm.register(FakeHandler(log), name="handler")
    return pm, log


def test_dispatch_calls_handlers_first_and_everyone_despite_errors(
    subscribed: tuple[pluggy.PluginManager, list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    pm, log = subscribed
    plan = types.SimpleNamespace(id="p1")
    with caplog.at_level(logging.ERROR, logger="cleveragents.plugins"):
        errors = dispatch(pm, "cleveragents_plan_completed", plan=plan)
    # Handlers first, then the others in pluggy's order (last registered first).
    assert log == ["handler released p1", "c completed p1", "b completed p1", "a completed p1"]
    assert [(e.event, e.plugin, type(e.error)) for e in errors] == [
        ("cleveragents_plan_completed", "b", RuntimeError)
    ]
    assert str(errors[0]) == "b raised on cleveragents_plan_completed: RuntimeError: b is broken"
    assert isinstance(errors[0], SubscriberError)
    assert "subscriber b raised on cleveragents_plan_completed: b is broken" in caplog.text


def test_dispatch_only_handlers_or_only_others(
    subscribed: tuple[pluggy.PluginManager, list[str]],
) -> None:
    pm, log = subscribed
    plan = types.SimpleNamespace(id="p1")
    assert dispatch(pm, "cleveragents_plan_completed", only="handlers", plan=plan) == []
    assert log == ["handler released p1"]
    log.clear()
    errors = dispatch(pm, "cleveragents_plan_completed", only="others", plan=plan)
    assert log == ["c completed p1", "b completed p1", "a completed p1"]
    assert [e.plugin for e in errors] == ["b"]


def test_dispatch_passes_only_the_arguments_each_subscriber_takes(
    subscribed: tuple[pluggy.PluginManager, list[str]],
) -> None:
    pm, log = subscribed
    plan = types.SimpleNamespace(id="p2")
    errors = dispatch(pm, "cleveragents_plan_failed", plan=plan, error=ValueError("bad step"))
    assert log == [
        "handler rolled back p2",
        "c failed p2: ValueError: bad step",
        "b failed p2: ValueError: bad step",
        "a failed p2: ValueError: bad step",
    ]
    assert [e.plugin for e in errors] == ["b"]


def test_a_failing_handler_does_not_stop_the_subscribers() -> None:
    log: list[str] = []
    pm = get_plugin_manager(load_entry_points=False)
    pm.register(RecordingSubscriber("a", log), name="a")
    pm.register(FakeHandler(log, fail=True), name="handler")
    errors = dispatch(pm, "cleveragents_plan_completed", plan=types.SimpleNamespace(id="p3"))
    assert log == ["handler released p3", "a completed p3"]
    assert [(e.plugin, str(e.error)) for e in errors] == [("handler", "commit went wrong")]


def test_a_hook_wrapper_is_refused_at_load_naming_its_distribution(
    distributions: Callable[..., None], module: Callable[..., types.ModuleType]
) -> None:
    @hookimpl(wrapper=True)
    def cleveragents_plan_completed(plan: Any) -> Any:
        """Would only build a generator: cleveragents calls implementations one by one."""
        return (yield)

    module("wrapping", cleveragents_plan_completed=cleveragents_plan_completed)
    distributions(_FakeDistribution("wrapping", "2.0", ("wrapping", "wrapping", "cleveragents")))
    with pytest.raises(
        PluginError,
        match=r"'wrapping' from distribution 'wrapping 2\.0' implements "
        r"cleveragents_plan_completed as a hook wrapper",
    ) as info:
        get_plugin_manager()
    assert info.value.plugin == "wrapping 2.0"


@pytest.mark.parametrize("style", ["wrapper", "hookwrapper"])
def test_a_wrapper_registered_later_is_reported_not_silently_skipped(
    subscribed: tuple[pluggy.PluginManager, list[str]], style: str
) -> None:
    pm, log = subscribed

    class Wrapping:
        @hookimpl(**{style: True})
        def cleveragents_plan_failed(self, plan: Any) -> Any:
            log.append("wrapper ran")
            return (yield)

        @hookimpl(**{style: True})
        def cleveragents_register_tools(self, registry: Any) -> Any:
            return (yield)

    pm.register(Wrapping(), name="wrapping")
    errors = dispatch(
        pm, "cleveragents_plan_failed", plan=types.SimpleNamespace(id="p3"), error=None
    )
    assert "wrapper ran" not in log
    assert "handler rolled back p3" in log  # everyone else was still told
    refused = [e for e in errors if e.plugin == "wrapping"]
    assert [type(e.error) for e in refused] == [PluginError]
    assert "as a hook wrapper" in str(refused[0])
    with pytest.raises(PluginError, match="cleveragents_register_tools as a hook wrapper"):
        registries(pm)
