"""How plans end: released or rolled back on request, reaped, evicted, or closed.

A mixin of :class:`~cleveragents.resource.handlers.database.DatabaseResourceHandler`,
kept apart so each file holds one concern. Whoever takes a plan out of the
:class:`~._plans.PlanTable` finishes it here, which settles it; every lease lock
is taken before the first COMMIT, and every database is asked whether it can
commit before any does.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from cleveragents.errors import HandlerClosedError, PartialCommitError, ResourceError
from cleveragents.resource.handlers._connections import ConnectionsMixin
from cleveragents.resource.handlers._plans import Lease, Plan, PlanState
from cleveragents.resource.handlers._settings import check_label
from cleveragents.resource.reaper import Deadline, Reaper

logger = logging.getLogger("cleveragents.resource.handlers.database")


class EndingMixin(ConnectionsMixin):
    """Committing, rolling back and reaping plans; the reaper's callback."""

    _orphans: set[Plan]
    _reaper: Reaper
    _plan_sweep: Deadline | None
    _idle_sweep: Deadline | None

    # -- ending plans -----------------------------------------------------------

    def _take_plan(self, plan_id: str, operation: str) -> Plan | None:
        check_label("plan_id", plan_id)
        with self._mutex:
            if self._closed:
                raise HandlerClosedError(self.name)
            if self._plans.endings:
                self._plans.raise_if_ended(plan_id, operation)
            plan = self._plans.get(plan_id)
            if plan is None:
                return None
            if operation == "release_plan" and _in_own_block(plan):
                raise ResourceError(
                    "release_plan was called inside one of the plan's own connection() "
                    "blocks; end the block first (nothing was done)",
                    plan_id=plan_id,
                    operation=operation,
                )
            return self._plans.take(plan_id)

    def _finish(
        self,
        plan: Plan,
        *,
        commit: bool,
        locked: bool = False,
        wait_until: float | None = None,
    ) -> None:
        """Commit or roll back every lease of a plan already taken out of the table.

        Whoever takes a plan out finishes it with this, which settles it.
        Databases are committed in first-use order, after every one said it
        can commit; after a failed commit the rest are rolled back. Each
        lease's connection and turn are given back as soon as its database is
        done; the plan's outcome is counted when the last one is. With
        *locked*, the caller already holds every lease lock (eviction and
        reaping); with *wait_until* (close), a lease lock not free by then
        leaves the plan to the thread holding it.
        """
        leases = list(plan.leases.values())
        if not locked and not self._lock_leases(plan, leases, wait_until):
            return
        error: BaseException | None = None
        try:
            self._finish_leases(plan, leases, commit=commit)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if self._telemetry is not None:
                self._telemetry.plan_ended(plan, commit, error, self._closed)
            if plan.state is not PlanState.SETTLED:  # normally the last check-in did it
                with self._mutex:
                    self._plans.settle(plan)

    def _abandon(self, lease: Lease, error: BaseException) -> None:
        """Undo a new lease whose first call raised *error*: roll back, give back, forget it.

        A plan left with no lease (its first call failed) ends here, unless
        another thread took it out to finish it meanwhile.
        """
        ended = False
        try:
            self._end_lease(lease, commit=False, ended="failed")
        except ResourceError as exc:
            logger.debug("abandoning lease of plan %r: %s", lease.plan.plan_id, exc)
        finally:
            lease.users -= 1
            try:
                self._checkin(lease)
            finally:
                with self._mutex:
                    plan = lease.plan
                    if plan.leases.get(lease.database.identity) is lease:
                        del plan.leases[lease.database.identity]
                    ended = not plan.leases and plan.state is PlanState.ACTIVE
                    self._plans.forget(plan)
                lease.lock.release()
                if self._telemetry is not None:
                    self._telemetry.lease_abandoned(plan, error, plan_ended=ended)

    def _lock_leases(self, plan: Plan, leases: list[Lease], wait_until: float | None) -> bool:
        """Take every lease lock of a plan taken out, in order; all or none.

        Interrupted (KeyboardInterrupt) before holding them all, the plan goes
        back to the table untouched, so rollback_plan, the reaper or close()
        can still end it. Past *wait_until*, it is left to the thread holding
        the lock, which finishes it when it leaves its block.
        """
        taken: list[Lease] = []
        try:
            for lease in leases:
                if wait_until is None:
                    lease.lock.acquire()
                elif not lease.lock.acquire(timeout=max(0.0, wait_until - time.monotonic())):
                    logger.warning(
                        "closing %r: plan %r is still running a statement; it is rolled "
                        "back when that ends",
                        self.name,
                        plan.plan_id,
                    )
                    with self._mutex:
                        self._orphans.add(plan)
                    for held in taken:
                        held.lock.release()
                    return False
                taken.append(lease)
        except BaseException:
            for held in taken:
                held.lock.release()
            with self._mutex:
                self._plans.put_back(plan)
            raise
        return True

    def _finish_orphan(self, plan: Plan) -> None:
        """Roll back a plan close() left to this thread, now that it left its block."""
        with self._mutex:
            if plan not in self._orphans or any(lease.users for lease in plan.leases.values()):
                return
            self._orphans.discard(plan)
        try:
            self._finish(plan, commit=False)
        finally:
            for database in {lease.database for lease in plan.leases.values()}:
                with self._mutex:
                    conn, database.memory_conn = database.memory_conn, None
                    if conn is not None:
                        self._pool.release_slot()
                if conn is not None:
                    self._close_connection(database, conn)

    def _finish_leases(self, plan: Plan, leases: list[Lease], *, commit: bool) -> None:
        """Commit or roll back *leases* (their locks held); release the locks."""
        committed: list[str] = []
        error: BaseException | None = None  # the first one; it is what the caller gets
        try:
            if commit:
                error = self._refuse_commit(plan, leases)
            if not leases:
                with self._mutex:
                    self._counts["commits" if commit and error is None else "rollbacks"] += 1
                    self._plans.settle(plan)
            last = leases[-1] if leases else None
            for lease in leases:
                done = False
                if commit and error is None:
                    error, done = self._commit_lease(lease)
                    if done:
                        committed.append(lease.resolved.resource)
                if not done:
                    error = self._roll_back_lease(lease, error)
                outcome = None
                if lease is last:
                    outcome = "commits" if commit and error is None else "rollbacks"
                error = self._give_back(lease, outcome, error)
        finally:
            for lease in leases:
                lease.lock.release()
        if error is None:
            logger.debug("plan %r %s", plan.plan_id, "released" if commit else "rolled back")
            return
        if (
            commit
            and committed
            and (isinstance(error, ResourceError) or len(committed) < len(leases))
        ):
            raise PartialCommitError(
                f"commit failed after {committed!r} were committed; the rest were rolled "
                f"back: {getattr(error, 'reason', None) or type(error).__name__}",
                committed=committed,
                plan_id=plan.plan_id,
                resource=getattr(error, "resource", None),
                operation="commit",
            ) from error
        raise error

    def _commit_lease(self, lease: Lease) -> tuple[BaseException | None, bool]:
        """Commit one lease; return the error, if any, and whether it did commit."""
        try:
            self._end_lease(lease, commit=True, ended="released")
        except BaseException as exc:
            conn = lease.conn
            # Interrupted (Ctrl-C) just after the COMMIT returned: it did commit.
            # A connection left with no transaction open says so on every engine
            # (transaction_lost() answers only where a plan's SQL can end one).
            interrupted_after = (
                not isinstance(exc, ResourceError)
                and conn is not None
                and lease.database.engine.is_clean(conn)
            )
            return exc, interrupted_after
        return None, True

    def _roll_back_lease(self, lease: Lease, error: BaseException | None) -> BaseException | None:
        try:
            self._end_lease(lease, commit=False, ended="rolled back")
        except BaseException as exc:
            return error or exc
        return error

    def _give_back(
        self, lease: Lease, outcome: str | None, error: BaseException | None
    ) -> BaseException | None:
        try:
            self._checkin(lease, outcome=outcome)
        except BaseException as exc:
            return error or exc
        return error

    def _refuse_commit(self, plan: Plan, leases: list[Lease]) -> ResourceError | None:
        """Say why *plan* must commit nothing, asking every database before the first COMMIT."""
        for lease in leases:
            reason = plan.poisoned
            if reason is None and lease.conn is not None:
                reason = lease.database.engine.check_committable(lease.conn)
            if reason is not None:
                return ResourceError(
                    f"nothing was committed: {reason}",
                    plan_id=plan.plan_id,
                    resource=lease.resolved.resource,
                    operation="commit",
                )
        return None

    def _end_lease(self, lease: Lease, *, commit: bool, ended: str) -> None:
        """Commit or roll back one lease's transaction (its lock held).

        The caller gives the connection back with :meth:`_checkin`, except after
        a failed rollback: the connection's state is then unknown, so it is
        closed here and never lent again.
        """
        lease.ended = lease.ended or ended
        conn = lease.conn
        if conn is None:
            return
        engine = lease.database.engine
        telemetry = self._telemetry
        started = time.monotonic() if telemetry is not None else 0.0
        try:
            if commit:
                engine.commit(conn)
            else:
                engine.rollback(conn)
        except BaseException as exc:
            if telemetry is not None:
                telemetry.lease_ended(lease, commit, started, exc)
            if not commit:
                lease.ended = "broken"
                self._checkin(lease, broken=True)
            if isinstance(exc, engine.driver_error):
                raise self._wrap(exc, lease, "commit" if commit else "rollback", None) from exc
            raise
        if telemetry is not None:
            telemetry.lease_ended(lease, commit, started, None)

    # -- the reaper's callback ------------------------------------------------------

    def _on_deadlines(self, due: list[Any], now: float) -> None:
        """Reap plans idle past their TTL and close connections idle past ``idle_timeout``."""
        reaped: list[Plan] = []
        stale: list[Any] = []
        with self._mutex:
            for item in due:
                if item == "plans":
                    reaped += self._sweep_plans(now)
                elif item == "idle":
                    self._idle_sweep = None
                    swept, next_due = self._pool.sweep(now)
                    stale += swept
                    if next_due is not None:
                        self._arm_idle_sweep(next_due)
        for entry in stale:
            self._close_connection(entry.database, entry.conn)
        for plan in reaped:
            logger.warning(
                "handler %r reaped plan %r: idle longer than checkpoint_ttl (%gs)",
                self.name,
                plan.plan_id,
                plan.ttl,
            )
            try:
                self._finish(plan, commit=False, locked=True)
            except Exception as exc:  # the other reaped plans must still be finished
                logger.warning("rolling back reaped plan %r: %s", plan.plan_id, exc)

    def _sweep_plans(self, now: float) -> list[Plan]:
        """Take the plans idle past their TTL (see PlanTable.sweep); re-arm; hold the mutex."""
        sweep = self._plan_sweep
        if sweep is not None and sweep.done:  # handed over: this is it running
            self._plan_sweep = None
        reaped, earliest = self._plans.sweep(now)
        self._counts["reaped"] += len(reaped)
        if earliest is not None:
            self._arm_plan_sweep(earliest)
        return reaped

    def _arm_plan_sweep(self, when: float) -> None:
        """Make sure the plan sweep runs by *when*; call with the mutex held.

        A plan that ends before the sweep costs the reaper nothing: there is
        one deadline for all plans, moved earlier only when a plan could expire
        before it (a first plan, or a shorter ``checkpoint_ttl``).
        """
        sweep = self._plan_sweep
        if sweep is not None and not sweep.done:
            if sweep.when <= when:
                return
            self._reaper.cancel(sweep)
        self._plan_sweep = self._reaper.schedule(when, "plans")

    def _arm_idle_sweep(self, when: float) -> None:
        """Make sure the idle sweep runs at *when*, if none is pending; hold the mutex."""
        if self._idle_sweep is None:
            self._idle_sweep = self._reaper.schedule(when, "idle")


def _in_own_block(plan: Plan) -> bool:
    """Whether the calling thread is inside one of *plan*'s ``connection()`` blocks."""
    for lease in plan.leases.values():  # noqa: SIM110 - no generator on every release
        if lease.users and lease.held_here():
            return True
    return False
