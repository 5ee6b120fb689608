"""What resources resolve to: each database once, with its engine and write turnstile."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Hashable
from typing import Any

from pydantic import ValidationError

from cleveragents.errors import ResourceError
from cleveragents.resource.base import Resource
from cleveragents.resource.handlers._settings import ENGINES, validated
from cleveragents.resource.handlers._turnstile import Turnstile
from cleveragents.resource.handlers.engine import Engine


class Database:
    """One database as a handler sees it: its engine, write turnstile and memory connection."""

    __slots__ = ("engine", "identity", "label", "memory_conn", "turnstile")

    def __init__(
        self, identity: Hashable, engine: Engine, label: str, mutex: threading.Lock
    ) -> None:
        self.identity = identity
        self.engine = engine
        self.label = label
        self.turnstile = Turnstile(mutex)
        self.memory_conn: Any = None


@dataclasses.dataclass(frozen=True, slots=True)
class Resolved:
    """What a resource resolves to, worked out once per resource and cached."""

    resource: str
    settings: Any
    database: Database
    #: What an idle connection must match to be lent for this resource.
    config: Hashable
    ttl: float
    memory: bool
    takes_turns: bool


class Resolver:
    """Validates resources and finds their databases, with bounded caches.

    :attr:`by_id` and :attr:`by_value` may be read without the mutex
    (single dict reads); everything else is called with it held. At most *max_entries* resources and
    databases are remembered; past that, databases nothing uses (*in_use*
    says which are used) are forgotten, so a process that touches endless
    files stays bounded.
    """

    def __init__(
        self,
        mutex: threading.Lock,
        *,
        default_ttl: float,
        in_use: Callable[[], set[Hashable]],
        max_entries: int = 1024,
    ) -> None:
        self._mutex = mutex
        self._default_ttl = default_ttl
        self._in_use = in_use
        self.max_entries = max_entries
        self.engines: dict[str, Engine] = {}
        self.databases: dict[Hashable, Database] = {}
        self.by_value: dict[Resource, Resolved] = {}
        # The same, by the Resource object itself: keyed by id(), with the
        # object kept alive in the value, so an id found here is that very
        # object's (two live objects never share one). Equal resources made
        # apart (each plan load makes its own) cost one equality lookup each.
        self.by_id: dict[int, tuple[Resource, Resolved]] = {}

    def __len__(self) -> int:
        """Return how many resources are remembered."""
        return len(self.by_value)

    def resolve(
        self, resource: Resource, plan_id: str, known: tuple[Resource, Resolved] | None = None
    ) -> Resolved:
        """Validate *resource* and find its database (both cached); hold the mutex."""
        if known is not None and self.by_id.get(id(resource)) is known:
            return known[1]  # what the lock-free look-up found is still current
        found = self.by_id.get(id(resource))
        if found is not None:
            return found[1]
        if len(self.by_id) >= self.max_entries:
            self.by_id.clear()
        resolved = self.by_value.get(resource)
        if resolved is None:
            resolved = self._resolve_anew(resource, plan_id)
        self.by_id[id(resource)] = (resource, resolved)
        return resolved

    def _resolve_anew(self, resource: Resource, plan_id: str) -> Resolved:
        try:
            settings = validated(resource)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or "engine"
            raise ResourceError(
                f"bad setting {field}: {first['msg']}", plan_id=plan_id, resource=resource.name
            ) from None
        engine = self.engines.get(settings.engine)
        if engine is None:
            engine = self.engines[settings.engine] = ENGINES[settings.engine]()
            engine.default_checkpoint_ttl = self._default_ttl
        identity = engine.identity(settings, resource.name)
        database = self.databases.get(identity)
        if database is None:
            if len(self.databases) >= self.max_entries:
                self._forget_unused_databases()
            database = Database(identity, engine, engine.describe(settings), self._mutex)
            self.databases[identity] = database
        if len(self.by_value) >= self.max_entries:
            self.by_value.clear()
        resolved = self.by_value[resource] = Resolved(
            resource=resource.name,
            settings=settings,
            database=database,
            config=engine.connection_config(settings),
            ttl=settings.checkpoint_ttl or self._default_ttl,
            memory=engine.is_memory(settings),
            takes_turns=engine.takes_turns(settings),
        )
        return resolved

    def _forget_unused_databases(self) -> None:
        used = self._in_use()
        for identity, database in list(self.databases.items()):
            busy = database.turnstile.holder is not None or database.memory_conn is not None
            if identity not in used and not busy:
                del self.databases[identity]
        self.by_value.clear()
        self.by_id.clear()


__all__ = ["Database", "Resolved", "Resolver"]
