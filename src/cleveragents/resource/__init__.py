"""Resources, checkpoints and the handler base class that serves a resource kind."""

from __future__ import annotations

from cleveragents.resource.base import CheckpointResult, Resource, ResourceHandler

__all__ = ["CheckpointResult", "Resource", "ResourceHandler"]
