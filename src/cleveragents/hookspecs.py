"""The hook markers and every hook specification of cleveragents.

Plugins import :data:`hookimpl` from here; the markers themselves live in the
leaf module :mod:`cleveragents._markers`. Types named by the specs are imported
only for type checking, and none of those modules imports this one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cleveragents._markers import PROJECT_NAME, hookimpl, hookspec

if TYPE_CHECKING:
    from cleveragents.plan import Plan
    from cleveragents.resource.registry import ResourceRegistry
    from cleveragents.tools import ToolRegistry

__all__ = [
    "PROJECT_NAME",
    "cleveragents_plan_completed",
    "cleveragents_plan_failed",
    "cleveragents_plan_started",
    "cleveragents_register_resource_handlers",
    "cleveragents_register_tools",
    "hookimpl",
    "hookspec",
]


@hookspec
def cleveragents_register_resource_handlers(registry: ResourceRegistry) -> None:
    """Add resource handler classes to *registry*.

    Called once while the runtime starts, before any plan is loaded. Call
    ``registry.add(handler_cls)`` for each resource kind your plugin serves;
    the class's ``kind`` attribute is the key plans use (``kind: database``).
    Adding a kind that another plugin already added is an error.
    """


@hookspec
def cleveragents_register_tools(registry: ToolRegistry) -> None:
    """Add tools that plan steps can call by name (``tool: NAME``).

    Called once while the runtime starts. Call ``registry.add(name, func)``;
    a step then calls ``func(ctx, **with_args)``, where ``ctx`` is a
    :class:`cleveragents.tools.ToolContext` with ``plan_id``, ``step_id``,
    ``attempt`` and ``ctx.connection(resource_name)``. A tool fails its step by
    raising. Plans can call only registered tools, never an import path.
    """


@hookspec
def cleveragents_plan_started(plan: Plan) -> None:
    """Called when *plan* starts, before its first step runs.

    Every subscriber is called even if another raises; errors are logged and
    reported with the plan's result.
    """


@hookspec
def cleveragents_plan_completed(plan: Plan) -> None:
    """Called when every step of *plan* passed.

    Resource handlers are called first and commit the plan's work; if a commit
    fails, nobody else is told "completed": :func:`cleveragents_plan_failed` is
    sent instead. Then every other subscriber is called, even if one raises.
    """


@hookspec
def cleveragents_plan_failed(plan: Plan, error: BaseException) -> None:
    """Called when *plan* failed; *error* is why.

    Resource handlers are called first and roll back all of the plan's work,
    so by the time other subscribers hear of it the databases are as before.
    Every subscriber is called even if another raises.
    """
