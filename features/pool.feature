@fixture.sqlite
Feature: A bounded pool of connections
  A handler opens at most max_connections connections. When every one of them
  holds a live plan, the next plan waits up to acquire_timeout and then gets
  PoolExhaustedError (on_full "wait"), or the least recently used plan is
  rolled back to make room (on_full "evict_lru").

  Background:
    Given a database "a.db" with an empty items table
    And a database "b.db" with an empty items table
    And a database "c.db" with an empty items table

  Scenario: When the pool is full, a plan waits, then gets PoolExhaustedError
    Given a database handler with:
      | max_connections | 1   |
      | acquire_timeout | 0.3 |
    And the resource "a" on "a.db"
    And the resource "b" on "b.db"
    And plan "holder" adds item "apple" to "a"
    When plan "late" tries to take checkpoint "start" on "b"
    Then the call fails with PoolExhaustedError
    And the error's limit is "1"
    And the error's holders include "holder"
    And the error's plan_id is "late"
    And the handler stats are:
      | open_connections | 1 |
      | active_plans     | 1 |
      | wait_timeouts    | 1 |
    When plan "holder" is released
    And plan "late" adds item "pear" to "b"
    And plan "late" is released
    Then "a.db" has the items "apple"
    And "b.db" has the items "pear"

  Scenario: Idle connections are reused, or closed to make room for another database
    Given a database handler with:
      | max_connections | 1   |
      | acquire_timeout | 0.3 |
    And the resource "a" on "a.db"
    And the resource "b" on "b.db"
    When plan "first" adds item "apple" to "a"
    And plan "first" is released
    And plan "second" adds item "pear" to "b"
    And plan "second" is released
    And plan "third" adds item "plum" to "a"
    And plan "third" is released
    Then "a.db" has the items "apple, plum"
    And "b.db" has the items "pear"
    And the handler stats are:
      | open_connections | 1 |
      | commits          | 3 |

  Scenario: evict_lru rolls back the least recently used plan, whose next call raises CheckpointEvictedError
    Given a database handler with:
      | max_connections | 2         |
      | on_full         | evict_lru |
    And the resource "a" on "a.db"
    And the resource "b" on "b.db"
    And the resource "c" on "c.db"
    And plan "old" adds item "apple" to "a"
    And plan "idle" takes checkpoint "before-pear" on "b"
    And plan "idle" adds item "pear" to "b"
    And plan "old" adds item "plum" to "a"
    When plan "new" adds item "fig" to "c"
    Then the handler stats are:
      | evicted          | 1 |
      | active_plans     | 2 |
      | open_connections | 2 |
    When plan "idle" tries to add item "kiwi" to "b"
    Then the call fails with CheckpointEvictedError
    And the error's plan_id is "idle"
    And the error's checkpoint_id is "before-pear"
    When plan "old" is released
    And plan "new" is released
    Then "a.db" has the items "apple, plum"
    And "b.db" has no items
    And "c.db" has the items "fig"
