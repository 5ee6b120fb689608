"""What the keyword classes share: failing with a message, temporary folders."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import NoReturn

from robot.api.deco import keyword


def fail(msg: str | None, default: str) -> NoReturn:
    """Fail the keyword with the caller's *msg*, or *default* when it gave none."""
    raise AssertionError(msg or default)


class Folders:
    """Temporary folders outside the repository, removed by :meth:`remove_folders`."""

    def __init__(self) -> None:
        super().__init__()
        self._folders: list[Path] = []

    @keyword
    def create_temporary_folder(self) -> str:
        """Create an empty folder outside the repository; ``Close All Handlers`` removes it."""
        folder = Path(tempfile.mkdtemp(prefix="cleveragents-robot-")).resolve()
        self._folders.append(folder)
        return str(folder)

    def remove_folders(self) -> None:
        """Remove every folder made by ``Create Temporary Folder``."""
        for folder in self._folders:
            shutil.rmtree(folder, ignore_errors=True)
        self._folders.clear()
