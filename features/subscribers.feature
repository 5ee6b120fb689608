@fixture.sqlite
Feature: One bad subscriber never stops a rollback
  Plan events go to every subscriber even when one raises. The database
  handler hears first, so the plan's work is committed or rolled back before
  any other plugin is told; the error is reported with the plan's result.

  Background:
    Given a database "inventory.db" with the items "apple"
    And the plan file "sell.yaml":
      """
      id: sell
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: sell
          resource: inventory
          sql: DELETE FROM items
        - id: oversell
          resource: inventory
          expect:
            sql: SELECT count(*) FROM items
            equals: 1
      """
    And the plan file "restock.yaml":
      """
      id: restock
      resources:
        inventory: {kind: database, engine: sqlite, location: inventory.db}
      steps:
        - id: restock
          resource: inventory
          sql: INSERT INTO items (sku) VALUES ('pear')
      """

  Scenario: A subscriber raising on plan-failed: the plan is still rolled back and the others told
    Given the environment variable "CLEVERAGENTS_EXAMPLE_FAIL_ON" is "failed"
    And a runtime whose subscribers are "early", the example plugin and "late", in that order
    When the runtime runs "sell.yaml"
    Then plan "sell" failed at step "oversell"
    And "inventory.db" has the items "apple"
    And subscriber "early" was told "started, failed" for plan "sell"
    And subscriber "late" was told "started, failed" for plan "sell"
    And plan "sell" reports a subscriber error mentioning "example_report raised on cleveragents_plan_failed"

  Scenario: A subscriber raising on plan-completed: the plan is still committed and the others told
    Given the environment variable "CLEVERAGENTS_EXAMPLE_FAIL_ON" is "completed"
    And a runtime whose subscribers are "early", the example plugin and "late", in that order
    When the runtime runs "restock.yaml"
    Then plan "restock" completed
    And "inventory.db" has the items "apple, pear"
    And subscriber "early" was told "started, completed" for plan "restock"
    And subscriber "late" was told "started, completed" for plan "restock"
    And plan "restock" reports a subscriber error mentioning "example_report raised on cleveragents_plan_completed"

  Scenario: A subscriber raising on plan-started does not stop the plan
    Given the environment variable "CLEVERAGENTS_EXAMPLE_FAIL_ON" is "started"
    And the example plugin logs its events to "events.jsonl"
    And a runtime whose subscribers are "early", the example plugin and "late", in that order
    When the runtime runs "restock.yaml"
    Then plan "restock" completed
    And "inventory.db" has the items "apple, pear"
    And the event log "events.jsonl" has the events "completed" for plan "restock"
    And subscriber "late" was told "started, completed" for plan "restock"
