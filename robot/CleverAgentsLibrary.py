"""Robot Framework keywords that drive the installed cleveragents package and its command.

The keywords live in ``robot/lib/``, one module per concern (see its
``__init__``); plan templates are data files in ``robot/plans/``. This class
joins them into the one library the suites import.
"""

from __future__ import annotations

from lib.command import CommandKeywords, CommandResult
from lib.ledger import LedgerKeywords
from lib.plans import PlanFileKeywords
from lib.workloads import HandlerKeywords
from robot.api.deco import keyword, library


@library(scope="SUITE")
class CleverAgentsLibrary(CommandKeywords, PlanFileKeywords, LedgerKeywords, HandlerKeywords):
    """Keywords that run the ``cleveragents`` command and the database handler end to end.

    Handlers are opened under an alias and never returned, so that dropping
    one (``Drop Handler Without Closing``) really drops the last reference.
    Suite teardown must call ``Close All Handlers``.
    """

    @keyword
    def close_all_handlers(self) -> None:
        """Close every handler, stop the command it started, and remove its temporary folders."""
        self.close_handlers()
        self.stop_command()
        self.remove_folders()


__all__ = ["CleverAgentsLibrary", "CommandResult"]
