"""The registry of resource kinds: kind name -> handler class."""

from __future__ import annotations

from collections.abc import Iterator

from cleveragents.errors import PluginError
from cleveragents.resource.base import ResourceHandler


class ResourceRegistry:
    """Resource handler classes keyed by the kind they serve.

    Plugins fill it through ``cleveragents_register_resource_handlers``.
    """

    def __init__(self) -> None:
        self._handlers: dict[str, type[ResourceHandler]] = {}
        self._sources: dict[str, str] = {}
        #: Set by the plugin manager while a plugin's hook runs, to name sources.
        self.current_source = "unknown"

    def add(self, handler_cls: type[ResourceHandler]) -> None:
        """Serve ``handler_cls.kind`` with *handler_cls*.

        :raises PluginError: the class is not a ResourceHandler, or the kind is taken.
        """
        if not (isinstance(handler_cls, type) and issubclass(handler_cls, ResourceHandler)):
            raise PluginError(
                f"{handler_cls!r} is not a ResourceHandler subclass", plugin=self.current_source
            )
        kind = getattr(handler_cls, "kind", None)
        if not isinstance(kind, str) or not kind:
            raise PluginError(
                f"{handler_cls.__qualname__} has no 'kind' attribute naming the resource kind",
                plugin=self.current_source,
            )
        if kind in self._handlers and self._handlers[kind] is not handler_cls:
            raise PluginError(
                f"resource kind {kind!r} is already served by {self._sources[kind]}",
                plugin=self.current_source,
            )
        self._handlers[kind] = handler_cls
        self._sources[kind] = self.current_source

    def get(self, kind: str) -> type[ResourceHandler] | None:
        """Return the handler class serving *kind*, if any."""
        return self._handlers.get(kind)

    def source(self, kind: str) -> str:
        """Return the plugin that added *kind*."""
        return self._sources[kind]

    def __contains__(self, kind: object) -> bool:
        return kind in self._handlers

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._handlers))

    def __len__(self) -> int:
        return len(self._handlers)
