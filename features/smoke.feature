Feature: Running the example plan from the command line
  An operator runs the example plan with the installed command; the plan
  completes and its changes are committed.

  Scenario: The restock example commits its rows
    Given a copy of the example plan "restock.yaml" in a temporary folder
    When I run "cleveragents run" on it
    Then the command exits with status 0
    And the table "items" of "inventory.db" holds apple 12, pear 7 and plum 10
