"""Sum the JUnit XML reports of pytest, behave and Robot Framework into one closing line.

Usage: ``python scripts/junit_summary.py [--label NAME] [DIR_OR_FILE ...]``
(default ``build/reports``). Folders are searched recursively for ``*.xml``;
files whose root is not ``<testsuites>`` or ``<testsuite>`` (Robot's
``output.xml``, a coverage report) are ignored.

The last line printed is exactly ``N passed, N failed, N skipped``, which CI
reads. The exit status is 1 when nothing passed, anything failed, or a report
could not be read; 0 otherwise. Standard library only: it runs with any python3.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

_SUITE_TAGS = frozenset({"testsuites", "testsuite"})


@dataclasses.dataclass
class Counts:
    """Test cases passed, failed (failures and errors) and skipped."""

    passed: int = 0
    failed: int = 0
    skipped: int = 0

    def add(self, other: Counts) -> None:
        """Add *other*'s counts to these."""
        self.passed += other.passed
        self.failed += other.failed
        self.skipped += other.skipped

    def __str__(self) -> str:
        return f"{self.passed} passed, {self.failed} failed, {self.skipped} skipped"


def report_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Yield the ``*.xml`` files named by *paths*, searching folders recursively."""
    for path in paths:
        if path.is_dir():
            yield from sorted(path.rglob("*.xml"))
        elif path.is_file():
            yield path


def count_report(path: Path) -> Counts | None:
    """Count the test cases in one JUnit file, or return ``None`` if it is not one.

    A test case counts once: failed if it has a ``<failure>`` or ``<error>``
    (pytest adds a teardown error to the test's own case), else skipped if it
    has ``<skipped>``, else passed. Nested suites (Robot's xunit) are walked,
    never summed from their attributes, so nothing counts twice.

    :raises ET.ParseError: the file is not well-formed XML.
    """
    root = ET.parse(path).getroot()
    if root.tag not in _SUITE_TAGS:
        return None
    counts = Counts()
    for case in root.iter("testcase"):
        outcomes = {child.tag for child in case}
        if outcomes & {"failure", "error"}:
            counts.failed += 1
        elif "skipped" in outcomes:
            counts.skipped += 1
        else:
            counts.passed += 1
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    """Print the totals of each report folder, then the grand total last; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[Path("build/reports")])
    parser.add_argument("--label", help="Print 'LABEL: totals' instead of the bare totals.")
    args = parser.parse_args(argv)

    by_folder: dict[Path, Counts] = {}
    unreadable = 0
    for path in report_files(args.paths):
        try:
            counts = count_report(path)
        except (OSError, ET.ParseError) as exc:
            print(f"junit_summary: cannot read {path}: {exc}")
            unreadable += 1
            continue
        if counts is not None:
            by_folder.setdefault(path.parent, Counts()).add(counts)
    total = Counts()
    for folder, counts in by_folder.items():
        print(f"  {folder}: {counts}")
        total.add(counts)
    if total.passed == 0:
        print("junit_summary: no test passed (did any test run?)")
    print(f"{args.label}: {total}" if args.label else str(total), flush=True)
    return 1 if unreadable or total.failed or total.passed == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
