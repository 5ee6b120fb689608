@fixture.sqlite
Feature: Writers take turns on a database, first come, first served
  The handler admits one writing plan at a time to a database file, in the
  order they asked. A plan that waits longer than the resource's busy_timeout
  gets ResourceBusyError naming the plan that holds the turn.

  Background:
    Given a database "inventory.db" with an empty items table
    And a database handler

  Scenario: A writer kept waiting past busy_timeout gets ResourceBusyError naming the holder
    Given the resource "inventory" on "inventory.db" with:
      | busy_timeout | 0.3 |
    And plan "first" adds item "apple" to "inventory"
    When plan "second" tries to add item "pear" to "inventory"
    Then the call fails with ResourceBusyError
    And the error's holder is "first"
    And the error's plan_id is "second"
    And the error mentions "'first'"
    And the handler stats are:
      | active_plans | 1 |
    When plan "first" is released
    And plan "second" adds item "pear" to "inventory"
    And plan "second" is released
    Then "inventory.db" has the items "apple, pear"

  Scenario: Waiting writers are admitted in the order they arrived
    Given the resource "inventory" on "inventory.db"
    And plan "first" adds item "first" to "inventory"
    And the plans "second, third, fourth" queue up, in that order, to add themselves to "inventory"
    When plan "first" is released
    Then the queued plans all finish
    And "inventory.db" has the items "first, second, third, fourth" in the order they were added

  Scenario: A plan with lock "deferred" reads while another plan holds the write turn
    Given the resource "writer" on "inventory.db"
    And the resource "reader" on "inventory.db" with:
      | lock         | deferred |
      | busy_timeout | 0.3      |
    And plan "first" adds item "apple" to "writer"
    When plan "second" takes checkpoint "look" on "reader"
    Then plan "second" sees no items in "reader"
    When plan "second" is released
    And plan "first" is released
    Then "inventory.db" has the items "apple"

  Scenario: A lock held by another program is waited for up to busy_timeout, like a plan's
    Given another program holds the write lock on "inventory.db"
    And the resource "inventory" on "inventory.db" with:
      | busy_timeout | 0.2 |
    When plan "restock" tries to add item "apple" to "inventory"
    Then the call fails with ResourceBusyError
    And the error mentions "busy_timeout (0.2s)"
    And the handler stats are:
      | active_plans     | 0 |
      | open_connections | 0 |
      | busy_timeouts    | 1 |
    When the other program lets go
    And plan "restock" adds item "apple" to "inventory"
    And plan "restock" is released
    Then "inventory.db" has the items "apple"
