@fixture.sqlite
Feature: The cleveragents command
  "cleveragents run" runs plans and exits 0 when all completed, 1 when one
  failed (and was rolled back), 2 on bad input, when nothing is run.
  "validate" checks plans without touching any resource. Bad input is
  reported one line per problem as PATH:LINE: FIELD: problem, without a
  traceback. "plugins" lists what is installed and "schema" prints the plan
  JSON Schema for editors.

  Background:
    Given the plan file "restock.yaml":
      """
      id: restock
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: schema
          resource: inventory
          sql: CREATE TABLE IF NOT EXISTS items (sku TEXT PRIMARY KEY, qty INT NOT NULL DEFAULT 1)
        - id: seed
          resource: inventory
          retry: 1
          sql: INSERT OR IGNORE INTO items (sku) VALUES ('apple'), ('pear')
      """
    And the plan file "sell.yaml":
      """
      id: sell
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: sell-apple
          resource: inventory
          sql: DELETE FROM items WHERE sku = 'apple'
        - id: oversell
          resource: inventory
          expect:
            sql: SELECT count(*) FROM items
            equals: 5
        - id: log
          resource: inventory
          sql: SELECT 1
      """

  Scenario: A valid plan passes validation and nothing is touched
    When the operator runs "cleveragents validate restock.yaml sell.yaml"
    Then the exit status is 0
    And stdout mentions "restock.yaml: ok (2 steps)"
    And no file was created in the scenario's folder but the plans

  Scenario: run exits 0 when every plan completed and 1 when one failed and was rolled back
    When the operator runs "cleveragents run restock.yaml"
    Then the exit status is 0
    And stdout mentions "completed"
    And "inventory.db" has the items "apple, pear"
    When the operator runs "cleveragents run sell.yaml"
    Then the exit status is 1
    And stdout mentions "failed (rolled back)"
    And stdout mentions "expect: got 1, expected 5"
    And there is no traceback
    And "inventory.db" has the items "apple, pear"

  Scenario: run --json prints one JSON object per plan; --parallel runs them at once
    Given a database "inventory.db" with the items "apple"
    When the operator runs "cleveragents run --json --parallel 2 restock.yaml sell.yaml"
    Then the exit status is 1
    And stdout has 2 JSON lines
    And every JSON line has the fields "plan, status, failed_step, error, steps"
    And every step in the JSON output has the fields "id, status, attempts, duration_ms"
    And the JSON line of plan "restock" has "status" equal to "completed"
    And the JSON line of plan "restock" has "outcome" equal to "committed"
    And the JSON line of plan "restock" has "committed" equal to ["inventory"]
    And the JSON line of plan "restock" has "failed_step" equal to null
    And the JSON line of plan "restock" has "error" equal to null
    And in the JSON line of plan "restock", step "seed" has "attempts" equal to 1
    And the JSON line of plan "sell" has "status" equal to "failed"
    And the JSON line of plan "sell" has "outcome" equal to "rolled_back"
    And the JSON line of plan "sell" has "committed" equal to []
    And the JSON line of plan "sell" has "failed_step" equal to "oversell"
    And the JSON line of plan "sell" has an error mentioning "expected 5"
    And in the JSON line of plan "sell", step "oversell" has "status" equal to "failed"
    And in the JSON line of plan "sell", step "log" has "status" equal to "not run"
    And in the JSON line of plan "sell", step "log" has "attempts" equal to 0
    And "inventory.db" has the items "apple, pear"

  Scenario: A commit that fails after another database's succeeded is reported as a partial commit
    Given a database "orders.db" with an empty items table
    And the plan file "split.yaml":
      """
      id: split
      resources:
        orders: {kind: database, engine: sqlite, location: orders.db}
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: order
          resource: orders
          sql: INSERT OR IGNORE INTO items (sku) VALUES ('plum')
        - id: schema
          resource: inventory
          sql: >-
            CREATE TABLE items (sku TEXT PRIMARY KEY,
            parent TEXT REFERENCES items (sku) DEFERRABLE INITIALLY DEFERRED)
        - id: orphan
          resource: inventory
          sql: INSERT INTO items VALUES ('plum', 'no-such-parent')
      """
    When the operator runs "cleveragents run split.yaml"
    Then the exit status is 1
    And stdout mentions "plan split: failed (partial commit: committed orders)"
    And stdout does not mention "rolled back)"
    And there is no traceback
    And "orders.db" has the items "plum"
    And "inventory.db" has no table "items"
    When the operator runs "cleveragents run --json split.yaml"
    Then the exit status is 1
    And the JSON line of plan "split" has "status" equal to "failed"
    And the JSON line of plan "split" has "outcome" equal to "partial_commit"
    And the JSON line of plan "split" has "committed" equal to ["orders"]
    And the JSON line of plan "split" has an error mentioning "['orders'] were committed"

  Scenario: Plan and step ids are printed as written, never read as markup
    Given the plan file "markup.yaml":
      """
      id: "[/bold]plan"
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: "[red]step"
          resource: inventory
          sql: SELECT 1
      """
    When the operator runs "cleveragents run markup.yaml"
    Then the exit status is 0
    And stdout mentions "plan [/bold]plan: completed (committed)"
    And stdout mentions "[red]step"
    And there is no traceback

  Scenario: Handler settings on the command line are checked
    When the operator runs "cleveragents run --checkpoint-ttl soon restock.yaml"
    Then the exit status is 2
    And stderr mentions "soon"
    And no file was created in the scenario's folder but the plans

  Scenario: plugins lists the installed plugins, resource kinds and tools with their source
    When the operator runs "cleveragents plugins"
    Then the exit status is 0
    And stdout mentions "send_report"
    And stdout mentions "cleveragents-example-report"
    And stdout mentions "database"
    When the operator runs "cleveragents plugins --json"
    Then the exit status is 0
    And the JSON listing has the tool "send_report" from "cleveragents-example-report"
    And the JSON listing has the plugin "example_report" from "cleveragents-example-report"
    And the JSON listing has the resource kind "database"

  Scenario: schema prints the plan JSON Schema
    When the operator runs "cleveragents schema"
    Then the exit status is 0
    And stdout is a JSON Schema whose properties include "id, resources, steps"
    And the schema describes the database setting "checkpoint_ttl"
    And the schema describes the database setting "location"

  Scenario: A subscriber raising on plan-completed does not stop the commit
    Given the environment variable "CLEVERAGENTS_EXAMPLE_FAIL_ON" is "completed"
    And the example plugin logs its events to "events.jsonl"
    When the operator runs "cleveragents run restock.yaml"
    Then the exit status is 0
    And stderr mentions "example_report raised on cleveragents_plan_completed"
    And there is no traceback
    And "inventory.db" has the items "apple, pear"
    And the event log "events.jsonl" has the events "started" for plan "restock"

  Scenario: A subscriber raising on plan-failed does not stop the rollback
    Given the environment variable "CLEVERAGENTS_EXAMPLE_FAIL_ON" is "failed"
    And the example plugin logs its events to "events.jsonl"
    And a database "inventory.db" with the items "apple"
    When the operator runs "cleveragents run sell.yaml"
    Then the exit status is 1
    And stderr mentions "example_report raised on cleveragents_plan_failed"
    And there is no traceback
    And "inventory.db" has the items "apple"
    And the event log "events.jsonl" has the events "started" for plan "sell"

  Scenario Outline: <signal> interrupts the running statement, rolls back and exits <status>
    Given a database "inventory.db" with the items "apple"
    And the example plugin logs its events to "events.jsonl"
    And the plan file "endless.yaml":
      """
      id: endless
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: add
          resource: inventory
          sql: INSERT INTO items (sku) VALUES ('pear')
        - id: count-forever
          resource: inventory
          sql: WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n
      """
    When the operator starts "cleveragents run endless.yaml"
    And the event log "events.jsonl" shows that plan "endless" started
    And a plan holds the write lock on "inventory.db"
    And the operator sends <signal>
    And the command ends
    Then the exit status is <status>
    And stderr mentions "interrupted by <signal>"
    And there is no traceback
    And "inventory.db" has the items "apple"
    And the event log "events.jsonl" has the events "started, failed" for plan "endless"

    Examples:
      | signal  | status |
      | SIGINT  | 130    |
      | SIGTERM | 143    |

  Scenario Outline: A plugin that <behaviour>: "<command>" names it and exits 2
    Given an installed plugin "<plugin>" that <behaviour>
    When the operator runs "<command>"
    Then the exit status is 2
    And stderr mentions "<message>"
    And there is no traceback
    And there is no file "inventory.db"

    Examples:
      | plugin         | behaviour                             | command                       | message                                                                   |
      | broken-plugin  | raises on import                      | cleveragents plugins          | plugin 'broken_plugin' from distribution 'broken-plugin 0.1' failed to load |
      | clashing-tools | registers the tool send_report again  | cleveragents run restock.yaml | tool 'send_report' is already registered                                  |
