"""The reaper: one daemon thread per handler that acts on deadlines as they fall due.

It keeps a heap of deadlines and sleeps until the earliest one; with nothing
scheduled it sleeps without a timeout, so an idle handler causes no wake-ups.
The thread holds only a weak reference to its handler: a forgotten handler can
still be collected, and its finalizer stops the thread.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# Rebuild the heap when more than half of it (and at least this many entries)
# are cancelled, so finished plans do not pile up until their old deadlines.
_COMPACT_MIN = 64


class Deadline:
    """A scheduled call on the handler; cancel it when it no longer applies."""

    __slots__ = ("cancelled", "key", "when")

    def __init__(self, when: float, key: Any) -> None:
        self.when = when
        self.key = key
        self.cancelled = False


class _Target(Protocol):
    def _on_deadlines(self, due: list[Any], now: float) -> None: ...


class Reaper:
    """A deadline heap and the lazily started thread that serves it.

    *lock* is the handler's bookkeeping lock: the heap is part of its
    bookkeeping, so scheduling happens under the same lock as the rest.
    """

    def __init__(
        self,
        handler: _Target,
        lock: threading.Lock,
        *,
        name: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._handler_ref = weakref.ref(handler)
        self._wakeup = threading.Condition(lock)
        self._heap: list[tuple[float, int, Deadline]] = []
        self._counter = itertools.count()
        self._cancelled = 0
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._name = name
        self._clock = clock

    @property
    def thread(self) -> threading.Thread | None:
        """The reaper thread, once started."""
        return self._thread

    def __len__(self) -> int:
        return len(self._heap) - self._cancelled

    def schedule(self, when: float, key: Any) -> Deadline:
        """Call the handler with *key* at *when*. Call with the handler's lock held."""
        deadline = Deadline(when, key)
        if self._stopped:
            deadline.cancelled = True
            return deadline
        heapq.heappush(self._heap, (when, next(self._counter), deadline))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        elif self._heap[0][2] is deadline:
            self._wakeup.notify()
        return deadline

    def cancel(self, deadline: Deadline) -> None:
        """Forget *deadline*. Call with the handler's lock held."""
        if deadline.cancelled:
            return
        deadline.cancelled = True
        self._cancelled += 1
        if self._cancelled > _COMPACT_MIN and self._cancelled * 2 > len(self._heap):
            self._heap = [entry for entry in self._heap if not entry[2].cancelled]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def stop(self, *, join: bool = True) -> None:
        """Stop the thread and wait for it (unless called from the thread itself)."""
        with self._wakeup:
            self._stopped = True
            self._heap.clear()
            self._cancelled = 0
            self._wakeup.notify()
            thread = self._thread
        if join and thread is not None and thread is not threading.current_thread():
            thread.join()

    def _take_due(self) -> tuple[list[Any], float] | None:
        """Sleep until something is due; return it, or ``None`` once stopped."""
        with self._wakeup:
            while not self._stopped:
                now = self._clock()
                while self._heap and self._heap[0][2].cancelled:
                    heapq.heappop(self._heap)
                    self._cancelled -= 1
                if self._heap and self._heap[0][0] <= now:
                    due = []
                    while self._heap and self._heap[0][0] <= now:
                        deadline = heapq.heappop(self._heap)[2]
                        if deadline.cancelled:
                            self._cancelled -= 1
                        else:
                            deadline.cancelled = True
                            due.append(deadline.key)
                    return due, now
                self._wakeup.wait(self._heap[0][0] - now if self._heap else None)
            return None

    def _run(self) -> None:
        while (taken := self._take_due()) is not None:
            handler = self._handler_ref()
            if handler is None:
                return
            try:
                handler._on_deadlines(*taken)
            except Exception:
                # The reaper must outlive any one failure, or every later plan
                # would be left unreaped; the error is logged with its traceback.
                logger.exception("reaper of %s failed; it keeps running", self._name)
            del handler
