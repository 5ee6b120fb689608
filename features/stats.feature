@fixture.sqlite
Feature: The handler's counters
  stats() tells an operator what the handler holds and what it has done.

  Scenario: stats() counts connections, plans, checkpoints, commits and rollbacks
    Given a database "inventory.db" with an empty items table
    And a database handler
    And the resource "inventory" on "inventory.db"
    Then the handler stats are:
      | open_connections | 0 |
      | idle_connections | 0 |
      | active_plans     | 0 |
      | checkpoints      | 0 |
    When plan "p1" takes checkpoint "c1" on "inventory"
    And plan "p1" takes checkpoint "c2" on "inventory"
    Then the handler stats are:
      | open_connections | 1 |
      | idle_connections | 0 |
      | active_plans     | 1 |
      | checkpoints      | 2 |
      | commits          | 0 |
      | rollbacks        | 0 |
    When plan "p1" is released
    And plan "p2" takes checkpoint "c1" on "inventory"
    And plan "p2" is rolled back
    Then the handler stats are:
      | open_connections | 1 |
      | idle_connections | 1 |
      | active_plans     | 0 |
      | checkpoints      | 0 |
      | commits          | 1 |
      | rollbacks        | 1 |
      | reaped           | 0 |
      | evicted          | 0 |
