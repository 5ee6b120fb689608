@fixture.sqlite
Feature: A handler never leaks, however it ends
  Closing rolls back every open plan and closes every connection; closing
  again does nothing and using a closed handler says so. A handler that is
  never closed is cleaned up when it is garbage-collected or when the
  interpreter exits, and a forked child never touches its parent's work.

  Background:
    Given a database "inventory.db" with an empty items table

  Scenario: Closing twice is harmless
    Given the open file descriptors are counted
    And a database handler
    And the resource "inventory" on "inventory.db"
    And plan "restock" adds item "apple" to "inventory"
    When the handler is closed twice
    Then "inventory.db" has no items
    And the handler stats are:
      | open_connections | 0 |
      | active_plans     | 0 |
    And the open file descriptors are back to that count

  Scenario: Closing from several threads at once closes once
    Given a database handler
    And the resource "inventory" on "inventory.db"
    And plan "restock" adds item "apple" to "inventory"
    When the handler is closed from 4 threads at once
    Then the handler is closed
    And "inventory.db" has no items
    And the handler stats are:
      | open_connections | 0 |
      | rollbacks        | 1 |

  Scenario: Using a closed handler raises HandlerClosedError
    Given a database handler
    And the resource "inventory" on "inventory.db"
    When the handler is closed
    And plan "late" tries to take checkpoint "start" on "inventory"
    Then the call fails with HandlerClosedError
    When plan "late" tries to add item "apple" to "inventory"
    Then the call fails with HandlerClosedError
    When plan "late" tries to be released
    Then the call fails with HandlerClosedError
    And "inventory.db" has no items

  Scenario: Leaving a "with" block closes the handler and rolls back what was not released
    Given the open file descriptors are counted
    And a database handler
    And the resource "inventory" on "inventory.db"
    When plan "restock" adds item "apple" to "inventory" inside a "with handler:" block
    Then the handler is closed
    And "inventory.db" has no items
    And the open file descriptors are back to that count

  Scenario: A forgotten handler is cleaned up by the garbage collector
    Given a database "other.db" with an empty items table
    And the open file descriptors are counted
    And a handler named "forgotten" that is never closed
    And on that handler, plan "restock" adds item "apple" to "inventory.db"
    And on that handler, plan "done" adds item "pear" to "other.db" and is released
    And on that handler, plan "scratch" creates a table in an in-memory database
    Then the reaper thread of "forgotten" is running
    When the last reference to that handler is dropped and the garbage collector runs
    Then the forgotten handler is gone
    And a ResourceWarning naming "forgotten" was emitted
    And the open file descriptors are back to that count
    And no reaper thread of "forgotten" is running
    And "inventory.db" has no items
    And "other.db" has the items "pear"
    And another program can write to "inventory.db" at once

  Scenario: A forked child starts empty and never touches its parent's plan
    Given a database "child.db" with an empty items table
    And a database handler
    And the resource "inventory" on "inventory.db"
    And the resource "child" on "child.db"
    And plan "restock" adds item "apple" to "inventory"
    When the process forks and the child releases and rolls back plan "restock", adds item "pear" to "child" in plan "kid", releases it and closes the handler
    Then the child exited with status 0
    And "child.db" has the items "pear"
    And "inventory.db" has no items
    When plan "restock" adds item "plum" to "inventory"
    And plan "restock" is released
    Then "inventory.db" has the items "apple, plum"

  Scenario Outline: At interpreter exit an open plan is rolled back, never committed
    When a Python program adds item "apple" to "inventory.db" in a plan, leaves it <state>, and exits without closing the handler
    Then the program exited with status 0
    And "inventory.db" has <rows>

    Examples:
      | state    | rows               |
      | open     | no items           |
      | released | the items "apple"  |
