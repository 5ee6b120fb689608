"""The parts of the LangGraph integration that stand alone: the turn calls take, stale configs."""

from __future__ import annotations

import asyncio
import gc
import threading
from pathlib import Path

import pytest
from langgraph_kit import EVENTUALLY, make_handler, sqlite_shop

from cleveragents.integrations.langgraph import PlanCheckpointer
from cleveragents.integrations.langgraph._invocation import CONFIG_KEY, _Turn


def test_coroutines_and_threads_take_one_turn_in_turn() -> None:
    turn = _Turn()
    inside: list[str] = []
    overlaps: list[list[str]] = []

    def hold(name: str) -> None:
        if inside:
            overlaps.append([*inside, name])
        inside.append(name)
        inside.remove(name)

    def thread_work() -> None:
        for _ in range(50):
            turn.acquire()
            try:
                hold("thread")
            finally:
                turn.release()

    async def coroutine_work(name: str) -> None:
        for _ in range(50):
            await turn.aacquire()
            try:
                hold(name)
                await asyncio.sleep(0)
            finally:
                turn.release()

    async def scenario() -> None:
        worker = threading.Thread(target=thread_work)
        worker.start()
        await asyncio.gather(coroutine_work("a"), coroutine_work("b"))
        await asyncio.to_thread(worker.join, EVENTUALLY)

    asyncio.run(scenario())
    assert overlaps == []
    assert turn.try_acquire()
    turn.release()


def test_a_cancelled_waiter_leaves_the_line() -> None:
    turn = _Turn()

    async def scenario() -> None:
        turn.acquire()
        waiting = asyncio.ensure_future(turn.aacquire())
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        turn.release()  # wakes nobody: the cancelled waiter is gone
        await asyncio.wait_for(turn.aacquire(), EVENTUALLY)
        turn.release()

    asyncio.run(scenario())


def test_a_waiter_whose_loop_has_closed_does_not_break_release() -> None:
    turn = _Turn()
    turn.acquire()
    loop = asyncio.new_event_loop()
    waiting = loop.create_task(turn.aacquire())
    loop.run_until_complete(asyncio.sleep(0))  # it registers and waits
    loop.close()
    turn.release()  # its loop is closed: nothing to wake, no error
    assert not waiting.done()
    assert turn.try_acquire()


def test_a_config_of_an_invocation_that_is_gone_is_refused(tmp_path: Path) -> None:
    with make_handler() as handler:
        saver = PlanCheckpointer(handler, sqlite_shop(tmp_path).resource)
        gc.collect()
        stale = {"configurable": {"thread_id": "t1", CONFIG_KEY: "langgraph-gone"}}
        with pytest.raises(RuntimeError, match="'langgraph-gone' has ended"):
            saver.get_tuple(stale)


def test_the_end_of_an_invocation_runs_to_completion_through_cancellation() -> None:
    from cleveragents.integrations.langgraph._invocation import uninterrupted

    done: list[str] = []

    async def scenario() -> None:
        go = asyncio.Event()

        async def end_of_invocation() -> str:
            await go.wait()
            done.append("ended")
            return "ended"

        ending = asyncio.ensure_future(uninterrupted(end_of_invocation()))
        for _ in range(3):
            await asyncio.sleep(0)  # it is waiting now
        ending.cancel()
        await asyncio.sleep(0)
        ending.cancel()  # and again
        await asyncio.sleep(0)
        assert not ending.done()  # still waiting for the work to end
        go.set()
        with pytest.raises(asyncio.CancelledError):
            await ending  # the cancellation is passed on once the work is done
        assert await uninterrupted(asyncio.sleep(0, "plain")) == "plain"

    asyncio.run(scenario())
    assert done == ["ended"]
