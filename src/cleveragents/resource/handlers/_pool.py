"""The connection pool's bookkeeping: slots, idle connections, waiting for a slot.

It never sees a plan and does no I/O: it says which connection to lend,
which to close and when a slot is free; the handler opens and closes them,
outside the mutex. Every method is called with the handler's mutex held.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Hashable
from typing import Any


@dataclasses.dataclass(slots=True)
class Idle:
    """A connection in the idle pool, with what it was opened for."""

    database: Any  # the handler's _Database
    conn: Any
    config: Hashable
    since: float


class ConnectionPool:
    """At most *limit* open connections (lent and idle together), idle ones kept in LRU order.

    :meth:`reserve` is the only thing that raises the count of open
    connections and :meth:`release_slot` the only thing that lowers it: a
    connection taken from the idle pool keeps its slot, and so does one whose
    slot passes to a new connection (:meth:`take_oldest_idle`).
    """

    __slots__ = ("_idle", "_slot_freed", "closed", "idle_timeout", "limit", "open", "waiters")

    def __init__(self, mutex: threading.Lock, limit: int, idle_timeout: float) -> None:
        self.limit = limit
        self.idle_timeout = idle_timeout
        self.open = 0
        self.waiters = 0  # threads in wait(): notify only when one waits
        self.closed = False
        self._idle: collections.OrderedDict[int, Idle] = collections.OrderedDict()
        self._slot_freed = threading.Condition(mutex)

    def __len__(self) -> int:
        """Return how many connections are idle."""
        return len(self._idle)

    def idle_databases(self) -> set[Hashable]:
        """Return the identities of the databases idle connections belong to."""
        return {entry.database.identity for entry in self._idle.values()}

    def pop_idle(self, database: Any, config: Hashable) -> Any:
        """Take the most recently used idle connection to *database* opened with *config*."""
        idle = self._idle
        for key in reversed(idle):
            entry = idle[key]
            if entry.database is database and entry.config == config:
                del idle[key]
                return entry.conn
        return None

    def reserve(self) -> bool:
        """Count one more open connection if the limit allows it."""
        if self.open < self.limit and not self.closed:
            self.open += 1
            return True
        return False

    def release_slot(self, count: int = 1) -> None:
        """Count *count* connections as closed (or never opened), and wake that many waiters."""
        self.open -= count
        self.wake(count)

    def take_oldest_idle(self) -> Idle | None:
        """Take the least recently used idle connection; its slot passes to the caller."""
        if not self._idle:
            return None
        return self._idle.popitem(last=False)[1]

    def put_idle(self, database: Any, conn: Any, config: Hashable, now: float) -> bool:
        """Keep *conn* for reuse; return whether it is the only idle one (arm the sweep)."""
        self._idle[id(conn)] = Idle(database, conn, config, now)
        self.wake()
        return len(self._idle) == 1

    def sweep(self, now: float) -> tuple[list[Idle], float | None]:
        """Take the connections idle past ``idle_timeout``; their slots are released.

        Return them (for the caller to close) and when the next one falls due.
        """
        stale: list[Idle] = []
        limit = now - self.idle_timeout
        idle = self._idle
        while idle and next(iter(idle.values())).since <= limit:
            stale.append(idle.popitem(last=False)[1])
        if stale:
            self.release_slot(len(stale))
        due = next(iter(idle.values())).since + self.idle_timeout if idle else None
        return stale, due

    def drain(self) -> list[Idle]:
        """Close the pool: take every idle connection (slots released) and lend no more.

        Also called by a finalizer, when nothing else can use the pool: it
        wakes nobody (close() wakes every waiter itself, with the mutex held).
        """
        self.closed = True
        drained = list(self._idle.values())
        self._idle.clear()
        self.open -= len(drained)
        return drained

    def wait(self, timeout: float) -> None:
        """Wait up to *timeout* for a slot or an idle connection to be freed."""
        self.waiters += 1
        try:
            self._slot_freed.wait(timeout)
        finally:
            self.waiters -= 1

    def wake(self, count: int = 1) -> None:
        """Wake up to *count* threads waiting in :meth:`wait`, if any wait."""
        if self.waiters:
            self._slot_freed.notify(count)


__all__ = ["ConnectionPool", "Idle"]
