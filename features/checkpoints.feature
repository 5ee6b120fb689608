@fixture.sqlite
Feature: Checkpoints inside a plan's transaction
  A plan takes checkpoints (savepoints) as it goes. Rolling back to one undoes
  what came after it and keeps the checkpoint, so the plan can try again from
  there; nothing reaches the database until the plan is released.

  Background:
    Given a database "inventory.db" with an empty items table
    And a database handler
    And the resource "inventory" on "inventory.db"

  Scenario: Nested checkpoints: rolling back to an earlier one forgets the later ones
    When plan "restock" adds item "apple" to "inventory"
    And plan "restock" takes checkpoint "one" on "inventory"
    And plan "restock" adds item "pear" to "inventory"
    And plan "restock" takes checkpoint "two" on "inventory"
    Then the last checkpoint has depth 2
    When plan "restock" adds item "plum" to "inventory"
    And plan "restock" rolls back to checkpoint "one" on "inventory"
    Then plan "restock" sees the items "apple" in "inventory"
    And "inventory.db" has no items
    When plan "restock" tries to roll back to checkpoint "two" on "inventory"
    Then the call fails with CheckpointNotFoundError
    And the error's checkpoint_id is "two"
    When plan "restock" takes checkpoint "two" on "inventory"
    Then the last checkpoint has depth 2
    When plan "restock" is released
    Then "inventory.db" has the items "apple"

  Scenario: Rolling back to the same checkpoint twice works
    When plan "restock" takes checkpoint "before-restock" on "inventory"
    And plan "restock" adds item "pear" to "inventory"
    And plan "restock" rolls back to checkpoint "before-restock" on "inventory"
    And plan "restock" adds item "plum" to "inventory"
    And plan "restock" rolls back to checkpoint "before-restock" on "inventory"
    And plan "restock" adds item "apple" to "inventory"
    And plan "restock" is released
    Then "inventory.db" has the items "apple"

  Scenario: Rolling back to an unknown checkpoint raises CheckpointNotFoundError and keeps the work
    When plan "restock" takes checkpoint "one" on "inventory"
    And plan "restock" adds item "apple" to "inventory"
    And plan "restock" tries to roll back to checkpoint "no-such-label" on "inventory"
    Then the call fails with CheckpointNotFoundError
    And the error's plan_id is "restock"
    And the error's checkpoint_id is "no-such-label"
    And the error's resource is "inventory"
    And plan "restock" sees the items "apple" in "inventory"
    When plan "never-started" tries to roll back to checkpoint "one" on "inventory"
    Then the call fails with CheckpointNotFoundError
    And the handler stats are:
      | active_plans | 1 |
    When plan "restock" is released
    Then "inventory.db" has the items "apple"

  Scenario: A label already open in the plan is refused
    When plan "restock" takes checkpoint "one" on "inventory"
    And plan "restock" tries to take checkpoint "one" on "inventory"
    Then the call fails with CheckpointError
    And the error mentions "already open"

  Scenario: Rolling a plan back undoes every checkpoint's work, tables included
    When plan "restock" takes checkpoint "one" on "inventory"
    And plan "restock" adds item "apple" to "inventory"
    And plan "restock" takes checkpoint "two" on "inventory"
    And plan "restock" creates the table "audit" in "inventory"
    And plan "restock" is rolled back
    Then "inventory.db" has no items
    And "inventory.db" has no table "audit"
    And another program can write to "inventory.db" at once
    And the handler stats are:
      | active_plans     | 0 |
      | checkpoints      | 0 |
      | idle_connections | 1 |
      | rollbacks        | 1 |

  Scenario: Any label is fine: a label never reaches SQL
    When plan "restock" takes checkpoint "x"; DROP TABLE items; --" on "inventory"
    And plan "restock" adds item "apple" to "inventory"
    And plan "restock" takes checkpoint "cp_1" on "inventory"
    And plan "restock" adds item "pear" to "inventory"
    And plan "restock" takes checkpoint "étiquette avec des espaces" on "inventory"
    And plan "restock" rolls back to checkpoint "cp_1" on "inventory"
    Then plan "restock" sees the items "apple" in "inventory"
    When plan "restock" rolls back to checkpoint "x"; DROP TABLE items; --" on "inventory"
    And plan "restock" is released
    Then "inventory.db" has no items
    When plan "restock" tries to take a checkpoint with an empty label on "inventory"
    Then the call fails with ValueError
