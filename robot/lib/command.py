"""The ``cleveragents`` command as a process: run, start, signal, wait, and checks of its output."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robot.api import logger
from robot.api.deco import keyword

from lib.common import Folders, fail

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# A generous upper bound for liveness only; no check here is about speed.
COMMAND_TIMEOUT = 120.0


@dataclasses.dataclass(frozen=True)
class CommandResult:
    """What one run of the ``cleveragents`` command did."""

    args: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str


def _command() -> str:
    """Return the installed console script, looked up next to this Python first."""
    search = [str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)]
    command = shutil.which("cleveragents", path=os.pathsep.join(search))
    if command is None:
        raise AssertionError("the 'cleveragents' command is not installed next to Python")
    return command


def _result(args: Sequence[str], rc: int, stdout: str, stderr: str) -> CommandResult:
    result = CommandResult(tuple(args), rc, stdout, stderr)
    logger.info(
        f"cleveragents {' '.join(args)}\nexit {rc}\n"
        f"--- stdout ---\n{stdout}--- stderr ---\n{stderr}"
    )
    return result


def _stream(result: CommandResult, stream: str) -> str:
    if stream not in ("stdout", "stderr"):
        raise ValueError(f"stream must be 'stdout' or 'stderr', got {stream!r}")
    return result.stdout if stream == "stdout" else result.stderr


class CommandKeywords(Folders):
    """Run the installed command, in the foreground or one at a time in the background."""

    def __init__(self) -> None:
        super().__init__()
        self._process: subprocess.Popen[str] | None = None
        self._process_args: tuple[str, ...] = ()

    @keyword
    def copy_examples(self) -> str:
        """Copy the example plans (without any database) into a new temporary folder."""
        folder = Path(self.create_temporary_folder()) / "examples"
        shutil.copytree(EXAMPLES, folder, ignore=shutil.ignore_patterns("*.db", "*.db-*", "plugin"))
        return str(folder)

    def stop_command(self) -> None:
        """Kill the background command if it still runs."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.communicate()
        self._process = None

    # -- running it -----------------------------------------------------------------

    @keyword
    def run_cleveragents(self, *args: str, cwd: str | None = None, **env: str) -> CommandResult:
        """Run the installed ``cleveragents`` command; named arguments go into its environment."""
        completed = subprocess.run(
            [_command(), *args],
            cwd=cwd,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        return _result(args, completed.returncode, completed.stdout, completed.stderr)

    @keyword
    def start_cleveragents(self, *args: str, cwd: str | None = None, **env: str) -> None:
        """Start the ``cleveragents`` command in the background, like ``Run Cleveragents``."""
        if self._process is not None and self._process.poll() is None:
            raise ValueError("a cleveragents command started earlier is still running")
        self._process = subprocess.Popen(
            [_command(), *args],
            cwd=cwd,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._process_args = tuple(args)
        logger.info(f"started cleveragents {' '.join(args)} (pid {self._process.pid})")

    @keyword
    def send_signal_to_cleveragents(self, signal_name: str) -> None:
        """Send the signal *signal_name* (e.g. ``SIGTERM``) to the background command."""
        process = self._started()
        process.send_signal(signal.Signals[signal_name])

    @keyword
    def wait_for_cleveragents(self, timeout: float = COMMAND_TIMEOUT) -> CommandResult:
        """Wait for the background command to exit; fail (and kill it) if it outlives *timeout*."""
        process = self._started()
        try:
            stdout, stderr = process.communicate(timeout=float(timeout))
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise AssertionError(
                f"'cleveragents {' '.join(self._process_args)}' was still running after "
                f"{timeout}s; it was killed"
            ) from None
        return _result(self._process_args, process.returncode, stdout, stderr)

    def _started(self) -> subprocess.Popen[str]:
        if self._process is None:
            raise ValueError("no cleveragents command was started")
        return self._process

    @keyword
    def wait_until_file_contains(
        self, path: str, text: str, timeout: float = 30.0, msg: str | None = None
    ) -> None:
        """Wait until the file at *path* contains *text*; fail after *timeout* seconds."""
        deadline = time.monotonic() + float(timeout)
        while True:
            # Looked at before reading: once the command has ended, one last read decides.
            ended = self._process is not None and self._process.poll() is not None
            if Path(path).is_file() and text in Path(path).read_text(encoding="utf-8"):
                return
            if ended or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        fail(msg, f"{path!r} does not contain {text!r}")

    # -- what it answered -----------------------------------------------------------

    @keyword
    def exit_code_should_be(
        self, result: CommandResult, expected: int, msg: str | None = None
    ) -> None:
        """Fail unless the command exited with *expected*."""
        if result.rc != int(expected):
            fail(
                msg,
                f"'cleveragents {' '.join(result.args)}' exited {result.rc}, expected {expected}; "
                f"stderr: {result.stderr.strip()!r}",
            )

    @keyword
    def output_should_contain(
        self, result: CommandResult, text: str, stream: str = "stdout", msg: str | None = None
    ) -> None:
        """Fail unless *stream* (``stdout`` or ``stderr``) contains *text*."""
        output = _stream(result, stream)
        if text not in output:
            fail(msg, f"{stream} does not contain {text!r}: {output!r}")

    @keyword
    def output_should_not_contain(
        self, result: CommandResult, text: str, stream: str = "stderr", msg: str | None = None
    ) -> None:
        """Fail if *stream* (``stdout`` or ``stderr``) contains *text*."""
        output = _stream(result, stream)
        if text in output:
            fail(msg, f"{stream} contains {text!r}: {output!r}")

    @keyword
    def parse_json_output(self, result: CommandResult) -> Any:
        """Return the command's stdout parsed as one JSON document; fail if it is not one."""
        try:
            return json.loads(result.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"stdout is not valid JSON ({exc}): {result.stdout!r}") from None

    @keyword
    def parse_json_lines(self, result: CommandResult) -> list[dict[str, Any]]:
        """Return one JSON object per stdout line; fail on any line that is not one."""
        records = []
        for number, line in enumerate(result.stdout.splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AssertionError(
                    f"stdout line {number} is not JSON ({exc}): {line!r}"
                ) from None
            if not isinstance(record, dict):
                raise AssertionError(f"stdout line {number} is not a JSON object: {line!r}")
            records.append(record)
        return records

    @keyword
    def plan_result_should_be(
        self,
        records: Sequence[dict[str, Any]],
        plan: str,
        status: str,
        failed_step: str | None = None,
        msg: str | None = None,
    ) -> None:
        """Fail unless one full JSON record says *plan* ended *status* at *failed_step*."""
        found = [record for record in records if record.get("plan") == plan]
        if len(found) != 1:
            fail(msg, f"expected one JSON record for plan {plan!r}, found {len(found)}")
        record = found[0]
        missing = {"plan", "status", "failed_step", "error", "steps"} - set(record)
        if missing:
            fail(msg, f"plan {plan!r}: JSON record lacks {sorted(missing)}: {record}")
        if (record["status"], record["failed_step"]) != (status, failed_step):
            fail(
                msg,
                f"plan {plan!r}: status {record['status']!r}, failed_step "
                f"{record['failed_step']!r}; expected {status!r}, {failed_step!r}",
            )
        if (record["error"] is None) != (status == "completed"):
            fail(msg, f"plan {plan!r} is {status} but its error is {record['error']!r}")
        for step in record["steps"]:
            lacking = {"id", "status", "attempts", "duration_ms"} - set(step)
            if lacking:
                fail(msg, f"plan {plan!r}: step record lacks {sorted(lacking)}: {step}")
            if not isinstance(step["attempts"], int) or not isinstance(
                step["duration_ms"], int | float
            ):
                fail(msg, f"plan {plan!r}: step attempts/duration_ms are not numbers: {step}")
        if failed_step is not None:
            failed = [step["id"] for step in record["steps"] if step["status"] == "failed"]
            if failed != [failed_step]:
                fail(msg, f"plan {plan!r}: failed steps {failed}, expected [{failed_step!r}]")

    @keyword
    def stderr_should_report_problem(
        self, result: CommandResult, path: str, line: int, field: str, msg: str | None = None
    ) -> None:
        """Fail unless stderr has a ``PATH:LINE: FIELD: problem`` line for this problem."""
        pattern = re.compile(rf"^{re.escape(path)}:{int(line)}: {re.escape(field)}: \S")
        if not any(pattern.match(text) for text in result.stderr.splitlines()):
            fail(msg, f"stderr has no line '{path}:{line}: {field}: ...': {result.stderr!r}")

    @keyword
    def every_stderr_line_should_name_a_plan_file(
        self, result: CommandResult, msg: str | None = None
    ) -> None:
        """Fail unless stderr is non-empty and every line starts ``PATH.yaml:LINE: ``."""
        lines = result.stderr.splitlines()
        pattern = re.compile(r"^\S+\.yaml:\d+: \S")
        strays = [text for text in lines if not pattern.match(text)]
        if not lines or strays:
            fail(msg, f"stderr lines not of the form 'PATH:LINE: ...': {strays or lines!r}")
