"""The fakes shared by the pytest suite and the behave steps: a resource handler and a subscriber.

Both write what they hear to a log of plain strings, which several fakes may
share to show the order in which pluggy called them, and both can be told to
fail. The behave steps import this module too (``features/steps/bdd_support.py``
puts this folder on ``sys.path``).

- :class:`FakeHandler`: a resource kind that runs no SQL. It implements only
  the abstract methods of :class:`~cleveragents.resource.ResourceHandler`, so a
  test sees the base class's own defaults (``stats()``, ``interrupt()``, the
  plan-event hooks, ``from_config()``). Subclass it to serve another kind or to
  check settings with a model.
- :class:`RecordingSubscriber`: a plain plugin that records the plan events.
- :class:`FakeEngine`: an engine that implements only what it must and opens
  stand-in connections, for what the engine base class does on its own.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, ClassVar

from pydantic import BaseModel

from cleveragents.hookspecs import hookimpl
from cleveragents.resource import Resource, ResourceHandler
from cleveragents.resource.handlers.engine import Engine


class FakeHandler(ResourceHandler):
    """Serves the ``fake`` kind: no connections, no SQL; records how each plan ended.

    ``log`` gets ``handler released P``, ``handler rolled back P`` and
    ``handler closed``. With *fail*, ``release_plan()`` raises
    ``RuntimeError("commit went wrong")`` after recording. Keyword arguments
    other than these are kept in ``settings`` (``from_config()`` passes its
    overrides here).
    """

    kind = "fake"
    #: Checks each resource's settings in validate_settings(); None accepts any.
    settings_model: ClassVar[type[BaseModel] | None] = None

    def __init__(
        self, log: list[str] | None = None, *, fail: bool = False, **settings: Any
    ) -> None:
        self.log = log if log is not None else []
        self.fail = fail
        self.settings = settings

    @classmethod
    def validate_settings(cls, resource: Resource) -> Any:
        if cls.settings_model is None:
            return None
        return cls.settings_model.model_validate(dict(resource.options))

    def connection(self, resource: Resource, plan_id: str) -> Any:
        raise NotImplementedError(f"the {self.kind} kind lends no connection")

    def create_checkpoint(self, resource: Resource, plan_id: str, checkpoint_id: str) -> Any:
        raise NotImplementedError(f"the {self.kind} kind takes no checkpoint")

    def rollback_to(self, resource: Resource, plan_id: str, checkpoint_id: str) -> None:
        raise NotImplementedError(f"the {self.kind} kind takes no checkpoint")

    def release_plan(self, plan_id: str) -> None:
        self.log.append(f"handler released {plan_id}")
        if self.fail:
            raise RuntimeError("commit went wrong")

    def rollback_plan(self, plan_id: str) -> None:
        self.log.append(f"handler rolled back {plan_id}")

    def close(self) -> None:
        self.log.append("handler closed")


class RecordingSubscriber:
    """A plugin that records the plan events it is told, and raises on each when told to fail.

    ``log`` gets ``NAME started P``, ``NAME completed P`` and
    ``NAME failed P: ErrorType: message``; ``events_of(P)`` lists the events
    plan ``P`` got, in order. With *fail*, every event raises
    ``RuntimeError("NAME is broken")`` after it was recorded.
    """

    def __init__(
        self, name: str = "subscriber", log: list[str] | None = None, *, fail: bool = False
    ) -> None:
        self.name = name
        self.log = log if log is not None else []
        self.fail = fail
        self._heard: list[tuple[str, str]] = []

    def events_of(self, plan_id: str) -> list[str]:
        """Return the events plan *plan_id* got (``started``, ``completed``, ``failed``)."""
        return [event for event, heard in self._heard if heard == plan_id]

    def _hear(self, event: str, plan: Any, detail: str = "") -> None:
        self._heard.append((event, plan.id))
        self.log.append(f"{self.name} {event} {plan.id}{detail}")
        if self.fail:
            raise RuntimeError(f"{self.name} is broken")

    @hookimpl
    def cleveragents_plan_started(self, plan: Any) -> None:
        self._hear("started", plan)

    @hookimpl
    def cleveragents_plan_completed(self, plan: Any) -> None:
        self._hear("completed", plan)

    @hookimpl
    def cleveragents_plan_failed(self, plan: Any, error: BaseException) -> None:
        self._hear("failed", plan, f": {type(error).__name__}: {error}")


class FakeEngine(Engine):
    """An engine that implements only what it must: every connection is a new ``object()``."""

    name = "fake"
    settings_model = BaseModel
    serializes_writers = False
    driver_error = OSError

    def identity(self, settings: Any, resource_name: str) -> Hashable:
        return resource_name

    def connection_config(self, settings: Any) -> Hashable:
        return None

    def open(self, settings: Any, *, application_name: str) -> Any:
        return object()

    def begin(self, conn: Any, settings: Any, *, plan_id: str) -> None:
        """Nothing to begin."""

    def savepoint(self, conn: Any, name: str) -> None:
        """Nothing to save."""

    def rollback_to(self, conn: Any, name: str) -> None:
        """Nothing to undo."""

    def commit(self, conn: Any) -> None:
        """Nothing to keep."""

    def rollback(self, conn: Any) -> None:
        """Nothing to undo."""

    def execute(self, conn: Any, sql: str, params: Any) -> list[tuple[Any, ...]]:
        return []

    def is_clean(self, conn: Any) -> bool:
        return True

    def close(self, conn: Any) -> None:
        """Nothing to close."""

    def interrupt(self, conn: Any) -> None:
        """Nothing to interrupt."""

    def classify(self, exc: BaseException) -> Any:
        return "other"
