"""The write turnstile: admits one plan at a time to a database, first come, first served."""

from __future__ import annotations

import collections
import threading


class Turnstile:
    """Admits one plan at a time to a database, first come, first served.

    It shares the handler's mutex: taking a free turn and giving it back
    happen inside the handler's own critical sections, so the uncontended path
    costs no lock of its own and no thread handoff. A waiter parks on its own
    lock (its *gate*) and is handed the turn directly, so a release wakes
    exactly the next plan in line. :meth:`close` opens every gate at once.
    """

    __slots__ = ("_mutex", "_queue", "closed", "holder")

    def __init__(self, mutex: threading.Lock) -> None:
        self._mutex = mutex
        self._queue: collections.deque[tuple[threading.Lock, str]] = collections.deque()
        self.holder: str | None = None
        self.closed = False

    def __len__(self) -> int:
        """Return how many plans wait in line."""
        return len(self._queue)

    def try_take(self, plan_id: str) -> bool:
        """Take the turn if nobody holds it or waits for it; call with the mutex held."""
        if self.holder is None and not self._queue and not self.closed:
            self.holder = plan_id
            return True
        return False

    def acquire(self, plan_id: str, timeout: float) -> bool:
        """Wait up to *timeout* for the turn; call without the mutex held.

        Return ``False`` when the time ran out or the turnstile was closed
        (:attr:`closed` says which).
        """
        with self._mutex:
            if self.try_take(plan_id):
                return True
            if self.closed:
                return False
            gate = threading.Lock()
            gate.acquire()
            entry = (gate, plan_id)
            self._queue.append(entry)
        try:
            opened = gate.acquire(timeout=timeout)
        except BaseException:
            # Interrupted (KeyboardInterrupt) while waiting: leave the line, and
            # pass on a turn handed over meanwhile, or nobody would ever get it.
            with self._mutex:
                if gate.acquire(blocking=False):
                    if self.holder == plan_id:
                        self.release()
                else:
                    self._queue.remove(entry)
            raise
        with self._mutex:
            if opened or gate.acquire(blocking=False):  # or handed over just as we gave up
                # A gate opens when the turn is handed over, or when close() opens them all.
                return self.holder == plan_id
            self._queue.remove(entry)
            return False

    def release(self) -> None:
        """Hand the turn to the next plan in line; call with the mutex held."""
        if self._queue and not self.closed:
            gate, self.holder = self._queue.popleft()
            gate.release()
        else:
            self.holder = None

    def close(self) -> None:
        """Turn every waiter away at once and admit nobody again; call with the mutex held."""
        self.closed = True
        while self._queue:
            gate, _ = self._queue.popleft()
            gate.release()


__all__ = ["Turnstile"]
