"""The plan table: open plans and their leases, plans being finished, and how plans ended.

It never touches a connection. A plan moves one way through :class:`PlanState`:
ACTIVE (in the table) -> FINISHING (taken out; whoever took it commits or rolls
it back) -> SETTLED. A plan the reaper or an eviction ended is remembered in
:class:`Endings`, so its next call raises instead of quietly starting afresh.
Every method is called with the handler's mutex held, except where said.
"""

from __future__ import annotations

import _thread
import collections
import dataclasses
import enum
import threading
import time
from collections.abc import Hashable, Iterator
from typing import Any, Literal

from cleveragents.errors import CheckpointEvictedError, CheckpointExpiredError, ResourceError


class PlanState(enum.Enum):
    ACTIVE = "active"
    FINISHING = "finishing"
    SETTLED = "settled"


class Plan:
    """A plan with open work on one handler."""

    __slots__ = (
        "last_used",
        "leases",
        "owns_span",
        "plan_id",
        "poisoned",
        "span",
        "started",
        "state",
        "ttl",
    )

    def __init__(self, plan_id: str, now: float, ttl: float) -> None:
        self.plan_id = plan_id
        self.started = now
        self.last_used = now
        self.ttl = ttl  # the smallest checkpoint_ttl among the databases it holds
        self.leases: dict[Hashable, Lease] = {}
        self.state = PlanState.ACTIVE
        #: Why the plan can no longer commit (its transaction ended under it), once known.
        self.poisoned: str | None = None
        #: Its ``cleveragents.plan`` span while it is open (telemetry.py), and
        #: whether the handler started it (and so ends it) or records into a caller's.
        self.span: Any = None
        self.owns_span = False


class Lease:
    """A plan's connection to one database, with its checkpoints and write turn.

    ``ended`` and ``conn`` change only under ``lock``, which the thread using
    the connection holds (``users`` counts its nested uses).
    """

    __slots__ = (
        "checkpoints",
        "conn",
        "database",
        "ended",
        "has_turn",
        "lock",
        "opens_plan",
        "plan",
        "resolved",
        "savepoints_made",
        "since",
        "users",
    )

    def __init__(
        self, plan: Plan, resolved: Any, *, since: float = 0.0, opens_plan: bool = False
    ) -> None:
        self.plan = plan
        self.resolved = resolved  # its settings, resource name and connection config
        self.database = resolved.database
        self.lock = _thread.RLock()  # threading.RLock() is a Python-level factory for it
        self.users = 0
        self.conn: Any = None
        self.has_turn = False
        #: The savepoint name of each open checkpoint, by label, oldest first.
        self.checkpoints: dict[str, str] = {}
        self.savepoints_made = 0
        self.ended: str | None = None
        #: When it asked for a connection, then when it got one (monotonic; telemetry).
        self.since = since
        #: Whether making it opened its plan (whose span the maker then starts).
        self.opens_plan = opens_plan

    def held_here(self) -> bool:
        """Whether the calling thread holds this lease's lock."""
        return bool(self.lock._is_owned())  # type: ignore[attr-defined]  # CPython's RLock has it


How = Literal["expired", "evicted"]


@dataclasses.dataclass(frozen=True, slots=True)
class Ending:
    """Why a plan ended without being asked to: its next call raises this, once."""

    how: How
    checkpoint_id: str | None
    resource: str | None
    age: float
    ttl: float
    at: float  # when it ended (monotonic)

    def error(self, plan_id: str, operation: str) -> ResourceError:
        """Return the error the plan's next call raises."""
        context: dict[str, Any] = {
            "plan_id": plan_id,
            "checkpoint_id": self.checkpoint_id,
            "resource": self.resource,
            "operation": operation,
        }
        if self.how == "expired":
            return CheckpointExpiredError(
                f"plan was idle for {self.age:.1f}s, longer than its checkpoint_ttl "
                f"({self.ttl:g}s); the reaper rolled it back",
                age=self.age,
                ttl=self.ttl,
                **context,
            )
        return CheckpointEvictedError(
            "plan was rolled back to free a connection for another plan (on_full=evict_lru)",
            **context,
        )


class Endings(collections.OrderedDict[str, Ending]):
    """Plans reaped or evicted, remembered so their next call raises (once), oldest first.

    Without it such a plan's next call would silently start a new
    transaction, which release_plan would then commit: a partial commit. The
    latest *max_kept* are always kept, older ones for at least *keep_for*
    seconds: a plan forgotten for good must not grow memory forever, and one
    that comes back within that time still gets its error.
    """

    def __init__(self, max_kept: int = 10_000, keep_for: float = 3600.0) -> None:
        super().__init__()
        self.max_kept = max_kept
        self.keep_for = keep_for

    def add(self, plan_id: str, ending: Ending) -> None:
        """Remember *ending*, forgetting endings beyond the bounds."""
        endings = self
        endings.pop(plan_id, None)
        endings[plan_id] = ending
        old_before = ending.at - self.keep_for
        while len(endings) > self.max_kept and next(iter(endings.values())).at <= old_before:
            endings.popitem(last=False)


class PlanTable:
    """Plans with open work, those being finished, and how reaped or evicted ones ended.

    :meth:`get` may be called without the mutex (one dict read).
    """

    def __init__(self, mutex: threading.Lock, endings: Endings | None = None) -> None:
        self._plans: dict[str, Plan] = {}
        # Plans taken out and not yet settled: close() waits for them before it
        # closes what they still use.
        self.finishing: set[Plan] = set()
        self.endings = endings if endings is not None else Endings()
        self._settled = threading.Condition(mutex)
        self._closing = False
        #: Return the open plan with this id, if any; needs no mutex (one dict read).
        self.get = self._plans.get

    def __len__(self) -> int:
        return len(self._plans)

    def __iter__(self) -> Iterator[Plan]:
        return iter(list(self._plans.values()))

    def snapshot(self) -> tuple[Plan, ...]:
        """Return the open plans; needs no mutex (safe even from a signal handler)."""
        for _ in range(8):
            try:
                return tuple(self._plans.values())
            except RuntimeError:  # changed size while copied: another thread; try again
                continue
        return ()

    def raise_if_ended(self, plan_id: str, operation: str) -> None:
        """Raise, once, for a plan the reaper or an eviction ended."""
        if self.endings:
            ending = self.endings.pop(plan_id, None)
            if ending is not None:
                raise ending.error(plan_id, operation)

    def open(self, plan_id: str, now: float, ttl: float) -> Plan:
        """Add a new plan."""
        plan = self._plans[plan_id] = Plan(plan_id, now, ttl)
        return plan

    def forget(self, plan: Plan) -> None:
        """Drop *plan*, still open and left without a lease (its first one failed)."""
        if not plan.leases and self._plans.get(plan.plan_id) is plan:
            del self._plans[plan.plan_id]

    def take(self, plan_id: str) -> Plan | None:
        """Take *plan_id* out to be finished by the caller."""
        plan = self._plans.pop(plan_id, None)
        if plan is not None:
            plan.state = PlanState.FINISHING
            self.finishing.add(plan)
        return plan

    def put_back(self, plan: Plan) -> None:
        """Return a plan taken out whose finishing was interrupted before it began."""
        self.finishing.discard(plan)
        plan.state = PlanState.ACTIVE
        self._plans[plan.plan_id] = plan

    def take_all(self) -> list[Plan]:
        """Take every plan out to be finished (closing): later settlements are announced."""
        self._closing = True
        plans = list(self._plans.values())
        for plan in plans:
            plan.state = PlanState.FINISHING
        self.finishing.update(plans)
        self._plans.clear()
        return plans

    def settle(self, plan: Plan) -> None:
        """Mark a plan taken out as finished."""
        plan.state = PlanState.SETTLED
        self.finishing.discard(plan)
        if self._closing:
            self._settled.notify_all()

    def end_quietly(self, plan: Plan, how: How, now: float) -> None:
        """Take out a plan the reaper or an eviction ends, and remember why it ended."""
        del self._plans[plan.plan_id]
        last = None
        for lease in plan.leases.values():
            lease.ended = how
            if lease.checkpoints:
                last = lease
        self.endings.add(
            plan.plan_id,
            Ending(
                how=how,
                checkpoint_id=next(reversed(last.checkpoints)) if last else None,
                resource=(last or next(iter(plan.leases.values()))).resolved.resource,
                age=now - plan.last_used,
                ttl=plan.ttl,
                at=now,
            ),
        )
        plan.state = PlanState.FINISHING
        self.finishing.add(plan)  # the caller finishes it

    def sweep(self, now: float) -> tuple[list[Plan], float | None]:
        """Take every plan idle past its TTL and not in use, with its lease locks held.

        Return them (marked expired; the caller rolls them back) and when the
        next plan can expire. A plan in use now is looked at again a whole TTL
        later, as it cannot expire sooner once it is left.
        """
        reaped: list[Plan] = []
        earliest: float | None = None
        for plan in list(self._plans.values()):
            expiry = plan.last_used + plan.ttl
            if expiry <= now:
                if try_lock(plan):
                    self.end_quietly(plan, "expired", now)
                    reaped.append(plan)
                    continue
                expiry = now + plan.ttl
            if earliest is None or expiry < earliest:
                earliest = expiry
        return reaped, earliest

    def pick_victim(self, asking: Plan, now: float) -> Plan | None:
        """Take the least recently used plan that holds a pool connection and is not in use.

        It comes with its lease locks held, marked evicted; the caller rolls it back.
        """
        for plan in sorted(self._plans.values(), key=lambda p: p.last_used):
            if plan is asking or not any(
                lease.conn is not None and lease.conn is not lease.database.memory_conn
                for lease in plan.leases.values()
            ):
                continue
            if try_lock(plan):
                self.end_quietly(plan, "evicted", now)
                return plan
        return None

    def holders(self) -> list[str]:
        """Return the ids of plans holding a connection, sorted."""
        return sorted(
            plan.plan_id
            for plan in self._plans.values()
            if any(lease.conn is not None for lease in plan.leases.values())
        )

    def checkpoints(self) -> int:
        """Return how many checkpoints the open plans hold."""
        return sum(
            len(lease.checkpoints)
            for plan in self._plans.values()
            for lease in plan.leases.values()
        )

    def wait_for_finishing(self, timeout: float) -> list[str]:
        """Wait up to *timeout* for plans other threads are finishing; return those left.

        Plans whose lease this very thread holds (close() called inside a
        ``connection()`` block) cannot finish before it returns, so they are
        not waited for.
        """
        deadline = time.monotonic() + timeout
        while True:
            others = [
                plan.plan_id
                for plan in self.finishing
                if not any(lease.held_here() for lease in plan.leases.values())
            ]
            remaining = deadline - time.monotonic()
            if not others or remaining <= 0:
                return others
            self._settled.wait(remaining)


def try_lock(plan: Plan) -> bool:
    """Lock every lease of *plan* if none is in use, without waiting."""
    taken: list[Lease] = []
    for lease in plan.leases.values():
        if lease.lock.acquire(blocking=False):
            taken.append(lease)
            if lease.users == 0 and lease.conn is not None:
                continue
        for held in taken:
            held.lock.release()
        return False
    return True


__all__ = ["Ending", "Endings", "Lease", "Plan", "PlanState", "PlanTable", "try_lock"]
