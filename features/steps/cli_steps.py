"""Steps that run the installed ``cleveragents`` command in the scenario's folder."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from bdd_support import split_names, workdir
from behave import given, then, when


def _cli() -> str:
    """Return the installed console script next to this interpreter (else on PATH)."""
    beside = Path(sys.executable).with_name("cleveragents")
    found = str(beside) if beside.exists() else shutil.which("cleveragents")
    assert found, "the cleveragents command is not installed"
    return found


def _command(context: Any, command: str) -> dict[str, Any]:
    """Return the arguments of subprocess.run/Popen for *command* in the scenario's folder."""
    args = shlex.split(command)
    assert args[0] == "cleveragents", command
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    extra_path = getattr(context, "extra_pythonpath", None)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    return {
        "args": [_cli(), *args[1:]],
        "cwd": workdir(context),
        "env": env,
        "stdout": subprocess.PIPE,
        "stderr": subprocess.PIPE,
        "text": True,
    }


@when('the operator runs "{command}"')
def step_operator_runs(context: Any, command: str) -> None:
    context.cli = subprocess.run(**_command(context, command), timeout=120, check=False)


@when('the operator starts "{command}"')
def step_operator_starts(context: Any, command: str) -> None:
    context.running = subprocess.Popen(**_command(context, command))
    context.add_cleanup(_stop, context.running)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
    process.communicate()


@when("the operator sends {name}")
def step_operator_sends_signal(context: Any, name: str) -> None:
    context.running.send_signal(getattr(signal, name))


@when("the command ends")
def step_command_ends(context: Any) -> None:
    process: subprocess.Popen[str] = context.running
    # A generous bound: the contract says "within seconds".
    stdout, stderr = process.communicate(timeout=60)
    context.cli = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


_BROKEN_PLUGINS = {
    "raises on import": 'raise RuntimeError("this plugin is broken on purpose")\n',
    "registers the tool send_report again": (
        "from cleveragents import hookimpl\n\n\n"
        "@hookimpl\n"
        "def cleveragents_register_tools(registry):\n"
        '    registry.add("send_report", lambda ctx: None)\n'
    ),
}


@given('an installed plugin "{name}" that {behaviour}')
def step_installed_broken_plugin(context: Any, name: str, behaviour: str) -> None:
    site = workdir(context) / "site"
    module = name.replace("-", "_")
    info = site / f"{module}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text(
        f"[cleveragents]\n{module} = {module}\n", encoding="utf-8"
    )
    (site / f"{module}.py").write_text(_BROKEN_PLUGINS[behaviour], encoding="utf-8")
    context.extra_pythonpath = site


def _result(context: Any) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = context.cli
    return result


@then("the exit status is {status:d}")
def step_check_exit_status(context: Any, status: int) -> None:
    result = _result(context)
    assert result.returncode == status, (
        f"exit status {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


@then('stderr has the line "{line}"')
def step_check_stderr_line(context: Any, line: str) -> None:
    lines = _result(context).stderr.splitlines()
    assert line in lines, lines


@then('stderr has a line starting with "{prefix}"')
def step_check_stderr_line_prefix(context: Any, prefix: str) -> None:
    lines = _result(context).stderr.splitlines()
    assert any(found.startswith(prefix) for found in lines), lines


@then("stderr has {count:d} lines")
def step_check_stderr_line_count(context: Any, count: int) -> None:
    lines = _result(context).stderr.splitlines()
    assert len(lines) == count, lines


@then("there is no traceback")
def step_check_no_traceback(context: Any) -> None:
    result = _result(context)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr


@then('stdout mentions "{text}"')
def step_check_stdout_mentions(context: Any, text: str) -> None:
    assert text in _result(context).stdout, _result(context).stdout


@then('stdout does not mention "{text}"')
def step_check_stdout_does_not_mention(context: Any, text: str) -> None:
    assert text not in _result(context).stdout, _result(context).stdout


@then('stderr mentions "{text}"')
def step_check_stderr_mentions(context: Any, text: str) -> None:
    assert text in _result(context).stderr, _result(context).stderr


@then("stdout is empty")
def step_check_stdout_empty(context: Any) -> None:
    assert _result(context).stdout == "", _result(context).stdout


# -- JSON output --------------------------------------------------------------


def _json_lines(context: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _result(context).stdout.splitlines() if line.strip()]


def _json_document(context: Any) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(_result(context).stdout)
    return document


@then("stdout has {count:d} JSON lines")
def step_check_json_line_count(context: Any, count: int) -> None:
    assert len(_json_lines(context)) == count, _result(context).stdout


@then('every JSON line has the fields "{fields}"')
def step_check_json_line_fields(context: Any, fields: str) -> None:
    for line in _json_lines(context):
        missing = set(split_names(fields)) - set(line)
        assert not missing, f"{line} lacks {missing}"


@then('every step in the JSON output has the fields "{fields}"')
def step_check_json_step_fields(context: Any, fields: str) -> None:
    for line in _json_lines(context):
        for step in line["steps"]:
            missing = set(split_names(fields)) - set(step)
            assert not missing, f"{step} lacks {missing}"


@then('the JSON line of plan "{plan}" has "{field}" equal to {value}')
def step_check_json_field(context: Any, plan: str, field: str, value: str) -> None:
    (line,) = [line for line in _json_lines(context) if line["plan"] == plan]
    assert line[field] == json.loads(value), f"{field} is {line[field]!r} in {line}"


@then('the JSON line of plan "{plan}" has an error mentioning "{text}"')
def step_check_json_error(context: Any, plan: str, text: str) -> None:
    (line,) = [line for line in _json_lines(context) if line["plan"] == plan]
    assert line["error"] is not None and text in line["error"], line


@then('in the JSON line of plan "{plan}", step "{step_id}" has "{field}" equal to {value}')
def step_check_json_step(context: Any, plan: str, step_id: str, field: str, value: str) -> None:
    (line,) = [line for line in _json_lines(context) if line["plan"] == plan]
    (step,) = [step for step in line["steps"] if step["id"] == step_id]
    assert step[field] == json.loads(value), f"{field} is {step[field]!r} in {step}"


@then('the JSON listing has the tool "{tool}" from "{source}"')
def step_check_json_tool(context: Any, tool: str, source: str) -> None:
    tools = _json_document(context)["tools"]
    assert any(t["name"] == tool and source in t["source"] for t in tools), tools


@then('the JSON listing has the resource kind "{kind}"')
def step_check_json_kind(context: Any, kind: str) -> None:
    kinds = _json_document(context)["resource_kinds"]
    assert any(k["kind"] == kind for k in kinds), kinds


@then('the JSON listing has the plugin "{name}" from "{source}"')
def step_check_json_plugin(context: Any, name: str, source: str) -> None:
    plugins = _json_document(context)["plugins"]
    assert any(p["name"] == name and source in p["source"] for p in plugins), plugins


@then('stdout is a JSON Schema whose properties include "{names}"')
def step_check_json_schema(context: Any, names: str) -> None:
    schema = _json_document(context)
    assert schema.get("type") == "object", schema.get("type")
    missing = set(split_names(names)) - set(schema["properties"])
    assert not missing, f"the schema lacks {missing}"


@then('the schema describes the database setting "{setting}"')
def step_check_schema_setting(context: Any, setting: str) -> None:
    definitions = _json_document(context).get("$defs", {}).values()
    assert any(setting in d.get("properties", {}) for d in definitions), list(definitions)
