"""cleveragents: transactional database resources for agent plans.

Importing the package does no I/O and loads no plugins.
"""

from __future__ import annotations

from cleveragents.errors import (
    CheckpointError,
    CheckpointEvictedError,
    CheckpointExpiredError,
    CheckpointNotFoundError,
    CleverAgentsError,
    HandlerClosedError,
    PartialCommitError,
    PlanError,
    PluginError,
    PoolExhaustedError,
    ResourceBusyError,
    ResourceError,
    ToolError,
)
from cleveragents.hookspecs import hookimpl, hookspec
from cleveragents.plan import Plan, Step, load_plan
from cleveragents.resource import CheckpointResult, Resource, ResourceHandler
from cleveragents.runtime import PlanResult, Runtime, StepResult
from cleveragents.tools import ToolContext, ToolRegistry

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointEvictedError",
    "CheckpointExpiredError",
    "CheckpointNotFoundError",
    "CheckpointResult",
    "CleverAgentsError",
    "HandlerClosedError",
    "PartialCommitError",
    "Plan",
    "PlanError",
    "PlanResult",
    "PluginError",
    "PoolExhaustedError",
    "Resource",
    "ResourceBusyError",
    "ResourceError",
    "ResourceHandler",
    "Runtime",
    "Step",
    "StepResult",
    "ToolContext",
    "ToolError",
    "ToolRegistry",
    "__version__",
    "hookimpl",
    "hookspec",
    "load_plan",
]
