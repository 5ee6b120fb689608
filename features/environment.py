"""Behave hooks and fixtures: a temporary folder per scenario, and nothing left open after it.

Fixtures are switched on by tags. ``@fixture.sqlite`` (on a scenario or a
whole feature) gives every scenario its own temporary folder,
``context.workdir``, with ``context.database_path`` pointing at
``inventory.db`` inside it; the folder is removed after the scenario.

Steps put every handler or runtime they create on ``context.closables``;
after each scenario whatever is still open there is closed, and so is any
database handler the scenario left open without saying so.
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from behave import fixture, use_fixture
from behave.model import Scenario

from cleveragents.resource.handlers.database import DatabaseResourceHandler

logger = logging.getLogger("features")


@fixture(name="fixture.sqlite")
def sqlite_folder(context: Any) -> Iterator[Path]:
    """Give the scenario a temporary folder for its database files; remove it afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="cleveragents-bdd-"))
    context.workdir = folder
    context.database_path = folder / "inventory.db"
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


FIXTURES = {"fixture.sqlite": sqlite_folder}


def before_scenario(context: Any, scenario: Scenario) -> None:
    """Set up the fixtures the scenario's tags (or its feature's) ask for."""
    context.closables = []
    for tag in scenario.effective_tags:
        if tag in FIXTURES:
            use_fixture(FIXTURES[tag], context)


def after_scenario(context: Any, scenario: Scenario) -> None:
    """Close every handler and runtime the scenario left open (runs before fixture cleanup)."""
    for thing in reversed(context.closables):
        _close_quietly(thing)
    # A safety net for handlers no step put on context.closables.
    for obj in gc.get_objects():
        if isinstance(obj, DatabaseResourceHandler) and _is_open(obj):
            logger.warning("scenario %r left %r open; closing it", scenario.name, obj)
            _close_quietly(obj)


def _is_open(handler: DatabaseResourceHandler) -> bool:
    try:
        return not handler.is_closed
    except AttributeError:  # its constructor raised: it never opened anything
        return False


def _close_quietly(thing: Any) -> None:
    try:
        thing.close()
    except Exception:  # a failure to close must not hide the scenario's own result
        logger.exception("closing %r after the scenario failed", thing)
