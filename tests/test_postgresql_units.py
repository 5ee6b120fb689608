"""PostgreSQL engine pieces that need no server: settings, the DSN secret, placeholders, errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cleveragents.errors import PlanError, ResourceError
from cleveragents.plan import load_plan
from cleveragents.resource import Resource
from cleveragents.resource.handlers import _pg_connection, postgresql
from cleveragents.resource.handlers import _pgsql as pgsql
from cleveragents.resource.handlers.database import DatabaseResourceHandler
from cleveragents.resource.handlers.postgresql import (
    PostgreSQLEngine,
    PostgreSQLSettings,
    _application_name,
    _to_pyformat,
)

psycopg = pytest.importorskip("psycopg")

SECRET = "pa55-w0rd-s3cret"
DSN = f"postgresql://agent:{SECRET}@127.0.0.1:1/inventory"
CLI = Path(sys.executable).with_name("cleveragents")


def _plan(tmp_path: Path, resource: str, name: str = "plan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(
        "id: p\nresources:\n  inv:\n    kind: database\n"
        + resource
        + "steps:\n  - id: one\n    resource: inv\n    sql: SELECT 1\n"
    )
    return path


# -- placeholders -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("UPDATE t SET q = q + :n WHERE q < :low", "UPDATE t SET q = q + %(n)s WHERE q < %(low)s"),
        ("SELECT :a::text, x::int", "SELECT %(a)s::text, x::int"),
        ("SELECT ':no', \"col:no\", :yes", "SELECT ':no', \"col:no\", %(yes)s"),
        ("SELECT 'it''s :no', :yes", "SELECT 'it''s :no', %(yes)s"),
        ("SELECT E'it\\'s :no', :yes", "SELECT E'it\\'s :no', %(yes)s"),
        ("SELECT $$ :no $$, $f$ :no $f$, :yes", "SELECT $$ :no $$, $f$ :no $f$, %(yes)s"),
        ("SELECT :yes -- :no\n, 1 /* :no */", "SELECT %(yes)s -- :no\n, 1 /* :no */"),
        ("SELECT '100%' LIKE :p, 5 % 2", "SELECT '100%%' LIKE %(p)s, 5 %% 2"),
        (
            "SELECT data ? 'key' FROM t WHERE id = :id",
            "SELECT data ? 'key' FROM t WHERE id = %(id)s",
        ),
    ],
)
def test_named_parameters_become_psycopg_placeholders(sql: str, expected: str) -> None:
    assert _to_pyformat(sql, "named") == expected


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("INSERT INTO t VALUES (?, ?)", "INSERT INTO t VALUES (%s, %s)"),
        ("SELECT '?', \"?\", ? -- ?", "SELECT '?', \"?\", %s -- ?"),
        ("SELECT :kept, '5%', ?", "SELECT :kept, '5%%', %s"),
    ],
)
def test_positional_parameters_become_psycopg_placeholders(sql: str, expected: str) -> None:
    assert _to_pyformat(sql, "qmark") == expected


# -- settings -----------------------------------------------------------------------


def test_dsn_is_a_secret_in_settings_and_resource() -> None:
    settings = PostgreSQLSettings(engine="postgresql", dsn=DSN)
    resource = Resource("inv", "database", engine="postgresql", dsn=DSN)
    for shown in (repr(settings), str(settings), repr(resource), settings.model_dump_json()):
        assert SECRET not in shown
        assert DSN not in shown
    assert settings.busy_timeout == 5.0
    assert settings.checkpoint_ttl is None


def test_dsn_reads_an_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INVENTORY_DSN", DSN)
    settings = PostgreSQLSettings(engine="postgresql", dsn="${INVENTORY_DSN}")
    assert settings.resolved_dsn() == DSN
    monkeypatch.setenv("INVENTORY_DSN", "host=elsewhere dbname=x")
    assert settings.resolved_dsn() == "host=elsewhere dbname=x"
    monkeypatch.delenv("INVENTORY_DSN")
    with pytest.raises(ResourceError, match="'INVENTORY_DSN' is not set"):
        settings.resolved_dsn()


def test_an_unset_variable_is_bad_input_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NO_SUCH_DSN", raising=False)
    path = _plan(tmp_path, '    engine: postgresql\n    dsn: "${NO_SUCH_DSN}"\n')
    with pytest.raises(PlanError) as caught:
        load_plan(path)
    assert [str(p) for p in caught.value.problems] == [
        f"{path}:6: resources.inv.dsn: environment variable 'NO_SUCH_DSN' is not set "
        "(dsn: '${NO_SUCH_DSN}' reads it)"
    ]


def test_validate_with_an_unset_variable_exits_2_naming_it(tmp_path: Path) -> None:
    path = _plan(tmp_path, '    engine: postgresql\n    dsn: "${NO_SUCH_DSN_EITHER}"\n')
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [CLI, "validate", str(path)], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 2, result.stderr
    assert "NO_SUCH_DSN_EITHER" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("location", "inv.db"),
        ("journal_mode", "wal"),
        ("synchronous", "full"),
        ("foreign_keys", "true"),
        ("lock", "deferred"),
    ],
)
def test_sqlite_only_keys_are_bad_input(tmp_path: Path, key: str, value: str) -> None:
    path = _plan(tmp_path, f"    engine: postgresql\n    dsn: {DSN}\n    {key}: {value}\n")
    with pytest.raises(PlanError) as caught:
        load_plan(path)
    assert [str(p) for p in caught.value.problems] == [
        f"{path}:7: resources.inv.{key}: unknown key"
    ]


def test_a_postgresql_resource_needs_a_dsn(tmp_path: Path) -> None:
    path = _plan(tmp_path, "    engine: postgresql\n    location: inv.db\n")
    with pytest.raises(PlanError) as caught:
        load_plan(path)
    messages = sorted(str(p) for p in caught.value.problems)
    assert any("resources.inv.dsn: required key is missing" in m for m in messages), messages
    assert any("resources.inv.location: unknown key" in m for m in messages), messages


@pytest.mark.parametrize("dsn", ["", "   "])
def test_an_empty_dsn_is_bad_input(tmp_path: Path, dsn: str) -> None:
    path = _plan(tmp_path, f"    engine: postgresql\n    dsn: '{dsn}'\n")
    with pytest.raises(PlanError, match=r"resources\.inv\.dsn: the dsn is empty"):
        load_plan(path)


@pytest.mark.parametrize(
    "dsn",
    [f"postgresql://agent:{SECRET}@[::1", f"host=db password={SECRET} oops", f"{SECRET} x"],
)
def test_a_dsn_that_does_not_parse_is_not_quoted(tmp_path: Path, dsn: str) -> None:
    path = _plan(tmp_path, f"    engine: postgresql\n    dsn: '{dsn}'\n")
    with pytest.raises(PlanError) as caught:
        load_plan(path)
    (problem,) = caught.value.problems
    assert problem.field == "resources.inv.dsn"
    assert "does not parse" in problem.message
    assert SECRET not in str(caught.value)
    assert caught.value.__cause__ is None
    with pytest.raises(ValidationError) as invalid:
        PostgreSQLSettings(engine="postgresql", dsn=dsn)
    assert SECRET not in str(invalid.value)
    resource = Resource("inv", "database", engine="postgresql", dsn=dsn, lock="x")
    with pytest.raises(ValidationError) as invalid:
        DatabaseResourceHandler.validate_settings(resource)
    assert SECRET not in str(invalid.value)


def test_a_dsn_that_does_not_parse_at_open_is_not_quoted() -> None:
    # Validated while it parsed; the variable changed before the session opened.
    bad = f"postgresql://agent:{SECRET}@[::1"
    resource = Resource("inv", "database", engine="postgresql", dsn="${PG_UNITS_DSN}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PG_UNITS_DSN", DSN)
        DatabaseResourceHandler.validate_settings(resource)
        patch.setenv("PG_UNITS_DSN", bad)
        with DatabaseResourceHandler() as handler, pytest.raises(ResourceError) as caught:
            handler.execute(resource, "p1", "SELECT 1")
    assert "does not parse" in str(caught.value)
    chain: BaseException | None = caught.value
    while chain is not None:
        assert SECRET not in str(chain)
        chain = chain.__cause__ or chain.__context__


def test_the_schema_marks_the_dsn_write_only() -> None:
    result = subprocess.run([CLI, "schema"], capture_output=True, text=True, check=True)
    definition = json.loads(result.stdout)["$defs"]["PostgreSQLSettings"]
    assert definition["properties"]["dsn"]["writeOnly"] is True
    assert "location" not in definition["properties"]


# -- psycopg missing ----------------------------------------------------------------


def test_without_psycopg_validation_works_and_use_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg now raises ImportError
    path = _plan(tmp_path, f"    engine: postgresql\n    dsn: {DSN}\n")
    plan = load_plan(path)
    with DatabaseResourceHandler() as handler:
        with pytest.raises(ResourceError, match=r"pip install 'cleveragents\[postgresql\]'"):
            handler.execute(plan.resource("inv"), "p1", "SELECT 1")
        assert handler.stats().open_connections == 0
        assert handler.stats().active_plans == 0


def test_import_cleveragents_does_not_import_psycopg() -> None:
    code = (
        "import sys, cleveragents\n"
        "from cleveragents.resource.handlers import database\n"
        "assert 'psycopg' not in sys.modules, 'psycopg was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- errors -------------------------------------------------------------------------


def test_lock_deadlock_and_serialization_errors_are_busy() -> None:
    engine = PostgreSQLEngine()
    errors = psycopg.errors
    for error in (errors.LockNotAvailable, errors.DeadlockDetected, errors.SerializationFailure):
        assert engine.classify(error("x")) == "busy"
    for error in (errors.IdleInTransactionSessionTimeout, errors.AdminShutdown):
        assert engine.classify(error("x")) == "lost"
    assert engine.classify(errors.ConnectionFailure("x")) == "lost"
    assert engine.classify(psycopg.OperationalError("the connection is closed")) == "lost"
    assert engine.classify(errors.UniqueViolation("x")) == "other"
    assert engine.classify(errors.QueryCanceled("x")) == "other"
    assert engine.classify(ValueError("x")) == "other"


def test_driver_messages_are_redacted() -> None:
    engine = PostgreSQLEngine()
    engine._remember_secrets(DSN)
    for message in (
        f"bad thing in {DSN}",
        f"password={SECRET} host=x",
        f"in URI: postgresql://agent:{SECRET}@host/db",
        f"password: {SECRET}",
    ):
        assert SECRET not in engine.redact(ValueError(message)), message
    assert engine.redact(ValueError("password='a b' host=x")) == "password=*** host=x"
    assert engine.redact(ValueError("postgres://u:p@h/db?password=q")) == (
        "postgres://u:***@h/db?password=***"
    )


def test_application_name_is_printable_and_short() -> None:
    name = _application_name("plän-" + "x" * 100)
    assert name.startswith("cleveragents[")
    assert ":pl?n-xxx" in name
    assert len(name.encode()) == 63
    assert postgresql._quote_literal("it's a \\ test") == "E'it''s a \\\\ test'"


def test_a_loaded_plan_and_stress_options_hide_the_dsn(tmp_path: Path) -> None:
    from cleveragents.stress import StressOptions

    plan = load_plan(_plan(tmp_path, f"    engine: postgresql\n    dsn: '{DSN}'\n"))
    options = StressOptions(engine="postgresql", dsn=DSN, seconds=1)
    for shown in (repr(plan), str(plan), repr(plan.resources["inv"]), repr(options)):
        assert SECRET not in shown
    assert plan.resource("inv").dsn == DSN  # hidden from view, not lost


def test_the_secrets_remembered_for_redaction_stay_bounded() -> None:
    engine = PostgreSQLEngine()
    for number in range(1000):
        engine._remember_secrets(f"postgresql://app:pw{number:04d}x@db.example/inventory")
    engine._remember_secrets(DSN)

    assert len(engine._secrets) <= 2 * 256  # each DSN and its password, latest DSNs only
    assert SECRET not in engine.redact(ValueError(f"failed for {DSN}"))
    assert "pw0999x" not in engine.redact(ValueError("password is pw0999x"))
    assert "pw0000x" in engine.redact(ValueError("password is pw0000x"))  # forgotten: oldest


# -- reading SQL as PostgreSQL's lexer does -----------------------------------------

_ONE = "more than one statement"


@pytest.mark.parametrize(
    ("sql", "refused"),
    [
        # A -- comment ends at a line feed or a carriage return, nowhere else.
        ("SELECT 1 --\r; COMMIT; BEGIN", _ONE),
        ("SELECT 1 --\n; COMMIT", _ONE),
        ("SELECT 1 -- ; COMMIT", None),
        ("SELECT 1+--\r;COMMIT", _ONE),  # an operator stops where a comment starts
        # Block comments nest; an unterminated one cannot be read.
        ("SELECT 1 /* /* */ ; COMMIT; */", None),
        ("SELECT 1 /* /* */ ; COMMIT; /* */", "unterminated /* comment"),
        ("SELECT 1 /**/; COMMIT", _ONE),
        ("/* c */ COMMIT", "COMMIT: cleveragents owns"),
        ("/* a /* b */ c */ ROLLBACK", "ROLLBACK: cleveragents owns"),
        # Standard strings double a quote; backslashes are plain characters.
        ("SELECT 'a\\'; COMMIT; --'", _ONE),
        ("SELECT 'a''; COMMIT; --'", None),
        ("SELECT 'a'\n'; COMMIT; --'", None),  # continued on the next line: still a string
        ("SELECT 'a' '; COMMIT; --'", None),  # two strings (a syntax error), no COMMIT
        # Escape strings read backslashes, also when continued on the next line.
        ("SELECT E'a\\'; COMMIT; --'", None),
        ("SELECT e'\\\\'; COMMIT; --'", _ONE),
        ("SELECT E'a'\n'\\'; COMMIT; --'", None),
        ("SELECT E'a'\r\n  -- note\n'\\'; COMMIT; --'", None),
        ("SELECT E'a' '\\'; COMMIT; --'", _ONE),  # no newline: not a continuation
        # E starts an escape string only where a token starts.
        ("SELECT 1 AS tablE'\\'; COMMIT; --'", _ONE),
        ("SELECT 1 AS \u00d7E'\\'; COMMIT; --'", _ONE),
        ("SELECT 1.E'\\'; COMMIT; --'", None),
        # Bit strings end at the next quote; U& strings read like standard ones.
        ("SELECT X'\\'; COMMIT; --'", _ONE),
        ("SELECT B'01'; COMMIT", _ONE),
        ("SELECT U&'d\\0061t\\+000061'; COMMIT", _ONE),
        ("SELECT U&'\\'; COMMIT; --'", _ONE),
        ('SELECT U&"a""b;"', None),
        # Quoted names double a quote.
        ('SELECT 1 AS "a;""COMMIT"', None),
        ('SELECT 1 AS "a"; COMMIT', _ONE),
        ('"COMMIT"', None),  # a name, not the keyword (and a syntax error)
        # Dollar quotes end at the same delimiter; $ inside a name starts nothing.
        ("SELECT $$; COMMIT; $$", None),
        ("SELECT $f$ $g$; $f$ ; COMMIT", _ONE),
        ("SELECT $f$ $g$; COMMIT $g$ $f$", None),
        ("SELECT $é$; COMMIT; $é$", None),
        ("SELECT 1 AS \u00d7$a$; COMMIT; SELECT 1 AS \u00d7$a$", _ONE),
        ("SELECT 1 AS a$b$; COMMIT; SELECT 1 AS a$b$", _ONE),
        ("SELECT $1$a$; COMMIT; $a$", None),
        ("SELECT $a$ never closed", "unterminated dollar quote ($a$)"),
        # Whatever cannot be read with certainty is refused.
        ("SELECT 'never closed", "unterminated quoted string"),
        ("SELECT E'never closed\\'", "unterminated quoted string"),
        ("SELECT X'never closed", "unterminated quoted string"),
        ('SELECT "never closed', 'unterminated quoted name (")'),
        ("SELECT 1\x00; COMMIT", "a NUL character"),
        # Keywords: ASCII only, any case; empty statements do not count.
        ("commit", "COMMIT: cleveragents owns"),
        ("CoMmIt", "COMMIT: cleveragents owns"),
        ("comm\u0131t", None),  # a dotless i: a name, not the keyword
        ("SELECT 1;;", None),
        ("SELECT 1; -- the end", None),
        ("SELECT 1 -- x\n ; /* the end */ ; ", None),
        ("SELECT 1 -- x\n ; 'y'", _ONE),
        (";; SELECT 1 ; ", None),
        ("", None),
        ("  -- nothing\n/* at all */", None),
        ("SET LOCAL lock_timeout = 0", None),
        ("set /* x */ local lock_timeout = 0", None),
        ("SET SESSION lock_timeout = 0", "SET without LOCAL"),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", None),
        ("SET CONSTRAINTS ALL DEFERRED", None),
        ("LOAD 'auto_explain'", "LOAD: a library loaded into the session"),
        ("PREPARE TRANSACTION 'x'", "PREPARE TRANSACTION"),
        ("PREPARE q AS SELECT 1", None),
        ("START TRANSACTION", "START: cleveragents owns"),
        # A function body in BEGIN ATOMIC has semicolons: refused, the safe way.
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END",
            _ONE,
        ),
    ],
)
def test_plan_sql_is_read_as_postgresql_reads_it(sql: str, refused: str | None) -> None:
    refusal = _pg_connection._refusal(sql, True)
    if refused is None:
        assert refusal is None, refusal
    else:
        assert refusal is not None
        assert refused in refusal
        assert "\n" not in refusal


@pytest.mark.parametrize(
    ("sql", "refused"),
    [
        ("SELECT 'a\\'; COMMIT; --'", None),  # the backslash escapes the quote now
        ("SELECT 'a\\'' ; COMMIT; --'", _ONE),
        ("SELECT 'a''; COMMIT; --'", None),
        ("SELECT U&'x'", "U&'...' string while standard_conforming_strings is off"),
    ],
)
def test_with_standard_conforming_strings_off_quotes_read_backslashes(
    sql: str, refused: str | None
) -> None:
    refusal = _pg_connection._refusal(sql, False)
    if refused is None:
        assert refusal is None, refusal
    else:
        assert refusal is not None
        assert refused in refusal


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT :a --\r, :b", "SELECT %(a)s --\r, %(b)s"),
        ("SELECT /* /* */ :no */ :yes", "SELECT /* /* */ :no */ %(yes)s"),
        ("SELECT E'\\' :no', :yes", "SELECT E'\\' :no', %(yes)s"),
        ("SELECT 1 AS \u00d7$a$, :yes", "SELECT 1 AS \u00d7$a$, %(yes)s"),
        ("SELECT :E'x'", "SELECT :E'x'"),  # a colon, then an escape string
        ("SELECT :a$b", "SELECT :a$b"),  # a$b is one name to PostgreSQL
        ("SELECT :a::int, a[1:n]", "SELECT %(a)s::int, a[1%(n)s]"),
    ],
)
def test_named_parameters_are_found_as_postgresql_reads_the_sql(sql: str, expected: str) -> None:
    assert _to_pyformat(sql, "named") == expected


def test_sql_whose_placeholders_cannot_be_read_is_refused() -> None:
    with pytest.raises(ResourceError, match=r"unterminated /\* comment: it cannot be read"):
        _to_pyformat("SELECT :a /* never closed", "named")


# -- settings shared by the engines -------------------------------------------------


def test_both_engines_settings_share_one_base() -> None:
    from cleveragents.resource.handlers.engine import EngineSettings
    from cleveragents.resource.handlers.sqlite import SQLiteSettings

    shared = {"engine", "busy_timeout", "checkpoint_ttl"}
    for model in (PostgreSQLSettings, SQLiteSettings):
        assert issubclass(model, EngineSettings)
        assert shared <= set(model.model_fields)
        for name in shared - {"engine"}:
            field, base = model.model_fields[name], EngineSettings.model_fields[name]
            assert (field.annotation, field.default, field.description) == (
                base.annotation,
                base.default,
                base.description,
            ), name
    assert PostgreSQLSettings.model_config["hide_input_in_errors"] is True
    assert PostgreSQLSettings.model_config["extra"] == "forbid"
    assert SQLiteSettings.model_config["extra"] == "forbid"


def test_making_an_engine_changes_no_class_attribute() -> None:
    before = dict(vars(PostgreSQLEngine))
    engine = PostgreSQLEngine()
    assert dict(vars(PostgreSQLEngine)) == before
    assert engine.driver_error is psycopg.Error
    assert "driver_error" not in vars(PostgreSQLEngine)


# -- the fast reading cuts SQL as the token-by-token one ----------------------------

_ALPHABET = [
    " ", "\n", "\r", ";", "--", "/*", "*/", "'", "''", "E'", "\\", "$$", "$a$", "$1", '"',
    "U&'", "X'", "\u00d7", "a", "E", "1", ".", ":", "::", "?", "%", "-", "/", "*", "(", "x$",
]  # fmt: skip
_TEXTS = st.lists(st.sampled_from(_ALPHABET), max_size=16).map("".join)


def _count_one_by_one(sql: str, standard: bool) -> int:
    count, inside = 0, False
    for kind, _, _ in pgsql.tokens(sql, standard_strings=standard):
        if kind in {"space", "comment"}:
            continue
        if kind == "semicolon":
            inside = False
        elif not inside:
            inside, count = True, count + 1
    return count


def _placeholders_one_by_one(sql: str) -> str:
    parts = []
    found = list(pgsql.tokens(sql))
    index = 0
    while index < len(found):
        kind, start, end = found[index]
        text, index = sql[start:end], index + 1
        if kind != "other":
            parts.append(text.replace("%", "%%"))
        elif text == "%":
            parts.append("%%")
        elif text == ":" and sql.startswith(":", end):
            parts.append("::")
            index += 1
        elif text == ":" and index < len(found) and found[index][0] == "word":
            name = sql[found[index][1] : found[index][2]]
            if found[index][1] == end and re.fullmatch(r"[A-Za-z_]\w*", name):
                parts.append(f"%({name})s")
                index += 1
            else:
                parts.append(text)
        else:
            parts.append(text)
    return "".join(parts)


@settings(max_examples=500, deadline=None)
@given(text=_TEXTS, standard=st.booleans())
def test_counting_statements_in_stretches_agrees_with_token_by_token(
    text: str, standard: bool
) -> None:
    try:
        expected: int | None = _count_one_by_one(text, standard)
    except pgsql.Unreadable:
        expected = None
    try:
        count: int | None = pgsql.outline(text, standard_strings=standard)[0]
    except pgsql.Unreadable:
        count = None
    assert count == expected, text


@settings(max_examples=500, deadline=None)
@given(text=_TEXTS)
def test_finding_placeholders_in_stretches_agrees_with_token_by_token(text: str) -> None:
    try:
        expected: str | None = _placeholders_one_by_one(text)
    except pgsql.Unreadable:
        expected = None
    try:
        found: str | None = _to_pyformat.__wrapped__(text, "named")  # type: ignore[attr-defined]
    except ResourceError:
        found = None
    assert found == expected, text
