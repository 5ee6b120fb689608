@fixture.sqlite
Feature: Forgotten plans are reaped, idle connections closed
  Each handler has one reaper thread. A plan left idle longer than its
  resource's checkpoint_ttl is rolled back (never committed) and its
  connection freed; the plan's next call says so. Connections left idle
  longer than idle_timeout are closed.

  Background:
    Given a database "inventory.db" with an empty items table

  Scenario: A stale plan is rolled back by the reaper and its next call raises CheckpointExpiredError
    Given a database handler
    And the resource "inventory" on "inventory.db" with:
      | checkpoint_ttl | 0.3 |
    And plan "stale" takes checkpoint "before-restock" on "inventory"
    And plan "stale" adds item "apple" to "inventory"
    When the handler's reaped eventually reaches 1
    Then "inventory.db" has no items
    And another program can write to "inventory.db" at once
    And the handler stats are:
      | active_plans | 0 |
      | rollbacks    | 1 |
      | commits      | 0 |
    When plan "stale" tries to add item "pear" to "inventory"
    Then the call fails with CheckpointExpiredError
    And the error's plan_id is "stale"
    And the error's checkpoint_id is "before-restock"
    And the error's resource is "inventory"
    And the error's ttl is "0.3"
    And the error's age is at least 0.3
    And the error mentions "stale"
    And the error mentions "before-restock"
    And the error mentions "checkpoint_ttl (0.3s)"

  Scenario: A reaped plan's next call raises once; after that the plan id starts afresh
    Given a database handler with:
      | checkpoint_ttl | 0.3 |
    And the resource "inventory" on "inventory.db"
    And plan "stale" adds item "apple" to "inventory"
    When the handler's reaped eventually reaches 1
    And plan "stale" tries to be released
    Then the call fails with CheckpointExpiredError
    And the error's ttl is "0.3"
    When plan "stale" adds item "pear" to "inventory"
    And plan "stale" is released
    Then "inventory.db" has the items "pear"

  Scenario: The smallest checkpoint_ttl among a plan's resources applies
    Given a database "audit.db" with an empty items table
    And a database handler
    And the resource "inventory" on "inventory.db"
    And the resource "audit" on "audit.db" with:
      | checkpoint_ttl | 0.3 |
    And plan "stale" adds item "apple" to "inventory"
    And plan "stale" adds item "apple" to "audit"
    When the handler's reaped eventually reaches 1
    Then "inventory.db" has no items
    And "audit.db" has no items
    When plan "stale" tries to add item "pear" to "inventory"
    Then the call fails with CheckpointExpiredError

  Scenario: A connection idle longer than idle_timeout is closed
    Given the open file descriptors are counted
    And a database handler with:
      | idle_timeout | 0.3 |
    And the resource "inventory" on "inventory.db"
    And plan "quick" adds item "apple" to "inventory"
    And plan "quick" is released
    When the handler's open_connections eventually reaches 0
    Then the open file descriptors are back to that count
    And "inventory.db" has the items "apple"
    When plan "later" adds item "pear" to "inventory"
    And plan "later" is released
    Then "inventory.db" has the items "apple, pear"
