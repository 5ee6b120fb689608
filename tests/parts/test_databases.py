"""The resolver alone: resources to databases, bounded caches; no database is opened."""

from __future__ import annotations

import threading
from collections.abc import Hashable
from pathlib import Path

import pytest

from cleveragents.errors import ResourceError
from cleveragents.resource import Resource
from cleveragents.resource.handlers._databases import Resolver
from cleveragents.resource.handlers._plans import Lease, PlanTable
from cleveragents.resource.handlers._pool import ConnectionPool
from cleveragents.resource.handlers.database import _databases_in_use


def _sqlite(path: Path, name: str = "db", **options: object) -> Resource:
    return Resource(name, "database", engine="sqlite", location=str(path), **options)


def test_equal_resources_resolve_to_one_database_and_one_entry(tmp_path: Path) -> None:
    resolver = Resolver(threading.Lock(), default_ttl=300.0, in_use=set)
    first = resolver.resolve(_sqlite(tmp_path / "a.db"), "p")
    again = resolver.resolve(_sqlite(tmp_path / "a.db"), "p")  # made apart, equal
    aliased = resolver.resolve(_sqlite(tmp_path / "x" / ".." / "a.db", "alias"), "p")
    assert again is first
    assert aliased.database is first.database  # one file, however it is spelled
    assert (first.ttl, first.takes_turns, first.memory) == (300.0, True, False)
    assert len(resolver) == 2 and len(resolver.databases) == 1
    assert not (tmp_path / "a.db").exists()  # resolving opens nothing


def test_bad_settings_are_a_resource_error_naming_the_field(tmp_path: Path) -> None:
    resolver = Resolver(threading.Lock(), default_ttl=300.0, in_use=set)
    with pytest.raises(ResourceError, match=r"bad setting .*journal_mode") as raised:
        resolver.resolve(_sqlite(tmp_path / "a.db", journal_mode="nope"), "p")
    assert (raised.value.plan_id, raised.value.resource) == ("p", "db")
    assert len(resolver) == 0


def test_forgotten_databases_keep_the_bookkeeping_bounded(tmp_path: Path) -> None:
    """What a handler that touches endless files remembers (max_entries 4 here)."""
    used: set[Hashable] = set()
    resolver = Resolver(threading.Lock(), default_ttl=300.0, in_use=lambda: used, max_entries=4)
    held = resolver.resolve(_sqlite(tmp_path / "held.db", "held"), "holder").database
    used.add(held.identity)  # an open plan holds it
    for index in range(12):
        resolver.resolve(_sqlite(tmp_path / f"db{index}.db", f"db{index}"), f"p{index}")
    for index in range(12):  # many spellings of one database
        resolver.resolve(
            _sqlite(tmp_path / "shared.db", f"shared{index}", busy_timeout=index + 1), "s"
        )
    assert len(resolver.databases) <= 5
    assert len(resolver) <= 4
    # The database a live plan holds was kept: the same object, write turnstile and all.
    assert resolver.databases[held.identity] is held
    assert resolver.resolve(_sqlite(tmp_path / "held.db", "held"), "late").database is held


def test_a_database_whose_turn_is_held_is_kept_even_if_no_plan_is_listed(tmp_path: Path) -> None:
    resolver = Resolver(threading.Lock(), default_ttl=300.0, in_use=set, max_entries=2)
    held = resolver.resolve(_sqlite(tmp_path / "held.db"), "holder").database
    assert held.turnstile.try_take("holder")
    for index in range(6):
        resolver.resolve(_sqlite(tmp_path / f"db{index}.db", f"db{index}"), f"p{index}")
    assert resolver.databases[held.identity] is held


def test_the_databases_in_use_are_those_of_idle_connections_and_open_plans(
    tmp_path: Path,
) -> None:
    mutex = threading.Lock()
    resolver = Resolver(mutex, default_ttl=300.0, in_use=set)
    idle_db = resolver.resolve(_sqlite(tmp_path / "idle.db"), "p").database
    planned = resolver.resolve(_sqlite(tmp_path / "planned.db"), "p")
    resolver.resolve(_sqlite(tmp_path / "unused.db"), "p")
    pool = ConnectionPool(mutex, 4, 60.0)
    pool.reserve()
    pool.put_idle(idle_db, object(), None, now=0.0)
    plans = PlanTable(mutex)
    plan = plans.open("p", now=0.0, ttl=300.0)
    plan.leases[planned.database.identity] = Lease(plan, planned)
    assert _databases_in_use(pool, plans) == {idle_db.identity, planned.database.identity}
