"""The project name and pluggy's two markers, in a module that imports nothing of ours.

:mod:`cleveragents.hookspecs` re-exports them (plugins write
``from cleveragents.hookspecs import hookimpl``); the resource layer, which the
hook specifications themselves name, imports them from here, so no import
circle closes through the specs.
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "cleveragents"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec"]
