"""The reaper: plans idle past their checkpoint_ttl are rolled back, and told so once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from conftest import wait_until

from cleveragents.errors import CheckpointExpiredError
from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler

from .conftest import Database

MakeHandler = Callable[..., DatabaseResourceHandler]


def _reaper_threads(handler: DatabaseResourceHandler) -> list[threading.Thread]:
    name = f"cleveragents-reaper[{handler.name}]"
    return [thread for thread in threading.enumerate() if thread.name == name]


def _insert(handler: DatabaseResourceHandler, resource: Resource, plan_id: str, value: str) -> None:
    with handler.connection(resource, plan_id) as conn:
        conn.execute(f"INSERT INTO t VALUES ('{value}')")


def test_the_reaper_starts_with_the_first_plan(
    handler: DatabaseResourceHandler, db: Database
) -> None:
    handler.stats()
    assert _reaper_threads(handler) == []
    handler.create_checkpoint(db.resource(), "p1", "a")
    (thread,) = _reaper_threads(handler)
    assert thread.daemon
    handler.close()
    assert not thread.is_alive()


def test_an_idle_plan_is_reaped_and_its_next_call_raises_once(
    handler: DatabaseResourceHandler, db: Database
) -> None:
    resource = db.resource(checkpoint_ttl="200ms")
    handler.create_checkpoint(resource, "p1", "first")
    handler.create_checkpoint(resource, "p1", "second")
    _insert(handler, resource, "p1", "doomed")
    wait_until(lambda: handler.stats().reaped == 1)
    assert db.rows() == []
    stats = handler.stats()
    assert (stats.active_plans, stats.rollbacks, stats.commits) == (0, 1, 0)
    assert stats.open_connections == stats.idle_connections
    with pytest.raises(CheckpointExpiredError) as info:
        handler.release_plan("p1")
    error = info.value
    assert (error.plan_id, error.checkpoint_id, error.resource, error.operation) == (
        "p1",
        "second",
        "db",
        "release_plan",
    )
    assert error.ttl == pytest.approx(0.2)
    assert error.age >= 0.2
    assert "checkpoint_ttl (0.2s)" in str(error)
    handler.release_plan("p1")  # raised once: now it is an unknown plan
    assert handler.stats().commits == 0


def test_a_plan_in_use_is_not_reaped(handler: DatabaseResourceHandler, db: Database) -> None:
    resource = db.resource(checkpoint_ttl="300ms")
    for index in range(6):  # 0.6s in all, never 300ms without a call
        _insert(handler, resource, "p1", str(index))
        time.sleep(0.1)
    with handler.connection(resource, "p1") as conn:
        time.sleep(0.6)  # mid-statement past the TTL: the reaper must wait
        conn.execute("INSERT INTO t VALUES ('long')")
    handler.release_plan("p1")
    assert handler.stats().reaped == 0
    assert len(db.rows()) == 7


def test_idle_time_counts_from_the_last_call_on_any_resource(
    handler: DatabaseResourceHandler, db: Database, make_db: Callable[[str], Database]
) -> None:
    other_db = make_db("other")
    first = db.resource(checkpoint_ttl="300ms")
    second = other_db.resource("other", checkpoint_ttl="300ms")
    _insert(handler, first, "p1", "first")
    for index in range(6):  # only the second database is used, for 0.6s
        _insert(handler, second, "p1", str(index))
        time.sleep(0.1)
    handler.release_plan("p1")
    assert handler.stats().reaped == 0
    assert db.rows() == ["first"]
    assert len(other_db.rows()) == 6


def test_the_smallest_ttl_of_a_plans_resources_applies(
    handler: DatabaseResourceHandler, db: Database, make_db: Callable[[str], Database]
) -> None:
    patient = db.resource(checkpoint_ttl=60)
    hasty = make_db("other").resource("hasty", checkpoint_ttl="200ms")
    handler.create_checkpoint(patient, "p1", "a")
    handler.create_checkpoint(hasty, "p1", "b")
    wait_until(lambda: handler.stats().reaped == 1)
    with pytest.raises(CheckpointExpiredError) as info:
        handler.create_checkpoint(patient, "p1", "c")
    assert info.value.ttl == pytest.approx(0.2)


def test_the_handler_ttl_applies_when_a_resource_sets_none(
    make_handler: MakeHandler, db: Database
) -> None:
    handler = make_handler(checkpoint_ttl="200ms")
    resource = db.resource()
    handler.create_checkpoint(resource, "p1", "a")
    wait_until(lambda: handler.stats().reaped == 1)
    with pytest.raises(CheckpointExpiredError):
        handler.rollback_to(resource, "p1", "a")


def test_a_plan_begun_after_the_sweep_was_set_is_reaped_at_its_own_ttl(
    handler: DatabaseResourceHandler, db: Database
) -> None:
    resource = db.resource(checkpoint_ttl="300ms")
    handler.create_checkpoint(resource, "early", "a")
    handler.release_plan("early")  # the sweep stays set for 300ms after "early" began
    time.sleep(0.15)
    began = time.monotonic()
    handler.create_checkpoint(resource, "late", "a")
    time.sleep(0.2)  # past the sweep, short of late's own TTL
    assert handler.stats().reaped == 0
    wait_until(lambda: handler.stats().reaped == 1)
    assert time.monotonic() - began >= 0.3
    with pytest.raises(CheckpointExpiredError):
        handler.release_plan("late")


def test_a_new_plan_with_a_shorter_ttl_is_reaped_first(
    handler: DatabaseResourceHandler, db: Database, make_db: Callable[[str], Database]
) -> None:
    patient = db.resource(checkpoint_ttl=60)
    hasty = make_db("other").resource("hasty", checkpoint_ttl="200ms")
    handler.create_checkpoint(patient, "slow", "a")  # sets the sweep 60s away
    handler.create_checkpoint(hasty, "quick", "a")  # must bring it forward
    wait_until(lambda: handler.stats().reaped == 1)
    with pytest.raises(CheckpointExpiredError):
        handler.release_plan("quick")
    handler.release_plan("slow")
