"""The resource model and the base class every resource handler derives from."""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Mapping
from contextlib import AbstractContextManager
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self, final

from cleveragents._markers import hookimpl

if TYPE_CHECKING:
    from pydantic import BaseModel

_SECRET_KEYS = frozenset({"dsn", "password"})


@final
class Resource:
    """A named resource a plan works on, with its kind and its per-resource settings.

    It takes the same flat keys as a resource entry in plan YAML::

        Resource(name="inv", kind="database", engine="sqlite", location="inv.db")

    The settings are checked by the handler of the kind, not here. Secret
    settings (a ``dsn``) never appear in ``repr()``.
    """

    __slots__ = ("_hash", "kind", "name", "options")

    name: str
    kind: str
    options: Mapping[str, Any]

    def __init__(self, name: str, kind: str, **options: Any) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a resource needs a non-empty name, got {name!r}")
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"resource {name!r} needs a non-empty kind, got {kind!r}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "options", MappingProxyType(dict(options)))
        object.__setattr__(self, "_hash", hash((name, kind, frozenset(options))))

    def __getattr__(self, key: str) -> Any:
        # copy and pickle probe for special names on an instance whose slots are
        # not set yet: answer those without reading 'options', which would recurse.
        if key.startswith("_") or key == "options":
            raise AttributeError(key)
        try:
            return self.options[key]
        except KeyError:
            raise AttributeError(key) from None

    def __reduce__(self) -> tuple[Any, ...]:
        return (functools.partial(Resource, self.name, self.kind, **self.options), ())

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"Resource is immutable; cannot set {key!r}")

    def __delattr__(self, key: str) -> None:
        raise AttributeError(f"Resource is immutable; cannot delete {key!r}")

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Resource):
            return NotImplemented
        # Mapping proxies compare by their dicts: no copies. Handlers look
        # resources up by equality on every call, so this stays cheap.
        return (
            self._hash == other._hash
            and self.name == other.name
            and self.kind == other.kind
            and self.options == other.options
        )

    def __hash__(self) -> int:
        return self._hash  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        shown = "".join(
            f", {key}={'***' if key in _SECRET_KEYS else repr(value)}"
            for key, value in self.options.items()
        )
        return f"Resource(name={self.name!r}, kind={self.kind!r}{shown})"


@dataclasses.dataclass(frozen=True, slots=True)
class CheckpointResult:
    """What :meth:`ResourceHandler.create_checkpoint` made."""

    plan_id: str
    checkpoint_id: str
    resource: str
    #: How many of the plan's checkpoints are open on this database, this one included.
    depth: int
    created_at: float


_new_object = object.__new__
_setters = {
    field.name: getattr(CheckpointResult, field.name).__set__
    for field in dataclasses.fields(CheckpointResult)
}
_set_plan_id = _setters["plan_id"]
_set_checkpoint_id = _setters["checkpoint_id"]
_set_resource = _setters["resource"]
_set_depth = _setters["depth"]
_set_created_at = _setters["created_at"]


def make_checkpoint_result(
    plan_id: str, checkpoint_id: str, resource: str, depth: int, created_at: float
) -> CheckpointResult:
    """Return ``CheckpointResult(plan_id, checkpoint_id, resource, depth, created_at)``, faster.

    A frozen dataclass's ``__init__`` sets each field through
    ``object.__setattr__``; a handler makes one result per checkpoint, so this
    fills the slots directly, in less than half the time. The object is the
    same in every way (equality, hashing, immutability).
    """
    result: CheckpointResult = _new_object(CheckpointResult)
    _set_plan_id(result, plan_id)
    _set_checkpoint_id(result, checkpoint_id)
    _set_resource(result, resource)
    _set_depth(result, depth)
    _set_created_at(result, created_at)
    return result


class PlanLike(Protocol):
    """What a handler reads of a plan in the plan events: its id.

    :class:`cleveragents.plan.Plan` is one; the handler layer names this
    instead, so it does not depend on the plan model (which depends on it).
    """

    @property
    def id(self) -> str:
        """The plan's id, the key of its work in every handler."""
        ...


class ResourceHandler(abc.ABC):
    """Serves one resource kind to plans: their connections, checkpoints and outcome.

    A handler class is added to the registry by the
    ``cleveragents_register_resource_handlers`` hook. The runtime creates one
    instance per class it needs and registers it with the plugin manager, so
    the ``@hookimpl`` methods below receive the plan events: a completed plan is
    released, a failed one rolled back, before any other subscriber is told.
    """

    #: The resource kind this handler serves, e.g. ``"database"``.
    kind: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def validate_settings(cls, resource: Resource) -> BaseModel:
        """Check *resource*'s settings against this kind's settings model.

        :raises pydantic.ValidationError: a setting is unknown, missing or mistyped.
        """

    @classmethod
    def settings_json_schema(cls) -> dict[str, Any]:
        """Return the JSON schema of a resource entry of this kind (for editors)."""
        return {"type": "object"}

    @classmethod
    def from_config(cls, **overrides: Any) -> Self:
        """Create a handler from handler-wide settings (environment, then *overrides*)."""
        return cls(**overrides)

    @abc.abstractmethod
    def connection(self, resource: Resource, plan_id: str) -> AbstractContextManager[Any]:
        """Lend the plan its own connection to *resource*, inside the plan's transaction."""

    @abc.abstractmethod
    def create_checkpoint(
        self, resource: Resource, plan_id: str, checkpoint_id: str
    ) -> CheckpointResult:
        """Take a checkpoint labelled *checkpoint_id* in the plan's work on *resource*."""

    @abc.abstractmethod
    def rollback_to(self, resource: Resource, plan_id: str, checkpoint_id: str) -> None:
        """Undo the plan's work on *resource* after *checkpoint_id*; keep the checkpoint."""

    @abc.abstractmethod
    def release_plan(self, plan_id: str) -> None:
        """Keep (commit) all of the plan's work and give its connections back."""

    @abc.abstractmethod
    def rollback_plan(self, plan_id: str) -> None:
        """Undo all of the plan's work and give its connections back."""

    @abc.abstractmethod
    def close(self) -> None:
        """Roll back open plans and free everything. Calling it again does nothing."""

    def interrupt(self) -> None:  # noqa: B027 - optional for handlers with nothing to interrupt
        """Interrupt statements running for any plan (called on SIGINT/SIGTERM)."""

    def stats(self) -> Mapping[str, Any]:
        """Return counters describing the handler's state."""
        return {}

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @hookimpl
    def cleveragents_plan_completed(self, plan: PlanLike) -> None:
        """Commit the completed plan's work."""
        self.release_plan(plan.id)

    @hookimpl
    def cleveragents_plan_failed(self, plan: PlanLike) -> None:
        """Roll back the failed plan's work."""
        self.rollback_plan(plan.id)
