"""File descriptors: count this process's, and lower its limit for a while.

Written once here: the stress harness, the test suites and Robot Framework all
count descriptors with :func:`count_fds`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def count_fds() -> int:
    """Return how many file descriptors this process has open (-1 if it cannot tell)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return -1


@contextmanager
def fd_limit(limit: int | None) -> Iterator[None]:
    """Lower this process's soft RLIMIT_NOFILE to *limit* for the block, then restore it."""
    if limit is None:
        yield
        return
    import resource as rlimit

    soft, hard = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)
    rlimit.setrlimit(rlimit.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        rlimit.setrlimit(rlimit.RLIMIT_NOFILE, (soft, hard))


__all__ = ["count_fds", "fd_limit"]
