"""Resource values and HandlerStats snapshots."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import types

import pytest
from fakes import FakeEngine, FakeHandler

from cleveragents.resource import CheckpointResult, Resource
from cleveragents.resource.base import make_checkpoint_result


def _inventory(**extra: object) -> Resource:
    return Resource(name="inv", kind="database", engine="sqlite", location="inv.db", **extra)


def test_resources_with_the_same_keys_are_equal_and_hash_alike() -> None:
    first = _inventory(checkpoint_ttl=0.5)
    second = Resource("inv", "database", checkpoint_ttl=0.5, location="inv.db", engine="sqlite")
    assert first == second
    assert hash(first) == hash(second)
    assert {first: "x"}[second] == "x"
    assert len({first, second}) == 1


@pytest.mark.parametrize(
    "other",
    [
        Resource(name="other", kind="database", engine="sqlite", location="inv.db"),
        Resource(name="inv", kind="queue", engine="sqlite", location="inv.db"),
        Resource(name="inv", kind="database", engine="sqlite", location="other.db"),
        Resource(name="inv", kind="database", engine="sqlite", location="inv.db", lock="deferred"),
        Resource(name="inv", kind="database", engine="sqlite", location=["inv.db"]),
        Resource(name="inv", kind="database", engine="sqlite", location="inv.db", x=None),
    ],
)
def test_resources_differing_in_any_key_are_not_equal(other: Resource) -> None:
    assert _inventory() != other
    assert other != _inventory()


def test_resource_is_not_equal_to_other_types() -> None:
    resource = _inventory()
    assert resource != ("inv", "database")
    assert resource.__eq__(object()) is NotImplemented
    assert resource == resource


def test_resource_exposes_its_settings_as_attributes_and_options() -> None:
    resource = _inventory(busy_timeout="250ms")
    assert resource.name == "inv"
    assert resource.kind == "database"
    assert resource.location == "inv.db"
    assert resource.busy_timeout == "250ms"
    assert dict(resource.options) == {
        "engine": "sqlite",
        "location": "inv.db",
        "busy_timeout": "250ms",
    }
    with pytest.raises(AttributeError):
        _ = resource.journal_mode


def test_resource_repr_hides_secrets() -> None:
    resource = Resource(
        name="pg",
        kind="database",
        engine="postgresql",
        dsn="postgresql://app:s3cret@db.example/prod",
        password="hunter2",
    )
    shown = repr(resource)
    assert "s3cret" not in shown
    assert "hunter2" not in shown
    assert "db.example" not in shown
    assert "dsn=***" in shown
    assert "password=***" in shown
    assert shown.startswith("Resource(name='pg', kind='database'")
    assert "engine='postgresql'" in shown


def test_resource_is_immutable() -> None:
    resource = _inventory()
    with pytest.raises(AttributeError, match="immutable"):
        resource.name = "changed"  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable"):
        resource.location = "elsewhere.db"
    with pytest.raises(TypeError):
        resource.options["location"] = "elsewhere.db"  # type: ignore[index]
    with pytest.raises(AttributeError):
        del resource.name
    assert resource.name == "inv"
    assert resource.location == "inv.db"


def test_resource_survives_copy_and_pickle() -> None:
    resource = _inventory(checkpoint_ttl=0.5)
    for clone in (
        copy.copy(resource),
        copy.deepcopy(resource),
        pickle.loads(pickle.dumps(resource)),
    ):
        assert clone == resource
        assert hash(clone) == hash(resource)
        assert clone.checkpoint_ttl == 0.5
        with pytest.raises(AttributeError, match="immutable"):
            clone.name = "changed"  # type: ignore[misc]


def test_resource_does_not_share_the_callers_dict() -> None:
    options = {"engine": "sqlite", "location": "inv.db"}
    resource = Resource("inv", "database", **options)
    before = hash(resource)
    options["location"] = "changed.db"
    assert resource.location == "inv.db"
    assert hash(resource) == before


@pytest.mark.parametrize(
    ("name", "kind", "match"),
    [("", "database", "non-empty name"), ("inv", "", "non-empty kind"), (None, "x", "name")],
)
def test_resource_needs_a_name_and_a_kind(name: object, kind: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Resource(name, kind)  # type: ignore[arg-type]


def test_handler_base_class_defaults() -> None:
    handler = FakeHandler.from_config(size=3)
    assert handler.settings == {"size": 3}
    assert FakeHandler.settings_json_schema() == {"type": "object"}
    assert handler.stats() == {}
    handler.interrupt()  # nothing to interrupt
    plan = types.SimpleNamespace(id="p1")
    handler.cleveragents_plan_completed(plan)  # type: ignore[arg-type]
    handler.cleveragents_plan_failed(plan)  # type: ignore[arg-type]
    with handler:
        pass
    assert handler.log == ["handler released p1", "handler rolled back p1", "handler closed"]


def test_engine_base_class_defaults() -> None:
    engine = FakeEngine()
    assert engine.describe(None) == "fake"
    assert engine.is_memory(None) is False
    assert engine.takes_turns(None) is False
    assert engine.check_committable(object()) is None
    assert engine.redact(OSError("plain message")) == "plain message"


def test_the_fast_checkpoint_result_is_an_ordinary_one() -> None:
    made = make_checkpoint_result("p1", "start", "inv", 2, 12.5)
    plain = CheckpointResult(
        plan_id="p1", checkpoint_id="start", resource="inv", depth=2, created_at=12.5
    )
    assert made == plain
    assert hash(made) == hash(plain)
    assert repr(made) == repr(plain)
    assert dataclasses.asdict(made) == dataclasses.asdict(plain)
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.depth = 3  # type: ignore[misc]
