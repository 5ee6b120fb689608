"""An agent plan's verdict: what it has seen of its runs, and whether it may commit.

Kept apart from the OpenAI Agents integration so the rule reads (and is
tested) on its own: a plan commits only if a run returned a final output and
nothing poisoned or doomed it.
"""

from __future__ import annotations

import asyncio
from typing import Any

NO_FINAL_OUTPUT = "no run returned a final output"


class Verdict:
    """What the plan has seen of its runs, and the one rule deciding release or rollback.

    The plan's hooks, run config and ``run()`` report what happens; only
    :meth:`reason_to_roll_back` reads it. ``poison`` is also read by tool
    threads, under the plan's ``_gate``.
    """

    __slots__ = (
        "awaiting_output",
        "doom",
        "final_output",
        "poison",
        "poison_reported",
        "tools_since_model",
    )

    def __init__(self) -> None:
        #: The first handler error of a tool call: nothing can be committed now.
        self.poison: BaseException | None = None
        #: Whether the run was stopped with the poison (else the block's end raises it).
        self.poison_reported = False
        #: Why the plan must be rolled back although nothing raised (the first reason).
        self.doom: str | None = None
        #: A run's model made a final output that the plan could see through.
        self.final_output = False
        #: A model call or an agent started, and no final output came since.
        self.awaiting_output = False
        self.tools_since_model = False

    def doom_with(self, reason: str) -> None:
        """Make the plan roll back for *reason*, unless an earlier reason already does."""
        if self.doom is None:
            self.doom = reason

    def run_raised(self, exc: BaseException) -> None:
        """Note that a run raised: its final output, if the hooks saw one, does not count."""
        if isinstance(exc, asyncio.CancelledError):
            self.doom_with("the run was cancelled")
        else:
            self.doom_with(f"a run raised {type(exc).__name__}: {exc}")

    def agent_ended(self, agent: Any, *, sees_the_end: bool) -> None:
        """Note a final output, unless it did not come from the model or may yet be rejected.

        The SDK calls ``on_agent_end`` before the output guardrails run. Only a
        run the plan started itself (*sees_the_end*) tells it whether they passed.
        """
        self.awaiting_output = False
        if self.tools_since_model and getattr(agent, "tool_use_behavior", None) == (
            "run_llm_again"
        ):
            # The model must answer after tool calls; only a run error handler
            # (max turns) can end the run here.
            self.doom_with("max turns exceeded: an error handler made the final output")
        elif not sees_the_end and getattr(agent, "output_guardrails", None):
            self.doom_with(
                "the agent has output guardrails, which run after the final output, and a "
                "direct Runner call does not tell the plan whether they passed; use plan.run() "
                "or plan.run_streamed()"
            )
        else:
            self.final_output = True

    def reason_to_roll_back(self, exc: BaseException | None) -> str | None:
        """Return why the plan must be rolled back, or ``None`` if it may be released."""
        if isinstance(exc, asyncio.CancelledError):
            return "the run was cancelled"
        if exc is not None:
            return f"the block raised {type(exc).__name__}: {exc}"
        if self.poison is not None:
            return f"a tool call hit {type(self.poison).__name__}: {self.poison}"
        if self.doom is not None:
            return self.doom
        if self.awaiting_output:
            return "the run ended without a final output (cancelled or stopped)"
        if not self.final_output:
            return NO_FINAL_OUTPUT
        return None


__all__ = ["NO_FINAL_OUTPUT", "Verdict"]
