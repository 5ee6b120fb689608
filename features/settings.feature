@fixture.sqlite
Feature: Settings and databases that cannot work are refused cleanly
  A bad handler setting is refused when the handler is made. A resource whose
  settings are wrong, or whose database cannot be opened, fails the plan's
  first call with a ResourceError naming it, and leaves nothing open behind.

  Scenario: A handler setting that is not allowed is refused
    When a database handler is created with on_full "panic"
    Then the call fails with ValueError
    And the error mentions "on_full"
    When a database handler is created with max_connections "0"
    Then the call fails with ValueError
    And the error mentions "max_connections"

  Scenario: A resource with a bad setting fails the plan's first call
    Given a database "inventory.db" with an empty items table
    And a database handler
    And the resource "inventory" on "inventory.db" with:
      | journal_mode | sideways |
    When plan "restock" tries to take checkpoint "start" on "inventory"
    Then the call fails with ResourceError
    And the error mentions "journal_mode"
    And the error's resource is "inventory"
    And the handler stats are:
      | open_connections | 0 |
      | active_plans     | 0 |

  Scenario Outline: A database that cannot be opened: <what>
    Given the open file descriptors are counted
    And <setup>
    And a database handler
    And the resource "inventory" on "<location>"
    When plan "restock" tries to add item "apple" to "inventory"
    Then the call fails with ResourceError
    And the error's plan_id is "restock"
    And the error's resource is "inventory"
    And the error's operation is "open"
    And the handler stats are:
      | open_connections | 0 |
      | active_plans     | 0 |
    And the open file descriptors are back to that count

    Examples:
      | what                          | setup                                          | location          |
      | a folder that does not exist  | a database "other.db" with an empty items table | missing/inventory.db |
      | a file that is not a database | a file "garbage.db" that is not a database     | garbage.db        |
