"""The plan table alone: plans, leases with fake connections, an explicit clock."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from cleveragents.errors import CheckpointEvictedError, CheckpointExpiredError
from cleveragents.resource.handlers._plans import (
    Ending,
    Endings,
    Lease,
    PlanState,
    PlanTable,
    try_lock,
)


def _resolved(name: str = "db") -> SimpleNamespace:
    return SimpleNamespace(resource=name, database=SimpleNamespace(identity=name, memory_conn=None))


def _open(table: PlanTable, plan_id: str, now: float, ttl: float = 10.0) -> Lease:
    plan = table.open(plan_id, now, ttl)
    lease = Lease(plan, _resolved())
    lease.conn = object()
    plan.leases["db"] = lease
    return lease


def test_a_plan_moves_from_active_to_finishing_to_settled() -> None:
    table = PlanTable(threading.Lock())
    lease = _open(table, "p", now=0.0)
    plan = lease.plan
    assert table.get("p") is plan and plan.state is PlanState.ACTIVE
    assert table.take("p") is plan
    assert table.get("p") is None and plan.state is PlanState.FINISHING
    assert plan in table.finishing
    table.settle(plan)
    assert plan.state is PlanState.SETTLED and not table.finishing
    assert table.take("p") is None


def test_an_interrupted_finish_puts_the_plan_back() -> None:
    table = PlanTable(threading.Lock())
    plan = _open(table, "p", now=0.0).plan
    table.take("p")
    table.put_back(plan)
    assert table.get("p") is plan and plan.state is PlanState.ACTIVE
    assert not table.finishing


def test_the_sweep_reaps_idle_plans_not_in_use_and_says_when_to_look_again() -> None:
    table = PlanTable(threading.Lock())
    idle = _open(table, "idle", now=0.0, ttl=5.0)
    busy = _open(table, "busy", now=0.0, ttl=5.0)
    busy.users = 1
    fresh = _open(table, "fresh", now=4.0, ttl=5.0)
    reaped, earliest = table.sweep(now=6.0)
    assert reaped == [idle.plan]
    assert idle.ended == "expired" and idle.lock.acquire(blocking=False)  # held, re-entrant
    assert earliest == 9.0  # the fresh plan; the busy one is looked at a whole TTL later
    assert table.get("busy") is busy.plan and table.get("fresh") is fresh.plan
    error = table.endings.pop("idle", None)
    assert error is not None and error.how == "expired" and error.age == 6.0


def test_an_ended_plans_next_call_raises_once() -> None:
    table = PlanTable(threading.Lock())
    lease = _open(table, "p", now=0.0, ttl=1.0)
    lease.checkpoints["before"] = "cp_1"
    table.sweep(now=3.0)
    with pytest.raises(CheckpointExpiredError) as raised:
        table.raise_if_ended("p", "execute")
    assert (raised.value.checkpoint_id, raised.value.operation) == ("before", "execute")
    table.raise_if_ended("p", "execute")  # once only


def test_the_victim_is_the_least_recently_used_plan_not_in_use() -> None:
    table = PlanTable(threading.Lock())
    asking = _open(table, "asking", now=0.0)
    oldest_busy = _open(table, "oldest", now=1.0)
    oldest_busy.users = 1
    older = _open(table, "older", now=2.0)
    _open(table, "newer", now=3.0)
    victim = table.pick_victim(asking.plan, now=4.0)
    assert victim is older.plan and older.ended == "evicted"
    with pytest.raises(CheckpointEvictedError):
        table.raise_if_ended("older", "execute")


def test_try_lock_takes_all_lease_locks_or_none() -> None:
    table = PlanTable(threading.Lock())
    lease = _open(table, "p", now=0.0)
    second = Lease(lease.plan, _resolved("other"))
    second.conn = object()
    lease.plan.leases["other"] = second
    second.users = 1
    assert not try_lock(lease.plan)
    assert not lease.held_here()
    second.users = 0
    assert try_lock(lease.plan)
    assert lease.held_here() and second.held_here()


def _ending(at: float) -> Ending:
    return Ending(how="evicted", checkpoint_id=None, resource="db", age=0.0, ttl=1.0, at=at)


def test_endings_keep_the_latest_always_and_older_ones_for_a_while() -> None:
    endings = Endings(max_kept=2, keep_for=100.0)
    for number in range(5):
        endings.add(f"p{number}", _ending(at=float(number)))
    assert len(endings) == 5  # all younger than keep_for
    endings.add("late", _ending(at=1000.0))
    assert len(endings) == 2
    assert list(endings) == ["p4", "late"]


def test_wait_for_finishing_names_what_other_threads_still_finish() -> None:
    mutex = threading.Lock()
    table = PlanTable(mutex)
    mine = _open(table, "mine", now=0.0)
    _open(table, "theirs", now=0.0)
    mine.lock.acquire()  # this thread is inside one of mine's connection() blocks
    try:
        table.take_all()
        with mutex:
            assert table.wait_for_finishing(0.0) == ["theirs"]
    finally:
        mine.lock.release()


def test_hundreds_of_young_endings_are_all_kept_then_trimmed_to_the_latest() -> None:
    """What a handler with max_kept=50 remembers of 199 evictions (then one more, later)."""
    endings = Endings(max_kept=50, keep_for=3600.0)
    for number in range(199):
        endings.add(f"other {number}", _ending(at=float(number)))
    assert len(endings) == 199  # all younger than an hour: none forgotten
    endings.keep_for = 0.0
    endings.add("last", _ending(at=200.0))
    assert len(endings) == 50
    assert endings.pop("last", None) is not None
    assert endings.pop("other 198", None) is not None
    assert endings.pop("other 0", None) is None


def test_a_forgotten_ending_leaves_a_plain_unknown_plan() -> None:
    table = PlanTable(threading.Lock(), Endings(max_kept=2, keep_for=0.0))
    for number in range(3):
        _open(table, f"p{number}", now=float(number), ttl=0.1)
    reaped, _ = table.sweep(now=10.0)
    assert len(reaped) == 3
    table.raise_if_ended("p0", "release_plan")  # forgotten: nothing to say
    for plan_id in ("p1", "p2"):
        with pytest.raises(CheckpointExpiredError):
            table.raise_if_ended(plan_id, "release_plan")
