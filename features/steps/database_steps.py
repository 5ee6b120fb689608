"""Steps that drive a DatabaseResourceHandler through its Python API, and check rows on disk."""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Any

from bdd_support import (
    EVENTUALLY_S,
    capture,
    committed_items,
    create_items_table,
    database_resource,
    error_class,
    parse_value,
    path_in_workdir,
    separate_connection,
    settings_from_table,
    split_names,
    table_names,
    wait_until,
)
from behave import given, step, then, when

from cleveragents.resource import Resource
from cleveragents.resource.handlers.database import DatabaseResourceHandler

# -- databases on disk --------------------------------------------------------


@given('a database "{filename}" with an empty items table')
def step_database_with_empty_items(context: Any, filename: str) -> None:
    create_items_table(path_in_workdir(context, filename))


@given('a database "{filename}" with the items "{skus}"')
def step_database_with_items(context: Any, filename: str, skus: str) -> None:
    create_items_table(path_in_workdir(context, filename), split_names(skus))


@then('"{filename}" has the items "{skus}"')
def step_check_committed_items(context: Any, filename: str, skus: str) -> None:
    found = committed_items(path_in_workdir(context, filename))
    assert found == sorted(split_names(skus)), f"{filename} holds {found}"


@then('"{filename}" has no items')
def step_check_no_committed_items(context: Any, filename: str) -> None:
    found = committed_items(path_in_workdir(context, filename))
    assert found == [], f"{filename} holds {found}"


@then('"{filename}" has no table "{table}"')
def step_check_table_absent(context: Any, filename: str, table: str) -> None:
    found = table_names(path_in_workdir(context, filename))
    assert table not in found, f"{filename} has the tables {found}"


@then('"{filename}" has a table "{table}" with {count:d} rows')
def step_check_table_rows(context: Any, filename: str, table: str, count: int) -> None:
    path = path_in_workdir(context, filename)
    assert table in table_names(path), f"{filename} has no table {table!r}"
    with separate_connection(path) as conn:
        (found,) = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()
    assert found == count, f"{filename}.{table} has {found} rows"


@then('another program can write to "{filename}" at once')
def step_check_write_lock_free(context: Any, filename: str) -> None:
    with separate_connection(path_in_workdir(context, filename), timeout=0) as conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")


@when('a plan holds the write lock on "{filename}"')
def step_wait_for_write_lock(context: Any, filename: str) -> None:
    path = path_in_workdir(context, filename)

    def locked() -> bool:
        with separate_connection(path, timeout=0) as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:
                return True
            conn.execute("ROLLBACK")
            return False

    wait_until(locked, f"a plan to lock {filename}")
    # The plan's statement starts right after it took the lock; give it a moment.
    time.sleep(0.2)


# -- the handler and its resources --------------------------------------------


def _handler(context: Any) -> DatabaseResourceHandler:
    handler: DatabaseResourceHandler = context.handler
    return handler


def _resource(context: Any, name: str) -> Resource:
    resource: Resource = context.db_resources[name]
    return resource


@given('a file "{filename}" that is not a database')
def step_garbage_file(context: Any, filename: str) -> None:
    path_in_workdir(context, filename).write_bytes(b"not the pages you are looking for" * 100)


@given('another program holds the write lock on "{filename}"')
def step_other_program_locks(context: Any, filename: str) -> None:
    conn = sqlite3.connect(path_in_workdir(context, filename), isolation_level=None)
    context.add_cleanup(conn.close)
    conn.execute("BEGIN IMMEDIATE")
    context.other_program = conn


@step("the other program lets go")
def step_other_program_lets_go(context: Any) -> None:
    context.other_program.execute("ROLLBACK")


@when('a database handler is created with {setting} "{value}"')
def step_try_create_handler(context: Any, setting: str, value: str) -> None:
    capture(context, lambda: DatabaseResourceHandler(**{setting: parse_value(value)}))


@given("a database handler")
def step_database_handler(context: Any) -> None:
    context.handler = DatabaseResourceHandler()
    context.closables.append(context.handler)


@given("a database handler with:")
def step_database_handler_with(context: Any) -> None:
    context.handler = DatabaseResourceHandler(**settings_from_table(context))
    context.closables.append(context.handler)


@given('the resource "{name}" on "{filename}"')
def step_resource_on(context: Any, name: str, filename: str) -> None:
    if "db_resources" not in context:
        context.db_resources = {}
    context.db_resources[name] = database_resource(context, name, filename)


@given('the resource "{name}" on "{filename}" with:')
def step_resource_on_with(context: Any, name: str, filename: str) -> None:
    if "db_resources" not in context:
        context.db_resources = {}
    settings = settings_from_table(context)
    context.db_resources[name] = database_resource(context, name, filename, **settings)


# -- what plans do ------------------------------------------------------------


def _add_item(context: Any, plan: str, sku: str, resource: str) -> None:
    with _handler(context).connection(_resource(context, resource), plan_id=plan) as conn:
        conn.execute("INSERT INTO items (sku) VALUES (?)", (sku,))


@step('plan "{plan}" creates the table "{table}" in "{resource}"')
def step_create_table(context: Any, plan: str, table: str, resource: str) -> None:
    with _handler(context).connection(_resource(context, resource), plan_id=plan) as conn:
        conn.execute(f'CREATE TABLE "{table}" (note TEXT)')


@step('plan "{plan}" creates the items table in "{resource}"')
def step_create_items_table(context: Any, plan: str, resource: str) -> None:
    with _handler(context).connection(_resource(context, resource), plan_id=plan) as conn:
        conn.execute("CREATE TABLE items (sku TEXT PRIMARY KEY, qty INT NOT NULL DEFAULT 1)")


@step('plan "{plan}" takes checkpoint "{label}" on "{resource}"')
def step_take_checkpoint(context: Any, plan: str, label: str, resource: str) -> None:
    context.last_checkpoint = _handler(context).create_checkpoint(
        _resource(context, resource), plan_id=plan, checkpoint_id=label
    )


@step('plan "{plan}" adds item "{sku}" to "{resource}"')
def step_add_item(context: Any, plan: str, sku: str, resource: str) -> None:
    _add_item(context, plan, sku, resource)


@step('plan "{plan}" rolls back to checkpoint "{label}" on "{resource}"')
def step_rollback_to(context: Any, plan: str, label: str, resource: str) -> None:
    _handler(context).rollback_to(_resource(context, resource), plan_id=plan, checkpoint_id=label)


@step('plan "{plan}" is released')
def step_release_plan(context: Any, plan: str) -> None:
    _handler(context).release_plan(plan)


@step('plan "{plan}" is rolled back')
def step_rollback_plan(context: Any, plan: str) -> None:
    _handler(context).rollback_plan(plan)


@step('plan "{plan}" tries to take checkpoint "{label}" on "{resource}"')
def step_try_take_checkpoint(context: Any, plan: str, label: str, resource: str) -> None:
    capture(context, lambda: step_take_checkpoint(context, plan, label, resource))


@step('plan "{plan}" tries to take a checkpoint with an empty label on "{resource}"')
def step_try_empty_label(context: Any, plan: str, resource: str) -> None:
    capture(context, lambda: step_take_checkpoint(context, plan, "", resource))


@step('plan "{plan}" tries to add item "{sku}" to "{resource}"')
def step_try_add_item(context: Any, plan: str, sku: str, resource: str) -> None:
    capture(context, lambda: _add_item(context, plan, sku, resource))


@step('plan "{plan}" tries to roll back to checkpoint "{label}" on "{resource}"')
def step_try_rollback_to(context: Any, plan: str, label: str, resource: str) -> None:
    capture(context, lambda: step_rollback_to(context, plan, label, resource))


@step('plan "{plan}" tries to be released')
def step_try_release_plan(context: Any, plan: str) -> None:
    capture(context, lambda: _handler(context).release_plan(plan))


@then('plan "{plan}" sees the items "{skus}" in "{resource}"')
def step_plan_sees_items(context: Any, plan: str, skus: str, resource: str) -> None:
    with _handler(context).connection(_resource(context, resource), plan_id=plan) as conn:
        found = [sku for (sku,) in conn.execute("SELECT sku FROM items ORDER BY sku")]
    assert found == sorted(split_names(skus)), f"plan {plan!r} sees {found}"


@then('plan "{plan}" sees no items in "{resource}"')
def step_plan_sees_no_items(context: Any, plan: str, resource: str) -> None:
    with _handler(context).connection(_resource(context, resource), plan_id=plan) as conn:
        found = [sku for (sku,) in conn.execute("SELECT sku FROM items ORDER BY sku")]
    assert found == [], f"plan {plan!r} sees {found}"


@then("the last checkpoint has depth {depth:d}")
def step_check_checkpoint_depth(context: Any, depth: int) -> None:
    assert context.last_checkpoint.depth == depth, context.last_checkpoint


# -- writers taking turns -----------------------------------------------------


@given('the plans "{names}" queue up, in that order, to add themselves to "{resource}"')
def step_plans_queue_up(context: Any, names: str, resource: str) -> None:
    context.queued = []
    context.queue_errors = []

    def add_and_release(plan: str) -> None:
        try:
            step_add_item(context, plan, plan, resource)
            _handler(context).release_plan(plan)
        except Exception as exc:  # reported by the step that joins the threads
            context.queue_errors.append(exc)

    for plan in split_names(names):
        before = _handler(context).stats().open_connections
        thread = threading.Thread(target=add_and_release, args=(plan,), name=f"bdd-{plan}")
        thread.start()
        context.queued.append(thread)
        # Give this writer time to get in line before the next one asks; order of
        # arrival is what the scenario is about, so it must be unambiguous.
        wait_until(
            lambda before=before: _handler(context).stats().open_connections > before,
            "a connection",
        )
        time.sleep(0.3)


@then("the queued plans all finish")
def step_queued_plans_finish(context: Any) -> None:
    for thread in context.queued:
        thread.join(EVENTUALLY_S)
        assert not thread.is_alive(), f"{thread.name} is still waiting"
    assert context.queue_errors == [], context.queue_errors


@then('"{filename}" has the items "{skus}" in the order they were added')
def step_check_items_in_order(context: Any, filename: str, skus: str) -> None:
    with separate_connection(path_in_workdir(context, filename)) as conn:
        found = [sku for (sku,) in conn.execute("SELECT sku FROM items ORDER BY rowid")]
    assert found == split_names(skus), f"{filename} holds {found} in that order"


# -- errors -------------------------------------------------------------------


@then("the call fails with {name}")
def step_call_fails_with(context: Any, name: str) -> None:
    expected = error_class(name)
    error = context.error
    assert error is not None, f"nothing was raised; expected {name}"
    assert type(error) is expected, f"raised {type(error).__name__}: {error}"


@then("the call succeeds")
def step_call_succeeds(context: Any) -> None:
    assert context.error is None, f"{type(context.error).__name__}: {context.error}"


@then('the error mentions "{text}"')
def step_error_mentions(context: Any, text: str) -> None:
    assert text in str(context.error), str(context.error)


@then('the error\'s {attribute} is "{value}"')
def step_error_attribute_is(context: Any, attribute: str, value: str) -> None:
    found = getattr(context.error, attribute)
    assert found == parse_value(value) or str(found) == value, f"{attribute} is {found!r}"


@then("the error's {attribute} is at least {value:g}")
def step_error_attribute_at_least(context: Any, attribute: str, value: float) -> None:
    found = getattr(context.error, attribute)
    assert found >= value, f"{attribute} is {found!r}"


@then('the error\'s {attribute} include "{value}"')
def step_error_attribute_includes(context: Any, attribute: str, value: str) -> None:
    found = getattr(context.error, attribute)
    assert value in found, f"{attribute} is {found!r}"


# -- counters -----------------------------------------------------------------


@then("the handler stats are:")
def step_check_stats(context: Any) -> None:
    stats = _handler(context).stats()
    expected = settings_from_table(context)
    found = {key: stats[key] for key in expected}
    assert found == expected, f"stats are {dict(stats)}"


@step("the handler's {counter} eventually reaches {count:d}")
def step_stat_eventually(context: Any, counter: str, count: int) -> None:
    wait_until(lambda: _handler(context).stats()[counter] == count, f"{counter} == {count}")
