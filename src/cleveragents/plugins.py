"""The plugin manager, and event dispatch that calls every subscriber whatever happens."""

from __future__ import annotations

import importlib.metadata
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import pluggy

from cleveragents import hookspecs
from cleveragents.errors import PluginError
from cleveragents.resource.base import ResourceHandler
from cleveragents.resource.registry import ResourceRegistry
from cleveragents.tools import ToolRegistry

logger = logging.getLogger(__name__)

_SOURCES: weakref.WeakKeyDictionary[pluggy.PluginManager, dict[str, str]] = (
    weakref.WeakKeyDictionary()
)

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME

#: Modules registered as plugins before the entry points, like any third-party plugin.
BUILTIN_PLUGINS = ("cleveragents.resource.handlers.database",)


def get_plugin_manager(*, load_entry_points: bool = True) -> pluggy.PluginManager:
    """Build a fresh plugin manager: specs, built-ins, ``cleveragents`` entry points.

    :raises PluginError: an entry point fails to load; the error names its distribution.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for module_name in BUILTIN_PLUGINS:
        module = importlib.import_module(module_name)
        pm.register(module, name=module_name)
    if load_entry_points:
        _load_entry_points(pm)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        # A hook implementation no spec knows (often a typo in a plugin).
        name = pm.get_name(exc.plugin) or repr(exc.plugin)
        source = _sources(pm).get(name, "built-in")
        raise PluginError(
            f"plugin {name!r} from distribution {source!r} is invalid: {exc}", plugin=source
        ) from exc
    for hook in pm.hook.__dict__.values():
        for impl in hook.get_hookimpls():
            if _is_wrapper(impl):
                raise _wrapper_error(pm, impl, hook.name)
    return pm


def _is_wrapper(impl: Any) -> bool:
    return bool(impl.hookwrapper or impl.wrapper)


def _wrapper_error(pm: pluggy.PluginManager, impl: Any, hook: str) -> PluginError:
    name = pm.get_name(impl.plugin) or repr(impl.plugin)
    source = plugin_source(pm, impl.plugin)
    return PluginError(
        f"plugin {name!r} from distribution {source!r} implements {hook} as a hook wrapper; "
        "cleveragents calls each implementation of its hooks on its own (so that one "
        "failing subscriber cannot stop the others), so write a plain hookimpl",
        plugin=source,
    )


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    # Like pluggy's load_setuptools_entrypoints, but an entry point that fails
    # to import is reported naming its distribution instead of a bare traceback.
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP or pm.get_plugin(ep.name) or pm.is_blocked(ep.name):
                continue
            source = f"{dist.metadata['name']} {dist.version}"
            try:
                plugin = ep.load()
            except Exception as exc:  # any import-time error of a third-party plugin
                raise PluginError(
                    f"plugin {ep.name!r} from distribution {source!r} failed to load "
                    f"({ep.value}): {type(exc).__name__}: {exc}",
                    plugin=source,
                ) from exc
            try:
                pm.register(plugin, name=ep.name)
            except ValueError as exc:
                raise PluginError(
                    f"plugin {ep.name!r} from distribution {source!r} could not be "
                    f"registered: {exc}",
                    plugin=source,
                ) from exc
            except pluggy.PluginValidationError as exc:
                raise PluginError(
                    f"plugin {ep.name!r} from distribution {source!r} is invalid: {exc}",
                    plugin=source,
                ) from exc
            _sources(pm)[ep.name] = source


def _sources(pm: pluggy.PluginManager) -> dict[str, str]:
    return _SOURCES.setdefault(pm, {})


def plugin_source(pm: pluggy.PluginManager, plugin: object) -> str:
    """Return where *plugin* came from: a distribution, or ``built-in``."""
    return _sources(pm).get(pm.get_name(plugin) or "", "built-in")


def registries(pm: pluggy.PluginManager) -> tuple[ResourceRegistry, ToolRegistry]:
    """Ask every plugin for its resource kinds and tools."""
    kinds = ResourceRegistry()
    tools = ToolRegistry()
    for impl in pm.hook.cleveragents_register_resource_handlers.get_hookimpls():
        if _is_wrapper(impl):
            raise _wrapper_error(pm, impl, "cleveragents_register_resource_handlers")
        kinds.current_source = f"{pm.get_name(impl.plugin)} ({plugin_source(pm, impl.plugin)})"
        impl.function(**dict.fromkeys(impl.argnames, kinds))
    for impl in pm.hook.cleveragents_register_tools.get_hookimpls():
        if _is_wrapper(impl):
            raise _wrapper_error(pm, impl, "cleveragents_register_tools")
        tools.current_source = f"{pm.get_name(impl.plugin)} ({plugin_source(pm, impl.plugin)})"
        impl.function(**dict.fromkeys(impl.argnames, tools))
    return kinds, tools


@dataclass(frozen=True)
class SubscriberError:
    """An exception a subscriber raised while being told of a plan event."""

    event: str
    plugin: str
    error: BaseException

    def __str__(self) -> str:
        return f"{self.plugin} raised on {self.event}: {type(self.error).__name__}: {self.error}"


def dispatch(
    pm: pluggy.PluginManager,
    event: str,
    *,
    only: Literal["all", "handlers", "others"] = "all",
    **kwargs: Any,
) -> list[SubscriberError]:
    """Call every implementation of hook *event*, even when some raise.

    Resource handlers run before the other subscribers (they commit or roll
    back before anyone is told); *only* limits the call to one of the two
    groups. Errors are logged and returned, never raised.
    """
    impls = list(reversed(getattr(pm.hook, event).get_hookimpls()))
    handlers = [i for i in impls if isinstance(i.plugin, ResourceHandler)]
    others = [i for i in impls if not isinstance(i.plugin, ResourceHandler)]
    ordered = {"all": handlers + others, "handlers": handlers, "others": others}[only]
    errors = []
    for impl in ordered:
        if _is_wrapper(impl):
            error = _wrapper_error(pm, impl, event)
            logger.error("%s", error)
            errors.append(SubscriberError(event, pm.get_name(impl.plugin) or "?", error))
            continue
        try:
            impl.function(**{name: kwargs[name] for name in impl.argnames})
        except Exception as exc:  # one bad subscriber must never stop the others
            name = pm.get_name(impl.plugin) or repr(impl.plugin)
            logger.error("subscriber %s raised on %s: %s", name, event, exc)
            errors.append(SubscriberError(event, name, exc))
    return errors
